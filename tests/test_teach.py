"""Teaching the smear model from verified cells: generated smear fields classified by the shipped smear model, their
white cells verified into a run store with each cell's model input kept as the dashboard keeps it; the refit is a
new model folder that loads, carries the lab's cross-validation before and after, and Classify offers; what cannot
make a refit is refused in words; the dashboard's refit needs the trainer role."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (ROOT / "models" / "smear" / "model.keras").is_file(),
                                reason="models/smear/ is not in this checkout")
SAMPLES = ("a" * 32, "b" * 32)


def _fields():
    """Four generated fields, two per sample; in the 'blasts' fields (1 and 3) the larger white cells are the
    blasts."""
    from core.smear.synthetic_fields import synth_field

    for i in range(4):
        img, truth = synth_field(480, 640, wbc=4, rbc=30, platelets=4, touching_pairs=0, border_cells=0,
                                 rbc_px=40.0, seed=10 + i)
        yield SAMPLES[i // 2], f"field{i}.jpg", img, i % 2 == 1


@pytest.fixture(scope="module")
def verified(tmp_path_factory):
    """A run store with the cells of four fields verified (both classes), each cell's model input kept at
    `verified_cells/<sample>/<cell_name>` as the Classify page keeps it; plus the odd cases: a cell re-decided
    (the latest decision counts), a "not a white cell", an "unsure", a confirmed cell the model did not judge, a
    cell whose crop is missing and one whose crop path leaves the store."""
    from core.decide.model_folder import load_model_folder
    from core.smear.fields import classify_field
    from training.store import RunStore

    runs = tmp_path_factory.mktemp("teach") / "runs"
    store = RunStore(runs)
    mf = load_model_folder("smear")
    kept, images = {}, {}
    for sample, field, img, blasts in _fields():
        fc = classify_field(mf.models, img, field, mf.size, mf.rule, mf.gate, mf.crop_margin, model="smear")
        images[field] = (img, fc)
        area = fc.table["mask_area_px"].to_numpy()
        for k, row in enumerate(fc.table.to_dict("records")):
            name = row["cell_name"]
            rel = f"verified_cells/{sample}/{name}"
            (runs / rel).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(fc.crops[name]).save(runs / rel)
            kept[name] = runs / rel
            decision = "blast" if blasts and area[k] >= np.median(area) else "normal"
            pre = row["prediction"] if isinstance(row["prediction"], str) else ""
            store.record_verification(sample, name, decision, "Dr Ana", field=field, pre_call=pre, crop=rel)
    # the odd cases, on extra names (fields 0 and 2 keep all their cells)
    extra = images["field0.jpg"][1]
    src = extra.crops[extra.table["cell_name"].iloc[0]]
    for name, decision, pre in (("x_wbc.png", "not a white cell", ""), ("x_unsure.png", "unsure", ""),
                                ("x_confirm.png", "confirm", "")):
        Image.fromarray(src).save(runs / f"verified_cells/{SAMPLES[0]}/{name}")
        store.record_verification(SAMPLES[0], name, decision, "Dr Ana", field="field0.jpg", pre_call=pre,
                                  crop=f"verified_cells/{SAMPLES[0]}/{name}")
    store.record_verification(SAMPLES[0], "x_missing.png", "blast", "Dr Ana", field="field0.jpg",
                              crop=f"verified_cells/{SAMPLES[0]}/x_missing.png")
    (runs.parent / "outside.png").write_bytes((runs / f"verified_cells/{SAMPLES[0]}/x_wbc.png").read_bytes())
    store.record_verification(SAMPLES[0], "x_outside.png", "blast", "Dr Ana", field="field0.jpg",
                              crop="../outside.png")
    changed = images["field1.jpg"][1].table["cell_name"].iloc[0]
    store.record_verification(SAMPLES[0], changed, "not a white cell", "Dr Ben", field="field1.jpg")
    return {"runs": runs, "images": images, "kept": kept, "changed": changed, "model": mf.model}


def test_the_kept_model_input_is_the_training_input(verified):
    """The PNG kept per verified cell is exactly what `network_inputs(tiles=True)` makes at training from the
    cell's tile and context (the same features follow), and an unpadded paired crop is padded to it."""
    from core.data.imageio import read_image
    from core.image.preprocessing import crop_cell
    from core.smear.fields import cell_name
    from core.smear.segmentation import PAIR_TILE, segment_field
    from training.smear import network_inputs
    from training.teach import model_input

    img, fc = verified["images"]["field0.jpg"]
    cells = segment_field(img, "field0.jpg").cells
    x = network_inputs(crops=[crop_cell(c.crop, size=PAIR_TILE, margin=0) for c in cells],
                       contexts=[c.context for c in cells], tiles=True)
    for c, xi in zip(cells, x):
        kept = model_input(read_image(verified["kept"][cell_name("field0.jpg", c.number)]))
        assert np.array_equal(kept, xi)
    pair = x[0][(x.shape[1] - PAIR_TILE) // 2:][:PAIR_TILE]
    assert np.array_equal(model_input(pair), x[0])
    with pytest.raises(ValueError, match="not a smear model input"):
        model_input(np.zeros((100, 100, 3), np.uint8))


def test_verified_cells_take_each_cells_latest_decision_and_say_what_is_left_out(verified):
    from training.teach import verified_cells, verified_summary

    cells, counts = verified_cells(verified["runs"])
    assert verified["changed"] not in set(cells["cell_name"])  # re-decided "not a white cell" by Dr Ben
    assert counts["not a white cell"] == 2 and counts["unsure"] == 1 and counts["no class"] == 1
    assert counts["crop missing"] == 2  # x_missing (no file) and x_outside (a path out of the store)
    assert set(cells["label"]) == {"all", "hem"} and cells["photo"].nunique() == 4
    assert counts["blast"] + counts["normal"] == len(cells) + 2
    only_b, _ = verified_cells(verified["runs"], samples=[SAMPLES[1]])
    assert set(only_b["sample"]) == {SAMPLES[1]} and len(only_b) == (cells["sample"] == SAMPLES[1]).sum()
    s = verified_summary(verified["runs"])
    assert set(s["sample"]) == set(SAMPLES) and s["cells verified"].sum() == counts["cells"]
    assert s["usable"].sum() == len(cells) and "Dr Ben" in ", ".join(s["verifiers"])


def test_verified_cellset_one_photo_per_field_labelled_by_its_verified_blasts(verified):
    from training.teach import verified_cellset

    said = []
    cs = verified_cellset(verified["runs"], "mylab", progress=said.append, model=verified["model"])
    assert len(cs.table) == len(cs.feats) and cs.feats.shape[1] == 2560 and (cs.row_view == 0).all()
    assert set(cs.table["lab"]) == {"mylab"} and set(cs.table["label"]) == {"all", "hem"}
    labels = dict(zip(cs.photos["photo"].str.split("/").str[-1], cs.photos["label"]))
    assert labels == {"field0.jpg": "no_blasts", "field1.jpg": "blasts", "field2.jpg": "no_blasts",
                      "field3.jpg": "blasts"}
    assert cs.photos["cells_found"].sum() == len(cs.table)
    assert cs.photos.attrs["verified"]["crop missing"] == 2 and "2 crop missing" in said[-1]


def test_refit_refuses_what_cannot_make_a_refit(verified, tmp_path):
    from training.store import RunStore
    from training.teach import refit_from_verified

    empty = tmp_path / "empty"
    RunStore(empty)
    with pytest.raises(ValueError, match="no verified white cells"):
        refit_from_verified("smear", empty, None, "mylab", models_dir=tmp_path / "m")
    one_class = tmp_path / "blasts_only"
    store = RunStore(one_class)
    for i, (name, path) in enumerate(list(verified["kept"].items())[:6]):
        rel = f"verified_cells/s/{name}"
        (one_class / rel).parent.mkdir(parents=True, exist_ok=True)
        (one_class / rel).write_bytes(path.read_bytes())
        store.record_verification("s", name, "blast", "Dr Ana", field=f"f{i % 2}", crop=rel)
    with pytest.raises(ValueError, match="no verified normal cell"):
        refit_from_verified("smear", one_class, None, "mylab", models_dir=tmp_path / "m")
    one_field = tmp_path / "one_field"
    store = RunStore(one_field)
    for name, decision in (("c1.png", "blast"), ("c2.png", "normal")):
        (one_field / "verified_cells" / "s").mkdir(parents=True, exist_ok=True)
        (one_field / "verified_cells" / "s" / name).write_bytes(path.read_bytes())
        store.record_verification("s", name, decision, "Dr Ana", field="f0", crop=f"verified_cells/s/{name}")
    with pytest.raises(ValueError, match="1 field"):
        refit_from_verified("smear", one_field, None, "mylab", models_dir=tmp_path / "m")
    store.record_verification("s", "c2.png", "normal", "Dr Ana", field="f1", crop="verified_cells/s/c2.png")
    with pytest.raises(ValueError, match="leaves 1 to learn from"):  # one cell per field: no gate for the lab
        refit_from_verified("smear", one_field, None, "mylab", models_dir=tmp_path / "m")
    runs = verified["runs"]
    from core.decide.model_folder import SMEAR_DIR

    with pytest.raises(ValueError, match="is the base folder"):
        refit_from_verified("smear", runs, SMEAR_DIR, "mylab")
    (tmp_path / "taken").mkdir()
    with pytest.raises(ValueError, match="exists"):
        refit_from_verified("smear", runs, tmp_path / "taken", "mylab")
    for bad in ("../up", "", "a/b"):
        with pytest.raises(ValueError, match="lab name"):
            refit_from_verified("smear", runs, None, bad, models_dir=tmp_path / "m")
    with pytest.raises(ValueError, match="already learned"):
        refit_from_verified("smear", runs, None, "aria", models_dir=tmp_path / "m")
    assert not (tmp_path / "m").exists()  # nothing written by a refusal


@pytest.mark.slow
def test_the_dashboard_refit_needs_a_trainer_and_gives_a_version_classify_offers(verified, tmp_path, monkeypatch):
    import core.decide.model_folder as mf
    from dashboard import services
    from dashboard.auth import Actor, PermissionDenied

    models = tmp_path / "models"
    with pytest.raises(PermissionDenied, match="trainer"):
        services.refit_smear_from_verified(verified["runs"], "mylab", actor=Actor("v@lab.example", "viewer"),
                                           models_dir=models)
    assert not models.exists()
    (models / "mylab-v1").mkdir(parents=True)  # a version already there: the refit is the next one
    folder, card = services.refit_smear_from_verified(verified["runs"], "mylab", models_dir=models, n_folds=2,
                                                      actor=Actor("t@lab.example", "trainer"))
    assert folder == models / "mylab-v2" and sorted(p.name for p in models.iterdir()) == ["mylab-v1", "mylab-v2"]
    loaded = mf.load_model_folder(folder)  # safe mode
    assert (folder / "field_rule.json").is_file() and loaded.gate is not None
    assert [c["name"] for c in loaded.gate.novelty.components][-1] == "mylab"
    a = card["adaptation"]
    assert a["lab"] == "mylab" and a["photos"] == 4 and set(a["before"]) == set(a["after"]) == {"mylab"}
    on_disk = json.loads((folder / "card.json").read_text())
    assert on_disk["adaptation"]["after"]["mylab"]["photos"] == 4
    v = on_disk["verified"]
    assert v["refitted_by"] == "t@lab.example" and v["verifiers"] == ["Dr Ana"] and v["left_out"]["crop missing"] == 2
    assert "Taught from verified cells" in (folder / "card.md").read_text()
    cells = np.load(folder / "training_cells.npz")
    assert (cells["lab"] == "mylab").sum() == v["cells"] and set(cells["lab"]) >= {"aria", "mylab"}
    monkeypatch.setattr(mf, "MODELS_DIR", models)
    offered = services.smear_models()
    assert str(folder) in offered.values() and list(offered.values())[0] == mf.SMEAR

    from dashboard.teach_view import adaptation_table

    t = adaptation_table(a)
    assert len(t) == 2 and "balanced accuracy" in t.columns


@pytest.mark.parametrize("role", ["viewer", "trainer"])
def test_the_train_page_section_shows_the_verified_cells_and_refuses_in_words(verified, role, monkeypatch):
    """The section lists the verified cells per sample; a viewer is told why there is no refit button; a
    trainer's refit with a lab name that cannot name a folder is refused in words, nothing written (AppTest)."""
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CNMC_RUNS_DIR", str(verified["runs"]))
    monkeypatch.setenv("TEACH_TEST_ROLE", role)

    def section() -> None:
        import os

        from dashboard.auth import Actor
        from dashboard.settings import Settings
        from dashboard.teach_view import teach_ui

        teach_ui(Settings.from_env(), Actor("someone@lab.example", os.environ["TEACH_TEST_ROLE"]))

    at = AppTest.from_function(section, default_timeout=60).run()
    assert not at.exception, at.exception
    assert at.expander[0].label == "Teach the smear model from verified cells"
    assert set(at.dataframe[0].value["sample"]) == set(SAMPLES)
    if role == "viewer":
        assert not at.button and "needs the trainer role" in at.info[0].value
        return
    at.text_input(key="teach-lab").input("../elsewhere").run()
    at.button(key="teach-refit").click().run()
    assert not at.exception, at.exception
    assert "Not refitted: lab name" in at.error[0].value
