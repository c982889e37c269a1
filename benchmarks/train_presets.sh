#!/usr/bin/env bash
# Issue #17's GPU runs, prepared as one script so that device time goes to training: the residual Hand preset and
# the six-class conditional preset train side by side on one GPU (each stopped by SIGTERM after LIMIT_S seconds
# if it has not finished: the trainer checkpoints and exits 3), then each generator (its best/ export when an
# evaluation ran, else its newest checkpoint) is scored with `mednist-gan evaluate` at N images per class against
# the seed weights (Hand) or every class with usefulness (conditional). Outputs: $OUT/<step>.txt and the JSONs.
#   MEDNIST_ROOT=<folder of the six class folders> MEDNIST_GAN_UPSTREAM=<seed model.pt> OUT=results \
#     [LIMIT_S=420] [N=1000] [PRECISION=bf16] [MAX_STEPS=...] bash benchmarks/train_presets.sh
# N may be at most half a class's real images (1,000 with the 2,000-per-class set; 5,000 needs the complete set).
set -uo pipefail
OUT=${OUT:-preset_results}
RUNS=${RUNS:-/tmp/preset_runs}
LIMIT_S=${LIMIT_S:-420}
N=${N:-1000}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
extra=("log.tracker=none" "train.precision=${PRECISION:-bf16}" "data.root=$MEDNIST_ROOT")
[ -n "${MAX_STEPS:-}" ] && extra+=("train.max_steps=$MAX_STEPS" "eval.every_steps=$MAX_STEPS")

train() {  # train NAME CONFIG: one run in the background's own process
    local name=$1 config=$2 start=$SECONDS
    timeout -s TERM "$LIMIT_S" python3 -m mednist_gan train --config "$config" run_dir="$RUNS/$name" "${extra[@]}" \
        >"$OUT/train_$name.txt" 2>&1
    echo "train $name: rc=$? after $((SECONDS - start))s (0 finished, 3 stopped at the time limit with a checkpoint)"
}

generator_of() {  # the generator to score: best/ when an evaluation kept one, else the newest checkpoint
    if [ -f "$RUNS/$1/best/model.pt" ]; then echo "$RUNS/$1/best/model.pt"; else echo "$RUNS/$1"; fi
}

train resnet configs/resnet.yaml &
train conditional configs/conditional.yaml &
wait
grep -h -E "training |evaluation at|finished|stopped|error" "$OUT"/train_*.txt | cut -c1-300

python3 -m mednist_gan evaluate --model "$(generator_of resnet)" --baseline "$MEDNIST_GAN_UPSTREAM" \
    --real-dir "$MEDNIST_ROOT" --class Hand --num-samples "$N" --out "$OUT/evaluate_resnet.json" \
    >"$OUT/evaluate_resnet.txt" 2>&1
echo "evaluate resnet: rc=$?"
python3 -m mednist_gan evaluate --model "$(generator_of conditional)" --real-dir "$MEDNIST_ROOT" --class all \
    --num-samples "$N" --usefulness "$N" --out "$OUT/evaluate_conditional.json" >"$OUT/evaluate_conditional.txt" 2>&1
echo "evaluate conditional: rc=$?"
tail -n 30 "$OUT"/evaluate_*.txt | cut -c1-250
