"""One supervised worker process per device: model calls outside the service's process.

Why processes. A model call that hangs holds its thread for good, and some GPU faults (an
illegal memory access, a device-side assert) leave the CUDA context unusable for the rest of
the process. With the calls in a child process, the service ends the child and starts a fresh
one; every session, peer and channel of the service stays up. The child is forked by
multiprocessing's fork server, itself a clean interpreter that has imported torch once
(`PRELOAD`), never by the service's process: that has threads, an event loop and perhaps CUDA,
none of which survive a `fork`. A fresh worker is ready in a fraction of a second.

Protocol (worker_protocol.py). Two pipes: requests one way, replies the other, each message a
pickled tuple behind a length. A call names an operation by import path
("package.module:function", imported in the child), or a method of an object the child keeps
(`create`); its arguments are small picklable values. The child answers STARTED when it begins
a call (the call's timeout counts from there, not from the queue), then RESULT, ERROR (a type
name and a message: never a pickled exception, which may not unpickle here) or, for a stream,
ITEM after ITEM and DONE. Live calls run before queued batch calls (worker_child.py), as on the
in-process worker (worker.py). A call sent with `loader` (a pipeline's load) runs on the child's
loader lane instead, one at a time beside the main thread, so a load taking tens of seconds
does not hold up other sessions' frames; its timeout and supervision are a main-thread call's.

Shared-memory ring (frame_ring.py). Frames do not go through pickle: each worker has two
segments of fixed slots, service-to-child and child-to-service, sized for the largest frame
(512x512x3 bytes unless configured). The service owns both, hands out the slots and unlinks
the segments when the child is replaced and on close; a new child gets new segments, so a
child being killed can never write into a slot that a later call uses.

Supervision. A call past its timeout, a child that exits, aborts or is killed, or an operation
raising a device-poisoning error: the child is killed, the calls it held fail with `WorkerLost`
(`CallTimedOut` for the hung one), a fresh child starts after a backoff that doubles with each
failure in the window, and `on_restart` is called once it is ready (where sessions reload).
After `max_failures` in `failure_window_s` the worker stays `failed` (see `status()`). `close()`
lets the child finish what is queued for `stop_grace_s`, then terminates and kills it.

Everything here runs on the event loop's thread; nothing blocks it but a process start, which
runs on a thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import math
import multiprocessing
import os
import signal
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel

from . import worker_child
from . import worker_protocol as wp
from .frame_ring import FrameRing
from .worker_errors import (
    CallTimedOut,
    OperationFailed,
    StaleObject,
    WorkerBusy,
    WorkerLost,
    WorkerUnavailable,
)

logger = logging.getLogger(__name__)

State = Literal["new", "starting", "ready", "restarting", "failed", "closed"]


@dataclass(frozen=True)
class ProcessWorkerConfig:
    name: str = "cpu"
    slots: int = 8
    """Frame slots each way: frames in flight at once (a call past them gets `WorkerBusy`)."""
    slot_bytes: int = 512 * 512 * 3
    """The largest frame, in bytes; a result frame larger than this comes back pickled."""
    max_calls: int = 256
    """Calls in flight at once (queued or running); past them a call gets `WorkerBusy`."""
    call_timeout_s: float = 60.0
    """A call's default limit, from when the child starts it (`math.inf`: none)."""
    start_timeout_s: float = 60.0
    max_failures: int = 5
    failure_window_s: float = 300.0
    backoff_base_s: float = 0.5
    backoff_max_s: float = 30.0
    stop_grace_s: float = 3.0
    """At close, how long the child may take to finish the calls already queued."""
    kill_wait_s: float = 2.0
    """How long a terminated or killed child may take to end before it is given up on."""
    env: tuple[tuple[str, str], ...] = ()
    """Environment set in the child before any operation runs (e.g. CUDA_VISIBLE_DEVICES)."""


class WorkerStatus(BaseModel):
    """What /health shows of a worker."""

    name: str
    state: State
    pid: int | None
    generation: int
    """How many child processes were started (1 before any restart)."""
    restarts: int
    recent_failures: int
    """Failures within the window: at `max_failures` the worker stays failed."""
    last_failure: str | None
    retry_in_s: float | None
    in_flight: int
    running: int


@dataclass(frozen=True)
class RestartInfo:
    generation: int
    reason: str


@dataclass(frozen=True)
class ObjectRef:
    """An object kept in one worker process (made by `create`); `method(name)` is a target."""

    obj_id: int
    generation: int
    target: str

    def method(self, name: str) -> MethodRef:
        return MethodRef(self, name)


@dataclass(frozen=True)
class MethodRef:
    obj: ObjectRef
    name: str


_END = object()


@dataclass
class _Call:
    id: int
    what: str
    live: bool
    timeout_s: float
    keep: bool
    future: asyncio.Future[Any] | None = None
    items: asyncio.Queue[Any] | None = None
    in_slot: int | None = None
    out_slot: int | None = None
    timer: asyncio.TimerHandle | None = None
    started: bool = False

    def resolve(self, value: Any) -> None:
        if self.future is not None and not self.future.done():
            self.future.set_result(value)
        elif self.items is not None:
            self.items.put_nowait(value)
            self.items.put_nowait(_END)

    def fail(self, error: BaseException) -> None:
        if self.future is not None:
            if not self.future.done():
                self.future.set_exception(error)
        elif self.items is not None:
            self.items.put_nowait(error)


@dataclass
class _Generation:
    """One child process and what the service holds for it."""

    number: int
    process: Any
    ring_in: FrameRing
    ring_out: FrameRing
    lost: asyncio.Future[str]
    exited: asyncio.Future[int | None]
    calls: dict[int, _Call] = field(default_factory=dict)
    requests: asyncio.WriteTransport | None = None
    replies: asyncio.ReadTransport | None = None
    closed: list[asyncio.Future[None]] = field(default_factory=list)
    start_timer: asyncio.TimerHandle | None = None
    ready: bool = False
    dead: bool = False
    reaped: bool = False

    def send(self, data: bytes) -> None:
        if self.requests is not None and not self.requests.is_closing():
            self.requests.write(data)


class _Pipe(asyncio.Protocol):
    """Either end of a pipe to the child: `closed` resolves when its transport is gone."""

    def __init__(
        self, closed: asyncio.Future[None], on_message: Callable[[tuple[Any, ...]], None]
    ) -> None:
        self._closed = closed
        self._on_message = on_message
        self._decoder = wp.Decoder()

    def data_received(self, data: bytes) -> None:
        for message in self._decoder.feed(data):
            self._on_message(message)

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        if not self._closed.done():
            self._closed.set_result(None)


class ProcessWorker:
    """A supervised worker process for one device. Use on one event loop:
    `await start()`, then `submit`/`submit_batch`/`call`/`stream`/`create`, then `close()`."""

    def __init__(
        self,
        config: ProcessWorkerConfig | None = None,
        on_restart: Callable[[RestartInfo], Awaitable[None] | None] | None = None,
    ) -> None:
        self.config = config or ProcessWorkerConfig()
        self._on_restart = on_restart
        self._state: State = "new"
        self._changed: asyncio.Future[None] | None = None
        self._gen: _Generation | None = None
        self._generations = 0
        self._ids = itertools.count(1)
        self._failures: deque[float] = deque()
        self._last_failure: str | None = None
        self._gave_up: str | None = None
        self._retry_at: float | None = None
        self._wake: asyncio.Future[None] | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._hooks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self.done_live = 0
        self.done_batch = 0

    # ---- lifecycle

    async def start(self) -> None:
        """Start the first child and wait until it serves (raises `WorkerUnavailable` if it
        never does)."""
        if self._supervisor is not None:
            raise RuntimeError("the worker was already started")
        self._loop = asyncio.get_running_loop()
        self._supervisor = self._loop.create_task(
            self._supervise(), name=f"worker-{self.config.name}-supervisor"
        )
        await self.wait_ready()

    async def wait_ready(self) -> None:
        """Return once a child serves; raise `WorkerUnavailable` if the worker failed or is
        shut down."""
        while self._state != "ready":
            if self._state in ("failed", "closed"):
                raise self._unavailable()
            await asyncio.shield(self._changes())

    async def close(self) -> None:
        """Stop the worker, within about `stop_grace_s + 2 * kill_wait_s`, even with a hung
        child. Calls still in flight fail with `WorkerLost`. Idempotent."""
        if self._closing:
            if self._supervisor is not None:
                await asyncio.shield(self._supervisor)
            return
        self._closing = True
        self._set_state("closed")
        if self._wake is not None and not self._wake.done():
            self._wake.set_result(None)
        gen = self._gen
        if gen is not None and not gen.dead:
            await self._stop(gen)
        if self._supervisor is not None:
            await self._supervisor
        hooks = list(self._hooks)
        for task in hooks:
            task.cancel()
        await asyncio.gather(*hooks, return_exceptions=True)

    async def __aenter__(self) -> ProcessWorker:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def failure(self) -> str | None:
        """Why the worker failed for good (state `failed`: it is not restarted), else None.
        Safe to read from any thread: placement reads it off the event loop."""
        return self._gave_up

    @property
    def generation(self) -> int:
        """The number of the latest worker process started (1 for the first). Safe to read
        from any thread."""
        return self._generations

    def status(self) -> WorkerStatus:
        gen = self._gen
        alive = gen is not None and not gen.dead
        retry_in = None
        if self._retry_at is not None and self._loop is not None:
            retry_in = max(0.0, self._retry_at - self._loop.time())
        return WorkerStatus(
            name=self.config.name,
            state=self._state,
            pid=gen.process.pid if alive and gen is not None else None,
            generation=self._generations,
            restarts=max(0, self._generations - 1),
            recent_failures=len(self._recent_failures()),
            last_failure=self._last_failure,
            retry_in_s=retry_in,
            in_flight=len(gen.calls) if alive and gen is not None else 0,
            running=sum(c.started for c in gen.calls.values()) if alive and gen else 0,
        )

    # ---- calls

    def submit(
        self,
        target: str | MethodRef,
        /,
        *args: Any,
        frame: np.ndarray | None = None,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        """A live call: `target(frame, *args, **kwargs)` in the child (without `frame` when
        None). The operation gets the frame as a read-only view of its shared-memory slot,
        valid during the call only (copy what it keeps). The future holds its result; a frame
        result comes back through shared memory, as the caller's own array. Cancelling the
        future skips the call if the child has not started it."""
        return self._future(True, target, args, kwargs, frame, timeout_s)

    def submit_batch(
        self,
        target: str | MethodRef,
        /,
        *args: Any,
        frame: np.ndarray | None = None,
        timeout_s: float | None = None,
        loader: bool = False,
        **kwargs: Any,
    ) -> asyncio.Future[Any]:
        """`submit`, after every live call waiting (a batch operation lets live calls in at
        its safe points with `worker_child.yield_to_live()`); with `loader`, on the loader
        lane, as `call`'s."""
        return self._future(False, target, args, kwargs, frame, timeout_s, loader)

    async def call(
        self,
        target: str | MethodRef,
        /,
        *args: Any,
        live: bool = True,
        frame: np.ndarray | None = None,
        timeout_s: float | None = None,
        loader: bool = False,
        **kwargs: Any,
    ) -> Any:
        """`submit` (`submit_batch` with `live=False`) and its result. With `loader`, it runs
        on the child's loader lane: after the loads sent before it, beside the main thread's
        calls (see worker_child.py for what may run there)."""
        return await self._future(live, target, args, kwargs, frame, timeout_s, loader)

    async def create(
        self,
        target: str,
        /,
        *args: Any,
        live: bool = False,
        timeout_s: float | None = None,
        loader: bool = False,
        **kwargs: Any,
    ) -> ObjectRef:
        """Build `target(*args, **kwargs)` in the child and keep it there; call its methods
        with `ref.method(name)` as a target. It lives until `release` or the child's end.
        With `loader`, it is built on the loader lane (a pipeline that loads as it is made)."""
        call, _ = self._send(live, target, args, kwargs, None, timeout_s, keep=True, loader=loader)
        assert call.future is not None
        return await call.future  # type: ignore[no-any-return]

    def release(self, ref: ObjectRef) -> None:
        gen = self._gen
        if gen is not None and not gen.dead and gen.number == ref.generation:
            gen.send(wp.encode((wp.RELEASE, ref.obj_id)))

    async def stream(
        self,
        target: str | MethodRef,
        /,
        *args: Any,
        live: bool = False,
        timeout_s: float | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[Any]:
        """The items `target` yields in the child (an LLM's tokens), as they come. Leaving
        the loop early stops the generator in the child at its next item. Use inside
        `contextlib.aclosing` so that happens at once."""
        call, gen = self._send(live, target, args, kwargs, None, timeout_s, stream=True)
        assert call.items is not None
        finished = False
        try:
            while True:
                item = await call.items.get()
                if item is _END:
                    finished = True
                    return
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                yield item
        finally:
            if not finished:
                self._cancel(gen, call)

    def _future(
        self,
        live: bool,
        target: str | MethodRef,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        frame: np.ndarray | None,
        timeout_s: float | None,
        loader: bool = False,
    ) -> asyncio.Future[Any]:
        call, gen = self._send(live, target, args, kwargs, frame, timeout_s, loader=loader)
        assert call.future is not None
        call.future.add_done_callback(
            lambda future: self._cancel(gen, call) if future.cancelled() else None
        )
        return call.future

    def _send(
        self,
        live: bool,
        target: str | MethodRef,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        frame: np.ndarray | None,
        timeout_s: float | None,
        *,
        keep: bool = False,
        stream: bool = False,
        loader: bool = False,
    ) -> tuple[_Call, _Generation]:
        gen = self._usable()
        if isinstance(target, MethodRef):
            if target.obj.generation != gen.number:
                raise StaleObject(
                    f"{target.obj.target} lived in a worker process that was restarted"
                )
            wire: wp.Target = (target.obj.obj_id, target.name)
            what = f"{target.obj.target}.{target.name}"
        else:
            wp.check_path(target)
            wire, what = target, target
        if len(gen.calls) >= self.config.max_calls:
            raise WorkerBusy(
                f"the worker of {self.config.name} has {len(gen.calls)} calls in flight"
            )
        if frame is not None and not isinstance(frame, np.ndarray):
            raise TypeError("a frame is a NumPy array")
        if frame is not None and not gen.ring_in.fits(frame):
            raise ValueError(
                f"a frame of {frame.nbytes} bytes is larger than the worker's "
                f"{gen.ring_in.slot_bytes}-byte frame slots"
            )
        call_id = next(self._ids)
        timeout = self.config.call_timeout_s if timeout_s is None else timeout_s
        if not timeout > 0:
            raise ValueError(f"a call's timeout is a positive number of seconds, not {timeout}")
        call = _Call(call_id, what, live, timeout, keep)
        frame_in = None
        if frame is not None:
            call.in_slot = gen.ring_in.acquire()
            call.out_slot = gen.ring_out.acquire()
            if call.in_slot is None or call.out_slot is None:
                self._free_slots(gen, call)
                raise WorkerBusy(f"all {gen.ring_in.slots} frame slots of the worker are in use")
        try:
            if call.in_slot is not None:
                assert frame is not None
                frame_in = gen.ring_in.write(call.in_slot, frame)
            arguments = wp.dumps((args, kwargs))
            data = wp.encode(
                (
                    wp.CALL,
                    call_id,
                    live,
                    wire,
                    arguments,
                    frame_in,
                    call.out_slot,
                    keep,
                    stream,
                    loader,
                )
            )
        except Exception as exc:
            self._free_slots(gen, call)
            raise TypeError(f"the call cannot be sent to the worker: {exc}") from exc
        assert self._loop is not None
        if stream:
            call.items = asyncio.Queue()
        else:
            call.future = self._loop.create_future()
        gen.calls[call_id] = call
        gen.send(data)
        return call, gen

    def _usable(self) -> _Generation:
        gen = self._gen
        if self._state in ("starting", "ready") and gen is not None and not gen.dead:
            return gen
        raise self._unavailable()

    def _unavailable(self) -> WorkerUnavailable:
        name = self.config.name
        if self._state == "closed":
            return WorkerUnavailable(f"the worker of {name} is shut down")
        if self._state == "failed":
            return WorkerUnavailable(f"the worker process of {name} {self._gave_up}")
        if self._state == "new":
            return WorkerUnavailable(f"the worker of {name} is not started")
        return WorkerUnavailable(
            f"the worker of {name} is restarting", retry_after_s=self._retry_after()
        )

    def _retry_after(self) -> float:
        assert self._loop is not None
        wait = self.config.backoff_base_s
        if self._retry_at is not None:
            wait = max(wait, self._retry_at - self._loop.time())
        return float(max(1, math.ceil(wait)))

    def _cancel(self, gen: _Generation, call: _Call) -> None:
        if call.id in gen.calls and not gen.dead:
            gen.send(wp.encode((wp.CANCEL, call.id)))

    def _free_slots(self, gen: _Generation, call: _Call) -> None:
        if call.in_slot is not None:
            gen.ring_in.release(call.in_slot)
            call.in_slot = None
        if call.out_slot is not None:
            gen.ring_out.release(call.out_slot)
            call.out_slot = None

    def _finish(self, gen: _Generation, call: _Call) -> None:
        gen.calls.pop(call.id, None)
        if call.timer is not None:
            call.timer.cancel()
        self._free_slots(gen, call)
        if call.live:
            self.done_live += 1
        else:
            self.done_batch += 1

    # ---- replies

    def _on_message(self, gen: _Generation, message: tuple[Any, ...]) -> None:
        if gen.dead:
            return
        try:
            self._dispatch(gen, message)
        except Exception as exc:
            logger.exception("worker %s sent a message the service cannot use", self.config.name)
            self._lose(gen, f"the worker process broke the protocol ({type(exc).__name__})")

    def _dispatch(self, gen: _Generation, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == wp.READY:
            self._on_ready(gen)
            return
        call = gen.calls.get(message[1])
        if call is None:
            return
        if kind == wp.STARTED:
            call.started = True
            if math.isfinite(call.timeout_s):
                assert self._loop is not None
                call.timer = self._loop.call_later(call.timeout_s, self._timed_out, gen, call)
        elif kind == wp.RESULT:
            try:
                value = gen.ring_out.read(message[3]) if message[3] else wp.loads(message[2])
            except Exception as exc:
                self._finish(gen, call)
                call.fail(_unreadable(exc))
                return
            self._finish(gen, call)
            call.resolve(ObjectRef(value, gen.number, call.what) if call.keep else value)
        elif kind == wp.ITEM:
            assert call.items is not None
            try:
                call.items.put_nowait(wp.loads(message[2]))
            except Exception as exc:
                call.items.put_nowait(_unreadable(exc))
        elif kind == wp.DONE:
            self._finish(gen, call)
            assert call.items is not None
            call.items.put_nowait(_END)
        elif kind == wp.ERROR:
            _, _, type_name, text, poisoned = message
            if poisoned:
                # This call fails with the others the child held: the device, not the call,
                # is at fault, and a retry on the fresh child can succeed.
                self._lose(gen, f"the worker's device failed ({type_name}: {text})")
                return
            self._finish(gen, call)
            call.fail(OperationFailed(type_name, text))
        elif kind == wp.SKIPPED:
            self._finish(gen, call)

    def _on_ready(self, gen: _Generation) -> None:
        gen.ready = True
        if gen.start_timer is not None:
            gen.start_timer.cancel()
        if self._closing:
            return
        self._set_state("ready")
        if gen.number > 1 and self._on_restart is not None:
            assert self._loop is not None
            info = RestartInfo(gen.number, self._last_failure or "")
            task = self._loop.create_task(
                self._run_hook(info), name=f"worker-{self.config.name}-restart"
            )
            self._hooks.add(task)
            task.add_done_callback(self._hooks.discard)

    async def _run_hook(self, info: RestartInfo) -> None:
        assert self._on_restart is not None
        try:
            result = self._on_restart(info)
            if result is not None:
                await result
        except Exception:
            logger.exception("the restart hook of worker %s failed", self.config.name)

    def _timed_out(self, gen: _Generation, call: _Call) -> None:
        if call.id in gen.calls:
            self._lose(gen, f"{call.what} ran past its {call.timeout_s:g} s timeout", call)

    # ---- failures

    def _lose(self, gen: _Generation, reason: str, culprit: _Call | None = None) -> None:
        """End `gen`: kill its process, fail its calls, wake the supervisor."""
        if gen.dead:
            return
        gen.dead = True
        _kill(gen.process)
        if gen.start_timer is not None:
            gen.start_timer.cancel()
        if self._closing:
            reason, retry = f"the worker of {self.config.name} was shut down", None
        else:
            logger.error("worker %s (pid %s): %s", self.config.name, gen.process.pid, reason)
            self._record_failure(reason)
            retry = self._retry_after() if self._state == "restarting" else None
        calls = list(gen.calls.values())
        gen.calls.clear()
        for call in calls:
            if call.timer is not None:
                call.timer.cancel()
            error_type = CallTimedOut if call is culprit else WorkerLost
            call.fail(error_type(reason, retry))
        if not gen.lost.done():
            gen.lost.set_result(reason)

    def _on_exit(self, gen: _Generation, tries: int = 0) -> None:
        """The child's sentinel became readable: it is ending. Reap it, then lose it."""
        assert self._loop is not None
        if tries == 0:
            self._loop.remove_reader(gen.process.sentinel)
        code = gen.process.exitcode
        if code is None and tries < 200:
            # Its pipe closes a moment before its exit status can be collected.
            self._loop.call_later(0.005, self._on_exit, gen, tries + 1)
            return
        if not gen.exited.done():
            gen.exited.set_result(code)
        self._lose(gen, _describe_exit(code))

    def _on_pipe_closed(self, gen: _Generation, _: asyncio.Future[None]) -> None:
        # The sentinel normally tells first, with the exit status; a child that closed its
        # pipe but lives on is ended after a moment.
        if not gen.dead and self._loop is not None:
            self._loop.call_later(
                self.config.kill_wait_s, self._lose, gen, "the worker process closed its pipe"
            )

    def _record_failure(self, reason: str) -> None:
        """Count a failure; decide between a restart after a backoff and giving up."""
        assert self._loop is not None
        self._last_failure = reason
        self._failures.append(self._loop.time())
        failures = len(self._recent_failures())
        if failures >= self.config.max_failures:
            logger.error(
                "worker %s failed %d times in %g s; not restarting it",
                self.config.name,
                failures,
                self.config.failure_window_s,
            )
            self._retry_at = None
            self._gave_up = (
                f"failed {failures} time{'' if failures == 1 else 's'} within "
                f"{self.config.failure_window_s:g} s and is not restarted (last: {reason})"
            )
            self._set_state("failed")
            return
        delay = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (failures - 1))
        self._retry_at = self._loop.time() + delay
        self._set_state("restarting")

    def _recent_failures(self) -> deque[float]:
        if self._loop is not None:
            horizon = self._loop.time() - self.config.failure_window_s
            while self._failures and self._failures[0] < horizon:
                self._failures.popleft()
        return self._failures

    # ---- supervision

    async def _supervise(self) -> None:
        assert self._loop is not None
        while not self._closing:
            self._set_state("starting")
            try:
                gen = await self._launch()
            except Exception as exc:
                logger.exception("worker %s could not start", self.config.name)
                self._record_failure(f"the worker process could not start ({exc})")
            else:
                self._gen = gen
                if self._closing:
                    self._lose(gen, "shut down")
                await gen.lost
                await self._reap(gen)
            if self._closing or self._state == "failed":
                return
            assert self._retry_at is not None
            delay = max(0.0, self._retry_at - self._loop.time())
            self._wake = self._loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._wake), delay)
            self._retry_at = None

    async def _launch(self) -> _Generation:
        assert self._loop is not None
        config = self.config
        self._generations += 1
        number = self._generations
        # Creating segments talks to the resource tracker and starting a process waits on
        # it: both off the loop.
        process, rings, requests_w, replies_r = await asyncio.to_thread(
            _spawn, config, f"worker-{config.name}-{number}"
        )
        loop = self._loop
        gen = _Generation(
            number, process, rings[0], rings[1], loop.create_future(), loop.create_future()
        )
        loop.add_reader(process.sentinel, self._on_exit, gen)
        gen.start_timer = loop.call_later(
            config.start_timeout_s,
            self._lose,
            gen,
            f"the worker process did not start within {config.start_timeout_s:g} s",
        )
        replies_closed: asyncio.Future[None] = loop.create_future()
        requests_closed: asyncio.Future[None] = loop.create_future()
        gen.closed = [replies_closed, requests_closed]
        replies_closed.add_done_callback(lambda f: self._on_pipe_closed(gen, f))
        replies, _ = await loop.connect_read_pipe(
            lambda: _Pipe(replies_closed, lambda m: self._on_message(gen, m)),
            os.fdopen(replies_r, "rb", buffering=0),
        )
        requests, _ = await loop.connect_write_pipe(
            lambda: _Pipe(requests_closed, lambda m: None),
            os.fdopen(requests_w, "wb", buffering=0),
        )
        gen.replies, gen.requests = replies, requests
        return gen

    async def _stop(self, gen: _Generation) -> None:
        """Ask the child to finish its queue and exit; terminate, then kill it if it won't."""
        gen.send(wp.encode((wp.STOP,)))
        waits = [(None, self.config.stop_grace_s)]
        waits += [(signal.SIGTERM, self.config.kill_wait_s), (signal.SIGKILL, 0.0)]
        for sig, wait in waits:
            if sig is not None and gen.process.exitcode is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(gen.process.pid, sig)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(gen.exited), wait)
            if gen.exited.done():
                break
        self._lose(gen, "shut down")

    async def _reap(self, gen: _Generation) -> None:
        """Wait (bounded) for the killed child to end, then free its pipes and segments."""
        if gen.reaped:
            return
        gen.reaped = True
        assert self._loop is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.shield(gen.exited), self.config.kill_wait_s)
        if not gen.exited.done():
            logger.error(
                "worker %s: process %s did not end after SIGKILL", self.config.name, gen.process.pid
            )
            self._loop.remove_reader(gen.process.sentinel)
        try:
            # The replies pipe is open still when the child lives on (its exit was reported
            # by a fork server that died): a read transport has no abort. Closing our end of
            # the requests pipe ends such a child (worker_child's watch).
            if gen.requests is not None and not gen.requests.is_closing():
                gen.requests.abort()
            if gen.replies is not None and not gen.replies.is_closing():
                gen.replies.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.gather(*gen.closed), self.config.kill_wait_s)
            if gen.process.exitcode is not None:
                gen.process.close()
        finally:
            await asyncio.to_thread(_close_rings, gen.ring_in, gen.ring_out)

    def _changes(self) -> asyncio.Future[None]:
        if self._changed is None:
            assert self._loop is not None
            self._changed = self._loop.create_future()
        return self._changed

    def _set_state(self, state: State) -> None:
        self._state = state
        changed, self._changed = self._changed, None
        if changed is not None and not changed.done():
            changed.set_result(None)


PRELOAD = ("runtime.worker_child", "torch")
"""What multiprocessing's fork server imports once, before it forks any worker: a fresh worker
then starts in a fraction of a second rather than importing torch again (seconds), which is
what a restart after a crash waits for. torch is imported, never initialised (no CUDA context,
no thread pool), so a fork of it is clean."""


WORKER_ENVIRONMENT = {"OMP_WAIT_POLICY": "PASSIVE"}
"""Set for the fork server (so for every worker) unless the operator set them. OpenMP's threads
spin for a while after each parallel region by default: with the service's and the workers'
thread pools on the same cores, a worker's CPU inference took 52 ms to 2.8 s a frame where it
took 15-44 ms with passive waits (tiny streamdiffusion, 2 CPUs at load 5-8). OpenMP reads it
once, when torch loads it: in the fork server, so it is set before that starts."""


def _context() -> Any:
    """The fork server context. Its server is started from a clean interpreter on first use
    (never forked from the service's process, whose threads, event loop and perhaps CUDA would
    not survive a fork), and forks each worker from its own single-threaded state."""
    # The fork server takes this process's environment when it starts; this process's own
    # OpenMP, if torch is loaded here, read its settings already and keeps them.
    for name, value in WORKER_ENVIRONMENT.items():
        os.environ.setdefault(name, value)
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    return context


def start_fork_server() -> None:
    """Start the fork server now, if it is not running (blocking: it imports `PRELOAD`); the
    first worker otherwise starts it."""
    from multiprocessing import forkserver

    _context()
    forkserver.ensure_running()


def _spawn(config: ProcessWorkerConfig, name: str) -> tuple[Any, list[FrameRing], int, int]:
    """Start a child with its two frame rings: the process, the rings, and the service's ends
    of the requests and replies pipes."""
    context = _context()
    requests_r, requests_w = os.pipe()
    replies_r, replies_w = os.pipe()
    # Wrapped so multiprocessing hands these two descriptors to the child.
    child_ends = (Connection(requests_r, writable=False), Connection(replies_w, readable=False))
    rings: list[FrameRing] = []
    try:
        rings.append(FrameRing.create(config.slots, config.slot_bytes, "in"))
        rings.append(FrameRing.create(config.slots, config.slot_bytes, "out"))
        process = context.Process(
            target=worker_child.serve,
            args=(
                *child_ends,
                (rings[0].name, config.slots, config.slot_bytes),
                (rings[1].name, config.slots, config.slot_bytes),
                # The service's environment now (the fork server keeps the one it started
                # with), then the worker's own.
                {**os.environ, **dict(config.env)},
            ),
            name=name,
            daemon=True,
        )
        process.start()
    except BaseException:
        _close_rings(*rings)
        os.close(requests_w)
        os.close(replies_r)
        raise
    finally:
        for end in child_ends:
            end.close()
    return process, rings, requests_w, replies_r


def _close_rings(*rings: FrameRing) -> None:
    for ring in rings:
        ring.close()


def _unreadable(exc: Exception) -> OperationFailed:
    return OperationFailed(type(exc).__name__, f"the service cannot read the result: {exc}")


def _kill(process: Any) -> None:
    if process.exitcode is None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(process.pid, signal.SIGKILL)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "the worker process ended"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        if name == "SIGABRT":
            return "the worker process aborted (SIGABRT)"
        return f"the worker process was killed by {name}"
    return f"the worker process exited with status {code}"
