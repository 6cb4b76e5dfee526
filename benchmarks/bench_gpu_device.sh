#!/usr/bin/env bash
# make bench-gpu on a device machine whose Python (3.12) and torch differ from ours: the project's own packages
# missing there travel as wheels in .whl/ (`make gpu-wheels` here first), the project itself runs from the tree.
# One command within 10 minutes: ~1 min install, the released-size training and sampling sides, every knob set.
#   device run: carry [".whl"], command `bash benchmarks/bench_gpu_device.sh`, timeout_s 600
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/bench_out}; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import torch, diffusers, torchao; print(torch.__version__, diffusers.__version__, torchao.__version__)"
# Sampling: 3 timed steps per knob set after one warm-up call (compile sets compile there); training: 2 steps.
timeout 540 python3 benchmarks/bench_gpu.py --train-steps 2 --sample-steps 3 --warmup 1 "$@" 2>&1 \
    | tee "$OUT/bench_gpu.log"
tail -n +1 "$OUT/bench_gpu.log" | sed -n '/^{/,$p' > "$OUT/bench_gpu.json"
