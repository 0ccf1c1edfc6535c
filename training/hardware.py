"""Device discovery, mixed precision and multi-device strategy, for whichever Keras backend is active."""
from __future__ import annotations

import contextlib
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


def strategy_scope(devices: str, acc: Accelerators):
    """Context in which to build and compile the model for `devices` (one, local, multiworker)."""
    if devices == "one":
        return contextlib.nullcontext()
    if acc.backend == "tensorflow":
        import tensorflow as tf

        strategy = (tf.distribute.MirroredStrategy() if devices == "local"
                    else tf.distribute.MultiWorkerMirroredStrategy())
        return strategy.scope()
    if acc.backend == "jax":
        if devices == "multiworker":
            raise ValueError("multiworker training uses the TensorFlow backend (TF_CONFIG); with JAX use "
                             "jax.distributed and devices=local")
        import keras

        keras.distribution.set_distribution(keras.distribution.DataParallel())
        return contextlib.nullcontext()
    raise ValueError(f"devices={devices!r} is not supported on the {acc.backend} backend")
