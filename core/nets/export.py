"""Export a trained model for use outside this project: inference-only, built-in Keras layers only.

A run's `.keras` file holds our registered layers (augmentation, stain jitter, `CellStandardize`), so it loads
only where `core` is importable. The exported model drops the training-only layers (`core.nets.models.inference_model`)
and replaces the one custom layer active at inference, `CellStandardize`, by the same arithmetic written with
built-in Keras layers (`builtin_cell_standardize`), so:

- `keras`: `model.keras` loads with plain `keras.saving.load_model` (safe mode) in any process with Keras 3;
- `savedmodel`: a TensorFlow SavedModel (`serve` endpoint), for TF Serving / `tf.saved_model.load`;
- `onnx`: `model.onnx` for onnxruntime (converted by tf2onnx through Keras' own `model.export`).

Every format takes raw RGB crops, float32 0-255, of the size written in `contract.json`, and returns
[P(hem), P(all)]. `contract.json` beside the model says how to make a crop from a C-NMC tile and how the
decision rule (temperature, threshold, review band) turns P(all) into a call.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import keras
import numpy as np
from keras import layers

from core.data.atomic import atomic_path
from core.data.labels import CLASSES

FORMATS = ("keras", "savedmodel", "onnx")
CONTRACT_FILE = "contract.json"
FILES = {"keras": "model.keras", "savedmodel": "savedmodel", "onnx": "model.onnx"}


def builtin_cell_standardize(size: int, background: float = 10.0, eps: float = 1.0, mean: float = 128.0,
                             scale: float = 48.0, name: str = "cell_standardize") -> keras.Model:
    """`core.nets.stain_layers.CellStandardize` from built-in layers only (a nested functional model).

    Foreground: channel max > background (exact for integer pixels; a float pixel in (bg, bg + 1e-4) counts as
    partly foreground). With u = fg / sqrt(n) (`UnitNormalization` of the mask), the masked mean is
    sum(u^2 x), and appending a constant 1 to u * (x - mean) before a second `UnitNormalization` divides by
    sqrt(var + eps^2) (for eps = 1): the layer's (x - mean) / sqrt(var + eps^2) without a custom op.
    """
    if eps != 1.0:
        raise ValueError("the built-in form covers CellStandardize's eps = 1 (its default) only")
    p = size * size
    x = keras.Input((size, size, 3), name=f"{name}_in")
    peak = layers.Reshape((size, size, 1))(
        layers.MaxPooling3D(pool_size=(1, 1, 3))(layers.Reshape((size, size, 3, 1))(x)))
    fg = layers.ReLU(max_value=1.0)(layers.Rescaling(1e4, offset=-background * 1e4)(peak))
    fg_seq = layers.Reshape((p, 1))(fg)
    u = layers.UnitNormalization(axis=1)(fg_seq)  # fg / sqrt(n)
    sqrt_n = layers.Rescaling(float(p))(layers.GlobalAveragePooling1D()(u))  # (N, 1)
    xs = layers.Reshape((p, 3))(x)
    w = layers.Multiply()([u, u])  # fg / n
    centre = layers.Rescaling(float(p))(layers.GlobalAveragePooling1D()(layers.Multiply()([xs, w])))  # (N, 3)
    d = layers.Subtract()([xs, layers.Reshape((1, 3))(centre)])
    z = layers.Multiply()([u, d])  # sum over pixels of z^2 = var
    one = layers.Rescaling(0.0, offset=1.0)(layers.Reshape((1, 3))(centre))
    zn = layers.Cropping1D((0, 1))(layers.UnitNormalization(axis=1)(layers.Concatenate(axis=1)([z, one])))
    std = layers.Multiply()([zn, layers.Reshape((1, 1))(sqrt_n)])  # fg (x - mean) / sqrt(var + 1)
    y = layers.ReLU(max_value=255.0)(layers.Rescaling(scale, offset=mean)(std))
    y = layers.Multiply()([y, fg_seq])
    return keras.Model(x, layers.Reshape((size, size, 3))(y), name=name)


def portable_model(model: keras.Model) -> keras.Model:
    """The inference-only network with built-in Keras layers only (same weights, same outputs)."""
    from core.nets.models import inference_model
    from core.nets.stain_layers import CellStandardize

    clean = inference_model(model)
    size = int(clean.inputs[0].shape[1])

    def swap(layer):
        if isinstance(layer, CellStandardize):
            return builtin_cell_standardize(size, layer.background, layer.eps, name=layer.name)
        if isinstance(layer, layers.Normalization) and not layer.invert:
            return _as_rescaling(layer)
        return layer

    port = keras.models.clone_model(clean, clone_function=swap)
    for layer in clean.layers:  # clone_model may rebuild rather than reuse: copy every weight by name
        if layer.weights:
            port.get_layer(layer.name).set_weights(layer.get_weights())
    foreign = sorted({f"{type(l).__module__}.{type(l).__name__}" for l in port._flatten_layers()
                      if not type(l).__module__.startswith("keras.")})
    if foreign:
        raise ValueError(f"cannot export: layers outside Keras remain: {', '.join(foreign)}")
    return port


def portable_ensemble(models) -> keras.Model:
    """One portable model for one model or an ensemble: the members' portable networks side by side on one
    input, their outputs averaged (`Average`, built in), as `core.decide.inference.predict_proba` averages them."""
    models = list(models)
    if len(models) == 1:
        return portable_model(models[0])
    ports = [portable_model(m) for m in models]
    size = int(ports[0].inputs[0].shape[1])
    x = keras.Input((size, size, 3), name="crop")
    # each member keeps its own name inside the ensemble (their weights are saved under it)
    outs = [keras.Model(p.inputs[0], p.outputs[0], name=f"member_{i}")(x) for i, p in enumerate(ports)]
    return keras.Model(x, layers.Average(name="ensemble_mean")(outs), name="ensemble")


def _as_rescaling(norm: layers.Normalization) -> layers.Rescaling:
    """A fixed `Normalization` as the equal `Rescaling` with constants in its config: tf2onnx takes the
    Normalization's mean/variance tensors (made at build time) for extra graph inputs."""
    mean = np.ravel(keras.ops.convert_to_numpy(norm.mean)).astype("float64")
    std = np.maximum(np.sqrt(np.ravel(keras.ops.convert_to_numpy(norm.variance)).astype("float64")),
                     keras.backend.epsilon())
    return layers.Rescaling(scale=(1.0 / std).tolist(), offset=(-mean / std).tolist(), name=norm.name)


def contract(size: int, margin: int, rule, source: str, fmt: str) -> dict:
    """What a user of the exported file must do to get the project's numbers: crop, input, output, rule."""
    return {
        "format": fmt, "file": FILES[fmt], "source": source,
        "research_use_only": "Research use only; not a diagnostic device.",
        "input": {"shape": [None, size, size, 3], "dtype": "float32", "values": "raw RGB 0-255 (no scaling)",
                  "background": "black (the C-NMC convention: one segmented cell on black)"},
        "crop": {"from": "a C-NMC-style tile, one cell on black (450x450 px in C-NMC)",
                 "steps": ["pad a non-square image to a square, centred on black",
                           f"cut round({margin} * side / 450) px from each side",
                           f"resize to {size}x{size} (PIL BOX when shrinking, BILINEAR when enlarging)"],
                 "margin": margin, "reference_side": 450, "size": size},
        "output": {"columns": [f"P({c})" for c in CLASSES], "classes": list(CLASSES),
                   "meaning": "all = leukemic B-lymphoblast, hem = normal"},
        "decision_rule": {**{k: getattr(rule, k) for k in ("temperature", "threshold", "band", "fitted_on")},
                          "calibrated": "q = 1 / (1 + exp(-logit(P(all)) / temperature))",
                          "call": "all if q >= threshold else hem",
                          "review": "flag the cell for manual review if |q - threshold| < band"},
    }


def export_model(models, fmt: str, out: str | os.PathLike, rule, margin: int, source: str) -> Path:
    """Write `models` (one model, or a list: an ensemble, exported as one averaged model) in `fmt` under `out`
    with `contract.json`; returns the model file's path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {', '.join(FORMATS)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    port = portable_ensemble(models if isinstance(models, (list, tuple)) else [models])
    size = int(port.inputs[0].shape[1])
    target = out / FILES[fmt]
    if fmt == "keras":
        with atomic_path(target, suffix=".keras") as tmp:
            port.save(tmp)
    elif fmt == "savedmodel":
        if keras.backend.backend() != "tensorflow":
            raise ValueError("savedmodel export needs the TensorFlow backend (KERAS_BACKEND=tensorflow)")
        port.export(str(target), format="tf_saved_model", verbose=False)
    else:
        _require("tf2onnx", "onnx export needs tf2onnx and onnx (pip install -r requirements.txt)")
        spec = [keras.InputSpec(shape=(None, size, size, 3), dtype="float32", name="crop")]
        port.export(str(target), format="onnx", input_signature=spec, verbose=False)
    (out / CONTRACT_FILE).write_text(json.dumps(contract(size, margin, rule, source, fmt), indent=2) + "\n")
    return target


def _require(module: str, message: str) -> None:
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ValueError(message)

