import argparse
import json

import numpy as np
import pytest

from training.config import RunConfig, add_config_arguments, config_from_args, field_help


def test_resolved_fills_report_defaults_per_architecture():
    a = RunConfig(architecture="solution_a").resolved()
    b = RunConfig(architecture="efficientnet_b2").resolved()
    assert (a.batch_size, a.epochs) == (16, 50) and (b.batch_size, b.epochs) == (32, 30)
    c = RunConfig()
    assert (c.learning_rate, c.lr_factor, c.lr_patience, c.min_lr) == (1e-4, 0.5, 2, 1e-6)
    assert c.split == "patient" and c.image_size == 250 and not c.val_augmented


def test_flags_are_generated_from_the_dataclass():
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    args = p.parse_args(["--epochs", "3", "--no-augment", "--split", "image", "--learning-rate", "0.01"])
    cfg = config_from_args(args)
    assert (cfg.epochs, cfg.augment, cfg.split, cfg.learning_rate) == (3, False, "image", 0.01)
    assert cfg.batch_size is None  # not given: stays default
    with pytest.raises(SystemExit):
        p.parse_args(["--split", "random"])
    assert set(field_help()) == set(RunConfig.__dataclass_fields__)


def test_json_roundtrip_and_validation(tmp_path):
    cfg = RunConfig(architecture="vgg16", epochs=2).resolved()
    cfg.save(tmp_path / "c.json")
    assert RunConfig.from_file(tmp_path / "c.json") == cfg
    with pytest.raises(ValueError, match="unknown config keys"):
        RunConfig.from_dict({"nope": 1})
    with pytest.raises(ValueError, match="split must be one of"):
        RunConfig(split="random").resolved()
    with pytest.raises(ValueError, match="unknown model"):
        RunConfig(architecture="resnet").resolved()
    assert json.loads(cfg.to_json())["architecture"] == "vgg16"


def test_run_command_uses_the_config_files_runs_dir(tmp_path, monkeypatch):
    """`run --config FILE` registers the run in the store the file names (not the default `runs/`)."""
    import training.trainer as trainer
    from training.cli import main
    from training.store import RunStore

    seen = {}
    monkeypatch.setattr(trainer, "train", lambda cfg, store, run_id=None, resume=False: seen.update(
        store=store.root, cfg=cfg) or store.create_run(cfg.to_dict()))
    RunConfig(runs_dir=str(tmp_path / "elsewhere"), epochs=1).save(tmp_path / "c.json")
    monkeypatch.chdir(tmp_path)
    main(["run", "--config", str(tmp_path / "c.json"), "--epochs", "2"])
    assert seen["store"] == tmp_path / "elsewhere" and seen["cfg"].epochs == 2
    assert not (tmp_path / "runs").exists()
    assert len(RunStore(tmp_path / "elsewhere").list_runs()) == 1


def test_presets_and_stain_fields():
    from training.config import PRESETS, preset

    report = preset("report", epochs=2)
    assert report.epochs == 2 and not report.cell_standardize
    assert (report.hed_sigma, report.brightness, report.contrast, report.saturation, report.hue) == (0, 0, 0, 0, 0)
    default = preset("cross_patient_texture")
    assert default == RunConfig() and default.cell_standardize and default.hed_sigma > 0 and default.sharpness > 0
    assert preset("cross_patient").sharpness == 0 and preset("cross_patient").hed_sigma == default.hed_sigma
    spec = default.augment_spec()
    assert (spec.hed_sigma, spec.brightness, spec.hue) == (default.hed_sigma, default.brightness, default.hue)
    assert set(PRESETS) >= {"report", "cross_patient"}
    with pytest.raises(ValueError, match="unknown preset"):
        preset("best")
    p = argparse.ArgumentParser()
    add_config_arguments(p)
    cfg = config_from_args(p.parse_args(["--hed-sigma", "0.1", "--no-cell-standardize", "--split", "all"]))
    assert (cfg.hed_sigma, cfg.cell_standardize, cfg.split) == (0.1, False, "all")


def test_the_train_page_offers_the_whole_run_presets_first_in_order():
    from dashboard.services import run_presets
    from training.config import PRESET_NOTES, RUN_PRESETS

    assert RUN_PRESETS == ("quick_demo", "starter", "report_solution_a", "report_solution_b", "challenge")
    assert list(run_presets()) == list(RUN_PRESETS) and all(run_presets()[n] == PRESET_NOTES[n] for n in RUN_PRESETS)


def test_mixstyle_and_head_fields_reach_the_model():
    """One new field: the CLI flag, the preset, validation and the trainer's model all follow from it."""
    from training.config import preset
    from training.trainer import build_model

    p = argparse.ArgumentParser()
    add_config_arguments(p)
    assert config_from_args(p.parse_args(["--mixstyle", "0.3"])).mixstyle == 0.3
    cfg = preset("cross_patient_mixstyle", image_size=32, epochs=1).resolved()
    assert cfg.mixstyle == 0.5 and cfg.sharpness == RunConfig().sharpness
    names = [l.name for l in build_model(cfg, np.zeros(3, "float32")).layers]
    assert "m1_mixstyle" in names and "m2_mixstyle" in names
    assert not any("mixstyle" in n for n in [l.name for l in build_model(preset("report", image_size=32)
                                                                          .resolved(), np.zeros(3)).layers])
    with pytest.raises(ValueError, match="mixstyle"):
        RunConfig(mixstyle=1.5).resolved()
    assert config_from_args(p.parse_args(["--head-l1l2", "1e-5"])).head_l1l2 == 1e-5
    light = build_model(preset("cross_patient_light_head", image_size=32).resolved(), np.zeros(3))
    assert float(light.get_layer("fc1").kernel_regularizer.l1) == pytest.approx(1e-5)
    with pytest.raises(ValueError, match="head_l1l2"):
        RunConfig(head_l1l2=-1.0).resolved()
    with pytest.raises(ValueError, match="not supported"):
        build_model(RunConfig(architecture="vgg16", image_size=32, mixstyle=0.5).resolved(), np.zeros(3))
