"""Pack a labelled C-NMC folder as its crops (lossless PNG, crop rule applied) for a machine the cells must travel to.

    python benchmarks/pack_crops.py data/real --size 128 --out .gpu_real/crops128     # fold 1: ~41 MB, ~2 min

Why: the device machine lent for GPU checks takes at most 64 MiB of files, and fold 1's 3,576 BMP tiles are 2.2 GB.
The crops the trainer would cut from them (the 100/450 margin rule, resized to --size) are exactly what training
reads, so they travel instead, one PNG per cell under `<label>/<original stem>.png` (names keep subject ids and
labels). There, read them with crop margin 0 (`bench_real.py --crop-margin 0`, `RunConfig.crop_margin = 0`): the
pixels are then identical to the local crop cache's. Never commit the output: these are real patients' cells.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data", help="a labelled C-NMC folder (any supported layout)")
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--margin", type=int, default=100, help="crop rule margin of a 450 px tile")
    ap.add_argument("--out", required=True)
    ap.add_argument("--cache-dir", default="cache")
    args = ap.parse_args(argv)

    import numpy as np
    from PIL import Image

    from core.data.dataset import index
    from core.image.preprocessing import CropCache

    if not Path(args.data).is_dir():
        print(f"error: {args.data} is not a folder", file=sys.stderr)
        return 2
    manifest, problems = index(args.data)
    cells = manifest[manifest["label"].notna()].reset_index(drop=True)
    if cells.empty:
        print(f"error: {args.data} holds no labelled cells", file=sys.stderr)
        return 2
    cache = CropCache.build(cells, args.cache_dir, size=args.size, margin=args.margin, progress=False)
    out = Path(args.out)
    total = 0
    for i, row in cells.iterrows():
        if i in cache.failures:
            continue
        target = out / row["label"] / (Path(row["name"]).stem + ".png")
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.asarray(cache.array[i])).save(target, optimize=True)
        total += target.stat().st_size
    print(f"{len(cells) - len(cache.failures)} crops of {args.size} px ({total / 2**20:.1f} MiB) in {out}; "
          f"{len(problems)} files excluded by the indexer, {len(cache.failures)} undecodable")
    return 0


if __name__ == "__main__":
    sys.exit(main())
