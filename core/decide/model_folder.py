"""A model travels as one folder: inference-only weights, the decision rule, and a model card.

    <folder>/model.keras          inference-only Keras model (no optimizer, no augmentation), safe-mode loadable
    <folder>/member-N.keras       further members of an ensemble (N = 1, 2, ...): P(all) is the members' mean
    <folder>/decision_rule.json   `core.decide.calibration.DecisionRule`: temperature, threshold, review band, fitted on
    <folder>/gate.json            `core.decide.gate.Gate`: what images it may judge (image bands, feature novelty)
    <folder>/card.json, card.md   what it was trained on, how it was measured, its limits
    <folder>/field_rule.json      (smear models) how a photo's call follows from its cells' calls, fitted with it
    <folder>/training_cells.npz   (smear models) the training cells as components: what a lab's refit adds to

Whatever loads a model (Classify, `predict`, `evaluate`) loads the folder, so the rule can never be lost on the
way. Two folders ship with the project, named by a word anywhere a model is asked for (`SHIPPED`): `starter`
(`models/starter/`, single C-NMC-style cells) and `smear` (`models/smear/`, white cells cut from smear photos by
`core.smear.segmentation`, trained on ALL-IDB). A card says the crop margin its model was trained with as `crop_margin`
(top level, or under `input`); without one the report's 100 px applies. A card keeps an `independent_check` slot:
null until the model has been measured on new patients outside its training data's batch, then those figures;
`independent_check_section` writes its card section and `independent_check_summary` its plain words for a page.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from core.data.atomic import atomic_path

MODEL_FILE, RULE_FILE, CARD_JSON, CARD_MD = "model.keras", "decision_rule.json", "card.json", "card.md"
GATE_FILE = "gate.json"
FIELD_RULE_FILE = "field_rule.json"  # a smear model's field call rule (`core.decide.calibration.CallRule`), fitted with it
MEMBER_GLOB = "member-*.keras"
MODELS_DIR = Path(__file__).resolve().parents[2] / "models"
STARTER_DIR = MODELS_DIR / "starter"
STARTER = "starter"
SMEAR_DIR = MODELS_DIR / "smear"
SMEAR = "smear"
# what each shipped name is, in the words of an error message or a note
SHIPPED_ABOUT = {STARTER: "the shipped starter model (single C-NMC-style cells)",
                 SMEAR: "the shipped smear model (white cells cut from smear photos, trained on ALL-IDB)"}


def shipped() -> dict[str, Path]:
    """Shipped name -> folder; read at call time so a test (or a deployment) can point a name elsewhere."""
    return {STARTER: STARTER_DIR, SMEAR: SMEAR_DIR}


def shipped_available(name: str) -> bool:
    """Whether the shipped folder `name` is here (the smear model lands later than the code that uses it)."""
    return (shipped()[name] / MODEL_FILE).is_file()


@dataclass
class ModelFolder:
    models: list  # one model, or an ensemble's members (model.keras first); the gate uses the first's features
    rule: Any
    card: dict
    folder: Path
    gate: Any = None

    @property
    def model(self):
        return self.models[0]

    @property
    def size(self) -> int:
        return int(self.model.inputs[0].shape[1])

    @property
    def crop_margin(self) -> int:
        return card_crop_margin(self.card)

    @property
    def field_rule(self):
        """The folder's field call rule (`core.decide.calibration.CallRule`), or the default rule for a folder without one."""
        return read_field_rule(self.folder)

    @property
    def card_markdown(self) -> str:
        p = self.folder / CARD_MD
        return p.read_text() if p.exists() else ""


def model_files(folder: str | os.PathLike) -> list[Path]:
    """model.keras, then member-1.keras, member-2.keras, ...: the files whose mean a model folder computes."""
    folder = Path(folder)
    members = sorted(folder.glob(MEMBER_GLOB), key=lambda p: int(p.stem.split("-")[1]))
    return [folder / MODEL_FILE, *members]


def is_model_folder(ref: str | os.PathLike) -> bool:
    """A shipped name (present or not: loading it then says what is missing) or a folder holding model.keras."""
    return str(ref) in shipped() or (Path(ref).is_dir() and (Path(ref) / MODEL_FILE).is_file())


def folder_of(ref: str | os.PathLike) -> Path:
    """A shipped name (`starter`, `smear`) -> its folder; anything else is taken as a path."""
    return shipped().get(str(ref), Path(ref))


def read_field_rule(ref: str | os.PathLike):
    """The `core.decide.calibration.CallRule` a model folder was fitted with (`field_rule.json`); the default rule without
    one, so every caller (CLI, Classify) reads a model's fields the same way."""
    from core.decide.calibration import CallRule

    path = folder_of(ref) / FIELD_RULE_FILE
    if not path.is_file():
        return CallRule()
    data = json.loads(path.read_text())
    return CallRule(**{k: data[k] for k in ("min_blasts", "min_blast_prob", "min_judged", "min_judged_fraction",
                                            "min_blast_fraction") if k in data})


def read_card(ref: str | os.PathLike) -> dict:
    """A model folder's card.json ({} without one), read without loading any weights."""
    path = folder_of(ref) / CARD_JSON
    return json.loads(path.read_text()) if path.is_file() else {}


def card_crop_margin(card: dict, default: int | None = None) -> int:
    """The crop margin a card says its model was trained with: `crop_margin` at the top level or under `input`
    (0 for crops already cut to the cell, such as smear-field crops); else `default` (the report's 100 px)."""
    from core.image.preprocessing import CROP_MARGIN

    value = card.get("crop_margin", (card.get("input") or {}).get("crop_margin"))
    return int(value) if value is not None else (CROP_MARGIN if default is None else default)


def load_model_folder(ref: str | os.PathLike) -> ModelFolder:
    """Load a model folder (or a shipped name) in Keras safe mode; a clear error naming what is missing."""
    from core.decide.calibration import DecisionRule
    from core.decide.gate import Gate
    from core.nets.models import load_model

    folder = folder_of(ref)
    if not (folder / MODEL_FILE).is_file():
        if str(ref) in shipped():
            raise FileNotFoundError(f"{SHIPPED_ABOUT[str(ref)]} is not installed: {folder / MODEL_FILE} not found"
                                    + ("; until it ships, use `starter` or a model folder of your own"
                                       if str(ref) == SMEAR else ""))
        raise FileNotFoundError(f"model folder {folder}: {folder / MODEL_FILE} not found")
    rule = DecisionRule.load(folder / RULE_FILE) if (folder / RULE_FILE).exists() else DecisionRule()
    card = json.loads((folder / CARD_JSON).read_text()) if (folder / CARD_JSON).exists() else {}
    gate = Gate.load(folder / GATE_FILE) if (folder / GATE_FILE).exists() else None
    models = [load_model(str(p)) for p in model_files(folder)]
    sizes = {tuple(m.inputs[0].shape[1:]) for m in models}
    if len(sizes) > 1:
        raise ValueError(f"model folder {folder}: its ensemble members take different inputs {sorted(sizes)}")
    return ModelFolder(models, rule, card, folder, gate)


def save_model_folder(folder: str | os.PathLike, model, rule, card: dict, card_md: str, gate=None,
                      members=(), quantize: str | None = None) -> Path:
    """Write an inference-only copy of `model` (and of an ensemble's further `members`) with its rule and card
    (each model is stripped of training layers and saved without optimizer state; `quantize="int8"` stores the
    dense kernels as int8, `core.nets.models.quantize_weights`, to ship an ensemble small)."""
    from core.nets.models import inference_model, quantize_weights

    def prepare(m):
        clean = inference_model(m)
        return quantize_weights(clean, quantize) if quantize else clean

    return write_model_folder(folder, model, rule, card, card_md, gate=gate, members=members, prepare=prepare)


def write_model_folder(folder: str | os.PathLike, model, rule, card: dict, card_md: str, *, gate=None,
                       members: Sequence = (), prepare: Callable | None = None,
                       extras: Mapping[str, str | Callable[[Path], None]] | None = None) -> Path:
    """Write a model folder as `load_model_folder` reads it: model.keras (and an ensemble's further `members` as
    member-1.keras, ...), decision_rule.json, gate.json, card.json, card.md, plus a model's own `extras` (file
    name -> its text, or a function that writes the file at the path it is given, e.g. the smear model's
    field_rule.json and training_cells.npz). The one writer, so the starter's and the smear model's folders cannot
    drift apart. Every file is written beside its name and replaces it in one step (`core.data.atomic`): a reader
    never sees half a file. A folder rewritten with fewer members keeps no stale one. `prepare` turns each network
    into what ships (e.g. inference-only, int8); without it a network is saved as is."""
    from core.data.atomic import atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(MEMBER_GLOB):
        old.unlink()
    for i, m in enumerate([model, *members]):
        net = prepare(m) if prepare else m
        with atomic_path(folder / (MODEL_FILE if i == 0 else f"member-{i}.keras"), suffix=".keras") as tmp:
            # no optimizer state in a shipped file (Keras 2 needs the flag; Keras 3 never saves it here)
            net.save(tmp, include_optimizer=False) if _accepts_include_optimizer(net) else net.save(tmp)
    rule.save(folder / RULE_FILE)
    if gate is not None:
        gate.save(folder / GATE_FILE)
    atomic_write_text(folder / CARD_JSON, json.dumps(card, indent=2, default=float) + "\n")
    atomic_write_text(folder / CARD_MD, card_md)
    for name, content in (extras or {}).items():
        if isinstance(content, str):
            atomic_write_text(folder / name, content)
        else:
            with atomic_path(folder / name, suffix=Path(name).suffix) as tmp:
                content(tmp)
    return folder


def _accepts_include_optimizer(model) -> bool:
    import inspect

    return "include_optimizer" in inspect.signature(model.save).parameters


# --- the independent check: figures on new patients, measured outside the training data's batch ---------------
INDEPENDENT_CHECK = "independent_check"  # the card.json slot: null until a check has been run, else a dict
CHECK_HEADING = "## Independent check (new patients)"
CHECK_PENDING = "Independent check: not yet run — cross-validation inside one batch overstates new patients."
NO_CHECK_YET = "no independent check yet"
CHECK_REQUIRED = ("cells", "weighted_f1")


def read_independent_check(ref: str | os.PathLike | dict) -> dict | None:
    """The `independent_check` slot of a card (a card dict, a model folder or a shipped name): a dict of figures
    measured on cells of new patients (outside the training data's batch), or None when no check has been run."""
    card = ref if isinstance(ref, dict) else read_card(ref)
    check = card.get(INDEPENDENT_CHECK)
    return check if isinstance(check, dict) and check else None


def load_independent_check(path: str | os.PathLike) -> dict | None:
    """An independent check's figures from a JSON file (e.g. `python -m training package --independent-check FILE`): the
    object itself, or its `independent_check` member (a whole card.json); `null` means none. A clear error when
    it is not such an object."""
    data = json.loads(Path(path).read_text())
    if isinstance(data, dict) and INDEPENDENT_CHECK in data:
        data = data[INDEPENDENT_CHECK]
    if data is None:
        return None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: an independent check is a JSON object of figures, not {type(data).__name__}")
    missing = [k for k in CHECK_REQUIRED if k not in data]
    if missing:
        raise ValueError(f"{path}: the independent check lacks {', '.join(missing)}")
    return data


def independent_check_what(check: dict) -> str:
    """What the check was, in one phrase: its own words (`what`) or made from its counts."""
    if check.get("what"):
        return check["what"]
    patients = f" of {check['patients']} patients" if check.get("patients") else ""
    by = f", run {check['run_by']}" if check.get("run_by") else ""
    return f"an independent check on {check['cells']} cells{patients}{by}"


def independent_check_figures(check: dict) -> str:
    """The check's figures in one line (those it has)."""
    names = (("weighted_f1", "weighted F1"), ("accuracy", "accuracy"), ("roc_auc", "ROC AUC"),
             ("sensitivity", "sensitivity"), ("specificity", "specificity"))
    parts = [f"{label} {check[k]}" for k, label in names if check.get(k) is not None]
    if check.get("ece") is not None:
        parts.append(f"ECE {check['ece']} (calibrated probabilities)")
    if check.get("assessed") is not None:
        parts.append(f"{check['assessed']} of {check['cells']} cells assessed")
    return ", ".join(parts)


def independent_check_section(card: dict, pending: str = "") -> str:
    """The model card's "Independent check (new patients)" section (markdown, no trailing newline): the check's
    figures, its plain sentence and how much cross-validation overstated it; or, without a check, that none has
    been run (`pending`: what is kept for one, appended)."""
    check = read_independent_check(card)
    if check is None:
        return "\n".join([CHECK_HEADING, CHECK_PENDING + (f" {pending}" if pending else "")])
    classes = (f"{check['all']} `all`, {check['hem']} `hem`"
               if check.get("all") is not None and check.get("hem") is not None else "")
    cells = "; ".join(part for part in (check.get("data"), classes) if part)
    what = independent_check_what(check)
    lines = [CHECK_HEADING, f"{what[:1].upper()}{what[1:]}." + (f" Cells: {cells}." if cells else ""),
             "", f"- {independent_check_figures(check)}."]
    if check.get("summary"):
        lines += ["", f"**{check['summary']}**"]
    over = check.get("cv_overstated_by_weighted_f1")
    if over is not None:
        cv = check.get("cv_what", "cross-validation")
        lines += ["", f"{cv[:1].upper()}{cv[1:]} overstated this by about {over} weighted F1"
                  + (f" (it measured {check['cv_weighted_f1']:.3f})" if check.get("cv_weighted_f1") is not None else "")
                  + (f": {check['cv_why']}" if check.get("cv_why") else "")
                  + ". Read the cross-validation figures below as optimistic for new patients."]
    if check.get("notes"):
        lines += ["", *(f"- {note}" for note in check["notes"])]
    return "\n".join(lines)


def independent_check_summary(card: dict) -> str:
    """A model's quality on new patients in a few plain sentences (what a user reads before deciding): the
    independent check's figures and plain sentence, or that there is no independent check yet."""
    check = read_independent_check(card)
    if check is None:
        return (f"Quality on new patients: {NO_CHECK_YET}. Any figures in its card come from cross-validation, "
                "which inside one batch overstates new patients.")
    figures = ", ".join(f"{label} {check[k]}" for k, label in (("weighted_f1", "weighted F1"),
                        ("roc_auc", "ROC AUC"), ("ece", "ECE")) if check.get(k) is not None)
    text = f"Quality on new patients, from {independent_check_what(check)}: {figures}."
    if check.get("summary"):
        text += f" **{check['summary']}**"
    over = check.get("cv_overstated_by_weighted_f1")
    if over is not None:
        cv = check.get("cv_what", "cross-validation")
        text += (f" {cv[:1].upper()}{cv[1:]}"
                 + (f" (weighted F1 {check['cv_weighted_f1']:.3f})" if check.get("cv_weighted_f1") is not None else "")
                 + f" overstated it by about {over} weighted F1"
                 + (f"; {check['why']}" if check.get("why") else "") + ".")
    return text
