#!/usr/bin/env bash
# The random-cells control on a GPU, planned to fit about ten minutes of an H100/H200:
# baseline, Mixup, CutMix, random cells and Attentive CutMix (Lite0 at 224 px through the heatmap
# cache) on a seeded Fashion-MNIST subset with a long budget, ResNet-18 CIFAR stem, bf16-mixed.
#   bash benchmarks/gpu_control_grid.sh OUT_DIR [FASHION_MNIST_DIR]
# EPOCHS (default 150), SUBSET (training images, default 3000), SEEDS (default "0 1 2") and JOBS
# (runs at a time, default 8) resize it; DRY_RUN=1 prints the runs' commands only. An interrupted
# grid resumes when run again.
set -euo pipefail
out=${1:?OUT_DIR}; data=${2:-/usr/share/datasets/fashion-mnist}
here=$(cd "$(dirname "$0")/.." && pwd)
cd "$here"
# shellcheck disable=SC2086  # SEEDS is a list
python3 benchmarks/reproduce.py --data configs/data/fashion_mnist.yaml --model configs/model/resnet18.yaml \
  --methods baseline mixup cutmix random_cells attentive_cutmix_offline --seeds ${SEEDS:-0 1 2} \
  --max-epochs "${EPOCHS:-150}" --jobs "${JOBS:-8}" --threads 2 --accelerator gpu --heatmap-cache \
  --compare baseline random_cells --out "$out" ${DRY_RUN:+--dry-run} \
  -- --data.init_args.data_dir "$data" --data.init_args.train_subset "${SUBSET:-3000}" \
  --data.init_args.num_workers 2 --trainer.precision bf16-mixed
