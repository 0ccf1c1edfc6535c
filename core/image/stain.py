"""Stain and colour: augmentation layers for generalising across patients, and per-cell standardisation.

C-NMC subjects were stained and photographed in batches: colour and brightness differ more between subjects
than between the two classes within one subject, so a network fed raw colours learns the subjects. Three tools:

- `RandomHEDJitter` (Tellez et al. 2019, "Quantifying the effects of data augmentation and stain colour
  normalisation..."): per cell, the optical density is split into haematoxylin, eosin and DAB components
  (Ruifrok & Johnston's matrix, as `skimage.color.rgb2hed`), each scaled by alpha ~ U(1-s, 1+s) and shifted by
  beta ~ U(-s, s) (in OD units), then recombined. Training only.
- `RandomColorJitter`: brightness (multiplicative), contrast (around the cell's mean), saturation (towards the
  luminance) and hue (a rotation about the grey axis). Training only.
- `CellStandardize`: every cell's foreground pixels brought, per channel, to mean 128 and std 48 (Reinhard-like,
  in RGB): active at inference too, so it is part of the model and of every prediction.

All three touch only the cell: background pixels (every channel <= `background`) stay exactly black, since
C-NMC cells are segmented on black and the black frame carries no stain. Pixels are floats in [0, 255].
This module is numpy only (the reference: `hed_jitter`, `color_jitter`, `standardize_cells`); the Keras layers
that run the same maths on the accelerator are in `core.nets.stain_layers`.
"""
from __future__ import annotations

import numpy as np

# Ruifrok & Johnston (2001) stain vectors as rows (haematoxylin, eosin, DAB), the matrix skimage.color uses.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29],
                         [0.07, 0.99, 0.11],
                         [0.27, 0.57, 0.78]], dtype="float64")
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
BACKGROUND = 10.0  # a pixel whose every channel is at most this is background
STD_MEAN, STD_SCALE = 128.0, 48.0  # CellStandardize targets
_LUMA = np.array([0.299, 0.587, 0.114])


def _od(x):
    """Optical density of pixels in [0, 255] (+1 so that black stays finite)."""
    return -np.log((np.asarray(x, dtype="float64") + 1.0) / 256.0)


def _from_od(od):
    return np.clip(256.0 * np.exp(-od) - 1.0, 0.0, 255.0)


def foreground(x: np.ndarray, background: float = BACKGROUND) -> np.ndarray:
    """Boolean mask (..., H, W) of cell pixels: any channel above `background`."""
    return np.asarray(x).max(axis=-1) > background


def hed_jitter(x: np.ndarray, alpha, beta, background: float = BACKGROUND) -> np.ndarray:
    """One image (H, W, 3): HED components scaled by `alpha` (3,) and shifted by `beta` (3,), cell only."""
    x = np.asarray(x, dtype="float64")
    hed = _od(x) @ HED_FROM_RGB
    out = _from_od((hed * np.asarray(alpha) + np.asarray(beta)) @ RGB_FROM_HED)
    return np.where(foreground(x, background)[..., None], out, x)


def _hue_matrix(theta: float) -> np.ndarray:
    """Rotation by `theta` radians about the grey axis (1, 1, 1)/sqrt(3) (Rodrigues' formula)."""
    k = np.ones(3) / np.sqrt(3.0)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(theta) * kx + (1 - np.cos(theta)) * (kx @ kx)


def color_jitter(x: np.ndarray, brightness: float = 1.0, contrast: float = 1.0, saturation: float = 1.0,
                 hue: float = 0.0, background: float = BACKGROUND) -> np.ndarray:
    """One image: x*brightness; then contrast around the cell mean; saturation towards luminance; hue rotation
    (`hue` in turns, 0.1 = 36 degrees); cell pixels only, clipped to [0, 255]."""
    x = np.asarray(x, dtype="float64")
    fg = foreground(x, background)
    y = x * brightness
    mean = y[fg].mean(axis=0) if fg.any() else np.zeros(3)
    y = mean + (y - mean) * contrast
    gray = (y @ _LUMA)[..., None]
    y = gray + (y - gray) * saturation
    y = y @ _hue_matrix(2 * np.pi * hue).T
    return np.where(fg[..., None], np.clip(y, 0, 255), x)


def box3(x: np.ndarray) -> np.ndarray:
    """3x3 mean of one image (H, W, C) with zero padding, the blur `texture` sharpens against."""
    p = np.pad(np.asarray(x, dtype="float64"), ((1, 1), (1, 1), (0, 0)))
    h, w = x.shape[:2]
    return sum(p[i:i + h, j:j + w] for i in range(3) for j in range(3)) / 9.0


def texture(x: np.ndarray, amount: float = 0.0, noise=None, background: float = BACKGROUND) -> np.ndarray:
    """One image: unsharp masking x + amount * (x - box3(x)) (amount < 0 blurs, > 0 sharpens), plus an additive
    `noise` array; cell pixels only, clipped. Scanners and focus differ by batch: a texture a model must not
    take for a class."""
    x = np.asarray(x, dtype="float64")
    y = x + amount * (x - box3(x))
    if noise is not None:
        y = y + noise
    return np.where(foreground(x, background)[..., None], np.clip(y, 0, 255), x)


def standardize_cells(x: np.ndarray, background: float = BACKGROUND, eps: float = 1.0) -> np.ndarray:
    """Batch (N, H, W, 3): each cell's pixels, per channel, to mean 128 and std 48; background stays 0."""
    x = np.asarray(x, dtype="float64")
    fg = foreground(x, background)[..., None]
    n = np.maximum(fg.sum(axis=(1, 2), keepdims=True), 1)
    mean = (x * fg).sum(axis=(1, 2), keepdims=True) / n
    var = (np.square(x - mean) * fg).sum(axis=(1, 2), keepdims=True) / n
    y = STD_MEAN + STD_SCALE * (x - mean) / np.sqrt(var + eps ** 2)
    return np.where(fg, np.clip(y, 0, 255), 0.0)


# C-NMC 2019 fold 1: LAB statistics of a cell's own pixels, the median over 400 cells (125-px crops), the
# target of `reinhard` (other labs' cells brought toward C-NMC's stain).
CNMC_LAB_MEAN = (19.19, 27.85, -22.60)
CNMC_LAB_STD = (3.95, 3.65, 3.49)


def reinhard(x: np.ndarray, mean=CNMC_LAB_MEAN, std=CNMC_LAB_STD, background: float = BACKGROUND,
             eps: float = 1e-6) -> np.ndarray:
    """One cell on black (H, W, 3) with its pixels' LAB mean and std per channel moved to `mean`, `std`
    (Reinhard et al. 2001 colour transfer, on the cell only): a cell from another lab's smear brought toward
    C-NMC's stain. The background stays exactly black and no cell pixel becomes background."""
    from skimage.color import lab2rgb, rgb2lab

    x = np.asarray(x, dtype="float64")
    fg = foreground(x, background)
    if not fg.any():
        return x.copy()
    lab = rgb2lab(x[fg] / 255.0)
    lab = (lab - lab.mean(0)) / np.maximum(lab.std(0), eps) * np.asarray(std) + np.asarray(mean)
    rgb = np.clip(lab2rgb(lab) * 255.0, 0.0, 255.0)
    low = rgb.max(-1) <= background  # would read as background: lifted just above it
    rgb[low] += (background + 1.0 - rgb[low].max(-1))[:, None]
    out = np.zeros_like(x)
    out[fg] = rgb
    return out
