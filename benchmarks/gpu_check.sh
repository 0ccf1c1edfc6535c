#!/usr/bin/env bash
# The prepared GPU check, for a session lent a device machine (H100/H200: JAX there, no TensorFlow).
#
# Here, once, in the repo root (Keras travels as wheels; real cells travel as packed crops, never committed):
#   printf '/.whl/\n/.gpu_real/\n' >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl keras==3.15.1 namex==0.1.0 optree==0.20.0
#   # optional, real cells (C-NMC fold 1 at 128 px is ~41 MB, so repo + wheels + crops stay under 64 MiB):
#   python benchmarks/pack_crops.py data/real --size 128 --out .gpu_real/crops128
#   cp runs/bench_real/main64/oof_predictions.csv .gpu_real/baseline_oof.csv   # one baseline for every budget
# Then one device call with carry [".whl", ".gpu_real"] and timeout_s 560:  bash benchmarks/gpu_check.sh
#
# 1. Speed (alone on the GPU): Solution A at 250 px under JAX, the compute ceiling vs the end-to-end trainer rate
#    (target ratio >= 0.85), and EfficientNetB2 float32 vs mixed precision (target >= 1.4x).
# 1b. The `challenge` preset end to end on a generated Kaggle-layout tree (its speed with mixed precision).
# 2. Real cells, if packed: bench_real.py (leave-subjects-out, the same folds and baseline as on CPU) for the
#    budgets in REAL_BUDGETS, all at once (compiles are CPU-bound, the GPU is shared), and for each budget the
#    final model trained on every cell (inference-only .keras, to package here with `python -m training package --model`).
# Everything is written to $OUT: gpu.txt, bench_train.txt, real.tar.gz (logs, results.json, out-of-fold
# predictions), model_<budget>.keras. Each stage has a deadline, so partial results still come back.
# First run (2026-11-29, H200): the speed stage found the augmentation's RandomRotation/RandomShear switching the
# whole JAX train step to op-by-op execution (39.5 vs 3,884 img/s without augmentation); fixed in
# core/nets/augmentation.py, so the real-cell budgets (which then ran at ~85 img/s and were cut off) fit next time.
set -uo pipefail
T0=$(date +%s)
DEADLINE=${GPU_CHECK_SECONDS:-530}
left() { echo $((DEADLINE - ($(date +%s) - T0))); }
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="/tmp/site:$PWD" KERAS_BACKEND=jax PYTHONUNBUFFERED=1
OUT="${OUT:-/tmp/gpu_check}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python3 -c "import jax, keras; print('jax', jax.__version__, jax.devices(), 'keras', keras.__version__)" 2>&1 \
  | tail -1 | tee -a "$OUT/gpu.txt"

timeout "${SPEED_SECONDS:-170}" python3 benchmarks/bench_train.py --size 250 --steps 40 --models solution_a \
  --precision-compare 2>&1 | grep -v "^[IWE]0000" | tee "$OUT/bench_train.txt"

# 1b. The challenge preset end to end (official folds, prelim test set, EfficientNetB2 at 250 px, mixed precision)
#     on a generated tree in the exact Kaggle layout; the device has no internet, so no ImageNet start (--init none).
timeout "${CHALLENGE_SECONDS:-150}" bash -c 'python3 -m training synth /tmp/chal --cells-per-subject 30 \
  && python3 -m training run --preset challenge --init none --data-dir /tmp/chal --runs-dir /tmp/chal_runs \
       --cache-dir /tmp/chal_cache --epochs 2 --samples-per-class 500 --no-tensorboard' 2>&1 \
  | grep -v "^[IWE]0000" | tail -20 | tee "$OUT/challenge.txt"

REAL=.gpu_real
if [ -d "$REAL/crops128" ]; then
  export XLA_PYTHON_CLIENT_PREALLOCATE=false XLA_PYTHON_CLIENT_MEM_FRACTION=0.12
  mkdir -p /tmp/greal
  budget_left=$(( $(left) - 20 ))
  echo "real cells: ${budget_left} s for budgets ${REAL_BUDGETS:-a:128:10:1500 b:128:20:2000 c:64:15:1500}"
  for spec in ${REAL_BUDGETS:-a:128:10:1500 b:128:20:2000 c:64:15:1500}; do
    IFS=: read -r name size epochs per_class <<<"$spec"
    (timeout "$budget_left" python3 benchmarks/bench_real.py "$REAL/crops128" --crop-margin 0 --size "$size" \
       --epochs "$epochs" --per-class "$per_class" --recipes cross_patient_texture --tta \
       --baseline-oof "$REAL/baseline_oof.csv" --cache-dir "/tmp/gcache_$name" --out "/tmp/greal/$name" \
       > "/tmp/greal/bench_$name.log" 2>&1) &
    # its own lock folder: the per-device lock would queue these final runs one behind the other
    (CNMC_LOCK_DIR="/tmp/locks_$name" timeout "$budget_left" python3 - "$name" "$size" "$epochs" "$per_class" "$OUT" \
       > "/tmp/greal/final_$name.log" 2>&1 <<'EOF'
import sys
from core.nets.models import inference_model, load_model
from training.config import preset
from training.store import RunStore
from training.trainer import train

name, size, epochs, per_class, out = sys.argv[1], *map(int, sys.argv[2:5]), sys.argv[5]
cfg = preset("cross_patient_texture", name=f"gpu-final-{name}", data_dir=".gpu_real/crops128", split="all",
             image_size=size, epochs=epochs, samples_per_class=per_class, batch_size=32, learning_rate=5e-4, seed=0,
             early_stopping=False, crop_margin=0, tensorboard=False, runs_dir=f"/tmp/gruns_{name}",
             cache_dir=f"/tmp/gcache_final_{name}")
store = RunStore(cfg.runs_dir)
run = train(cfg, store)
info = store.get_run(run)
print("run", run, info["status"], info["error"])
inference_model(load_model(str(store.run_dir(run) / "best.keras"))).save(f"{out}/model_{name}.keras")
print("saved", f"{out}/model_{name}.keras")
EOF
    ) &
  done
  wait
  for f in /tmp/greal/*.log; do echo "== $f"; grep -v "^[IWE]0000" "$f" | tail -25; done
  tar -czf "$OUT/real.tar.gz" -C /tmp greal
fi
echo "gpu_check done in $(( $(date +%s) - T0 )) s"
