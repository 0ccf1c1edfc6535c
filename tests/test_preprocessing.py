import io
import os

import numpy as np
import pytest
from PIL import Image

from core.data import imageio
from core.data.dataset import index
from core.data.imageio import ImageReadError, read_image
from core.image.preprocessing import CropCache, channel_stats, crop_cell, load_crop


def _img(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_crop_450_is_exact_100px_margin():
    img = _img(450, 450)
    np.testing.assert_array_equal(crop_cell(img), img[100:350, 100:350])


def test_crop_non_square_pads_with_black_then_crops():
    img = _img(300, 450)  # 75 black rows are added above and below
    padded = np.zeros((450, 450, 3), np.uint8)
    padded[75:375] = img
    np.testing.assert_array_equal(crop_cell(img), padded[100:350, 100:350])


def test_crop_scales_margin_and_area_resizes():
    img = _img(900, 900)  # margin 200 -> 500x500 -> 250x250 by 2x2 box averaging
    block = img[200:700, 200:700].astype(float).reshape(250, 2, 250, 2, 3).mean(axis=(1, 3))
    out = crop_cell(img)
    assert out.shape == (250, 250, 3)
    assert np.abs(out.astype(float) - block).max() <= 1.0


def test_crop_resize_to_model_size():
    out = crop_cell(_img(450, 450), size=64)
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8


def test_grayscale_rgba_16bit_are_converted():
    g = Image.fromarray(np.full((450, 450), 77, np.uint8), "L")
    assert (read_image(_png(g))[0, 0] == [77, 77, 77]).all()
    rgba = np.zeros((450, 450, 4), np.uint8)
    rgba[..., 0], rgba[..., 3] = 200, 128  # half-transparent red over black -> about 100
    out = read_image(_png(Image.fromarray(rgba, "RGBA")))
    assert abs(int(out[0, 0, 0]) - 100) <= 1 and out[0, 0, 1] == 0
    i16 = Image.fromarray(np.full((450, 450), 65535 // 2, np.uint16))
    assert abs(int(read_image(_png(i16))[0, 0, 0]) - 128) <= 1


def _png(im) -> bytes:
    buf = io.BytesIO()
    im.save(buf, "PNG")
    return buf.getvalue()


def test_bad_inputs_raise_named_errors(tmp_path):
    with pytest.raises(ImageReadError, match="empty file"):
        read_image(b"", name="a.bmp")
    with pytest.raises(ImageReadError, match="b.png: not an image"):
        read_image(b"hello" * 50, name="b.png")
    good = _png(Image.fromarray(_img(100, 100)))
    with pytest.raises(ImageReadError, match="c.png"):
        read_image(good[: len(good) // 2], name="c.png")
    with pytest.raises(ImageReadError, match="cannot read file"):
        read_image(tmp_path / "missing.bmp")


def test_decompression_bomb_refused(monkeypatch):
    monkeypatch.setattr(imageio, "MAX_PIXELS", 1000)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(_png(Image.fromarray(_img(100, 100))), name="bomb.png")


def test_channel_stats_hand_computed():
    imgs = np.zeros((4, 2, 2, 3), np.uint8)
    imgs[0, ..., 0] = 255
    imgs[1, ..., 1] = 255
    mean, std = channel_stats(imgs, indices=[0, 1])
    np.testing.assert_allclose(mean, [0.5, 0.5, 0.0], atol=1e-6)
    np.testing.assert_allclose(std, [0.5, 0.5, 0.0], atol=1e-6)


def test_real_samples_crop(samples_dir):
    f = next((samples_dir / "training_like").glob("UID_53_*.bmp"))
    ref = np.asarray(Image.open(f).convert("RGB"))[100:350, 100:350]
    np.testing.assert_array_equal(load_crop(f), ref)


def test_crop_cache_build_reuse_and_stale(synth_small, tmp_path):
    m, _ = index(synth_small)
    m = m.iloc[:40]
    cache = CropCache.build(m, tmp_path, size=64, workers=2, progress=False)
    assert not cache.reused and cache.array.shape == (40, 64, 64, 3) and not cache.failures
    np.testing.assert_array_equal(cache.array[7], load_crop(m["path"].iloc[7], size=64))
    again = CropCache.build(m, tmp_path, size=64, workers=2, progress=False)
    assert again.reused and again.key == cache.key
    np.testing.assert_array_equal(np.asarray(again.array), np.asarray(cache.array))
    assert isinstance(again.array, np.memmap)
    # A changed file changes the key: the cache is rebuilt and the old one removed.
    target = m["path"].iloc[3]
    st = os.stat(target)
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns + 10_000_000_000))
    m2, _ = index(synth_small)
    fresh = CropCache.build(m2.iloc[:40], tmp_path, size=64, workers=2, progress=False)
    assert not fresh.reused and fresh.key != cache.key
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"crops-{fresh.key}.json", f"crops-{fresh.key}.npy"]
    np.testing.assert_array_equal(fresh.rows([m["path"].iloc[5], m["path"].iloc[2]]), [5, 2])


def test_caches_of_other_manifests_share_a_folder(synth_small, tmp_path):
    m, _ = index(synth_small)
    a = CropCache.build(m.iloc[:8], tmp_path, size=32, workers=2, progress=False)
    b = CropCache.build(m.iloc[8:16], tmp_path, size=32, workers=2, progress=False)
    c = CropCache.build(m.iloc[:8], tmp_path, size=48, workers=2, progress=False)
    assert len({a.key, b.key, c.key}) == 3
    for part, size in ((m.iloc[:8], 32), (m.iloc[8:16], 32), (m.iloc[:8], 48)):
        assert CropCache.build(part, tmp_path, size=size, workers=2, progress=False).reused


def test_crop_cache_records_decode_failures(synth_small, tmp_path):
    m, _ = index(synth_small)
    m = m.iloc[:10].copy()
    bad = tmp_path / "bad.bmp"
    bad.write_bytes(b"BM" + b"\0" * 100)
    m.loc[m.index[4], ["path", "size", "mtime_ns"]] = [str(bad), 102, 0]
    cache = CropCache.build(m, tmp_path / "c", size=32, workers=2, progress=False)
    assert list(cache.failures) == [4] and not cache.valid[4] and cache.valid.sum() == 9
    assert "bad.bmp" in cache.problems()["path"].iloc[0]


def test_cache_workers_never_rerun_the_main_script(synth_small, tmp_path, monkeypatch):
    """Under Streamlit the `__main__` module is a dashboard page; cache workers (forkserver, once TensorFlow is
    loaded) must not execute it: they used to, and the pool broke for the rest of the process."""
    import sys
    import types

    pytest.importorskip("tensorflow")
    import tensorflow  # noqa: F401 - the forkserver path is taken once TensorFlow is loaded

    page = tmp_path / "page.py"
    page.write_text("raise SystemExit('a dashboard page ran inside a cache worker')\n")
    fake = types.ModuleType("__main__")
    fake.__file__ = str(page)
    monkeypatch.setitem(sys.modules, "__main__", fake)
    manifest = index(synth_small)[0].head(40)
    cache = CropCache.build(manifest, tmp_path / "cache", size=16, workers=2, progress=False)
    assert cache.valid.all() and not cache.failures
    assert sys.modules["__main__"] is fake  # given back
