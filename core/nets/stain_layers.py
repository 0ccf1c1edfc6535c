"""Keras layers of `core.image.stain`: the same maths through `keras.ops`, on the accelerator inside the model."""
from __future__ import annotations

import keras
import numpy as np
from keras import layers, ops

from core.image.stain import _LUMA, BACKGROUND, HED_FROM_RGB, RGB_FROM_HED, STD_MEAN, STD_SCALE


def _fg_mask(x, background):
    return ops.cast(ops.max(x, axis=-1, keepdims=True) > background, x.dtype)


@keras.saving.register_keras_serializable(package="cnmc")
class RandomHEDJitter(layers.Layer):
    """Tellez's HED stain augmentation, per sample, on cell pixels; identity at inference."""

    def __init__(self, sigma: float = 0.05, background: float = BACKGROUND, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.sigma, self.background, self.seed = float(sigma), float(background), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def jitter(self, x, alpha, beta):
        """Deterministic core: x (N, H, W, 3), alpha and beta (N, 3)."""
        m_in = ops.convert_to_tensor(HED_FROM_RGB.astype("float32"))
        m_out = ops.convert_to_tensor(RGB_FROM_HED.astype("float32"))
        od = -ops.log((x + 1.0) / 256.0)
        hed = ops.einsum("nhwc,cd->nhwd", od, m_in)
        hed = hed * alpha[:, None, None, :] + beta[:, None, None, :]
        out = ops.clip(256.0 * ops.exp(-ops.einsum("nhwd,dc->nhwc", hed, m_out)) - 1.0, 0.0, 255.0)
        fg = _fg_mask(x, self.background)
        return out * fg + x * (1 - fg)

    def call(self, inputs, training=None):
        if not training or self.sigma <= 0:
            return inputs
        x = ops.cast(inputs, "float32")
        n = ops.shape(x)[0]
        s = self.sigma
        alpha = keras.random.uniform((n, 3), 1 - s, 1 + s, seed=self.seed_generator)
        beta = keras.random.uniform((n, 3), -s, s, seed=self.seed_generator)
        return ops.cast(self.jitter(x, alpha, beta), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "sigma": self.sigma, "background": self.background, "seed": self.seed}


@keras.saving.register_keras_serializable(package="cnmc")
class RandomColorJitter(layers.Layer):
    """Brightness, contrast, saturation (factors drawn from U(1-f, 1+f)) and hue (U(-h, h) turns) per sample,
    on cell pixels; identity at inference."""

    def __init__(self, brightness: float = 0.0, contrast: float = 0.0, saturation: float = 0.0, hue: float = 0.0,
                 background: float = BACKGROUND, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.brightness, self.contrast = float(brightness), float(contrast)
        self.saturation, self.hue = float(saturation), float(hue)
        self.background, self.seed = float(background), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def jitter(self, x, b, c, s, h):
        """Deterministic core: x (N, H, W, 3); b, c, s, h (N,) factors and hue turns."""
        fg = _fg_mask(x, self.background)
        y = x * b[:, None, None, None]
        n = ops.maximum(ops.sum(fg, axis=(1, 2), keepdims=True), 1.0)
        mean = ops.sum(y * fg, axis=(1, 2), keepdims=True) / n
        y = mean + (y - mean) * c[:, None, None, None]
        luma = ops.convert_to_tensor(_LUMA.astype("float32"))
        gray = ops.sum(y * luma, axis=-1, keepdims=True)
        y = gray + (y - gray) * s[:, None, None, None]
        # Rodrigues rotation about the grey axis, one angle per sample: R = I + sin K + (1 - cos) K^2
        k = np.ones(3) / np.sqrt(3.0)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        theta = 2 * np.pi * h
        eye, kx_t, kx2_t = (ops.convert_to_tensor(a.astype("float32")) for a in (np.eye(3), kx, kx @ kx))
        rot = (eye[None] + ops.sin(theta)[:, None, None] * kx_t[None]
               + (1 - ops.cos(theta))[:, None, None] * kx2_t[None])
        y = ops.einsum("nhwc,ndc->nhwd", y, rot)
        return ops.clip(y, 0.0, 255.0) * fg + x * (1 - fg)

    def call(self, inputs, training=None):
        if not training or not any((self.brightness, self.contrast, self.saturation, self.hue)):
            return inputs
        x = ops.cast(inputs, "float32")
        n = ops.shape(x)[0]

        def factor(f):
            return keras.random.uniform((n,), 1 - f, 1 + f, seed=self.seed_generator)

        h = keras.random.uniform((n,), -self.hue, self.hue, seed=self.seed_generator)
        y = self.jitter(x, factor(self.brightness), factor(self.contrast), factor(self.saturation), h)
        return ops.cast(y, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "brightness": self.brightness, "contrast": self.contrast,
                "saturation": self.saturation, "hue": self.hue, "background": self.background, "seed": self.seed}


@keras.saving.register_keras_serializable(package="cnmc")
class CellStandardize(layers.Layer):
    """Per-cell, per-channel standardisation of the foreground (mean 128, std 48); active at inference."""

    def __init__(self, background: float = BACKGROUND, eps: float = 1.0, **kwargs):
        super().__init__(**kwargs)
        self.background, self.eps = float(background), float(eps)

    def call(self, inputs):
        x = ops.cast(inputs, "float32")
        fg = _fg_mask(x, self.background)
        n = ops.maximum(ops.sum(fg, axis=(1, 2), keepdims=True), 1.0)
        mean = ops.sum(x * fg, axis=(1, 2), keepdims=True) / n
        var = ops.sum(ops.square(x - mean) * fg, axis=(1, 2), keepdims=True) / n
        y = STD_MEAN + STD_SCALE * (x - mean) / ops.sqrt(var + self.eps ** 2)
        return ops.cast(ops.clip(y, 0.0, 255.0) * fg, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "background": self.background, "eps": self.eps}


@keras.saving.register_keras_serializable(package="cnmc")
class RandomTexture(layers.Layer):
    """Sharpness and noise per sample, on cell pixels: unsharp amount ~U(-s, s), Gaussian noise with a std drawn
    from U(0, n); identity at inference. Follows `core.image.stain.texture`."""

    def __init__(self, sharpness: float = 0.0, noise_std: float = 0.0, background: float = BACKGROUND, seed=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.sharpness, self.noise_std, self.background, self.seed = float(sharpness), float(noise_std), \
            float(background), seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def jitter(self, x, amount, noise):
        """Deterministic core: x (N, H, W, 3), amount (N,), noise (N, H, W, 3)."""
        blur = ops.average_pool(ops.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0))), 3, strides=1, padding="valid")
        y = x + amount[:, None, None, None] * (x - blur) + noise
        fg = _fg_mask(x, self.background)
        return ops.clip(y, 0.0, 255.0) * fg + x * (1 - fg)

    def call(self, inputs, training=None):
        if not training or (self.sharpness <= 0 and self.noise_std <= 0):
            return inputs
        x = ops.cast(inputs, "float32")
        n = ops.shape(x)[0]
        amount = keras.random.uniform((n,), -self.sharpness, self.sharpness, seed=self.seed_generator)
        std = keras.random.uniform((n, 1, 1, 1), 0.0, self.noise_std, seed=self.seed_generator)
        noise = keras.random.normal(ops.shape(x), seed=self.seed_generator) * std
        return ops.cast(self.jitter(x, amount, noise), inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "sharpness": self.sharpness, "noise_std": self.noise_std,
                "background": self.background, "seed": self.seed}
