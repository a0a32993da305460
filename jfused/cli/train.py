"""`jfused train`: a small GPT learns a book with fused layers, and with the layers a Flax
user would otherwise pick (Flax's norms and loss with cuDNN attention, on a GPU) and with
plain Flax.

Every run starts from the same parameters (`flax_layers.GPT` has one parameter tree whether
fused or not), sees the same batches in the same order and uses the same optimiser, so the
loss curves differ only by the arithmetic of the layers: the largest gap between the first
and the last run is the parity check. The model reads bytes of the public-domain text
shipped in `jfused/cli/data/`; the last tenth of it is held out for a validation loss. Its
vocabulary is 256 unless `vocab_size` asks for a tokenizer-sized one: the text still uses only
the first 256 ids, but the logits and their gradient grow to what a real language model
carries, which is where the fused loss's memory shows.

Each training step is one jitted function of (model and optimiser state, token batch),
compiled ahead of time so the compile time and the compiled program's memory (arguments,
outputs and scratch, and the scratch alone) are reported apart from the step time.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from rich.table import Table
from rich.text import Text

from jfused import config
from jfused.cli import terminal

CORPUS = "alice_in_wonderland.txt"
BYTE_VOCABULARY = 256
VALIDATION_FRACTION = 0.1
# fused: jfused's defaults; cudnn: the baseline a Flax user would pick (Flax's norms and loss,
# cuDNN attention; GPU only); plain: Flax's own math throughout. Same parameters for all.
VARIANTS = ("fused", "cudnn", "plain")


def default_variants() -> tuple[str, ...]:
  return VARIANTS if config.on_gpu() else ("fused", "plain")


@dataclasses.dataclass(frozen=True)
class ModelSize:
  """A GPT configuration and the batch it trains on."""

  num_layers: int
  num_features: int
  num_heads: int
  batch: int
  seq_len: int
  steps: int
  learning_rate: float
  # Rows of the (tied) embedding and width of the logits; ids past 255 never occur in the data.
  vocab_size: int = BYTE_VOCABULARY


SIZES = {
  # CPU: the fused run goes through the Pallas kernels in interpret mode, so keep it tiny.
  "tiny": ModelSize(
    num_layers=2, num_features=64, num_heads=2, batch=4, seq_len=64, steps=100, learning_rate=3e-3
  ),
  # GPU: 8 blocks of width 1024 with 128-wide heads, 16k tokens a step.
  "small": ModelSize(
    num_layers=8,
    num_features=1024,
    num_heads=8,
    batch=8,
    seq_len=2048,
    steps=200,
    learning_rate=6e-4,
  ),
}


def load_corpus() -> np.ndarray:
  """The shipped text as uint8 tokens."""
  data = importlib.resources.files("jfused.cli").joinpath("data", CORPUS).read_bytes()
  return np.frombuffer(data, dtype=np.uint8)


def split_corpus(tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  cut = int(len(tokens) * (1 - VALIDATION_FRACTION))
  return tokens[:cut], tokens[cut:]


def sample_windows(
  tokens: np.ndarray, rng: np.random.Generator, count: int, length: int
) -> np.ndarray:
  """`count` random windows of `length` consecutive tokens, int32 [count, length]."""
  if len(tokens) < length:
    raise ValueError(f"seq_len {length - 1} needs a text longer than {len(tokens)} bytes")
  starts = rng.integers(0, len(tokens) - length + 1, size=count)
  return np.stack([tokens[s : s + length] for s in starts]).astype(np.int32)


def build_model(size: ModelSize, *, variant: str, dtype, seed: int):
  from flax import nnx

  from flax_layers import GPT

  # Off-GPU the default attention is XLA's; name the kernels so the CPU run exercises them.
  implementation = None if config.on_gpu() else "pallas_triton"
  implementations = dict(
    attention_implementation=implementation,
    norm_implementation=implementation,
    loss_implementation=implementation,
  )
  if variant == "cudnn":
    implementations = dict(
      attention_implementation="cudnn", norm_implementation="xla", loss_implementation="xla"
    )
  return GPT(
    size.vocab_size,
    size.num_layers,
    size.num_features,
    size.num_heads,
    max_length=size.seq_len,
    fused=variant != "plain",
    dtype=dtype,
    rngs=nnx.Rngs(seed),
    **implementations,
  )


def make_optimizer(model, size: ModelSize):
  from flax import nnx
  import optax

  warmup = max(1, size.steps // 10)
  schedule = optax.warmup_cosine_decay_schedule(
    0.0,
    size.learning_rate,
    warmup_steps=warmup,
    decay_steps=max(size.steps, warmup + 1),
    end_value=size.learning_rate / 10,
  )
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, b2=0.95, weight_decay=0.1))
  return nnx.Optimizer(model, tx, wrt=nnx.Param)


def make_step_functions(graphdef):
  """Pure jitted (state, tokens) -> (state, loss) and (state, tokens) -> loss."""
  from flax import nnx

  from flax_layers import next_token_loss

  def train_step(state, tokens):
    model, optimizer = nnx.merge(graphdef, state)
    loss, grads = nnx.value_and_grad(lambda m, t: next_token_loss(m, t))(model, tokens)
    optimizer.update(model, grads)
    return nnx.state((model, optimizer)), loss

  def eval_loss(state, tokens):
    model, _ = nnx.merge(graphdef, state)
    return next_token_loss(model, tokens)

  return jax.jit(train_step, donate_argnums=0), jax.jit(eval_loss)


def _program_bytes(compiled) -> tuple[int, int] | tuple[None, None]:
  """The compiled step's memory (arguments, outputs and scratch, less what the donated state
  shares) and its scratch alone, in bytes; (None, None) where the backend does not say."""
  analysis = compiled.memory_analysis()
  if analysis is None:
    return None, None
  total = (
    analysis.argument_size_in_bytes
    + analysis.output_size_in_bytes
    + analysis.temp_size_in_bytes
    - analysis.alias_size_in_bytes
  )
  return int(total), int(analysis.temp_size_in_bytes)


def place(tree, mesh):
  """Replicates `tree` over `mesh` (None: leaves it where it is)."""
  if mesh is None:
    return tree
  from jax.sharding import NamedSharding, PartitionSpec

  return jax.device_put(tree, NamedSharding(mesh, PartitionSpec()))


def shard_batch(tokens, mesh):
  """Splits the batch axis of `tokens` over the mesh's data axis (None: one device)."""
  if mesh is None:
    return jnp.asarray(tokens)
  from jax.sharding import NamedSharding, PartitionSpec

  return jax.device_put(tokens, NamedSharding(mesh, PartitionSpec("data")))


def train_variant(
  variant: str,
  size: ModelSize,
  batches: np.ndarray,
  validation: np.ndarray,
  *,
  dtype,
  seed: int,
  mesh=None,
  progress: terminal.ProgressBars | None = None,
) -> dict:
  """Trains one variant over `batches` [steps, batch, seq_len + 1]; returns its record.

  With `progress`, a bar named after the variant follows the steps (in a log: the first, the
  last and every tenth of the run).
  """
  from flax import nnx

  model = build_model(size, variant=variant, dtype=dtype, seed=seed)
  optimizer = make_optimizer(model, size)
  graphdef, state = nnx.split((model, optimizer))
  parameters = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  state = place(state, mesh)
  train_step, eval_loss = make_step_functions(graphdef)
  steps = len(batches)
  if progress is not None:
    task = progress.add_task(variant, total=steps)
    progress.show(task, note="compiling")
  first = shard_batch(batches[0], mesh)
  start = time.perf_counter()
  compiled = train_step.lower(state, first).compile()
  compile_seconds = time.perf_counter() - start

  if progress is not None:
    # Restarts the clock: the elapsed time and the rate are the steps' own.
    progress.reset(task, note="")
  losses, step_seconds = [], []
  for step, batch in enumerate(batches, start=1):
    tokens = shard_batch(batch, mesh)
    start = time.perf_counter()
    state, loss = compiled(state, tokens)
    loss = float(loss)  # Waits for the step: the time below is the step's own.
    step_seconds.append(time.perf_counter() - start)
    losses.append(loss)
    if progress is not None:
      progress.show(
        task,
        completed=step,
        note=f"loss {loss:.3f}",
        log=step in (1, steps) or step % max(1, steps // 10) == 0,
      )
  if not np.all(np.isfinite(losses)):
    raise FloatingPointError(f"{variant} training produced a non-finite loss: {losses}")

  # The first step pays for transfers and warm-up; time the rest.
  steady = step_seconds[1:] or step_seconds
  step_ms = 1e3 * statistics.median(steady)
  tokens_per_step = size.batch * size.seq_len
  program_bytes, scratch_bytes = _program_bytes(compiled)
  return {
    "variant": variant,
    "parameters": int(parameters),
    "losses": losses,
    "step_ms": step_ms,
    "tokens_per_s": tokens_per_step / (step_ms / 1e3),
    "compile_s": compile_seconds,
    "program_mib": None if program_bytes is None else program_bytes / 2**20,
    "scratch_mib": None if scratch_bytes is None else scratch_bytes / 2**20,
    "validation_loss": float(eval_loss(state, shard_batch(validation, mesh))),
  }


def loss_gap(records: list[dict]) -> dict:
  """The largest |loss difference| between the first and the last record (by default fused
  and plain), and where it is."""
  a, b = (np.asarray(r["losses"]) for r in (records[0], records[-1]))
  gaps = np.abs(a - b)
  step = int(np.argmax(gaps))
  return {
    "max_abs": float(gaps[step]),
    "step": step + 1,
    "max_relative": float(np.max(gaps / np.maximum(np.abs(b), 1e-12))),
  }


def table(records: list[dict], width: int | None = None) -> Table:
  """The variants side by side: size, speed, compile time, memory and losses, fitted to
  `width` columns (a terminal's; None: as wide as it needs)."""

  def build(compact: bool, hidden) -> Table:
    del hidden  # Every column stays.
    result = terminal.table("training", compact=compact)
    result.add_column("variant", overflow="fold")
    for header in (
      "params",
      "step ms",
      "ktok/s",
      "compile s",
      "memory MiB",
      "scratch MiB",
      "first loss",
      "last loss",
      "val loss",
    ):
      result.add_column(terminal.header(header, compact), justify="right", no_wrap=True)
    for r in records:
      memory, scratch = (
        "-" if r[key] is None else f"{r[key]:.1f}" for key in ("program_mib", "scratch_mib")
      )
      result.add_row(
        r["variant"],
        f"{r['parameters']:,}",
        f"{r['step_ms']:.2f}",
        f"{r['tokens_per_s'] / 1e3:.1f}",
        f"{r['compile_s']:.1f}",
        memory,
        scratch,
        f"{r['losses'][0]:.4f}",
        f"{r['losses'][-1]:.4f}",
        f"{r['validation_loss']:.4f}",
      )
    return result

  return terminal.fitted(build, width)


def summary(records: list[dict], gap: dict | None) -> list[Text]:
  """The lines under the table: the loss parity and the first variant's speed-ups."""
  lines = []
  if gap is not None:
    lines.append(
      Text(
        f"largest loss difference: {gap['max_abs']:.2e} at step {gap['step']} "
        f"(relative {gap['max_relative']:.2e})"
      )
    )
  for other in records[1:]:
    lines.append(
      Text(
        f"{records[0]['variant']} step speed-up over {other['variant']}: "
        f"{other['step_ms'] / records[0]['step_ms']:.2f}x"
      )
    )
  return lines


def plot(records: list[dict], gap: dict | None, path: str, title: str) -> str:
  """Loss curves of every variant, and the first minus the last below."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = 2 if gap is not None else 1
  figure, axes = plt.subplots(
    rows,
    1,
    squeeze=False,
    sharex=True,
    figsize=(7, 3 + 2 * (rows - 1)),
    gridspec_kw={"height_ratios": [3, 2][:rows]},
  )
  for r in records:
    steps = np.arange(1, len(r["losses"]) + 1)
    axes[0][0].plot(steps, r["losses"], label=f"{r['variant']} ({r['step_ms']:.1f} ms/step)")
  axes[0][0].set_ylabel("training loss (nats/byte)")
  axes[0][0].set_title(title, fontsize=9)
  axes[0][0].legend()
  if gap is not None:
    a, b = (np.asarray(r["losses"]) for r in (records[0], records[-1]))
    axes[1][0].plot(np.arange(1, len(a) + 1), a - b, color="black")
    axes[1][0].set_ylabel(f"{records[0]['variant']} - {records[-1]['variant']}")
    axes[1][0].set_title(
      f"largest |difference| {gap['max_abs']:.2e} at step {gap['step']}", fontsize=9
    )
  axes[-1][0].set_xlabel("step")
  figure.tight_layout()
  figure.savefig(path, dpi=110)
  plt.close(figure)
  return path


def make_batches(size: ModelSize, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Training batches [steps, batch, seq_len + 1] and a validation batch, from the corpus."""
  train_tokens, validation_tokens = split_corpus(load_corpus())
  rng = np.random.default_rng(seed)
  length = size.seq_len + 1  # Inputs and their next-token targets.
  batches = sample_windows(train_tokens, rng, size.steps * size.batch, length)
  validation = sample_windows(validation_tokens, rng, size.batch, length)
  return batches.reshape(size.steps, size.batch, length), validation
