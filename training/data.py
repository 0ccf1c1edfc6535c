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

    `shard=(i, n)`: this process's slice i of n of every (global) batch, for multi-process data parallelism in
    which each process feeds its part of the global batch (JAX); the n slices together are the batch one
    process would train on, so the schedule is a single machine's.
    """

    def __init__(self, images: np.ndarray, rows_by_class: list[np.ndarray], per_class: int, batch_size: int,
                 seed: int = 0, first_epoch: int = 0, epochs: int = 1, skip: int = 0,
                 shard: tuple[int, int] = (0, 1), **kwargs):
        super().__init__(**kwargs)
        self.shard = _check_shard(shard, batch_size)
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
        rows, labels = _slice(all_rows[sl], self.shard), _slice(all_labels[sl], self.shard)
        order = np.argsort(rows, kind="stable")  # ascending rows: sequential reads from the memory map
        return np.asarray(self.images[rows[order]]), one_hot(labels[order])


class CacheBatches(keras.utils.PyDataset):
    """Fixed rows in order, with labels (evaluation) or without (prediction).

    `shard=(i, n)`: slice i of n of every batch (see BalancedBatches); the slices must be equal, so the last
    n - 1 rows at most are left out when the rows do not split evenly (a warning says how many)."""

    def __init__(self, images: np.ndarray, rows: np.ndarray, labels: np.ndarray | None, batch_size: int,
                 shard: tuple[int, int] = (0, 1), **kwargs):
        super().__init__(**kwargs)
        self.shard = _check_shard(shard, batch_size)
        rows, labels = np.asarray(rows), None if labels is None else np.asarray(labels)
        n = self.shard[1]
        if len(rows) % n:
            import logging

            logging.getLogger(__name__).warning("%d of %d rows left out so that %d processes get equal slices",
                                                len(rows) % n, len(rows), n)
            keep = len(rows) - len(rows) % n
            rows, labels = rows[:keep], None if labels is None else labels[:keep]
        self.images, self.rows, self.labels, self.batch_size = images, rows, labels, int(batch_size)

    def __len__(self) -> int:
        return max(1, -(-len(self.rows) // self.batch_size))

    def __getitem__(self, i: int):
        sl = slice(i * self.batch_size, (i + 1) * self.batch_size)
        x = np.asarray(self.images[_slice(self.rows[sl], self.shard)])
        if self.labels is None:
            return (x,)
        return x, one_hot(_slice(self.labels[sl], self.shard))


def _check_shard(shard: tuple[int, int], batch_size: int) -> tuple[int, int]:
    i, n = map(int, shard)
    if not 0 <= i < n:
        raise ValueError(f"shard index must be in [0, {n}), got {i}")
    if batch_size % n:
        raise ValueError(f"batch size {batch_size} does not split evenly between {n} processes")
    return i, n


def _slice(batch: np.ndarray, shard: tuple[int, int]) -> np.ndarray:
    """Part i of n equal consecutive parts of a batch (a last, short batch is split evenly too)."""
    i, n = shard
    if n == 1:
        return batch
    k = len(batch) // n
    return batch[i * k:(i + 1) * k]
