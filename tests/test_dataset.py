import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from core.data.dataset import index, parse_uid, summarize
from core.data.imageio import encode_bmp, read_image
from tests.conftest import copy_tree


@pytest.mark.parametrize("name, expected", [
    ("UID_1_2_2_all.bmp", ("1", 2, 2, "all")),
    ("UID_H10_47_2_hem.bmp", ("H10", 47, 2, "hem")),
    ("UID_h3_4_1_hem.bmp", ("H3", 4, 1, "hem")),
    ("UID_53_4_8_all.bmp", ("53", 4, 8, "all")),
    ("uid_07_1_3_ALL.png", ("7", 1, 3, "all")),
])
def test_parse_uid(name, expected):
    assert tuple(parse_uid(name)) == expected


@pytest.mark.parametrize("name", ["1.bmp", "UID_1_2_all.bmp", "UID_X1_2_3_all.bmp", "UID_1_2_3_blast.bmp"])
def test_parse_uid_rejects_other_names(name):
    assert parse_uid(name) is None


def test_real_samples_both_header_variants_load(samples_dir):
    files = sorted((samples_dir / "training_like").glob("*.bmp"))
    sizes = {f.stat().st_size for f in files}
    assert sizes == {608454, 608538}
    for f in files:
        ours = read_image(f)
        ref = np.asarray(Image.open(f).convert("RGB"))
        assert ours.shape == (450, 450, 3) and ours.dtype == np.uint8
        np.testing.assert_array_equal(ours, ref)  # the fast BMP path decodes exactly like Pillow


def test_encode_bmp_variants_match_real_sizes_and_roundtrip():
    img = np.random.default_rng(0).integers(0, 256, (450, 450, 3), dtype=np.uint8)
    info, v5 = encode_bmp(img, "info"), encode_bmp(img, "v5")
    assert (len(info), len(v5)) == (608454, 608538)
    for data in (info, v5):
        np.testing.assert_array_equal(read_image(data), img)
        np.testing.assert_array_equal(np.asarray(Image.open(__import__("io").BytesIO(data)).convert("RGB")), img)


def test_index_plain_class_folders_with_real_cells(cell_dir, tmp_path):
    for f in (cell_dir).glob("*.bmp"):
        cls = parse_uid(f.name).label
        (tmp_path / cls).mkdir(exist_ok=True)
        shutil.copy(f, tmp_path / cls / f.name)
    m, p = index(tmp_path)
    assert p.empty
    assert len(m) == 7 and set(m["source"]) == {"custom"}
    assert m.set_index("name").loc["UID_h3_4_1_hem.bmp", "subject"] == "H3"
    assert sorted(m["subject"].unique()) == ["1", "3", "53", "H10", "H3"]
    assert m["label"].value_counts().to_dict() == {"all": 4, "hem": 3}
    assert m.attrs["layout"] == "class_folders"


def test_index_kaggle_layout(synth_small):
    m, p = index(synth_small)
    assert p.empty, p
    counts = m.groupby("source").size().to_dict()
    assert counts == {"fold_0": 48, "fold_1": 48, "fold_2": 48, "prelim": 24, "final": 12}
    prelim = m[m["source"] == "prelim"]
    assert prelim["subject"].notna().all() and prelim["original_name"].str.startswith("UID_").all()
    # Prelim labels come from the CSV and agree with the original names.
    assert (prelim["original_name"].map(lambda n: parse_uid(n).label) == prelim["label"]).all()
    assert m.loc[m["source"] == "final", "label"].isna().all()
    assert m.attrs["layout"] == "kaggle"
    # Any fold holds subjects of its own only (folds are subject-disjoint).
    folds = m[m["source"].str.startswith("fold_")].groupby("subject")["source"].nunique()
    assert (folds == 1).all()


@pytest.mark.parametrize("level, expected", [
    ("C-NMC_Leukemia", {"fold_0", "fold_1", "fold_2", "prelim", "final"}),
    ("C-NMC_Leukemia/training_data", {"fold_0", "fold_1", "fold_2"}),
    ("C-NMC_Leukemia/training_data/fold_1", {"fold_1"}),
    ("C-NMC_Leukemia/training_data/fold_1/hem", {"fold_1"}),
    ("C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data", {"prelim"}),
])
def test_index_root_at_any_level(synth_small, level, expected):
    m, p = index(synth_small / level)
    assert p.empty and set(m["source"]) == expected
    if expected == {"prelim"}:  # the CSV lives beside the folder, outside the given root
        assert m["label"].notna().all()


def test_index_original_challenge_names(synth_small, tmp_path):
    k = synth_small / "C-NMC_Leukemia"
    root = tmp_path / "tcia"
    shutil.copytree(k / "training_data", root / "C-NMC_training_data")
    shutil.copytree(k / "validation_data/C-NMC_test_prelim_phase_data", root / "C-NMC_test_prelim_phase_data")
    shutil.copy(k / "validation_data/C-NMC_test_prelim_phase_data_labels.csv", root)
    shutil.copytree(k / "testing_data/C-NMC_test_final_phase_data", root / "C-NMC_test_final_phase_data")
    m, p = index(root)
    ref, _ = index(synth_small)
    assert p.empty
    assert m.groupby(["source", "label"], dropna=False).size().equals(
        ref.groupby(["source", "label"], dropna=False).size())
    assert m.attrs["layout"] == "challenge"


def test_index_unlabelled_folder_of_any_format(tmp_path):
    rng = np.random.default_rng(0)
    for k, ext in enumerate(["png", "jpg", "tif"]):
        Image.fromarray(rng.integers(0, 255, (60, 80, 3), dtype=np.uint8)).save(tmp_path / f"cell{k}.{ext}")
    m, p = index(tmp_path)
    assert len(m) == 3 and m["label"].isna().all() and p.empty
    assert m.attrs["layout"] == "unlabelled"


def test_problems_are_listed_not_crashes(synth_small, tmp_path):
    root = copy_tree(synth_small, tmp_path / "broken")
    fold = root / "C-NMC_Leukemia/training_data/fold_0"
    alls = sorted((fold / "all").glob("*.bmp"))
    (fold / "all" / "UID_77_1_1_all.bmp").write_bytes(b"")                              # zero-byte
    (fold / "all" / "UID_77_1_2_all.bmp").write_bytes(alls[0].read_bytes()[:300_000])    # truncated
    (fold / "all" / "UID_77_1_3_all.bmp").write_bytes(b"this is not a bitmap" * 100)     # not an image
    shutil.copy(alls[1], fold / "all" / "UID_77_2_1_all.bmp")                             # duplicate content
    shutil.copy(alls[2], fold / "hem" / alls[2].name)                                     # suffix vs folder
    (fold / "hem" / "notes.txt").write_text("stray")                                     # non-image file
    Image.new("I;16", (50, 50)).save(fold / "hem" / "UID_H77_1_1_hem.png")                # 16-bit: fine
    prelim = root / "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data"
    (prelim / "5.bmp").unlink()                                                           # CSV row, no file
    shutil.copy(alls[3], prelim / "99999.bmp")                                            # file, no CSV row
    m, p = index(root)
    reasons = dict(zip(p["path"].map(lambda s: Path(s).name), p["reason"]))
    assert reasons["UID_77_1_1_all.bmp"] == "zero-byte file"
    assert reasons["UID_77_1_2_all.bmp"].startswith("truncated BMP")
    assert reasons["UID_77_1_3_all.bmp"].startswith("not an image")
    assert reasons["UID_77_2_1_all.bmp"].startswith("duplicate content of") or \
        reasons[alls[1].name].startswith("duplicate content of")
    assert "disagrees with folder" in reasons[alls[2].name]
    assert reasons["notes.txt"].startswith("not an image file")
    assert reasons["5.bmp"].startswith("label CSV row")
    assert reasons["99999.bmp"] == "file has no row in the label CSV"
    assert len(p) == 8  # each excluded file once, under its first reason
    assert "UID_H77_1_1_hem.png" in set(m["name"])
    assert not set(p["path"]) & set(m["path"])  # excluded means excluded
    s = summarize((m, p))
    assert s["excluded"] == 8 and sum(s["excluded_by_reason"].values()) == 8


def test_index_missing_root_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset folder not found"):
        index(tmp_path / "nope")


def test_cli_index_json(synth_small, capsys):
    from training.cli import main

    assert main(["index", str(synth_small), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["cells"] == 180 and out["excluded"] == 0 and out["layout"] == "kaggle"
    assert out["by_source"]["prelim"] == {"all": 12, "hem": 12}


def test_prelim_extra_files_and_missing_csv_are_named_correctly(synth_small, tmp_path):
    root = copy_tree(synth_small, tmp_path / "k")
    prelim = root / "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data"
    some = sorted(prelim.glob("*.bmp"))[0]
    for k in range(3):  # more files than CSV rows, named to sort after every listed one
        (prelim / f"99{k}99.bmp").write_bytes(some.read_bytes()[:-1] + bytes([k + 1]))
    _, p = index(root)
    assert p["reason"].tolist() == ["file has no row in the label CSV"] * 3
    (root / "C-NMC_Leukemia/validation_data/C-NMC_test_prelim_phase_data_labels.csv").unlink()
    m, p = index(root)
    assert (m["source"] != "prelim").all()
    assert set(p["reason"]) == {"no label CSV found beside the prelim folder"} and len(p) == 24 + 3


def test_index_follows_symlinked_class_folders_without_looping(synth_small, tmp_path):
    cells = sorted(synth_small.rglob("UID_*.bmp"))
    blasts = [p for p in cells if p.name.endswith("_all.bmp")][:5]
    normals = [p for p in cells if p.name.endswith("_hem.bmp")][:4]
    elsewhere = tmp_path / "elsewhere" / "blasts"
    elsewhere.mkdir(parents=True)
    for p in blasts:
        shutil.copy(p, elsewhere / p.name)
    data = tmp_path / "data"
    (data / "hem").mkdir(parents=True)
    for p in normals:
        shutil.copy(p, data / "hem" / p.name)
    (data / "all").symlink_to(elsewhere, target_is_directory=True)  # a linked class folder
    (data / "hem" / "loop").symlink_to(data, target_is_directory=True)  # a link loop back to the root
    m, _ = index(data)
    assert m["label"].value_counts().to_dict() == {"all": 5, "hem": 4}
    assert sorted(m["name"]) == sorted(p.name for p in blasts + normals)  # each cell once, despite the loop
