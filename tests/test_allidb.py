"""ALL-IDB reading and the ALL-IDB2 crop → ALL-IDB1 photo mapping, on small generated trees (the real data is
never in CI). Positions are chosen here, so every expectation is known by construction."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage as ndi

from core.smear import allidb
from core.smear.allidb import (NccSearcher, centroids, crop_map, find_root, is_reserved, map_crops_to_photos, parse_name,
                         read_allidb1, read_xyc)
from core.smear.synthetic_fields import synth_field

CROP = 96  # the crops' nominal side here (ALL-IDB2: 257), a multiple of nothing in particular


def _field(seed: int, h: int = 300, w: int = 400) -> np.ndarray:
    return synth_field(h, w, wbc=4, rbc=50, platelets=8, seed=seed)[0]


def _texture(seed: int, h: int, w: int) -> np.ndarray:
    """A small smooth random RGB image, for trees whose pixels do not matter."""
    rng = np.random.default_rng(seed)
    return np.clip(ndi.gaussian_filter(rng.normal(0, 40, (h, w, 3)), (2, 2, 0)) * 3 + 128, 0, 255).astype(np.uint8)


def _save_jpeg(a: np.ndarray, path: Path, quality: int = 90) -> np.ndarray:
    """Write a photo as ALL-IDB1 does (JPEG) and return what a reader decodes: crops are cut from that."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, "JPEG", quality=quality)
    return np.asarray(Image.open(path).convert("RGB"))


def _save_tiff(a: np.ndarray, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path, "TIFF")
    return path


def _reencode_jpeg(a: np.ndarray, quality: int) -> np.ndarray:
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=quality)
    return np.asarray(Image.open(buf).convert("RGB"))


@pytest.fixture
def opened(monkeypatch) -> list[str]:
    """Every path Pillow is asked to open, to prove reserved photos are never read."""
    seen: list[str] = []
    real = Image.open

    def spy(fp, *a, **k):
        if isinstance(fp, (str, os.PathLike)):
            seen.append(Path(fp).name)
        return real(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    return seen


# ----------------------------------------------------------------------------------------------------------
def test_reservation_rule_and_names():
    assert [n for n in range(1, 11) if is_reserved(n)] == [1, 3, 5, 7, 9]
    assert not is_reserved(108) and is_reserved(107)
    assert parse_name("Im002_1.jpg") == ("Im002_1", 2, "all")
    assert parse_name("/x/Im034_0.xyc") == ("Im034_0", 34, "hem")
    assert parse_name("Im260_0.tif") == ("Im260_0", 260, "hem")
    assert parse_name("Im002_1") == ("Im002_1", 2, "all")
    assert parse_name("Im002_2.jpg") is None and parse_name("notes.jpg") is None


def test_read_xyc_formats(tmp_path):
    p = tmp_path / "a.xyc"
    p.write_bytes(b"1638\t576\r\n\n 911 740 \n12,13\n\n")
    np.testing.assert_array_equal(read_xyc(p), [[1638, 576], [911, 740], [12, 13]])
    (tmp_path / "empty.xyc").write_text("\n\n")
    assert read_xyc(tmp_path / "empty.xyc").shape == (0, 2)
    (tmp_path / "bad.xyc").write_text("1 2\n3\n")
    with pytest.raises(ValueError, match=r"bad\.xyc:2"):
        read_xyc(tmp_path / "bad.xyc")


def _idb1_tree(base: Path) -> Path:
    """data/allidb/ALL_IDB1 with two usable photos, a reserved one (not even a valid JPEG: opening it would show),
    a photo without its blast file and a badly named file."""
    root = base / "data" / "allidb"
    idb1 = root / "ALL_IDB1"
    _save_jpeg(_texture(1, 60, 80), idb1 / "im" / "Im002_1.jpg")
    _save_jpeg(_texture(2, 50, 70), idb1 / "im" / "Im004_0.jpg")
    _save_jpeg(_texture(3, 40, 40), idb1 / "im" / "Im006_1.jpg")
    (idb1 / "im" / "Im003_1.jpg").write_bytes(b"not a jpeg at all")
    (idb1 / "im" / "snapshot.jpg").write_bytes(b"whatever")
    (idb1 / "xyc").mkdir()
    (idb1 / "xyc" / "Im002_1.xyc").write_text("30\t20\n11 41\n")
    (idb1 / "xyc" / "Im004_0.xyc").write_text("\n\n")
    (idb1 / "xyc" / "Im003_1.xyc").write_text("5 5\n")
    (idb1 / "other").mkdir()
    (idb1 / "other" / "Im002_1.xyc").write_text("60 50\n")
    (idb1 / "other" / "Im004_0.xyc").write_text("10 10\n21 31\n")
    return root


def test_read_allidb1_skips_reserved_unread(tmp_path, opened):
    root = _idb1_tree(tmp_path)
    res = read_allidb1(root)
    photos = res.photos
    assert photos["photo"].tolist() == ["Im002_1", "Im004_0"]
    assert photos["number"].tolist() == [2, 4]
    assert photos["label"].tolist() == ["all", "hem"]
    assert photos[["width", "height"]].values.tolist() == [[80, 60], [70, 50]]
    assert photos[["blasts", "others"]].values.tolist() == [[2, 1], [0, 2]]
    reasons = dict(zip(res.problems["path"].map(lambda p: Path(p).name), res.problems["reason"]))
    assert set(reasons) == {"Im003_1.jpg", "Im006_1.jpg", "snapshot.jpg"}
    assert "reserved" in reasons["Im003_1.jpg"]
    assert "no blast centroid file" in reasons["Im006_1.jpg"]
    assert "Im003_1.jpg" not in opened


def test_root_at_any_level(tmp_path):
    root = _idb1_tree(tmp_path)
    for where in (tmp_path / "data", root, root / "ALL_IDB1", root / "ALL_IDB1" / "im", root / "ALL_IDB1" / "xyc"):
        assert find_root(where) == root.resolve()
        assert read_allidb1(where).photos["photo"].tolist() == ["Im002_1", "Im004_0"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError):
        find_root(tmp_path / "empty")


def test_centroids_zero_based_and_reserved_refused(tmp_path):
    root = _idb1_tree(tmp_path)
    c = centroids(root / "ALL_IDB1", "Im002_1")
    np.testing.assert_array_equal(c["blasts"], [[29, 19], [10, 40]])  # file values minus 1
    np.testing.assert_array_equal(c["others"], [[59, 49]])
    raw = centroids(root, 2, zero_based=False)
    np.testing.assert_array_equal(raw["blasts"], [[30, 20], [11, 41]])
    by_path = centroids(root, root / "ALL_IDB1" / "im" / "Im004_0.jpg")
    assert by_path["blasts"].shape == (0, 2)
    np.testing.assert_array_equal(by_path["others"], [[9, 9], [20, 30]])
    for reserved in ("Im003_1", 3, "Im003_1.jpg"):
        with pytest.raises(ValueError, match="reserved"):
            centroids(root, reserved)


# ----------------------------------------------------------------------------------------------------------
def test_ncc_searcher_equals_match_template():
    from skimage.feature import match_template

    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.normal(size=(90, 120)), 2) * 40 + 150
    img[:20, :30] = 150  # a flat corner: NCC 0 there, as in `_ncc`
    s = NccSearcher(img)
    for shape in ((24, 24), (17, 31)):
        t = img[40:40 + shape[0], 50:50 + shape[1]] + rng.normal(0, 1, shape)
        mine, ref = s.ncc(t), np.nan_to_num(match_template(img, t))
        assert mine.shape == ref.shape
        np.testing.assert_allclose(mine, ref, atol=1e-4)
        assert np.unravel_index(np.argmax(mine), mine.shape) == (40, 50)


def _reshoot(a: np.ndarray, seed: int) -> np.ndarray:
    """Another shot of the same field: other focus, exposure and sensor noise, same framing."""
    rng = np.random.default_rng(seed)
    b = ndi.gaussian_filter(a.astype(np.float64), (2.5, 2.5, 0)) * 0.92 + 8 + rng.normal(0, 4, a.shape)
    return np.clip(b, 0, 255).astype(np.uint8)


def test_map_crops_to_photos(tmp_path, opened):
    photos = {name: _save_jpeg(_field(seed), tmp_path / "im" / f"{name}.jpg")
              for name, seed in (("Im002_1", 11), ("Im004_1", 12), ("Im006_0", 13))}
    foreign = _reencode_jpeg(_field(99), 90)  # a photo never given (as a reserved one is never given)
    reshot = _reencode_jpeg(_reshoot(_field(11), 5), 90)  # Im002_1's field, another shot
    H, W = photos["Im002_1"].shape[:2]
    cases = [  # crop name, source array, photo expected, x, y, width, height, re-encode quality
        ("c_plain", photos["Im002_1"], "Im002_1", 37, 53, CROP, CROP, None),
        ("c_far", photos["Im004_1"], "Im004_1", 301, 199, CROP, CROP, None),
        ("c_jpeg", photos["Im006_0"], "Im006_0", 150, 101, CROP, CROP, 95),
        ("c_left", photos["Im004_1"], "Im004_1", 0, 40, 70, CROP, None),  # cut short by the left border
        ("c_right", photos["Im006_0"], "Im006_0", W - 60, 7, 60, CROP, None),  # … by the right border
        ("c_foreign", foreign, None, 120, 80, CROP, CROP, None),
        ("c_reshot", reshot, None, 210, 130, CROP, CROP, None),
    ]
    paths = []
    for name, src, _, x, y, w, h, q in cases:
        crop = src[y:y + h, x:x + w]
        if q:
            crop = _reencode_jpeg(crop, q)
        paths.append(_save_tiff(crop, tmp_path / "crops" / f"{name}.tif"))
    photo_paths = sorted((tmp_path / "im").glob("*.jpg"))
    t = map_crops_to_photos(paths, photo_paths, workers=2).set_index("crop")

    for name, _, photo, x, y, w, h, _ in cases:
        row = t.loc[name]
        assert (row["width"], row["height"]) == (w, h)
        if photo is None:
            assert row["photo"] is None and pd.isna(row["x"]) and pd.isna(row["cx"]), name
            continue
        assert row["photo"] == photo and row["status"] == "copy", name
        assert abs(row["x"] - x) <= 1 and abs(row["y"] - y) <= 1, (name, row["x"], row["y"])
        assert row["score"] > 0.99 and row["detail"] >= allidb.COPY_THRESHOLD, name
        assert row["runner_up"] < allidb.SAME_FIELD_THRESHOLD, name
    assert t.loc["c_plain", "cx"] == 37 + CROP // 2 and t.loc["c_plain", "cy"] == 53 + CROP // 2
    # The cell sits at the centre of the nominal 96-px window, whose cut-off part lay outside the photo.
    assert t.loc["c_left", "cx"] == 70 - CROP + CROP // 2 and t.loc["c_left", "cy"] == 40 + CROP // 2
    assert t.loc["c_right", "cx"] == W - 60 + CROP // 2
    assert t.loc["c_foreign", "status"] == "none"
    assert t.loc["c_foreign", "detail"] < allidb.SAME_FIELD_THRESHOLD
    assert t.loc["c_reshot", "status"] == "same field" and t.loc["c_reshot", "candidate"] == "Im002_1"
    assert t.loc["c_reshot", "score"] > 0.95  # grey levels alone would have taken it for a copy

    # One worker gives the same table; an odd photo among those given is refused before anything is read.
    pd.testing.assert_frame_equal(map_crops_to_photos(paths, photo_paths, workers=1).set_index("crop"), t)
    odd = tmp_path / "im" / "Im007_1.jpg"
    _save_jpeg(_field(7), odd)
    opened.clear()
    with pytest.raises(ValueError, match="reserved"):
        map_crops_to_photos(paths, photo_paths + [odd])
    assert opened == []


def test_crop_map_cache_usable_and_twins(tmp_path, opened, monkeypatch):
    root = tmp_path / "allidb"
    im = root / "ALL_IDB1" / "im"
    even = _save_jpeg(_field(21), im / "Im002_1.jpg")
    healthy = _save_jpeg(_field(22), im / "Im004_0.jpg")
    odd = _save_jpeg(_field(23), im / "Im003_1.jpg")  # reserved: present, but must stay unread
    (root / "ALL_IDB1" / "xyc").mkdir()
    (root / "ALL_IDB1" / "xyc" / "Im002_1.xyc").write_text(f"{40 + 48 + 1} {30 + 48 + 1}\n")
    (root / "ALL_IDB1" / "xyc" / "Im004_0.xyc").write_text("\n")
    img = root / "ALL_IDB2" / "img"
    _save_tiff(even[30:30 + CROP, 40:40 + CROP], img / "Im001_1.tif")
    _save_tiff(odd[100:100 + CROP, 200:200 + CROP], img / "Im002_1.tif")
    _save_tiff(healthy[150:150 + CROP, 250:250 + CROP], img / "Im003_0.tif")
    _save_tiff(healthy[150:150 + CROP, 250:250 + CROP], img / "Im004_0.tif")  # a twin, as ALL-IDB2 has
    opened.clear()  # writing the tree decoded the photos; from here on the odd one must stay closed

    t = crop_map(root / "ALL_IDB1", workers=2)
    assert t["crop"].tolist() == ["Im001_1", "Im002_1", "Im003_0", "Im004_0"]
    assert t["label"].tolist() == ["all", "all", "hem", "hem"]
    assert t["status"].tolist() == ["copy", "none", "copy", "copy"]
    assert t["photo"].tolist() == ["Im002_1", None, "Im004_0", "Im004_0"]
    assert t["usable"].tolist() == [True, False, True, True]
    assert t["duplicate_of"].tolist() == [None, None, None, "Im003_0"]
    assert t[["x", "y"]].iloc[0].tolist() == [40, 30] and t[["x", "y"]].iloc[2].tolist() == [250, 150]
    # The crop centre is its blast's centroid (0-based), as on the real data.
    np.testing.assert_array_equal(centroids(root, "Im002_1")["blasts"][0], t[["cx", "cy"]].iloc[0].to_numpy())
    assert "Im003_1.jpg" not in opened

    cache = root / "ALL_IDB2" / "crop_to_photo.csv"
    assert cache.read_text().startswith("# key=")
    calls = []
    real_map = allidb.map_crops_to_photos
    monkeypatch.setattr(allidb, "map_crops_to_photos", lambda *a, **k: calls.append(1) or real_map(*a, **k))
    again = crop_map(root, workers=2)
    assert calls == []  # reused
    pd.testing.assert_frame_equal(again, t)
    st = (img / "Im004_0.tif").stat()
    os.utime(img / "Im004_0.tif", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    rebuilt = crop_map(root, workers=2)
    assert calls == [1]  # a changed file rebuilds
    pd.testing.assert_frame_equal(rebuilt, t)
    crop_map(root, workers=2, rebuild=True)
    assert calls == [1, 1]
    assert "Im003_1.jpg" not in opened
