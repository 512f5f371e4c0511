#!/usr/bin/env bash
# Everything that needs a GPU, in one command (under 10 minutes): the GPU tests and the op benchmark.
#   scripts/gpu_check.sh OUTDIR
# Writes OUTDIR/{versions.txt, nvidia-smi.txt, pytest.log, junit.xml, benchmark_op.md, benchmark_model*.md, *.log}.
# Needs torch and cupy; runs from the source tree (PYTHONPATH), so no install step and no hydra-core are needed.
set -uo pipefail

out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1
if ! "$python" -c "import sys, torch; sys.exit(not torch.cuda.is_available())"; then
    echo "gpu_check: torch sees no CUDA device; run this on a GPU machine" | tee "$out/pytest.log"
    exit 2
fi
"$python" - <<'PY' 2>&1 | tee "$out/versions.txt"
import torch, ops
from ops import cupy_backend
print("torch", torch.__version__, "CUDA", torch.version.cuda)
print("device", torch.cuda.get_device_name() if torch.cuda.is_available() else None)
try:
    import cupy
    print("cupy", cupy.__version__)
except ImportError as error:
    print("cupy missing:", error)
print("cupy backend available:", cupy_backend.is_available())
print("backends:", ops.available_backends())
PY

# The GPU tests: every test file that uses the gpu marker (collecting the others may need packages absent here).
mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
timeout 220 "$python" -m pytest -m gpu -q -ra --durations=15 -p no:cacheprovider --junitxml="$out/junit.xml" "${files[@]}" \
    2>&1 | tee "$out/pytest.log"
tests_status=${PIPESTATUS[0]}

# Both layouts: NCHW, and channels_last (the NHWC kernels, and the same inputs through NCHW copies).
timeout 170 "$python" scripts/benchmark_op.py --device cuda --min-run-time 0.2 --out "$out/benchmark_op.md" 2>&1 \
    | tee "$out/benchmark_op.log"
bench_status=${PIPESTATUS[0]}

# RedNet vs ResNet throughput (bf16 + channels_last, batch 64), then RedNet-50 in NCHW: does channels_last pay?
# The timeouts add up to under 9 minutes.
timeout 90 "$python" scripts/benchmark_model.py --models rednet26 resnet26 rednet50 resnet50 --iters 20 \
    --out "$out/benchmark_model.md" 2>&1 | tee "$out/benchmark_model.log"
model_status=${PIPESTATUS[0]}
timeout 40 "$python" scripts/benchmark_model.py --models rednet50 --no-channels-last --iters 20 \
    --out "$out/benchmark_model_nchw.md" 2>&1 | tee "$out/benchmark_model_nchw.log"
model_nchw_status=${PIPESTATUS[0]}

echo "gpu_check: pytest exit $tests_status, op benchmark exit $bench_status, model benchmark exit $model_status" \
    "(NCHW: $model_nchw_status)"
echo "(results in $out)"
exit $((tests_status != 0 || bench_status != 0))
