#!/usr/bin/env bash
# The whole GPU check in one command, no TensorFlow, no data folder (issue 12):
#
#   bash benchmarks/gpu.sh OUTDIR
#
# 1. synthetic throughput table, guide preset: float32 and mixed_bfloat16 at batch 128 and 1024,
#    fit next to the bare jitted step (benchmarks/synthetic.py; one process per cell);
# 2. a 300-step mixed_bfloat16 run at the first of GPU_CHECK_BATCHES (128) whose loss must fall and
#    stay finite (one loss per 10 steps, the first against the last: 20 steps at least, 0 skips it);
# 3. the next levers, each timed beside the real cell (mixed_bfloat16, batch 128); the 4,096 x V
#    logits and their loss are ~40% of the H100 step. The head-loss ones take the head's features,
#    not logits (head_loss.py; fit there has no accuracy metric, the bare step is the same work),
#    and their table also says how far their loss and gradients land from the whole logits there:
#    loss-fused: three Pallas (Triton) kernels, logits only ever in registers (their blocks:
#      ENCODERFLOW_FUSED_BLOCKS="vocab=64 stages=1 ...", see head_loss.FusedBlocks);
#    loss-chunked: the logits made 256 rows at a time in XLA, remade for the gradient;
#    loss-logsumexp: the usual head, the loss as logsumexp(logits) - logits[label], no
#      log-softmax or one-hot tensor of the logits' size (same value and gradient, tested);
#    vocab-pad: the vocabulary padded from 30,522 to 30,592 rows (a multiple of 128; 30,522 =
#      2 x 15,261 tiles badly; ids are drawn over the padded range, which no timing sees).
#    In the order of their bytes per step as compiled for an H100 here (benchmarks/gpu_aot.py,
#    2026-12-05): fused and vocab-pad move fewer than the pipeline's step, chunked and logsumexp
#    more; a run cut short by its time limit loses the last.
# Writes OUTDIR/synthetic.md, OUTDIR/synthetic.json, OUTDIR/<lever>/synthetic.md and
# OUTDIR/log.txt; prints the tables last.
# Exit status: non-zero when a cell failed (a head loss off the whole logits included) or the loss
# run did not pass.
#
# Needs python3 with jax, keras 3 and keras-hub importable and src/ on PYTHONPATH; on a bare
# device machine install the wheels carried in .whl/ first (`make gpu-wheels` fetches them):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD/src
#
# Knobs (defaults are the real check; a CPU rehearsal shrinks them):
#   GPU_CHECK_PRESET=guide GPU_CHECK_BATCHES=128,1024 GPU_CHECK_PRECISIONS=float32,mixed_bfloat16
#   GPU_CHECK_STEPS=64 GPU_CHECK_WARMUP=5 GPU_CHECK_REPEATS=3 GPU_CHECK_LOSS_STEPS=300 (0 or >= 20)
#   GPU_CHECK_LEVERS="loss-fused vocab-pad loss-chunked loss-logsumexp" (empty: none) GPU_CHECK_PAD_VOCAB=30592
#   A shorter check once the full table exists: GPU_CHECK_BATCHES=128 GPU_CHECK_PRECISIONS=mixed_bfloat16
#   PYTHON=python3
set -euo pipefail

out=${1:?usage: bash benchmarks/gpu.sh OUTDIR}
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
py=${PYTHON:-python3}
export PYTHONUNBUFFERED=1
export KERAS_BACKEND=jax
export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}
batches=${GPU_CHECK_BATCHES:-128,1024}
loss_steps=${GPU_CHECK_LOSS_STEPS:-300}
# Refused before the first cell: too few steps record one loss, which cannot be seen to fall, and
# the check would fail after minutes of timing for a reason the table does not show.
if ! [[ $loss_steps =~ ^[0-9]+$ ]] || { ((10#$loss_steps > 0)) && ((10#$loss_steps < 20)); }; then
    echo "gpu check: GPU_CHECK_LOSS_STEPS=$loss_steps: the loss run records one loss per 10 steps and compares" \
        "the first with the last: set it to 20 or more (300 is the check), or 0 to skip the loss run" >&2
    exit 2
fi
mkdir -p "$out"
log="$out/log.txt"

{
    echo "gpu check: $(date -u +%FT%TZ) on $(hostname)"
    "$py" - <<'EOF'
import sys

print("python", sys.version.split()[0])
import jax

print("jax", jax.__version__, "devices", jax.devices())
import encoderflow.model  # noqa: F401  (selects the JAX backend; the real model, without TensorFlow)
import keras
import keras_hub

print("keras", keras.__version__, "keras-hub", keras_hub.__version__, "backend", keras.backend.backend())
print("tensorflow imported:", "tensorflow" in sys.modules and sys.modules["tensorflow"] is not None)
EOF
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,power.limit --format=csv || true
} 2>&1 | tee "$log"

# The settings every timed cell shares; each call adds what it is about.
synthetic() {
    "$py" "$here/train.py" --synthetic \
        --preset "${GPU_CHECK_PRESET:-guide}" \
        --steps "${GPU_CHECK_STEPS:-64}" \
        --warmup "${GPU_CHECK_WARMUP:-5}" \
        --repeats "${GPU_CHECK_REPEATS:-3}" \
        "$@" 2>&1 | tee -a "$log"
    return "${PIPESTATUS[0]}"
}

# Prints one table; a missing table fails the check.
show() {
    echo
    echo "================ $1 ($2) ================"
    cat "$2" 2>/dev/null || { echo "no table was written (see $log)"; rc=1; }
}

read -ra wanted <<<"${GPU_CHECK_LEVERS-loss-fused vocab-pad loss-chunked loss-logsumexp}"
rc=0
levers=()
# One lever: the real bfloat16 batch-128 cell with the named change, its table in OUTDIR/NAME.
lever() {
    local name=$1 change
    case $name in
        loss-*) change=(--mlm-loss "${name#loss-}") ;;
        vocab-pad) change=(--vocab-size "${GPU_CHECK_PAD_VOCAB:-30592}") ;;
        *) echo "gpu check: unknown lever '$name' (loss-fused, loss-chunked, loss-logsumexp, vocab-pad)" | tee -a "$log"; rc=1; return ;;
    esac
    levers+=("$name")
    synthetic --precision mixed_bfloat16 --batch-size "${batches%%,*}" --out "$out/$name" "${change[@]}" || rc=1
}

synthetic --precision "${GPU_CHECK_PRECISIONS:-float32,mixed_bfloat16}" --batch-size "$batches" \
    --loss-run "$((10#$loss_steps))" --out "$out" || rc=1
for name in "${wanted[@]}"; do
    lever "$name"
done

show "gpu check tables" "$out/synthetic.md"
for name in "${levers[@]}"; do
    show "lever $name" "$out/$name/synthetic.md"
done
echo "gpu check: exit $rc"
exit "$rc"
