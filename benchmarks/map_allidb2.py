"""Benchmark: where the ALL-IDB2 crops come from among the even ALL-IDB1 photos, with a sanity check.

    python benchmarks/map_allidb2.py DATA [--workers 2] [--rebuild] [--scale-check 0]

DATA is the ALL-IDB folder at any level (e.g. data/allidb). Runs (or reuses) `core.smear.allidb.crop_map`, cached in
`ALL_IDB2/crop_to_photo.csv`, and prints: how many crops were found in an even photo and how many in none
(presumably cut from a reserved odd photo, which is not here), whether each found crop's Y agrees with its
photo's Y, the score distributions, and how far each found crop's centre lies from the nearest annotated
centroid (blast centroids for Y=1 crops, ALL-IDB-Patches "other" centroids for Y=0 crops). Only even photos are
read. --scale-check N rescales the first N crops found nowhere by 0.5…2 and looks for them again, to rule out crops
taken from an even photo at another magnification.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def nearest(points: np.ndarray, x: float, y: float) -> float:
    if len(points) == 0:
        return float("inf")
    return float(np.min(np.hypot(points[:, 0] - x, points[:, 1] - y)))


def quantiles(s: pd.Series) -> str:
    if s.dropna().empty:
        return "none"
    q = s.dropna().quantile([0, 0.05, 0.5, 0.95, 1]).to_numpy()
    return f"n={s.notna().sum()} min {q[0]:.4f}  p5 {q[1]:.4f}  median {q[2]:.4f}  p95 {q[3]:.4f}  max {q[4]:.4f}"


def scale_check(table: pd.DataFrame, crops: dict[str, Path], photos: list[Path], n: int, workers: int) -> None:
    """Best NCC of rescaled unfound crops in the even photos: a high score would mean another magnification."""
    from PIL import Image

    from core.smear.allidb import map_crops_to_photos

    unfound = table[table["status"] == "none"]["crop"].head(n).tolist()
    if not unfound:
        return
    with tempfile.TemporaryDirectory() as tmp:
        for s in (0.5, 0.667, 0.8, 1.25, 1.5, 2.0):
            paths = []
            for c in unfound:
                with Image.open(crops[c]) as im:
                    im = im.convert("RGB")
                    out = Path(tmp) / f"{c}_{s}.png"
                    im.resize((round(im.width * s), round(im.height * s)), Image.LANCZOS).save(out)
                    paths.append(out)
            t = map_crops_to_photos(paths, photos, workers=workers)
            print(f"  scale {s:5.3f}: {len(unfound)} crops found nowhere at scale 1: best grey score "
                  f"{t['score'].max():.4f}, best detail {t['detail'].max():.4f}, "
                  f"copies {(t['status'] == 'copy').sum()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", type=Path)
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--rebuild", action="store_true", help="ignore the cached mapping")
    ap.add_argument("--near", type=float, default=40.0, help="centre-to-centroid distance counted as a hit (px)")
    ap.add_argument("--scale-check", type=int, default=0, metavar="N")
    args = ap.parse_args()

    from PIL import Image

    from core.smear.allidb import CACHE_NAME, allidb2_crops, centroids, crop_map, find_root, parse_name, read_allidb1

    def parse_label(stem: str) -> str:
        return parse_name(stem).label

    root = find_root(args.data)
    idb1 = read_allidb1(root)
    photos = idb1.photos
    print(f"ALL-IDB at {root}: {len(photos)} even photos "
          f"({(photos['label'] == 'all').sum()} Y=1, {(photos['label'] == 'hem').sum()} Y=0), "
          f"{len(idb1.problems)} problems")
    for _, p in idb1.problems.iterrows():
        print(f"  problem: {p['path']}: {p['reason']}")
    crop_files = allidb2_crops(root)
    sizes = []
    for p in crop_files:
        with Image.open(p) as im:
            sizes.append(f"{im.width}x{im.height}")
    print(f"{len(crop_files)} ALL-IDB2 crops; sizes: "
          + ", ".join(f"{k}: {v}" for k, v in pd.Series(sizes).value_counts().items()))

    cache = crop_files[0].parent.parent / CACHE_NAME
    before = cache.stat().st_mtime_ns if cache.is_file() else None
    t0 = time.perf_counter()
    table = crop_map(root, workers=args.workers, rebuild=args.rebuild)
    built = not cache.is_file() or cache.stat().st_mtime_ns != before
    print(f"mapping: {time.perf_counter() - t0:.1f} s ({'built' if built else 'cached'}), cache {cache}")

    found = table[table["status"] == "copy"]
    same = table[table["status"] == "same field"]
    none = table[table["status"] == "none"]
    print()
    for name, sub in (("copied from an even photo (usable)", found),
                      ("same field as an even photo, another shot (not usable)", same),
                      ("found in none (presumably from reserved odd photos)", none)):
        print(f"{name}: {len(sub)} of {len(table)}  "
              f"(Y=1 {(sub['label'] == 'all').sum()}, Y=0 {(sub['label'] == 'hem').sum()})")
    if len(same):
        print("  same field: " + ", ".join(f"{c} ~ {p}" for c, p in zip(same["crop"], same["candidate"])))
    photo_label = dict(zip(photos["photo"], photos["label"]))
    disagree = found[[photo_label[p] != lab for p, lab in zip(found["photo"], found["label"])]]
    print(f"copied crops whose Y disagrees with their photo's Y: {len(disagree)}")
    dup = found[found.duplicated(["photo", "x", "y"], keep=False)]
    print(f"identical twins (duplicate_of set): {found['duplicate_of'].notna().sum()}")
    print(f"photos giving copied crops: {found['photo'].nunique()} of {len(photos)}; crops at the same photo and "
          f"position: {len(dup)}" + (f" ({', '.join(dup['crop'])})" if len(dup) else ""))
    distinct = int((table["usable"] & table["duplicate_of"].isna()).sum())
    print(f"usable crops: {int(table['usable'].sum())}, distinct: {distinct}")
    print(f"copied crops cut by the photo border: {((found['width'] < 257) | (found['height'] < 257)).sum()}")

    print("\nNCC at full resolution: score = grey levels, detail = band-passed (decides), runner_up = best detail "
          "in another photo")
    for name, sub in (("copy", found), ("same field", same), ("none", none)):
        print(f"  {name:10s} score:     {quantiles(sub['score'])}")
        print(f"  {name:10s} detail:    {quantiles(sub['detail'])}")
    print(f"  copy       runner_up: {quantiles(found['runner_up'])}")
    edges = [-1, 0.2, 0.4, 0.6, 0.8, 0.9, 0.95, 0.99, 0.993, 0.999, 1.0001]
    for col in ("score", "detail"):
        hist = pd.cut(table[col], edges, right=False).value_counts().sort_index()
        print(f"  all crops, {col:6s}: " + ", ".join(f"[{i.left:g},{min(i.right, 1):g}): {v}"
                                                  for i, v in hist.items() if v))

    print(f"\ncrop centre vs annotated centroids (hit: within {args.near:g} px)")
    marks = {p: centroids(root, p) for p in found["photo"].unique()}
    for label, kind, what in (("all", "blasts", "blast"), ("hem", "others", "other")):
        sub = found[found["label"] == label]
        d = np.array([nearest(marks[p][kind], x, y) for p, x, y in zip(sub["photo"], sub["cx"], sub["cy"])])
        if len(d) == 0:
            continue
        print(f"  Y={1 if label == 'all' else 0} crops to the nearest {what} centroid (0-based): "
              f"{int((d <= args.near).sum())} of {len(d)} within {args.near:g} px; median {np.median(d):.1f} px, "
              f"max {np.max(d):.1f} px")
        far = sub[d > args.near]
        if len(far):
            print("    farther: " + ", ".join(f"{c} ({p}, {dd:.0f} px)" for c, p, dd in
                                           zip(far["crop"], far["photo"], d[d > args.near])))
        cut = (sub["width"] < 257) | (sub["height"] < 257)
        if cut.any():
            print(f"    crops cut by the photo border: " + ", ".join(
                f"{c} {w}x{h} ({dd:.0f} px)" for c, w, h, dd in
                zip(sub["crop"][cut], sub["width"][cut], sub["height"][cut], d[cut.to_numpy()])))
    blast_near_hem = sum(nearest(marks[p]["blasts"], x, y) <= args.near
                         for p, x, y in zip(found["photo"], found["cx"], found["cy"])
                         if p in marks and parse_label(p) == "hem")
    print(f"  Y=0 crops within {args.near:g} px of a blast centroid: {blast_near_hem}")

    if args.scale_check:
        print("\nscale check of unfound crops")
        scale_check(table, {p.stem: p for p in crop_files}, [Path(p) for p in photos["path"]], args.scale_check,
                    args.workers or 2)


if __name__ == "__main__":
    main()
