#!/usr/bin/env bash
# GPU readiness check for avt_jax, in one command on a machine with an NVIDIA GPU:
#
#   pip install -e '.[test,bench]' 'jax[cuda12]==0.10.2'   # once
#   bash scripts/gpu_check.sh [OUTPUT_DIR]                  # default: gpu_check_results
#
# 1. checks that JAX sees a GPU and that cuDNN fused attention runs;
# 2. runs the base benchmark (ViT-B per modality, 32 x 224^2 video, 800 x 128 audio) in bfloat16 with
#    cuDNN attention, at batch 1 (the benchmark config) and batch 8;
# 3. prints the MFU against the measured bfloat16 matmul peak and the vendor's bfloat16 peak;
# 4. runs the tests that exercise the device code (attention implementations incl. the cuDNN test,
#    which is skipped on CPU; fusion, the AVT model, the memory/speed controls, gradient accumulation,
#    the benchmark), with full float32 matmul precision so the float32 tolerances hold on TF32 GPUs.
#
# The figures come first so that a slow or failing test does not hold them back. Stops at once if no
# GPU is visible or the benchmark fails; exits with pytest's status otherwise. Results:
# OUTPUT_DIR/batch1/train.{json,md,png}, OUTPUT_DIR/batch8/..., and the pytest log OUTPUT_DIR/tests.log.
# PYTHON (default python) and JOBS (pytest workers sharing the GPU, default 4) can be set.
set -euo pipefail

cd "$(dirname "$0")/.."
OUT="${1:-gpu_check_results}"
PYTHON="${PYTHON:-python}"
export TF_CPP_MIN_LOG_LEVEL=2
mkdir -p "$OUT"

echo "== 1/4 devices"
"$PYTHON" - <<'EOF'
import sys
import jax
import jax.numpy as jnp

devices = jax.devices()
print(f'jax {jax.__version__}, backend {jax.default_backend()}, devices: {devices}')
if jax.default_backend() != 'gpu':
  sys.exit('No GPU visible to JAX: install a CUDA build of jaxlib, e.g. '
           "pip install 'jax[cuda12]==0.10.2', and check nvidia-smi.")
q = jnp.ones((1, 256, 4, 64), jnp.bfloat16)
out = jax.nn.dot_product_attention(q, q, q, implementation='cudnn')
print(f'cuDNN fused attention OK: {out.shape} {out.dtype} on {devices[0].device_kind}')
EOF

echo "== 2/4 base benchmark, bfloat16, cuDNN attention"
for BATCH in 1 8; do
  "$PYTHON" -m avt_jax.benchmark --configs=base --dtype=bfloat16 --attention=cudnn \
    --batch_size="$BATCH" --steps=10 --repeats=3 --output_dir="$OUT/batch$BATCH"
done

echo "== 3/4 MFU"
"$PYTHON" - "$OUT" <<'EOF'
import json
import os
import sys

out = sys.argv[1]
for batch in ('batch1', 'batch8'):
  with open(os.path.join(out, batch, 'train.json')) as f:
    report = json.load(f)
  peak = report['peak']['flops']
  nominal = report.get('nominal_peak')
  for r in report['results']:
    if 'mfu' not in r:
      print(f'{batch}: base was not timed (see {out}/{batch}/train.md)')
      continue
    line = (f'{batch}: {report["machine"]["device_kind"]}, base {r["controls_text"]}, batch '
            f'{r["batch_size"]}: step {r["step_seconds"]["median"] * 1e3:.1f} ms, '
            f'{r["achieved_flops"]["median"] / 1e12:.1f} TFLOP/s; MFU {100 * r["mfu"]["median"]:.1f}% '
            f'of the measured bfloat16 matmul peak ({peak / 1e12:.0f} TFLOP/s)')
    if nominal:
      line += (f', {100 * r["mfu_vs_nominal_peak"]["median"]:.1f}% of the vendor bfloat16 peak '
               f'({nominal / 1e12:.0f} TFLOP/s)')
    print(line + f'; peak memory {r["memory"]["peak"] / 2**30:.2f} GiB')
EOF

echo "== 4/4 tests"
# The sharded train-step tests need 8 devices (simulated CPU devices on the development machine) and
# are not run here; everything else that compiles model code for the device is. The workers share
# the GPU, so none preallocates its memory; an empty XLA_FLAGS keeps tests/conftest.py's CPU settings
# (simulated devices, backend optimisation off) away from the GPU.
XLA_FLAGS='' XLA_PYTHON_CLIENT_PREALLOCATE=false JAX_DEFAULT_MATMUL_PRECISION=highest \
  "$PYTHON" -m pytest -v --tb=line -rfE -p no:cacheprovider -n "${JOBS:-4}" \
  tests/test_transformer.py tests/test_fusion.py tests/test_avt.py tests/test_decoders.py \
  tests/test_perf_controls.py tests/test_benchmark.py \
  "tests/test_train_step.py::test_gradient_accumulation_matches_plain_step" \
  "tests/test_train_step.py::test_non_finite_loss_skips_update_and_names_objective" \
  2>&1 | tee "$OUT/tests.log"
