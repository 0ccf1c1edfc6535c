"""What the pages call: model bundles, classification of uploads, run progress, evaluations, data overviews.

Everything here returns plain data (DataFrames, arrays, dicts); the pages only lay it out. Every write a page
asks for goes through `page_store` (a short lock budget, refused under maintenance: `StoreUnavailable` saying
why) and names its actor.
"""
from __future__ import annotations

import json
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pandas as pd

from core.data.labels import CLASSES, DECISIONS
from core.image.preprocessing import load_crop
from dashboard.auth import Actor, PermissionDenied, require  # noqa: F401 - PermissionDenied: what pages catch
from dashboard.csv_export import escape_cells
from training.config import RunConfig
from training.store import RunStore, StoreUnavailable  # noqa: F401 - StoreUnavailable: what pages catch


# --- models -----------------------------------------------------------------------------------------------------
@dataclass
class ModelBundle:
    models: list  # one model, or an ensemble's members (P(all) is their mean)
    rule: Any
    size: int
    description: str
    gate: Any = None  # core.decide.gate.Gate: which images the model may judge (None: judges every image)
    model_path: str | None = None
    model_sha256: str | None = None  # for the audit trail
    margin: int = 100  # the crop margin the model was trained with (RunConfig.crop_margin)
    field_rule: Any = None  # core.decide.calibration.CallRule a smear folder was fitted with (None: the default)
    _cam: Any = field(default=None, repr=False)

    def __post_init__(self):
        if self.model_sha256 is None and self.model_path:
            from training.audit import model_sha256

            self.model_sha256 = model_sha256(self.model_path)

    @property
    def model(self):
        return self.models[0]

    @property
    def cam(self):
        if self._cam is None:
            from core.nets.explain import gradcam_for

            self._cam = gradcam_for(self.models)
        return self._cam


def starter_available() -> bool:
    from core.decide.model_folder import STARTER, shipped_available

    return shipped_available(STARTER)


def smear_available() -> bool:
    """Whether the shipped smear model (`models/smear/`) is installed: it lands later than the code using it."""
    from core.decide.model_folder import SMEAR, shipped_available

    return shipped_available(SMEAR)


def load_shipped_bundle(name: str) -> tuple[ModelBundle, str]:
    """A shipped model folder (`starter`: real C-NMC cells; `smear`: white cells cut from smear photos) and its
    model card (markdown); the crop margin is the one its card names."""
    from core.decide.model_folder import MODEL_FILE, load_model_folder

    from core.decide.model_folder import shipped

    mf = load_model_folder(name)
    label = mf.card.get("name", name)
    what = (f"shipped {name} model {label}" if str(name) in shipped() else f"smear model {label} ({mf.folder.name})") \
        + (f" (an ensemble of {len(mf.models)})" if len(mf.models) > 1 else "")
    return ModelBundle(mf.models, mf.rule, mf.size, what, mf.gate, str(mf.folder / MODEL_FILE),
                       margin=mf.crop_margin, field_rule=mf.field_rule), mf.card_markdown


def load_starter_bundle() -> tuple[ModelBundle, str]:
    """The shipped starter model (trained on real C-NMC cells) and its model card (markdown)."""
    from core.decide.model_folder import STARTER

    return load_shipped_bundle(STARTER)


def load_smear_bundle(ref: str | None = None) -> tuple[ModelBundle, str]:
    """A smear model (the shipped one, or a lab's refit: `smear_models`) and its model card (markdown)."""
    from core.decide.model_folder import SMEAR

    return load_shipped_bundle(ref or SMEAR)


def smear_models() -> dict[str, str]:
    """The smear models Classify offers for field cells, label -> folder: the shipped one first, then every
    other folder under models/ made by `python -m training smear-model` (a lab's refit is a new folder there)."""
    import core.decide.model_folder as mf

    out = {}
    if smear_available():
        out[f"shipped smear model ({mf.read_card(mf.SMEAR).get('name', 'smear')})"] = mf.SMEAR
    if mf.MODELS_DIR.is_dir():
        for folder in sorted(p for p in mf.MODELS_DIR.iterdir() if p.is_dir()):
            if folder.resolve() == mf.SMEAR_DIR.resolve() or not (folder / mf.MODEL_FILE).is_file():
                continue
            if (folder / mf.FIELD_RULE_FILE).is_file():
                out[f"{mf.read_card(folder).get('name', folder.name)} (models/{folder.name})"] = str(folder)
    return out


def model_quality(name: str) -> str:
    """What to expect of a shipped model (or a model folder) on new patients, in plain words from its card.json:
    its independent check's figures and plain sentence, and how much cross-validation overstated them; or that
    it has no independent check yet. Shown before the card's cross-validated figures."""
    from core.decide.model_folder import independent_check_summary, read_card

    return independent_check_summary(read_card(name))


def field_model(chosen: ModelBundle, smear: Callable[[], ModelBundle] | None = None,
                use_smear: bool = True) -> tuple[ModelBundle, str]:
    """The model for the input, the one rule: single (C-NMC-style) cells go to the model chosen on the page (the
    shipped starter by default); a smear field's white cells go to the shipped smear model (`models/smear/`,
    trained on cells cut from smear photos by the same segmentation) when it is installed, `use_smear` is on and
    `smear` (a loader: the page's cached one) is given; else to the chosen model. Returns (the field model, a
    note saying which model judges the field cells and why)."""
    if use_smear and smear is not None and smear_available():
        try:
            bundle = smear()
        except (FileNotFoundError, ValueError, OSError) as exc:
            return chosen, (f"The shipped smear model could not be loaded ({exc}): field cells are judged by "
                            f"{chosen.description}.")
        return bundle, (f"Field cells are judged by {bundle.description}, trained on white cells cut from smear "
                        f"photos; single cells by {chosen.description}.")
    if not smear_available():
        return chosen, (f"Field cells are judged by {chosen.description}: no shipped smear model is installed "
                        "(models/smear/), so the model for single cells judges them too; cells unlike its training "
                        "cells are not judged.")
    return chosen, (f"Field cells are judged by {chosen.description} (the shipped smear model is switched off).")


def load_run_bundle(run_id: str, runs_dir: str | Path) -> ModelBundle:
    from training.evaluate import resolve_model

    from training.evaluate import crop_margin_of

    store = RunStore(runs_dir)
    return ModelBundle(*resolve_model(run_id, store), margin=crop_margin_of(run_id, store))


def load_uploaded_bundle(name: str, data: bytes) -> ModelBundle:
    """A user's `.keras` file, loaded in safe mode (no code execution); a clear error if it is not one."""
    from core.decide.calibration import DecisionRule
    from core.nets.models import load_model

    if not name.endswith(".keras"):
        raise ValueError(f"{name}: expected a .keras model file")
    with tempfile.NamedTemporaryFile(suffix=".keras", delete=False) as fh:
        fh.write(data)
    try:
        model = load_model(fh.name)
    except Exception as exc:  # noqa: BLE001 - any loading failure is reported to the user, named
        raise ValueError(f"{name}: cannot be loaded as a Keras model in safe mode ({exc})") from exc
    finally:
        Path(fh.name).unlink(missing_ok=True)
    shape = model.inputs[0].shape
    if len(shape) != 4 or shape[1] != shape[2] or shape[3] != 3:
        raise ValueError(f"{name}: expects input {tuple(shape)}, not square RGB crops")
    from training.audit import sha256_of

    return ModelBundle([model], DecisionRule(), int(shape[1]), f"uploaded model {name}", model_sha256=sha256_of(data))


def page_store(runs_dir: str | Path) -> RunStore:
    """The run store as pages write it: "busy, try again" within seconds, never a page hanging for minutes
    behind another writer; "under maintenance" while a restore holds its lock."""
    return RunStore.for_page(runs_dir)


def audit_trail(runs_dir: str | Path, *, actor: Actor) -> pd.DataFrame:
    """Every classification recorded (the admin role: it names files and who classified them)."""
    require(actor, "audit")
    return RunStore(runs_dir).classifications()


def completed_runs(runs_dir: str | Path) -> pd.DataFrame:
    runs = RunStore(runs_dir).list_runs()
    return runs[runs["status"] == "completed"].reset_index(drop=True)


def run_label(row) -> str:
    name = f" · {row['name']}" if row.get("name") else ""
    return f"{row['id']} · {row['architecture']}{name}"


# --- classification -----------------------------------------------------------------------------------------------
@dataclass
class Classified:
    table: pd.DataFrame  # one row per file, errors included (smear fields are in `fields` instead)
    crops: dict[str, np.ndarray]
    overlays: dict[str, np.ndarray]  # Grad-CAM blended onto the crop (when asked for); field cells too
    subjects: pd.DataFrame
    fields: list = field(default_factory=list)  # core.smear.fields.FieldCalls, one per uploaded smear field
    subject_corrected: int = 0  # calls that also used the same subject's other cells (the rule's correction)
    # core.smear.fields.field_readout: one row per field (white cells, judged, blasts, fraction with CI, call, why,
    # blast cells, model) and the pooled row "all fields" (one upload: one patient); empty without fields
    field_readout: pd.DataFrame = field(default_factory=pd.DataFrame)
    field_sha256: dict = field(default_factory=dict)  # field -> its file's SHA-256 (what names the sample)
    field_model: str = ""  # which model judged the field cells, and its SHA-256 (the verification's record)
    field_model_sha256: str = ""
    field_rule: Any = None  # the field call rule and the cells' decision threshold of that model
    field_threshold: float = 0.5


def screen_uploads(uploads) -> tuple[dict[str, str], set[str]]:
    """(uploads refused before decoding, label -> why; uploads too large for a cell, taken as fields) under this
    server's limits (`dashboard.uploads.screen`): the server refuses the per-file bytes in a browser; anything else
    that hands files over (a test, a script) meets the same limits in the same words."""
    from core.data.imageio import MAX_PIXELS
    from dashboard import uploads as up
    from dashboard.settings import MAX_CELL_PIXELS, max_upload_mb, max_upload_total_mb

    return up.screen(uploads, max_upload_mb(), max_upload_total_mb(), MAX_CELL_PIXELS, MAX_PIXELS)


def upload_refusals(uploads) -> dict[str, str]:
    """The uploads `screen_uploads` refuses, label -> why."""
    return screen_uploads(uploads)[0]


def upload_limits() -> str:
    """The limits an upload meets, in the uploader's words (the server's bytes, the header's pixels)."""
    from core.data.imageio import MAX_PIXELS
    from dashboard.settings import MAX_CELL_PIXELS, max_upload_mb, max_upload_total_mb

    return (f"up to {max_upload_mb()} MB per image and {max_upload_total_mb()} MB per upload; "
            f"{MAX_CELL_PIXELS / 1e6:.0f} megapixels per cell, {MAX_PIXELS / 1e6:.0f} per smear field "
            "(16-bit images count twice)")


def classify_uploads(bundle: ModelBundle, files: list[tuple[str, bytes]], gradcam: bool = False,
                     runs_dir: str | Path | None = None, as_fields: bool = False,
                     normalize_stain: bool = False, field_bundle: ModelBundle | None = None, *,
                     actor: Actor, upload_keys: list[str] | dict[str, str] | None = None,
                     progress: Callable[[str], None] | None = None) -> Classified:
    """Classify uploaded cells and smear photos; a file that cannot be read (or is over the upload limit) gets its
    own error row and the others go on.

    An upload that is not one cell on a black background (`core.decide.gate.on_black`: a smear photo, dense or
    sparse) is a smear field, as is every readable upload with `as_fields`: it is segmented and each white cell it
    holds classified by `field_bundle` (`field_model` picks it; the cells' model without one) (`core.smear.fields`;
    `normalize_stain` brings the cells' crops toward C-NMC's stain first), and read out per field and pooled over
    the upload (`Classified.field_readout`; with `as_fields` an unreadable upload is a field that cannot be
    judged). Each cell gets an audit record in the run store at `runs_dir` (name and SHA-256 of the uploaded file
    only; pixels are not kept), its source naming the signed-in `actor` (needs the viewer role); with
    `upload_keys` (per upload, in order: what identifies it, e.g. the uploader's file id) the same upload
    classified again on a rerun is recorded once. `progress` hears what is being done, in words that count photos
    and cells.

    Uploads are told apart by position, never by name: two files named `cell.bmp` are two rows (`cell.bmp` and
    `cell.bmp (2)`), two crops and two audit records, each under the user's name `cell.bmp` with its own SHA-256.
    Bytes and pixels are checked before decoding (`screen_uploads`)."""
    require(actor, "classify")
    say = progress or (lambda _msg: None)
    uploads = _labelled(files, upload_keys)
    refused, big = screen_uploads(uploads)
    images, unreadable = _decode(uploads, refused)
    fields = [u.label for u in uploads
              if u.label in images and (as_fields or u.label in big or not _on_black(images[u.label]))]
    cells = [u for u in uploads if u.label not in refused and u.label not in fields]
    kept = _Kept(gradcam)
    if cells:
        say(f"Classifying {len(cells)} single cell{'' if len(cells) == 1 else 's'}…")
    table = _classify_cells(bundle, [(u.label, images.get(u.label, u.data)) for u in cells], refused,
                            [u.label for u in uploads], kept)
    fb = field_bundle or bundle
    failed = {**refused, **unreadable} if as_fields else {}  # uploads meant as fields that cannot be read
    field_calls, readout = _classify_fields(fb, [(label, images[label]) for label in fields], failed,
                                            [u.label for u in uploads], normalize_stain, kept, say)
    if runs_dir is not None:
        _audit(page_store(runs_dir), uploads, table, field_calls, bundle, fb, actor, upload_keys is not None,
               f"fields={as_fields};stain={normalize_stain}")
    from core.nets.explain import overlay
    from core.decide.metrics import subject_readout

    overlays = {name: overlay(kept.crops[name], h) for name, h in kept.heat.items()}
    known = table[table["subject"].notna() & table["prediction"].notna()]  # refused and failed images have no call
    subjects = subject_readout(known.assign(path=known["file"], prob_all=known["calibrated_prob_blast"]),
                               bundle.rule.threshold) if len(known) else pd.DataFrame()
    corrected = table.get("subject_corrected", pd.Series(dtype=object)).fillna(False).astype(bool).sum()
    import hashlib

    data = {u.label: u.data for u in uploads}
    digests = {fc.name: hashlib.sha256(data[fc.name]).hexdigest() for fc in field_calls}
    return Classified(table, kept.crops, overlays, subjects, field_calls, int(corrected), readout, digests,
                      fb.description, fb.model_sha256 or "", fb.field_rule, float(fb.rule.threshold))


def _on_black(image: np.ndarray) -> bool:
    from core.decide.gate import on_black

    return on_black(image)


def _decode(uploads, refused: dict[str, str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(label -> pixels, label -> why it could not be read) for the uploads not refused before decoding."""
    from core.data.imageio import read_image

    images, bad = {}, {}
    for u in uploads:
        if u.label in refused:
            continue
        try:
            images[u.label] = read_image(u.data, u.label)
        except (OSError, ValueError) as exc:
            bad[u.label] = str(exc).removeprefix(f"{u.label}: ")
    return images, bad


@dataclass
class _Kept:
    """The crops every model saw and, with `gradcam`, their Grad-CAM heatmaps (a model without Grad-CAM is said
    once, in `cam_errors`)."""

    gradcam: bool
    crops: dict = field(default_factory=dict)
    heat: dict = field(default_factory=dict)
    cam_errors: dict = field(default_factory=dict)

    def hook(self, model: ModelBundle):
        def keep(names, batch):
            self.crops.update(zip(names, batch))
            if self.gradcam and model.description not in self.cam_errors:
                try:
                    self.heat.update(zip(names, model.cam(batch)[1]))
                except ValueError as exc:  # e.g. the smear model's two branches: said on the page, not hidden
                    self.cam_errors[model.description] = f"Grad-CAM is not available for {model.description}: {exc}"
        return keep


def _classify_cells(bundle: ModelBundle, items: list, refused: dict[str, str], order: list[str],
                    kept: _Kept) -> pd.DataFrame:
    """Single cells on black, one row each in upload order, with a row for each upload refused before decoding."""
    from core.decide.inference import RESULT_COLUMNS, classify

    table = classify(bundle.models, items, bundle.size, bundle.rule, on_chunk=kept.hook(bundle), gate=bundle.gate,
                     margin=bundle.margin) if items else pd.DataFrame(columns=RESULT_COLUMNS)
    if refused:
        rows = pd.DataFrame([{"name": n, "error": why} for n, why in refused.items()], columns=RESULT_COLUMNS)
        rank = {label: i for i, label in enumerate(order)}
        table = pd.concat([table, rows], ignore_index=True).sort_values(
            "name", key=lambda s: s.map(rank)).reset_index(drop=True)
    return table.rename(columns={"name": "file", "prob_all": "prob_blast",
                                 "prob_all_calibrated": "calibrated_prob_blast", "uncertain": "review_manually"})


def _classify_fields(fb: ModelBundle, images: list[tuple[str, np.ndarray]], failed: dict[str, str],
                     order: list[str], normalize_stain: bool, kept: _Kept, say: Callable[[str], None]):
    """Each smear field segmented and its white cells classified by `fb`; (FieldCalls per field, the read-out per
    field and pooled, with the uploads meant as fields that could not be read)."""
    from core.smear.fields import classify_field, fields_readout

    field_calls, found = [], 0
    for i, (name, image) in enumerate(images, 1):
        say(f"Smear photo {i} of {len(images)} ({name}): finding and classifying its white cells"
            + (f"; {found} found so far" if found else "") + "…")
        fc = classify_field(fb.models, image, name, fb.size, fb.rule, fb.gate, fb.margin,
                            on_chunk=kept.hook(fb) if kept.gradcam else None,
                            normalize_stain=normalize_stain, model=fb.description)
        if fb.description in kept.cam_errors:
            fc.notes.append(kept.cam_errors[fb.description])
        found += len(fc.table)
        field_calls.append(fc)
    if not field_calls and not failed:
        return field_calls, pd.DataFrame()
    names = {fc.name for fc in field_calls} | set(failed)
    return field_calls, fields_readout(field_calls, fb.field_rule, failed=failed,
                                       order=[label for label in order if label in names])


def _audit(store, uploads, table: pd.DataFrame, field_calls: list, bundle: ModelBundle, fb: ModelBundle,
           actor: Actor, keyed: bool, mode: str) -> None:
    """One audit record per single cell and per field cell (a field without cells: one for the field), each
    with the SHA-256 of the file it came from; pixels are not kept."""
    from training.audit import record

    data = {u.label: u.data for u in uploads}
    keys = {u.label: f"{u.key};{mode}" for u in uploads} if keyed else None
    empty = pd.DataFrame([{"file": fc.name, "out_of_distribution": True,
                           "ood_reason": fc.error or "no white cells found"} for fc in field_calls if not len(fc.table)])
    judged = pd.concat([table, empty], ignore_index=True) if len(empty) else table
    record(store, judged, data, bundle.description, bundle.model_sha256, bundle.rule, source=actor.audit_source,
           action=keys, file_names={u.label: u.name for u in uploads})
    for fc in field_calls:
        if len(fc.table):  # each cell under its own name, with the SHA-256 of the field it came from
            record(store, fc.table.rename(columns={"cell_name": "name"}), dict.fromkeys(fc.table["cell_name"],
                   data[fc.name]), fb.description, fb.model_sha256, fb.rule,
                   source=actor.audit_source.replace("dashboard", "dashboard field", 1),
                   action=None if keys is None else keys.get(fc.name))


def _labelled(files: list[tuple[str, bytes]], keys: list[str] | dict[str, str] | None):
    """The uploads with their labels; `keys` per position, or (older callers) by file name."""
    from dashboard.uploads import labelled

    if isinstance(keys, dict):
        keys = [keys.get(name) for name, _ in files]
    return labelled(files, keys)


# --- verifying a smear upload, its report and exports -------------------------------------------------------------
VERIFIED_CELLS = "verified_cells"  # under the run store's folder: each verified cell's model input, for teaching


def sample_of(result: Classified) -> str:
    """The sample an upload's smear fields are: their files' SHA-256s (re-opening the same photos, under any
    names, restores the verification)."""
    from core.smear.verify import sample_key

    return sample_key(result.field_sha256.values())


def field_cells(result: Classified) -> pd.DataFrame:
    """Every white cell of the upload's fields, least certain first (as the review queue): cells the model could
    not judge, then calls nearest the threshold, then the rest."""
    tables = [fc.table.assign(field=fc.name) for fc in result.fields if len(fc.table)]
    if not tables:
        return pd.DataFrame(columns=["field", "cell", "cell_name", "call", "prediction", "prob_all_calibrated"])
    cells = pd.concat(tables, ignore_index=True)
    p = pd.to_numeric(cells["prob_all_calibrated"], errors="coerce")
    cells["_order"] = np.where(cells["prediction"].notna(), (p - result.field_threshold).abs(), -1.0)
    return cells.sort_values(["_order", "field", "cell"], kind="stable").drop(columns="_order").reset_index(drop=True)


@dataclass
class Verification:
    """A sample's verification as the store holds it: each cell's current decision (the latest), every decision
    ever made (who, when), and the cells whose verifiers disagree (cell -> "who: decision" each)."""

    sample: str
    decisions: dict[str, str]
    history: pd.DataFrame
    disputed: dict[str, list[str]]

    @property
    def verifiers(self) -> list[str]:
        return list(dict.fromkeys(self.history["verifier"])) if len(self.history) else []


def verification(runs_dir: str | Path, sample: str) -> Verification:
    """What the store holds for a sample (read fresh on every page run: another session's decisions show)."""
    from core.smear.verify import current_decisions

    history = RunStore(runs_dir).verifications(sample)
    decisions = {str(r.cell_name): str(r.decision) for r in current_decisions(history).itertuples()}
    disputed = {}
    for name, g in history.groupby("cell_name", sort=False):
        latest = g.drop_duplicates("verifier", keep="last")  # each verifier's own last word on the cell
        if latest["decision"].nunique() > 1:
            disputed[str(name)] = [f"{r.verifier}: {r.decision}" for r in latest.itertuples()]
    return Verification(sample, decisions, history, disputed)


def verify_cell(runs_dir: str | Path, result: Classified, cell_name: str, decision: str, *, actor: Actor) -> str:
    """One decision on one white cell of the upload, appended to the run store with the actor's identity and the
    time (never overwriting another's); the cell's model input is kept beside the store (`VERIFIED_CELLS`) so a
    trainer can refit the smear model on verified cells. Needs the reviewer role."""
    require(actor, "review")
    if not actor.identity.strip():
        raise ValueError("a verification needs the verifier's name (sidebar) or a signed-in identity")
    from PIL import Image

    from core.data.atomic import atomic_write_bytes

    sample = sample_of(result)
    row = next((r for fc in result.fields if len(fc.table) for r in fc.table.to_dict("records")
                if r["cell_name"] == cell_name), None)
    if row is None:
        raise ValueError(f"{cell_name}: not a white cell of this upload")
    crop = cell_crops(result).get(cell_name)
    rel = None
    if crop is not None:
        import io

        rel = f"{VERIFIED_CELLS}/{sample}/{cell_name}"
        path = Path(runs_dir) / rel
        if not path.exists():
            buf = io.BytesIO()
            Image.fromarray(np.clip(np.asarray(crop), 0, 255).astype(np.uint8)).save(buf, format="PNG")
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_bytes(path, buf.getvalue())
    return page_store(runs_dir).record_verification(
        sample, cell_name, decision, actor.identity, field=str(row["field"]), pre_call=str(row.get("prediction") or ""),
        model=result.field_model, model_sha256=result.field_model_sha256,
        field_sha256=result.field_sha256.get(str(row["field"]), ""), crop=rel)


def verified_readout(result: Classified, decisions: dict[str, str]) -> pd.DataFrame:
    """The upload's read-out after verification: per field and pooled, same call rule, with `verified` and
    `removed` counts (`core.smear.verify.verified_readout`)."""
    from core.smear.fields import POOLED
    from core.smear.verify import verified_readout as readout

    fields = [f for f in result.field_readout["field"] if f != POOLED] if len(result.field_readout) else []
    cells = field_cells(result)
    return readout(cells, decisions, fields, result.field_rule)


def sample_report(result: Classified, sample_id: str, ver: Verification, *, actor: Actor, card: dict | None = None):
    """The printable report of a smear upload (`training.sample_report`): as pre-classified and as verified, the
    model and its card's figures on data it never saw, who verified and when, the blast cells' thumbnails."""
    from training.sample_report import sample_report as build

    verified = verified_readout(result, ver.decisions) if ver.decisions else None
    from core.smear.verify import verified_class

    blasts, crops = {}, cell_crops(result)
    for r in field_cells(result).to_dict("records"):
        if verified_class(r, ver.decisions.get(r["cell_name"])) == "blast" and r["cell_name"] in crops:
            blasts[r["cell_name"]] = crops[r["cell_name"]]
    return build(sample_id, result.field_readout, verified=verified, verifications=ver.history if len(ver.history)
                 else None, model=result.field_model, model_sha256=result.field_model_sha256, card=card,
                 blast_thumbnails=blasts, made_by=actor.identity or "local user")


def field_geojson(result: Classified, name: str, decisions: dict[str, str] | None = None) -> bytes:
    """One field's cells as a QuPath-importable GeoJSON FeatureCollection (File → Import objects)."""
    from core.smear.qupath import field_geojson as collection

    fc = next(fc for fc in result.fields if fc.name == name)
    return json.dumps(collection(fc, decisions), allow_nan=False).encode()


def geojson_zip(result: Classified, decisions: dict[str, str] | None = None) -> bytes:
    """Every field's GeoJSON in one zip (one `.geojson` per field, named after its photo)."""
    import io
    import zipfile

    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for fc in result.fields:
            if fc.error is None:
                z.writestr(f"{Path(fc.name).stem}.geojson", field_geojson(result, fc.name, decisions))
    return buf.getvalue()


def field_crops_zip(result: Classified) -> bytes:
    """The field cells' crops, as the model saw them, as PNGs in a zip."""
    from core.smear.qupath import crops_zip

    return crops_zip(cell_crops(result))


def cell_crops(result: Classified) -> dict[str, np.ndarray]:
    """Every field cell's crop as the model saw it, by cell name."""
    return {name: crop for fc in result.fields for name, crop in fc.crops.items()}


def smear_card(result: Classified) -> dict:
    """The card of the model that judged the field cells (empty when it is not a model folder)."""
    from core.decide.model_folder import read_card

    for ref in smear_models().values():
        try:
            card = read_card(ref)
        except (OSError, ValueError):
            continue
        if card.get("name") and card["name"] in result.field_model:
            return card
    return {}


# --- training ---------------------------------------------------------------------------------------------------
def review_order(table: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Classify's result table as a review queue: not-assessed cells first, then the least certain calls."""
    from core.decide.inference import review_queue

    return review_queue(table, threshold, prob="calibrated_prob_blast")


def launch_demo(settings, *, actor: Actor) -> str:
    require(actor, "launch")
    from training import jobs
    from training.cli import demo_config

    if not (settings.demo_data / "synthetic_truth.csv").exists():
        raise FileNotFoundError(f"the demo dataset is missing at {settings.demo_data}: run `make demo-data`")
    return jobs.launch(demo_config(settings.demo_data, settings.runs_dir), page_store(settings.runs_dir),
                       actor=actor.identity)


def model_names() -> list[str]:
    from core.nets.models import list_models

    return list_models()


def config_help() -> dict[str, str]:
    from training.config import field_help

    return field_help()


def run_presets() -> dict[str, str]:
    """The whole-run presets the Train page offers first, each with its one line (CLI: `run --preset NAME`)."""
    from training.config import PRESET_NOTES, RUN_PRESETS

    return {name: PRESET_NOTES[name] for name in RUN_PRESETS}


def preset_config(name: str, **overrides) -> RunConfig:
    """A preset's full config (per-architecture defaults filled in), with the page's overrides."""
    from training.config import preset

    return preset(name, **overrides).resolved()


def has_gpu() -> bool:
    """Whether training here would run on a GPU (the page then proposes a heavier preset)."""
    from training import hardware

    return bool(hardware.detect().gpus)


def cheap_to_time(cfg: RunConfig) -> bool:
    """Timing a few batches takes seconds (no large network to compile): done without asking."""
    return cfg.architecture == "solution_a" and cfg.image_size <= 128


def run_estimate(cfg: RunConfig, runs_dir: str | Path, time_now: bool = False) -> str | None:
    """'About N minutes on this machine …' and where the speed comes from (an earlier run here, or batches timed
    now); None when no earlier run matches and `time_now` is off."""
    from training.estimate import estimate

    cfg = cfg.resolved()
    found = estimate(cfg, RunStore(runs_dir), time_now=time_now)
    return None if found is None else found.text(cfg)


def launch_run(cfg: RunConfig, *, actor: Actor) -> str:
    """Launch a run for the actor (trainer role) from offered paths only, recorded under the actor's identity."""
    require(actor, "launch")
    from training import jobs

    check_run_paths(cfg)
    return jobs.launch(cfg, page_store(cfg.runs_dir), actor=actor.identity)


def check_run_paths(cfg: RunConfig) -> None:
    """A page's run reads only what this server offers: a dataset of `Settings.datasets` and a start weights
    file of `Settings.weights_files`; any other server path (typed, or forged in a request) is refused."""
    from dashboard.settings import Settings

    settings = Settings.from_env()
    if not settings.is_allowed(Path(cfg.data_dir or ".")):
        raise PermissionDenied(f"{cfg.data_dir}: not a dataset this server offers (the demo set, or a folder "
                               "under the data roots, CNMC_DATA_ROOTS)")
    if cfg.init not in (None, "none", "imagenet") and not settings.is_allowed_weights(cfg.init):
        raise PermissionDenied(f"{cfg.init}: not a weights file this server offers (a .weights.h5 under the "
                               "weights roots, CNMC_WEIGHTS_ROOTS)")


def cancel_run(runs_dir: str | Path, run_id: str, *, actor: Actor) -> bool:
    """Cancel for the actor (trainer role): the store's cancel flag, and a signal only to a proven local worker."""
    require(actor, "cancel")
    from training import jobs

    return jobs.cancel(run_id, page_store(runs_dir), actor=actor.identity)


def resume_run(runs_dir: str | Path, run_id: str, epochs: int | None = None, *, actor: Actor) -> None:
    """Continue a stopped run from its checkpoint; `epochs` extends its schedule (also for a completed run)."""
    require(actor, "resume")
    from training import jobs

    jobs.resume(run_id, page_store(runs_dir), epochs=epochs, actor=actor.identity)


def progress_info(store: RunStore, run_id: str) -> dict[str, Any]:
    """Fraction done, ETA in seconds and a short text for the selected run's progress bar."""
    run = store.get_run(run_id)
    epochs = store.epochs(run_id)
    prog = store.progress(run_id) or {}
    planned = max(int(run.get("epochs_planned") or 1), 1)
    steps = max(int(prog.get("steps") or 0), 1)
    done_epochs = len(epochs)
    within = (prog.get("step") or 0) / steps if prog.get("epoch", -1) == done_epochs else 0.0
    fraction = min(1.0, (done_epochs + within) / planned) if run["status"] != "completed" else 1.0
    eta = None
    if len(epochs) and run["status"] == "running":
        per_epoch = float(epochs["seconds"].mean())
        eta = max(0.0, (planned - done_epochs - within) * per_epoch)
    if run["status"] in ("queued", "running"):
        phase = prog.get("phase") or run["status"]
        text = f"{run['status']}: epoch {min(done_epochs + 1, planned)}/{planned}, {phase}"
    else:  # a finished run is not "predicting": say how it ended and what it kept
        text = f"{run['status']}: {done_epochs} of {planned} epochs trained"
        if run["status"] == "cancelled" and prog.get("step") and prog.get("epoch", -1) == done_epochs:
            text += f" (stopped at step {prog['step']}/{prog['steps']} of epoch {done_epochs + 1}, checkpoint kept)"
    if eta is not None:
        text += f", about {eta / 60:.1f} min left" if eta >= 90 else f", about {eta:.0f} s left"
    return {"fraction": fraction, "eta_s": eta, "text": text, "status": run["status"], "error": run["error"]}


def augmentation_preview(data_dir: str | Path, cfg: RunConfig, n: int = 8, seed: int = 0) -> list[np.ndarray]:
    """n training-like cells of `data_dir` passed through the configured augmentation (training mode)."""
    import keras

    from core.nets.augmentation import build_augmentation
    from core.data.dataset import index

    manifest, _ = index(data_dir)
    labelled = manifest[manifest["label"].notna()]
    pick = labelled.sample(min(n, len(labelled)), random_state=seed)
    crops = np.stack([load_crop(p, size=cfg.image_size, margin=cfg.crop_margin)
                      for p in pick["path"]]).astype("float32")
    aug = build_augmentation(cfg.augment_spec(), seed=seed)
    out = keras.ops.convert_to_numpy(aug(crops, training=True))
    return [np.clip(a, 0, 255).astype(np.uint8) for a in out]


def split_preview(data_dir: str | Path, strategy: str = "patient", seed: int = 0, val_fold: int = 2) -> dict[str, Any]:
    """What a run would train, validate and test on, before it is launched: subjects and cells per class per
    split (`table`, one row per split), the split's problems in plain words (`warnings`: a split lacking a
    class, and what it costs) and `error` when the split cannot be made at all (the run would fail)."""
    from core.data.dataset import index
    from core.data.splits import make_split, split_counts, split_warnings

    manifest, _ = index(data_dir)
    try:
        split = make_split(manifest, strategy, seed=seed, val_fold=val_fold)
    except ValueError as exc:
        return {"table": pd.DataFrame(), "warnings": [], "error": str(exc)}
    counts = split_counts(split)
    for c in CLASSES:
        for kind in ("subjects", "cells"):
            if f"{kind}_{c}" not in counts:
                counts[f"{kind}_{c}"] = 0
    table = pd.DataFrame({"split": counts.index,
                          "subjects (all / hem)": [f"{r.subjects_all} / {r.subjects_hem}" for r in counts.itertuples()],
                          "cells all": counts["cells_all"].to_numpy(), "cells hem": counts["cells_hem"].to_numpy()})
    return {"table": table, "warnings": split_warnings(split), "error": None,
            "note": split.attrs.get("note", "")}


# --- evaluation ---------------------------------------------------------------------------------------------------
def evaluation(runs_dir: str | Path, run_ids: list[str], refresh: bool = False, n_boot: int = 500,
               with_overrides: bool = False) -> dict:
    """metrics.json of a run (computed once, then read) or of an ensemble of runs; `with_overrides` scores
    against the reviewers' corrected labels instead (recomputed each time: reviews change)."""
    from training.evaluate import evaluate

    store = RunStore(runs_dir)
    if with_overrides:
        return evaluate(store, run_ids, n_boot=n_boot, label_overrides=str(_freeze_overrides(runs_dir)))
    path = store.run_dir(run_ids[0]) / "metrics.json"
    if len(run_ids) == 1 and path.exists() and not refresh:
        return json.loads(path.read_text())
    return evaluate(store, run_ids, n_boot=n_boot)


def metric_text(result: dict, key: str, digits: int = 3) -> str:
    """A figure as the pages show it: the number, or "undefined: <reason>" (never "nan")."""
    from core.decide.metrics import metric_text as text

    return text(result, key, digits)


def headline(result: dict) -> str:
    """The evaluation's headline (weighted F1) in words, or why a one-class split has none."""
    from core.decide.metrics import headline as words

    return words(result)


def headline_defined(result: dict) -> bool:
    from core.decide.metrics import HEADLINE, undefined_of

    return HEADLINE[0] not in undefined_of(result)


def report_view(result: dict) -> pd.DataFrame:
    """The report's per-class table as text, "undefined" with the reason where a class has no cells."""
    from core.decide.metrics import report_view as view

    return view(result)


def run_split_warnings(runs_dir: str | Path, run_id: str) -> list[str]:
    """The problems of a run's saved split in plain words (a split lacking a class); empty when sound."""
    from core.data.splits import load_split, split_warnings

    path = RunStore(runs_dir).run_dir(run_id) / "split.csv"
    return split_warnings(load_split(path)) if path.exists() else []


def run_report(runs_dir: str | Path, run_id: str) -> str:
    """The run's self-contained HTML report (see `training.report`)."""
    from training.report import report_html

    return report_html(RunStore(runs_dir), run_id)


# --- label review -------------------------------------------------------------------------------------------------
REVIEW_DECISIONS = DECISIONS  # the label review's choices: core.data.labels' own tuple, what the store accepts
OVERRIDE_FREE_TEXT = ("reviewer", "note")  # typed by people: escaped in CSV; name and label stay exact for training


def label_in_name(name: str) -> str | None:
    """The dataset label a C-NMC file name carries (`UID_…_all.bmp` / `_hem`), None for other names."""
    from core.data.dataset import parse_uid

    parsed = parse_uid(name)
    return parsed.label if parsed else None


def record_review(runs_dir: str | Path, name: str, original_label: str, decision: str, note: str = "",
                  run_id: str | None = None, path: str | None = None, *, actor: Actor) -> None:
    """A label review, recorded under the actor's identity (the signed-in one; in local mode the name typed in
    the sidebar, `Actor.named`); needs the reviewer role."""
    require(actor, "review")
    page_store(runs_dir).record_review(name, original_label, decision, actor.identity, note, run_id, path)


def label_reviews(runs_dir: str | Path) -> pd.DataFrame:
    return RunStore(runs_dir).reviews()


def label_overrides(runs_dir: str | Path) -> pd.DataFrame:
    return RunStore(runs_dir).label_overrides()


def export_overrides(runs_dir: str | Path, *, actor: Actor) -> Path:
    """The reviewers' corrections frozen as `<runs>/label_overrides/overrides-<sha>.csv` (content-addressed:
    a run's `label_overrides` keeps naming exactly what it trained on, whatever is reviewed later); needs the
    reviewer role."""
    require(actor, "export_overrides")
    return _freeze_overrides(runs_dir)


def _freeze_overrides(runs_dir: str | Path) -> Path:
    """`export_overrides` without the check: Evaluate's scoring against the corrected labels (any viewer may
    see it) writes the same content-addressed copy."""
    import hashlib

    from core.data.labels import save_overrides

    table = label_overrides(runs_dir)
    digest = hashlib.sha256(table[["name", "label"]].to_csv(index=False).encode()).hexdigest()[:12]
    folder = Path(runs_dir) / "label_overrides"
    folder.mkdir(parents=True, exist_ok=True)
    return save_overrides(escape_cells(table, OVERRIDE_FREE_TEXT), folder / f"overrides-{digest}.csv")


def predictions(runs_dir: str | Path, run_id: str, split: str = "test") -> pd.DataFrame:
    path = RunStore(runs_dir).run_dir(run_id) / f"predictions_{split}.csv"
    return pd.read_csv(path, dtype={"subject": "str"}) if path.exists() else pd.DataFrame()


def tradeoff(preds: pd.DataFrame, threshold: float) -> dict[str, float]:
    """Sensitivity, specificity and accuracy for `all` at a threshold on calibrated probabilities."""
    from core.decide.metrics import point_metrics

    y = (preds["label"] == "all").to_numpy().astype(int)
    return point_metrics(y, preds["prob_all_calibrated"].to_numpy(), threshold)


def tradeoff_text(preds: pd.DataFrame, threshold: float, where: str = "test split") -> dict[str, str]:
    """`tradeoff` as shown: each figure as text, "undefined: <reason>" where the cells lack a class."""
    from core.decide.metrics import metric_text as text, undefined_metrics

    y = (preds["label"] == "all").to_numpy().astype(int)
    result = {"metrics": tradeoff(preds, threshold), "undefined": undefined_metrics(y, where)}
    return {k: text(result, k) for k in result["metrics"]}


def error_scope(runs_dir: str | Path, run_id: str) -> str | None:
    """When the run's test split holds one class, what that means for its errors (they can only be of one
    kind); None for a test split with both classes."""
    path = RunStore(runs_dir).run_dir(run_id) / "split.csv"
    if not path.exists():
        return None
    split = pd.read_csv(path, usecols=["label", "subject", "split"], dtype=str)
    test = split[split["split"] == "test"]
    present = set(test["label"])
    if test.empty or present >= set(CLASSES):
        return None
    only = next(iter(present))
    kind = ("false negatives (missed blasts): with no normal cells to call blasts, a false positive cannot occur"
            if only == "all" else "false positives (normal cells called blasts): with no blasts to miss, a false "
            "negative cannot occur")
    return (f"The test split of run {run_id} holds only {only} cells ({len(test)} cells of "
            f"{test['subject'].nunique()} subject(s)): the errors shown can only be {kind}. No errors of the "
            "other kind says nothing about how the model treats the other class.")


def subjects_table(runs_dir: str | Path, run_id: str) -> pd.DataFrame:
    path = RunStore(runs_dir).run_dir(run_id) / "subjects.csv"
    return pd.read_csv(path, dtype={"subject": "str"}) if path.exists() else pd.DataFrame()


def run_data_root(runs_dir: str | Path, run_id: str, candidates=()) -> tuple[str | None, str | None]:
    """(where the run's cells are now, the folder it was trained on): the trained-on folder if the cells are
    still there, else the first of `candidates` (the dashboard's data roots and their sub-folders) holding them;
    None where they are found nowhere."""
    from core.data.splits import find_data_root, load_split

    split_path = RunStore(runs_dir).run_dir(run_id) / "split.csv"
    if not split_path.exists():
        return None, None
    split = load_split(split_path)
    stored = split.attrs.get("stored_root")
    if not stored or split.empty:
        return None, stored
    sample = [str(Path(p).relative_to(stored)) for p in split["path"].head(3)
              if Path(p).is_relative_to(stored)]
    return find_data_root(stored, sample, candidates), stored


def errors(runs_dir: str | Path, run_id: str, candidates=()) -> pd.DataFrame:
    """False positives and negatives of a run's test split (evaluating it first if needed), with each cell's
    current path (found again if the dataset moved) and a `missing` flag for cells that are nowhere."""
    from core.data.splits import relocate

    store = RunStore(runs_dir)
    path = store.run_dir(run_id) / "errors.csv"
    if not path.exists():
        evaluation(runs_dir, [run_id])
    table = pd.read_csv(path, dtype={"subject": "str"})
    table["confidence"] = np.where(table["error"] == "false_positive", table["prob_all"], 1 - table["prob_all"])
    now, stored = run_data_root(runs_dir, run_id, candidates)
    if now and stored and now != stored:
        table["path"] = relocate(table["path"], stored, now)
    table["missing"] = [not Path(p).is_file() for p in table["path"]]
    return table


def cell_view(path: str, size: int = 250, bundle: ModelBundle | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """A cell's crop for display and, given a model, its Grad-CAM overlay."""
    from core.nets.explain import overlay

    margin = bundle.margin if bundle is not None else 100
    crop = load_crop(path, size=size, margin=margin)
    if bundle is None:
        return crop, None
    small = load_crop(path, size=bundle.size, margin=margin)
    _, maps = bundle.cam(small[None])
    return crop, overlay(crop, maps[0])


# --- data ---------------------------------------------------------------------------------------------------------
def dataset_overview(data_dir: str | Path) -> dict[str, Any]:
    """Index summary, Table-1 counts (cells per class per source and per default split), subjects, problems."""
    from core.data.dataset import index, summarize
    from core.data.splits import make_split

    t = time.perf_counter()
    manifest, problems = index(data_dir)
    summary = summarize((manifest, problems))
    labels = manifest["label"].fillna("unlabelled")
    by_source = pd.crosstab(manifest["source"], labels)
    subjects = manifest.dropna(subset=["subject"]).groupby(labels)["subject"].nunique().rename("subjects")
    try:
        split = make_split(manifest, "patient")
        by_split = pd.crosstab(split["split"], split["label"]).reindex(["train", "val", "test"])
        split_note = "patient split (subject-disjoint, seed 0), the default"
    except ValueError as exc:
        by_split, split_note = pd.DataFrame(), f"no patient split: {exc}"
    counts = labels.value_counts()
    imbalance = float(counts.get("all", 0) / counts.get("hem", 1)) if counts.get("hem", 0) else float("nan")
    return {"summary": summary, "manifest": manifest, "problems": problems, "by_source": by_source,
            "by_split": by_split, "split_note": split_note, "subjects": subjects, "imbalance": imbalance,
            "seconds": time.perf_counter() - t}


def sample_crops(manifest: pd.DataFrame, label: str, n: int = 6, size: int = 160, seed: int = 0) -> list[tuple[str, np.ndarray]]:
    rows = manifest[manifest["label"] == label]
    rows = rows.sample(min(n, len(rows)), random_state=seed) if len(rows) else rows
    return [(Path(p).name, load_crop(p, size=size)) for p in rows["path"]]


# --- teaching the smear model from verified cells ---
def verified_summary(runs_dir: str | Path) -> pd.DataFrame:
    """Per sample: fields, cells verified, blasts, normals, not white cells, unsure, cells a refit can learn from,
    verifiers and the last decision's time (`training.teach.verified_summary`): what a trainer checks before
    teaching the smear model."""
    from training.teach import verified_summary as summary

    return summary(runs_dir)


def refit_smear_from_verified(runs_dir: str | Path, lab: str, base_ref: str | None = None, *, actor: Actor,
                              models_dir: str | Path | None = None, n_folds: int = 5,
                              progress: Callable[[str], None] | None = None) -> tuple[Path, dict]:
    """Refit a smear model (`base_ref`: a folder `smear_models` offers; the shipped one by default) on the cells
    verified in the run store for lab `lab` (`training.teach.refit_from_verified`), as the next version
    `<models dir>/<lab>-v<k>`: the models dir Classify's `smear_models` lists (`core.decide.model_folder.MODELS_DIR`;
    `models_dir` overrides it). Needs the trainer role (the "launch" permission: it trains a model). Returns (the new
    folder, its card: `adaptation` holds the lab's cross-validation by photo before and after); ValueError says
    why a refit cannot be made (too few fields, one class only, a taken lab name)."""
    require(actor, "launch")
    from core.decide.model_folder import SMEAR
    from training.teach import refit_from_verified

    card = refit_from_verified(base_ref or SMEAR, runs_dir, None, lab.strip(), n_folds, progress,
                               models_dir=models_dir, by=actor.identity)
    return Path(card["folder"]), card
