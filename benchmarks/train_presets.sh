#!/usr/bin/env bash
# Issue #17's GPU runs, prepared as one script so that device time goes to training: the runs named in $PRESETS
# train side by side on one GPU (each stopped by SIGTERM after LIMIT_S seconds if it has not finished: the trainer
# checkpoints and exits 3), then each generator (its best/ export when an evaluation ran, else its newest
# checkpoint) is scored with `mednist-gan evaluate` at N images per class: the Hand generators against the seed
# weights, the conditional one on every class with usefulness; both beside real images blurred with sigma 1.5 (the
# yardstick of the issue's targets). Outputs: $OUT/<step>.txt and the JSONs.
#   MEDNIST_ROOT=<folder of the six class folders> MEDNIST_GAN_UPSTREAM=<seed model.pt> OUT=results \
#     [PRESETS="resnet conditional"] [LIMIT_S=420] [N=1000] [PRECISION=bf16] [MAX_STEPS=...] [EXTRA="key=value ..."] \
#     [KEEP=1] bash benchmarks/train_presets.sh
# PRESETS names the runs: resnet (configs/resnet.yaml), conditional (configs/conditional.yaml), wide (configs/wide.yaml),
# or NAME:CONFIG[:KEY=VALUE...] for a variant, e.g. "resnet resnet_d5:configs/resnet.yaml:train.d_train_steps=5"
# (a run whose name contains "conditional" is scored on every class, the others on Hand).
# MAX_STEPS shortens every schedule (and evaluates at its end); EXTRA adds overrides to every run (last: they win).
# N may be at most half a class's real images (1,000 with the 2,000-per-class set; 5,000 needs the complete set).
# KEEP=1 brings each run's generator back for scoring at N = 5000 elsewhere (the device returns $OUT's files of at
# most 16 MiB; the full-width generator is 14.4 MB, a wider one more): $OUT/keep_<name>/ holds its model.pt in parts
# of 15 MiB, the sha256 and export.json; join with `cat model.pt.part* > model.pt && sha256sum -c model.pt.sha256`.
# The device receives the repository, not ../shared: pack the data first (benchmarks/pack_subset.py, carry .device).
set -uo pipefail
OUT=${OUT:-preset_results}
RUNS=${RUNS:-/tmp/preset_runs}
LIMIT_S=${LIMIT_S:-420}
N=${N:-1000}
mkdir -p "$OUT" "$RUNS"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 PYTHONWARNINGS=ignore
extra=("log.tracker=none" "train.precision=${PRECISION:-bf16}" "data.root=$MEDNIST_ROOT")
[ -n "${MAX_STEPS:-}" ] && extra+=("train.max_steps=$MAX_STEPS" "eval.every_steps=$MAX_STEPS")
read -ra more <<<"${EXTRA:-}"
extra+=("${more[@]}")

preset() {  # preset ENTRY: the config file and overrides of a PRESETS entry, one per line
    case $1 in
        resnet | conditional | wide) echo "configs/$1.yaml" ;;
        *:*) echo "${1#*:}" | tr ':' '\n' ;;
        *) echo "train_presets.sh: unknown preset '$1' in PRESETS (expected resnet, conditional, wide or NAME:CONFIG[:KEY=VALUE...])" >&2
           return 2 ;;
    esac
}

train() {  # train ENTRY: one run in the background's own process
    local name=${1%%:*} start=$SECONDS args
    mapfile -t args < <(preset "$1")
    timeout -s TERM "$LIMIT_S" python3 -m mednist_gan train --config "${args[0]}" run_dir="$RUNS/$name" \
        "${args[@]:1}" "${extra[@]}" >"$OUT/train_$name.txt" 2>&1
    echo "train $name: rc=$? after $((SECONDS - start))s (0 finished, 3 stopped at the time limit with a checkpoint)"
}

generator_of() {  # the generator to score: best/ when an evaluation kept one, else the newest checkpoint
    if [ -f "$RUNS/$1/best/model.pt" ]; then echo "$RUNS/$1/best/model.pt"; else echo "$RUNS/$1"; fi
}

read -ra presets <<<"${PRESETS:-resnet conditional}"
for entry in "${presets[@]}"; do
    config=$(preset "$entry" | head -n 1) || exit 2
    [ -f "$config" ] || { echo "train_presets.sh: $config (PRESETS entry '$entry') not found; run from the repository root" >&2; exit 2; }
done
for entry in "${presets[@]}"; do train "$entry" & done
wait
grep -h -E "training |evaluation at|finished|stopped|error" "$OUT"/train_*.txt | cut -c1-300

for entry in "${presets[@]}"; do
    name=${entry%%:*}
    if [[ $name == *conditional* ]]; then scope=(--class all --usefulness "$N")
    else scope=(--class Hand --baseline "$MEDNIST_GAN_UPSTREAM"); fi
    python3 -m mednist_gan evaluate --model "$(generator_of "$name")" --real-dir "$MEDNIST_ROOT" "${scope[@]}" \
        --num-samples "$N" --blurred 1.5 --out "$OUT/evaluate_$name.json" >"$OUT/evaluate_$name.txt" 2>&1
    echo "evaluate $name: rc=$?"
done
tail -n 30 "$OUT"/evaluate_*.txt | cut -c1-250

[ -n "${KEEP:-}" ] || exit 0
for entry in "${presets[@]}"; do
    name=${entry%%:*}
    keep="$OUT/keep_$name"
    for src in "$RUNS/$name/best" "$RUNS/$name/export"; do
        [ -f "$src/model.pt" ] || continue
        mkdir -p "$keep"
        split -b "${PART_SIZE:-15M}" -d -a 2 "$src/model.pt" "$keep/model.pt.part"
        (cd "$src" && sha256sum model.pt) >"$keep/model.pt.sha256"
        cp "$src/export.json" "$keep/"
        echo "kept $src/model.pt in $keep"
        break
    done
done
