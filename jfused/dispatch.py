"""Choosing an implementation for an op call.

Every op accepts `implementation=`: a name, a sequence of names tried in order, or None for
the op's own preference on the current device. An implementation that cannot serve a call
raises `NotImplementedError` (before launching anything) and the next one is tried.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any


def resolve(
  op_name: str,
  implementation: str | Sequence[str] | None,
  known: Sequence[str],
  default_order: Sequence[str],
) -> tuple[str, ...]:
  """Validates `implementation` and returns the names to try, in order."""
  if implementation is None:
    return tuple(default_order)
  names = (implementation,) if isinstance(implementation, str) else tuple(implementation)
  if not names:
    raise ValueError(f"{op_name}: implementation must not be an empty sequence")
  for name in names:
    if not isinstance(name, str):
      raise TypeError(
        f"{op_name}: implementation must be a string or a sequence of strings, got {name!r}"
      )
    if name not in known:
      raise ValueError(
        f"{op_name}: unknown implementation {name!r}; expected one of {sorted(known)}"
      )
  return names


def call_first_supported(
  op_name: str,
  names: Sequence[str],
  implementations: Mapping[str, Callable[..., Any]],
  *args,
  **kwargs,
):
  """Calls the first implementation in `names` that does not raise NotImplementedError."""
  reasons = []
  for name in names:
    try:
      return implementations[name](*args, **kwargs)
    except NotImplementedError as error:
      reasons.append(f"{name}: {error}")
  raise NotImplementedError(
    f"{op_name}: no implementation can serve this call ({'; '.join(reasons)})"
  )
