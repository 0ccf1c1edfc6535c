"""Benchmark: smear-field segmentation, quality on generated fields with known white cells and speed on a full-size
(2592×1944) field, in one run.

    python benchmarks/bench_segment.py [--fields 20] [--repeats 3]

Quality: over --fields generated fields (`core.synthetic_fields`: red cells, platelets, white cells of varied
size, touching pairs, cells cut by the border), the share of white cells found (target >= 0.90) and the share of
found objects that are not white cells (target <= 0.10); touching pairs split; border cells dropped.
Speed: `segment_field` on a 2592×1944 field (C-NMC's camera frame, red cells 58 px across) beside the floor of
merely converting that field to grey levels and thresholding it once (the least any segmentation does), as a ratio
and the absolute time (target <= 2 s on 2 cores).
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)

    from skimage import filters

    from core.segmentation import segment_field
    from core.synthetic_fields import match, synth_field

    totals = {"true": 0, "found": 0, "hits": 0}
    pairs_split = pairs = 0
    for seed in range(args.fields):
        rng = np.random.default_rng(seed)
        img, truth = synth_field(seed=seed, wbc=int(rng.integers(2, 8)), touching_pairs=int(rng.integers(0, 3)),
                                 border_cells=int(rng.integers(0, 3)), rbc=int(rng.integers(20, 60)),
                                 platelets=int(rng.integers(0, 20)), rbc_px=float(rng.uniform(30, 50)))
        m = match([c.box for c in segment_field(img).cells], truth)
        for k in totals:
            totals[k] += m[k]
    for seed in range(10):  # touching pairs alone
        img, truth = synth_field(seed=100 + seed, wbc=0, rbc=15, touching_pairs=1, border_cells=0, platelets=0)
        pairs += 1
        pairs_split += match([c.box for c in segment_field(img).cells], truth)["hits"] == 2
    recall = totals["hits"] / totals["true"]
    false = (totals["found"] - totals["hits"]) / max(1, totals["found"])
    print(f"quality on {args.fields} generated fields: {totals['true']} white cells, {totals['found']} found, "
          f"found share {recall:.3f} (target >= 0.90), not-white-cell share of found {false:.3f} (target <= 0.10); "
          f"touching pairs split {pairs_split}/{pairs}")

    big, _ = synth_field(height=1944, width=2592, wbc=12, rbc=400, platelets=60, touching_pairs=2, border_cells=2,
                         rbc_px=58.0, seed=7)
    segment_field(big)  # warm-up (imports)
    t_seg, t_floor = [], []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        r = segment_field(big)
        t_seg.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        grey = big.mean(-1)
        _ = grey < filters.threshold_otsu(grey)
        t_floor.append(time.perf_counter() - t0)
    seg, floor = min(t_seg), min(t_floor)
    print(f"2592x1944 field: {len(r.cells)} white cells in {seg:.2f} s (target <= 2 s on 2 cores); "
          f"one grey-level threshold of the same field {floor:.3f} s; ratio {seg / floor:.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
