"""Benchmark: trainer throughput end to end vs the compute ceiling, per architecture, in one run.

    python benchmarks/bench_train.py [--size 64] [--steps 20] [--models solution_a,efficientnet_b2,vgg16]
    KERAS_BACKEND=jax python benchmarks/bench_train.py --size 250 --steps 60      # on a GPU

For each architecture, one compiled model (augmentation inside, the run's batch size and precision) is fitted:
  ceiling    : a fixed batch already on the device, fed by `fit` every step (no slicing, no sampling)
  end-to-end : the trainer's input path: class-balanced batches sliced from the memory-mapped crop cache
and the script prints img/s for both and their ratio (target >= 0.85), and the ceiling of the same model without
its augmentation/stain layers (what share of a step the augmentation costs). `--recipe report` measures the
report's recipe instead of the default one. With --precision-compare,
EfficientNetB2's ceiling is also measured in float32 vs mixed precision (target >= 1.4x on a GPU).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def _fit_rate(model, data, steps: int, skip: int = 2) -> float:
    """img/s between the end of batch `skip` and the last batch: steady state, without fit's set-up."""
    import keras

    stamps: list[float] = []

    class Clock(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            stamps.append(time.perf_counter())

    model.fit(data, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[Clock()])
    skip = min(skip, len(stamps) - 2)
    return (len(stamps) - 1 - skip) * data.batch / (stamps[-1] - stamps[skip])


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--models", default="solution_a,efficientnet_b2,vgg16")
    ap.add_argument("--batch", type=int, default=None, help="override every model's report batch size")
    ap.add_argument("--precision", default="auto", choices=("auto", "on", "off"))
    ap.add_argument("--precision-compare", action="store_true")
    ap.add_argument("--recipe", default="cross_patient_texture", help="preset whose augmentation/stain layers are used")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "cnmc_bench_train"))
    args = ap.parse_args()

    import keras

    from core.data.dataset import index
    from core.nets.models import create_model, model_info
    from core.image.preprocessing import CropCache
    from core.data.synthetic import synthesize
    from training import hardware
    from training.data import BalancedBatches, one_hot

    data = Path(args.data)
    if not (data / "synthetic_truth.csv").exists():
        synthesize(data, cells_per_subject=20, seed=0, progress=False)
    manifest, _ = index(data)
    manifest = manifest[manifest["label"].notna()]
    cache = CropCache.build(manifest, data / ".cache", size=args.size, progress=False)
    labels = (manifest["label"] == "all").to_numpy().astype(int)
    rows = np.arange(len(manifest))
    acc = hardware.detect()

    class Fixed(keras.utils.PyDataset):
        def __init__(self, x, y, steps):
            super().__init__()
            self.x, self.y, self.steps, self.batch = x, y, steps, len(y)

        def __len__(self):
            return self.steps

        def __getitem__(self, i):
            return self.x, self.y

    from training.config import preset

    recipe = preset(args.recipe)

    def measure(name: str, policy: str, batch: int, augment: bool = True) -> tuple[float, float]:
        keras.mixed_precision.set_dtype_policy(policy)
        model = create_model(name, args.size, augment=recipe.augment_spec() if augment else None, seed=0,
                             standardize=recipe.cell_standardize)
        model.compile(keras.optimizers.Adam(1e-4), "categorical_crossentropy", metrics=["accuracy"])
        rng = np.random.default_rng(0)
        x = keras.ops.convert_to_tensor(rng.integers(0, 256, (batch, args.size, args.size, 3), dtype=np.uint8))
        y = keras.ops.convert_to_tensor(one_hot(rng.integers(0, 2, batch)))
        fixed = Fixed(x, y, args.steps)
        real = BalancedBatches(cache.array, [rows[labels == c] for c in (0, 1)], per_class=10_000,
                               batch_size=batch, seed=0, workers=2, use_multiprocessing=False, max_queue_size=8)
        real.batch = batch
        _fit_rate(model, Fixed(x, y, args.warmup), args.warmup)  # compile
        _fit_rate(model, real, args.warmup)  # warm the loader path too
        ceiling = _fit_rate(model, fixed, args.steps)
        e2e = _fit_rate(model, real, args.steps)
        return ceiling, e2e

    policy = hardware.precision_policy(args.precision, acc)
    print(f"device: {acc.describe(policy)}; crops {args.size}px from {len(manifest)} cached cells; "
          f"{args.steps} timed steps")
    print(f"recipe {args.recipe}: augmentation and stain layers inside the model, as the trainer runs them")
    print(f"{'model':<16} {'batch':>5} {'ceiling img/s':>14} {'end-to-end img/s':>17} {'ratio':>6} "
          f"{'no-augment ceiling':>19} {'augment share':>14}")
    for name in args.models.split(","):
        batch = args.batch or model_info(name).batch_size
        ceiling, e2e = measure(name, policy, batch)
        bare, _ = measure(name, policy, batch, augment=False)
        print(f"{name:<16} {batch:>5} {ceiling:>14.1f} {e2e:>17.1f} {e2e / ceiling:>6.2f} {bare:>19.1f} "
              f"{1 - ceiling / bare:>14.0%}")
    if args.precision_compare:
        batch = args.batch or model_info("efficientnet_b2").batch_size
        fp32, _ = measure("efficientnet_b2", "float32", batch)
        mixed_policy = hardware.precision_policy("on", acc)
        mixed, _ = measure("efficientnet_b2", mixed_policy, batch)
        print(f"efficientnet_b2 ceiling: float32 {fp32:.1f} img/s, {mixed_policy} {mixed:.1f} img/s, "
              f"ratio {mixed / fp32:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
