"""The report's augmentation (§5.2, after de Oliveira & Dantas 2021) as one Keras layer stack.

Per training sample: a random rotation and a random flip; then, with probability 1/3 each, nothing more, a
shear, or a Gaussian blur. Options: a rotation range such as 20-340 degrees and salt-and-pepper noise.
Built from Keras 3 preprocessing layers, so it runs on the accelerator inside the training step and is a no-op
at inference (`training=False`). Inputs are float pixels in [0, 255] on a black background.
"""
from __future__ import annotations

from dataclasses import dataclass

import keras
from keras import layers, ops

from core.nets.stain_layers import RandomColorJitter, RandomHEDJitter, RandomTexture


@dataclass(frozen=True)
class AugmentSpec:
    """What to augment; mirrors the augmentation fields of `training.config.RunConfig`."""

    rotation_deg: tuple[float, float] = (0.0, 360.0)  # uniform angle range; de Oliveira's option: (20, 340)
    flip: bool = True  # random horizontal and vertical flips
    shear: float = 0.2  # RandomShear factor for the shear branch
    blur_sigma: tuple[float, float] = (0.5, 1.5)  # Gaussian blur branch, sigma range in pixels
    salt_pepper: float = 0.0  # fraction of pixels set to black or white (0 = off)
    hed_sigma: float = 0.0  # Tellez HED stain jitter strength (0 = off; 0.05 light, 0.2 strong)
    brightness: float = 0.0  # colour jitter: factors drawn from U(1-f, 1+f) (0 = off)
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0  # hue rotation drawn from U(-h, h) turns (0.05 = 18 degrees)
    sharpness: float = 0.0  # unsharp-mask amount drawn from U(-s, s): blur (< 0) or sharpen (> 0); 0 = off
    noise_std: float = 0.0  # Gaussian noise on the cell, std drawn from U(0, n) grey levels; 0 = off


@keras.saving.register_keras_serializable(package="cnmc")
class RandomChoice(layers.Layer):
    """Apply exactly one of several layers per sample, chosen uniformly (the report's 1/3 each).

    Every branch is computed for the batch and one result is selected per sample: branchless, so it compiles
    to one graph on TF and JAX. The identity branch is simply `None` in `branches`.
    """

    def __init__(self, branches, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.branches = branches
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def build(self, input_shape):
        for branch in self.branches:
            if branch is not None and not branch.built:
                branch.build(input_shape)
        super().build(input_shape)

    def call(self, inputs, training=None):
        if not training:
            return inputs
        n = len(self.branches)
        batch = ops.shape(inputs)[0]
        pick = keras.random.randint((batch,), 0, n, seed=self.seed_generator)
        out = inputs
        for k, branch in enumerate(self.branches):
            if branch is None:
                continue
            y = branch(inputs, training=True)
            mask = ops.reshape(ops.cast(ops.equal(pick, k), inputs.dtype), (-1, 1, 1, 1))
            out = out * (1 - mask) + ops.cast(y, inputs.dtype) * mask
        return out

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(seed=self.seed, branches=[None if b is None else keras.saving.serialize_keras_object(b)
                                             for b in self.branches])
        return cfg

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["branches"] = [None if b is None else keras.saving.deserialize_keras_object(b)
                              for b in config["branches"]]
        return cls(**config)


@keras.saving.register_keras_serializable(package="cnmc")
class SaltAndPepper(layers.Layer):
    """Set a random fraction `rate` of pixels to black (pepper) or white (salt), training only."""

    def __init__(self, rate=0.01, value_range=(0.0, 255.0), seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.value_range, self.seed = float(rate), tuple(value_range), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.rate <= 0:
            return inputs
        shape = ops.shape(inputs)
        u = keras.random.uniform((shape[0], shape[1], shape[2], 1), seed=self.seed_generator)
        salt = ops.cast(u < self.rate / 2, inputs.dtype)
        pepper = ops.cast((u >= self.rate / 2) & (u < self.rate), inputs.dtype)
        keep = 1 - salt - pepper
        return inputs * keep + salt * self.value_range[1] + pepper * self.value_range[0]

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        cfg = super().get_config()
        cfg.update(rate=self.rate, value_range=list(self.value_range), seed=self.seed)
        return cfg


def _jit_on_jax(layer: layers.Layer) -> None:
    """Let a model holding this affine layer be XLA-compiled under JAX.

    Keras marks RandomRotation and RandomShear `supports_jit = False` for every backend (TensorFlow's
    ImageProjectiveTransform has no XLA kernel), and one such layer makes `fit` run the whole JAX train step
    op by op: on an H200 that cut Solution A at 250 px from 3,884 to 39.5 img/s (`benchmarks/gpu_check.sh`).
    Under JAX the transform is `jax.scipy.ndimage.map_coordinates`, which traces; so it may be compiled there.
    """
    if keras.backend.backend() == "jax":
        layer.supports_jit = True


@keras.saving.register_keras_serializable(package="cnmc")
class RandomRotation(layers.RandomRotation):
    """keras.layers.RandomRotation, compiled with the train step under JAX (see `_jit_on_jax`)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _jit_on_jax(self)


@keras.saving.register_keras_serializable(package="cnmc")
class RandomShear(layers.RandomShear):
    """keras.layers.RandomShear whose saved config loads again, compiled with the train step under JAX.

    Keras 3.15 saves the symmetric factor as [-f, f], which its constructor rejects when loading; we keep the
    original arguments in the config instead.
    """

    def __init__(self, x_factor=0.0, y_factor=0.0, **kwargs):
        super().__init__(x_factor=x_factor, y_factor=y_factor, **kwargs)
        self._factor_args = (x_factor, y_factor)
        _jit_on_jax(self)

    def get_config(self):
        cfg = super().get_config()
        cfg["x_factor"], cfg["y_factor"] = self._factor_args
        return cfg


def build_augmentation(spec: AugmentSpec = AugmentSpec(), seed: int | None = None) -> keras.Sequential:
    """The augmentation stack for `spec`; float32 even under mixed precision (interpolation accuracy)."""
    lo, hi = spec.rotation_deg
    if not 0 <= lo <= hi <= 360:
        raise ValueError(f"rotation range must satisfy 0 <= low <= high <= 360, got {spec.rotation_deg}")
    dt = "float32"
    stack: list[layers.Layer] = []
    if hi > lo:
        stack.append(RandomRotation((lo / 360.0, hi / 360.0), fill_mode="constant", fill_value=0.0,
                                    seed=seed, dtype=dt, name="rotate"))
    if spec.flip:
        stack.append(layers.RandomFlip("horizontal_and_vertical", seed=seed, dtype=dt, name="flip"))
    branches: list[layers.Layer | None] = [None]
    if spec.shear > 0:
        branches.append(RandomShear(x_factor=spec.shear, y_factor=spec.shear, fill_mode="constant",
                                           fill_value=0.0, seed=seed, dtype=dt, name="shear"))
    if spec.blur_sigma[1] > 0:
        branches.append(layers.RandomGaussianBlur(factor=1.0, kernel_size=5, sigma=tuple(spec.blur_sigma),
                                                  value_range=(0, 255), seed=seed, dtype=dt, name="blur"))
    if len(branches) > 1:
        stack.append(RandomChoice(branches, seed=seed, dtype=dt, name="none_shear_or_blur"))
    if spec.hed_sigma > 0:
        stack.append(RandomHEDJitter(spec.hed_sigma, seed=seed, dtype=dt, name="hed_jitter"))
    if any((spec.brightness, spec.contrast, spec.saturation, spec.hue)):
        stack.append(RandomColorJitter(spec.brightness, spec.contrast, spec.saturation, spec.hue, seed=seed,
                                       dtype=dt, name="color_jitter"))
    if spec.sharpness > 0 or spec.noise_std > 0:
        stack.append(RandomTexture(spec.sharpness, spec.noise_std, seed=seed, dtype=dt, name="texture"))
    if spec.salt_pepper > 0:
        stack.append(SaltAndPepper(spec.salt_pepper, seed=seed, dtype=dt, name="salt_and_pepper"))
    return keras.Sequential(stack, name="augmentation")


def mix_style(x, lam, perm, eps: float = 1e-6):
    """MixStyle's deterministic core (Zhou et al., ICLR 2021): each sample's feature statistics mixed with
    those of sample `perm[i]`.

    x (N, H, W, C) features, lam (N,) mixing weights, perm (N,) integer indices. Each channel is standardised by
    its own spatial mean/std and rescaled with lam * own + (1 - lam) * partner's; the statistics carry no
    gradient, as in the paper.
    """
    mu = ops.stop_gradient(ops.mean(x, axis=(1, 2), keepdims=True))
    sig = ops.stop_gradient(ops.sqrt(ops.var(x, axis=(1, 2), keepdims=True) + eps))
    lam = ops.reshape(ops.cast(lam, x.dtype), (-1, 1, 1, 1))
    mu2, sig2 = ops.take(mu, perm, axis=0), ops.take(sig, perm, axis=0)
    return (x - mu) / sig * (lam * sig + (1 - lam) * sig2) + lam * mu + (1 - lam) * mu2


@keras.saving.register_keras_serializable(package="cnmc")
class MixStyle(layers.Layer):
    """Feature-statistics mixing between the cells of a batch, training only (Zhou et al. 2021).

    Why: C-NMC subjects differ in "style" (stain, illumination, texture), which early convolution features hold
    as per-channel means and stds. Mixing them between random cells of a batch (which come from different
    subjects) synthesises new styles, a domain-generalisation method aimed at unseen patients. With probability
    `p` per batch; lam ~ Beta(alpha, alpha) per cell; identity at inference, and it holds no weights.
    """

    def __init__(self, p: float = 0.5, alpha: float = 0.1, eps: float = 1e-6, seed=None, **kwargs):
        super().__init__(**kwargs)
        if not 0 <= p <= 1 or alpha <= 0:
            raise ValueError(f"MixStyle needs 0 <= p <= 1 and alpha > 0; got p={p}, alpha={alpha}")
        self.p, self.alpha, self.eps, self.seed = float(p), float(alpha), float(eps), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, inputs, training=None):
        if not training or self.p <= 0:
            return inputs
        n = ops.shape(inputs)[0]
        lam = keras.random.beta((n,), self.alpha, self.alpha, seed=self.seed_generator)
        perm = keras.random.shuffle(ops.arange(n), seed=self.seed_generator)
        mixed = mix_style(inputs, lam, perm, self.eps)
        apply = keras.random.uniform((), seed=self.seed_generator) < self.p
        return ops.where(apply, mixed, inputs)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "p": self.p, "alpha": self.alpha, "eps": self.eps, "seed": self.seed}
