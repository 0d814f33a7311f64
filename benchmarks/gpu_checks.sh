#!/usr/bin/env bash
# GPU checks and the GPU results grid, in one command (used on a lent H100; see README).
#   bash benchmarks/gpu_checks.sh OUT_DIR FASHION_MNIST_DIR [EPOCHS] [TIME_LIMIT_S]
# 1. the GPU tests (tests marked `gpu`: callbacks on CUDA in 32/bf16-mixed/16-mixed, fp16/bf16 ops);
# 2. the reproduction grid on Fashion-MNIST (full 55k/5k/10k): ResNet-18 (CIFAR stem) student,
#    bf16-mixed, 4 methods x 3 seeds, Attentive CutMix with the EfficientNet-Lite0 teacher at
#    224 px (last layer) through the heatmap cache. METHODS and SEEDS (environment) pick a part of
#    the grid, e.g. METHODS="mixup cutmix" SEEDS="1 2".
set -uo pipefail
out=${1:?OUT_DIR}; data=${2:?FASHION_MNIST_DIR}; epochs=${3:-6}; limit=${4:-420}
read -r -a methods <<< "${METHODS:-baseline mixup cutmix attentive_cutmix_offline}"
read -r -a seeds <<< "${SEEDS:-0 1 2}"
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi -L | tee "$out/gpu.txt"
python3 -c "import torch, lightning; print('torch', torch.__version__, 'lightning', lightning.__version__)" | tee -a "$out/gpu.txt"
python3 -m pytest -q -m gpu -p no:cacheprovider "$here/tests/test_gpu.py" "$here/tests/test_precision.py" 2>&1 | tail -5 | tee "$out/gpu_tests.txt"
grid=(python3 "$here/benchmarks/reproduce.py" --data configs/data/fashion_mnist.yaml
  --model configs/model/resnet18.yaml --methods "${methods[@]}"
  --seeds "${seeds[@]}" --max-epochs "$epochs" --accelerator gpu --jobs 6 --heatmap-cache
  --title "Fashion-MNIST, ResNet-18 (CIFAR stem), $epochs epochs, bf16-mixed, one GPU" --out /tmp/fashion_mnist_gpu)
overrides=(-- --data.init_args.data_dir "$data" --data.init_args.num_workers 2 --trainer.precision bf16-mixed)
timeout "$limit" "${grid[@]}" "${overrides[@]}" > "$out/grid.log" 2>&1
echo "grid exit: $? (124: stopped at the time limit; rerun the same command to resume)" >> "$out/grid.log"
# Rebuild the table from whatever finished (a partial grid says so in its table).
"${grid[@]}" --report-only "${overrides[@]}" >> "$out/grid.log" 2>&1
grid=/tmp/fashion_mnist_gpu
cp "$grid"/table.md "$grid"/plot.png "$grid"/runs.json "$out"/ 2>/dev/null
ls -la "$out"
