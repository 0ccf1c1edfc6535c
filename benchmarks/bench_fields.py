"""Benchmark: smear photos of three labs to a photo call, per lab, in one run: the product by cross-validation
over photos, the product with that lab left out, a lab teaching it k of its photos, and a plain whole-photo
baseline; then the speed of a 224-px photo and a 2592x1944 field.

    python benchmarks/bench_fields.py --allidb data/allidb --aria data/aria --bccd data/bccd \
        [--folds 5] [--cache cache] [--out runs/bench_fields] [--curve 10,25,50,100] [--repeats 3] [--model smear]

Data (each only from the repository its issue names; see docs/smear-fields.md):
- ALL-IDB1 even-numbered photos (Labati, Piuri, Scotti, ICIP 2011): blast centres per cell;
- Aria et al.'s photos (Ghaderzadeh et al., Int J Intell Syst 2022), even-numbered only: labelled per photo
  (Benign, Normal -> no blasts; Early, Pre, Pro -> blasts). **No patient ids: every split of it mixes patients**
  (89 patients, about 36 photos each), so its cross-validated figures overstate new patients;
- BCCD (Shenggan/BCCD_Dataset): normal donors; every photo no blasts.

Methods:
- **product**: `core.smear.segmentation` + the smear network (frozen ImageNet Lite0 on each cell on black and in its
  context; projection + multiple-instance head; gate; field rule fitted on out-of-fold cell scores), 5-fold
  cross-validation by photo over the three labs together (nested field rule);
- **lab left out**: the same trained on the two other labs only, judging every photo of the left-out lab;
- **lab teaches it k photos**: the left-out model's head refitted on its training cells plus k photos of the lab
  (stratified by label, `--repeats` draws), judging the lab's other photos (the refit of `smear-model --base`:
  the field rule refitted on the taught photos' out-of-fold calls, two folds of them; the gate: the other labs' Gaussians or one of the taught cells, whose threshold is
  the median of theirs, as k photos are too few to cross-validate one);
- **plain whole-photo baseline**: frozen ImageNet Lite0 features of the whole photo (224 px) + logistic
  regression, the same folds; it judges every photo (no gate, no cells).

Figures per lab: photos judged, the field call's balanced accuracy over judged photos (one class: its accuracy),
blasts photos called `blasts`, no-blasts photos called `blasts`; for ALL-IDB also the cell figures on annotated
cells. Speed: segmentation + network, median of 5, on this machine (2 cores).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402


def _say(*a) -> None:
    print(*a, flush=True)


def product(cs, folds: int) -> tuple[dict, object]:
    from training.smear_model import fit_smear, lab_figures

    fit = fit_smear(cs, folds, progress=_say)
    return lab_figures(fit.oof, cs.photos), fit


def left_out(cs, lab: str, folds: int):
    """(figures on the lab, the fit on the other labs)."""
    from training.smear_model import figures_with_rule, cell_figures, fit_smear

    mine = cs.photos[cs.photos["lab"] == lab]
    fit = fit_smear(cs.photo_subset(cs.photos.loc[cs.photos["lab"] != lab, "photo"]), folds)
    target = cs.photo_subset(mine["photo"])
    scored = fit.score(target)
    figs = figures_with_rule(scored, mine, *fit.field_rule)[lab]
    if int(mine["blasts"].fillna(0).sum()):
        figs.update({f"cell_{k}": v for k, v in cell_figures(scored).items()})
    return figs, fit


def _sample(photos: pd.DataFrame, k: int, rng) -> list[str]:
    """k photos, each label in proportion (at least one of each where the lab has both)."""
    out = []
    labels = photos["label"].unique()
    for i, label in enumerate(labels):
        pool = photos.loc[photos["label"] == label, "photo"].to_numpy()
        n = k - len(out) if i == len(labels) - 1 else max(1, round(k * len(pool) / len(photos)))
        out += list(rng.choice(pool, min(n, len(pool)), replace=False))
    return out


def adaptation_curve(cs, lab: str, fit, ks: list[int], repeats: int, seed: int = 0) -> list[dict]:
    """The left-out model taught k of the lab's photos, scored on the lab's other photos."""
    from training.smear_model import ZSet, figures_with_rule, fit_mil, novelty_distance

    mine = cs.photos[cs.photos["lab"] == lab]
    keep = fit.target >= 0
    base = ZSet(fit.zs.view0()[keep], np.arange(int(keep.sum())), np.zeros(int(keep.sum()), int),
                fit.zs.table[keep].assign(label=np.where(fit.target[keep] == 1, "all", "hem")).reset_index(drop=True))
    rows = []
    for k in ks:
        if k > len(mine) - 10:
            continue
        figs = []
        for r in range(repeats):
            rng = np.random.default_rng(seed + r)
            teach = _sample(mine, k, rng)
            test = mine[~mine["photo"].isin(teach)]
            zs = ZSet.concat([base, ZSet.of(cs.photo_subset(teach), fit.proj)])
            lr, _ = fit_mil(zs.z, zs.row_cell, zs.table, row_view=zs.row_view)
            rule = _taught_rule(cs, base, fit, mine[mine["photo"].isin(teach)]) or fit.field_rule
            rest = cs.photo_subset(test["photo"])
            z = fit.proj.pool(rest.view0())
            taught = fit.proj.pool(cs.photo_subset(teach).view0())
            # the gate: the other labs' Gaussians, or one of the taught cells whose threshold is the median of
            # theirs (too few photos here to cross-validate a threshold of its own)
            yardstick = float(np.median([c["threshold"] for c in fit.gate.novelty.components]))
            nov = np.minimum(fit.gate.novelty.score(z), novelty_distance(taught, z) / yardstick)
            p = lr.probs(z)
            scored = rest.table.assign(p=p, novelty=nov, judged=nov <= 1.0,
                                       prediction=np.where(p >= 0.5, "all", "hem"))
            figs.append(figures_with_rule(scored, test, *rule)[lab])
        rows.append({"lab": lab, "k": k, "repeats": repeats, "test_photos": int(len(mine) - k),
                     "balanced_accuracy": float(np.nanmean([f["balanced_accuracy"] for f in figs])),
                     "balanced_accuracy_min": float(np.nanmin([f["balanced_accuracy"] for f in figs])),
                     "judged_share": float(np.mean([f["judged_share"] for f in figs]))})
        _say(f"  {lab} taught {k} photos: balanced accuracy {rows[-1]['balanced_accuracy']:.3f} "
             f"(worst draw {rows[-1]['balanced_accuracy_min']:.3f}), judged {rows[-1]['judged_share']:.1%}")
    return rows


def _taught_rule(cs, base, fit, taught: pd.DataFrame):
    """The field rule refitted on the taught photos' out-of-fold calls (two folds of them, each scored by a head
    fitted on the base's cells and the other fold), as `smear-model --base` refits it; None when the taught photos
    hold one kind of photo only (the base's rule stays)."""
    from training.smear_model import ZSet, fit_field_rule, fit_mil

    if taught["label"].nunique() < 2 or len(taught) < 4:
        return None
    rows = []
    order = taught.sample(frac=1.0, random_state=0)
    halves = [order.iloc[::2], order.iloc[1::2]]
    for a, b in ((0, 1), (1, 0)):
        zs = ZSet.concat([base, ZSet.of(cs.photo_subset(halves[a]["photo"]), fit.proj)])
        head, _ = fit_mil(zs.z, zs.row_cell, zs.table, row_view=zs.row_view)
        other = cs.photo_subset(halves[b]["photo"])
        z = fit.proj.pool(other.view0())
        # every cell counted as judged: the curve's gate (the base's Gaussians or the taught cells') judges 99%
        rows.append(other.table.assign(p=head.probs(z), judged=True))
    return fit_field_rule(pd.concat(rows, ignore_index=True), taught)


def whole_photo_features(photos: pd.DataFrame, cache: Path) -> np.ndarray:
    """Frozen ImageNet Lite0 features of each whole photo at 224 px (cached)."""
    import hashlib

    from PIL import Image

    from core.data.imageio import read_image
    from core.nets.pretrained import imagenet_backbone

    key = hashlib.sha256("".join(photos["path"]).encode()).hexdigest()[:12]
    path = cache / f"whole-photo-lite0-{key}.npy"
    if path.exists():
        return np.load(path)
    net = imagenet_backbone(include_top=False)
    x = np.stack([np.asarray(Image.fromarray(read_image(p)).resize((224, 224), Image.Resampling.BILINEAR))
                  for p in photos["path"]])
    f = np.concatenate([np.asarray(net.predict_on_batch(x[s:s + 64])) for s in range(0, len(x), 64)])
    cache.mkdir(parents=True, exist_ok=True)
    np.save(path, f)
    return f


def plain_baseline(photos: pd.DataFrame, folds: int, cache: Path) -> dict:
    from sklearn.linear_model import LogisticRegression

    from training.smear_model import call_figures, photo_folds

    f = whole_photo_features(photos, cache)
    y = (photos["label"] == "blasts").to_numpy().astype(int)
    fold = photos["photo"].map(photo_folds(photos, folds)).to_numpy()
    p = np.zeros(len(y))
    for k in range(folds):
        tr, te = fold != k, fold == k
        p[te] = LogisticRegression(C=0.1, class_weight="balanced", max_iter=5000).fit(f[tr], y[tr]).predict_proba(
            f[te])[:, 1]
    calls = pd.Series(np.where(p >= 0.5, "blasts", "no blasts"), index=photos["photo"])
    return call_figures(calls, photos)


def speed(photos: pd.DataFrame, model_ref: str, n: int = 5) -> dict:
    """Segmentation + network (`core.smear.fields.classify_field`, as Classify and `predict` run it) on a 224-px Aria
    photo and on a 2592x1944 ALL-IDB photo: median seconds of `n` runs after a warm-up."""
    from core.smear.fields import classify_field
    from core.data.imageio import read_image
    from core.decide.model_folder import load_model_folder

    mf = load_model_folder(model_ref)
    out = {}
    for what, pick in (("224 px (Aria)", photos[photos["lab"] == "aria"]),
                       ("2592x1944 (ALL-IDB1)", photos[photos["lab"] == "allidb"])):
        if pick.empty:
            continue
        imgs = [read_image(p) for p in pick["path"]]
        if what.startswith("2592"):
            imgs = [i for i in imgs if i.shape[1] == 2592][:n] or imgs[:n]
        else:
            imgs = imgs[:n]
        classify_field(mf.models, imgs[0], "warm-up", mf.size, mf.rule, mf.gate, mf.crop_margin)
        times, cells = [], []
        for i, img in enumerate(imgs):
            t0 = time.perf_counter()
            fc = classify_field(mf.models, img, f"photo{i}", mf.size, mf.rule, mf.gate, mf.crop_margin)
            times.append(time.perf_counter() - t0)
            cells.append(len(fc.table))
        out[what] = {"seconds_median": float(np.median(times)), "seconds_max": float(np.max(times)),
                     "photos": len(times), "cells_median": float(np.median(cells)),
                     "shape": f"{imgs[0].shape[1]}x{imgs[0].shape[0]}"}
        _say(f"speed {what}: median {out[what]['seconds_median']:.2f} s (max {out[what]['seconds_max']:.2f} s, "
             f"{out[what]['cells_median']:.0f} cells)")
    return out


def _row(method: str, lab: str, f: dict) -> dict:
    return {"method": method, "lab": lab, "photos": f["photos"], "judged": f["judged_share"],
            "balanced_accuracy": f["balanced_accuracy"], "blasts_called_blasts": f["blasts_photos_called_blasts"],
            "no_blasts_called_blasts": f["no_blasts_photos_called_blasts"],
            "cell_sens": f.get("cell_sensitivity"), "cell_spec": f.get("cell_specificity"),
            "cell_auc": f.get("cell_roc_auc"), "blasts_found": f.get("blasts_found_one_to_one")}


def main(argv: list[str] | None = None) -> int:
    from training.config import RunConfig

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--allidb", default=None)
    ap.add_argument("--aria", default=None)
    ap.add_argument("--bccd", default=None)
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--cache", default=RunConfig().cache_dir, help="where cells' features are cached")
    ap.add_argument("--out", default="runs/bench_fields")
    ap.add_argument("--curve", default="10,25,50,100", help="k photos a left-out lab teaches it")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--model", default="smear", help="the model folder timed for speed")
    ap.add_argument("--skip", default="", help="comma-separated parts to skip: left-out, curve, plain, speed")
    args = ap.parse_args(argv)
    skip = set(filter(None, args.skip.split(",")))

    from core.smear.labs import read_labs
    from training.smear import collect_cells

    photos = read_labs(args.allidb, args.aria, args.bccd)
    if photos.empty:
        ap.error("give at least one lab (--allidb, --aria, --bccd)")
    t0 = time.time()
    cs = collect_cells(photos, args.cache, progress=_say)
    _say(f"{len(cs.photos)} photos, {len(cs.table)} cells ({time.time() - t0:.0f} s to segment and read them, "
         "or to load them from the cache)")
    rows, result = [], {"labs": sorted(photos["lab"].unique())}
    figs, _ = product(cs, args.folds)
    result["product"] = figs
    rows += [_row("product (CV by photo)", lab, f) for lab, f in figs.items()]
    curve = []
    labs = list(photos["lab"].unique())
    if len(labs) > 1 and "left-out" not in skip:
        result["left_out"] = {}
        for lab in labs:
            f, fit = left_out(cs, lab, args.folds)
            result["left_out"][lab] = f
            rows.append(_row("lab left out", lab, f))
            if "curve" not in skip:
                curve += adaptation_curve(cs, lab, fit, [int(k) for k in args.curve.split(",")], args.repeats)
        result["adaptation_curve"] = curve
    if "plain" not in skip:
        figs = plain_baseline(photos, args.folds, Path(args.cache))
        result["plain"] = figs
        rows += [_row("plain whole-photo baseline", lab, f) for lab, f in figs.items()]
    if "speed" not in skip:
        result["speed"] = speed(photos, args.model)
    table = pd.DataFrame(rows)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_fields.json").write_text(json.dumps(result, indent=2, default=float))
    table.to_csv(out / "bench_fields.csv", index=False)
    if curve:
        pd.DataFrame(curve).to_csv(out / "adaptation_curve.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        _say(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        if curve:
            _say(pd.DataFrame(curve).to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    _say("Aria: no patient ids, every split mixes patients (its figures overstate new patients).")
    _say(f"written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
