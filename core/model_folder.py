"""A model travels as one folder: inference-only weights, the decision rule, and a model card.

    <folder>/model.keras          inference-only Keras model (no optimizer, no augmentation), safe-mode loadable
    <folder>/member-N.keras       further members of an ensemble (N = 1, 2, ...): P(all) is the members' mean
    <folder>/decision_rule.json   `core.calibration.DecisionRule`: temperature, threshold, review band, fitted on
    <folder>/gate.json            `core.gate.Gate`: what images it may judge (image bands, feature novelty)
    <folder>/card.json, card.md   what it was trained on, how it was measured, its limits

Whatever loads a model (Classify, `predict`, `evaluate`) loads the folder, so the rule can never be lost on the
way. `starter` names the folder shipped with the project (`models/starter/`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MODEL_FILE, RULE_FILE, CARD_JSON, CARD_MD = "model.keras", "decision_rule.json", "card.json", "card.md"
GATE_FILE = "gate.json"
MEMBER_GLOB = "member-*.keras"
STARTER_DIR = Path(__file__).resolve().parent.parent / "models" / "starter"
STARTER = "starter"


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
    def card_markdown(self) -> str:
        p = self.folder / CARD_MD
        return p.read_text() if p.exists() else ""


def model_files(folder: str | os.PathLike) -> list[Path]:
    """model.keras, then member-1.keras, member-2.keras, ...: the files whose mean a model folder computes."""
    folder = Path(folder)
    members = sorted(folder.glob(MEMBER_GLOB), key=lambda p: int(p.stem.split("-")[1]))
    return [folder / MODEL_FILE, *members]


def is_model_folder(ref: str | os.PathLike) -> bool:
    return str(ref) == STARTER or (Path(ref).is_dir() and (Path(ref) / MODEL_FILE).is_file())


def folder_of(ref: str | os.PathLike) -> Path:
    """`starter` -> the shipped folder; anything else is taken as a path."""
    return STARTER_DIR if str(ref) == STARTER else Path(ref)


def load_model_folder(ref: str | os.PathLike) -> ModelFolder:
    """Load a model folder (or `starter`) in Keras safe mode; a clear error naming what is missing."""
    from core.calibration import DecisionRule
    from core.gate import Gate
    from core.models import load_model

    folder = folder_of(ref)
    if not (folder / MODEL_FILE).is_file():
        what = "the shipped starter model" if str(ref) == STARTER else f"model folder {folder}"
        raise FileNotFoundError(f"{what}: {folder / MODEL_FILE} not found")
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
    dense kernels as int8, `core.models.quantize_weights`, to ship an ensemble small)."""
    from core.models import inference_model, quantize_weights

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob(MEMBER_GLOB):  # a folder re-written with fewer members keeps no stale one
        old.unlink()
    for i, m in enumerate([model, *members]):
        clean = inference_model(m)
        if quantize:
            clean = quantize_weights(clean, quantize)
        name = MODEL_FILE if i == 0 else f"member-{i}.keras"
        tmp = folder / ("tmp-" + name)
        clean.save(tmp, include_optimizer=False) if _accepts_include_optimizer(clean) else clean.save(tmp)
        os.replace(tmp, folder / name)
    rule.save(folder / RULE_FILE)
    if gate is not None:
        gate.save(folder / GATE_FILE)
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2, default=float) + "\n")
    (folder / CARD_MD).write_text(card_md)
    return folder


def _accepts_include_optimizer(model) -> bool:
    import inspect

    return "include_optimizer" in inspect.signature(model.save).parameters
