"""Benchmark: index + crop cache build vs the seed notebooks' naive single-threaded PIL loop, same cells.

    python benchmarks/bench_cache.py [--cells 3000 | --full] [--workers N] [--file-list PATH]

Generates a replica of the real Kaggle tree (450x450 BMPs, real names) once under --data, pre-reads every
file so both contenders start from a warm page cache, then times in one run:
  naive  : for each file: PIL open -> RGB -> crop -> list; np.stack  (single thread)
  ours   : index() (checks, duplicate detection) + CropCache.build (parallel, memory-mapped)  [cold cache]
  reload : CropCache.build on the same manifest when the cache is valid                      [warm]
and prints img/s and the ratio ours/naive.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from core.data.dataset import index  # noqa: E402
from core.image.preprocessing import CropCache  # noqa: E402
from core.data.synthetic import synthesize  # noqa: E402

FULL = 15114


def naive(paths):
    crops = [np.asarray(Image.open(p).convert("RGB"))[100:350, 100:350] for p in paths]
    return np.stack(crops)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=3000)
    ap.add_argument("--full", action="store_true", help="all 15,114 cells of the real tree (~9 GB)")
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "cnmc_bench_replica"))
    ap.add_argument("--file-list", default=str(Path(__file__).resolve().parents[2] / "shared/cnmc_samples/kaggle_file_list.txt"))
    ap.add_argument("--workers", type=int, default=None)
    args = ap.parse_args()
    cells = FULL if args.full else args.cells
    data = Path(args.data) / f"n{cells}"
    if not (data / "synthetic_truth.csv").exists():
        t = time.perf_counter()
        synthesize(data, replica=min(1.0, cells / FULL), file_list=args.file_list, seed=0, workers=args.workers)
        print(f"generated replica in {time.perf_counter() - t:.1f} s")
    files = sorted(str(p) for p in data.rglob("*.bmp"))
    for p in files:  # warm the page cache for both contenders
        Path(p).read_bytes()
    print(f"cells: {len(files)} (450x450 BMP), workers: {args.workers or 'all cores'}")

    t = time.perf_counter()
    ref = naive(files)
    t_naive = time.perf_counter() - t

    cache_dir = Path(tempfile.mkdtemp(prefix="bench_cache_"))
    try:
        t = time.perf_counter()
        manifest, problems = index(data)
        t_index = time.perf_counter() - t
        t = time.perf_counter()
        cache = CropCache.build(manifest, cache_dir, workers=args.workers, progress=False)
        t_build = time.perf_counter() - t
        t = time.perf_counter()
        again = CropCache.build(manifest, cache_dir, workers=args.workers, progress=False)
        t_reload = time.perf_counter() - t
        assert again.reused
        rows = cache.rows(files)
        assert np.array_equal(np.asarray(cache.array[rows[:50]]), ref[:50]), "cache differs from naive crops"
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)
    n = len(files)
    ours = t_index + t_build
    print(f"naive PIL loop          : {t_naive:7.2f} s  {n / t_naive:8.0f} img/s")
    print(f"ours index              : {t_index:7.2f} s")
    print(f"ours cache build        : {t_build:7.2f} s  {n / t_build:8.0f} img/s")
    print(f"ours index + build      : {ours:7.2f} s  {n / ours:8.0f} img/s")
    print(f"ratio ours/naive        : {t_naive / ours:7.2f}x  (index+build; build alone {t_naive / t_build:.2f}x)")
    print(f"warm reload             : {t_reload * 1000:7.1f} ms  (excluded problems: {len(problems)})")
    print(f"warm reload at {FULL} cells: {reload_at_scale(FULL) * 1000:7.1f} ms  (manifest of the full tree's size, "
          "250-px cache; target < 1 s)")
    return 0


def reload_at_scale(n: int) -> float:
    """Time the reuse path of CropCache for an n-row manifest (the cache file is created sparse, so the
    measurement covers keying, validation and memory-mapping, not the decoding)."""
    import json

    import pandas as pd

    from core.image.preprocessing import cache_key

    manifest = pd.DataFrame({"path": [f"/data/C-NMC_Leukemia/training_data/fold_0/all/UID_{i}_1_1_all.bmp"
                                      for i in range(n)], "size": 608454, "mtime_ns": 1_700_000_000_000_000_000})
    cache_dir = Path(tempfile.mkdtemp(prefix="bench_reload_"))
    try:
        key = cache_key(manifest, 250, 100)
        np.lib.format.open_memmap(cache_dir / f"crops-{key}.npy", mode="w+", dtype=np.uint8, shape=(n, 250, 250, 3))
        (cache_dir / f"crops-{key}.json").write_text(json.dumps({"failures": {}}))
        t = time.perf_counter()
        cache = CropCache.build(manifest, cache_dir, progress=False)
        elapsed = time.perf_counter() - t
        assert cache.reused and cache.array.shape[0] == n
        return elapsed
    finally:
        shutil.rmtree(cache_dir, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
