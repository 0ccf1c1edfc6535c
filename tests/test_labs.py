"""Smear photos of any lab as one table (`core.smear.labs`): each source's layout and labels, the reservation rule for
ALL-IDB and Aria (odd photos listed by no reader, never opened), a lab's own folders or CSV, bad labels named."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.smear.labs import (BLASTS, NO_BLASTS, PHOTO_COLUMNS, is_reserved, parse_label, read_aria, read_bccd,
                       read_photo_labels)


def _jpg(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8, 3), 200, np.uint8)).save(path)


def test_reservation_rule_for_each_lab():
    # names made here, never real files: an odd and an even number of each naming scheme
    for odd, even in ((3, 4), (11, 10)):
        assert is_reserved("aria", f"WBC-Malignant-Pre-{odd:03d}.jpg")
        assert not is_reserved("aria", f"WBC-Malignant-Pre-{even:03d}.jpg")
        assert is_reserved("aria", f"WBC_Healthy_{odd}.jpg") and not is_reserved("aria", f"WBC_Healthy_{even}.jpg")
        assert is_reserved("allidb", f"Im{odd:03d}_1.jpg") and not is_reserved("allidb", f"Im{even:03d}_1.jpg")
    assert not is_reserved("bccd", "BloodImage_00001.jpg") and not is_reserved("mylab", "photo1.jpg")


def test_aria_layout_labels_per_class_folder_and_skips_odd_photos(tmp_path, monkeypatch):
    for name in ("Benign/WBC-Benign-002.jpg", "Early/WBC-Malignant-Early-004.jpg", "Pre/WBC-Malignant-Pre-006.jpg",
                 "Pro/WBC-Malignant-Pro-008.jpg", "Normal/WBC_Healthy_10.jpg"):
        _jpg(tmp_path / name)
    odd = tmp_path / "Pro" / f"WBC-Malignant-Pro-{9:03d}.jpg"  # an odd number: reserved
    _jpg(odd)
    opened = []
    real_open = Image.open
    monkeypatch.setattr(Image, "open", lambda p, *a, **k: opened.append(str(p)) or real_open(p, *a, **k))
    table = read_aria(tmp_path)
    assert list(table.columns) == PHOTO_COLUMNS
    labels = dict(zip(table["photo"].str.split("/").str[1], table["label"]))
    assert labels == {"Benign": NO_BLASTS, "Early": BLASTS, "Pre": BLASTS, "Pro": BLASTS, "Normal": NO_BLASTS}
    assert str(odd) not in set(table["path"]) and not opened  # never opened, never listed
    assert (table["group"] == table["photo"]).all() and (table["lab"] == "aria").all()


def test_bccd_every_photo_no_blasts(tmp_path):
    for i in range(3):
        _jpg(tmp_path / "BCCD" / "JPEGImages" / f"BloodImage_{i:05d}.jpg")
    table = read_bccd(tmp_path)
    assert len(table) == 3 and (table["label"] == NO_BLASTS).all() and not table["centroids"].any()


def test_a_labs_folders_and_csv(tmp_path):
    for name in ("blasts/a.jpg", "blasts/sub/b.png", "no_blasts/c.jpg"):
        _jpg(tmp_path / "lab" / name)
    table = read_photo_labels(tmp_path / "lab", "mylab")
    assert sorted(zip(table["photo"], table["label"])) == [("mylab/blasts/a.jpg", BLASTS),
                                                          ("mylab/blasts/sub/b.png", BLASTS),
                                                          ("mylab/no_blasts/c.jpg", NO_BLASTS)]
    csv = tmp_path / "lab" / "labels.csv"
    csv.write_text("photo,label\nblasts/a.jpg,blasts\nno_blasts/c.jpg,no blasts\n")
    table = read_photo_labels(csv, "mylab")
    assert list(table["label"]) == [BLASTS, NO_BLASTS] and Path(table["path"].iloc[0]).is_file()
    csv.write_text("photo,label\nblasts/a.jpg,maybe\n")
    with pytest.raises(ValueError, match=r"labels.csv, line 2: photo label 'maybe'"):
        read_photo_labels(csv, "mylab")
    csv.write_text("photo,label\nmissing.jpg,blasts\n")
    with pytest.raises(FileNotFoundError, match="missing.jpg not found"):
        read_photo_labels(csv, "mylab")
    with pytest.raises(FileNotFoundError, match="blasts/ and no_blasts/"):
        read_photo_labels(tmp_path / "nothing-here" if (tmp_path / "nothing-here").mkdir() is None else None)


def test_label_words():
    assert parse_label("ALL", "x") == BLASTS and parse_label(0, "x") == NO_BLASTS and parse_label("hem", "x") == NO_BLASTS
    with pytest.raises(ValueError, match="neither"):
        parse_label("unsure", "x")
