"""Tables, JSON and charts for `jfused bench` rows."""

from __future__ import annotations

import collections
import itertools
import json
import os


def add_speedups(rows: list[dict]) -> None:
  """Sets each measured row's speed-up over XLA in the same (suite, shape, op, pass)."""
  def key(row):
    return row["suite"], row["shape"], row.get("op"), row["pass"]

  xla_ms = {key(r): r["ms"] for r in rows if r["implementation"] == "xla" and "ms" in r}
  for row in rows:
    baseline = xla_ms.get(key(row))
    if "ms" in row and baseline and row["ms"] > 0 and row.get("op") != "copy":
      row["vs_xla"] = baseline / row["ms"]


def _fmt(value, spec: str) -> str:
  return "-" if value is None else format(value, spec)


def format_table(rows: list[dict]) -> str:
  header = (f"{'suite':<9} {'shape':<28} {'op':<20} {'implementation':<19} {'pass':<7} "
            f"{'ms':>9} {'throughput':>14} {'vs xla':>7} {'temp MiB':>9} {'compile s':>9} "
            f"{'max err':>9}")
  lines = [header, "-" * len(header)]
  reported = set()
  for row in rows:
    lead = (f"{row['suite']:<9} {row['shape']:<28} {row.get('op', '-'):<20} "
            f"{row['implementation']:<19} {row['pass']:<7}")
    if "skipped" in row or "error" in row:
      cell = (row["suite"], row["shape"], row.get("op"), row["implementation"])
      if cell not in reported:  # One line per cell, not one per pass.
        reported.add(cell)
        reason = f"skipped: {row['skipped']}" if "skipped" in row else f"ERROR: {row['error']}"
        lines.append(f"{lead[:-8]} {'all':<7} {reason}")
      continue
    if "tflops" in row:
      throughput = f"{_fmt(row['tflops'], '.1f')} TFLOP/s"
    elif "tokens_per_s" in row:
      throughput = f"{_fmt(row['tokens_per_s'] and row['tokens_per_s'] / 1e3, '.1f')} ktok/s"
    else:
      throughput = f"{_fmt(row.get('gbps'), '.0f')} GB/s"
    speedup = f"{row['vs_xla']:.2f}x" if row.get("vs_xla") else "-"
    lines.append(
        f"{lead} {row['ms']:9.3f} {throughput:>14} {speedup:>7} "
        f"{_fmt(row.get('temp_mib'), '.1f'):>9} {_fmt(row.get('compile_s'), '.2f'):>9} "
        f"{_fmt(row.get('max_error'), '.1e'):>9}")
  return "\n".join(lines)


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
    figure, axes = plt.subplots(len(passes), len(groups), squeeze=False,
                                figsize=(4 * len(groups), 3.2 * len(passes)))
    for (row, pass_name), (column, (head_dim, causal)) in itertools.product(
        enumerate(passes), enumerate(groups)):
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
      values = {(r["shape"], r["op"], r["pass"]): r["gbps"] for r in norms
                if r["implementation"] == implementation}
      axis.bar([j + i * width for j in range(len(labels))],
               [values.get(label, 0) for label in labels], width, label=implementation)
    axis.set_xticks([j + 0.4 - width / 2 for j in range(len(labels))])
    axis.set_xticklabels([" ".join(label) for label in labels], rotation=70, fontsize=7,
                         ha="right")
    axis.set_ylabel("GB/s")
    axis.legend()
    figure.tight_layout()
    path = os.path.join(out_dir, "norms.png")
    figure.savefig(path, dpi=110)
    plt.close(figure)
    written.append(path)
  return written
