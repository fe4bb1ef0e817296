"""The worker process's side: runs the operations the service asks for, live calls first.

The main thread reads the requests that have arrived into a priority queue between calls and
runs them one at a time, so every model call on shared modules happens on one thread. A batch
operation lets waiting live calls in at its safe points with `yield_to_live()` (a stream does
so between its items by itself). When the service's end of the pipe closes without a STOP, the
service is gone: a watch thread ends the process at once, whatever it was running.

Loads (a call sent with `loader`) run on the loader lane instead: one thread, one call at a
time (diffusers' `from_pretrained` on two threads at once fails with "meta tensor" errors), in
the order they came, so reading weights for tens of seconds does not hold up other sessions'
frames. Only work on modules nobody else uses yet belongs there; a load hands the part that
runs shared modules (a warm-up) to the main thread with `on_main()`, where it waits its turn
like a live call. Both lanes write replies to one pipe, a whole message at a time.
"""

from __future__ import annotations

import contextlib
import heapq
import inspect
import itertools
import os
import queue
import select
import signal
import sys
import threading
import traceback
import types
from collections.abc import Callable
from concurrent.futures import Future
from multiprocessing.connection import Connection
from typing import Any, TypeVar

import numpy as np

from . import worker_protocol as wp
from .frame_ring import FrameRing
from .worker_errors import poisons_device

T = TypeVar("T")

LIVE, BATCH, LAST = 0, 10, 20
_ON_MAIN = "on-main"
"""The kind of a queue entry the loader lane hands to the main thread (never on the pipe)."""

_current: _Child | None = None
"""The running worker of this process (one per worker process; None elsewhere)."""


def yield_to_live() -> int:
    """Run the live calls waiting now, then return how many ran. For batch operations, between
    their steps; it does nothing outside a worker process's main thread."""
    child = _current
    if child is None or threading.current_thread() is not threading.main_thread():
        return 0
    return child.yield_to_live()


def on_main(function: Callable[[], T]) -> T:
    """`function()` run on the worker process's main thread, between its calls, as a live call
    would; its result or exception comes back here. For a load on the loader lane: what it
    does with modules other sessions run at the same time (a warm-up pass through shared
    weights, a compile) belongs on the one thread that runs them. On the main thread, or
    outside a worker process (a load on the service's own loader thread), it just calls it."""
    child = _current
    if child is None or threading.current_thread() is threading.main_thread():
        return function()
    return child.on_main(function)


def cancelled() -> bool:
    """Whether the service cancelled the call running now (its caller went away): for batch
    operations, at their safe points, after `yield_to_live()` has read what arrived."""
    child = _current
    if child is None or threading.current_thread() is not threading.main_thread():
        return False
    return child.running_cancelled()


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
    # The service's environment as it is now, with e.g. CUDA_VISIBLE_DEVICES, before anything
    # initialises CUDA.
    os.environ.clear()
    os.environ.update(env)
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
        self._running: list[int] = []
        """The calls under way on the main thread, innermost last (a batch call runs live
        calls inside it)."""
        self._functions: dict[str, Callable[..., Any]] = {}
        self._objects: dict[int, Any] = {}
        self._writing = threading.Lock()
        # The loader lane: its calls in order, None to end it. What it hands to the main
        # thread (`on_main`) and its end are told through `_handed` and a byte on `_wake`,
        # which the main thread polls beside the requests.
        self._loads: queue.SimpleQueue[tuple[Any, ...] | None] = queue.SimpleQueue()
        self._handed: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._readable.register(self._wake_r, select.POLLIN)
        self._loader_done = threading.Event()
        self._loader = threading.Thread(target=self._load_lane, name="worker-loader", daemon=True)

    def run(self) -> None:
        watch = threading.Thread(
            target=_exit_when_closed, args=(self._requests_fd,), name="worker-watch", daemon=True
        )
        watch.start()
        self._loader.start()
        self._send((wp.READY, os.getpid()))
        stopping = False
        # After STOP (queued last: every main-lane call before it has run), the loader lane
        # finishes its queue; the main thread serves what it hands over meanwhile.
        while not (stopping and self._loader_done.is_set()):
            self._take_requests(wait=True)
            if not self._waiting:
                continue  # woken by the loader lane's end
            _, _, message = heapq.heappop(self._waiting)
            if message[0] == wp.STOP:
                stopping = True
                self._loads.put(None)
                continue
            self._execute(message)
        self._loader.join()

    def _take_requests(self, wait: bool) -> None:
        """Queue every request that has arrived, and what the loader lane handed over; with
        `wait`, block until there is one (or the loader lane ends)."""
        while events := self._readable.poll(-1 if wait and not self._waiting else 0):
            for fd, _ in events:
                if fd == self._wake_r:
                    self._take_handed()
                else:
                    self._read_requests()
            if wait and not self._waiting and self._loader_done.is_set():
                return

    def _read_requests(self) -> None:
        data = os.read(self._requests_fd, 1 << 16)
        if not data:
            os._exit(0)  # the service is gone: nobody is left to answer
        for message in self._decoder.feed(data):
            kind = message[0]
            if kind == wp.CANCEL:
                self._cancelled.add(message[1])
                continue
            if kind == wp.CALL and message[9]:
                self._loads.put(message)
                continue
            if kind == wp.CALL:
                priority = LIVE if message[2] else BATCH
            else:
                priority = LIVE if kind == wp.RELEASE else LAST
            heapq.heappush(self._waiting, (priority, next(self._order), message))

    def _take_handed(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 4096):
                pass
        while True:
            try:
                handed = self._handed.get_nowait()
            except queue.Empty:
                return
            heapq.heappush(self._waiting, (LIVE, next(self._order), handed))

    def _wake(self) -> None:
        # A full pipe already holds a wake-up the main thread has yet to read.
        with contextlib.suppress(BlockingIOError):
            os.write(self._wake_w, b"!")

    def on_main(self, function: Callable[[], T]) -> T:
        done: Future[T] = Future()
        self._handed.put((_ON_MAIN, function, done))
        self._wake()
        return done.result()

    def _load_lane(self) -> None:
        try:
            while (message := self._loads.get()) is not None:
                self._execute(message)
        except SystemExit as exc:
            # As sys.exit in a call on the main thread: the process ends with its status.
            sys.stdout.flush()
            os._exit(exc.code if isinstance(exc.code, int) else int(exc.code is not None))
        except BaseException:
            # As on the main thread, where it would end `run`: the process ends, supervised.
            traceback.print_exc()
            sys.stderr.flush()
            os._exit(1)
        finally:
            self._loader_done.set()
            self._wake()

    def yield_to_live(self) -> int:
        self._take_requests(wait=False)
        ran = 0
        while self._waiting and self._waiting[0][0] == LIVE:
            self._execute(heapq.heappop(self._waiting)[2])
            ran += 1
        return ran

    def running_cancelled(self) -> bool:
        return bool(self._running) and self._running[-1] in self._cancelled

    def _is_cancelled(self, call_id: int) -> bool:
        if call_id in self._cancelled:
            self._cancelled.discard(call_id)
            return True
        return False

    def _execute(self, message: tuple[Any, ...]) -> None:
        if message[0] == wp.RELEASE:
            self._objects.pop(message[1], None)
            return
        if message[0] == _ON_MAIN:
            _, function, done = message
            try:
                done.set_result(function())
            except BaseException as exc:  # the loader lane's to handle, whatever it is
                done.set_exception(exc)
            return
        _, call_id, _, target, arguments, frame_in, out_slot, keep, stream, _ = message
        if self._is_cancelled(call_id):
            self._send((wp.SKIPPED, call_id))
            return
        self._send((wp.STARTED, call_id))
        main_thread = threading.current_thread() is threading.main_thread()
        if main_thread:
            self._running.append(call_id)
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
        finally:
            if main_thread:
                self._running.pop()
            self._cancelled.discard(call_id)

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
            # Whole messages: a large reply is several writes, and the other lane's must not
            # land between them.
            with self._writing:
                wp.write_all(self._replies_fd, data)
        except BrokenPipeError:
            os._exit(0)  # the service is gone

    def close(self) -> None:
        # The wake pipe stays open until the process ends: after a main-thread exception the
        # loader lane may still be running, and would write into a closed (or reused) fd.
        self._objects.clear()
        self._ring_in.close()
        self._ring_out.close()
        sys.stdout.flush()
