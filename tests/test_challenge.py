"""The challenge protocol in one command (`run --preset challenge`), end to end on a generated Kaggle-layout tree."""
import pytest

pytest.importorskip("keras")


def test_challenge_preset_end_to_end_prints_test_f1_with_cis(synth_small, tmp_path, capsys):
    from training.cli import main
    from training.store import RunStore

    runs = tmp_path / "runs"
    # CI has no network, so no ImageNet start: --init none (the preset's imagenet is refused, see test_init.py)
    rc = main(["run", "--preset", "challenge", "--init", "none", "--image-size", "32", "--epochs", "1",
               "--samples-per-class", "16", "--batch-size", "8", "--no-tensorboard", "--data-dir", str(synth_small),
               "--runs-dir", str(runs), "--cache-dir", str(tmp_path / "cache")])
    out = capsys.readouterr().out
    assert rc == 0, out
    store = RunStore(runs)
    (run_id,) = store.list_runs()["id"].tolist()
    cfg = store.get_run(run_id)["config"]
    assert (cfg["architecture"], cfg["split"], cfg["image_size"], cfg["init"]) == ("efficientnet_b2", "official", 32, "none")
    assert "test = the labelled preliminary test set" in out
    line = next(l for l in out.splitlines() if l.startswith("weighted F1"))
    assert "95% CI by subject bootstrap" in line
    report = store.run_dir(run_id) / "report.html"
    assert report.is_file() and "weighted" in report.read_text().lower()
