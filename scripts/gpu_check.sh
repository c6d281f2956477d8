#!/usr/bin/env bash
# GPU readiness check of arkd's losses, in one go on a CUDA machine (budget: under 8 minutes on one GPU).
#
#   scripts/gpu_check.sh [--dry-run] [--out FILE.md]
#
# 1. the GPU tests (`pytest -m gpu tests/gpu`): bf16 values and gradients of the fast paths against float32
#    references, the compiled kernel on CUDA, and a short accelerate (bf16) training loop with varying sequence
#    lengths that must not recompile after its first step;
# 2. the loss benchmark in bf16 (scripts/bench_losses.py --device cuda): naive, torch.compile(naive), arkd eager
#    and compiled on logits; torch.compile(naive linear), Liger-Kernel's fused-linear JSD (when installed) and arkd's
#    fused-linear loss; each against its bytes / matmul floor measured on the same GPU (the HBM bound in practice);
# 3. the training-step benchmark (scripts/bench_step.py --device cuda) on GPT-2-small-sized models;
#
# and writes everything into one markdown file (default gpu_check.md), a table per part. Each part has its own
# timeout, so one that hangs cannot eat the budget of the others; a failing part is reported, the others still run,
# and the exit status is non-zero if any part failed. --dry-run prints the commands without running anything
# (and works without a GPU). Without a CUDA device it says so in one line and exits with status 2.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1

OUT="gpu_check.md"
DRY=0
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) DRY=1 ;;
        --out) shift; OUT="${1:?--out needs a file name}" ;;
        -h|--help) sed -n '2,19p' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown argument '$1' (expected --dry-run or --out FILE.md)" >&2; exit 2 ;;
    esac
    shift
done

PY="${PYTHON:-python}"
WORK="$(mktemp -d -t arkd-gpu-check-XXXXXX)"
trap 'rm -rf "$WORK"' EXIT

TESTS_CMD=("$PY" -m pytest -q -m gpu tests/gpu -p no:cacheprovider)
LOSSES_CMD=("$PY" scripts/bench_losses.py --device cuda --tokens 16384 --linear-tokens 8192 --hidden 2048
            --repeats 5 --markdown "$WORK/losses.md" --json "$WORK/losses.json")
STEP_CMD=("$PY" scripts/bench_step.py --device cuda --teacher-layers 12 --teacher-width 768 --student-layers 6
          --student-width 384 --batch-size 16 --rounds 5 --json "$WORK/step.json")
# seconds per part: 150 + 240 + 60 = 450 s, under 8 min with the start-up
T_TESTS=150
T_LOSSES=240
T_STEP=60

if [ "$DRY" = 1 ]; then
    echo "gpu_check --dry-run: would write $OUT from"
    echo "  timeout $T_TESTS ${TESTS_CMD[*]}"
    echo "  timeout $T_LOSSES ${LOSSES_CMD[*]}"
    echo "  timeout $T_STEP ${STEP_CMD[*]}"
    for f in tests/gpu/test_losses_gpu.py scripts/bench_losses.py scripts/bench_step.py; do
        [ -f "$f" ] || { echo "gpu_check: $f is missing" >&2; exit 1; }
    done
    exit 0
fi

if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device here (torch.cuda.is_available() is False); nothing was run" >&2
    exit 2
fi

start=$(date +%s)
status=0
run_part() {  # name, timeout, log file, command...
    local name="$1" limit="$2" log="$3"
    shift 3
    local t0=$(date +%s)
    timeout "$limit" "$@" >"$log" 2>&1
    local rc=$?
    local took=$(( $(date +%s) - t0 ))
    if [ "$rc" = 124 ]; then
        echo "| $name | timed out after ${limit} s |" >>"$WORK/parts.md"
        status=1
    elif [ "$rc" != 0 ]; then
        echo "| $name | failed (exit $rc, ${took} s): \`$(tail -n 1 "$log" | tr '|' '/')\` |" >>"$WORK/parts.md"
        status=1
    else
        echo "| $name | ok (${took} s) |" >>"$WORK/parts.md"
    fi
    echo "gpu_check: $name finished (exit $rc, ${took} s)"
}

echo "| part | result |" >"$WORK/parts.md"
echo "|---|---|" >>"$WORK/parts.md"
run_part "GPU tests" "$T_TESTS" "$WORK/tests.log" "${TESTS_CMD[@]}"
run_part "loss benchmark (bf16)" "$T_LOSSES" "$WORK/losses.log" "${LOSSES_CMD[@]}"
run_part "step benchmark" "$T_STEP" "$WORK/step.log" "${STEP_CMD[@]}"

{
    echo "# arkd GPU check"
    echo
    "$PY" - <<'EOF'
import datetime
import torch
p = torch.cuda.get_device_properties(0)
print(f"{datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {p.name} ({p.total_memory / 2**30:.0f} GiB), "
      f"torch {torch.__version__}, CUDA {torch.version.cuda}")
EOF
    echo
    cat "$WORK/parts.md"
    echo
    echo "## GPU tests"
    echo
    echo '```'
    tail -n 15 "$WORK/tests.log"
    echo '```'
    echo
    echo "## Loss benchmark: \`${LOSSES_CMD[*]}\`"
    echo
    if [ -s "$WORK/losses.md" ]; then cat "$WORK/losses.md"; else echo '```'; tail -n 20 "$WORK/losses.log"; echo '```'; fi
    echo
    echo "## Training-step benchmark: \`${STEP_CMD[*]}\`"
    echo
    echo '```'
    tail -n 20 "$WORK/step.log"
    echo '```'
    echo
    echo "Total: $(( $(date +%s) - start )) s."
} >"$OUT"
sed -i "s#$WORK/#<tmp>/#g" "$OUT"
echo "gpu_check: wrote $OUT ($(( $(date +%s) - start )) s)"
exit "$status"
