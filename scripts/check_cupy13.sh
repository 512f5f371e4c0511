#!/usr/bin/env bash
# Compiles ops/kernels/involution.cu through CuPy 13's own compiler (with CUDA 12's NVRTC), no GPU needed.
# The official op broke on CuPy 13; CI runs the same test under CuPy 14 (what `make install` brings).
#
#   bash scripts/check_cupy13.sh [SCRATCH_VENV]      (after `make install`; about 400 MB of downloads)
#
# The scratch venv holds only CuPy 13 and CUDA 12's NVRTC; torch, pytest and the rest come from the project's
# .venv, placed after them on sys.path so that `import cupy` finds CuPy 13.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-/tmp/rednet-cupy13}"
PROJECT_PYTHON="$ROOT/.venv/bin/python"
[ -x "$PROJECT_PYTHON" ] || { echo "no $PROJECT_PYTHON: run 'make install' first" >&2; exit 2; }

python3 -m venv "$VENV"
"$VENV/bin/pip" install -q "cupy-cuda12x==13.*" nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12
scratch_site="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
"$PROJECT_PYTHON" -c 'import site; print(site.getsitepackages()[0])' > "$scratch_site/zz_rednet_project.pth"
echo "$ROOT" >> "$scratch_site/zz_rednet_project.pth"
# CuPy 13 finds libnvrtc.so.12 through the loader, not in the wheel's folder.
export LD_LIBRARY_PATH="$scratch_site/nvidia/cuda_nvrtc/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

cd "$ROOT"
"$VENV/bin/python" -W ignore -c 'import cupy; from cupy.cuda import compiler; print("CuPy", cupy.__version__, "NVRTC", compiler._get_nvrtc_version())'
CI=true "$VENV/bin/python" -W ignore::UserWarning -m pytest -q -p no:cacheprovider tests/test_ops_nvrtc.py -k cupy_compiler
