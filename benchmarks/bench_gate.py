"""Benchmark: what the out-of-distribution gate refuses, on real cells of unseen patients and on non-cells.

    python benchmarks/bench_gate.py data/real [--model starter] [--non-cells 120]

1. Real cells, leave-subjects-out (`core.data.splits.subject_folds`): the image-level gate is fitted on the training
   folds' cells and applied to the held-out patients' cells: the share of real cells of unseen patients that
   would be "not assessed" (target <= 5%), per fold, pooled and by reason.
2. A varied set of images that are not single segmented C-NMC cells, generated here (blank, white and grey
   pages, noise, photo-like gradients and scenes, plots and text like screenshots, smear-like fields with white
   and red cells at several sizes, several real cells on one black image, a real cell cut by the border, tiny,
   huge and oddly coloured objects): the share refused (target >= 95%) by the gate fitted on all cells, by reason,
   and with `--model` (a model folder or `starter`) the full gate, feature novelty included.
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def _disk(img, cy, cx, r, colour):
    yy, xx = np.ogrid[:img.shape[0], :img.shape[1]]
    img[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour
    return img


def _figure(kind: str, seed: int) -> np.ndarray:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    fig, ax = plt.subplots(figsize=(4 + seed % 3, 3 + seed % 2), dpi=80)
    if kind == "plot":
        for _ in range(3):
            ax.plot(np.cumsum(rng.normal(size=50)))
        ax.set_title("training curves")
    elif kind == "bars":
        ax.bar(range(6), rng.uniform(1, 5, 6), color=["tab:purple", "tab:blue"] * 3)
    else:
        ax.axis("off")
        ax.text(0.02, 0.5, "Classify cells\nUpload one or many cells\nResearch use only", fontsize=14)
    fig.canvas.draw()
    img = np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()
    plt.close(fig)
    return img


def non_cells(real: list[np.ndarray], n: int, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    """A varied set of `n` images that a model of segmented C-NMC cells must not judge."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, np.ndarray]] = []
    kinds = ["blank", "white", "grey", "noise", "gradient", "scene", "plot", "bars", "text", "field", "field_dense",
             "several_cells", "cut_cell", "tiny", "huge", "green", "blue_cell"]
    for i in range(n):
        kind = kinds[i % len(kinds)]
        h, w = int(rng.integers(300, 900)), int(rng.integers(300, 900))
        if kind == "blank":
            img = np.zeros((h, w, 3), np.uint8)
        elif kind == "white":
            img = np.full((h, w, 3), 255, np.uint8)
        elif kind == "grey":
            img = np.full((h, w, 3), int(rng.integers(60, 200)), np.uint8)
        elif kind == "noise":
            img = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
        elif kind == "gradient":
            t = np.linspace(0, 1, w)[None, :, None]
            a, b = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
            img = np.broadcast_to(a * (1 - t) + b * t, (h, w, 3)).astype(np.uint8)
        elif kind == "scene":  # sky over ground with a sun: a photo-like landscape
            img = np.zeros((h, w, 3), np.uint8)
            img[: h // 2] = np.linspace([90, 140, 230], [200, 220, 250], h // 2)[:, None].astype(np.uint8)
            img[h // 2:] = (np.array([60, 120, 40]) + rng.normal(0, 12, (h - h // 2, w, 3))).clip(0, 255)
            _disk(img, h // 5, int(w * 0.7), h // 10, (250, 230, 120))
        elif kind in ("plot", "bars", "text"):
            img = _figure(kind, i)
        elif kind.startswith("field"):
            img = np.full((h, w, 3), rng.integers(200, 240, 3), np.uint8)
            for _ in range(int(rng.integers(40, 90))):  # red cells
                _disk(img, rng.integers(0, h), rng.integers(0, w), int(rng.integers(12, 20)), (200, 110, 130))
            for _ in range(int(rng.integers(3, 9 if kind == "field" else 15))):  # white cells
                _disk(img, rng.integers(30, h - 30), rng.integers(30, w - 30), int(rng.integers(18, 30)), (110, 50, 150))
            img = (img + rng.normal(0, 4, img.shape)).clip(0, 255).astype(np.uint8)
        elif kind == "several_cells":
            img = np.zeros((450, 450, 3), np.uint8)
            for y, x in ((112, 112), (112, 337), (337, 225))[: int(rng.integers(2, 4))]:
                c = real[int(rng.integers(len(real)))][100:350:2, 100:350:2]
                img[y - 62:y + 63, x - 62:x + 63] = c
        elif kind == "cut_cell":
            c = real[int(rng.integers(len(real)))]
            shift = int(rng.integers(170, 230))
            img = np.zeros_like(c)
            img[:, : c.shape[1] - shift] = c[:, shift:]
        elif kind == "tiny":
            img = _disk(np.zeros((450, 450, 3), np.uint8), 225, 225, int(rng.integers(5, 20)), (80, 35, 95))
        elif kind == "huge":
            img = _disk(np.zeros((450, 450, 3), np.uint8), 225, 225, int(rng.integers(200, 215)), (80, 35, 95))
        elif kind == "green":
            img = _disk(np.zeros((450, 450, 3), np.uint8), 225, 225, 90, (40, int(rng.integers(150, 230)), 60))
        else:  # a blue-stained cell: right shape, wrong stain
            img = _disk(np.zeros((450, 450, 3), np.uint8), 225, 225, 95, (30, 60, int(rng.integers(170, 240))))
        out.append((kind, np.ascontiguousarray(img)))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("data")
    ap.add_argument("--model", default=None, help="starter or a model folder: also apply its feature novelty")
    ap.add_argument("--non-cells", type=int, default=170)
    ap.add_argument("--fit-cells", type=int, default=600, help="training cells the image gate is fitted on")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    from core.data.dataset import index
    from core.decide.gate import REASONS, ImageGate
    from core.data.imageio import read_image
    from core.data.splits import subject_folds

    manifest, _ = index(args.data)
    try:
        folds = subject_folds(manifest, 3)
    except ValueError as exc:
        print(f"error: {args.data}: {exc}", file=sys.stderr)
        return 2
    rng = np.random.default_rng(args.seed)
    paths, fold = folds["path"].to_numpy(), folds["fold"].to_numpy()
    print(f"1. real cells of unseen patients ({len(folds)} cells, {folds['subject'].nunique()} subjects, "
          f"{folds.attrs['n_folds']} leave-subjects-out folds; image gate fitted on {args.fit_cells} training cells)")
    total, refused, reasons = 0, 0, Counter()
    for k in range(folds.attrs["n_folds"]):
        train = paths[fold != k]
        pick = rng.choice(train, min(args.fit_cells, len(train)), replace=False)
        gate = ImageGate.fit([read_image(p) for p in pick])
        got = [gate.check(read_image(p)) for p in paths[fold == k]]
        bad = [r for r in got if r]
        total, refused = total + len(got), refused + len(bad)
        reasons.update(bad)
        subjects = ", ".join(sorted(folds.loc[fold == k, "subject"].unique()))
        print(f"   fold {k} ({subjects}): {len(bad)}/{len(got)} not assessed ({len(bad) / len(got):.1%})")
    print(f"   pooled: {refused}/{total} real cells not assessed ({refused / total:.2%}; target <= 5%); "
          f"reasons: {dict(reasons)}")

    pick = rng.choice(paths, min(args.fit_cells, len(paths)), replace=False)
    real = [read_image(p) for p in pick]
    gate = ImageGate.fit(real)
    images = non_cells(real, args.non_cells, args.seed)
    got = [gate.check(img) for _, img in images]
    by_kind: dict[str, list] = {}
    for (kind, _), r in zip(images, got):
        by_kind.setdefault(kind, []).append(r)
    n_ref = sum(r is not None for r in got)
    print(f"2. {len(images)} generated non-cells: image gate refuses {n_ref} ({n_ref / len(images):.1%}; "
          "target >= 95%)")
    for kind, rs in by_kind.items():
        c = Counter(REASONS[r] if r else "PASSED" for r in rs)
        print(f"   {kind:<14} {sum(r is not None for r in rs)}/{len(rs)} refused: {dict(c)}")
    if args.model:
        from core.decide.gate import feature_model, features_and_probs
        from core.decide.model_folder import load_model_folder
        from core.image.preprocessing import crop_cell

        mf = load_model_folder(args.model)
        if mf.gate is None or mf.gate.novelty is None:
            print(f"   {args.model} has no feature-novelty gate")
            return 0
        passed = [img for (_, img), r in zip(images, got) if r is None]
        full = [mf.gate.image.check(img) for _, img in images]
        if passed:
            crops = np.stack([crop_cell(img, mf.size) for img in passed])
            feats, _ = features_and_probs(feature_model(mf.model), crops)
            novel = mf.gate.novelty.novel(feats)
            print(f"   of the {len(passed)} that pass the image checks, feature novelty of {args.model} refuses "
                  f"{int(novel.sum())}")
        n_full = sum(r is not None for r in full)
        print(f"   {args.model}'s own gate (image checks fitted on all its training cells): refuses "
              f"{n_full}/{len(images)} by image checks alone")
    return 0


if __name__ == "__main__":
    sys.exit(main())
