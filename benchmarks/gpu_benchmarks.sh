#!/usr/bin/env bash
# The GPU rows of the README's speed tables, in one command (for a lent GPU; see README, Speed).
#   bash benchmarks/gpu_benchmarks.sh OUT_DIR [FASHION_MNIST_DIR]
# Each benchmark writes OUT_DIR/<name>.md (its command, its printed table, its exit status) and
# has TIME_LIMIT_S seconds (default 240). DEVICE (default cuda) picks the device; ONLY (names
# separated by spaces, e.g. ONLY="mixing_op_gpu teacher_gpu_compile") runs a part of the list,
# to fit a short lease. Random-weight teachers are for timing only: their heatmaps are meaningless.
set -uo pipefail
out=${1:?OUT_DIR}; data=${2:-/usr/share/datasets/fashion-mnist}
device=${DEVICE:-cuda}; limit=${TIME_LIMIT_S:-240}; only=${ONLY:-}
mkdir -p "$out"
here=$(cd "$(dirname "$0")/.." && pwd)
export PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

run() {
  local name=$1; shift
  if [[ -n "$only" && " $only " != *" $name "* ]]; then return; fi
  {
    echo "Command: \`python benchmarks/$* --device $device\`"
    echo
    timeout "$limit" python3 "$here/benchmarks/$1" "${@:2}" --device "$device" --data-dir "$data"
    echo "exit: $? (124: stopped at the time limit)"
  } > "$out/$name.md" 2>&1
  tail -n 12 "$out/$name.md"
}

run mixing_op_gpu bench_mixing_op.py --repeats 50
run training_gpu_resnet152 bench_training.py --teacher resnet152 --teacher-weights none \
  --teacher-layer layer4 --teacher-size 224 --num-samples 8192
run training_gpu_resnet152_bf16_layer3 bench_training.py --teacher resnet152 --teacher-weights none \
  --teacher-layer layer3 --teacher-size 112 --teacher-amp bf16 --channels-last --num-samples 8192
run reference_port_gpu bench_reference_port.py --teacher resnet50 --teacher-weights none --num-samples 2048
run cache_fidelity_gpu bench_cache.py --num-samples 2048
run teacher_gpu_compile bench_teacher.py --teacher resnet152 --teacher-weights none --compile
