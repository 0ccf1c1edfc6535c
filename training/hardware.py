"""Device discovery, mixed precision and multi-device strategy, for whichever Keras backend is active."""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import dataclass


@dataclass
class Accelerators:
    backend: str
    gpus: list[tuple[str, float]]  # (name, compute capability)

    def describe(self, policy: str) -> str:
        if not self.gpus:
            return f"CPU ({os.cpu_count()} cores), {self.backend}, {policy}"
        names = ", ".join(sorted({n for n, _ in self.gpus}))
        return f"{len(self.gpus)}x GPU ({names}, cc {self.gpus[0][1]:.1f}), {self.backend}, {policy}"


def detect() -> Accelerators:
    import keras

    backend = keras.backend.backend()
    gpus: list[tuple[str, float]] = []
    if backend == "tensorflow":
        import tensorflow as tf

        for d in tf.config.list_physical_devices("GPU"):
            details = tf.config.experimental.get_device_details(d)
            cc = details.get("compute_capability", (0, 0))
            gpus.append((details.get("device_name", d.name), cc[0] + cc[1] / 10))
    elif backend == "jax":
        import jax

        for d in jax.devices():
            if d.platform == "gpu":
                cc = getattr(d, "compute_capability", "0.0")
                gpus.append((d.device_kind, float(cc)))
    elif backend == "torch":
        import torch

        for i in range(torch.cuda.device_count()):
            major, minor = torch.cuda.get_device_capability(i)
            gpus.append((torch.cuda.get_device_name(i), major + minor / 10))
    return Accelerators(backend, gpus)


def precision_policy(setting: str, acc: Accelerators) -> str:
    """Keras dtype policy: bfloat16 mixed precision on Ampere and newer, float16 on Volta/Turing, else float32."""
    if setting == "off":
        return "float32"
    cc = min((c for _, c in acc.gpus), default=0.0)
    if setting == "on":
        return "mixed_float16" if 7.0 <= cc < 8.0 else "mixed_bfloat16"
    return "mixed_bfloat16" if cc >= 8.0 else "mixed_float16" if cc >= 7.0 else "float32"


def worker_role() -> tuple[int, int, bool]:
    """(this worker's index, number of workers, is it the chief) from TF_CONFIG: the chief is the task of
    type "chief", or worker 0 when the cluster names none."""
    try:
        conf = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON: {exc}") from None
    cluster, task = conf.get("cluster", {}), conf.get("task", {})
    n = len(cluster.get("chief", [])) + len(cluster.get("worker", []))
    if n == 0 or not task:
        raise ValueError('--devices multiworker needs TF_CONFIG on every worker, e.g. {"cluster": {"worker": '
                         '["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}')
    kind, index = task.get("type", "worker"), int(task.get("index", 0))
    chief = kind == "chief" or (kind == "worker" and index == 0 and not cluster.get("chief"))
    return index if kind == "worker" else 0, n, chief


_MULTIWORKER = None


def multiworker_strategy():
    """The process's one MultiWorkerMirroredStrategy. TensorFlow needs it made before any other TensorFlow op,
    so the trainer makes it first thing; it blocks until every worker of TF_CONFIG has started."""
    global _MULTIWORKER
    if _MULTIWORKER is None:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ValueError("multiworker training uses the TensorFlow backend (TF_CONFIG); with JAX use "
                             "jax.distributed and devices=local")
        import tensorflow as tf

        _MULTIWORKER = tf.distribute.MultiWorkerMirroredStrategy()
    return _MULTIWORKER


def fix_multiworker_build(model) -> None:
    """Work around Keras 3.15 under MultiWorkerMirroredStrategy with 2+ workers: before the first step, `fit`
    reduces a whole (x, y) batch tuple with `strategy.reduce("MEAN", ...)` only to learn its shapes, which the
    collective strategy rejects ("Attempt to convert a value (PerReplica ...)"). This model builds from this
    worker's first local replica of that batch instead: same shapes, no collective op."""
    import tensorflow as tf
    from keras import tree

    original = model._maybe_symbolic_build
    strategy = model.distribute_strategy

    def local_first(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    def build(iterator=None, data_batch=None):
        if iterator is not None:
            for _, _, it in iterator:
                data_batch = tree.map_structure(local_first, next(it))
                break
        return original(iterator=None, data_batch=data_batch)

    model._maybe_symbolic_build = build
    _fix_multiworker_logs()


def _fix_multiworker_logs() -> None:
    """Second Keras 3.15 multi-worker bug: each step's logs (scalar loss and metrics) are averaged over workers
    with `strategy.reduce("MEAN", v, axis=0)`, which fails on a 0-d tensor ("Invalid reduction dimension 0").
    Scalars are averaged over replicas (axis None) instead; batched outputs keep Keras' own reduction."""
    import keras.src.backend.tensorflow.trainer as ktrainer
    from keras import tree

    original = getattr(ktrainer.reduce_per_replica, "__wrapped__", ktrainer.reduce_per_replica)

    def reduce_per_replica(values, strategy, reduction):
        if reduction in ("auto", "mean") and ktrainer._collective_all_reduce_multi_worker(strategy):
            def mean(v):
                local = strategy.experimental_local_results(v)[0] if ktrainer._is_per_replica_instance(v) else v
                return strategy.reduce("MEAN", v, axis=0 if local.shape.rank else None)

            return tree.map_structure(mean, values)
        return original(values, strategy, reduction)

    reduce_per_replica.__wrapped__ = original
    ktrainer.reduce_per_replica = reduce_per_replica


def strategy_scope(devices: str, acc: Accelerators):
    """Context in which to build and compile the model for `devices` (one, local, multiworker)."""
    if devices == "one":
        return contextlib.nullcontext()
    if acc.backend == "tensorflow":
        import tensorflow as tf

        strategy = tf.distribute.MirroredStrategy() if devices == "local" else multiworker_strategy()
        return strategy.scope()
    if acc.backend == "jax":
        if devices == "multiworker":
            raise ValueError("multiworker training uses the TensorFlow backend (TF_CONFIG); with JAX use "
                             "jax.distributed and devices=local")
        import keras

        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return contextlib.nullcontext()
    raise ValueError(f"devices={devices!r} is not supported on the {acc.backend} backend")
