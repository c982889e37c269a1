#!/usr/bin/env bash
# The GPU checks behind docs/benchmarks.md's GPU rows: a short GPU training at each precision, the
# CPU test files that also run on a GPU, and the benchmarks. Run from the repository root on a GPU
# machine with this project importable (PYTHONPATH=.) and the data at $MEDNIST_ROOT.
#   MEDNIST_ROOT=/data/MedNIST MEDNIST_GAN_UPSTREAM=/path/model.pt OUT=results benchmarks/gpu_check.sh
set -uo pipefail
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
nvidia-smi -L
python3 -c "import torch, monai, accelerate; print('torch', torch.__version__, 'monai', monai.__version__, 'accelerate', accelerate.__version__, torch.cuda.get_device_name())"
for p in no bf16 fp16; do
    echo "== debug training on the GPU, precision $p"
    python3 -m mednist_gan train --config configs/debug.yaml data.root="$MEDNIST_ROOT" run_dir="/tmp/gpu_$p" \
        train.precision=$p train.max_steps=20 train.epochs=20 2>&1 | grep -E "training|step 20|finished|error" | cut -c1-200
done
echo "== tests on the GPU"
python3 -m pytest -q -x -p no:cacheprovider tests/test_training.py tests/test_export_generate.py tests/test_data.py 2>&1 | tail -4
echo "== benchmarks"
python3 benchmarks/bench_generate.py --weights "$MEDNIST_GAN_UPSTREAM" --num-samples 2000 2>&1 | tee "$OUT/bench_generate.txt" | tail -4
python3 benchmarks/bench_data.py --data "$MEDNIST_ROOT" 2>&1 | tee "$OUT/bench_data.txt" | tail -4
python3 benchmarks/bench_train.py --data "$MEDNIST_ROOT" --iters 10 --workers 8 2>&1 | tee "$OUT/bench_train.txt" | tail -8
