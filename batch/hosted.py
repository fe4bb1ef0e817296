"""A batch route's model inside a device's worker process (`--worker-process`).

Imported by the worker process only (runtime/worker_child.py); the service names
`HostedModel` by import path (batch/remote.py). The model is loaded here with the route's own
loader and stays in the worker process; jobs run on it here, on the worker's thread, with the
same job functions as in the service's own process. What a job is handed (the request's
params, an image, audio samples) and what it returns (images, text, speech) cross the pipe
pickled.

A job's refusal of its input (`ServiceError`: a prompt past the model's context, a bad mask)
comes back as a `Refusal`, so the service answers it with the same status and words.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from live.logs import LogFormat, log_like_the_service
from protocol.errors import ServiceError
from runtime import worker_child
from runtime.hosted_device import device_here
from runtime.model_cache import module_bytes
from runtime.runtime import RuntimeConfig
from runtime.worker_protocol import resolve

from .jobs import JobCancelled, StepGate

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Refusal:
    """A job's `ServiceError`, as data: exceptions with their own constructors do not always
    unpickle, and the service rebuilds this one (batch/remote.py)."""

    kind: str
    msg: str
    headers: dict[str, str]
    attributes: dict[str, Any]
    """What the subclass's constructor made besides `msg` and `headers` (InvalidFields'
    `errors`, Unavailable's `retry_after_s`)."""


@dataclass(frozen=True)
class Finished:
    """The last item of a streamed job: what the job returned."""

    value: Any


class ChildGate(StepGate):
    """The step gate of a job in a worker process: live calls waiting in this process run at
    each step, and a job whose caller went away (the service sent CANCEL) stops there."""

    def __init__(self) -> None:
        super().__init__(worker_child.yield_to_live)

    def step(self) -> None:
        super().step()
        if worker_child.cancelled():
            raise JobCancelled("the request was cancelled")


class HostedModel:
    """One batch model, loaded when made."""

    def __init__(
        self,
        loader: str,
        path: str,
        device: tuple[str, str, str],
        config: RuntimeConfig,
        log: tuple[int, LogFormat] | None = None,
    ) -> None:
        if log is not None:
            log_like_the_service(*log)
        self.device = device_here(*device, config)
        self.value: Any = resolve(loader)(Path(path), self.device.spec)

    def size_bytes(self) -> int:
        return module_bytes(self.value)

    def run(self, job: str, args: tuple[Any, ...]) -> Any:
        """`job(model, *args, gate)`, or its refusal."""
        try:
            return resolve(job)(self.value, *args, ChildGate())
        except ServiceError as exc:
            return _refusal(exc)

    def stream(self, job: str, args: tuple[Any, ...]) -> Iterator[Any]:
        """The items of the generator `job(model, *args, gate)`, then what it returned
        (`Finished`) or its refusal; the worker process sends each as it comes."""
        function: Callable[..., Generator[Any, None, Any]] = resolve(job)
        try:
            result = yield from function(self.value, *args, ChildGate())
        except ServiceError as exc:
            yield _refusal(exc)
        else:
            yield Finished(result)

    def close(self) -> None:
        """Give the model's memory back (it was evicted from the service's model cache)."""
        self.value = None
        gc.collect()
        if self.device.spec.device.startswith("cuda"):
            self.device.free_memory()  # the cache's own eviction does the same


def after_earlier_jobs() -> None:
    """Nothing: a batch call of it ends once the jobs sent before it have (batch/remote.py)."""


def _refusal(exc: ServiceError) -> Refusal:
    attributes = {k: v for k, v in vars(exc).items() if k not in ("msg", "headers")}
    return Refusal(type(exc).__name__, exc.msg, dict(exc.headers), attributes)
