"""Batch models and jobs in a device's worker process (`--worker-process`), seen from the
service.

The service's model cache keeps placement, budgets, waiting for a load and eviction as it does
for models in its own process; what it holds for a model in a worker process is a
`RemoteModel`, a reference to the `HostedModel` there (batch/hosted.py), with the size the
worker measured. A job is its route's own job function, named by import path, and its
arguments; it runs in the worker, yielding to live frames between its steps.

What the worker's supervision means for a request:
- the worker process was lost while the job was queued or running (a crash, a kill, another
  call's hang, a poisoned device): 503 with Retry-After; the fresh worker loads the model again
  for the next request (the restart forgets the old worker's models: `Device`);
- the worker failed for good: 503 without Retry-After, naming the failure;
- the job itself ran past `JOB_TIMEOUT_S`: 500, and the worker is replaced;
- the job refused its input (`ServiceError` in the worker): the same status and words as in
  the service's own process; out of memory: the route's 503.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import inspect
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from live.logs import handler_format
from protocol import errors
from protocol.errors import ServiceError, Unavailable
from runtime.runtime import Device
from runtime.worker_errors import (
    CallTimedOut,
    OperationFailed,
    WorkerError,
    WorkerLost,
    WorkerUnavailable,
)
from runtime.worker_process import ObjectRef, ProcessWorker

from .hosted import Finished, Refusal
from .jobs import JobCancelled, StepGate

T = TypeVar("T")

HOSTED = "batch.hosted:HostedModel"
AFTER_EARLIER_JOBS = "batch.hosted:after_earlier_jobs"
LOAD_TIMEOUT_S = 1800.0
"""A model load (weights from disk to the device) past this is hung: the worker is replaced."""
JOB_TIMEOUT_S = 900.0
"""A batch job past this, from when the worker started it, is hung: the worker is replaced."""
CALL_TIMEOUT_S = 60.0
LOOP_CHECK_S = 1.0
"""How often a load's thread checks that the event loop running the load still runs."""
OUT_OF_MEMORY = ("MemoryError", "OutOfMemoryError")


def import_path(function: Callable[..., Any]) -> str:
    """`module:qualname`, which the worker process imports a job function by."""
    return f"{function.__module__}:{function.__qualname__}"


class RemoteModel:
    """A batch model kept in a device's worker process (what the model cache holds)."""

    def __init__(
        self, ref: ObjectRef, worker: ProcessWorker, size: int, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.ref = ref
        self.worker = worker
        self.model_bytes = size
        """Read by the model cache (`module_bytes`) for its budget."""
        self._loop = loop

    @property
    def worker_generation(self) -> int:
        """The worker process it lives in: a restart forgets the models of older ones."""
        return self.ref.generation

    @property
    def stale(self) -> bool:
        """Its worker process was replaced (or is being): it is gone with it. From any
        thread."""
        return self.ref.generation != self.worker.generation

    def close(self) -> None:
        """Free it in the worker (evicted from the cache); from any thread."""
        with contextlib.suppress(RuntimeError):  # the loop is closed: so is the worker
            self._loop.call_soon_threadsafe(self._close)

    def _close(self) -> None:
        # On the loader lane, which runs loads one at a time in the order they came: the
        # load this eviction made room for starts after the weights are let go, even while a
        # job holds the main thread. Evicted, the model has no job left on it.
        try:
            future = self.worker.submit_batch(
                self.ref.method("close"), timeout_s=CALL_TIMEOUT_S, loader=True
            )
        except WorkerError:
            return  # the worker is gone, and the model with it
        future.add_done_callback(self._closed)

    def _closed(self, future: asyncio.Future[Any]) -> None:
        if not future.cancelled():
            future.exception()  # retrieved: a worker lost meanwhile took the model with it
        self.worker.release(self.ref)

    def __repr__(self) -> str:
        return f"RemoteModel({self.ref.target} in worker generation {self.ref.generation})"


def loader(
    device: Device, load: Callable[..., Any], path: Path, loop: asyncio.AbstractEventLoop
) -> Callable[[], RemoteModel]:
    """The model cache's `load` for a model in `device`'s worker process: blocking, for the
    cache's loader thread, while the event loop talks to the worker."""

    def load_there() -> RemoteModel:
        coroutine = _load(device, import_path(load), path)
        future = asyncio.run_coroutine_threadsafe(coroutine, loop)
        deadline = time.monotonic() + LOAD_TIMEOUT_S + 60
        while True:
            try:
                return future.result(LOOP_CHECK_S)
            except concurrent.futures.TimeoutError:
                # A loop that stopped without closing the runtime never finishes the load:
                # this thread (joined at the interpreter's exit) would wait for half an hour.
                if not loop.is_running() or time.monotonic() > deadline:
                    future.cancel()
                    if inspect.getcoroutinestate(coroutine) == inspect.CORO_CREATED:
                        coroutine.close()  # never started: nothing of it to undo
                    raise RuntimeError("the service stopped during the load") from None

    return load_there


async def _load(device: Device, load: str, path: Path) -> RemoteModel:
    try:
        worker = await device.process_worker()
        where = (device.label, device.name, device.setting)
        # On the worker's loader lane: live frames go on during the load.
        # The worker writes its lines (the load's, its libraries' warnings) as the service does.
        log = (logging.getLogger().getEffectiveLevel(), handler_format())
        ref = await worker.create(
            HOSTED,
            load,
            str(path),
            where,
            device.config,
            log,
            timeout_s=LOAD_TIMEOUT_S,
            loader=True,
        )
        try:
            size = await worker.call(
                ref.method("size_bytes"), timeout_s=CALL_TIMEOUT_S, loader=True
            )
        except BaseException:
            worker.release(ref)
            raise
    except OperationFailed as exc:
        raise _load_error(exc) from exc
    return RemoteModel(ref, worker, int(size), asyncio.get_running_loop())


async def run(
    model: RemoteModel,
    job: Callable[..., Any],
    args: tuple[Any, ...],
    gate: StepGate,
    on_item: Callable[[Any], None] | None = None,
) -> Any:
    """`job(model, *args, gate)` in the worker; with `on_item`, `job` is a generator whose
    items `on_item` hears as they come (on the event loop), and what it returns is the result.
    A `gate` cancelled here stops a streaming job at its next item; a job that does not stream
    stops at its next step when this coroutine is cancelled."""
    method = model.ref.method("run" if on_item is None else "stream")
    try:
        if on_item is None:
            result = await model.worker.call(
                method, import_path(job), args, live=False, timeout_s=JOB_TIMEOUT_S
            )
            return _unwrap(result)
        items = model.worker.stream(method, import_path(job), args, timeout_s=JOB_TIMEOUT_S)
        async with contextlib.aclosing(items):
            async for item in items:
                if isinstance(item, Finished):
                    return item.value
                on_item(_unwrap(item))
                if gate.cancelled.is_set():
                    raise JobCancelled("the request was cancelled")
        raise Unavailable("the job ended without a result")  # the worker stopped its stream
    except (asyncio.CancelledError, JobCancelled):
        # The worker stops the job at its next step; until then the job still uses the
        # model, whose lease is released when this coroutine ends: never evicted under it.
        await _after_earlier_jobs(model.worker)
        raise
    except OperationFailed as exc:
        raise _own_error(exc) from exc
    except CallTimedOut as exc:
        raise ServiceError(
            f"the job ran past {JOB_TIMEOUT_S:g} s and was stopped; the device's worker "
            "process was restarted"
        ) from exc
    except WorkerError as exc:
        raise unavailable(exc) from exc


async def _after_earlier_jobs(worker: ProcessWorker) -> None:
    """Return once the worker is out of the batch jobs sent to it before (one at a time, in
    order, on its main thread), or has gone with them."""
    with contextlib.suppress(WorkerError):
        await worker.call(AFTER_EARLIER_JOBS, live=False, timeout_s=CALL_TIMEOUT_S)


def unavailable(exc: WorkerError) -> Unavailable:
    """A worker that cannot run the job, as a 503 (with Retry-After when it comes back)."""
    reason = getattr(exc, "reason", None) or str(exc)
    if isinstance(exc, WorkerLost):
        return Unavailable(
            f"the device's worker process stopped while running this job ({reason}); it is "
            "restarting: retry",
            retry_after_s=exc.retry_after_s or 1.0,
        )
    if isinstance(exc, WorkerUnavailable) and exc.retry_after_s is None:
        return Unavailable(
            f"the device's worker process cannot run jobs: {reason}; see /health and the "
            "service's log, and restart the service"
        )
    return Unavailable(
        f"the device's worker process is not ready ({reason}); retry",
        retry_after_s=exc.retry_after_s or 1.0,
    )


def _unwrap(value: Any) -> Any:
    if isinstance(value, Refusal):
        raise refused(value)
    return value


def refused(refusal: Refusal) -> ServiceError:
    """The job's `ServiceError`, rebuilt in the service (its status, words and headers)."""
    kind = getattr(errors, refusal.kind, None)
    if not (isinstance(kind, type) and issubclass(kind, ServiceError)):
        kind = errors.InvalidRequest
    # Past the subclass's own constructor (Unavailable's takes retry_after_s, InvalidFields'
    # a list): what it made of them is in the headers and attributes carried over.
    error = kind.__new__(kind)
    ServiceError.__init__(error, refusal.msg, headers=dict(refusal.headers))
    vars(error).update(refusal.attributes)
    return error


class LoadFailed(Exception):
    """The route's loader raised in the worker: the model's failure, in its loader's words
    (not a `WorkerError`, which would tell the client the worker is to blame)."""


def _load_error(exc: OperationFailed) -> Exception:
    if exc.type_name in OUT_OF_MEMORY:
        return MemoryError(exc.message or exc.type_name)
    return LoadFailed(exc.message or exc.type_name)


def _own_error(exc: OperationFailed) -> Exception:
    """The job's or loader's own exception as the routes read it."""
    if exc.type_name in OUT_OF_MEMORY:
        return MemoryError(exc.message or exc.type_name)
    if exc.type_name == "JobCancelled":
        return JobCancelled(exc.message)
    return exc
