"""Attention dropout: kernels and "xla" against attention with the materialised mask applied.

On CPU the Pallas kernels run in interpret mode. The reference here is written independently
of jfused's own (softmax in float32, then the mask from `jfused.attention_dropout_mask`, scaled
by 1 / (1 - rate)), so the kernels, the "xla" implementation and the public mask are checked
against one another.
"""

import math

from flax import linen, nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import flax_layers
import jfused
from jfused import config
from jfused.attention import args as attention_args
from jfused.attention.reference import MASK_VALUE
from jfused.attention.triton import flash_attention
from jfused.cli.bench import attention as attention_bench
from pallas_kernels.attention import common
from pallas_kernels.attention import dropout as attention_dropout
from pallas_kernels.attention.triton_bwd import BackwardBlocks
from pallas_kernels.attention.triton_fwd import ForwardBlocks
from tests.attention import cases
from tests.attention.cases import Case
from tests.cuda_lowering import count_kernel_calls, export_for_h100

HIGHEST = jax.lax.Precision.HIGHEST
RNG = jax.random.key(42)


def with_mask_applied(args: dict):
  """Attention in float32 with the public keep mask applied; returns (out, lse) like jfused.

  Rows with every key masked keep jax.nn's uniform average over all values, undropped.
  """
  args = dict(args)
  q, k, v = (args.pop(name).astype(jnp.float32) for name in ("query", "key", "value"))
  rate, rng = args.pop("dropout_rate"), args.pop("dropout_rng")
  broadcast = args.pop("broadcast_dropout", False)
  bias, mask = args.pop("bias", None), args.pop("mask", None)
  is_causal = args.pop("is_causal", False)
  window = args.pop("local_window_size", None)
  kv_lengths = args.pop("key_value_seq_lengths", None)
  assert not args, f"unhandled arguments {sorted(args)}"
  *batch, t, n, d = q.shape
  s, num_kv_heads = k.shape[-3:-1]
  k, v = (jnp.repeat(x, n // num_kv_heads, axis=-2) for x in (k, v))
  logits = jnp.einsum("...tnd,...snd->...nts", q, k, precision=HIGHEST) / math.sqrt(d)
  if bias is not None:
    logits = logits + bias.astype(jnp.float32)
  visible = jnp.ones(logits.shape, bool)

  def also(rule):  # Explicit broadcasts: the tests forbid implicit rank promotion.
    return visible & jnp.broadcast_to(rule, visible.shape)

  if mask is not None:
    visible = also(mask)
  if is_causal:
    visible = also(jnp.tril(jnp.ones((t, s), bool)))
  if window is not None:
    left, right = (window, window) if isinstance(window, int) else window
    offset = jnp.arange(s)[None, :] - jnp.arange(t)[:, None]
    visible = also((offset >= -left) & (offset <= right))
  if kv_lengths is not None:
    visible = visible & (
      jnp.broadcast_to(jnp.arange(s), visible.shape) < kv_lengths[..., None, None, None]
    )
  logits = jnp.where(visible, logits, MASK_VALUE)
  probs = jax.nn.softmax(logits, axis=-1)
  keep = jfused.attention_dropout_mask(
    rng, rate, batch_shape=tuple(batch), num_heads=n, q_length=t, kv_length=s, broadcast=broadcast
  )
  empty = ~jnp.any(visible, axis=-1, keepdims=True)
  probs = probs * jnp.where(empty, 1.0, keep / (1.0 - rate))
  out = jnp.einsum("...nts,...snd->...tnd", probs, v, precision=HIGHEST)
  lse = jnp.swapaxes(jax.nn.logsumexp(logits, axis=-1), -1, -2)
  return out, lse


def attend(implementation, **fixed):
  def run(args):
    return jfused.dot_product_attention(
      **args, **fixed, implementation=implementation, return_residual=True
    )

  return run


def check_case(
  case: Case,
  dtype,
  rate: float,
  *,
  broadcast=False,
  rng=RNG,
  implementation="pallas_triton",
  **options,
):
  """Kernel forward and gradients vs the masked reference (FlashAttention's 3-way rule);
  `options` go to the kernel's call only (e.g. deterministic_backward)."""
  args = cases.make_inputs(case, dtype)
  args.update(dropout_rate=rate, dropout_rng=rng, broadcast_dropout=broadcast)
  out, lse, grads = cases.outputs_and_grads(attend(implementation, **options), args)
  assert out.dtype == jnp.dtype(dtype)
  args32 = {
    name: (value.astype(jnp.float32) if name in cases.DIFFERENTIABLE else value)
    for name, value in args.items()
  }
  out32, lse32, grads32 = cases.outputs_and_grads(with_mask_applied, args32)
  with jax.default_matmul_precision("highest"):
    xla32 = cases.outputs_and_grads(attend("xla"), args32)
  same = xla32 if jnp.dtype(dtype) == jnp.float32 else cases.outputs_and_grads(attend("xla"), args)
  out_same, _, grads_same = same
  # The "xla" implementation in float32 is the masked reference itself, up to rounding.
  np.testing.assert_allclose(xla32[0], out32, atol=2e-5, rtol=2e-5)
  for name in grads:
    np.testing.assert_allclose(xla32[2][name], grads32[name], atol=5e-5, rtol=5e-5)
  cases.assert_close_three_way(f"{case} out", out, out_same, out32, dtype)
  for name in grads:
    assert grads[name].shape == args[name].shape
    cases.assert_close_three_way(
      f"{case} d{name}", grads[name], grads_same[name], grads32[name], dtype
    )
  # The residual is the logsumexp before dropout.
  finite = lse32 > -1e37
  np.testing.assert_allclose(
    jnp.where(finite, lse.astype(jnp.float32), 0), jnp.where(finite, lse32, 0), atol=2e-2, rtol=2e-2
  )


DROPOUT_CASES = [
  (Case("T7_S9", t=7, s=9), jnp.float32, 0.3),
  (
    Case(
      "T40_S70_causal_gqa_d40",
      t=40,
      s=70,
      heads=4,
      kv_heads=2,
      head_dim=40,
      options=(("is_causal", True),),
    ),
    jnp.float32,
    0.1,
  ),
  (
    Case(
      "T40_S70_causal_gqa_d40",
      t=40,
      s=70,
      heads=4,
      kv_heads=2,
      head_dim=40,
      options=(("is_causal", True),),
    ),
    jnp.bfloat16,
    0.1,
  ),
  (
    Case(
      "bias_mask_mqa_batch_dims",
      batch=(2, 2),
      t=20,
      s=30,
      heads=2,
      kv_heads=1,
      bias_shape="full",
      mask=True,
    ),
    jnp.float32,
    0.5,
  ),
  # Batch entry 0 has no visible key at all: its rows are jax.nn's mean of the values.
  (
    Case(
      "window_kv_lengths_empty_rows",
      t=20,
      s=24,
      kv_lengths=True,
      options=(("local_window_size", (5, 2)),),
    ),
    jnp.float32,
    0.2,
  ),
]


@pytest.mark.parametrize(
  "case,dtype,rate",
  DROPOUT_CASES,
  ids=[f"{c}-{jnp.dtype(d).name}-{r}" for c, d, r in DROPOUT_CASES],
)
def test_matches_reference_with_materialised_mask(case, dtype, rate):
  check_case(case, dtype, rate)


def test_broadcast_dropout_matches_reference():
  check_case(
    Case("broadcast_gqa_causal", t=24, s=24, heads=4, kv_heads=2, options=(("is_causal", True),)),
    jnp.float32,
    0.4,
    broadcast=True,
  )


def test_raw_uint32_key_matches_typed_key():
  typed = jfused.attention_dropout_mask(
    jax.random.key(3), 0.25, batch_shape=(2,), num_heads=2, q_length=16, kv_length=16
  )
  raw = jfused.attention_dropout_mask(
    jax.random.PRNGKey(3), 0.25, batch_shape=(2,), num_heads=2, q_length=16, kv_length=16
  )
  np.testing.assert_array_equal(typed, raw)
  args = cases.make_inputs(Case("raw_key", t=16, s=16), jnp.float32)
  outputs = [
    jfused.dot_product_attention(**args, dropout_rate=0.25, dropout_rng=rng, implementation="xla")
    for rng in (jax.random.key(3), jax.random.PRNGKey(3))
  ]
  np.testing.assert_array_equal(*outputs)


def _mask(rng=RNG, rate=0.5, batch_shape=(4,), heads=8, t=64, s=64, broadcast=False):
  return np.asarray(
    jfused.attention_dropout_mask(
      rng,
      rate,
      batch_shape=batch_shape,
      num_heads=heads,
      q_length=t,
      kv_length=s,
      broadcast=broadcast,
    )
  )


@pytest.mark.parametrize("rate", [0.05, 0.1, 0.5, 0.9])
def test_kept_fraction_within_three_sigma(rate):
  keep = _mask(rate=rate, batch_shape=(4,), heads=8, t=256, s=256)
  p = 1.0 - rate
  sigma = math.sqrt(p * (1 - p) / keep.size)
  assert abs(keep.mean() - p) <= 3 * sigma, (keep.mean(), p, sigma)
  # Every (batch, head) and every query row keeps about the same share (no stuck rows).
  per_row = keep.mean(axis=-1)
  row_sigma = math.sqrt(p * (1 - p) / keep.shape[-1])
  assert np.all(np.abs(per_row - p) <= 6 * row_sigma)


def test_neighbours_heads_and_batches_are_independent():
  """Agreement of two independent Bernoulli(p) masks is p^2 + (1-p)^2; check it between
  neighbouring keys, neighbouring queries, heads and batch entries."""
  keep = _mask(rate=0.3, batch_shape=(4,), heads=8, t=128, s=128)
  p = 0.7
  expected = p * p + (1 - p) ** 2
  pairs = {
    "next key": (keep[..., :-1], keep[..., 1:]),
    "next query": (keep[..., :-1, :], keep[..., 1:, :]),
    "next head": (keep[:, :-1], keep[:, 1:]),
    "next batch entry": (keep[:-1], keep[1:]),
    "key shifted by one row": (keep[..., :-1, :-1], keep[..., 1:, 1:]),
  }
  for name, (a, b) in pairs.items():
    agreement = float(np.mean(a == b))
    sigma = math.sqrt(expected * (1 - expected) / a.size)
    assert abs(agreement - expected) <= 5 * sigma, (name, agreement, expected)


def test_hash_states_leave_no_key_stuck_or_shared():
  # The per-element step multiplies a row state by a column state: a zero column would drop
  # a key everywhere, two equal columns would tie two keys together in every head.
  columns = np.asarray(attention_dropout.column_hashes(jnp.arange(2**20)))
  assert np.all(columns != 0) and np.unique(columns).size == columns.size
  rows = np.asarray(attention_dropout.row_hashes(jnp.uint32(12345), jnp.arange(4096)))
  assert np.all(rows % 2 == 1)
  # The first keys, over many rows and heads, keep their share like any other.
  keep = _mask(rate=0.25, batch_shape=(2,), heads=4, t=4096, s=8)
  per_key = keep.mean(axis=(0, 1, 2))
  sigma = math.sqrt(0.75 * 0.25 / (keep.size // keep.shape[-1]))
  assert np.all(np.abs(per_key - 0.75) <= 5 * sigma), per_key


def test_same_key_same_mask_different_key_different_mask():
  first, again, other = _mask(jax.random.key(1)), _mask(jax.random.key(1)), _mask(jax.random.key(2))
  np.testing.assert_array_equal(first, again)
  # Independent masks agree on p^2 + (1-p)^2 = half the elements at rate 0.5.
  assert 0.45 < float(np.mean(first == other)) < 0.55
  # The kernels too: same key, bitwise-equal output; another key, another output.
  case = Case("keys", t=16, s=16)
  args = cases.make_inputs(case, jnp.float32)
  run = lambda rng: jfused.dot_product_attention(
    **args, dropout_rate=0.5, dropout_rng=rng, implementation="pallas_triton"
  )
  out1, out1_again, out2 = run(jax.random.key(1)), run(jax.random.key(1)), run(jax.random.key(2))
  np.testing.assert_array_equal(out1, out1_again)
  assert float(jnp.max(jnp.abs(out1 - out2))) > 0.1


def test_broadcast_mask_is_shared_over_batch_and_heads():
  keep = _mask(batch_shape=(2, 3), heads=4, t=32, s=40, broadcast=True)
  assert keep.shape == (2, 3, 4, 32, 40)
  np.testing.assert_array_equal(keep, np.broadcast_to(keep[0, 0, 0], keep.shape))
  per_head = _mask(batch_shape=(2, 3), heads=4, t=32, s=40)
  np.testing.assert_array_equal(per_head[0, 0, 0], keep[0, 0, 0])  # (0, 0)'s own mask.
  assert not np.array_equal(per_head[0, 0, 1], per_head[0, 0, 0])


def test_mask_does_not_depend_on_the_batch_split():
  """The seed of (b, n) is a function of global indices: a batch slice sees its own rows."""
  whole = _mask(batch_shape=(6,), heads=2, t=16, s=16)
  assert not np.array_equal(whole[0], whole[1])
  # Flattened leading dims are numbered row-major, like the batch they come from.
  np.testing.assert_array_equal(
    _mask(batch_shape=(2, 3), heads=2, t=16, s=16).reshape(whole.shape), whole
  )


@pytest.mark.parametrize("implementation", ["pallas_triton", "xla"])
def test_rate_zero_is_exactly_the_path_without_dropout(implementation):
  case = Case("rate0", t=30, s=30, heads=4, kv_heads=2, options=(("is_causal", True),))
  args = cases.make_inputs(case, jnp.bfloat16)
  plain = cases.outputs_and_grads(attend(implementation), args)
  zero = cases.outputs_and_grads(
    attend(implementation, dropout_rate=0, dropout_rng=RNG, broadcast_dropout=True), args
  )
  for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(zero)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _one_hot_call(rate, heads, kv_heads, t):
  """A validated call whose values are one-hot over keys: out[t, n, s] = P * Z."""
  case = Case("one_hot", t=t, s=t, heads=heads, kv_heads=kv_heads, head_dim=32)
  args = cases.make_inputs(case, jnp.float32)
  value = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32)[:, None, :], (2, t, kv_heads, t))
  return attention_args.normalize(
    args["query"],
    args["key"],
    value,
    None,
    None,
    scale=None,
    is_causal=False,
    query_seq_lengths=None,
    key_value_seq_lengths=None,
    local_window_size=None,
    logits_soft_cap=None,
    q_segment_ids=None,
    kv_segment_ids=None,
    dropout_rate=rate,
    dropout_rng=RNG,
  )


def check_kernel_masks(rate, t, forward_blocks=None, backward_blocks=None):
  """Reads the mask each kernel applied: one-hot values make out = P * Z (forward), and a
  one-hot cotangent makes dV = (P * Z)^T (dK/dV kernel). Both must be the public mask; the
  dQ kernel's gradient must be the masked reference's. Returns the mask."""
  call = _one_hot_call(rate, heads=2, kv_heads=2, t=t)
  ops = call.ops
  kernel_config = common.AttentionConfig(
    scale=call.scale,
    rules=call.rules,
    interpret=config.use_interpret(),
    dropout_rate=rate,
    forward_blocks=forward_blocks,
    backward_blocks=backward_blocks,
  )
  extras = (None,) * 6 + (ops.dropout_seeds,)
  (out, _), vjp = jax.vjp(
    lambda q, k, v: flash_attention(kernel_config, q, k, v, *extras), ops.q, ops.k, ops.v
  )
  cotangent = jnp.broadcast_to(jnp.eye(t, dtype=jnp.float32)[None, :, None, :], out.shape)
  dq, _, dv = vjp((cotangent, jnp.zeros((2, 2, t), jnp.float32)))
  expected = _mask(rate=rate, batch_shape=(2,), heads=2, t=t, s=t)  # [B, N, T, S]
  np.testing.assert_array_equal(np.asarray(out != 0).transpose(0, 2, 1, 3), expected)
  np.testing.assert_array_equal(np.asarray(dv != 0).transpose(0, 2, 3, 1), expected)
  args = {"query": ops.q, "key": ops.k, "value": ops.v, "dropout_rate": rate, "dropout_rng": RNG}
  (_, _), ref_vjp = jax.vjp(lambda q: with_mask_applied({**args, "query": q}), ops.q)
  (dq_ref,) = ref_vjp((cotangent, jnp.zeros((2, t, 2))))
  np.testing.assert_allclose(dq, dq_ref, atol=2e-5, rtol=2e-5)
  return expected


@pytest.mark.parametrize(
  "forward_blocks,backward_blocks",
  [
    (None, None),
    (ForwardBlocks(block_q=16, block_kv=16), BackwardBlocks(16, 32, 32, 16)),
    (ForwardBlocks(block_q=64, block_kv=32), BackwardBlocks(32, 16, 16, 64)),
  ],
  ids=["default", "small", "mixed"],
)
def test_block_sizes_do_not_change_the_mask(forward_blocks, backward_blocks):
  check_kernel_masks(0.4, 40, forward_blocks, backward_blocks)


def test_sharded_batch_and_heads_give_the_one_device_result():
  """The seeds follow global (batch, head) indices, so each shard regenerates its own part of
  the one-device mask (tests/conftest.py simulates 8 CPU devices)."""
  from jax.sharding import NamedSharding, PartitionSpec

  devices = jax.devices("cpu")[:8]
  mesh = jax.make_mesh(
    (4, 2), ("data", "model"), devices=devices, axis_types=(jax.sharding.AxisType.Auto,) * 2
  )
  args = cases.make_inputs(
    Case("sharded", batch=(4,), t=16, s=16, heads=4, kv_heads=2), jnp.float32
  )
  q, k, v = args["query"], args["key"], args["value"]

  @jax.jit
  def outputs(q, k, v):
    def loss(q, k, v):
      out = jfused.dot_product_attention(
        q, k, v, is_causal=True, dropout_rate=0.3, dropout_rng=RNG, implementation="pallas_triton"
      )
      return jnp.sum(jnp.sin(out)), out

    return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)

  with config.interpret_mode(True):  # CPU devices, also on a machine with a GPU.
    one_device = outputs(*(jax.device_put(x, devices[0]) for x in (q, k, v)))
    spec = NamedSharding(mesh, PartitionSpec("data", None, "model", None))
    sharded = outputs(*(jax.device_put(x, spec) for x in (q, k, v)))
  for a, b in zip(jax.tree.leaves(one_device), jax.tree.leaves(sharded)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_jit_traced_key_grad_and_remat():
  case = Case("jit", t=24, s=24, heads=2, options=(("is_causal", True),))
  args = cases.make_inputs(case, jnp.float32)
  q, k, v = args["query"], args["key"], args["value"]

  def loss(q, k, v, rng):
    out = jfused.dot_product_attention(
      q, k, v, is_causal=True, dropout_rate=0.2, dropout_rng=rng, implementation="pallas_triton"
    )
    return jnp.sum(jnp.sin(out))

  grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  first = grad(q, k, v, jax.random.key(1))
  other = grad(q, k, v, jax.random.key(2))  # A traced key: no retrace, another mask.
  assert grad._cache_size() == 1
  assert float(jnp.max(jnp.abs(first[0] - other[0]))) > 1e-3
  remat = jax.jit(jax.grad(jax.checkpoint(loss), argnums=(0, 1, 2)))(q, k, v, jax.random.key(1))
  for a, b in zip(first, remat):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize(
  "overrides, error, words",
  [
    ({"dropout_rate": -0.1}, ValueError, "dropout_rate"),
    ({"dropout_rate": 1.0}, ValueError, "dropout_rate"),
    ({"dropout_rate": 1.5}, ValueError, "dropout_rate"),
    ({"dropout_rate": float("nan")}, ValueError, "dropout_rate"),
    ({"dropout_rate": "0.1"}, TypeError, "dropout_rate"),
    ({"dropout_rate": True}, TypeError, "dropout_rate"),
    ({"dropout_rate": 0.1}, ValueError, "dropout_rng is required"),
    ({"dropout_rate": 0.1, "dropout_rng": 3}, TypeError, "dropout_rng"),
    ({"dropout_rate": 0.1, "dropout_rng": jnp.zeros((2,), jnp.float32)}, TypeError, "dropout_rng"),
    ({"dropout_rate": 0.1, "dropout_rng": jax.random.split(RNG, 2)}, ValueError, "dropout_rng"),
    ({"dropout_rate": 0.1, "dropout_rng": jnp.zeros((3,), jnp.uint32)}, ValueError, "dropout_rng"),
    (
      {"dropout_rate": 0.1, "dropout_rng": RNG, "broadcast_dropout": 1},
      TypeError,
      "broadcast_dropout",
    ),
  ],
)
def test_bad_dropout_arguments_raise_before_any_kernel(overrides, error, words):
  q, kv = jnp.ones((2, 8, 4, 32)), jnp.ones((2, 8, 2, 32))
  for implementation in ("pallas_triton", "xla"):
    with pytest.raises(error, match=words):
      jfused.dot_product_attention(q, kv, kv, implementation=implementation, **overrides)


def test_traced_rate_and_bad_mask_arguments_raise():
  q = jnp.ones((1, 8, 2, 32))
  with pytest.raises(TypeError, match="dropout_rate"):
    jax.jit(lambda r: jfused.dot_product_attention(q, q, q, dropout_rate=r, dropout_rng=RNG))(0.1)
  mask_args = dict(batch_shape=(2,), num_heads=2, q_length=8, kv_length=8)
  with pytest.raises(ValueError, match="dropout_rate"):
    jfused.attention_dropout_mask(RNG, 1.0, **mask_args)
  with pytest.raises(ValueError, match="dropout_rng is required"):
    jfused.attention_dropout_mask(None, 0.1, **mask_args)
  with pytest.raises(ValueError, match="q_length"):
    jfused.attention_dropout_mask(RNG, 0.1, **{**mask_args, "q_length": -1})
  with pytest.raises(TypeError, match="batch_shape"):
    jfused.attention_dropout_mask(RNG, 0.1, **{**mask_args, "batch_shape": 2})
  assert bool(jfused.attention_dropout_mask(None, 0.0, **mask_args).all())


def test_implementations_without_dropout_decline_it():
  q = jax.random.normal(jax.random.key(0), (1, 8, 2, 32))
  with pytest.raises(NotImplementedError, match="dropout"):
    jfused.dot_product_attention(q, q, q, dropout_rate=0.1, dropout_rng=RNG, implementation="cudnn")
  # Dispatch falls back to an implementation that has it.
  out = jfused.dot_product_attention(
    q, q, q, dropout_rate=0.1, dropout_rng=RNG, implementation=("cudnn", "xla")
  )
  expected = jfused.dot_product_attention(
    q, q, q, dropout_rate=0.1, dropout_rng=RNG, implementation="xla"
  )
  np.testing.assert_array_equal(out, expected)


# --- Flax -------------------------------------------------------------------------------------


def _attention_with_public_mask(
  query,
  key,
  value,
  bias=None,
  mask=None,
  broadcast_dropout=True,
  dropout_rng=None,
  dropout_rate=0.0,
  deterministic=False,
  dtype=None,
  precision=None,
  module=None,
  **unused,
):
  """An attention_fn that applies jfused's public mask with plain jnp (the Flax reference)."""
  assert not deterministic and bias is None and mask is None
  return with_mask_applied(
    {
      "query": query,
      "key": key,
      "value": value,
      "dropout_rate": dropout_rate,
      "dropout_rng": dropout_rng,
      "broadcast_dropout": broadcast_dropout,
    }
  )[0]


@pytest.mark.parametrize("broadcast", [True, False])
def test_nnx_multi_head_attention_dropout_is_fused(broadcast, monkeypatch):
  calls = []
  original = jfused.dot_product_attention
  monkeypatch.setattr(
    jfused, "dot_product_attention", lambda *a, **kw: calls.append(kw) or original(*a, **kw)
  )
  kwargs = dict(num_kv_heads=2, decode=False, dropout_rate=0.3, broadcast_dropout=broadcast)
  ours = flax_layers.MultiHeadAttention(4, 32, rngs=nnx.Rngs(0), **kwargs)
  theirs = nnx.MultiHeadAttention(
    4, 32, attention_fn=_attention_with_public_mask, rngs=nnx.Rngs(0), **kwargs
  )
  nnx.update(theirs, nnx.state(ours, nnx.Param))
  x = jax.random.normal(jax.random.key(0), (2, 12, 32))

  def loss_and_grads(module):
    def loss(m):
      y = m(x, deterministic=False, rngs=nnx.Rngs(dropout=5))
      return jnp.sum(y * jnp.cos(jnp.arange(32.0))[None, None]), y

    (_, y), grads = nnx.value_and_grad(loss, has_aux=True)(module)
    return y, grads

  y_ours, g_ours = loss_and_grads(ours)
  y_theirs, g_theirs = loss_and_grads(theirs)
  assert calls and calls[0]["dropout_rate"] == 0.3
  assert calls[0]["broadcast_dropout"] is broadcast
  np.testing.assert_allclose(y_ours, y_theirs, atol=1e-5, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_theirs)):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
  # Dropout is on: the training output differs from the deterministic one.
  assert float(jnp.max(jnp.abs(y_ours - ours(x, deterministic=True)))) > 1e-2


def test_linen_attention_fn_dropout_in_kernels():
  kwargs = dict(num_heads=2, dropout_rate=0.5, deterministic=False)
  ours = linen.MultiHeadDotProductAttention(
    attention_fn=flax_layers.JfusedAttention("pallas_triton"), **kwargs
  )
  theirs = linen.MultiHeadDotProductAttention(attention_fn=_attention_with_public_mask, **kwargs)
  x = jax.random.normal(jax.random.key(0), (2, 10, 16))
  params = theirs.init(jax.random.key(1), x)
  rngs = {"dropout": jax.random.key(9)}
  np.testing.assert_allclose(
    ours.apply(params, x, rngs=rngs), theirs.apply(params, x, rngs=rngs), atol=1e-5, rtol=1e-5
  )


# --- Lowering and benchmark ------------------------------------------------------------------


@pytest.mark.parametrize(
  "dtype,broadcast", [(jnp.bfloat16, False), (jnp.float32, True)], ids=["bf16", "f32-broadcast"]
)
def test_dropout_lowers_for_cuda(dtype, broadcast):
  """uint32 multiply, logical shift, xor and unsigned compare lower in Pallas-Triton."""

  def grads(q, k, v, rng_data):
    def loss(q, k, v):
      out = jfused.dot_product_attention(
        q,
        k,
        v,
        is_causal=True,
        dropout_rate=0.1,
        broadcast_dropout=broadcast,
        dropout_rng=jax.random.wrap_key_data(rng_data),
        implementation="pallas_triton",
      )
      return out.astype(jnp.float32).sum()

    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  shape = jax.ShapeDtypeStruct
  with config.interpret_mode(False):
    text = export_for_h100(
      grads,
      shape((2, 256, 8, 128), dtype),
      shape((2, 256, 2, 128), dtype),
      shape((2, 256, 2, 128), dtype),
      shape((2,), jnp.uint32),
    )
  names = ("jfused_attention_fwd", "jfused_attention_bwd_dkv", "jfused_attention_bwd_dq")
  assert [count_kernel_calls(text, n) for n in names] == [1, 1, 1]


def test_benchmark_measures_dropout():
  shape = attention_bench.AttentionShape("tiny", 1, 32, 2, 2, 32, True)
  rows = attention_bench.run(
    [shape],
    ["pallas_triton", "cudnn"],
    ["fwd+bwd"],
    jnp.bfloat16,
    quick=True,
    progress=lambda _: None,
    dropout_rates=(0.1,),
  )
  by_implementation = {r["implementation"]: r for r in rows}
  kernel, cudnn = by_implementation["pallas_triton"], by_implementation["cudnn"]
  assert kernel["shape"] == cudnn["shape"] == "tiny_dropout0.1"
  assert kernel["dropout_rate"] == 0.1 and kernel["ms"] > 0
  assert 0 < kernel["max_error"] < 0.05  # bf16 against the float32 reference, same mask.
  assert "dropout" in cudnn["skipped"]


def test_cli_dropout_rate_flag():
  from jfused.cli import commands as cli

  args = cli.build_parser().parse_args(["bench", "attention", "--dropout-rate", "0,0.1"])
  assert args.dropout_rate == [0.0, 0.1]
  assert cli.build_parser().parse_args(["bench", "attention"]).dropout_rate == [0.0]
  for bad in ("1.0", "-0.1", "x", ","):
    with pytest.raises(SystemExit):
      cli.build_parser().parse_args(["bench", "attention", "--dropout-rate", bad])
