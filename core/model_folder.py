"""A model travels as one folder: inference-only weights, the decision rule, and a model card.

    <folder>/model.keras          inference-only Keras model (no optimizer, no augmentation), safe-mode loadable
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
STARTER_DIR = Path(__file__).resolve().parent.parent / "models" / "starter"
STARTER = "starter"


@dataclass
class ModelFolder:
    model: Any
    rule: Any
    card: dict
    folder: Path
    gate: Any = None

    @property
    def size(self) -> int:
        return int(self.model.inputs[0].shape[1])

    @property
    def card_markdown(self) -> str:
        p = self.folder / CARD_MD
        return p.read_text() if p.exists() else ""


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
    return ModelFolder(load_model(str(folder / MODEL_FILE)), rule, card, folder, gate)


def save_model_folder(folder: str | os.PathLike, model, rule, card: dict, card_md: str, gate=None) -> Path:
    """Write an inference-only copy of `model` with its rule and card (the model is stripped of training
    layers and saved without optimizer state)."""
    from core.models import inference_model

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    clean = inference_model(model)
    tmp = folder / ("tmp-" + MODEL_FILE)
    clean.save(tmp, include_optimizer=False) if _accepts_include_optimizer(clean) else clean.save(tmp)
    os.replace(tmp, folder / MODEL_FILE)
    rule.save(folder / RULE_FILE)
    if gate is not None:
        gate.save(folder / GATE_FILE)
    (folder / CARD_JSON).write_text(json.dumps(card, indent=2, default=float) + "\n")
    (folder / CARD_MD).write_text(card_md)
    return folder


def _accepts_include_optimizer(model) -> bool:
    import inspect

    return "include_optimizer" in inspect.signature(model.save).parameters
