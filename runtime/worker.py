"""One inference worker per device: a single thread that owns the device's models.

Live frames and batch jobs both submit work here, so the policy between them lives in one place:
live work first, batch work in between. It is a `concurrent.futures.Executor`, so async code
uses it with `loop.run_in_executor(worker, fn, *args)` (live priority), or `submit_batch`.
Keeping it behind "submit, get a future" lets it move to a child process later.

A batch job is preempted at its own safe points: between denoising steps (diffusers' step
callback) or generated tokens it calls `yield_to_live()`, which runs every live item waiting
before the job goes on. A live frame therefore waits at most one step of a running batch job,
not the whole job.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Executor, Future
from typing import Any

logger = logging.getLogger(__name__)

LIVE = 0
BATCH = 10


class InferenceWorker(Executor):
    def __init__(self, name: str) -> None:
        self.name = name
        self._queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._closed = False
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._run, name=f"infer-{name}", daemon=True)
        self._thread.start()
        self.done_live = 0
        self.done_batch = 0
        self.safe_points = 0
        """Calls of `yield_to_live`: one per step of a batch job."""
        self.max_live_wait_steps = 0
        """The most batch steps a live item ever waited through: 1 when preemption works
        (it waits for the step under way), more when a batch job does not yield."""
        self.live_waits: deque[float] = deque(maxlen=1000)
        """Seconds each live item waited before it ran, newest last (the last 1000)."""

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(LIVE, fn, args, kwargs)

    def submit_batch(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Future[Any]:
        return self._submit(BATCH, fn, args, kwargs)

    def _submit(
        self, priority: int, fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Future[Any]:
        future: Future[Any] = Future()
        with self._lock:
            if self._closed:
                raise RuntimeError(f"inference worker {self.name} is shut down")
            item = (future, fn, args, kwargs, time.monotonic(), self.safe_points)
            self._queue.put((priority, next(self._order), item))
        return future

    def _run(self) -> None:
        while True:
            priority, _, item = self._queue.get()
            if item is None:
                return
            self._execute(priority, item)

    def _execute(self, priority: int, item: Any) -> None:
        future, fn, args, kwargs, submitted, safe_points = item
        if not future.set_running_or_notify_cancel():
            return
        if priority == LIVE:
            self.max_live_wait_steps = max(self.max_live_wait_steps, self.safe_points - safe_points)
            self.live_waits.append(time.monotonic() - submitted)
        try:
            result = fn(*args, **kwargs)
        except BaseException as exc:
            error: BaseException | None = exc
        else:
            error = None
        # Counted before the caller hears of it: a request answered is a job counted.
        if priority == LIVE:
            self.done_live += 1
        else:
            self.done_batch += 1
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def yield_to_live(self) -> int:
        """Run every live item waiting now, then return (how many ran). For batch jobs, at
        their safe points; on the worker's own thread only (elsewhere it does nothing)."""
        if threading.current_thread() is not self._thread:
            return 0
        self.safe_points += 1
        ran = 0
        while True:
            with self._queue.mutex:
                # The heap's first entry is the most urgent: take it only if it is live work.
                waiting = self._queue.queue
                if not waiting or waiting[0][0] != LIVE:
                    return ran
            priority, _, item = self._queue.get_nowait()
            self._execute(priority, item)
            ran += 1

    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            # Sorts after every queued item, so work already submitted still runs.
            self._queue.put((BATCH + 1, next(self._order), None))
        if wait:
            self._thread.join()
