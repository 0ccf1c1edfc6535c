"""Batches for the trainer, sliced straight from the uint8 crop cache: no decoding in the training loop.

`BalancedBatches` draws a fresh class-balanced sample every epoch (the report's per-class target, augmented on
the fly by the model's augmentation layers); `CacheBatches` walks fixed rows in order (validation, test).
"""
from __future__ import annotations

import threading

import numpy as np
import keras

NUM_CLASSES = 2


def one_hot(labels: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype="float32")[labels]


class BalancedBatches(keras.utils.PyDataset):
    """`per_class` cells of each class per epoch (with re-use of a class's cells when it has fewer), shuffled,
    for `epochs` epochs from `first_epoch`, as one sequence of `steps * epochs - skip` batches (fit it with
    `steps_per_epoch=steps`).

    Batch g is step g % steps of epoch first_epoch + g // steps (after `skip`, the batches an interrupted epoch
    already trained), and an epoch's draw depends only on (seed, epoch): a resumed run sees exactly the data an
    uninterrupted one would, whatever order Keras' loader threads and epoch callbacks run in.
    """

    def __init__(self, images: np.ndarray, rows_by_class: list[np.ndarray], per_class: int, batch_size: int,
                 seed: int = 0, first_epoch: int = 0, epochs: int = 1, skip: int = 0, **kwargs):
        super().__init__(**kwargs)
        if any(len(r) == 0 for r in rows_by_class):
            raise ValueError("every class needs at least one training cell")
        self.images, self.rows_by_class = images, [np.asarray(r) for r in rows_by_class]
        self.per_class, self.batch_size, self.seed = int(per_class), int(batch_size), int(seed)
        self.steps = max(1, (self.per_class * len(rows_by_class)) // self.batch_size)
        if not 0 <= skip < self.steps:
            raise ValueError(f"skip must be in [0, {self.steps}), got {skip}")
        self.first_epoch, self.epochs, self.skip = int(first_epoch), max(1, int(epochs)), int(skip)
        self._draws: dict[int, tuple[np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def draw(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(rows, labels) of one epoch, in training order."""
        with self._lock:
            if epoch not in self._draws:
                rng = np.random.default_rng([self.seed, epoch])
                rows, labels = [], []
                for c, pool in enumerate(self.rows_by_class):
                    reps = -(-self.per_class // len(pool))
                    rows.append(np.concatenate([rng.permutation(pool) for _ in range(reps)])[: self.per_class])
                    labels.append(np.full(self.per_class, c))
                order = rng.permutation(self.per_class * len(self.rows_by_class))
                for old in [e for e in self._draws if e < epoch - 1]:
                    del self._draws[old]
                self._draws[epoch] = np.concatenate(rows)[order], np.concatenate(labels)[order]
            return self._draws[epoch]

    def position(self, i: int) -> tuple[int, int]:
        """(epoch, step within it) of batch i."""
        g = i + self.skip
        return self.first_epoch + g // self.steps, g % self.steps

    def __len__(self) -> int:
        return self.steps * self.epochs - self.skip

    def __getitem__(self, i: int):
        epoch, step = self.position(i)
        all_rows, all_labels = self.draw(epoch)
        sl = slice(step * self.batch_size, (step + 1) * self.batch_size)
        rows, labels = all_rows[sl], all_labels[sl]
        order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads from the memory map
        return np.asarray(self.images[rows[order]]), one_hot(labels[order])


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
