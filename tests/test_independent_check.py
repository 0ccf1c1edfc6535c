"""The independent check on new patients: the cards' slot, the card text written from it, and Classify showing it
before the cross-validated figures (issue 22, item 1)."""
import json
from pathlib import Path

import pytest

from core.decide.model_folder import (CHECK_HEADING, CHECK_PENDING, NO_CHECK_YET, SMEAR_DIR, STARTER_DIR,
                               independent_check_section, independent_check_summary, load_independent_check,
                               read_card, read_independent_check)

ROOT = Path(__file__).resolve().parent.parent
SENTENCE = "On a new patient, expect about two cells in three to be called right."
CHECK = {"data": "cells of other patients", "cells": 96, "patients": 45, "all": 50, "hem": 46, "assessed": 95,
         "weighted_f1": 0.656, "accuracy": 0.656, "roc_auc": 0.772, "sensitivity": 0.67, "specificity": 0.65,
         "ece": 0.17, "run_by": "outside this repository", "summary": SENTENCE, "cv_overstated_by_weighted_f1": 0.17}


def _packager():
    from training import package  # `python -m training package`: the packager of shipped models

    return package


def test_starter_card_json_holds_the_independent_check():
    check = read_independent_check("starter")
    assert check is not None
    want = {"cells": 96, "patients": 45, "all": 50, "hem": 46, "assessed": 95, "weighted_f1": 0.656,
            "accuracy": 0.656, "roc_auc": 0.772, "sensitivity": 0.67, "specificity": 0.65, "ece": 0.17,
            "run_by": "outside this repository", "summary": SENTENCE, "cv_overstated_by_weighted_f1": 0.17}
    assert {k: check[k] for k in want} == want
    assert check["data"] and "fold 1" in check["data"]
    # the fields the code reads are untouched
    card = read_card("starter")
    assert card["input"]["size"] == 64 and card["calibration"]["threshold"] == 0.5
    assert json.loads((STARTER_DIR / "decision_rule.json").read_text())["threshold"] == 0.5


def test_starter_card_md_puts_the_check_before_the_cross_validation():
    md = (STARTER_DIR / "card.md").read_text()
    assert md.index(CHECK_HEADING) < md.index("0.830 [") and md.index(CHECK_HEADING) < md.index("cross-validation on")
    section = md[md.index(CHECK_HEADING):md.index("## Data")]
    for part in ("an independent check on 96 cells of 45 patients outside fold 1, run outside this repository",
                 "weighted F1 0.656", "accuracy 0.656", "ROC AUC 0.772", "sensitivity 0.67", "specificity 0.65",
                 "ECE 0.17", "95 of 96 cells assessed", "50 `all`, 46 `hem`", f"**{SENTENCE}**",
                 "overstated this by about 0.17 weighted F1", "review band does not catch them"):
        assert part.lower() in section.lower(), part
    # the card is what `training package` writes from card.json (one source for both)
    assert _packager().card_markdown(read_card("starter")) == md


def test_smear_card_keeps_the_slot_and_loads():
    card = read_card("smear")
    assert "independent_check" in card and read_independent_check(card) is None
    assert card["crop_margin"] == 0  # what the code reads is unchanged
    md = (SMEAR_DIR / "card.md").read_text()
    assert CHECK_HEADING in md and CHECK_PENDING in md and md.index(CHECK_HEADING) < md.index("## Measured")
    assert NO_CHECK_YET in independent_check_summary(card)


def test_helper_text_with_and_without_a_check():
    none = independent_check_section({"independent_check": None})
    assert none.startswith(CHECK_HEADING) and "not yet run" in none and "overstates new patients" in none
    assert "not yet run" in independent_check_section({})  # an old card without the slot
    given = independent_check_section({"independent_check": CHECK})
    for part in ("96 cells of 45 patients", "run outside this repository", "weighted F1 0.656", "ROC AUC 0.772",
                 "ECE 0.17", SENTENCE, "about 0.17 weighted F1"):
        assert part in given, part
    assert "not yet run" not in given
    summary = independent_check_summary({"independent_check": CHECK})
    assert SENTENCE in summary and "0.656" in summary and "0.772" in summary and "0.17" in summary
    assert "no independent check yet" in independent_check_summary({"independent_check": None})


def test_load_independent_check_reads_a_file_or_a_card(tmp_path):
    f = tmp_path / "check.json"
    f.write_text(json.dumps(CHECK))
    assert load_independent_check(f) == CHECK
    f.write_text(json.dumps({"name": "x", "independent_check": CHECK}))  # a whole card.json
    assert load_independent_check(f) == CHECK
    f.write_text("null")
    assert load_independent_check(f) is None
    f.write_text(json.dumps({"cells": 3}))
    with pytest.raises(ValueError, match="weighted_f1"):
        load_independent_check(f)


def _starter_card(check=None) -> dict:
    card = read_card("starter")
    card["independent_check"] = check
    return card


def test_packager_card_keeps_the_slot():
    ms = _packager()
    md = ms.card_markdown(_starter_card(None))
    assert CHECK_HEADING in md and CHECK_PENDING in md and md.index(CHECK_HEADING) < md.index("## Data")
    md = ms.card_markdown(_starter_card(CHECK))
    assert SENTENCE in md and "weighted F1 0.656" in md and "not yet run" not in md


def test_packager_refuses_a_bad_check_file_before_training(tmp_path, capsys):
    bad = tmp_path / "check.json"
    bad.write_text("[1, 2]")
    from training.cli import main

    assert main(["package", str(tmp_path), "--bench", str(tmp_path / "none"), "--independent-check", str(bad)]) == 2
    assert "--independent-check" in capsys.readouterr().err


def test_model_quality_service_reads_the_card():
    from dashboard import services

    text = services.model_quality("starter")
    assert "expect about two cells in three to be called right" in text
    assert text.index("0.656") < text.index("overstated") and "45 patients outside fold 1" in text
    assert "no independent check yet" in services.model_quality("smear")


@pytest.mark.slow
@pytest.mark.skipif(not (STARTER_DIR / "model.keras").exists(), reason="no shipped starter model in models/starter")
def test_classify_shows_the_independent_check_with_the_starter(monkeypatch, tmp_path):
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("CNMC_RUNS_DIR", str(tmp_path / "runs"))
    monkeypatch.setenv("CNMC_DEMO_DATA", str(tmp_path / "demo"))
    monkeypatch.setenv("CNMC_DATA_ROOTS", str(tmp_path / "no-roots"))
    at = AppTest.from_file(str(ROOT / "streamlit_app.py"), default_timeout=300)
    at.run()
    assert not at.exception, at.exception
    assert at.radio[0].value.startswith("Starter model")
    shown = " ".join(i.value for i in at.info)
    assert "expect about two cells in three to be called right" in shown
    for part in ("0.656", "0.772", "ECE 0.17", "45 patients outside fold 1", "overstated"):
        assert part in shown, part
