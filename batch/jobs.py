"""Batch jobs in front of the device's inference worker: a bounded number at once, each run
as a batch item of the worker, yielding to live frames between its steps.

The bound is what keeps a burst of requests from queueing minutes of work behind the live
streams: beyond it a request is answered 503 with Retry-After at once, and the client backs off.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Generator
from typing import Any, TypeVar

from protocol.errors import Unavailable
from runtime.runtime import Device, Runtime

T = TypeVar("T")


class JobCancelled(Exception):
    """The job's caller went away; the job stopped at its next step."""


class StepGate:
    """Handed to a job and called between its denoising steps (or tokens): the job's safe
    point to let live frames through and to stop when nobody waits for it any more."""

    def __init__(self, yield_to_live: Callable[[], int]) -> None:
        self._yield = yield_to_live
        self.cancelled = threading.Event()
        self.steps = 0
        self.live_items_let_through = 0

    def step(self) -> None:
        if self.cancelled.is_set():
            raise JobCancelled("the request was cancelled")
        self.live_items_let_through += self._yield()
        self.steps += 1

    def on_step_end(self, pipe: Any, step: int, timestep: Any, tensors: dict[str, Any]) -> Any:
        """diffusers' `callback_on_step_end`."""
        self.step()
        return tensors

    def on_step(self, step: int, timestep: Any, latents: Any) -> None:
        """diffusers' older `callback` (with `callback_steps=1`)."""
        self.step()


def drive(items: Generator[Any, None, T], on_item: Callable[[Any], None]) -> T:
    """Run a streaming job (a generator) in this process: each item to `on_item` as it
    comes, and what the generator returns back."""
    while True:
        try:
            item = next(items)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]
        on_item(item)


class BatchJobs:
    def __init__(self, runtime: Runtime, max_jobs: int) -> None:
        self.runtime = runtime
        self.max_jobs = max_jobs
        self.active = 0
        self.done = 0
        self.failed = 0
        self._durations: list[float] = []
        self._remote: set[asyncio.Future[Any]] = set()
        """Jobs in worker processes (`run_remote`), until the worker is out of them."""

    def gate(self) -> StepGate:
        """A gate for a job that is about to run: pass it to `run` to keep a handle on the
        job (a streaming handler cancels it when its client goes away)."""
        # Whichever device the job lands on: the gate yields on the worker that runs it.
        return StepGate(self.runtime.yield_to_live)

    async def run(
        self,
        job: Callable[[StepGate], T],
        *,
        gate: StepGate | None = None,
        finished: Callable[[], None] | None = None,
        device: str | None = None,
    ) -> T:
        """Run `job(gate)` on the device's worker thread as batch work. Raises Unavailable
        (503, Retry-After) when `max_jobs` are already running or waiting; JobCancelled when
        `gate` was cancelled. `finished` is called once the job can no longer run: at once
        when it ended or never started, but for a job cancelled while it runs, only when its
        thread is out of it (on that thread): what the job uses (its model's lease) is
        released then, never under it. `device`: the label of the device whose worker runs
        it, where its model is (default: the first device)."""
        self._admit(finished)
        try:
            place = self.runtime.device(device)
            gate = gate or StepGate(self.runtime.yield_to_live)
            future = place.worker().submit_batch(job, gate)
        except BaseException:
            self._refused(finished)
            raise
        if finished is not None:
            # On the worker's thread when the job ends there; at once if it is already over.
            future.add_done_callback(lambda _: finished())

        def cancel() -> None:
            # Stops a running job at its next step, and a waiting one before it starts.
            gate.cancelled.set()
            future.cancel()

        return await self._count(place, asyncio.wrap_future(future), cancel)

    async def run_remote(
        self,
        job: Callable[[], Awaitable[T]],
        *,
        finished: Callable[[], None] | None = None,
        device: str | None = None,
    ) -> T:
        """Run `job()`, which runs the job in the device's worker process (batch/remote.py),
        counted and bounded as `run` is. `finished` is called when `job()` is over, which for
        a job whose caller left is once the worker is out of it (`remote.run`)."""
        self._admit(finished)
        try:
            place = self.runtime.device(device)
        except BaseException:
            self._refused(finished)
            raise
        task = asyncio.ensure_future(job())
        self._remote.add(task)
        task.add_done_callback(self._remote.discard)
        if finished is not None:
            task.add_done_callback(lambda _: finished())
        # Shielded: a caller that leaves stops waiting at once, as with `run`, while the task
        # goes on until the worker is out of the job, and only then is `finished` called.
        return await self._count(place, asyncio.shield(task), task.cancel)

    def _admit(self, finished: Callable[[], None] | None) -> None:
        if self.active >= self.max_jobs:
            if finished is not None:
                finished()
            raise Unavailable(
                f"the batch queue is full ({self.max_jobs} jobs running or waiting); retry later",
                retry_after_s=max(1.0, self.typical_duration()),
            )
        self.active += 1

    def _refused(self, finished: Callable[[], None] | None) -> None:
        self.active -= 1
        if finished is not None:
            finished()

    async def _count(self, place: Device, result: Awaitable[T], cancel: Callable[[], None]) -> T:
        # Counted as `active` is, on the event loop: until its caller stops waiting for it.
        place.jobs += 1
        started = time.monotonic()
        try:
            value = await result
        except asyncio.CancelledError:
            cancel()
            raise
        except BaseException:
            self.failed += 1
            raise
        finally:
            self.active -= 1
            place.jobs -= 1
        self.done += 1
        self._durations = [*self._durations[-19:], time.monotonic() - started]
        return value

    def typical_duration(self) -> float:
        if not self._durations:
            return 5.0
        return sorted(self._durations)[len(self._durations) // 2]
