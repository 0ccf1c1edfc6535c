"""Benchmark: single-cell latency (prediction + Grad-CAM) and folder-scale prediction throughput, on CPU.

    python benchmarks/bench_predict.py [--cells 1000] [--model efficientnet_b2] [--size 250]

1. A warm EfficientNetB2 at 250 px: p50/p90 of one cell read from disk, cropped, predicted and explained with
   Grad-CAM (target p50 < 150 ms), beside the p50 of a bare compiled forward pass of the same model.
2. `classify_files` over a folder of >= 1,000 BMP cells (reading and cropping overlapped with prediction)
   versus `model.predict` on the same crops already in memory (target ratio >= 0.8).
3. The out-of-distribution gate's cost: `classify` of one cell file (read, crop, predict, decide) without and
   with the gate (image checks on the whole image + feature novelty), p50 of each and their ratio (target
   <= 1.20).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--cells", type=int, default=1000)
    ap.add_argument("--model", default="efficientnet_b2")
    ap.add_argument("--batch-model", default="solution_a", help="model for the folder throughput part")
    ap.add_argument("--size", type=int, default=250)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--data", default=str(Path(tempfile.gettempdir()) / "cnmc_bench_predict"))
    ap.add_argument("--parts", default="1,2,3", help="which measurements to run (1 latency, 2 folder, 3 gate)")
    args = ap.parse_args()
    parts = {int(p) for p in args.parts.split(",")}

    from core.decide.inference import collect_images
    from core.data.synthetic import synthesize

    data = Path(args.data)
    if not (data / "synthetic_truth.csv").exists():
        synthesize(data, cells_per_subject=max(1, args.cells // 28 + 1), seed=0, progress=False)
    files = collect_images([data / "C-NMC_Leukemia"])[: args.cells]
    for p in files:
        p.read_bytes()  # warm page cache for both contenders

    if 1 in parts:
        single_cell(args, files)
    if 2 in parts:
        folder(args, files)
    if 3 in parts:
        gate_cost(args, files)
    return 0


def single_cell(args, files) -> None:
    import keras

    from core.nets.explain import GradCAM
    from core.nets.models import create_model
    from core.image.preprocessing import load_crop

    model = create_model(args.model, args.size)
    cam = GradCAM(model)
    forward = keras.Model(model.inputs, model.outputs)
    cam(load_crop(files[0], args.size)[None])
    forward.predict_on_batch(load_crop(files[0], args.size)[None])
    single, bare = [], []
    for k in range(args.repeats):
        f = files[k % len(files)]
        t = time.perf_counter()
        crop = load_crop(f, args.size)
        probs, heat = cam(crop[None])
        single.append(time.perf_counter() - t)
        t = time.perf_counter()
        forward.predict_on_batch(crop[None])
        bare.append(time.perf_counter() - t)
    print(f"single cell, {args.model} {args.size}px, warm: read+crop+predict+Grad-CAM p50 "
          f"{np.median(single) * 1000:.1f} ms, p90 {np.percentile(single, 90) * 1000:.1f} ms; "
          f"bare forward p50 {np.median(bare) * 1000:.1f} ms (target p50 < 150 ms)")


def folder(args, files) -> None:
    from core.decide.inference import classify_files
    from core.nets.models import create_model
    from core.image.preprocessing import load_crop

    bm = create_model(args.batch_model, args.size)
    crops = np.stack([load_crop(p, args.size) for p in files])
    bm.predict(crops[:64], verbose=0)
    t = time.perf_counter()
    bm.predict(crops, batch_size=64, verbose=0)
    t_mem = time.perf_counter() - t
    classify_files([bm], files[:64], args.size)
    t = time.perf_counter()
    table = classify_files([bm], files, args.size)
    t_files = time.perf_counter() - t
    assert table["error"].isna().all()
    n = len(files)
    print(f"folder of {n} cells, {args.batch_model} {args.size}px: model.predict in memory {n / t_mem:.1f} img/s, "
          f"classify_files from disk {n / t_files:.1f} img/s, ratio {t_mem / t_files:.2f} (target >= 0.8)")


def gate_cost(args, files) -> None:
    from core.decide.gate import fit_gate
    from core.data.imageio import read_image
    from core.decide.inference import classify
    from core.nets.models import create_model
    from core.image.preprocessing import load_crop

    gm = create_model(args.batch_model, args.size, standardize=True)
    sample = files[:200]
    gate = fit_gate(gm, [read_image(p) for p in sample[:100]], np.stack([load_crop(p, args.size) for p in sample[:100]]),
                    [read_image(p) for p in sample[100:]], np.stack([load_crop(p, args.size) for p in sample[100:]]))
    plain, gated = [], []
    for g, out in ((None, plain), (gate, gated)):
        classify([gm], [(str(files[0]), files[0])], args.size, gate=g)  # warm
    for k in range(args.repeats):
        f = files[k % len(files)]
        for g, out in ((None, plain), (gate, gated)):
            t = time.perf_counter()
            classify([gm], [(str(f), f)], args.size, gate=g)
            out.append(time.perf_counter() - t)
    print(f"classify one cell, {args.batch_model} {args.size}px: without gate p50 {np.median(plain) * 1000:.1f} ms, "
          f"with gate p50 {np.median(gated) * 1000:.1f} ms, ratio {np.median(gated) / np.median(plain):.2f} "
          "(target <= 1.20)")


if __name__ == "__main__":
    raise SystemExit(main())
