"""One live session: input segments -> decode -> newest-frame slot -> pipeline -> encode -> output.

Every arrow is a task the session owns; decode, inference and encode run on threads of their
own. The only buffer between camera and model is a `LatestSlot`, so when the model is slower than
the camera old frames are dropped (and counted), never queued: latency stays flat over time.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pydantic import ValidationError

from protocol.media import (
    AUDIO_LEAD,
    AudioPacket,
    EncoderSettings,
    SegmentEncoder,
    StreamDecoder,
    VideoFrame,
)
from protocol.messages import (
    ErrorEvent,
    Event,
    InferenceStatus,
    InputStatus,
    LatencyStatus,
    RestartEvent,
    State,
    StatusEvent,
    TraceEvent,
    decode_control,
    encode_event,
    now_ms,
)
from protocol.trickle import EndOfStream, StreamNotFound, TrickleError
from protocol.trickle.interface import Publisher, Subscriber

from .loading import LoadingFrames
from .pipelines.base import LivePipeline, PipelineContext, PipelineParams
from .slot import LatestSlot

logger = logging.getLogger(__name__)

CONTROL_MAX_BYTES = 1024 * 1024


@dataclass
class SessionConfig:
    input_timeout_s: float = 60.0
    status_interval_s: float = 10.0
    max_consecutive_failures: int = 3
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    context: PipelineContext = field(default_factory=PipelineContext)
    device_worker: Executor | None = None
    """The device's shared inference worker, for pipelines that declare `uses_device`."""


@dataclass
class SessionChannels:
    """Where the session reads and writes; control and events are optional (runner mode)."""

    input: Subscriber
    output: Publisher
    control: Subscriber | None = None
    events: Publisher | None = None


@dataclass(slots=True)
class _Processed:
    image: np.ndarray
    pts: int
    arrived: float
    loading: bool


class _OutputGone(Exception):
    """The output channel was closed or removed: nobody can receive this session any more."""


class _Sink:
    """SegmentEncoder sink: hands each event to the event loop, in order (encoder thread)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue[Any]) -> None:
        self._loop = loop
        self._queue = queue

    def _send(self, item: tuple[str, Any]) -> None:
        self._loop.call_soon_threadsafe(self._queue.put_nowait, item)

    def start(self) -> None:
        self._send(("start", None))

    def write(self, data: bytes) -> None:
        self._send(("data", data))

    def end(self) -> None:
        self._send(("end", None))


class LiveSession:
    """Runs one stream until its input ends, it is stopped, or the service shuts down."""

    def __init__(
        self,
        session_id: str,
        pipeline_cls: type[LivePipeline],
        params: PipelineParams,
        channels: SessionChannels,
        config: SessionConfig | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.id = session_id
        self.pipeline_cls = pipeline_cls
        self.params = params
        self.channels = channels
        self.config = config or SessionConfig()
        self._on_close = on_close
        self.log = logging.LoggerAdapter(logger, {"session": session_id})

        self.start_time = now_ms()
        self.state: State = "LOADING"
        self.state_time = self.start_time
        self.frames_in = 0
        self.frames_out = 0
        self.restart_count = 0
        self.last_error: str | None = None
        self.last_error_time: int | None = None
        self.last_restart_time: int | None = None
        self.last_input_time: int | None = None
        self.last_output_time: int | None = None
        self.params_time = self.start_time
        self.latencies: collections.deque[float] = collections.deque(maxlen=300)
        self.ended: str | None = None

        self._frames: LatestSlot[VideoFrame] = LatestSlot()
        self._outputs: LatestSlot[_Processed] = LatestSlot()
        # Audio bypasses the slot and the model; it waits here until the video frame at its
        # time is encoded, then is muxed right after it (bounded: a stalled video drops audio).
        self._audio: collections.deque[AudioPacket] = collections.deque(maxlen=500)
        self._segments: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self._events: asyncio.Queue[Event | None] = asyncio.Queue()
        self._pipeline: LivePipeline | None = None
        self._loading: asyncio.Task[None] | None = None
        self._loading_frames = LoadingFrames()
        self._last_output: np.ndarray | None = None
        self._output_size: tuple[int, int] | None = None
        self._failures = 0
        self._fps_marks = (time.monotonic(), 0, 0)
        self._fps = (0.0, 0.0)
        self._params_sent = False
        self._restart_logs: list[str] | None = None
        self._task: asyncio.Task[None] | None = None

        prefix = f"{session_id[:8]}"
        self._decode_thread = ThreadPoolExecutor(1, thread_name_prefix=f"decode-{prefix}")
        self._infer_thread = ThreadPoolExecutor(1, thread_name_prefix=f"infer-{prefix}")
        self._encode_thread = ThreadPoolExecutor(1, thread_name_prefix=f"encode-{prefix}")
        self._load_thread = ThreadPoolExecutor(1, thread_name_prefix=f"load-{prefix}")
        self._infer_pool: Executor = self._infer_thread
        if pipeline_cls.uses_device and self.config.device_worker is not None:
            self._infer_pool = self.config.device_worker
        self._serve_old = False
        size = (params.width, params.height) if params.width and params.height else None
        self._decoder = StreamDecoder(size)

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"session-{self.id}")
        return self._task

    async def stop(self) -> None:
        """Stop now (DELETE or shutdown) and wait until everything is released."""
        if self._task is None:
            return
        if not self._task.done():
            self.ended = self.ended or "stopped"
            self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    async def run(self) -> None:
        self.emit(TraceEvent(type="runner_receive_stream_request"))
        try:
            async with asyncio.TaskGroup() as group:
                events = group.create_task(self._publish_events(), name=f"{self.id}/events")
                side = [group.create_task(self._report(), name=f"{self.id}/status")]
                if self.channels.control is not None:
                    side.append(group.create_task(self._control(), name=f"{self.id}/control"))
                self._loading = group.create_task(self._load(self.params), name=f"{self.id}/load")
                try:
                    await self._media()
                except _OutputGone:
                    self.ended = self.ended or "output closed"
                for task in side:
                    task.cancel()
                if self._loading is not None:
                    self._loading.cancel()
                self.emit(self.status(for_event=True))
                self._events.put_nowait(None)
                await events
        finally:
            await self._close()

    async def _close(self) -> None:
        if self._loading is not None and not self._loading.done():
            self._loading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._loading
        self.ended = self.ended or "ended"
        self.state = "OFFLINE"
        await asyncio.shield(self._release())

    async def _release(self) -> None:
        channels = [self.channels.input, self.channels.control]
        for subscriber in channels:
            if subscriber is not None:
                with contextlib.suppress(Exception):
                    await subscriber.close()
        for publisher in (self.channels.output, self.channels.events):
            if publisher is not None:
                with contextlib.suppress(Exception):
                    await publisher.close()
        pipeline, self._pipeline = self._pipeline, None
        loop = asyncio.get_running_loop()
        if pipeline is not None:
            with contextlib.suppress(Exception):
                await loop.run_in_executor(self._load_thread, pipeline.unload)
        for pool in (
            self._decode_thread,
            self._infer_thread,
            self._encode_thread,
            self._load_thread,
        ):
            await loop.run_in_executor(None, pool.shutdown, True)
        if self._on_close is not None:
            await self._on_close()
        self.log.info(
            "session ended reason=%s frames_in=%d frames_out=%d dropped=%d",
            self.ended,
            self.frames_in,
            self.frames_out,
            self.frames_dropped,
        )

    # -- the media path -------------------------------------------------------------------------

    async def _media(self) -> None:
        async with asyncio.TaskGroup() as group:
            group.create_task(self._ingest(), name=f"{self.id}/ingest")
            group.create_task(self._infer(), name=f"{self.id}/infer")
            group.create_task(self._encode(), name=f"{self.id}/encode")
            group.create_task(self._egress(), name=f"{self.id}/egress")

    async def _ingest(self) -> None:
        loop = asyncio.get_running_loop()
        decoder = self._decoder
        first = True
        try:
            while True:
                try:
                    async with asyncio.timeout(self.config.input_timeout_s):
                        segment = await self.channels.input.next()
                except TimeoutError:
                    self.ended = "no input"
                    self.log.info("no input for %.0f s", self.config.input_timeout_s)
                    return
                if segment is None:
                    self.ended = "input ended"
                    return
                await loop.run_in_executor(self._decode_thread, decoder.begin_segment)
                try:
                    async with asyncio.timeout(self.config.input_timeout_s):
                        async for chunk in segment:
                            items = await loop.run_in_executor(
                                self._decode_thread, decoder.feed, chunk
                            )
                            self._route(items)
                except (TrickleError, OSError, TimeoutError) as exc:
                    # A publisher that vanished mid-segment: keep what was decoded, go on.
                    self.error(f"input segment {segment.seq} cut short: {exc!r}")
                self._route(await loop.run_in_executor(self._decode_thread, decoder.end_segment))
                problem = decoder.take_error()
                if problem:
                    self.error(f"input segment {segment.seq}: {problem}")
                if first:
                    first = False
                    self.emit(TraceEvent(type="runner_receive_first_ingest_segment"))
        finally:
            self._frames.close()

    def _route(self, items: list[VideoFrame | AudioPacket]) -> None:
        for item in items:
            if isinstance(item, VideoFrame):
                self.frames_in += 1
                self.last_input_time = now_ms()
                self._frames.put(item)
            else:
                self._audio.append(item)

    async def _infer(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            while (frame := await self._frames.get()) is not None:
                pipeline = self._pipeline
                if pipeline is None or (self._is_loading() and not self._serve_old):
                    image = self._loading_frame(frame)
                    self._outputs.put(_Processed(image, frame.pts, frame.arrived, True))
                    continue
                try:
                    image = await loop.run_in_executor(
                        self._infer_pool, pipeline.process, frame.image
                    )
                except Exception as exc:
                    self._failed(exc)
                    continue
                self._failures = 0
                self._last_output = image
                self._outputs.put(_Processed(image, frame.pts, frame.arrived, False))
        finally:
            self._outputs.close()

    def _is_loading(self) -> bool:
        return self._loading is not None and not self._loading.done()

    def _loading_frame(self, frame: VideoFrame) -> np.ndarray:
        height, width = frame.image.shape[:2]
        size = self._output_size or (width, height)
        if not self.params.show_reloading_frame and self._last_output is not None:
            return self._last_output
        return self._loading_frames.render(self._last_output, size)

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.error(f"pipeline failed on a frame: {exc!r}")
        if self._failures >= self.config.max_consecutive_failures and not self._is_loading():
            self._restart_logs = [f"{self._failures} consecutive failures, last: {exc!r}"]
            self._failures = 0
            self.restart_count += 1
            self.last_restart_time = now_ms()
            self.emit(
                RestartEvent(
                    pipeline=self.pipeline_cls.name,
                    restart_count=self.restart_count,
                    restart_logs=self._restart_logs,
                )
            )
            self.log.warning("pipeline restart count=%d", self.restart_count)
            self._loading = asyncio.create_task(self._load(self.params))

    async def _encode(self) -> None:
        loop = asyncio.get_running_loop()
        sink = _Sink(loop, self._segments)
        encoder = SegmentEncoder(sink, self.config.encoder)
        try:
            while (item := await self._outputs.get()) is not None:
                if self._output_size is None:
                    height, width = item.image.shape[:2]
                    self._output_size = (width, height)
                audio = []
                while self._audio and self._audio[0].pts <= item.pts + AUDIO_LEAD:
                    audio.append(self._audio.popleft())
                await loop.run_in_executor(
                    self._encode_thread, encoder.encode, item.image, item.pts, audio
                )
                self._segments.put_nowait(("frame", item))
        finally:
            await loop.run_in_executor(self._encode_thread, encoder.close)
            self._segments.put_nowait(("close", None))

    async def _egress(self) -> None:
        first = True
        output = self.channels.output
        while True:
            kind, item = await self._segments.get()
            if kind == "close":
                return
            if kind != "start":
                continue
            try:
                async with output.segment() as writer:
                    while True:
                        kind, item = await self._segments.get()
                        if kind == "data":
                            await writer.write(item)
                        elif kind == "frame":
                            self._delivered(item)
                            if first:
                                first = False
                                self.emit(TraceEvent(type="runner_send_first_processed_segment"))
                        elif kind == "end":
                            break
                        elif kind == "close":
                            return
            except (EndOfStream, StreamNotFound) as exc:
                raise _OutputGone() from exc
            except (TrickleError, OSError) as exc:
                self.error(f"output segment failed: {exc!r}")
                await self._skip_segment()

    async def _skip_segment(self) -> None:
        # The failed segment's remaining bytes have nowhere to go; drop up to its end.
        while True:
            kind, item = await self._segments.get()
            if kind == "frame":
                self._delivered(item)
            if kind in ("end", "close"):
                if kind == "close":
                    self._segments.put_nowait(("close", None))
                return

    def _delivered(self, item: _Processed) -> None:
        if item.loading:
            return
        self.frames_out += 1
        self.last_output_time = now_ms()
        self.latencies.append(time.monotonic() - item.arrived)

    # -- params, reloads, control ---------------------------------------------------------------

    async def _load(self, params: PipelineParams) -> None:
        loop = asyncio.get_running_loop()
        self._set_state("LOADING")
        pipeline = self.pipeline_cls(params, self.config.context)
        try:
            await loop.run_in_executor(self._load_thread, pipeline.load)
        except Exception as exc:
            self.error(f"pipeline {self.pipeline_cls.name} failed to load: {exc!r}")
            self._set_state("ERROR")
            return
        old, self._pipeline = self._pipeline, pipeline
        self._serve_old = False
        if old is not None:
            # Unloaded on the inference side, after any frame it is still processing.
            await loop.run_in_executor(self._infer_pool, old.unload)
        self._set_state("ONLINE")
        self.log.info("pipeline ready name=%s", self.pipeline_cls.name)

    async def update_params(self, raw: dict[str, Any]) -> str:
        """Apply a complete parameter set: "unchanged", "live" or "reload".
        Raises ValidationError for invalid params, ValueError for a refused change."""
        new = self.pipeline_cls.parse_params(raw)
        old = self.params
        if new == old:
            return "unchanged"
        if (new.width, new.height) != (old.width, old.height):
            raise ValueError("width and height cannot change during a stream")
        self.params = new
        self.params_time = now_ms()
        self._params_sent = False
        if self.pipeline_cls.needs_reload(old, new) or self._pipeline is None:
            if self._loading is not None and not self._loading.done():
                self._loading.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await self._loading
            old_pipeline = self._pipeline
            self._serve_old = old_pipeline is not None and old_pipeline.keeps_serving_during_reload(
                new
            )
            self._loading = asyncio.create_task(self._load(new))
            self.log.info("params need a reload serve_old=%s", self._serve_old)
            return "reload"
        pipeline = self._pipeline
        await asyncio.get_running_loop().run_in_executor(self._infer_pool, pipeline.apply, new)
        return "live"

    async def _control(self) -> None:
        control = self.channels.control
        assert control is not None
        async for segment in control:
            try:
                data = await segment.read()
                if len(data) > CONTROL_MAX_BYTES:
                    raise ValueError(f"control message over {CONTROL_MAX_BYTES} bytes")
                message = decode_control(data)
                if message is None:
                    continue
                outcome = await self.update_params(message)
                self.log.info("control message applied outcome=%s", outcome)
            except ValidationError as exc:
                self.error(f"invalid params in control message: {_summary(exc)}")
            except ValueError as exc:
                self.error(f"invalid control message: {exc}")
            except (TrickleError, OSError) as exc:
                self.error(f"control segment failed: {exc!r}")

    # -- events and status ----------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        self._events.put_nowait(event)

    def error(self, message: str) -> None:
        self.last_error = message
        self.last_error_time = now_ms()
        self.log.warning("%s", message)
        self.emit(ErrorEvent(pipeline=self.pipeline_cls.name, message=message))

    async def _publish_events(self) -> None:
        events = self.channels.events
        while (event := await self._events.get()) is not None:
            if events is None:
                continue
            try:
                await events.write(encode_event(event))
            except (EndOfStream, StreamNotFound):
                events = None  # nobody listens any more; the session itself goes on
            except (TrickleError, OSError) as exc:
                self.log.info("event not published error=%r", exc)

    async def _report(self) -> None:
        while True:
            self.emit(self.status(for_event=True))
            await asyncio.sleep(self.config.status_interval_s)

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.state_time = now_ms()

    @property
    def frames_dropped(self) -> int:
        return self._frames.replaced + self._outputs.replaced

    def current_state(self) -> State:
        if self.state in ("LOADING", "ERROR", "OFFLINE"):
            return self.state
        now = now_ms()
        if self.last_input_time is None or now - self.last_input_time > 2000:
            return "DEGRADED_INPUT"
        if self.last_error_time is not None and now - self.last_error_time < 15_000:
            return "DEGRADED_INFERENCE"
        if self.last_restart_time is not None and now - self.last_restart_time < 60_000:
            return "DEGRADED_INFERENCE"
        return "ONLINE"

    def _measure_fps(self) -> tuple[float, float]:
        now = time.monotonic()
        since, frames_in, frames_out = self._fps_marks
        if now - since >= 1.0:
            elapsed = now - since
            self._fps = (
                (self.frames_in - frames_in) / elapsed,
                (self.frames_out - frames_out) / elapsed,
            )
            self._fps_marks = (now, self.frames_in, self.frames_out)
        return self._fps

    def status(self, *, for_event: bool = False) -> StatusEvent:
        """The status now. `for_event`: the status event's form, where last_params and
        last_restart_logs are sent once after they change, then null; a status read over HTTP
        always carries them and does not use them up."""
        fps_in, fps_out = self._measure_fps()
        params = self.params.model_dump(mode="json")
        latencies = sorted(self.latencies)
        latency = LatencyStatus(frames=len(latencies))
        if latencies:
            latency.p50_ms = round(latencies[len(latencies) // 2] * 1000, 1)
            latency.p95_ms = round(latencies[int(len(latencies) * 0.95)] * 1000, 1)
        # livepeer-compat: last_params and last_restart_logs are sent once after they change,
        # then null (protocol/trickle.md §3.6).
        last_params: dict[str, Any] | None = params
        restart_logs = self._restart_logs
        if for_event:
            last_params = None if self._params_sent else params
            self._params_sent = True
            self._restart_logs = None
        return StatusEvent(
            pipeline=self.pipeline_cls.name,
            start_time=self.start_time,
            state=self.current_state(),
            last_state_update_time=self.state_time,
            input_status=InputStatus(last_input_time=self.last_input_time, fps=round(fps_in, 2)),
            inference_status=InferenceStatus(
                last_output_time=self.last_output_time,
                fps=round(fps_out, 2),
                last_params_update_time=self.params_time,
                last_params=last_params,
                last_params_hash=hashlib.md5(
                    json.dumps(params, sort_keys=True).encode(), usedforsecurity=False
                ).hexdigest(),
                last_error_time=self.last_error_time,
                last_error=self.last_error,
                last_restart_time=self.last_restart_time,
                last_restart_logs=restart_logs,
                restart_count=self.restart_count,
            ),
            latency=latency,
            frames_in=self.frames_in,
            frames_out=self.frames_out,
            frames_dropped=self.frames_dropped,
        )


def _summary(exc: ValidationError) -> str:
    return "; ".join(
        f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
    )
