"""One session's pipeline, supervised: loads, reloads, params, frames, failures, restarts, hangs.

`PipelineHost.process` is the `process` callable a `FrameLoop` takes: it returns the pipeline's
output, or a loading frame while the pipeline (re)loads, or the old pipeline's output while a
new one loads beside it (serve-old-while-loading). `run` is its loader: a task that loads when
asked, the newest params winning over a load in progress. Failures are counted: a few in a
row, or one out-of-memory error, restart the pipeline (unloaded first, then loaded afresh);
restarts in a row without a good frame are bounded; a frame past `frame_timeout_s` is taken
as a hang and ends the stream. What the owner (a `LiveSession`, a replay) shows of all this
goes out through `HostHooks`.

Where the pipeline lives and its calls run is a `PipelineCalls`: `ThreadCalls` keeps it in this
process, on the session's loader thread and its inference thread (or the device's shared
worker). The host only awaits those calls and handles what they raise, so another
`PipelineCalls` can keep the pipeline in a worker process (runtime/worker_process.py: `create`,
a method call per frame through shared memory, a call timeout counted from when the child
starts it, surfacing as TimeoutError) without the host or its owner changing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Generic, Literal, TypeVar

import numpy as np

from protocol.errors import in_words
from protocol.media import VideoFrame
from protocol.messages import State

from .edges import OutputFrame
from .loading import LoadingFrames
from .pipelines.base import LivePipeline, PipelineContext, PipelineParams
from .stats import SessionStats
from .threads import run_in

Log = logging.Logger | logging.LoggerAdapter[logging.Logger]
H = TypeVar("H")


class PipelineLost(Exception):
    """The pipeline is gone with the process it lived in (a worker process that crashed, was
    killed or hung on another session's frame). `final`: that process will not come back;
    else it is restarting, and `PipelineCalls.watch`'s callback says when to load again."""

    def __init__(self, reason: str, *, final: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.final = final


class PipelineCalls(ABC, Generic[H]):
    """Where one session's pipeline lives and its calls run; `H` is how the host holds a
    loaded pipeline (the object itself in process, a reference to it in a worker process).
    Calls on the inference side (`process`, `apply`, `unload`) run one at a time, in order."""

    @abstractmethod
    async def load(self, params: PipelineParams) -> H:
        """A new pipeline with `params`, loaded. A load that fails or is cancelled gives back
        what it took before it ends."""

    @abstractmethod
    async def process(self, pipeline: H, image: np.ndarray, timeout_s: float) -> np.ndarray:
        """One frame. Raises TimeoutError past `timeout_s` (the call is then taken as hung)."""

    @abstractmethod
    async def apply(self, pipeline: H, params: PipelineParams) -> None:
        """Params whose changes all apply live."""

    @abstractmethod
    async def unload(self, pipeline: H) -> None:
        """Release what `pipeline` holds, after any frame it is still processing."""

    @abstractmethod
    async def keeps_serving(self, pipeline: H, new: PipelineParams) -> bool:
        """Whether `pipeline` may go on processing while one with `new` loads beside it."""

    @abstractmethod
    async def close(self, pipeline: H | None) -> None:
        """Unload `pipeline` (the last one, if any) and release the calls' own resources;
        a call that hung is left where it is, never waited for."""

    def watch(self, restarted: Callable[[str], None]) -> None:
        """Where the pipeline can be lost with its process: `restarted(reason)` is called
        once a fresh process is there to load it in again."""


class ThreadCalls(PipelineCalls[LivePipeline]):
    """The pipeline in this process: loads on a thread of its own, frames on another (or on
    the device's shared inference worker for pipelines that declare `uses_device`)."""

    def __init__(
        self,
        pipeline_cls: type[LivePipeline],
        context: PipelineContext,
        log: Log,
        device_worker: Executor | None = None,
    ) -> None:
        self.pipeline_cls = pipeline_cls
        self.context = context
        self.log = log
        self._infer_thread = ThreadPoolExecutor(1, thread_name_prefix="infer")
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix="load")
        self._infer: Executor = self._infer_thread
        if pipeline_cls.uses_device and device_worker is not None:
            self._infer = device_worker
        self._hung = False  # a frame never came back from the inference side

    async def load(self, params: PipelineParams) -> LivePipeline:
        pipeline = self.pipeline_cls(params, self.context)
        try:
            await run_in(self._load_thread, pipeline.load)
        except asyncio.CancelledError:
            # The load goes on on its thread: whatever it takes is given back after it, on
            # the same thread (`close` waits for that thread).
            with contextlib.suppress(RuntimeError):  # already shut down: nothing runs on it
                self._load_thread.submit(_unload_quietly, pipeline, self.log)
            raise
        except Exception:
            # What the failed load took before failing (a leased model) is given back.
            await run_in(self._load_thread, _unload_quietly, pipeline, self.log)
            raise
        return pipeline

    async def process(
        self, pipeline: LivePipeline, image: np.ndarray, timeout_s: float
    ) -> np.ndarray:
        try:
            async with asyncio.timeout(None if math.isinf(timeout_s) else timeout_s):
                return await run_in(self._infer, pipeline.process, image)
        except TimeoutError:
            self._hung = True
            raise

    async def apply(self, pipeline: LivePipeline, params: PipelineParams) -> None:
        await run_in(self._infer, pipeline.apply, params)

    async def unload(self, pipeline: LivePipeline) -> None:
        await run_in(self._infer, pipeline.unload)

    async def keeps_serving(self, pipeline: LivePipeline, new: PipelineParams) -> bool:
        # Cheap (a free-memory reading): asked here, with no thread hop, so the reload is
        # requested before any other control message is taken.
        return pipeline.keeps_serving_during_reload(new)

    async def close(self, pipeline: LivePipeline | None) -> None:
        # A frame still on the inference thread never came back (a hung pipeline): unloading
        # under it or waiting for its thread would hang the close too, so both are left.
        if pipeline is not None and not self._hung:
            with contextlib.suppress(Exception):
                await run_in(self._load_thread, pipeline.unload)
        loop = asyncio.get_running_loop()
        if self._hung:
            self._infer_thread.shutdown(wait=False)
        pools = (self._load_thread,) if self._hung else (self._infer_thread, self._load_thread)
        for pool in pools:
            await loop.run_in_executor(None, pool.shutdown, True)


@dataclass(frozen=True)
class HostConfig:
    max_consecutive_failures: int = 3
    max_restarts: int = 5
    """Restarts in a row (no frame processed between them) before the host gives up."""
    frame_timeout_s: float = 30.0
    """A pipeline that takes longer on one frame is taken as hung: the stream ends."""
    wait_for_load: bool = False
    """Frames wait for a (re)load instead of getting loading frames, and the old pipeline never
    serves during one: every frame goes through the pipeline with the params then (replay)."""


def _ignore(*_: object) -> None:
    return None


@dataclass
class HostHooks:
    """How the host tells its owner what happened."""

    error: Callable[[str], None]
    """A problem, in words (an `error` event)."""
    stop: Callable[[str], None]
    """The stream must end, for this reason (a hang, too many restarts)."""
    state: Callable[[State], None] = _ignore
    """LOADING at each (re)load, ONLINE when one is done, ERROR when one failed."""
    restarted: Callable[[list[str]], None] = _ignore
    """A restart begins, with its logs (why)."""


class PipelineHost(Generic[H]):
    """One session's pipeline: see the module's note."""

    def __init__(
        self,
        pipeline_cls: type[LivePipeline],
        params: PipelineParams,
        calls: PipelineCalls[H],
        hooks: HostHooks,
        stats: SessionStats,
        log: Log,
        config: HostConfig | None = None,
    ) -> None:
        self.pipeline_cls = pipeline_cls
        self.params = params
        """The newest params: what the next load uses, and the loaded pipeline has."""
        self.calls = calls
        self.hooks = hooks
        self.stats = stats
        self.log = log
        self.config = config or HostConfig()
        self.pipeline: H | None = None
        self.last_output: np.ndarray | None = None
        self.input_size: tuple[int, int] | None = None
        self.ready = asyncio.Event()
        """Set once the pipeline has loaded for the first time."""
        self._reload = asyncio.Event()
        self._reload.set()  # the first load
        self._settled = asyncio.Event()  # no load pending nor under way
        self._loading = True
        self._serve_old = False
        self._loading_frames = LoadingFrames()
        self._failures = 0
        self._restarts_in_a_row = 0
        self._in_process = False  # a frame is on the inference side (it may be stuck there)
        calls.watch(self.restart)

    # -- frames ---------------------------------------------------------------------------------

    async def process(self, frame: VideoFrame) -> OutputFrame | None:
        self.input_size = frame.size  # never `image` here: it may be left out (HasPicture)
        if self._in_process:
            return None  # the previous frame never came back (hung): the stream is ending
        if self.config.wait_for_load:
            await self._settled.wait()
        pipeline = self.pipeline
        if pipeline is None or (self._loading and not self._serve_old):
            return OutputFrame(self._loading_frame(frame), frame.pts, frame.arrived, True)
        started = time.perf_counter()
        if frame.rgb is None and self.pipeline_cls.passes_through:
            # It would return its input untouched: the frame goes on as it was decoded, with
            # no RGB made for it (the source left it out, MediaContext.needs_rgb).
            self.stats.stage("inference", time.perf_counter() - started)
            self._failures = 0
            self._restarts_in_a_row = 0
            return OutputFrame(None, frame.pts, frame.arrived, False, decoded=frame.decoded)
        timeout = self.config.frame_timeout_s
        self._in_process = True
        try:
            image = await self.calls.process(pipeline, frame.image, timeout)
        except TimeoutError:
            self.hooks.error(
                f"pipeline {self.pipeline_cls.name} took over {timeout:g} s on one frame: "
                "taken as hung, the session ends"
            )
            self.hooks.stop("pipeline hung")
            return None
        except PipelineLost as lost:
            self._in_process = False
            if lost.final:
                self._ended_with(lost)
                return None
            # Restarting: loading frames until the restart's reload is done.
            return OutputFrame(self._loading_frame(frame), frame.pts, frame.arrived, True)
        except Exception as exc:
            self._in_process = False
            self._failed(exc)
            return None
        self._in_process = False
        self.stats.stage("inference", time.perf_counter() - started)
        self._failures = 0
        self._restarts_in_a_row = 0
        self.last_output = image
        unchanged = self.pipeline_cls.passes_through and image is frame.rgb
        decoded = frame.decoded if unchanged else None
        return OutputFrame(image, frame.pts, frame.arrived, False, decoded=decoded)

    def _loading_frame(self, frame: VideoFrame) -> np.ndarray:
        width, height = frame.size
        if self.last_output is not None:
            height, width = self.last_output.shape[:2]
            if not self.params.show_reloading_frame:
                return self.last_output
        return self._loading_frames.render(self.last_output, (width, height))

    def _ended_with(self, lost: PipelineLost) -> None:
        self.hooks.error(f"pipeline {self.pipeline_cls.name} cannot run: {lost.reason}")
        self.hooks.stop(f"worker failed: {lost.reason}")

    def restart(self, reason: str) -> None:
        """The process the pipeline lived in was replaced: load it again in the new one,
        loading frames meanwhile. Not a failure of this session's pipeline, so it counts
        toward no limit."""
        self.pipeline = None  # it went with the old process: nothing to unload
        self.hooks.restarted([f"the worker process was restarted: {reason}"])
        self._request_load(serve_old=False)

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.hooks.error(f"pipeline failed on a frame: {in_words(exc)}")
        # Out of memory: the pipeline's state is suspect and the next frames would fail the
        # same way, so restart now; the reload unloads first, which gives the memory back.
        out_of_memory = out_of_memory_error(exc)
        if out_of_memory:
            self._failures = max(self._failures, self.config.max_consecutive_failures)
        if self._failures < self.config.max_consecutive_failures or self._loading:
            return
        logs = [
            f"out of memory: {in_words(exc)}"
            if out_of_memory
            else f"{self._failures} consecutive failures, last: {in_words(exc)}"
        ]
        self._failures = 0
        if self._restarts_in_a_row >= self.config.max_restarts:
            self.hooks.error(
                f"pipeline {self.pipeline_cls.name} failed again after "
                f"{self._restarts_in_a_row} restarts without a good frame: the session ends"
            )
            self.hooks.stop("pipeline failed")
            return
        self._restarts_in_a_row += 1
        self.hooks.restarted(logs)
        self._request_load(serve_old=False)

    # -- params, loads and reloads --------------------------------------------------------------

    async def update(self, new: PipelineParams) -> Literal["live", "reload"]:
        """Take params that differ from the current ones: applied live, or by a reload (the
        old pipeline serving meanwhile where it can and may)."""
        old, self.params = self.params, new
        if self.pipeline_cls.needs_reload(old, new):
            serve_old = (
                not self.config.wait_for_load
                and self.pipeline is not None
                and await self.calls.keeps_serving(self.pipeline, new)
            )
            self._request_load(serve_old=serve_old)
            self.log.info("params need a reload serve_old=%s", serve_old)
            return "reload"
        pipeline = self.pipeline
        if pipeline is not None and not self._loading:
            await self.calls.apply(pipeline, new)
        return "live"  # while loading: the load applies them before the first frame

    def _request_load(self, *, serve_old: bool) -> None:
        self._serve_old = serve_old
        self._loading = True
        self._settled.clear()
        self._reload.set()

    async def run(self) -> None:
        """The loader: loads the pipeline when asked, until cancelled."""
        while True:
            await self._reload.wait()
            self._reload.clear()
            await self._load(self.params)
            if not self._reload.is_set():
                self._settled.set()

    async def _load(self, params: PipelineParams) -> None:
        self.hooks.state("LOADING")
        if not self._serve_old and self.pipeline is not None:
            # Out of memory, or a reload without room for two: what the old pipeline holds
            # is given back before the new one takes its own.
            old, self.pipeline = self.pipeline, None
            await self.calls.unload(old)
        try:
            pipeline = await self.calls.load(params)
        except PipelineLost as lost:
            if lost.final:
                self._ended_with(lost)
            # Else the worker restarts: its restart asks for this load again.
            return
        except Exception as exc:
            self.hooks.error(f"pipeline {self.pipeline_cls.name} failed to load: {in_words(exc)}")
            self.hooks.state("ERROR")
            self._loading = False
            return
        if self._reload.is_set():
            # Params that need another load came in meanwhile: this one is already stale.
            await self.calls.unload(pipeline)
            return
        if self.params != params:
            # Only live params changed during the load: apply them before the first frame.
            await self.calls.apply(pipeline, self.params)
        old, self.pipeline = self.pipeline, pipeline
        self._serve_old = False
        self._loading = False
        if old is not None:
            # Unloaded on the inference side, after any frame it is still processing.
            await self.calls.unload(old)
        self.hooks.state("ONLINE")
        self.ready.set()
        self.log.info("pipeline ready name=%s", self.pipeline_cls.name)

    async def close(self) -> None:
        """Unload the pipeline and release the calls' resources (not waiting on a hung frame).
        After `run` has been cancelled and the frame loop has ended."""
        pipeline, self.pipeline = self.pipeline, None
        await self.calls.close(pipeline)


def _unload_quietly(pipeline: LivePipeline, log: Log) -> None:
    try:
        pipeline.unload()
    except Exception:
        log.warning("unloading a pipeline that failed to load failed", exc_info=True)


def out_of_memory_error(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    torch = sys.modules.get("torch")  # only a pipeline that imported torch can raise its OOM
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)
