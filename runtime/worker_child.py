"""The worker process's side: runs the operations the service asks for, live calls first.

The main thread reads the requests that have arrived into a priority queue between calls and
runs them one at a time, so every model call of the device happens on one thread. A batch
operation lets waiting live calls in at its safe points with `yield_to_live()` (a stream does
so between its items by itself). When the service's end of the pipe closes without a STOP, the
service is gone: a watch thread ends the process at once, whatever it was running.
"""

from __future__ import annotations

import heapq
import inspect
import itertools
import os
import select
import signal
import sys
import threading
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import numpy as np

from . import worker_protocol as wp
from .frame_ring import FrameRing
from .worker_errors import poisons_device

LIVE, BATCH, LAST = 0, 10, 20

_current: _Child | None = None
"""The running worker of this process (one per worker process; None elsewhere)."""


def yield_to_live() -> int:
    """Run the live calls waiting now, then return how many ran. For batch operations, between
    their steps; it does nothing outside a worker process's main thread."""
    child = _current
    if child is None or threading.current_thread() is not threading.main_thread():
        return 0
    return child.yield_to_live()


def serve(
    requests: Connection,
    replies: Connection,
    ring_in: tuple[str, int, int],
    ring_out: tuple[str, int, int],
    env: dict[str, str],
) -> None:
    """The worker process's entry point (multiprocessing's target)."""
    global _current
    # Ctrl-C reaches the whole process group; the service decides when its workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    os.environ.update(env)  # e.g. CUDA_VISIBLE_DEVICES, before anything initialises CUDA
    # The pipes are used raw (worker_protocol's framing); the Connections only carried them here.
    rings = (FrameRing.attach(*ring_in), FrameRing.attach(*ring_out))
    child = _Child(requests.fileno(), replies.fileno(), *rings)
    _current = child
    try:
        child.run()
    finally:
        _current = None
        child.close()


def _exit_when_closed(requests_fd: int) -> None:
    """End the process when the service's end of the requests pipe closes without a STOP (the
    service died), even while an operation holds the main thread."""
    hangup = select.poll()
    hangup.register(requests_fd, 0)  # no events asked for: only a hangup wakes it
    while True:
        for _, event in hangup.poll():
            if event & (select.POLLHUP | select.POLLERR | select.POLLNVAL):
                os._exit(0)


class _Child:
    def __init__(self, requests_fd: int, replies_fd: int, ring_in: FrameRing, ring_out: FrameRing):
        self._requests_fd = requests_fd
        self._replies_fd = replies_fd
        self._ring_in = ring_in
        self._ring_out = ring_out
        # Requests are read on the main thread, between calls: a handoff from a reader thread
        # would cost each call two thread switches.
        self._waiting: list[tuple[int, int, tuple[Any, ...]]] = []
        self._order = itertools.count()
        self._decoder = wp.Decoder()
        self._readable = select.poll()
        self._readable.register(requests_fd, select.POLLIN)
        self._cancelled: set[int] = set()
        self._functions: dict[str, Callable[..., Any]] = {}
        self._objects: dict[int, Any] = {}

    def run(self) -> None:
        watch = threading.Thread(
            target=_exit_when_closed, args=(self._requests_fd,), name="worker-watch", daemon=True
        )
        watch.start()
        self._send((wp.READY, os.getpid()))
        while True:
            self._take_requests(wait=True)
            _, _, message = heapq.heappop(self._waiting)
            if message[0] == wp.STOP:
                return
            self._execute(message)

    def _take_requests(self, wait: bool) -> None:
        """Queue every request that has arrived; with `wait`, block until there is one."""
        while self._readable.poll(-1 if wait and not self._waiting else 0):
            data = os.read(self._requests_fd, 1 << 16)
            if not data:
                os._exit(0)  # the service is gone: nobody is left to answer
            for message in self._decoder.feed(data):
                kind = message[0]
                if kind == wp.CANCEL:
                    self._cancelled.add(message[1])
                    continue
                if kind == wp.CALL:
                    priority = LIVE if message[2] else BATCH
                else:
                    priority = LIVE if kind == wp.RELEASE else LAST
                heapq.heappush(self._waiting, (priority, next(self._order), message))

    def yield_to_live(self) -> int:
        self._take_requests(wait=False)
        ran = 0
        while self._waiting and self._waiting[0][0] == LIVE:
            self._execute(heapq.heappop(self._waiting)[2])
            ran += 1
        return ran

    def _is_cancelled(self, call_id: int) -> bool:
        if call_id in self._cancelled:
            self._cancelled.discard(call_id)
            return True
        return False

    def _execute(self, message: tuple[Any, ...]) -> None:
        if message[0] == wp.RELEASE:
            self._objects.pop(message[1], None)
            return
        _, call_id, _, target, arguments, frame_in, out_slot, keep, stream = message
        if self._is_cancelled(call_id):
            self._send((wp.SKIPPED, call_id))
            return
        self._send((wp.STARTED, call_id))
        try:
            function = self._function(target)
            args, kwargs = wp.loads(arguments)
            if frame_in is not None:
                args = (self._ring_in.view(frame_in), *args)
            result = function(*args, **kwargs)
            if stream:
                self._stream(call_id, result)
                return
            if isinstance(result, types.GeneratorType):
                result = list(result)
            if keep:
                self._objects[call_id] = result
                self._send((wp.RESULT, call_id, wp.dumps(call_id), None))
            else:
                self._reply(call_id, result, out_slot)
        except (SystemExit, KeyboardInterrupt):
            raise
        except BaseException as exc:
            self._send_error(call_id, exc)

    def _function(self, target: wp.Target) -> Callable[..., Any]:
        if isinstance(target, tuple):
            obj_id, method = target
            if obj_id not in self._objects:
                raise LookupError("the object was released")
            return getattr(self._objects[obj_id], method)  # type: ignore[no-any-return]
        function = self._functions.get(target)
        if function is None:
            function = self._functions[target] = wp.resolve(target)
        return function

    def _reply(self, call_id: int, result: Any, out_slot: int | None) -> None:
        if out_slot is not None and isinstance(result, np.ndarray) and self._ring_out.fits(result):
            spec = self._ring_out.write(out_slot, result)
            self._send((wp.RESULT, call_id, None, spec))
        else:
            self._send((wp.RESULT, call_id, self._dumps(result), None))

    def _stream(self, call_id: int, items: Any) -> None:
        if not hasattr(items, "__next__") and not inspect.isgenerator(items):
            items = iter(items)
        try:
            for item in items:
                self._send((wp.ITEM, call_id, self._dumps(item)))
                self._take_requests(wait=False)
                if self._is_cancelled(call_id):
                    break
                self.yield_to_live()
        finally:
            close = getattr(items, "close", None)
            if close is not None:
                close()
        self._send((wp.DONE, call_id))

    def _send_error(self, call_id: int, exc: BaseException) -> None:
        self._send((wp.ERROR, call_id, type(exc).__name__, str(exc), poisons_device(exc)))

    @staticmethod
    def _dumps(value: Any) -> bytes:
        try:
            return wp.dumps(value)
        except Exception as exc:  # a result that does not pickle
            raise ValueError(f"the result cannot be sent back: {exc}") from exc

    def _send(self, message: tuple[Any, ...]) -> None:
        data = wp.encode(message)
        try:
            wp.write_all(self._replies_fd, data)
        except BrokenPipeError:
            os._exit(0)  # the service is gone

    def close(self) -> None:
        self._objects.clear()
        self._ring_in.close()
        self._ring_out.close()
        sys.stdout.flush()
