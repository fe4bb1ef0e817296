"""The worker process's side: runs the operations the service asks for, live calls first.

A reader thread takes requests off the pipe into a priority queue; the main thread runs them
one at a time, so every model call of the device happens on one thread. A batch operation lets
waiting live calls in at its safe points with `yield_to_live()` (a stream does so between its
items by itself). When the service's end of the pipe closes without a STOP, the service is
gone: the process exits at once, whatever it was running.
"""

from __future__ import annotations

import inspect
import itertools
import os
import queue
import signal
import sys
import threading
import types
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

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


class _Child:
    def __init__(self, requests_fd: int, replies_fd: int, ring_in: FrameRing, ring_out: FrameRing):
        self._requests_fd = requests_fd
        self._replies_fd = replies_fd
        self._ring_in = ring_in
        self._ring_out = ring_out
        self._queue: queue.PriorityQueue[tuple[int, int, tuple[Any, ...]]] = queue.PriorityQueue()
        self._order = itertools.count()
        self._cancelled: set[int] = set()
        self._lock = threading.Lock()
        self._send_lock = threading.Lock()
        self._functions: dict[str, Callable[..., Any]] = {}
        self._objects: dict[int, Any] = {}

    def run(self) -> None:
        reader = threading.Thread(target=self._read, name="worker-requests", daemon=True)
        reader.start()
        self._send((wp.READY, os.getpid()))
        while True:
            _, _, message = self._queue.get()
            if message[0] == wp.STOP:
                return
            self._execute(message)

    def _read(self) -> None:
        while True:
            try:
                message = wp.read_message(self._requests_fd)
            except (OSError, ValueError, EOFError):
                message = None
            if message is None:
                # The service is gone: nobody is left to answer.
                os._exit(0)
            kind = message[0]
            if kind == wp.CALL:
                self._queue.put((LIVE if message[2] else BATCH, next(self._order), message))
            elif kind == wp.CANCEL:
                with self._lock:
                    self._cancelled.add(message[1])
            elif kind == wp.RELEASE:
                self._queue.put((LIVE, next(self._order), message))
            elif kind == wp.STOP:
                self._queue.put((LAST, next(self._order), message))

    def yield_to_live(self) -> int:
        ran = 0
        while True:
            with self._queue.mutex:
                waiting = self._queue.queue
                if not waiting or waiting[0][0] != LIVE:
                    return ran
            self._execute(self._queue.get_nowait()[2])
            ran += 1

    def _is_cancelled(self, call_id: int) -> bool:
        with self._lock:
            if call_id in self._cancelled:
                self._cancelled.discard(call_id)
                return True
            return False

    def _execute(self, message: tuple[Any, ...]) -> None:
        if message[0] == wp.RELEASE:
            self._objects.pop(message[1], None)
            return
        _, call_id, _, target, args, kwargs, frame_in, out_slot, keep, stream = message
        if self._is_cancelled(call_id):
            self._send((wp.SKIPPED, call_id))
            return
        self._send((wp.STARTED, call_id))
        try:
            function = self._function(target)
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
                self._send((wp.RESULT, call_id, call_id, None))
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
        import numpy as np

        if out_slot is not None and isinstance(result, np.ndarray) and self._ring_out.fits(result):
            spec = self._ring_out.write(out_slot, result)
            self._send((wp.RESULT, call_id, None, spec))
        else:
            self._send((wp.RESULT, call_id, result, None))

    def _stream(self, call_id: int, items: Any) -> None:
        if not hasattr(items, "__next__") and not inspect.isgenerator(items):
            items = iter(items)
        try:
            for item in items:
                self._send((wp.ITEM, call_id, item))
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

    def _send(self, message: tuple[Any, ...]) -> None:
        try:
            data = wp.encode(message)
        except Exception as exc:  # a result that does not pickle, or is over the size limit
            if message[0] not in (wp.RESULT, wp.ITEM):
                raise
            raise ValueError(f"the result cannot be sent back: {exc}") from exc
        with self._send_lock:
            try:
                wp.write_all(self._replies_fd, data)
            except BrokenPipeError:
                os._exit(0)  # the service is gone

    def close(self) -> None:
        self._objects.clear()
        self._ring_in.close()
        self._ring_out.close()
        sys.stdout.flush()
