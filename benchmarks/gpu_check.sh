#!/usr/bin/env bash
# The prepared GPU check, for a session lent a device machine (H100/H200: JAX there, no TensorFlow).
#
# Here, once, in the repo root (Keras travels as wheels):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
# Then one device call with carry [".whl"] and timeout_s 560:  bash benchmarks/gpu_check.sh
# It prints, for solution_a and efficientnet_b2 at 250 px under JAX: the compute ceiling and the end-to-end
# trainer rate (target ratio >= 0.85), and EfficientNetB2 float32 vs mixed precision (target >= 1.4x).
# EfficientNet compiles take about a minute each; the whole script is sized to finish in ~7 minutes.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
timeout 480 python3 benchmarks/bench_train.py --size 250 --steps 60 --models solution_a,efficientnet_b2 \
  --precision-compare 2>&1 | grep -v "^[IWE]0000" | tee "$OUT/bench_train.txt"
