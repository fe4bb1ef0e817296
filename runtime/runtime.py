"""The runtime: what live sessions and batch routes share on one machine.

One per application. It owns one `Device` per entry of `--devices`: each with its own
inference worker (live frames first, batch jobs yielding between steps) and its own model cache
(weights loaded once per device, shared, evicted least recently used within that device's
memory budget). Live and batch get it through the application's keys; they never create
workers or load weights of their own.

It is also the one source of truth for device and dtype: a device's `spec`, from
`choose_device`, is what its pipelines and batch models run on. Placement (which device a
session or a batch job goes to) reads the devices' state here; admission (live/admission.py)
places live sessions, `batch.models` batch jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from protocol.errors import Unavailable

from .device import (
    DeviceSpec,
    check_devices_present,
    choose_device,
    device_labels,
    device_list,
    visible_devices,
)
from .model_cache import ModelCache, ModelKey
from .worker import InferenceWorker
from .worker_process import ProcessWorker, ProcessWorkerConfig, RestartInfo

logger = logging.getLogger(__name__)

# On CUDA without an explicit budget, models may take this share of the GPU's memory; the rest
# is for activations, the live sessions' per-stream state and the codecs.
DEFAULT_GPU_SHARE = 0.8


@dataclass(frozen=True)
class RuntimeConfig:
    models_dir: Path = Path("models")
    device: str = "auto"
    """The one-device form of `devices` (`--device`): used when `devices` is empty."""
    dtype: str = "auto"
    compile: bool = False
    memory_budget_bytes: int | None = None
    """Memory the cached models may take on each device; None: 80 % of the GPU on CUDA,
    unbounded elsewhere."""
    devices: str = ""
    """`--devices`: comma-separated torch devices, one worker each (`cpu` may repeat); empty or
    auto: every visible CUDA GPU, else the CPU (or MPS)."""
    worker_process: bool = False
    """`--worker-process`: live sessions' pipelines run in each device's supervised worker
    process (runtime/worker_process.py) instead of this process's threads."""
    worker_frame_bytes: int = 1920 * 1080 * 3
    """The largest frame that crosses to a worker process through shared memory (RGB)."""

    def device_names(self) -> list[str] | None:
        """The explicit devices, or None when they are chosen automatically."""
        if self.devices.strip():
            return device_list(self.devices)
        return None if self.device == "auto" else device_list(self.device)


class Device:
    """One device of the runtime: its worker, its model cache, what runs on it."""

    def __init__(self, label: str, name: str, setting: str, config: RuntimeConfig) -> None:
        self.label = label
        """Unique among the runtime's devices: `cuda:1`, `cpu`, or `cpu:0`, `cpu:1`."""
        self.name = name
        """The torch device: `cuda:1`, `cpu`, `mps`."""
        self.setting = setting
        """The device pipelines are told (`PipelineContext.device`): `name`, or `auto` when
        the runtime chose the CPU (or MPS) itself, so that a GPU pipeline still tells the
        operator it needs `--device cpu` to run there."""
        self.config = config
        self.models = ModelCache(
            config.memory_budget_bytes, on_evict=self.free_memory, on_drop=_drop_remote
        )
        self.sessions: set[str] = set()
        """Live sessions placed here (by admission), until they end."""
        self.jobs = 0
        """Batch jobs running or waiting on this device's worker."""
        self._worker: InferenceWorker | None = None
        self._process: ProcessWorker | None = None
        self._process_start: asyncio.Task[None] | None = None
        self._process_closed = False
        self.restart_listeners: set[Callable[[str], None]] = set()
        """Told (with the reason) when this device's worker process was restarted: live
        sessions whose pipelines lived there load them again."""
        self._lock = threading.Lock()
        self._closed = False

    @cached_property
    def spec(self) -> DeviceSpec:
        """The device and dtype models run on here (imports torch: call it off the event loop)."""
        spec = choose_device(self.setting, self.config.dtype)
        if self.models.budget_bytes is None and spec.device.startswith("cuda"):
            import torch

            total = torch.cuda.get_device_properties(torch.device(spec.device)).total_memory
            self.models.budget_bytes = int(total * DEFAULT_GPU_SHARE)
        logger.info(
            "device %s runs %s, model budget=%s", self.label, spec, _gib(self.models.budget_bytes)
        )
        return spec

    def free_memory(self) -> None:
        """Give freed GPU memory back: an evicted model's tensors are garbage now, and CUDA's
        caching allocator keeps their memory until asked to give it back."""
        if self.spec.device.startswith("cuda"):
            import gc

            import torch

            gc.collect()
            with torch.cuda.device(torch.device(self.spec.device)):
                torch.cuda.empty_cache()

    def key(self, kind: str, model_id: str) -> ModelKey:
        """The cache key of a model on this device (the label keeps two CPU workers apart)."""
        return ModelKey(kind, model_id, self.label, self.spec.dtype_name)

    def holds(self, kind: str, model_id: str) -> bool:
        """Whether this device has the model loaded or loading."""
        return any(m.key.kind == kind and m.key.model_id == model_id for m in self.models.models())

    def room(self) -> int | None:
        """Bytes of the model budget no model takes yet; None: unbounded."""
        budget = self.models.budget_bytes
        if budget is None:
            return None
        return budget - sum(m.size_bytes for m in self.models.models())

    def busy(self) -> int:
        """What placement weighs: live sessions and batch jobs on this device."""
        return len(self.sessions) + self.jobs

    def worker(self, label: str | None = None) -> InferenceWorker:
        """This device's inference worker, started on first use (`label` is ignored: the
        signature of `Runtime.worker`, so that a device stands in for the runtime)."""
        with self._lock:
            if self._closed:
                raise RuntimeError("the runtime is shut down")
            if self._worker is None:
                # One thread per device today; a `ProcessWorker` per device would go here.
                self._worker = InferenceWorker(self.label)
            return self._worker

    def started_worker(self) -> InferenceWorker | None:
        return self._worker

    async def process_worker(self) -> ProcessWorker:
        """This device's worker process (`--worker-process`), started on first use; on the
        event loop. Raises `WorkerUnavailable` when it cannot start."""
        if self._closed or self._process_closed:
            raise RuntimeError("the runtime is shut down")
        if self._process is None:
            # Short stop waits: at shutdown a hung child holds the service up at most
            # stop_grace_s + 2 * kill_wait_s, within the 10 s a SIGTERM is given.
            config = ProcessWorkerConfig(
                name=self.label,
                slot_bytes=self.config.worker_frame_bytes,
                call_timeout_s=60.0,
                stop_grace_s=2.0,
                kill_wait_s=1.0,
            )
            self._process = ProcessWorker(config, on_restart=self._worker_restarted)
            self._process_start = asyncio.get_running_loop().create_task(
                self._process.start(), name=f"worker-{self.label}-start"
            )
        assert self._process_start is not None
        # Shielded: a caller that gives up does not stop the start others wait for.
        await asyncio.shield(self._process_start)
        return self._process

    def started_process_worker(self) -> ProcessWorker | None:
        return self._process

    def failure(self) -> str | None:
        """Why this device takes no more work: its worker process failed for good
        (`--worker-process`). None otherwise, a restarting worker included (work waits for
        it). Safe from any thread."""
        process = self._process
        reason = None if process is None else process.failure
        return None if reason is None else f"the worker process of {self.label} {reason}"

    def _worker_restarted(self, info: RestartInfo) -> None:
        # Batch models that lived in the old worker process are gone with it: the next
        # request loads its model in the fresh one.
        self.models.forget(lambda value: _remote_generation(value) not in (None, info.generation))
        for listener in list(self.restart_listeners):
            listener(info.reason)

    async def close_process_worker(self) -> None:
        """End the worker process (bounded, even when it hangs); on the event loop."""
        process, start = self._process, self._process_start
        self._process_closed = True
        if process is None:
            return
        await process.close()
        if start is not None:
            with contextlib.suppress(Exception, asyncio.CancelledError):
                await start

    def loading(self) -> bool:
        return self.models.loading()

    def close(self) -> None:
        """Finish the work already submitted, stop the worker and forget the models."""
        with self._lock:
            self._closed = True
            worker, self._worker = self._worker, None
        if worker is not None:
            worker.shutdown()
        self.models.close()

    def __repr__(self) -> str:
        return f"Device({self.label})"


class Runtime:
    def __init__(self, config: RuntimeConfig | None = None) -> None:
        self.config = config or RuntimeConfig()
        self.config.device_names()  # a bad --devices fails here, at start, without torch
        self._devices: list[Device] | None = None
        self._lock = threading.Lock()
        self._closed = False

    @property
    def devices(self) -> list[Device]:
        """Every device, in `--devices` order (resolving `auto` imports torch: call it off the
        event loop the first time). Raises ValueError for a device this machine lacks."""
        with self._lock:
            if self._devices is None:
                names = self.config.device_names()
                automatic = names is None
                if names is None:
                    names = visible_devices()
                else:
                    check_devices_present(names)
                self._devices = [
                    Device(
                        label,
                        name,
                        "auto" if automatic and not name.startswith("cuda") else name,
                        self.config,
                    )
                    for label, name in zip(device_labels(names), names, strict=True)
                ]
                logger.info("devices: %s", ", ".join(d.label for d in self._devices))
            return list(self._devices)

    def known_devices(self) -> list[Device]:
        """The devices if they were resolved already, else none (never imports torch: for
        the routes that report them on the event loop)."""
        with self._lock:
            return list(self._devices or ())

    def device(self, label: str | None = None) -> Device:
        """The device named `label` (default: the first)."""
        devices = self.devices
        if label is None:
            return devices[0]
        for device in devices:
            if device.label == label:
                return device
        raise ValueError(f"no device {label} here; devices: {', '.join(d.label for d in devices)}")

    # The one-device view, for code that does not place (benches, tests, `--warm`): the first.

    @property
    def models(self) -> ModelCache:
        return self.device().models

    @property
    def spec(self) -> DeviceSpec:
        return self.device().spec

    def key(self, kind: str, model_id: str) -> ModelKey:
        return self.device().key(kind, model_id)

    def worker(self, label: str | None = None) -> InferenceWorker:
        """The inference worker of the device named `label` (default: the first), started on
        first use."""
        if self._closed:
            raise RuntimeError("the runtime is shut down")
        return self.device(label).worker()

    def workers(self) -> list[InferenceWorker]:
        return [w for d in self.known_devices() if (w := d.started_worker()) is not None]

    def yield_to_live(self) -> int:
        """A batch job's safe point, whichever device's worker runs it (see
        `InferenceWorker.yield_to_live`): the live items waiting on that worker run now."""
        return sum(worker.yield_to_live() for worker in self.workers())

    # -- placement ------------------------------------------------------------------------------

    def usable_devices(self) -> list[Device]:
        """The devices that can take work, in `--devices` order: all but those whose worker
        process failed for good. Raises Unavailable (503 without Retry-After: it does not pass
        by itself) naming each device's failure when none can."""
        devices = self.devices
        failures = [(device, device.failure()) for device in devices]
        usable = [device for device, failure in failures if failure is None]
        if usable:
            return usable
        reasons = "; ".join(failure for _, failure in failures if failure is not None)
        raise Unavailable(
            f"no device of this service can run models: {reasons}. This does not pass by "
            "itself: the operator should look at /health and the service's logs for the "
            "cause, then restart the service"
        )

    def where_loaded(self, kind: str, model_id: str) -> Device | None:
        """The least busy usable device that has the model loaded or loading, or None.
        Raises Unavailable when no device is usable (`usable_devices`)."""
        return _least_busy(d for d in self.usable_devices() if d.holds(kind, model_id))

    def with_room(self, size: int) -> Device:
        """The least busy usable device whose model budget has `size` bytes free (or is
        unbounded); when none has, the one with the most room (its cache then evicts or
        refuses). Raises Unavailable when no device is usable (`usable_devices`)."""
        devices = self.usable_devices()
        fitting = _least_busy(d for d in devices if (room := d.room()) is None or room >= size)
        if fitting is not None:
            return fitting
        return max(devices, key=lambda d: d.room() or 0)

    def loading(self) -> bool:
        return any(d.loading() for d in self.known_devices())

    async def close_process_workers(self) -> None:
        """End every worker process, together (each bounded, even when hung). Idempotent."""
        await asyncio.gather(*(d.close_process_worker() for d in self.known_devices()))

    def process_workers(self) -> list[ProcessWorker]:
        """The worker processes started so far (`--worker-process`)."""
        return [w for d in self.known_devices() if (w := d.started_process_worker()) is not None]

    async def close(self) -> None:
        """Finish the work already submitted, stop the workers and forget the models."""
        with self._lock:
            self._closed = True
            devices = list(self._devices or ())
        await self.close_process_workers()
        loop = asyncio.get_running_loop()
        for device in devices:
            await loop.run_in_executor(None, device.close)


def _remote_generation(value: object) -> int | None:
    """The worker process a cached model lives in (batch/remote.py's `RemoteModel`), or None
    for a model in this process."""
    generation = getattr(value, "worker_generation", None)
    return generation if isinstance(generation, int) else None


def _drop_remote(value: object) -> None:
    """An evicted model that lives in a worker process is freed there."""
    if _remote_generation(value) is not None:
        value.close()  # type: ignore[attr-defined]


def _least_busy(devices: Iterable[Device]) -> Device | None:
    # min keeps the first of equals: `--devices` order breaks ties.
    return min(devices, key=lambda d: d.busy(), default=None)


def _gib(value: int | None) -> str:
    return "unbounded" if value is None else f"{value / 2**30:.1f} GiB"
