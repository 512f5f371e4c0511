#!/usr/bin/env bash
# Everything that needs a GPU, in one command, under 8 minutes on an H100/H200; writes ONE markdown report.
#   scripts/gpu_check.sh OUTDIR          (GPU_CHECK_BUDGET=seconds overrides the 450 s budget)
# OUTDIR/report.md: the machine, each step's status and time, the GPU tests (run with -W error::DeprecationWarning:
# every kernel x dtype x layout x index width vs unfold, misaligned views, edge shapes, side stream, CUDA-graph
# capture, determinism, torch.compile of RedNet-26), register use and occupancy of every kernel on this GPU,
# compute-sanitizer memcheck/initcheck of each kernel, the op benchmark (fp32 and bf16, both layouts, x bandwidth
# floor) and the model benchmark (RedNet-26/50/101 vs ResNet-26/50/101, bf16, with and without channels_last).
# Logs and junit.xml lie beside it. Needs torch and cupy; runs from the source tree (PYTHONPATH), no hydra.
# Each step runs under `timeout -s INT` within what is left of the budget, so pytest still writes junit.xml.
set -uo pipefail

out=${1:?usage: scripts/gpu_check.sh OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
python=${PYTHON:-python}
budget=${GPU_CHECK_BUDGET:-450}
start=$(date +%s)
report="$out/report.md"
summary="$out/.summary.md"
: >"$summary"
failed=0

# run_step NAME LIMIT LOG COMMAND...: at most LIMIT seconds and never past the budget (less 15 s for the report);
# SIGINT first (pytest and Python stop cleanly and write what they have), SIGKILL 20 s later.
run_step() {
    local name=$1 limit=$2 log=$3
    shift 3
    local left=$((budget - ($(date +%s) - start) - 15))
    ((limit > left)) && limit=$left
    if ((limit < 5)); then
        echo "| $name | skipped: out of time budget | 0 |" >>"$summary"
        echo "gpu_check: $name skipped (out of time)" | tee "$log"
        return 124
    fi
    local t0 status
    t0=$(date +%s)
    timeout -s INT -k 20 "$limit" "$@" >"$log" 2>&1
    status=$?
    local verdict="ok"
    ((status == 124)) && verdict="TIMED OUT after ${limit} s"
    ((status != 0 && status != 124)) && verdict="FAILED (exit $status)"
    echo "| $name | $verdict | $(($(date +%s) - t0)) |" >>"$summary"
    echo "gpu_check: $name: $verdict"
    return "$status"
}

# fence TITLE FILE [LINES]: a section with the tail of a log as a code block.
fence() {
    printf '\n### %s\n\n```\n' "$1" >>"$report"
    tail -n "${3:-40}" "$2" >>"$report" 2>/dev/null
    printf '```\n' >>"$report"
}

nvidia-smi >"$out/nvidia-smi.txt" 2>&1 || echo "(nvidia-smi failed: see above)" >>"$out/nvidia-smi.txt"

run_step "probe (versions, cupy backend)" 60 "$out/versions.txt" "$python" scripts/gpu_probes.py versions
probe_status=$?
if ((probe_status != 0)); then
    {
        echo "# GPU check: no run"
        echo
        if ((probe_status == 3)); then
            echo "No CUDA device: torch.cuda.is_available() is False on this machine. Run this on a GPU machine."
        else
            echo "The probe failed (exit $probe_status), so nothing else ran. Its output:"
        fi
        printf '\n```\n'
        cat "$out/versions.txt"
        printf '```\n\nnvidia-smi:\n\n```\n'
        head -n 20 "$out/nvidia-smi.txt"
        printf '```\n'
    } >"$report"
    echo "gpu_check: see $report"
    exit 2
fi

# GPU tests: every test file with the gpu marker (the others may need packages absent here, such as hydra).
mapfile -t files < <(grep -l "pytest.mark.gpu" tests/test_*.py)
per_test=()
"$python" -c "import pytest_timeout" 2>/dev/null && per_test=(--timeout=120)
run_step "GPU tests (-W error::DeprecationWarning)" 210 "$out/pytest.log" "$python" -m pytest -m gpu -q -ra \
    --durations=15 -p no:cacheprovider -W error::DeprecationWarning "${per_test[@]}" \
    --junitxml="$out/junit.xml" "${files[@]}" || failed=1

run_step "kernel registers and occupancy" 60 "$out/kernels.log" "$python" scripts/gpu_probes.py kernels \
    "$out/kernels.md" || failed=1

# compute-sanitizer: on PATH, in a CUDA toolkit, or from the pip wheel nvidia-cuda-sanitizer-api.
sanitizer=$(command -v compute-sanitizer 2>/dev/null ||
    find /usr/local/cuda*/bin "$("$python" -c 'import site; print(site.getsitepackages()[0])' 2>/dev/null)/nvidia" \
        -name compute-sanitizer -type f -perm -u+x 2>/dev/null | head -n 1)
sanitizer_note="compute-sanitizer not found (pip install nvidia-cuda-sanitizer-api-cu13, or a CUDA toolkit): skipped"
if [[ -n $sanitizer ]]; then
    sanitizer_note="$sanitizer"
    for tool in memcheck initcheck; do
        run_step "compute-sanitizer $tool (each kernel once)" 75 "$out/sanitizer_$tool.log" "$sanitizer" \
            --tool "$tool" --error-exitcode 9 "$python" scripts/gpu_probes.py sanitizer-cases || failed=1
    done
else
    echo "| compute-sanitizer | skipped: not found | 0 |" >>"$summary"
fi

run_step "op benchmark (fp32, bf16; NCHW, channels_last)" 90 "$out/benchmark_op.log" "$python" \
    scripts/benchmark_op.py --device cuda --dtypes float32 bfloat16 --backends cupy torch --min-run-time 0.1 \
    --out "$out/benchmark_op.md" || failed=1

models=(rednet26 resnet26 rednet50 resnet50 rednet101 resnet101)
run_step "model benchmark (bf16, channels_last)" 60 "$out/benchmark_model.log" "$python" scripts/benchmark_model.py \
    --models "${models[@]}" --amp bf16 --channels-last --warmup 5 --iters 15 --out "$out/benchmark_model.md" || failed=1
run_step "model benchmark (bf16, NCHW)" 60 "$out/benchmark_model_nchw.log" "$python" scripts/benchmark_model.py \
    --models "${models[@]}" --amp bf16 --no-channels-last --warmup 5 --iters 15 \
    --out "$out/benchmark_model_nchw.md" || failed=1

{
    echo "# GPU check, $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo
    echo "Machine and software:"
    printf '\n```\n'
    cat "$out/versions.txt"
    printf '```\n\n| step | result | seconds |\n|---|---|---:|\n'
    cat "$summary"
    echo
    echo "Total: $(($(date +%s) - start)) s of a $budget s budget. Sanitizer: $sanitizer_note."
    echo
    echo "## GPU tests"
    echo
    echo "Summary (pytest -ra; junit.xml has every test):"
} >"$report"
fence "pytest" "$out/pytest.log" 60
{
    printf '\n## Kernels on this GPU\n\n'
    cat "$out/kernels.md" 2>/dev/null || echo "(no table: see kernels.log)"
} >>"$report"
if [[ -n $sanitizer ]]; then
    printf '\n## compute-sanitizer\n' >>"$report"
    fence "memcheck" "$out/sanitizer_memcheck.log" 15
    fence "initcheck" "$out/sanitizer_initcheck.log" 15
fi
for table in benchmark_op benchmark_model benchmark_model_nchw; do
    printf '\n## %s\n\n' "$table" >>"$report"
    if [[ -s $out/$table.md ]]; then cat "$out/$table.md" >>"$report"; else fence "$table (no table)" "$out/$table.log" 20; fi
done
rm -f "$summary"
echo "gpu_check: report in $report"
exit "$failed"
