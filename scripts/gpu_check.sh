#!/usr/bin/env bash
# One call on a CUDA machine: the test suite natively (GPU-marked tests included), the
# benchmarks and the training run behind the README's tables and charts. Logs, JSON and PNG
# files land in $OUT (default ./bench_out); with PACK=1 they are packed into one
# $OUT/results.tar.gz instead.
#   bash scripts/gpu_check.sh [all|tests|bench|train|sweep|sweep_mosaic|sweep_mosaic_bwd|
#                              ptxas_mosaic|profile|fused_bwd_*|cross_entropy|cross_entropy_bench|
#                              cross_entropy_mosaic|cross_entropy_mosaic_tiles|
#                              cross_entropy_mosaic_tied|cross_entropy_chunks|
#                              cross_entropy_mosaic_cluster|mosaic_tests|train_vocab|
#                              compile_scan|compile_recompute|block_memory|block_recompute|
#                              attention_window|registers_bwd]
#                             [pytest arguments...]
#     tests  pytest, natively        bench  jfused bench all + jfused train
#     train  jfused train only       sweep  the Triton attention tile sweep
#     train_vocab       jfused train with a 131072-wide vocabulary, fused and cuDNN
#     sweep_mosaic      the Mosaic forward's tile candidates, persistent or not
#     sweep_mosaic_bwd  the Mosaic backward at d=64/128/256, with and without the
#                       overlapped dQ kernel
#     ptxas_mosaic      the Mosaic forward's tiles at T=4096 d=128, causal and not, with
#                       ptxas's register and spill report of every kernel compiled
#     profile           a GPT and a LLaMA-style block's training step kernel by kernel,
#                       jfused beside Flax norms + cuDNN attention
#     mosaic_tests bfloat16|float16|rest
#                       the Mosaic attention's 91 GPU tests in three parts that each fit a
#                       10-minute device call: the reference cases in one dtype, or the rest
#     cross_entropy     linear_cross_entropy's GPU tests (token chunks and the vocabulary
#                       walk); cross_entropy_bench: `jfused bench cross_entropy` on the
#                       issue's four heads; cross_entropy_mosaic: the Mosaic kernels' GPU
#                       tests and bench beside pallas_triton; cross_entropy_mosaic_tiles:
#                       each kernel alone per tile choice (benchmarks/time_cross_entropy_mosaic);
#                       cross_entropy_mosaic_tied: the bench's tied [V, D] tables beside
#                       pallas_triton (measured 6 % ahead on 2026-12-07: now the default);
#                       cross_entropy_chunks: the loss per chunk size, both walks
#                       (benchmarks/time_cross_entropy_chunks, with a kernel profile);
#                       cross_entropy_mosaic_cluster: the Mosaic kernels with weight tiles
#                       multicast to clusters of two CTAs (c2) and the statistics kernel's
#                       vocabulary in four splits (s4): GPU tests, each kernel's time
#                       beside the default tiles, the loss with each
#     block_memory      the GPT and LLaMA-style blocks' step: XLA's memory report per
#                       implementation (jfused, activation recomputed, cuDNN), largest first
#     block_recompute   block_memory, then the block steps of jfused, the ordered
#                       recomputing MLP backward and cuDNN twice over (GPT and LLaMA-style)
#     compile_scan      the 8-block GPT unrolled, scanned, and scanned without XLA's dynamic
#                       slice fusion or with while-loop double buffering: first step, step time
#     compile_recompute the 8-block GPT unrolled and scanned, each with and without the MLP's
#                       recomputing backward (scanned also without XLA's dynamic slice
#                       fusion), and Flax + cuDNN: first step, step time, the step's
#                       temporary memory and its kernels by kind
#     positions_ab      the Mosaic attention's mask positions from vectors (fewer spills; an
#                       option since 2026-12-08) against whole tiles (the default): the same
#                       gradients bit for bit, then the guide, window and d=64 rows timed
#                       both ways, ptxas's spill report beside
#     attention_window  the attention bench's sliding-window row (B2 T8192 16x128, 1023 keys
#                       back) beside cuDNN, tokamax and FA3
#     registers_bwd     the backward kernels' time and spills at 240 registers a consumer
#                       thread (FlashAttention-3's split) against the default 232
#     fused_bwd_tests, fused_bwd_kernels, fused_bwd_bench
#                       the fused Mosaic backward: its GPU tests; its time beside the two
#                       deterministic kernels (ptxas's spill report) and its compile time;
#                       the attention bench's guide shapes, both backward modes beside cuDNN
#                       and FA3
# Wheels placed in .whl/ (pytest-xdist, say) are installed first: the GPU machine is offline.
# Wheels in .whl/tokamax/ (tokamax and the dependencies it imports:
# scripts/fetch_tokamax_wheels.sh, run where pip reaches PyPI) add tokamax to the attention
# benchmark; scripts/fetch_fa3_wheel.sh puts flash-attn3-jax in .whl/, which adds FA3.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-bench_out}
mkdir -p "$OUT"
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
what=${1:-all}
shift || true
status=0
pytest_args=()
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
if compgen -G ".whl/tokamax/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/tokamax_site .whl/tokamax/*.whl \
    && export PYTHONPATH=$PYTHONPATH:/tmp/tokamax_site
fi
if python3 -c "import xdist" 2>/dev/null; then
  # Tests are compile-bound: spread them over CPU cores, sharing the GPU's memory.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
  # WORKERS=16 uses every core of the H200 machine. The fused backward's GPU tests all ran
  # past 100 s with 16 workers on one GPU while XLA autotuned (2026-12-03); four take turns
  # there (18 tests in 54 s without autotuning).
  workers=8
  [[ $what == fused_bwd_tests ]] && workers=4
  pytest_args=(-n "${WORKERS:-$workers}")
fi
if [[ $what =~ ^(all|tests|mosaic_tests|fused_bwd_tests|cross_entropy)$ ]]; then
  # Tests check numbers, not speed: without XLA's autotuning no worker compiles and times
  # candidate kernels for every matmul of the references. With 16 workers the Mosaic
  # reference cases took ~3 min each with it (31 in 389 s); without it all 211 GPU-marked
  # tests ran in 182 s (H200, 2026-12-03, gpu_tests_gpu_marked_h200_2026-12-03e.log).
  export XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0"
fi
if python3 -c "import pytest_timeout" 2>/dev/null; then
  # A kernel that deadlocks hangs its process: end it (the worker is replaced, the test
  # fails) rather than the whole call.
  pytest_args+=(--timeout=300 --timeout-method=thread)
fi
if [[ $what == all || $what == tests ]]; then
  python3 -m pytest "${pytest_args[@]}" -q -rfEs -p no:cacheprovider "${@:-tests}" \
    >"$OUT/gpu_tests.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests.log" | tail -40
fi
if [[ $what == all || $what == bench ]]; then
  python3 -m jfused.cli bench all --out-dir "$OUT" 2>"$OUT/bench_progress.log" \
    | tee "$OUT/bench.log" || status=1
fi
if [[ $what == train_vocab ]]; then
  # The GPT with a tokenizer-sized vocabulary: the step's memory with and without the fused
  # loss, at the same loss curve.
  python3 -m jfused.cli train --vocab-size 131072 --steps 60 --variants fused,cudnn \
    --out-dir "$OUT/train_vocab" 2>"$OUT/train_vocab_progress.log" | tee "$OUT/train_vocab.log" \
    || status=1
fi
if [[ $what == all || $what == bench || $what == train ]]; then
  python3 -m jfused.cli train --out-dir "$OUT" 2>"$OUT/train_progress.log" \
    | tee "$OUT/train.log" || status=1
fi
if [[ $what == sweep ]]; then
  python3 -m benchmarks.sweep_attention --out "$OUT/sweep.json" 2>&1 \
    | grep -v Warning | tee "$OUT/sweep.log" || status=1
fi
if [[ $what == sweep_mosaic ]]; then
  python3 -m benchmarks.sweep_attention_mosaic --out "$OUT/sweep_mosaic.json" 2>&1 \
    | grep -v Warning | tee "$OUT/sweep_mosaic.log" || status=1
fi
if [[ $what == sweep_mosaic_bwd ]]; then
  for d in 64 128 256; do
    python3 -m benchmarks.sweep_attention_mosaic_bwd --head-dim $d --settings overlap 2>&1 \
      | grep -v Warning | tee -a "$OUT/sweep_mosaic_bwd.log" || status=1
  done
fi
# The fused backward in three parts, each within one 10-minute device call.
if [[ $what == fused_bwd_tests ]]; then
  # GPU-marked only (CI lowers the rest), each test named as it ends.
  python3 -m pytest "${pytest_args[@]}" -v -rfEs -p no:cacheprovider -m gpu \
    tests/attention/test_mosaic.py -k "fused or deterministic" \
    >"$OUT/gpu_tests_fused_bwd.log" 2>&1 || status=1
  grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests_fused_bwd.log" | tail -30
fi
if [[ $what == fused_bwd_kernels ]]; then
  MOSAIC_GPU_DUMP_PTXAS=1 python3 -m benchmarks.time_attention_mosaic_bwd_kernels \
    --shapes d128,d128_causal,d128_gqa_causal,d64,d64_causal \
    --variants default,fused,fused_no_overlap,fused_split_dq,fused_split_dq_no_overlap \
    >"$OUT/fused_bwd_kernels.log" 2>&1 \
    || status=1
  grep -E "^  |ms|[Ss]pill" "$OUT/fused_bwd_kernels.log" | grep -v "^ptxas info" | head -80
  python3 -m benchmarks.compile_time --blocks 1,8 --variants jfused,jfused_fused_bwd \
    --attention pallas_mosaic,pallas_mosaic_fused,cudnn | tee "$OUT/fused_bwd_compile.log" \
    || status=1
fi
if [[ $what == registers_bwd ]]; then
  # The backward kernels with FlashAttention-3's register split (240 / 24) beside 232 / 40.
  MOSAIC_GPU_DUMP_PTXAS=1 python3 -m benchmarks.time_attention_mosaic_bwd_kernels \
    --shapes d128,d128_causal,d128_gqa_causal \
    --variants default,default_240,fused_split_dq,fused_split_dq_240 \
    >"$OUT/registers_bwd.log" 2>&1 || status=1
  grep -E "^  |ms|[Ss]pill|C7512" "$OUT/registers_bwd.log" | grep -v "^ptxas info" | head -80
fi
if [[ $what == fused_bwd_bench ]]; then
  python3 -m jfused.cli bench attention --attention-shapes guide \
    --implementations pallas_mosaic,pallas_mosaic_fused,cudnn,fa3 \
    --out-dir "$OUT" 2>"$OUT/bench_progress.log" | tee "$OUT/bench_fused_bwd.log" || status=1
fi
if [[ $what == positions_ab ]]; then
  # Mask positions broadcast from vectors (True) or made as whole tiles of indices (False,
  # the default): a deviceless compile showed the dK/dV kernel's spills falling from 152 to
  # 8 bytes causal at d=128 and from 332 to 180 under the window. First the check: both
  # settings must give the same outputs and gradients, bit for bit (the arithmetic is the
  # same; only where the positions live differs), on the masked shapes.
  python3 -c "
import jax, jax.numpy as jnp, jfused
from benchmarks.kernel_setting import kernel_setting
from pallas_kernels.attention.mosaic import common
for t, d, window in ((1024, 128, None), (1024, 64, None), (2048, 128, (1023, 0))):
  q, k, v = (jax.random.normal(key, (2, t, 8, d), jnp.bfloat16) for key in jax.random.split(jax.random.key(t + d), 3))
  def grads(q, k, v):
    f = lambda q, k, v: jfused.dot_product_attention(q, k, v, is_causal=True, local_window_size=window, implementation='pallas_mosaic', deterministic_backward=True).astype(jnp.float32).sum()
    return jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
  results = []
  for vectors in (False, True):
    with kernel_setting(common, 'POSITIONS_FROM_VECTORS', vectors):
      results.append(jax.jit(grads)(q, k, v))
  same = all(bool((a == b).all()) for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])))
  print(f'T{t} d{d} window={window}: vectors and tiles give the same loss and gradients: {same}')
  assert same
" 2>&1 | grep -v Warning | tee "$OUT/positions_check.log" || status=1
  for vectors in True False; do
    for shapes in guide window d64; do
      MOSAIC_GPU_DUMP_PTXAS=1 python3 -c "
from benchmarks.kernel_setting import kernel_setting
from jfused.cli.commands import main
from pallas_kernels.attention.mosaic import common
with kernel_setting(common, 'POSITIONS_FROM_VECTORS', $vectors):
  main(['bench', 'attention', '--attention-shapes', '$shapes', '--no-plot',
        '--implementations', 'pallas_mosaic', '--out-dir', '$OUT/positions_${vectors}_$shapes'])
" >"$OUT/positions_${vectors}_$shapes.log" 2>&1 || status=1
      grep -E "[Ss]pill stores|TFLOP|pallas_mosaic" "$OUT/positions_${vectors}_$shapes.log" \
        | grep -v "0 bytes spill stores" | head -30
    done
  done
fi
if [[ $what == attention_window ]]; then
  # The 1023-token sliding window row, every implementation that serves it.
  python3 -m jfused.cli bench attention --attention-shapes window \
    --implementations pallas_mosaic,pallas_triton,cudnn,tokamax,fa3 \
    --out-dir "$OUT" 2>"$OUT/bench_progress.log" | tee "$OUT/bench_window.log" || status=1
fi
if [[ $what == ptxas_mosaic ]]; then
  # Mosaic GPU prints ptxas's report (registers, spill stores and loads) while compiling.
  MOSAIC_GPU_DUMP_PTXAS=1 python3 -m benchmarks.sweep_attention_mosaic \
    --shapes B4_T4096_h16_d128,B4_T4096_h16_d128_causal >"$OUT/ptxas_mosaic.log" 2>&1 || status=1
  grep -E "mosaic fwd|registers|[Ss]pill" "$OUT/ptxas_mosaic.log"
fi
if [[ $what == mosaic_tests ]]; then
  part=${1:-bfloat16}
  case $part in
    bfloat16) selection="gpu_matches_reference and bfloat16" ;;
    # -k matches substrings: "float16" alone would take the bfloat16 cases too.
    float16) selection="gpu_matches_reference and float16 and not bfloat16" ;;
    rest) selection="not gpu_matches_reference" ;;
    *) echo "mosaic_tests takes bfloat16, float16 or rest, got $part" >&2 && exit 2 ;;
  esac
  python3 -m pytest "${pytest_args[@]}" -q -rfEs -p no:cacheprovider -m gpu \
    tests/attention/test_mosaic.py -k "$selection" >"$OUT/gpu_tests_mosaic_$part.log" 2>&1 \
    || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests_mosaic_$part.log" | tail -20
fi
# Tests (2.5 min) and bench (about 6 min) apart: together they outlast a device call.
if [[ $what == cross_entropy ]]; then
  python3 -m pytest "${pytest_args[@]}" -q -rfEs -p no:cacheprovider tests/cross_entropy -m gpu \
    >"$OUT/gpu_tests_cross_entropy.log" 2>&1 || status=1
  grep -E "^(FAILED|ERROR)|passed|failed" "$OUT/gpu_tests_cross_entropy.log" | tail -20
fi
if [[ $what == cross_entropy_bench ]]; then
  python3 -m jfused.cli bench cross_entropy --out-dir "$OUT" 2>"$OUT/bench_progress.log" \
    | tee "$OUT/bench_cross_entropy.log" || status=1
fi
if [[ $what == cross_entropy_mosaic ]]; then
  # The Mosaic statistics kernel (implementation="pallas_mosaic"): its GPU tests (without
  # XLA's autotuning, as the other test targets), then the bench's four heads beside
  # pallas_triton and the matmul ceiling (with it: the matmul is a baseline).
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0" python3 -m pytest \
    "${pytest_args[@]}" -v -rfEs -p no:cacheprovider -m gpu tests/cross_entropy -k mosaic \
    >"$OUT/gpu_tests_cross_entropy_mosaic.log" 2>&1 || status=1
  grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests_cross_entropy_mosaic.log" | tail -12
  python3 -m jfused.cli bench cross_entropy --implementations pallas_mosaic,pallas_triton,matmul \
    --out-dir "$OUT" 2>"$OUT/bench_progress.log" | tee "$OUT/bench_cross_entropy_mosaic.log" \
    || status=1
fi
if [[ $what == cross_entropy_mosaic_tiles ]]; then
  # The two Mosaic cross-entropy kernels alone per tile choice: error and time beside XLA's
  # logits with the Triton row kernel and the bare matmul.
  python3 -m benchmarks.time_cross_entropy_mosaic --heads D2048_V131072,D4096_V131072 2>&1 \
    | grep -v Warning | tee "$OUT/cross_entropy_mosaic_tiles.log" || status=1
fi
if [[ $what == cross_entropy_mosaic_tied ]]; then
  python3 -m jfused.cli bench cross_entropy --cross-entropy-shapes tied \
    --implementations pallas_mosaic,pallas_triton,matmul --out-dir "$OUT" \
    2>"$OUT/bench_progress.log" | tee "$OUT/bench_cross_entropy_mosaic_tied.log" || status=1
fi
if [[ $what == cross_entropy_chunks ]]; then
  # The vocabulary walks' forward+backward at 128, 256 and 512 MiB chunks: time and scratch.
  python3 -m benchmarks.time_cross_entropy_chunks --heads D2048_V131072,D4096_V131072 --profile \
    2>&1 | grep -v Warning | tee "$OUT/cross_entropy_chunks.log" || status=1
fi
if [[ $what == cross_entropy_mosaic_cluster ]]; then
  XLA_FLAGS="${XLA_FLAGS:+$XLA_FLAGS }--xla_gpu_autotune_level=0" python3 -m pytest \
    "${pytest_args[@]}" -v -rfEs -p no:cacheprovider -m gpu tests/cross_entropy -k clustered \
    >"$OUT/gpu_tests_cross_entropy_mosaic_cluster.log" 2>&1 || status=1
  grep -E "PASSED|FAILED|ERROR|passed|failed" "$OUT/gpu_tests_cross_entropy_mosaic_cluster.log" \
    | tail -12
  python3 -m benchmarks.time_cross_entropy_mosaic --heads D2048_V131072,D4096_V131072 \
    --statistics-blocks 256x64x3,256x64x3c2,256x64x3s4,256x64x3c2s4,256x64x4c2 \
    --gradient-blocks 256x64x3,256x64x3c2 \
    2>&1 | grep -v Warning | tee "$OUT/cross_entropy_mosaic_cluster_tiles.log" || status=1
  for blocks in 256x64x3 256x64x3c2 256x64x3c2s4; do
    python3 -m benchmarks.time_cross_entropy_chunks --heads D2048_V32768,D2048_V131072 \
      --chunk-mib 256,512 --implementations pallas_mosaic --mosaic-blocks $blocks 2>&1 \
      | grep -v Warning | tee -a "$OUT/cross_entropy_mosaic_cluster_chunks.log" || status=1
  done
fi
if [[ $what == compile_scan ]]; then
  # The 8-block GPT's first step and step time unrolled, scanned, and scanned under the XLA
  # flags that may give back the scan's step time (benchmarks/compile_time.SCAN_XLA_FLAGS).
  python3 -m benchmarks.compile_time --blocks 8 --attention "" \
    --variants jfused,jfused_scan,jfused_scan_no_slice_fusion,jfused_scan_double_buffering,cudnn \
    2>&1 | tee "$OUT/compile_scan.log" || status=1
  # The scanned program's first step should not grow with depth.
  python3 -m benchmarks.compile_time --blocks 2 --attention "" --variants jfused_scan \
    2>&1 | tee -a "$OUT/compile_scan.log" || status=1
fi
if [[ $what == compile_recompute ]]; then
  # Under scan each array the backward keeps is a zero-filled stack written a block at a
  # time; the recomputing MLP keeps one [tokens, hidden] array where Flax's keeps five (a
  # deviceless compile: 8138 -> 4073 MiB of temporaries, 2026-12-08), and XLA's dynamic slice
  # fusion ran the attention forward and the query projection twice a block. Their step
  # times decide whether scan_blocks=True comes close to the unrolled loop.
  python3 -m benchmarks.compile_time --blocks 8 --attention "" --profile --variants \
    jfused,jfused_recompute,jfused_scan,jfused_scan_recompute,jfused_scan_recompute_no_slice_fusion,cudnn \
    2>&1 | tee "$OUT/compile_recompute.log" || status=1
fi
if [[ $what == block_memory || $what == block_recompute ]]; then
  # XLA's buffer assignment of the block's step: where jfused's temporary memory goes beside
  # Flax + cuDNN's (issue 25's 0.8x target), the optimized programs kept beside the reports.
  python3 -m benchmarks.block_memory --out-dir "$OUT/block_memory" 2>&1 | grep -v Warning \
    | tee "$OUT/block_memory.log" || status=1
  # One archive: the device tool returns only a few files a call, and there are two per row.
  tar czf "$OUT/block_memory.tar.gz" -C "$OUT" block_memory && rm -rf "$OUT/block_memory"
fi
if [[ $what == block_recompute ]]; then
  # After block_memory's report (above): the ordered recomputing MLP backward's step beside
  # the default and Flax + cuDNN, twice over (run-to-run spread on one machine is about 2 %).
  for repeat in 1 2; do
    for shapes in gpt llama; do
      python3 -m jfused.cli bench block --block-shapes $shapes --passes fwd+bwd --no-plot \
        --implementations pallas_mosaic,pallas_mosaic_recompute,cudnn \
        --out-dir "$OUT/block_${shapes}_$repeat" 2>&1 | grep -v "Warning\|━" \
        | tee -a "$OUT/block_recompute.log" || status=1
    done
  done
fi
if [[ $what == profile ]]; then
  python3 -m benchmarks.profile_step --out "$OUT/profile.json" 2>&1 | grep -v Warning \
    | tee "$OUT/profile.log" || status=1
fi
if [[ ${PACK:-0} == 1 ]]; then
  (cd "$OUT" && tar czf /tmp/results.tar.gz --exclude=results.tar.gz . \
    && find . -mindepth 1 -delete && mv /tmp/results.tar.gz .)
fi
exit $status
