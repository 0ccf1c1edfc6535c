"""Registry-wide model smoke tests (as timm's test_models.py)."""
import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.nets.augmentation import AugmentSpec  # noqa: E402
from core.nets.models import create_model, list_models, load_model, model_info, register_model  # noqa: E402

SIZE = 32


def test_registry_lists_the_report_architectures():
    assert {"solution_a", "efficientnet_b2", "vgg16"} <= set(list_models())
    assert (model_info("solution_a").batch_size, model_info("solution_a").epochs) == (16, 50)
    assert (model_info("efficientnet_b2").batch_size, model_info("efficientnet_b2").epochs) == (32, 30)
    with pytest.raises(ValueError, match="unknown model"):
        create_model("resnet_9000")
    with pytest.raises(ValueError, match="already registered"):
        register_model("solution_a", batch_size=1, epochs=1, description="")(lambda x, **k: x)


@pytest.mark.parametrize("name", list_models())
def test_model_forward_save_load(name, tmp_path):
    mean = (0.25, 0.1, 0.3)
    model = create_model(name, SIZE, mean=mean, augment=AugmentSpec(salt_pepper=0.01), seed=0)
    x = np.random.default_rng(0).integers(0, 256, (3, SIZE, SIZE, 3), dtype=np.uint8)
    p = model.predict(x, verbose=0)
    assert p.shape == (3, 2)
    np.testing.assert_allclose(p.sum(1), 1.0, atol=1e-5)
    # Inference is deterministic: the augmentation stack is inactive outside training.
    np.testing.assert_allclose(model.predict(x, verbose=0), p, atol=1e-6)
    path = tmp_path / f"{name}.keras"
    model.save(path)
    again = load_model(str(path))  # safe mode: only registered, serialisable layers
    np.testing.assert_allclose(again.predict(x, verbose=0), p, atol=1e-5)


@pytest.mark.parametrize("name", list_models())
def test_normalisation_lives_inside_the_model(name):
    """A crop equal to the train mean reaches the backbone as zeros (x/255 - mean)."""
    mean = np.array([0.2, 0.4, 0.6], "float32")
    model = create_model(name, SIZE, mean=mean)
    norm = [l for l in _all_layers(model) if isinstance(l, keras.layers.Normalization)]
    assert len(norm) == 1
    x = np.broadcast_to((mean * 255).astype("float32"), (1, SIZE, SIZE, 3))
    if name == "efficientnet_b2":  # EfficientNet divides by 255 itself, then subtracts our mean
        x = x / 255.0
    out = keras.ops.convert_to_numpy(norm[0](x))
    np.testing.assert_allclose(out, 0.0, atol=1e-5)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


def test_solution_a_is_light_and_trains():
    model = create_model("solution_a", SIZE)
    assert model.count_params() < 5_000_000  # vs the 95M-parameter network the report replaced
    model.compile(keras.optimizers.Adam(1e-3), "categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 40, (32, SIZE, SIZE, 3), dtype=np.uint8)
    y = np.zeros((32, 2), "float32")
    y[:16, 1] = 1
    y[16:, 0] = 1
    x[:16] += 120  # a learnable difference
    first = model.evaluate(x, y, verbose=0)[0]
    model.fit(x, y, epochs=5, batch_size=16, verbose=0)
    assert model.evaluate(x, y, verbose=0)[0] < first


@pytest.mark.parametrize("name", list_models())
def test_gradcam_for_every_architecture(name):
    """Grad-CAM finds a spatial layer in every registered architecture (nested backbones included), its
    probabilities are the model's own, and its maps equal an eager GradientTape reference."""
    import tensorflow as tf

    from core.nets.explain import GradCAM

    model = create_model(name, 64, mean=(0.5, 0.4, 0.6), augment=AugmentSpec(), seed=1)
    cam = GradCAM(model)
    x = np.random.default_rng(1).integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    probs, maps = cam(x)
    np.testing.assert_allclose(probs, model.predict(x, verbose=0), atol=1e-4)
    assert maps.shape == (2, 64, 64) and np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    f = cam.features(tf.convert_to_tensor(x))
    assert f.shape[1] > 1 and f.shape[2] > 1, f.shape  # a map, not a pooled vector
    with tf.GradientTape() as tape:
        tape.watch(f)
        blast = cam._head(f)[:, 1]
    g = tape.gradient(blast, f).numpy()
    ref = np.maximum((g.mean(axis=(1, 2), keepdims=True) * f.numpy()).sum(-1), 0)
    ref = ref / np.maximum(ref.reshape(2, -1).max(1), 1e-12).reshape(2, 1, 1)
    _, small = cam(x, size=ref.shape[1:])
    np.testing.assert_allclose(small, ref, atol=1e-3)


def test_int8_weights_are_the_hand_computed_ones_and_change_nothing_else(tmp_path):
    """Dense kernels are stored as round(W * 127 / max|W| per unit) with that scale (abs-max, per unit), the
    file shrinks, it loads in safe mode, computes exactly what its dequantised float twin computes (what
    inference_model and export rebuild), and Grad-CAM still has its gradients."""
    from core.nets.explain import GradCAM
    from core.nets.models import inference_model, quantize_weights

    model = create_model("solution_a", 48, mean=(0.5, 0.4, 0.6), seed=3)
    dense = [l for l in model.layers if isinstance(l, keras.layers.Dense)]
    floats = {l.name: np.asarray(l.kernel) for l in dense}
    x = np.random.default_rng(2).integers(0, 256, (4, 48, 48, 3), dtype=np.uint8)
    before = model.predict(x, verbose=0)
    model.save(tmp_path / "f32.keras")
    quantize_weights(model)
    model.save(tmp_path / "int8.keras")
    assert (tmp_path / "int8.keras").stat().st_size < 0.6 * (tmp_path / "f32.keras").stat().st_size
    loaded = load_model(str(tmp_path / "int8.keras"))
    for name, w in floats.items():
        layer = loaded.get_layer(name)
        scale = 127.0 / np.abs(w).max(axis=0)
        np.testing.assert_allclose(np.ravel(layer.kernel_scale), scale, rtol=1e-5)
        q = np.asarray(layer._kernel)
        assert q.dtype == np.int8
        assert np.abs(q.astype(float) - np.round(w * scale)).max() <= 1  # the rounding of the same product
    assert all(np.asarray(l.kernel).dtype == np.float32 for l in loaded.layers
               if isinstance(l, keras.layers.Conv2D))
    after = loaded.predict(x, verbose=0)
    np.testing.assert_allclose(after, before, atol=5e-3)  # the int8 rounding of the kernels, nothing more
    twin = inference_model(loaded)
    assert not any(getattr(l, "quantization_mode", None) for l in twin.layers)
    np.testing.assert_allclose(twin.predict(x, verbose=0), after, atol=1e-5)
    (pq, mq), (pf, mf) = GradCAM(loaded)(x), GradCAM(twin)(x)
    np.testing.assert_allclose(pq, pf, atol=1e-5)
    np.testing.assert_allclose(mq, mf, atol=1e-3)
    assert mq.max() > 0
    with pytest.raises(ValueError, match="int8"):
        quantize_weights(model, "int4")


def test_mixstyle_is_training_only_and_left_out_of_shipped_models(tmp_path):
    """RunConfig.mixstyle puts MixStyle after Solution A's first two modules; it holds no weights, changes
    nothing at inference, survives a safe-mode save/load, and `inference_model` (what ships) drops it."""
    from core.nets.models import create_model, inference_model, load_model

    model = create_model("solution_a", 32, mixstyle=0.5, seed=0)
    assert [l.name for l in model.layers if "mixstyle" in l.name] == ["m1_mixstyle", "m2_mixstyle"]
    plain = create_model("solution_a", 32)
    assert model.count_params() == plain.count_params()
    x = np.random.default_rng(0).integers(0, 255, (4, 32, 32, 3)).astype("uint8")
    model.save(tmp_path / "m.keras")
    again = load_model(str(tmp_path / "m.keras"))
    clean = inference_model(again)
    assert not [l for l in clean.layers if "mixstyle" in l.name]
    np.testing.assert_allclose(np.asarray(clean(x)), np.asarray(model(x, training=False)), atol=1e-6)
    with pytest.raises(ValueError, match="mixstyle is not supported"):
        create_model("vgg16", 32, mixstyle=0.5)


@pytest.mark.parametrize("name,default", [("solution_a", (7e-4, 7e-4)), ("vgg16", (1e-5, 1e-4))])
def test_head_l1l2_sets_the_dense_penalty(name, default):
    """RunConfig.head_l1l2 replaces the architecture's own L1/L2 factors on every hidden dense kernel."""
    def factors(model):
        return {(round(float(l.kernel_regularizer.l1), 9), round(float(l.kernel_regularizer.l2), 9))
                for l in model.layers if l.name.startswith("fc") and not l.name.endswith("dropout")}

    assert factors(create_model(name, 32)) == {default}
    assert factors(create_model(name, 32, head_l1l2=1e-5)) == {(1e-5, 1e-5)}
