"""The runtime: what live sessions and batch routes share on one machine.

One per application. It owns the model cache (weights loaded once, shared, evicted least
recently used within a memory budget) and one inference worker per device (live frames first,
batch jobs yielding between steps). Live and batch get it through the application's keys; they
never create workers or load weights of their own.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from .device import DeviceSpec, choose_device
from .model_cache import ModelCache, ModelKey
from .worker import InferenceWorker

logger = logging.getLogger(__name__)

# On CUDA without an explicit budget, models may take this share of the GPU's memory; the rest
# is for activations, the live sessions' per-stream state and the codecs.
DEFAULT_GPU_SHARE = 0.8


@dataclass(frozen=True)
class RuntimeConfig:
    models_dir: Path = Path("models")
    device: str = "auto"
    dtype: str = "auto"
    compile: bool = False
    memory_budget_bytes: int | None = None
    """Memory the cached models may take; None: 80 % of the GPU on CUDA, unbounded elsewhere."""


class Runtime:
    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.models = ModelCache(self.config.memory_budget_bytes, on_evict=self._free_memory)
        self._workers: dict[str, InferenceWorker] = {}
        self._lock = threading.Lock()
        self._closed = False

    @cached_property
    def spec(self) -> DeviceSpec:
        """The device and dtype models run on (imports torch: call it off the event loop)."""
        spec = choose_device(self.config.device, self.config.dtype)
        if self.models.budget_bytes is None and spec.device.startswith("cuda"):
            import torch

            total = torch.cuda.get_device_properties(torch.device(spec.device)).total_memory
            self.models.budget_bytes = int(total * DEFAULT_GPU_SHARE)
        logger.info("runtime device=%s model budget=%s", spec, _gib(self.models.budget_bytes))
        return spec

    def _free_memory(self) -> None:
        # An evicted model's tensors are garbage now; CUDA's caching allocator keeps their
        # memory until asked to give it back.
        if self.spec.device.startswith("cuda"):
            import gc

            import torch

            gc.collect()
            torch.cuda.empty_cache()

    def key(self, kind: str, model_id: str) -> ModelKey:
        spec = self.spec
        return ModelKey(kind, model_id, spec.device, spec.dtype_name)

    def worker(self, device: str | None = None) -> InferenceWorker:
        """The inference worker of `device` (default: the runtime's), started on first use."""
        name = device or self.config.device
        with self._lock:
            if self._closed:
                raise RuntimeError("the runtime is shut down")
            worker = self._workers.get(name)
            if worker is None:
                worker = self._workers[name] = InferenceWorker(name)
            return worker

    def workers(self) -> list[InferenceWorker]:
        with self._lock:
            return list(self._workers.values())

    def loading(self) -> bool:
        return self.models.loading()

    async def close(self) -> None:
        """Finish the work already submitted, stop the workers and forget the models."""
        with self._lock:
            self._closed = True
            workers, self._workers = list(self._workers.values()), {}
        loop = asyncio.get_running_loop()
        for worker in workers:
            await loop.run_in_executor(None, worker.shutdown)
        await loop.run_in_executor(None, self.models.close)


def _gib(value: int | None) -> str:
    return "unbounded" if value is None else f"{value / 2**30:.1f} GiB"
