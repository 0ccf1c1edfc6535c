import numpy as np
import pytest

keras = pytest.importorskip("keras")

from core.nets.augmentation import AugmentSpec, RandomChoice, SaltAndPepper, build_augmentation  # noqa: E402


def _cells(n=8, size=48):
    x = np.zeros((n, size, size, 3), "float32")
    x[:, size // 4: 3 * size // 4, size // 4: size // 2] = [120.0, 40.0, 150.0]  # asymmetric blob, black border
    return x


def test_inactive_at_inference_active_in_training():
    aug = build_augmentation(AugmentSpec(salt_pepper=0.02), seed=1)
    x = _cells()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(aug(x, training=False)), x)
    y = keras.ops.convert_to_numpy(aug(x, training=True))
    assert y.shape == x.shape and not np.allclose(y, x)


def test_background_stays_black_after_rotation_and_shear():
    aug = build_augmentation(AugmentSpec(blur_sigma=(0.0, 0.0)), seed=2)
    y = keras.ops.convert_to_numpy(aug(_cells(16, 64), training=True))
    corners = np.concatenate([y[:, :3, :3], y[:, -3:, -3:]]).ravel()
    assert np.abs(corners).max() < 1e-3


@keras.saving.register_keras_serializable(package="test")
class AddConst(keras.layers.Layer):
    def __init__(self, value=0.0, **kw):
        super().__init__(**kw)
        self.value = value

    def call(self, x, training=None):
        return x + self.value

    def get_config(self):
        return {**super().get_config(), "value": self.value}


def test_random_choice_picks_one_branch_per_sample_uniformly():
    layer = RandomChoice([None, AddConst(100.0), AddConst(200.0)], seed=3)
    x = np.zeros((3000, 2, 2, 1), "float32")
    y = keras.ops.convert_to_numpy(layer(x, training=True))[:, 0, 0, 0]
    assert set(np.unique(y)) == {0.0, 100.0, 200.0}  # exactly one branch each, never a mix
    frac = np.array([(y == v).mean() for v in (0.0, 100.0, 200.0)])
    np.testing.assert_allclose(frac, 1 / 3, atol=0.04)


def test_salt_and_pepper_rate():
    x = np.full((4, 100, 100, 3), 128.0, "float32")
    y = keras.ops.convert_to_numpy(SaltAndPepper(0.1, seed=0)(x, training=True))
    changed = (y[..., 0] != 128.0).mean()
    assert abs(changed - 0.1) < 0.01
    assert set(np.unique(y)) == {0.0, 128.0, 255.0}


def test_rotation_range_option():
    aug = build_augmentation(AugmentSpec(rotation_deg=(20.0, 340.0)))
    rot = aug.get_layer("rotate")
    np.testing.assert_allclose(rot.get_config()["factor"], (20 / 360, 340 / 360))
    with pytest.raises(ValueError, match="rotation range"):
        build_augmentation(AugmentSpec(rotation_deg=(90.0, 10.0)))


def test_affine_layers_let_jax_compile_the_train_step(monkeypatch):
    """Keras marks RandomRotation/RandomShear non-jittable for every backend, which made JAX run the whole
    train step op by op (100x slower on a GPU); ours allow compilation under JAX only, where the transform
    traces (TensorFlow's has no XLA kernel)."""
    import keras

    from core.nets.augmentation import RandomRotation, RandomShear, build_augmentation

    assert not keras.layers.RandomRotation(0.5).supports_jit  # what Keras does: why ours exist
    monkeypatch.setattr(keras.backend, "backend", lambda: "jax")
    assert RandomRotation(0.5).supports_jit and RandomShear(0.2, 0.2).supports_jit
    assert all(l.supports_jit for l in build_augmentation(AugmentSpec())._flatten_layers())
    monkeypatch.setattr(keras.backend, "backend", lambda: "tensorflow")
    assert not RandomRotation(0.5).supports_jit and not RandomShear(0.2, 0.2).supports_jit


def test_mix_style_matches_hand_computed_statistics():
    """MixStyle's core against numpy: standardise each channel by its own spatial mean/std, rescale with the
    lam-mix of own and partner's statistics."""
    from core.nets.augmentation import mix_style

    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, (3, 4, 5, 2)).astype("float32")
    x[1] *= 5.0  # a second "style"
    lam, perm, eps = np.array([0.2, 1.0, 0.7], "float32"), np.array([1, 0, 1]), 1e-6
    mu = x.mean(axis=(1, 2), keepdims=True)
    sig = np.sqrt(x.var(axis=(1, 2), keepdims=True) + eps)
    want = np.empty_like(x)
    for i in range(3):
        j = perm[i]
        want[i] = (x[i] - mu[i]) / sig[i] * (lam[i] * sig[i] + (1 - lam[i]) * sig[j]) \
            + lam[i] * mu[i] + (1 - lam[i]) * mu[j]
    got = keras.ops.convert_to_numpy(mix_style(x, lam, perm, eps))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got[1], x[1], rtol=1e-5, atol=1e-4)  # lam 1: own style kept
    # lam 0 takes the partner's statistics exactly, the spatial pattern stays its own
    z = keras.ops.convert_to_numpy(mix_style(x, np.zeros(3, "float32"), perm, eps))
    np.testing.assert_allclose(z[0].mean(axis=(0, 1)), x[1].mean(axis=(0, 1)), rtol=1e-4)
    np.testing.assert_allclose(z[0].std(axis=(0, 1)), x[1].std(axis=(0, 1)), rtol=1e-4)


def test_mixstyle_layer_is_identity_at_inference_and_mixes_styles_in_training():
    from core.nets.augmentation import MixStyle

    rng = np.random.default_rng(1)
    x = np.concatenate([rng.normal(0, 1, (32, 6, 6, 4)), rng.normal(10, 3, (32, 6, 6, 4))]).astype("float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(MixStyle(1.0, seed=0)(x, training=False)), x)
    y = keras.ops.convert_to_numpy(MixStyle(1.0, alpha=0.1, seed=0)(x, training=True))
    means = y.mean(axis=(1, 2, 3))
    # some cells of the first style took on (part of) the second's statistics and vice versa
    assert (means[:32] > 2).any() and (means[32:] < 8).any()
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(MixStyle(0.0, seed=0)(x, training=True)), x)
    with pytest.raises(ValueError, match="MixStyle"):
        MixStyle(1.5)
