"""Benchmark: smear-field segmentation, quality on generated fields with known white cells and speed on a full-size
(2592×1944) field, in one run.

    python benchmarks/bench_segment.py [--fields 20] [--repeats 3] [--bccd data/bccd/BCCD]

With --bccd: real smear fields of the public BCCD dataset (github.com/Shenggan/BCCD_Dataset: 364 JPEG fields,
640×480, white cells boxed by hand; get it with `git archive` of that repository into a git-ignored folder) are
scored the same way: a white-cell box is found when a found cell's box centre lies inside it; boxes touching the
image border count as cut (they should be dropped, and are left out of both shares).

Quality: over --fields generated fields (`core.smear.synthetic_fields`: red cells, platelets, white cells of varied
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


def bccd(root: Path) -> str:
    """Found share and not-white-cell share on BCCD's hand-boxed real fields."""
    import xml.etree.ElementTree as ET

    from PIL import Image

    from core.smear.segmentation import segment_field

    true = hits = found = extra_cut = images = 0
    for xml in sorted((root / "Annotations").glob("*.xml")):
        jpg = root / "JPEGImages" / (xml.stem + ".jpg")
        if not jpg.exists():
            continue
        img = np.asarray(Image.open(jpg).convert("RGB"))
        h, w = img.shape[:2]
        boxes, cut = [], []
        for obj in ET.parse(xml).getroot().iter("object"):
            if obj.findtext("name") != "WBC":
                continue
            b = obj.find("bndbox")
            x0, y0, x1, y1 = (int(float(b.findtext(k))) for k in ("xmin", "ymin", "xmax", "ymax"))
            (cut if x0 <= 2 or y0 <= 2 or x1 >= w - 3 or y1 >= h - 3 else boxes).append((x0, y0, x1, y1))
        images += 1
        centres = [((c.box[0] + c.box[2]) / 2, (c.box[1] + c.box[3]) / 2) for c in segment_field(img).cells]
        used: set[int] = set()
        for x0, y0, x1, y1 in boxes:
            for i, (cx, cy) in enumerate(centres):
                if i not in used and x0 <= cx <= x1 and y0 <= cy <= y1:
                    used.add(i)
                    hits += 1
                    break
        on_cut = {i for i, (cx, cy) in enumerate(centres) if i not in used
                  and any(x0 <= cx <= x1 and y0 <= cy <= y1 for x0, y0, x1, y1 in cut)}
        extra_cut += len(on_cut)
        true += len(boxes)
        found += len(centres) - len(on_cut)
    return (f"BCCD real fields: {images} images, {true} white cells not cut by the border, found share "
            f"{hits / max(1, true):.3f}, not-white-cell share of found {(found - hits) / max(1, found):.3f} "
            f"({found} found; {extra_cut} more on border-cut cells)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fields", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bccd", default=None, help="BCCD dataset folder (Annotations/, JPEGImages/)")
    args = ap.parse_args(argv)

    from skimage import filters

    from core.smear.segmentation import segment_field
    from core.smear.synthetic_fields import match, synth_field

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

    if args.bccd:
        print(bccd(Path(args.bccd)))

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
