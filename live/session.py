"""One live session: lifecycle, params, control, events and status around a `FrameLoop`.

The session owns one TaskGroup: the frame loop (source -> slot -> pipeline -> sinks), the
pipeline host's loader (pipeline_host.py: loads, reloads, failures, restarts, hangs), the
control reader, the status reporter and the events publisher. It knows its transports only as
a `FrameSource`, `FrameSink`s, and the trickle interfaces of its control and events channels.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from protocol.errors import InvalidFields, in_words
from protocol.media import EncoderSettings
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
from protocol.trickle.interface import Publisher, SubscribedSegment, Subscriber

from .edges import FrameSink, FrameSource, InputFailed, MediaContext
from .frame_loop import FrameLoop
from .logs import PIPELINE, SESSION_ID
from .pipeline_host import HostConfig, HostHooks, Log, PipelineCalls, PipelineHost, ThreadCalls
from .pipelines.base import LivePipeline, PipelineContext, PipelineParams
from .slot import put_dropping_oldest
from .stats import SessionStats, percentiles

if TYPE_CHECKING:
    from .webrtc import WhipSource

logger = logging.getLogger(__name__)


WATCH_BACKLOG = 100  # events an in-process reader may fall behind by
EVENTS_BACKLOG = 256
"""Events waiting for the events channel; past it the oldest are dropped (and counted)."""
STOP_GRACE_S = 5.0  # a stopped session drains its in-flight frames for at most this long
INPUT_STALE_MS = 2000
RESTART_DEGRADED_MS = 60_000
STATE_EVENT_GAP_S = 0.25
"""Status events for state changes come at least this far apart: a change right after another
waits out the gap and goes out as one event with the state then, so a state that flaps (a
pipeline failing every other frame) costs at most four status events a second."""

NORMAL_ENDS = {"input ended", "no input", "stopped", "shutdown", "output closed"}


@dataclass
class SessionConfig:
    input_timeout_s: float = 60.0
    status_interval_s: float = 10.0
    max_consecutive_failures: int = 3
    max_restarts: int = 5
    """Restarts in a row (no frame processed between them) before the session gives up."""
    frame_timeout_s: float = 30.0
    """A pipeline that takes longer on one frame is taken as hung: the session ends."""
    pace: bool = True
    """Release input frames at their presentation times (see `Pacer`)."""
    encoder: EncoderSettings = field(default_factory=EncoderSettings)
    context: PipelineContext = field(default_factory=PipelineContext)
    device_worker: Executor | None = None
    calls: Callable[[type[LivePipeline], Log], PipelineCalls[Any]] | None = None
    """Where the session's pipeline runs (a worker process, later); None: in this process,
    on the session's threads and `device_worker` (`ThreadCalls`)."""
    """The device's shared inference worker, for pipelines that declare `uses_device`."""


class LiveSession:
    """Runs one stream until its input ends, it is stopped, or the service shuts down."""

    def __init__(
        self,
        session_id: str,
        pipeline_cls: type[LivePipeline],
        params: PipelineParams,
        source: FrameSource,
        sinks: list[FrameSink],
        config: SessionConfig | None = None,
        *,
        control: Subscriber | None = None,
        events: Publisher | None = None,
        on_close: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self.id = session_id
        self.pipeline_cls = pipeline_cls
        self.config = config or SessionConfig()
        self.control = control
        self.events = events
        self.whip: WhipSource | None = None
        """Where a WHIP publisher's tracks go (standalone sessions), set by the manager."""
        self.channels: dict[str, str] = {}
        """Standalone: the names of its own trickle channels, by role (input, output, ...)."""
        self._on_close = on_close
        self.log = logging.LoggerAdapter(logger, {"session": session_id})

        self.stats = SessionStats()
        self.start_time = now_ms()
        self.state: State = "LOADING"
        self.state_time = self.start_time
        self.restart_count = 0
        self.last_error: str | None = None
        self.last_error_time: int | None = None
        self.last_restart_time: int | None = None
        self.params_time = self.start_time
        self.ended: str | None = None

        config = self.config
        calls: PipelineCalls[Any] = (
            config.calls(pipeline_cls, self.log)
            if config.calls is not None
            else ThreadCalls(pipeline_cls, config.context, self.log, config.device_worker)
        )
        self.host: PipelineHost[Any] = PipelineHost(
            pipeline_cls,
            params,
            calls,
            HostHooks(
                error=self.error,
                stop=lambda reason: self.loop.stop(reason),
                state=self._set_state,
                restarted=self._restarted,
            ),
            self.stats,
            self.log,
            HostConfig(
                max_consecutive_failures=config.max_consecutive_failures,
                max_restarts=config.max_restarts,
                frame_timeout_s=config.frame_timeout_s,
            ),
        )
        context = MediaContext(
            error=self.error,
            stats=self.stats,
            log=self.log,
            needs_rgb=not pipeline_cls.passes_through,
        )
        self.loop = FrameLoop(
            source,
            sinks,
            self.host.process,
            context,
            input_timeout_s=self.config.input_timeout_s,
            pace=self.config.pace,
            on_first_input=lambda: self.emit(
                TraceEvent(type="runner_receive_first_ingest_segment")
            ),
            on_first_output=self._first_output,
        )
        # Every frame in or out may change the state (input back, output after an error):
        # the check is a few comparisons, the status event goes out from the reporter.
        self.stats.on_frame = self._check_state
        # Bounded: an events channel slower than the session (a stalled runner-mode
        # events_url) costs its oldest events, counted, never unbounded memory.
        self._events: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=EVENTS_BACKLOG)
        self.events_dropped = 0
        self._watchers: set[asyncio.Queue[dict[str, Any] | None]] = set()
        self._published_state: State | None = None
        self._status_wanted = False
        self._status_poke = asyncio.Event()
        self._params_sent = False
        self._restart_logs: list[str] | None = None
        self._task: asyncio.Task[None] | None = None
        self.params_listeners: list[Callable[[PipelineParams, str], None]] = []
        """Told of each params change that took (a recording logs them)."""

    @property
    def params(self) -> PipelineParams:
        return self.host.params

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> asyncio.Task[None]:
        self._task = asyncio.create_task(self.run(), name=f"session-{self.id}")
        return self._task

    async def stop(self, reason: str = "stopped") -> None:
        """End now (DELETE or shutdown): what is in flight drains, the final status is
        published, everything is released; waits until it is."""
        if self._task is None:
            return
        if not self._task.done():
            self.loop.stop(reason)
            try:
                await asyncio.wait_for(asyncio.shield(self._task), STOP_GRACE_S)
            except TimeoutError:
                self.log.warning("session did not drain in %.0f s; cancelled", STOP_GRACE_S)
                self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def wait_ready(self) -> None:
        """Until the pipeline has loaded for the first time."""
        await self.host.ready.wait()

    async def wait(self) -> None:
        """Until the session has ended and released everything."""
        if self._task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(self._task)

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def add_sink(self, sink: FrameSink) -> None:
        self.loop.add_sink(sink)

    @property
    def events_channel(self) -> str | None:
        return self.channels.get("events")

    async def run(self) -> None:
        SESSION_ID.set(self.id)  # this task's context: every child task and thread inherits it
        PIPELINE.set(self.pipeline_cls.name)
        self.emit(TraceEvent(type="runner_receive_stream_request"))
        try:
            async with asyncio.TaskGroup() as group:
                events = group.create_task(self._publish_events(), name="events")
                side = [
                    group.create_task(self._report(), name="status"),
                    group.create_task(self.host.run(), name="loader"),
                ]
                if self.control is not None:
                    side.append(group.create_task(self._read_control(), name="control"))
                try:
                    self.ended = await self.loop.run()
                except* InputFailed as failed:
                    message = str(failed.exceptions[0])
                    self.error(message)
                    self.ended = f"input failed: {message}"
                except* Exception as failed:
                    # A bug, not a stream problem: the traceback goes to the log, the event
                    # says what happened, and the session still ends with a final status.
                    self.log.error("frame loop failed", exc_info=failed.exceptions[0])
                    self.error(f"internal error: {in_words(failed.exceptions[0])}")
                    self.ended = "internal error"
                for task in side:
                    task.cancel()
                self._set_state("OFFLINE" if self.ended in NORMAL_ENDS else "ERROR")
                self.emit(self.status(for_event=True))
                self._queue_event(None)
                await events
        except* Exception as failed:
            self.log.error("session failed", exc_info=failed.exceptions[0])
            self.ended = f"internal error: {in_words(failed.exceptions[0])}"
        finally:
            self.ended = self.ended or "ended"
            if self.state != "ERROR":
                self._set_state("OFFLINE")
            await asyncio.shield(self._release())

    async def _release(self) -> None:
        for closing in (self.control, self.events):
            if closing is not None:
                with contextlib.suppress(Exception):
                    await closing.close()
        await self.host.close()
        if self._on_close is not None:
            await self._on_close()
        self.log.info(
            "session ended reason=%s frames_in=%d frames_out=%d dropped=%d",
            self.ended,
            self.stats.frames_in,
            self.stats.frames_out,
            self.stats.frames_dropped,
        )

    def _restarted(self, logs: list[str]) -> None:
        self._restart_logs = logs
        self.restart_count += 1
        self.last_restart_time = now_ms()
        self.emit(
            RestartEvent(
                pipeline=self.pipeline_cls.name,
                restart_count=self.restart_count,
                restart_logs=logs,
            )
        )
        self.log.warning("pipeline restart count=%d", self.restart_count)

    # -- params and control ---------------------------------------------------------------------

    async def update_params(self, raw: dict[str, Any]) -> str:
        """Apply a complete parameter set: "unchanged", "live" or "reload".
        Raises ValidationError for invalid params, ValueError for a refused change."""
        new = self.pipeline_cls.parse_params(raw)
        ignored = self.pipeline_cls.unused_params(raw)
        if ignored:
            # A client names these: the log line says how many and shows a few, shortened.
            shown = ", ".join(name[:64] for name in sorted(ignored)[:10])
            self.log.info(
                "params %s%s do not apply to pipeline %s: ignored",
                shown,
                f" (and {len(ignored) - 10} more)" if len(ignored) > 10 else "",
                self.pipeline_cls.name,
            )
        old = self.params
        if (new.width, new.height) != (old.width, old.height):
            current = (old.width, old.height) if old.width and old.height else self.host.input_size
            if (new.width, new.height) != current:
                raise ValueError("width and height cannot change during a stream")
            new = new.model_copy(update={"width": old.width, "height": old.height})
        if new == old:
            return "unchanged"
        self.params_time = now_ms()
        self._params_sent = False
        reload = self.pipeline_cls.needs_reload(old, new)
        for listener in self.params_listeners:
            listener(new, "reload" if reload else "live")
        return await self.host.update(new)

    async def _read_control(self) -> None:
        control = self.control
        assert control is not None
        if hasattr(control, "on_retry"):
            # A remote control channel that fails is reported while it is retried.
            control.on_retry = lambda problem: self.error(f"control: {problem}")
        while True:
            try:
                segment = await control.next()
            except (TrickleError, OSError) as exc:
                # Given up after the trickle client's retries: params can no longer reach
                # the session, so it ends (cleanly, with its final status) rather than run on
                # unsteerable; the gateway sees why in the events and can start another.
                self.error(f"cannot read the control channel: {in_words(exc)}; the session ends")
                self.loop.stop(f"control failed: {in_words(exc)}")
                return
            if segment is None:
                return
            await self._apply_control(segment)

    async def _apply_control(self, segment: SubscribedSegment) -> None:
        try:
            # decode_control bounds the size and nesting (protocol/bounded_json.py).
            message = decode_control(await segment.read())
            if message is None:
                return
            outcome = await self.update_params(message)
            self.log.info("control message applied outcome=%s", outcome)
        except ValidationError as exc:
            self.error(f"invalid params in control message: {_summary(exc)}")
        except ValueError as exc:
            self.error(f"invalid control message: {exc}")
        except (TrickleError, OSError) as exc:
            self.error(f"control segment failed: {in_words(exc)}")

    # -- events and status ----------------------------------------------------------------------

    def emit(self, event: Event) -> None:
        self._queue_event(event)

    def _queue_event(self, event: Event | None) -> None:
        if self._events.full():
            self.events_dropped += 1
            if self.events_dropped in (1, 10, 100) or self.events_dropped % 1000 == 0:
                self.log.warning(
                    "events channel falls behind: %d oldest events dropped", self.events_dropped
                )
        put_dropping_oldest(self._events, event)

    def error(self, message: str) -> None:
        self.last_error = message
        self.last_error_time = now_ms()
        self.log.warning("%s", message)
        self.emit(ErrorEvent(pipeline=self.pipeline_cls.name, message=message))
        self._check_state()

    async def watch_events(self) -> AsyncIterator[dict[str, Any]]:
        """Every event from now on, as the events channel carries them (`{"event": ...,
        "queue_event_type": ...}`), until the session ends; for in-process readers such as
        the page's event stream. A reader that falls behind loses its oldest events."""
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(maxsize=WATCH_BACKLOG)
        if not self.running:
            return
        self._watchers.add(queue)
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self._watchers.discard(queue)

    def _tell_watchers(self, message: dict[str, Any] | None) -> None:
        for queue in self._watchers:
            put_dropping_oldest(queue, message)  # a slow reader must not hold memory

    async def _publish_events(self) -> None:
        events = self.events
        try:
            while (event := await self._events.get()) is not None:
                data = encode_event(event)
                if self._watchers:
                    self._tell_watchers(json.loads(data))
                if events is None:
                    continue
                try:
                    await events.write(data)
                except (EndOfStream, StreamNotFound):
                    events = None  # nobody listens any more; the session itself goes on
                except (TrickleError, OSError) as exc:
                    self.log.info("event not published error=%r", exc)
        finally:
            self._tell_watchers(None)

    async def _report(self) -> None:
        """Status events: one at once whenever the state changes, at least STATE_EVENT_GAP_S
        apart; one at the first output frame; and one every `status_interval_s` after the
        last."""
        loop = asyncio.get_running_loop()
        interval = self.config.status_interval_s
        last_sent = -math.inf
        while True:
            self._status_poke.clear()  # before reading the state: a later change pokes again
            now = loop.time()
            changed = self._status_wanted or self.current_state() != self._published_state
            wait = last_sent + interval - now
            if changed or wait <= 0:
                gap = last_sent + STATE_EVENT_GAP_S - now
                # The first output frame, once a session, goes out without waiting the gap.
                if gap <= 0 or wait <= 0 or self._status_wanted:
                    status = self.status(for_event=True)
                    self._published_state = status.state
                    self._status_wanted = False
                    self.emit(status)
                    last_sent = now
                    wait = interval
                else:
                    # The change goes out once the gap has passed, with the state then; what
                    # changes meanwhile needs no wake-up.
                    await asyncio.sleep(gap)
                    continue
            until = self._next_state_change_s()
            if until is not None:
                wait = min(wait, until)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait):
                    await self._status_poke.wait()

    def _next_state_change_s(self) -> float | None:
        """Seconds until the state changes with no event to tell of it: the input goes stale,
        or a restart stops counting as recent."""
        if self.state != "ONLINE":
            return None
        now = now_ms()
        deadlines = []
        if self.stats.last_input_time is not None:
            deadlines.append(self.stats.last_input_time + INPUT_STALE_MS)
        if self.last_restart_time is not None:
            deadlines.append(self.last_restart_time + RESTART_DEGRADED_MS)
        ahead = [d - now for d in deadlines if d >= now]
        # A millisecond past the deadline, so that the state read then has changed.
        return (min(ahead) + 1) / 1000 if ahead else None

    def _check_state(self) -> None:
        if self.current_state() != self._published_state:
            self._status_poke.set()

    def _first_output(self) -> None:
        self.emit(TraceEvent(type="runner_send_first_processed_segment"))
        # The first output frame is news even when the state stays the same.
        self._status_wanted = True
        self._status_poke.set()

    def _set_state(self, state: State) -> None:
        if state != self.state:
            self.state = state
            self.state_time = now_ms()
            self._check_state()

    def current_state(self) -> State:
        if self.state in ("LOADING", "ERROR", "OFFLINE"):
            return self.state
        stats = self.stats
        now = now_ms()
        if stats.last_input_time is None or now - stats.last_input_time > INPUT_STALE_MS:
            return "DEGRADED_INPUT"
        # A problem degrades the state until frames flow again after it.
        out = stats.last_output_time or 0
        if self.last_error_time is not None and out <= self.last_error_time:
            return "DEGRADED_INFERENCE"
        if self.last_restart_time is not None and (
            out <= self.last_restart_time or now - self.last_restart_time < RESTART_DEGRADED_MS
        ):
            return "DEGRADED_INFERENCE"
        return "ONLINE"

    def status(self, *, for_event: bool = False) -> StatusEvent:
        """The status now. `for_event`: the status event's form, where last_params and
        last_restart_logs are sent once after they change, then null; a status read over HTTP
        always carries them and does not use them up."""
        stats = self.stats
        fps_in, fps_out = stats.fps()
        params = self.params.model_dump(mode="json")
        delay = percentiles(stats.latencies)
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
            input_status=InputStatus(last_input_time=stats.last_input_time, fps=fps_in),
            inference_status=InferenceStatus(
                last_output_time=stats.last_output_time,
                fps=fps_out,
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
            latency=LatencyStatus(p50_ms=delay.p50_ms, p95_ms=delay.p95_ms, frames=delay.frames),
            frames_in=stats.frames_in,
            frames_out=stats.frames_out,
            frames_dropped=stats.frames_dropped,
            stages=stats.stage_percentiles(),
            sinks=stats.sink_status(),
            end_reason=self.ended,
            hint=stats.hint(self._output_size()),
        )

    def _output_size(self) -> tuple[int, int] | None:
        """The pipeline's output size: its params', else the last output's, else the input's."""
        if self.params.width and self.params.height:
            return self.params.width, self.params.height
        if self.host.last_output is not None:
            height, width = self.host.last_output.shape[:2]
            return width, height
        return self.host.input_size


def _summary(exc: ValidationError) -> str:
    # Field paths without pydantic's union tags; where a field fails one member of a union
    # for its type ("not an integer") and another for a bound, only the bound is news.
    errors = InvalidFields.from_validation(exc).errors
    paths = [".".join(str(p) for p in err["loc"]) for err in errors]
    bounded = {path for path, err in zip(paths, errors, strict=True) if not _is_type(err)}
    return "; ".join(
        f"{path}: {err['msg']}"
        for path, err in zip(paths, errors, strict=True)
        if path not in bounded or not _is_type(err)
    )


def _is_type(error: dict[str, object]) -> bool:
    return str(error.get("type", "")).endswith("_type")
