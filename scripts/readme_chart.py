"""Draws the README's chart from committed measurements: attention TFLOP/s on an H200.

Reads `jfused bench attention` JSON files under benchmarks/results (every file's rows; a
(shape, implementation, pass) measured in an earlier file is kept) and draws forward and
forward+backward throughput per shape and implementation as grouped bars:

  python scripts/readme_chart.py                       # docs/images/attention_h200.png
  python scripts/readme_chart.py --out other.png results/a.json results/b.json

Needs only matplotlib and the JSON files; no GPU, no JAX.
"""

from __future__ import annotations

import argparse
import json
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (the backend is chosen first)

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
# The latest H200 run of the Hopper kernels side by side, and its causal d=64 companion.
DEFAULT_INPUTS = (
  RESULTS / "attention_bench_deterministic_h200_2026-12-02.json",
  RESULTS / "attention_bench_d64_deterministic_h200_2026-12-02.json",
)
DEFAULT_OUT = ROOT / "docs" / "images" / "attention_h200.png"

# Bench name -> legend label and colour, in drawing order.
IMPLEMENTATIONS = {
  "pallas_mosaic": ("jfused (pallas_mosaic)", "#d62728"),
  "cudnn": ("cuDNN (jax.nn)", "#1f77b4"),
  "cudnn_deterministic": ("cuDNN, deterministic", "#aec7e8"),
  "tokamax": ("tokamax", "#2ca02c"),
  "xla": ("XLA (jax.nn)", "#7f7f7f"),
}
PASSES = (("fwd", "forward"), ("fwd+bwd", "forward + backward"))


def load_rows(paths):
  """{(shape, implementation, pass): TFLOP/s}, shape order, and the first file's header."""
  values, shapes, header = {}, [], None
  for path in paths:
    data = json.loads(pathlib.Path(path).read_text())
    header = header or data
    for row in data["rows"]:
      if row.get("suite") != "attention" or row.get("tflops") is None:
        continue
      key = (row["shape"], row["implementation"], row["pass"])
      if key in values:
        continue  # The earlier file's measurement of the same thing wins.
      values[key] = row["tflops"]
      if row["shape"] not in shapes:
        shapes.append(row["shape"])
  # A causal shape goes right after its unmasked twin when both were measured.
  first = {}
  for shape in shapes:
    first.setdefault(shape.removesuffix("_causal"), len(first))
  shapes.sort(key=lambda shape: (first[shape.removesuffix("_causal")], shape.endswith("_causal")))
  return values, shapes, header


def shape_label(shape: str) -> str:
  """B4_T4096_h32kv8_d128_causal -> 'B4 T4096\\n32q/8kv d128\\ncausal'."""
  parts = shape.split("_")
  batch, seq, heads, dim = parts[:4]
  heads = heads[1:]
  if "kv" in heads:
    query_heads, kv_heads = heads.split("kv")
    heads = f"{query_heads}q/{kv_heads}kv"
  else:
    heads = f"{heads} heads"
  label = f"{batch} {seq}\n{heads} {dim}"
  return label + ("\ncausal" if "causal" in parts[4:] else "")


def draw(values, shapes, header, out: pathlib.Path) -> None:
  names = [name for name in IMPLEMENTATIONS if any(key[1] == name for key in values)]
  width = 0.8 / len(names)
  fig, axes = plt.subplots(2, 1, figsize=(11, 7.5), sharex=True)
  for ax, (pass_name, title) in zip(axes, PASSES):
    for i, name in enumerate(names):
      label, colour = IMPLEMENTATIONS[name]
      xs, ys = [], []
      for j, shape in enumerate(shapes):
        value = values.get((shape, name, pass_name))
        if value is not None:
          xs.append(j + (i - (len(names) - 1) / 2) * width)
          ys.append(value)
      bars = ax.bar(xs, ys, width, label=label, color=colour)
      if name == "pallas_mosaic":
        ax.bar_label(bars, fmt="%.0f", fontsize=7, padding=1)
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_ylabel("TFLOP/s")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
  axes[0].legend(
    ncol=len(names), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, 1.25), frameon=False
  )
  axes[-1].set_xticks(range(len(shapes)), [shape_label(s) for s in shapes], fontsize=8)
  fig.suptitle(
    f"Attention, bf16, on an {header['device']} (jax {header['jax']}, "
    f"{header['date'][:10]}); XLA skipped where it needs over 8 GiB of logits",
    fontsize=10,
    y=0.995,
  )
  fig.tight_layout()
  out.parent.mkdir(parents=True, exist_ok=True)
  fig.savefig(out, dpi=110)
  plt.close(fig)


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
    "inputs",
    nargs="*",
    default=DEFAULT_INPUTS,
    help="jfused bench attention JSON files (default: the latest H200 run)",
  )
  parser.add_argument("--out", type=pathlib.Path, default=DEFAULT_OUT)
  args = parser.parse_args(argv)
  values, shapes, header = load_rows(args.inputs)
  if not values:
    raise SystemExit("no attention rows in " + ", ".join(map(str, args.inputs)))
  draw(values, shapes, header, args.out)
  print(f"wrote {args.out}")


if __name__ == "__main__":
  main()
