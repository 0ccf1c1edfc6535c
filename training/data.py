"""Batches for the trainer, sliced straight from the uint8 crop cache: no decoding in the training loop.

`BalancedBatches` draws a fresh class-balanced sample every epoch (the report's per-class target, augmented on
the fly by the model's augmentation layers); `CacheBatches` walks fixed rows in order (validation, test).
"""
from __future__ import annotations

import numpy as np
import keras

NUM_CLASSES = 2


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype="float32")[labels]


class BalancedBatches(keras.utils.PyDataset):
    """`per_class` cells of each class per epoch (with re-use of a class's cells when it has fewer), shuffled.

    The draw for epoch e depends only on (seed, e), so a resumed run sees the same data as an uninterrupted one.
    """

    def __init__(self, images: np.ndarray, rows_by_class: list[np.ndarray], per_class: int, batch_size: int,
                 seed: int = 0, first_epoch: int = 0, **kwargs):
        super().__init__(**kwargs)
        if any(len(r) == 0 for r in rows_by_class):
            raise ValueError("every class needs at least one training cell")
        self.images, self.rows_by_class = images, [np.asarray(r) for r in rows_by_class]
        self.per_class, self.batch_size, self.seed = int(per_class), int(batch_size), int(seed)
        self.steps = max(1, (self.per_class * len(rows_by_class)) // self.batch_size)
        self.epoch = first_epoch
        self._draw()

    def _draw(self) -> None:
        rng = np.random.default_rng([self.seed, self.epoch])
        rows, labels = [], []
        for c, pool in enumerate(self.rows_by_class):
            reps = -(-self.per_class // len(pool))
            rows.append(np.concatenate([rng.permutation(pool) for _ in range(reps)])[: self.per_class])
            labels.append(np.full(self.per_class, c))
        order = rng.permutation(self.per_class * len(self.rows_by_class))
        self.rows, self.labels = np.concatenate(rows)[order], np.concatenate(labels)[order]

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int):
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        rows, labels = self.rows[sl], self.labels[sl]
        order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads from the memory map
        return np.asarray(self.images[rows[order]]), one_hot(labels[order])

    def on_epoch_end(self) -> None:
        self.epoch += 1
        self._draw()


class CacheBatches(keras.utils.PyDataset):
    """Fixed rows in order, with labels (evaluation) or without (prediction)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None, batch_size: int, **kwargs):
        super().__init__(**kwargs)
        self.images, self.rows, self.labels, self.batch_size = images, np.asarray(rows), labels, int(batch_size)

    def __len__(self) -> int:
        return max(1, -(-len(self.rows) // self.batch_size))

    def __getitem__(self, i: int):
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        x = np.asarray(self.images[self.rows[sl]])
        if self.labels is None:
            return (x,)
        return x, one_hot(self.labels[sl])
