"""Grad-CAM for every registered architecture, under the TensorFlow, JAX and torch backends.

`GradCAM(model)` finds the last convolutional feature map by itself (the last 4-D output of a Conv2D layer or
of a nested backbone), and returns class probabilities plus heatmaps in [0, 1] at the input's resolution.
Compute returns arrays; `overlay` blends a heatmap onto a crop for display. Pages only draw the result.
"""
from __future__ import annotations

import numpy as np

import keras


BLAST = 1  # index of the `all` class in the two-unit output


def _rank4(layer) -> bool:
    try:
        shape = layer.output.shape
    except (AttributeError, ValueError):
        return False
    return len(shape) == 4


def find_target_layer(model: keras.Model) -> keras.layers.Layer:
    """The last layer of the outer graph whose output is a convolutional feature map."""
    layers = model.layers
    for layer in reversed(layers):
        if _rank4(layer) and (isinstance(layer, (keras.layers.Conv2D, keras.Model))):
            return layer
    for layer in reversed(layers):  # fallback: any 4-D output past the input/augmentation stage
        if _rank4(layer) and not isinstance(layer, keras.layers.InputLayer) and layer.name not in (
                "to_float", "augmentation", "normalise"):
            return layer
    raise ValueError(f"model {model.name!r} has no convolutional feature map for Grad-CAM")


def _check_chain(model: keras.Model, chain: list) -> None:
    """Our architectures' outer graphs are chains (input -> ... -> backbone -> pool -> head); say so if not."""
    prev = model.layers[0]
    for layer in chain:
        node = layer._inbound_nodes[0]
        parents = {t._keras_history[0].name for t in node.input_tensors}
        if parents != {prev.name}:
            raise ValueError(f"Grad-CAM expects a chain of layers; {layer.name} reads {sorted(parents)}")
        prev = layer


class GradCAM:
    """Compiled Grad-CAM: one forward pass gives probabilities and the heatmap of the chosen class."""

    def __init__(self, model: keras.Model, layer: str | None = None):
        self.model = model
        target = model.get_layer(layer) if layer else find_target_layer(model)
        self.layer_name = target.name
        chain = [l for l in model.layers if not isinstance(l, keras.layers.InputLayer)]
        _check_chain(model, chain)
        idx = chain.index(target)
        self.body, self.head = chain[:idx + 1], chain[idx + 1:]
        self.backend = keras.backend.backend()
        self._fn = self._compile()

    def _head(self, f):
        for layer in self.head:
            f = layer(f, training=False)
        return f

    def features(self, x, training=False):
        for layer in self.body:
            x = layer(x, training=training)
        return x

    def _compile(self):
        if self.backend == "tensorflow":
            import tensorflow as tf

            @tf.function(reduce_retracing=True)
            def fn(x, cls):
                with tf.GradientTape() as tape:
                    f = self.features(x, training=False)
                    tape.watch(f)
                    probs = self._head(f)
                    pick = tf.where(cls < 0, tf.argmax(probs, axis=1, output_type=tf.int32), cls)
                    score = tf.reduce_sum(tf.gather(probs, pick, axis=1, batch_dims=1))
                return probs, f, tape.gradient(score, f)

            return fn
        if self.backend == "jax":
            import jax
            import jax.numpy as jnp

            def score(f, cls):
                probs = self._head(f)
                pick = jnp.where(cls < 0, jnp.argmax(probs, axis=1).astype(cls.dtype), cls)
                return jnp.sum(jnp.take_along_axis(probs, pick[:, None], axis=1)), probs

            grad = jax.grad(score, has_aux=True)

            @jax.jit
            def fn(x, cls):
                f = self.features(x, training=False)
                g, probs = grad(f, cls)
                return probs, f, g

            return fn
        if self.backend == "torch":
            import torch

            def fn(x, cls):
                f = self.features(x, training=False).detach().requires_grad_(True)
                probs = self._head(f)
                cls = torch.as_tensor(cls).long()
                pick = torch.where(cls < 0, probs.argmax(1), cls)
                probs.gather(1, pick[:, None]).sum().backward()
                return probs.detach(), f.detach(), f.grad

            return fn
        raise NotImplementedError(f"Grad-CAM has no implementation for the {self.backend} backend")

    def __call__(self, crops: np.ndarray, class_index: int | np.ndarray | None = BLAST,
                 size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Probabilities (N, 2) and heatmaps (N, H, W) in [0, 1] for raw crops (N, S, S, 3), uint8 range.

        By default every map shows the evidence for `all` (blast): the question a reviewer asks of any cell,
        and on hem cells the maps of the hem class mostly mark the empty space a larger blast would fill.
        `class_index=None` explains each cell's predicted class; `size` resizes maps (default: crop size).
        """
        x = np.asarray(crops)
        if x.ndim == 3:
            x = x[None]
        x = x.astype("uint8") if x.dtype != np.uint8 else x
        cls = np.broadcast_to(np.asarray(-1 if class_index is None else class_index), (len(x),))
        probs, f, g = self._fn(keras.ops.convert_to_tensor(x), keras.ops.convert_to_tensor(cls.astype("int32")))
        probs, f, g = (np.asarray(keras.ops.convert_to_numpy(v), dtype="float32") for v in (probs, f, g))
        weights = g.mean(axis=(1, 2), keepdims=True)
        cam = np.maximum((weights * f).sum(-1), 0.0)
        top = cam.reshape(len(cam), -1).max(1).reshape(-1, 1, 1)
        cam = np.where(top > 0, cam / np.maximum(top, 1e-12), 0.0)
        out_size = size or (x.shape[1], x.shape[2])
        return probs, np.stack([resize_map(c, out_size) for c in cam])


class EnsembleCAM:
    """Grad-CAM of an ensemble: the members' probabilities and (each normalised) heatmaps averaged, so the map
    shows the evidence the ensemble's averaged call rests on."""

    def __init__(self, models):
        self.cams = [GradCAM(m) for m in models]

    def __call__(self, crops: np.ndarray, class_index: int | np.ndarray | None = BLAST,
                 size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
        outs = [cam(crops, class_index, size) for cam in self.cams]
        return np.mean([o[0] for o in outs], axis=0), np.mean([o[1] for o in outs], axis=0)


def gradcam_for(models) -> "GradCAM | EnsembleCAM":
    """Grad-CAM of one model, or of an ensemble's members averaged."""
    models = list(models)
    return GradCAM(models[0]) if len(models) == 1 else EnsembleCAM(models)


def resize_map(cam: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    from PIL import Image

    img = Image.fromarray(cam.astype("float32"), mode="F").resize((size[1], size[0]), Image.Resampling.BILINEAR)
    return np.clip(np.asarray(img), 0.0, 1.0)


def _jet(v: np.ndarray) -> np.ndarray:
    """A jet-like colour map (blue -> cyan -> yellow -> red) without a plotting dependency."""
    r = np.clip(1.5 - np.abs(4 * v - 3), 0, 1)
    g = np.clip(1.5 - np.abs(4 * v - 2), 0, 1)
    b = np.clip(1.5 - np.abs(4 * v - 1), 0, 1)
    return np.stack([r, g, b], -1)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.45) -> np.ndarray:
    """Blend a heatmap onto an RGB uint8 image; the map is resized to the image if needed."""
    if heatmap.shape != image.shape[:2]:
        heatmap = resize_map(heatmap, image.shape[:2])
    colour = _jet(heatmap) * 255.0
    a = alpha * heatmap[..., None] ** 0.5  # cold regions stay mostly transparent
    return np.clip(image * (1 - a) + colour * a, 0, 255).astype(np.uint8)


def heat_in_mask(heatmap: np.ndarray, mask: np.ndarray) -> float:
    """Share of the heat mass inside a boolean mask (e.g. the cell's pixels)."""
    total = float(heatmap.sum())
    return float(heatmap[mask].sum() / total) if total > 0 else 0.0
