"""The printable report of one smear sample (`training.sample_report`): the sample id as typed (escaped, never from
file names), "Research use only" at top and bottom, per field and pooled counts with the blast share and its 95%
CI as percentages, pre-classified and verified (or "not verified"), the verifiers and the last verification time,
the model's card figures, a thumbnail per blast cell; the CSV with the same figures, both stages, formula-safe;
and `predict --fields --report` writing both files."""
from __future__ import annotations

import base64
import io
import re
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from core.smear.fields import POOLED, READOUT_COLUMNS, wilson_interval  # noqa: E402
from training.sample_report import (CSV_COLUMNS, MAX_THUMBNAILS, NO_SAMPLE_ID, card_figures,  # noqa: E402
                                    sample_report, verification_facts)

NOW = datetime(2026, 3, 4, 5, 6, 7, tzinfo=timezone.utc)
URI = "data:image/png;base64,"


def _row(field: str, white: int, judged: int, blasts: int, call: str, why: str, **extra) -> dict:
    low, high = wilson_interval(blasts, judged)
    return {"field": field, "white_cells": white, "judged": judged, "review": 0, "blasts": blasts,
            "blast_fraction": blasts / judged if judged else float("nan"), "blast_fraction_low": low,
            "blast_fraction_high": high, "call": call, "why": why, "blast_cells": "", "model": "tiny", **extra}


def _readout() -> pd.DataFrame:
    """Two fields and the pooled row, as `field_readout` gives them (paths as the CLI names fields)."""
    return pd.DataFrame([_row("/data/up/PATIENT-42_a.png", 10, 8, 3, "blasts", "3 blasts among 8 judged cells"),
                         _row("/data/up/PATIENT-42_b.png", 6, 4, 1, "blasts", "1 blast among 4 judged cells"),
                         _row(POOLED, 16, 12, 4, "blasts", "4 blasts among 12 judged cells in 2 fields")],
                        columns=READOUT_COLUMNS)


def _verified() -> pd.DataFrame:
    """The same sample after a person verified 9 cells (one removed as not a white cell, two blasts re-classed)."""
    return pd.DataFrame([_row("/data/up/PATIENT-42_a.png", 9, 8, 2, "blasts", "2 blasts among 8 judged cells",
                              verified=6, removed=1),
                         _row("/data/up/PATIENT-42_b.png", 6, 5, 0, "no blasts", "no blast among 5 judged cells",
                              verified=3, removed=0),
                         _row(POOLED, 15, 13, 2, "blasts", "2 blasts among 13 judged cells in 2 fields",
                              verified=9, removed=1)])


def _verifications() -> pd.DataFrame:
    """Decisions as `RunStore.verifications(sample)` gives them (oldest first; one later decision re-recorded)."""
    return pd.DataFrame({"id": [1, 2, 3, 4], "at": ["2026-03-01T09:00:00Z", "2026-03-02T14:30:00Z",
                                                    "2026-03-01T10:00:00Z", "2026-03-02T08:00:00Z"],
                         "sample": "k", "field": "PATIENT-42_a.png",
                         "cell_name": ["PATIENT-42_a_cell01.png", "PATIENT-42_a_cell02.png",
                                       "PATIENT-42_a_cell01.png", "PATIENT-42_b_cell01.png"],
                         "decision": ["confirm", "normal", "blast", "not a white cell"],
                         "verifier": ["Dr. Ann Lee", "B. Okafor", "Dr. Ann Lee", "B. Okafor"]})


def _pct(v: float) -> str:
    return f"{v * 100:.1f}%"


def _share(k: int, n: int) -> str:
    lo, hi = wilson_interval(k, n)
    return f"{_pct(k / n)} (95% CI {lo * 100:.1f}–{_pct(hi)})"


def _report(sample_id="S-1", **kw):
    kw.setdefault("model", "model tiny-smear")
    kw.setdefault("now", NOW)
    return sample_report(sample_id, _readout(), **kw)


def test_the_sample_id_is_shown_escaped_and_research_use_only_top_and_bottom():
    evil = '<script>alert("x")</script> & <img src=x onerror=alert(1)>'
    r = _report(evil, made_by="tech <b>1</b>")
    assert "<script" not in r.html.lower() and "onerror=alert" not in r.html.replace("onerror=alert(1)&gt;", "")
    assert "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &lt;img src=x onerror=alert(1)&gt;" in r.html
    assert "tech &lt;b&gt;1&lt;/b&gt;" in r.html
    first, last = r.html.index("Research use only: not a diagnostic device"), \
        r.html.rindex("Research use only: not a diagnostic device")
    assert first < r.html.index("<h1>") and last > r.html.index("<footer>")
    assert re.search(r"http[s]?://|<link|@import|<script|src=['\"](?!data:)", r.html) is None  # self-contained
    assert "@media print" in r.html
    assert pd.read_csv(io.StringIO(r.csv))["sample_id"].eq(evil).all()  # the CSV keeps it as typed


@pytest.mark.parametrize("given", ["", "   "])
def test_without_a_sample_id_the_report_says_so_and_never_takes_one_from_file_names(given):
    r = _report(given)
    assert re.search(r"<th>Sample</th><td><i>" + NO_SAMPLE_ID + "</i></td>", r.html)
    assert "PATIENT-42</" not in r.html and "PATIENT-42_a.png" in r.html  # the field's name, shown as a field
    assert r.rows["sample_id"].eq("").all()
    assert pd.read_csv(io.StringIO(r.csv))["sample_id"].isna().all()


def test_pooled_and_per_field_counts_with_the_ci_as_percentages_and_not_verified():
    r = _report()
    assert _share(4, 12) in r.html and _share(3, 8) in r.html and _share(1, 4) in r.html
    pooled = re.search(r"<tr class='pooled'>(.*?)</tr>", r.html).group(1)
    assert [int(x) for x in re.findall(r"<td>(\d+)</td>", pooled)] == [16, 12, 0, 4]  # found, judged, review, blasts
    assert "PATIENT-42_a.png" in r.html and "/data/up" not in r.html  # fields by name, not by local path
    assert "not verified" in r.html
    assert "Research use only" in r.html and "2026-03-04 05:06:07 UTC" in r.html
    assert set(r.rows["stage"]) == {"pre-classified"}


def test_verified_counts_verifiers_and_the_last_verification_time():
    r = _report(verified=_verified(), verifications=_verifications(), model_sha256="ab12" * 16,
                made_by="lab tech 3")
    assert "not verified" not in r.html
    tables = re.findall(r"<tr class='pooled'>(.*?)</tr>", r.html)
    assert len(tables) == 2
    assert [int(x) for x in re.findall(r"<td>(\d+)</td>", tables[1])] == [15, 13, 9, 1, 2]  # verified, removed
    assert _share(2, 13) in r.html and _share(0, 5) in r.html
    assert "Dr. Ann Lee; B. Okafor" in r.html and "2026-03-02T14:30:00Z" in r.html  # the latest, not the last row
    assert "4 decisions on 3 cells" in r.html
    assert ("ab12" * 4) in r.html and ("ab12" * 16) not in r.html  # a SHA-256 prefix
    assert "lab tech 3" in r.html
    facts = verification_facts(_verifications())
    assert (facts.verifiers, facts.decisions, facts.cells, facts.latest) == (
        ["Dr. Ann Lee", "B. Okafor"], 4, 3, "2026-03-02T14:30:00Z")
    assert verification_facts(None).decisions == 0


def test_the_csv_parses_back_with_the_same_figures_and_both_stages():
    r = _report(verified=_verified(), verifications=_verifications())
    back = pd.read_csv(io.StringIO(r.csv))
    assert list(back.columns) == CSV_COLUMNS
    assert list(back["stage"]) == ["pre-classified"] * 3 + ["verified"] * 3
    assert list(back["field"]) == ["PATIENT-42_a.png", "PATIENT-42_b.png", POOLED] * 2
    for stage, table in (("pre-classified", _readout()), ("verified", _verified())):
        got = back[back["stage"] == stage].reset_index(drop=True)
        for col in ("white_cells", "judged", "blasts", "blast_fraction", "blast_fraction_low", "blast_fraction_high"):
            assert got[col].to_numpy() == pytest.approx(table[col].to_numpy(dtype=float)), (stage, col)
        assert list(got["call"]) == list(table["call"])
    ver = back[back["stage"] == "verified"]
    assert list(ver["verified"]) == [6, 3, 9] and list(ver["removed"]) == [1, 0, 1]
    assert back.loc[back["stage"] == "pre-classified", ["verified", "removed", "verifiers"]].isna().all().all()
    assert ver["verifiers"].eq("Dr. Ann Lee; B. Okafor").all() and ver["verified_at"].eq("2026-03-02T14:30:00Z").all()
    assert back["sample_id"].eq("S-1").all() and back["model"].eq("model tiny-smear").all()
    assert back["created_at"].eq("2026-03-04T05:06:07+00:00").all()


def test_formula_looking_values_are_escaped_in_the_csv_only():
    readout = _readout()
    readout.loc[0, "field"] = "/up/=cmd|calc!A0.png"
    readout.loc[1, "field"] = "-b.png"
    verifications = _verifications().assign(verifier="+Mallory")
    r = sample_report('=HYPERLINK("http://evil.example","x")', readout, verified=_verified(),
                      verifications=verifications, model="@model", now=NOW)
    back = pd.read_csv(io.StringIO(r.csv))
    assert back["sample_id"].eq('\'=HYPERLINK("http://evil.example","x")').all()
    assert list(back.loc[:1, "field"]) == ["'=cmd|calc!A0.png", "'-b.png"]
    assert back["model"].eq("'@model").all()
    assert back.loc[back["stage"] == "verified", "verifiers"].eq("'+Mallory").all()
    assert back["blast_fraction"].dtype.kind == "f"  # numbers stay numbers
    assert "=HYPERLINK(&quot;http://evil.example&quot;,&quot;x&quot;)" in r.html  # the page shows it as typed


def test_a_thumbnail_per_blast_cell_with_its_name_small_and_capped():
    from PIL import Image

    rng = np.random.default_rng(0)
    crops = {f"PATIENT-42_a_cell{i:02d}.png": rng.integers(0, 255, (224, 448, 3), dtype=np.uint8) for i in (1, 2, 3)}
    crops["PATIENT-42_b_cell01.png"] = rng.integers(0, 255, (50, 50), dtype=np.uint8)  # grey works too
    readout = _readout()
    r = sample_report("S-1", readout, model="m", blast_thumbnails=crops, now=NOW)
    uris = re.findall(r"src='(data:image/png;base64,[^']+)'", r.html)
    assert len(uris) == r.html.count(URI) == 4
    for name in crops:
        assert f"<figcaption>{name}</figcaption>" in r.html
    for uri in uris:
        im = Image.open(io.BytesIO(base64.b64decode(uri[len(URI):])))
        assert max(im.size) <= 96
    many = {f"c{i:03d}.png": np.zeros((20, 20, 3), np.uint8) for i in range(MAX_THUMBNAILS + 12)}
    readout.loc[readout.index[-1], "blasts"] = len(many)
    r = sample_report("S-1", readout, model="m", blast_thumbnails=many, now=NOW)
    assert r.html.count(URI) == MAX_THUMBNAILS and "12 more cells called blast are not shown" in r.html
    assert URI not in sample_report("S-1", _readout(), model="m", now=NOW).html


def test_card_figures_are_the_figures_on_data_the_model_never_saw():
    from core.decide.model_folder import read_card

    smear = card_figures(read_card("smear"))
    text = "\n".join(smear)
    assert "no independent check yet" in text and "cross-validation by photo" in text
    assert "ALL-IDB1: 54 photos" in text and "23/24" in text and "nan" not in text.lower()
    starter = "\n".join(card_figures(read_card("starter")))
    assert "weighted F1 0.656" in starter and "leave-subjects-out" in starter and "weighted F1 0.830" in starter
    assert "**" not in starter
    assert card_figures(None) == card_figures({}) and "No model card" in card_figures({})[0]
    r = _report(card=read_card("smear"))
    assert "ALL-IDB1: 54 photos" in r.html and "smear-three-labs" in r.html


def test_write_puts_the_csv_beside_the_page(tmp_path):
    page, table = _report().write(tmp_path / "out" / "R.html")
    assert page == tmp_path / "out" / "R.html" and table == tmp_path / "out" / "R.csv"
    assert "S-1" in page.read_text(encoding="utf-8") and len(pd.read_csv(table)) == 3


# --- the CLI ------------------------------------------------------------------------------------------------------
def _field_files(folder: Path) -> None:
    """One generated smear field with three white cells and a bad file (as tests/test_fields.py does)."""
    from PIL import Image

    from core.smear.synthetic_fields import synth_field

    folder.mkdir()
    img, _ = synth_field(seed=5, wbc=3, touching_pairs=0, border_cells=0)
    Image.fromarray(img).save(folder / "smear_a.png")
    (folder / "broken.jpg").write_bytes(b"not an image")


def _tiny_folder(path: Path) -> Path:
    """A tiny untrained smear model folder whose threshold 0 calls every judged cell blast."""
    from core.decide.calibration import DecisionRule
    from core.decide.model_folder import save_model_folder
    from core.nets.augmentation import AugmentSpec
    from core.nets.models import create_model

    model = create_model("solution_a", 32, augment=AugmentSpec(), standardize=True, filters=(4, 4, 4, 4))
    card = {"name": "tiny-smear", "input": {"size": 32, "crop_margin": 0}}
    return save_model_folder(path, model, DecisionRule(threshold=0.0, band=0.0, fitted_on="unit test"), card,
                             "# tiny smear model\n")


def test_predict_fields_report_writes_the_page_and_its_csv(tmp_path, monkeypatch, capsys):
    import core.decide.model_folder as mf
    from training.cli import fields_csv_path, main

    monkeypatch.setattr(mf, "SMEAR_DIR", _tiny_folder(tmp_path / "smear"))
    _field_files(tmp_path / "fields")
    out, page = tmp_path / "calls.csv", tmp_path / "R.html"
    rc = main(["predict", "smear", str(tmp_path / "fields"), "--fields", str(tmp_path / "crops"), "--out", str(out),
               "--runs-dir", str(tmp_path / "runs"), "--report", str(page), "--sample-id", "S-1"])
    assert rc == 0
    printed = capsys.readouterr().out
    assert str(page) in printed and str(tmp_path / "R.csv") in printed
    readout = pd.read_csv(fields_csv_path(out))
    pooled = readout[readout["field"] == POOLED].iloc[0]
    html = page.read_text(encoding="utf-8")
    assert "S-1" in html and "Research use only" in html and "smear_a.png" in html and "not an image" in html
    pooled_row = re.search(r"<tr class='pooled'>(.*?)</tr>", html).group(1)
    assert int(re.findall(r"<td>(\d+)</td>", pooled_row)[0]) == pooled["white_cells"] >= 1
    cells = pd.read_csv(out)
    assert html.count(URI) == int((cells["prediction"] == "all").sum()) == pooled["blasts"]
    for name in cells["path"].map(lambda p: Path(p).name):
        assert f"<figcaption>{name}</figcaption>" in html
    back = pd.read_csv(tmp_path / "R.csv")
    assert set(back["stage"]) == {"pre-classified"} and back["sample_id"].eq("S-1").all()
    assert back.loc[back["field"] == POOLED, "white_cells"].item() == pooled["white_cells"]
    assert back["model"].str.contains("tiny-smear").all()


def test_predict_report_needs_fields_and_sample_id_needs_report(tmp_path, capsys):
    from training.cli import main

    assert main(["predict", "starter", str(tmp_path), "--report", str(tmp_path / "R.html")]) == 2
    assert "--fields" in capsys.readouterr().err
    assert main(["predict", "starter", str(tmp_path), "--sample-id", "S-1"]) == 2
    assert "--report" in capsys.readouterr().err
    assert main(["predict", "smear", str(tmp_path), "--fields", str(tmp_path / "c"), "--report",
                 str(tmp_path / "R.html"), "--out", str(tmp_path / "R.csv")]) == 2
    assert "choose another name" in capsys.readouterr().err
