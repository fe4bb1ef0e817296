"""`ProcessCalls`: a session's pipeline in its device's worker process (`--worker-process`).

The pipeline is built, loaded, fed and unloaded in the child (pipeline_child.py), held there
by a reference; frames cross in shared memory (RGB in, RGB out; a pass-through pipeline's
output is its input, so nothing comes back), params and everything else over the pipe. The load
runs on the child's loader lane, one load at a time beside the frames of the device's other
sessions (pipeline_child.py says what of it runs where). The
service's process imports only the pipeline's module, for its class and params; a pipeline
module imports its libraries (torch, diffusers) inside its methods, so they load in the child.

What the worker's supervision means for the session (see `PipelineHost`):
- a frame past the frame timeout, counted from when the child started it: this session's
  pipeline hung (TimeoutError, the session ends, as in process); the worker was replaced, so
  the device serves the other sessions again;
- the worker lost for another reason (crash, abort, kill, a poisoned device, another session's
  hang): `PipelineLost`, loading frames, and a reload in the fresh child once the device says
  it is there (`watch`);
- the worker failed for good: `PipelineLost(final=True)`, the session ends with the reason;
- the pipeline's own exception: `OperationFailed` (its type and message), counted by the host
  as any failure; an out-of-memory error comes back as MemoryError, so it restarts at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections.abc import Callable

import numpy as np

from runtime.runtime import Device
from runtime.worker_errors import (
    CallTimedOut,
    OperationFailed,
    StaleObject,
    WorkerError,
    WorkerLost,
    WorkerUnavailable,
)
from runtime.worker_process import ObjectRef, ProcessWorker

from .logs import PIPELINE, SESSION_ID, LogSetup, handler_format
from .pipeline_host import Log, PipelineCalls, PipelineLost
from .pipelines.base import LivePipeline, PipelineParams

HOSTED = "live.pipeline_child:HostedPipeline"
LOAD_TIMEOUT_S = 1800.0
"""A load (weights from disk, a compile) past this is hung: the worker is replaced."""
CALL_TIMEOUT_S = 60.0
"""Params, unload and other small calls: far more than they take."""
CLOSE_TIMEOUT_S = 5.0
OUT_OF_MEMORY = ("MemoryError", "OutOfMemoryError")
_WORDS = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def class_path(cls: type) -> str:
    """`module:QualName`, which the worker process imports the class by. ValueError for a
    class made inside a function: no import reaches it."""
    if "<locals>" in cls.__qualname__:
        raise ValueError(
            f"{cls.__module__}.{cls.__qualname__} is defined inside a function, and a worker "
            "process imports a pipeline by its module and name: define it at a module's top "
            "level, or run the pipelines in the service's process (--no-worker-process)"
        )
    return f"{cls.__module__}:{cls.__qualname__}"


class ProcessCalls(PipelineCalls[ObjectRef]):
    def __init__(self, pipeline_cls: type[LivePipeline], device: Device, log: Log) -> None:
        self.pipeline_cls = pipeline_cls
        self.device = device
        self.log = log
        self._worker: ProcessWorker | None = None
        self._restarted: Callable[[str], None] | None = None
        self._loads: set[asyncio.Task[ObjectRef]] = set()

    def watch(self, restarted: Callable[[str], None]) -> None:
        self._restarted = restarted
        self.device.restart_listeners.add(self._on_restart)

    def _on_restart(self, reason: str) -> None:
        if self._restarted is not None:
            self._restarted(reason)

    def _lost(self, exc: WorkerError) -> PipelineLost:
        reason = getattr(exc, "reason", None) or str(exc)
        final = isinstance(exc, WorkerUnavailable) and exc.retry_after_s is None
        if final and self._worker is not None and self._worker.status().state == "closed":
            # The service is shutting down and its sessions with it: no failure to report.
            final = False
        return PipelineLost(reason, final=final)

    async def load(self, params: PipelineParams) -> ObjectRef:
        path = class_path(self.pipeline_cls)
        try:
            worker = self._worker = await self.device.process_worker()
        except WorkerUnavailable as exc:
            raise self._lost(exc) from exc
        device = self.device
        task = asyncio.ensure_future(
            worker.create(
                HOSTED,
                path,
                params,
                (device.label, device.name, device.setting),
                device.config,
                self._log_setup(),
                timeout_s=LOAD_TIMEOUT_S,
                loader=True,
            )
        )
        self._loads.add(task)
        task.add_done_callback(self._loads.discard)
        try:
            # Shielded: a load cancelled here goes on in the child, and what it made is
            # released when it is done (`_release_late`).
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            task.add_done_callback(self._release_late)
            raise
        except OperationFailed as exc:
            raise _own_error(exc) from exc
        except (WorkerLost, WorkerUnavailable, StaleObject) as exc:
            lost = self._lost(exc)
            if not lost.final:
                # No frame reaches a worker while the pipeline loads: whether the worker comes
                # back (its restart then asks for this load again) or fails for good (the
                # session ends) is learnt here.
                try:
                    await worker.wait_ready()
                except WorkerUnavailable as final:
                    raise self._lost(final) from exc
            raise lost from exc

    def _log_setup(self) -> LogSetup:
        """The service's level and format, and this session (the loader task's context)."""
        return LogSetup(
            level=logging.getLogger().getEffectiveLevel(),
            format=handler_format(),
            session=SESSION_ID.get(),
            pipeline=PIPELINE.get() or self.pipeline_cls.name,
        )

    def _release_late(self, task: asyncio.Task[ObjectRef]) -> None:
        if self._worker is not None and not task.cancelled() and task.exception() is None:
            self._worker.release(task.result())

    async def process(self, pipeline: ObjectRef, image: np.ndarray, timeout_s: float) -> np.ndarray:
        worker = self._worker
        assert worker is not None
        try:
            out = await worker.submit(
                pipeline.method("process"),
                frame=image,
                timeout_s=math.inf if math.isinf(timeout_s) else timeout_s,
            )
        except CallTimedOut as exc:
            # This session's frame hung: its session ends; the others reload in the new child.
            self.device.restart_listeners.discard(self._on_restart)
            raise TimeoutError(str(exc)) from exc
        except OperationFailed as exc:
            raise _own_error(exc) from exc
        except WorkerError as exc:
            raise self._lost(exc) from exc
        return image if out is None else out

    async def apply(self, pipeline: ObjectRef, params: PipelineParams) -> None:
        try:
            await self._call(pipeline, "apply", params)
        except OperationFailed as exc:
            raise ValueError(exc.message or exc.type_name) from exc
        except WorkerError:
            pass  # the pipeline went with its process: the reload takes the newest params

    async def unload(self, pipeline: ObjectRef) -> None:
        with contextlib.suppress(WorkerError):
            await self._call(pipeline, "unload")
        if self._worker is not None:
            self._worker.release(pipeline)

    async def keeps_serving(self, pipeline: ObjectRef, new: PipelineParams) -> bool:
        try:
            return bool(await self._call(pipeline, "keeps_serving", new))
        except WorkerError:
            return False

    async def close(self, pipeline: ObjectRef | None) -> None:
        self.device.restart_listeners.discard(self._on_restart)
        if self._loads:
            # A load still running in the child: what it makes is released when it is done
            # (`_release_late`); past the bound it is given up on, left for the child's end.
            loads = list(self._loads)
            _, pending = await asyncio.wait(loads, timeout=CLOSE_TIMEOUT_S)
            for task in pending:
                task.cancel()
            await asyncio.gather(*loads, return_exceptions=True)
        if pipeline is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.unload(pipeline)

    async def _call(self, pipeline: ObjectRef, method: str, *args: object) -> object:
        worker = self._worker
        if worker is None:
            raise WorkerUnavailable("the pipeline was never loaded")
        return await worker.call(pipeline.method(method), *args, timeout_s=CALL_TIMEOUT_S)


class PipelineFailed(Exception):
    """The pipeline's own exception, raised in the worker process: its message alone, so that
    the session words it as it words one raised in the service's process ("boom", not
    "RuntimeError: boom"); its kind in words when it has no message."""


def _own_error(exc: OperationFailed) -> Exception:
    """The pipeline's own exception as the host reads it: out of memory stays one."""
    if exc.type_name in OUT_OF_MEMORY:
        return MemoryError(exc.message or exc.type_name)
    return PipelineFailed(exc.message or _WORDS.sub(" ", exc.type_name).lower())
