"""Stain and colour operations against hand-computed values (as MONAI tests its transforms), numpy and Keras."""
import numpy as np
import pytest

from core.image.stain import HED_FROM_RGB, RGB_FROM_HED, color_jitter, foreground, hed_jitter, standardize_cells

keras = pytest.importorskip("keras")
from core.nets.stain_layers import CellStandardize, RandomColorJitter, RandomHEDJitter  # noqa: E402


def _img(*pixels):
    """A 2x2 image: the given cell pixels first, the rest black background."""
    x = np.zeros((2, 2, 3), "float64")
    for i, p in enumerate(pixels):
        x[i // 2, i % 2] = p
    return x


def test_hed_matrix_is_ruifrok_johnston_as_in_skimage():
    skc = pytest.importorskip("skimage.color")
    np.testing.assert_allclose(RGB_FROM_HED, skc.rgb_from_hed, atol=1e-6)
    np.testing.assert_allclose(HED_FROM_RGB, skc.hed_from_rgb, atol=1e-6)


def test_hed_jitter_identity_and_hand_computed_scaling():
    x = _img((200, 100, 150), (30, 60, 90))
    np.testing.assert_allclose(hed_jitter(x, (1, 1, 1), (0, 0, 0)), x, atol=1e-9)
    # Scaling haematoxylin by 1.2 adds 0.2*H times the haematoxylin vector to the optical density:
    # x' = (x + 1) * exp(-0.2 * H * [0.65, 0.70, 0.29]) - 1, with H = OD . HED_FROM_RGB[:, 0].
    od = -np.log((np.array([200, 100, 150]) + 1) / 256)
    h = od @ HED_FROM_RGB[:, 0]
    expected = (np.array([200, 100, 150]) + 1) * np.exp(-0.2 * h * np.array([0.65, 0.70, 0.29])) - 1
    y = hed_jitter(x, (1.2, 1, 1), (0, 0, 0))
    np.testing.assert_allclose(y[0, 0], expected, atol=1e-9)
    # A shift beta of eosin adds beta * eosin vector to every cell pixel's OD; background stays black.
    y = hed_jitter(x, (1, 1, 1), (0, 0.1, 0))
    np.testing.assert_allclose(y[0, 1], (np.array([30, 60, 90]) + 1) * np.exp(-0.1 * RGB_FROM_HED[1]) - 1, atol=1e-9)
    np.testing.assert_array_equal(y[1], 0)


def test_color_jitter_hand_computed():
    x = _img((100, 50, 20))
    np.testing.assert_allclose(color_jitter(x, brightness=1.5)[0, 0], (150, 75, 30))
    two = _img((100, 100, 100), (50, 50, 50))
    np.testing.assert_allclose(color_jitter(two, contrast=2.0)[0, :], [(125,) * 3, (25,) * 3])
    gray = 0.299 * 100 + 0.587 * 50 + 0.114 * 20
    np.testing.assert_allclose(color_jitter(x, saturation=0.0)[0, 0], (gray,) * 3)
    # A third of a turn about the grey axis carries red to green, green to blue, blue to red.
    np.testing.assert_allclose(color_jitter(_img((200, 50, 20)), hue=1 / 3)[0, 0], (20, 200, 50), atol=1e-9)
    np.testing.assert_array_equal(color_jitter(x, brightness=3.0)[0, 0], (255, 150, 60))  # clipped
    np.testing.assert_array_equal(color_jitter(x, brightness=1.5)[1], 0)


def test_standardize_cells_hand_computed():
    x = _img((100, 100, 20), (200, 100, 40))[None]
    y = standardize_cells(x)
    d = 48 * 50 / np.sqrt(50 ** 2 + 1)  # channel 0: mean 150, std 50 (eps 1)
    np.testing.assert_allclose(y[0, 0, :, 0], (128 - d, 128 + d))
    np.testing.assert_allclose(y[0, 0, :, 1], (128, 128))  # constant channel -> the target mean
    np.testing.assert_array_equal(y[0, 1], 0)
    # Invariant to a per-channel affine stain change of the cell (what it is for)
    z = standardize_cells(np.where(foreground(x)[..., None], x * [0.8, 1.1, 0.9] + [5, -3, 7], 0))
    np.testing.assert_allclose(z, y, atol=0.1)  # up to the eps of the std


def _batch():
    rng = np.random.default_rng(0)
    x = np.zeros((3, 16, 16, 3), "float32")
    x[:, 4:12, 4:12] = rng.uniform(30, 230, (3, 8, 8, 3))
    return x


def test_keras_layers_match_numpy_reference():
    x = _batch()
    layer = RandomHEDJitter(0.1)
    alpha = np.array([[1.1, 0.9, 1.0], [1.0, 1.0, 1.0], [0.95, 1.05, 1.02]], "float32")
    beta = np.array([[0.02, -0.05, 0.0], [0.0, 0.0, 0.0], [-0.03, 0.01, 0.04]], "float32")
    got = keras.ops.convert_to_numpy(layer.jitter(keras.ops.convert_to_tensor(x), alpha, beta))
    want = np.stack([hed_jitter(x[i], alpha[i], beta[i]) for i in range(3)])
    np.testing.assert_allclose(got, want, atol=0.05)

    cj = RandomColorJitter(0.1, 0.1, 0.1, 0.05)
    b, c, s, h = (np.array(v, "float32") for v in ([1.1, 1, 0.9], [0.9, 1, 1.2], [1.1, 1, 0.8], [0.03, 0, -0.05]))
    got = keras.ops.convert_to_numpy(cj.jitter(keras.ops.convert_to_tensor(x), b, c, s, h))
    want = np.stack([color_jitter(x[i], b[i], c[i], s[i], h[i]) for i in range(3)])
    np.testing.assert_allclose(got, want, atol=0.05)

    got = keras.ops.convert_to_numpy(CellStandardize()(x))
    np.testing.assert_allclose(got, standardize_cells(x), atol=0.05)


def test_jitter_layers_train_only_and_keep_background_black():
    x = _batch()
    for layer in (RandomHEDJitter(0.2, seed=1), RandomColorJitter(0.3, 0.3, 0.3, 0.1, seed=1)):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
        y = keras.ops.convert_to_numpy(layer(x, training=True))
        assert not np.allclose(y, x)
        np.testing.assert_array_equal(y[:, :4], 0)  # background rows untouched
        assert y.min() >= 0 and y.max() <= 255


def test_stain_layers_in_a_saved_model_round_trip(tmp_path):
    from core.nets.augmentation import AugmentSpec
    from core.nets.models import create_model, load_model

    spec = AugmentSpec(hed_sigma=0.05, brightness=0.1, contrast=0.1, saturation=0.1, hue=0.02)
    m = create_model("solution_a", 32, augment=spec, standardize=True, filters=(4, 4, 4, 4))
    aug = m.get_layer("augmentation")
    assert {"hed_jitter", "color_jitter"} <= {l.name for l in aug.layers}
    path = tmp_path / "m.keras"
    m.save(path)
    x = (np.random.default_rng(1).uniform(0, 255, (2, 32, 32, 3))).astype("uint8")
    np.testing.assert_allclose(load_model(str(path)).predict(x, verbose=0), m.predict(x, verbose=0), atol=1e-6)


def test_texture_hand_computed_and_layer_matches():
    from core.image.stain import box3, texture
    from core.nets.stain_layers import RandomTexture

    x = np.zeros((3, 3, 3))
    x[1, 1] = 90.0  # one cell pixel: its 3x3 mean is 10
    np.testing.assert_allclose(box3(x)[1, 1], 10.0)
    np.testing.assert_allclose(texture(x, amount=0.5)[1, 1], 90 + 0.5 * (90 - 10))  # sharpened
    np.testing.assert_allclose(texture(x, amount=-0.5)[1, 1], 90 - 0.5 * 80)  # blurred
    np.testing.assert_array_equal(texture(x, amount=0.5)[0, 0], 0)  # background untouched
    noise = np.full((3, 3, 3), 7.0)
    np.testing.assert_allclose(texture(x, 0.0, noise)[1, 1], 97.0)
    xb = _batch()
    layer = RandomTexture(1.0, 8.0)
    amount = np.array([0.7, -0.4, 0.0], "float32")
    nz = np.random.default_rng(2).normal(0, 5, xb.shape).astype("float32")
    got = keras.ops.convert_to_numpy(layer.jitter(keras.ops.convert_to_tensor(xb), amount, nz))
    want = np.stack([texture(xb[i], amount[i], nz[i]) for i in range(3)])
    np.testing.assert_allclose(got, want, atol=0.05)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(RandomTexture(1.0, 8.0)(xb, training=False)), xb)


def test_reinhard_moves_a_cells_lab_mean_and_std_to_the_target_by_hand():
    """Two colours in equal numbers sit at mean -/+ one std in each LAB channel, so after the transfer each must
    land exactly on target mean -/+ target std (the sign: which side of the mean it was on); black stays black."""
    skc = pytest.importorskip("skimage.color")
    from core.image.stain import CNMC_LAB_MEAN, CNMC_LAB_STD, reinhard

    a, b = np.array([200.0, 150.0, 220.0]), np.array([120.0, 60.0, 180.0])
    x = np.zeros((4, 4, 3))
    x[1:3, 0:2], x[1:3, 2:4] = a, b
    y = reinhard(x)
    lab_a, lab_b = skc.rgb2lab(a / 255.0), skc.rgb2lab(b / 255.0)
    sign = np.sign(lab_a - lab_b)  # a is above the mean where it exceeds b
    np.testing.assert_allclose(skc.rgb2lab(y[1, 0] / 255.0), np.add(CNMC_LAB_MEAN, sign * CNMC_LAB_STD), atol=1e-4)
    np.testing.assert_allclose(skc.rgb2lab(y[1, 3] / 255.0), np.subtract(CNMC_LAB_MEAN, sign * CNMC_LAB_STD),
                               atol=1e-4)
    assert (y[0] == 0).all() and (y[3] == 0).all()
    # a target darker than the background threshold: cell pixels are lifted just above it, never lost
    dark = reinhard(x, mean=(1.0, 0.0, 0.0), std=(0.1, 0.1, 0.1))
    assert (foreground(dark) == foreground(x)).all()
    # an all-black image is returned unchanged
    assert (reinhard(np.zeros((3, 3, 3))) == 0).all()
