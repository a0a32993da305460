"""Tables, JSON and charts for `jfused bench` rows."""

from __future__ import annotations

import collections
from collections.abc import Sequence
import functools
import itertools
import json
import os

from rich.table import Table
from rich.text import Text

from jfused.cli import terminal


def add_speedups(rows: list[dict]) -> None:
  """Sets each measured row's speed-up over XLA in the same (suite, shape, op, pass)."""

  def key(row):
    return row["suite"], row["shape"], row.get("op"), row["pass"]

  xla_ms = {key(r): r["ms"] for r in rows if r["implementation"] == "xla" and "ms" in r}
  for row in rows:
    baseline = xla_ms.get(key(row))
    if "ms" in row and baseline and row["ms"] > 0 and row.get("op") != "copy":
      row["vs_xla"] = baseline / row["ms"]


# Each suite's throughput columns: (header, row key, format, scale).
_THROUGHPUT = {
  "attention": [("TFLOP/s", "tflops", ".1f", 1.0)],
  "norm": [("GB/s", "gbps", ".0f", 1.0), ("of copy", "of_copy", ".2f", 1.0)],
  "block": [("ktok/s", "tokens_per_s", ".1f", 1e-3)],
  "cross_entropy": [("TFLOP/s", "tflops", ".1f", 1.0)],
}
# The columns after the throughput, shared by every suite.
_TRAILING = [
  ("vs xla", "vs_xla", ".2f", 1.0),
  ("temp MiB", "temp_mib", ".1f", 1.0),
  ("compile s", "compile_s", ".2f", 1.0),
  ("max err", "max_error", ".1e", 1.0),
]
# Left out in this order, as far as needed, on a terminal too narrow for the whole table (the
# JSON has them all).
_OPTIONAL = ("compile s", "temp MiB", "of copy")


def _numbers(suite: str) -> list[tuple[str, str, str, float]]:
  """The number columns of a suite's table: (header, row key, format, scale)."""
  return [("ms", "ms", ".3f", 1.0), *_THROUGHPUT.get(suite, []), *_TRAILING]


def _cell(row: dict, key: str, spec: str, scale: float) -> str:
  value = row.get(key)
  if value is None:
    return "-"
  return format(value * scale, spec) + ("x" if key == "vs_xla" else "")


def _lead(row: dict) -> tuple[str, ...]:
  """The cell a row belongs to: its shape, and op where the suite has several."""
  return (row["shape"],) + ((row["op"],) if "op" in row else ())


def _table(
  suite: str, rows: list[dict], compact: bool = False, hidden: Sequence[str] = ()
) -> Table:
  """The measured rows of one suite, a section per shape (and op), less the `hidden` columns
  (`terminal.fitted` builds it)."""
  lead = ["shape", "op"] if any("op" in r for r in rows) else ["shape"]
  numbers = [column for column in _numbers(suite) if column[0] not in hidden]
  dtypes = sorted({r["dtype"] for r in rows})
  caption = []
  if any(r["pass"] == "bwd" for r in rows):
    caption.append("bwd: the backward alone, run on the residuals of a forward")
  if hidden:
    caption.append(f"left out to fit the terminal: {', '.join(hidden)}")
  table = terminal.table(
    f"{suite} ({', '.join(dtypes)})", compact=compact, caption="\n".join(caption) or None
  )
  # If nothing else fits, names fold rather than lose their ends; numbers never break.
  for header in [*lead, "implementation", "pass"]:
    table.add_column(header, overflow="fold")
  for header, *_ in numbers:
    table.add_column(terminal.header(header, compact), justify="right", no_wrap=True)
  previous = None
  for row in rows:
    if previous is not None and _lead(row) != previous:
      table.add_section()
    previous = _lead(row)
    table.add_row(
      *_lead(row),
      row["implementation"],
      row["pass"],
      *(_cell(row, key, spec, scale) for _, key, spec, scale in numbers),
    )
  return table


def _notes(rows: list[dict]) -> list[Text]:
  """One line per reason cells were skipped (naming their shapes) and one per failed cell."""
  shapes = list(dict.fromkeys(r["shape"] for r in rows))
  skipped = collections.defaultdict(dict)  # reason -> shapes, in order, without repeats
  failed = {}  # (shape, op, implementation) -> error, once per cell rather than per pass
  for row in rows:
    if "skipped" in row:
      skipped[row["skipped"]][row["shape"]] = None
    elif "error" in row:
      failed.setdefault((*_lead(row), row["implementation"]), row["error"])
  notes = []
  for reason, where in skipped.items():
    names = f"all {len(shapes)} shapes" if len(where) == len(shapes) > 1 else ", ".join(where)
    notes.append(Text(f"skipped: {reason} ({names})", style="dim"))
  for cell, error in failed.items():
    notes.append(Text(f"ERROR {' '.join(cell)}: {error}", style="red"))
  return notes


def tables(rows: list[dict], width: int | None = None) -> list[Table | Text]:
  """A rich table of each suite's measured rows, each followed by notes on the cells that were
  skipped or failed. With `width` (a terminal's), the tables compact themselves and leave out
  their least needed columns, as far as that makes them fit (`terminal.fitted`)."""
  result = []
  for suite in dict.fromkeys(r["suite"] for r in rows):
    suite_rows = [r for r in rows if r["suite"] == suite]
    measured = [r for r in suite_rows if "ms" in r]
    if measured:
      optional = [
        header for header in _OPTIONAL if header in {column[0] for column in _numbers(suite)}
      ]
      result.append(terminal.fitted(functools.partial(_table, suite, measured), width, optional))
    result.extend(_notes(suite_rows))
  return result


def write_json(path: str, environment: dict, settings: dict, rows: list[dict]) -> None:
  with open(path, "w") as f:
    json.dump({**environment, "settings": settings, "rows": rows}, f, indent=1)


def plot(rows: list[dict], out_dir: str) -> list[str]:
  """Throughput charts, one PNG per suite; returns the paths written."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  written = []
  attention = [r for r in rows if r["suite"] == "attention" and r.get("tflops")]
  if attention:
    passes = sorted({r["pass"] for r in attention})
    groups = sorted({(r["head_dim"], r["causal"]) for r in attention})
    figure, axes = plt.subplots(
      len(passes), len(groups), squeeze=False, figsize=(4 * len(groups), 3.2 * len(passes))
    )
    for (row, pass_name), (column, (head_dim, causal)) in itertools.product(
      enumerate(passes), enumerate(groups)
    ):
      axis = axes[row][column]
      lines = collections.defaultdict(list)
      for r in attention:
        if (r["pass"], r["head_dim"], r["causal"]) == (pass_name, head_dim, causal):
          lines[r["implementation"]].append((r["seq"], r["tflops"]))
      for implementation, points in sorted(lines.items()):
        xs, ys = zip(*sorted(points))
        axis.plot(xs, ys, marker="o", label=implementation)
      axis.set_xscale("log", base=2)
      axis.set_title(f"{pass_name} d={head_dim}{' causal' if causal else ''}", fontsize=9)
      axis.set_xlabel("sequence length")
      axis.set_ylabel("TFLOP/s")
      axis.legend(fontsize=7)
    figure.tight_layout()
    path = os.path.join(out_dir, "attention.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
  norms = [r for r in rows if r["suite"] == "norm" and r.get("gbps") and r["op"] != "copy"]
  if norms:
    labels = sorted({(r["shape"], r["op"], r["pass"]) for r in norms})
    implementations = sorted({r["implementation"] for r in norms})
    figure, axis = plt.subplots(figsize=(max(6, 0.5 * len(labels)), 4))
    width = 0.8 / len(implementations)
    for i, implementation in enumerate(implementations):
      values = {
        (r["shape"], r["op"], r["pass"]): r["gbps"]
        for r in norms
        if r["implementation"] == implementation
      }
      axis.bar(
        [j + i * width for j in range(len(labels))],
        [values.get(label, 0) for label in labels],
        width,
        label=implementation,
      )
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    axis.set_xticklabels([" ".join(label) for label in labels], rotation=70, fontsize=7, ha="right")
    axis.set_ylabel("GB/s")
    axis.legend()
    figure.tight_layout()
    path = os.path.join(out_dir, "norms.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
  return written
