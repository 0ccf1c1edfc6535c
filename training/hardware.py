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


def _tf_config() -> tuple[list[str], list[str], str, int]:
    """(chief addresses, worker addresses, this task's type, its index) from TF_CONFIG, or a plain error."""
    try:
        conf = json.loads(os.environ.get("TF_CONFIG") or "{}")
    except ValueError as exc:
        raise ValueError(f"TF_CONFIG is not valid JSON: {exc}") from None
    cluster, task = conf.get("cluster", {}), conf.get("task", {})
    chiefs, workers = list(cluster.get("chief", [])), list(cluster.get("worker", []))
    if not chiefs + workers or not task:
        raise ValueError('--devices multiworker needs TF_CONFIG on every worker, e.g. {"cluster": {"worker": '
                         '["host1:12345", "host2:12345"]}, "task": {"type": "worker", "index": 0}}')
    return chiefs, workers, task.get("type", "worker"), int(task.get("index", 0))


def worker_role() -> tuple[int, int, bool]:
    """(this worker's index, number of workers, is it the chief) from TF_CONFIG: the chief is the task of
    type "chief", or worker 0 when the cluster names none."""
    chiefs, workers, kind, index = _tf_config()
    chief = kind == "chief" or (kind == "worker" and index == 0 and not chiefs)
    return index if kind == "worker" else 0, len(chiefs) + len(workers), chief


_MULTIWORKER = None


def start_multiworker():
    """Join the cluster TF_CONFIG describes, first thing in the process, on whichever backend is active:
    TensorFlow's MultiWorkerMirroredStrategy, or on JAX `jax.distributed` (process ids in TF_CONFIG's order, the
    chief's or first worker's address as coordinator). Blocks until every worker has started."""
    import keras

    if keras.backend.backend() == "jax":
        return jax_multiworker()
    return multiworker_strategy()


def jax_processes() -> tuple[str, int, int]:
    """(coordinator address, number of processes, this process's id) from TF_CONFIG: the chief (or worker 0
    when there is none) is process 0 and coordinates; workers follow in their TF_CONFIG order."""
    chiefs, workers, kind, index = _tf_config()
    addresses = chiefs + workers
    pid = 0 if kind == "chief" else len(chiefs) + index
    if not 0 <= pid < len(addresses):
        raise ValueError(f"TF_CONFIG task {kind} {index} is not in its cluster ({len(addresses)} tasks)")
    return addresses[0], len(addresses), pid


def jax_multiworker() -> tuple[int, int]:
    """Start `jax.distributed` once (CPU collectives through gloo; GPUs use NCCL) and return (process id,
    processes). Must come before any JAX computation or device query in the process."""
    global _MULTIWORKER
    if _MULTIWORKER is None:
        import jax

        coordinator, n, pid = jax_processes()
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=n, process_id=pid)
        _MULTIWORKER = (pid, n)
    return _MULTIWORKER


def multiworker_strategy():
    """The process's one MultiWorkerMirroredStrategy. TensorFlow needs it made before any other TensorFlow op,
    so the trainer makes it first thing; it blocks until every worker of TF_CONFIG has started."""
    global _MULTIWORKER
    if _MULTIWORKER is None:
        import keras

        if keras.backend.backend() != "tensorflow":
            raise ValueError("MultiWorkerMirroredStrategy is TensorFlow's; on JAX use jax_multiworker()")
        import tensorflow as tf

        _MULTIWORKER = tf.distribute.MultiWorkerMirroredStrategy()
    return _MULTIWORKER


def data_shard(devices: str) -> tuple[int, int]:
    """(this process's share, shares) of every batch: under JAX multi-process data parallelism each process
    feeds its slice of the global batch (Keras assembles the global array); everywhere else one share."""
    import keras

    if devices == "multiworker" and keras.backend.backend() == "jax":
        return jax_multiworker()
    return 0, 1


def describe_workers(devices: str) -> str:
    import keras

    if devices != "multiworker":
        return ""
    if keras.backend.backend() == "jax":
        return f", {jax_multiworker()[1]} processes (jax.distributed, keras.distribution.DataParallel)"
    return f", {worker_role()[1]} workers (MultiWorkerMirroredStrategy)"


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
        import jax
        import keras

        if devices == "multiworker":
            jax_multiworker()
            # every process's devices; each process feeds its own slice of a batch (data_shard), not a shard
            # that Keras would cut from a tf.data pipeline
            dist = keras.distribution.DataParallel(devices=jax.devices())
            dist.auto_shard_dataset = False
        else:
            dist = keras.distribution.DataParallel()
        keras.distribution.set_distribution(dist)
        return contextlib.nullcontext()
    raise ValueError(f"devices={devices!r} is not supported on the {acc.backend} backend")
