"""One measurement in a fresh Python process: nothing compiled or cached by an earlier one
is reused, and XLA flags (read once, at start) can differ per measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_one(
  module: str, job: str, *, quick: bool = False, xla_flags: str = "", env: dict | None = None
) -> dict:
  """Runs `python -m module --one job [--quick]` with `xla_flags` appended to XLA_FLAGS (and
  `env` added to the environment) and returns the JSON object the child printed last, or
  {"error": the end of its stderr}."""
  env = dict(os.environ, **(env or {}))
  if xla_flags:
    env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} {xla_flags}".strip()
  command = [sys.executable, "-m", module, "--one", job] + ["--quick"] * quick
  done = subprocess.run(command, capture_output=True, text=True, env=env)
  lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
  if done.returncode or not lines:
    return {"error": done.stderr.strip().splitlines()[-3:]}
  return json.loads(lines[-1])
