"""The session manager: starts, finds and stops live sessions, and owns every one of them."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import urlsplit

from pydantic import ValidationError

from protocol.api import Capacity, LiveVideoToVideoParams, LiveVideoToVideoResponse
from protocol.errors import Forbidden, InvalidFields, InvalidRequest, NotFound, TooBusy, Unavailable
from protocol.trickle import (
    LocalPublisher,
    LocalSubscriber,
    TricklePublisher,
    TrickleServer,
    TrickleSubscriber,
)
from protocol.trickle.interface import Publisher, Subscriber
from protocol.trickle.server import ChannelRefused
from runtime.runtime import Device, Runtime

from .admission import Admission
from .edges import FrameSink, FrameSource
from .pipeline_host import Log, PipelineCalls, ThreadCalls
from .pipelines.base import LivePipeline, PipelineContext, PipelineParams
from .process_calls import ProcessCalls
from .recording import SessionRecording
from .session import LiveSession, SessionConfig
from .settings import Settings
from .sources import FirstOfSource
from .trickle_io import TrickleSink, TrickleSource
from .webrtc import Peers, WhipSource

logger = logging.getLogger(__name__)

ROLES = ("input", "output", "control", "events")
LINGERING_ROLES = ("output", "events")
"""The channels the session writes, read by outside clients: readable a while after it ends."""
CONTROL_MAX_BYTES = 1024 * 1024  # control and events segments: JSON messages, never large


AVAILABILITY_TTL_S = 5.0
"""How long which pipelines can run here is remembered: models pulled meanwhile show after."""


@dataclass(frozen=True)
class Availability:
    default: str
    pipelines: list[dict[str, Any]]
    checked: float


@dataclass
class SessionChannels:
    """Where a session reads and writes; control and events are optional (runner mode)."""

    input: Subscriber
    output: Publisher
    control: Subscriber | None = None
    events: Publisher | None = None


class SessionListener(Protocol):
    """Told when a session starts and, once it has released everything, ends (metrics)."""

    def started(self, session: LiveSession) -> None: ...

    def ended(self, session: LiveSession) -> None: ...


@dataclass(frozen=True)
class RemoteRetry:
    """How a runner-mode subscriber (input, control) retries a remote that fails: the
    trickle client's rules, doubling waits up to a cap, then the stream is given up."""

    retries: int = 5
    delay_s: float = 0.5
    max_delay_s: float = 4.0


def check_remote_url(name: str, url: str) -> None:
    """A runner-mode URL must be an absolute http(s) URL with a host and, if it has one, a
    port from 0 to 65535; anything else is the caller's mistake, answered before the
    session starts rather than discovered after."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is not one
    except ValueError as exc:
        raise InvalidRequest(
            f"{name} is not a well-formed URL: its host or port cannot be read "
            "(a port is a number from 0 to 65535)"
        ) from exc
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidRequest(f"{name} must be an http:// or https:// URL with a host")


class SessionManager:
    def __init__(
        self,
        settings: Settings,
        trickle: TrickleServer,
        pipelines: dict[str, type[LivePipeline]],
        runtime: Runtime,
    ) -> None:
        self.settings = settings
        self.trickle = trickle
        self.pipelines = pipelines
        self.sessions: dict[str, LiveSession] = {}
        self.peers = Peers(settings.ice(), settings.webrtc_connect_timeout_s)
        self.runtime = runtime
        self.admission = Admission(settings, runtime)
        self.listeners: list[SessionListener] = []
        self.remote_retry = RemoteRetry()
        """The trickle client's rules, not a setting; a test may shorten the waits."""
        self._availability: Availability | None = None
        self._availability_lock = asyncio.Lock()

    @property
    def context(self) -> PipelineContext:
        """What pipelines are told before a device is chosen (availability, admission's
        sizes): the runtime's, which answers for its first device (see `device_context`)."""
        return self.device_context(None)

    def device_context(self, device: Device | None) -> PipelineContext:
        """The context of a session placed on `device` (None: not placed): that device's
        spec, setting and model cache, the runtime's other settings."""
        return PipelineContext(self.runtime if device is None else device)

    def unavailable_reason(self, cls: type[LivePipeline], params: PipelineParams) -> str | None:
        """Why `cls` cannot run here with `params` (missing weights, no GPU), or None."""
        return self.check(cls, params)[0]

    def check(
        self, cls: type[LivePipeline], params: PipelineParams
    ) -> tuple[str | None, str | None]:
        """Why `cls` cannot run here with `params`, or None; and a remark on how it runs here
        (not real time on the CPU), or None."""
        try:
            note = cls.check_available(params, self.context)
        except (LookupError, RuntimeError, ValueError) as exc:
            return str(exc).strip("'\""), None
        return None, note

    def default_pipeline(self) -> str:
        name = self.settings.default_pipeline
        if name != "auto":
            return name
        diffusion = self.pipelines.get("streamdiffusion")
        if (
            diffusion is not None
            and self.unavailable_reason(diffusion, diffusion.parse_params({})) is None
        ):
            return "streamdiffusion"
        return "cartoon" if "cartoon" in self.pipelines else sorted(self.pipelines)[0]

    def pipeline(self, name: str) -> type[LivePipeline]:
        found = self.pipelines.get(name)
        if found is None:
            known = ", ".join(sorted(self.pipelines))
            raise InvalidRequest(f"unknown pipeline {name!r}; known pipelines: {known}")
        return found

    async def default_pipeline_name(self) -> str:
        """`default_pipeline`, off the event loop and remembered a while (see `availability`)."""
        return (await self.availability()).default

    async def availability(self) -> Availability:
        """Which pipelines can run here, the default one and their parameter schemas, as
        `/pipelines`, `/version` and `/hardware/*` show them. Deciding reads the models
        directory and may import torch, so it runs off the event loop, once per
        AVAILABILITY_TTL_S however many callers ask (those routes are public)."""
        async with self._availability_lock:
            now = time.monotonic()
            known = self._availability
            if known is None or now - known.checked > AVAILABILITY_TTL_S:
                known = self._availability = await asyncio.to_thread(self._check_availability)
            return known

    def _check_availability(self) -> Availability:
        listing = []
        for name, cls in sorted(self.pipelines.items()):
            unavailable, note = self.check(cls, cls.parse_params({}))
            listing.append(
                {
                    "name": name,
                    "description": cls.description,
                    "live_params": sorted(cls.live_params),
                    "params": cls.Params.model_json_schema(),
                    "requires_gpu": cls.requires_gpu,
                    "unavailable": unavailable,
                    "note": note,
                }
            )
        return Availability(self.default_pipeline(), listing, time.monotonic())

    def session_config(self, device: Device | None = None) -> SessionConfig:
        home = device or self.runtime.usable_devices()[0]
        in_worker = self.runtime.config.worker_process
        context = self.device_context(device)

        def calls(cls: type[LivePipeline], log: Log) -> PipelineCalls[Any]:
            if cls.passes_through:
                # No model, and its frames skip it: nothing for a worker to isolate, and
                # waiting for one to start would only put loading frames before its first.
                return ThreadCalls(cls, context, log)
            # A pipeline that needs no device runs in the first device's worker.
            return ProcessCalls(cls, home, log)

        config = SessionConfig(
            input_timeout_s=self.settings.input_timeout_s,
            status_interval_s=self.settings.status_interval_s,
            frame_timeout_s=self.settings.frame_timeout_s,
            context=context,
            device_worker=None if in_worker else home.worker(),
            # --worker-process (the default): pipelines run in their device's worker process.
            calls=calls if in_worker else None,
        )
        config.encoder.segment_s = self.settings.segment_s
        return config

    async def start(self, request: LiveVideoToVideoParams, origin: str) -> LiveVideoToVideoResponse:
        """Start a session. Standalone when the request has no URLs (our own channels),
        runner mode when it names another trickle server's channels."""
        pipeline_cls = self.pipeline(request.model_id or await self.default_pipeline_name())
        try:
            params = pipeline_cls.parse_params(request.params)
        except ValidationError as exc:
            raise InvalidFields.from_validation(exc, "body", "params") from exc
        self.check_runner_urls(request)
        record_dir = self.settings.record_dir
        if request.record and record_dir is None:
            raise InvalidRequest(
                "recording is off on this service: the operator enables it with --record-dir"
            )
        # Blocking (model folders, torch, CUDA's free memory): off the event loop.
        context = self.context
        reason = await asyncio.to_thread(self.unavailable_reason, pipeline_cls, params)
        if reason is not None:
            raise Unavailable(f"pipeline {pipeline_cls.name} is unavailable: {reason}")
        need = await asyncio.to_thread(self.admission.measure, pipeline_cls, params, context)
        session_id = secrets.token_hex(16)
        # Sessions, model memory, device throughput: 503 with the limit named. From here to
        # the session's registration nothing awaits but the recording's folder, and the
        # model's memory stays reserved for this session (released when it ends or fails).
        device = self.admission.check(pipeline_cls, need, list(self.sessions.values()), session_id)
        try:
            return await self._start(request, origin, pipeline_cls, params, session_id, device)
        except BaseException:
            if session_id not in self.sessions:
                self.admission.release(session_id)
            raise

    async def _start(
        self,
        request: LiveVideoToVideoParams,
        origin: str,
        pipeline_cls: type[LivePipeline],
        params: PipelineParams,
        session_id: str,
        device: Device | None,
    ) -> LiveVideoToVideoResponse:
        record_dir = self.settings.record_dir
        recording = None
        if record_dir is not None and (request.record or self.settings.record_all):
            try:
                # Creates its folder: a disk write, off the event loop.
                recording = await asyncio.to_thread(SessionRecording, record_dir / session_id)
            except OSError as exc:
                raise Unavailable(f"cannot record the session: {exc.strerror or exc}") from exc
        standalone = not request.subscribe_url
        owned: list[str] = []
        if standalone:
            channels, response = self._local_channels(session_id, origin, owned)
        else:
            channels, response = self._remote_channels(request, session_id)

        async def on_close() -> None:
            self.admission.observe(session)  # its measured throughput outlives it
            self.admission.release(session_id)
            ended = self.sessions.pop(session_id, None)
            # In the same step as the pop: a scrape sees the session live or ended, never both.
            for listener in self.listeners if ended is not None else ():
                listener.ended(ended)
            await self.peers.close_session(session_id)
            for role, name in zip(ROLES, owned, strict=False):
                if role in LINGERING_ROLES:
                    # A reader between two requests (or a little behind) still gets the last
                    # output segment and the final status; then the channel is deleted.
                    self.trickle.linger(name)
                else:
                    self.trickle.delete_channel(name)

        config = self.session_config(device)
        size = (params.width, params.height) if params.width and params.height else None
        source: FrameSource = TrickleSource(channels.input, size)
        whip = None
        if standalone:
            # Fed over trickle or WHIP, whichever the publisher uses first.
            whip = WhipSource(size)
            source = FirstOfSource([source, whip])
        # Our own output channel is encoded only while someone reads it; another server's
        # (runner mode) always, since the orchestrator reads it and we cannot see who does.
        output = channels.output
        readers = output if isinstance(output, LocalPublisher) else None
        sinks: list[FrameSink] = [TrickleSink(output, config.encoder, readers=readers)]
        if recording is not None:
            source = recording.source(source)
            sinks.append(recording.sink())
        session = LiveSession(
            session_id,
            pipeline_cls,
            params,
            source,
            sinks,
            config,
            control=channels.control,
            events=channels.events,
            on_close=on_close,
        )
        if recording is not None:
            recording.params_changed(params, "start")
            session.params_listeners.append(recording.params_changed)
        session.whip = whip
        if standalone:
            session.channels = dict(zip(ROLES, owned, strict=True))
        self.sessions[session_id] = session
        for listener in self.listeners:
            listener.started(session)
        session.start()
        logger.info(
            "session started session=%s pipeline=%s device=%s mode=%s stream_id=%s request_id=%s",
            session_id,
            pipeline_cls.name,
            "none" if device is None else device.label,
            "standalone" if standalone else "runner",
            request.stream_id,
            request.gateway_request_id,
        )
        return response

    def check_runner_urls(self, request: LiveVideoToVideoParams) -> None:
        """Runner mode connects to URLs a client gave: only to hosts the operator allowed."""
        urls = {
            name: getattr(request, name)
            for name in ("subscribe_url", "publish_url", "control_url", "events_url")
            if getattr(request, name)
        }
        if not urls:
            return  # standalone
        for name in ("publish_url", "subscribe_url"):
            if name not in urls:
                # As the runner's spec: both are required once either is given.
                raise InvalidFields(
                    [{"loc": ["body", name], "msg": "Field required", "type": "missing"}]
                )
        for name, url in urls.items():
            check_remote_url(name, url)
        allowed = self.settings.runner_host_set()
        if not allowed:
            raise Forbidden(
                "runner mode is off, so this service does not connect to URLs from a request; "
                "the operator enables it with --runner-hosts HOST[:PORT],... (or '*' for any host)"
            )
        if "*" in allowed:
            return
        for name, url in urls.items():
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
            if host not in allowed and f"{host}:{parts.port}" not in allowed:
                raise Forbidden(
                    f"{name}: host {host} is not an allowed trickle host (see --runner-hosts)"
                )

    def _local_channels(
        self, session_id: str, origin: str, owned: list[str]
    ) -> tuple[SessionChannels, LiveVideoToVideoResponse]:
        """Four channels, each with its own random name: a URL handed out grants one thing
        (publish input, read output, send control, read events), and none can be derived
        from another or from the session id. Outside clients may not write what the session
        writes, nor read what only the session reads."""
        # The session is the only reader of its input and control: each chunk is freed once
        # it has read it, so a publisher's segments are not kept once decoded.
        specs = (
            ("video/MP2T", {"outside_reads": False, "single_reader": True}),
            ("video/MP2T", {"outside_writes": False}),
            (
                "application/json",
                {
                    "outside_reads": False,
                    "max_segment_bytes": CONTROL_MAX_BYTES,
                    "single_reader": True,
                },
            ),
            ("application/json", {"outside_writes": False, "max_segment_bytes": CONTROL_MAX_BYTES}),
        )
        try:
            for mime, access in specs:
                owned.append(self.trickle.create_channel(None, mime, **access).name)  # type: ignore[arg-type]
        except ChannelRefused as exc:
            for name in owned:
                self.trickle.delete_channel(name)
            raise TooBusy(f"cannot open the session's channels: {exc}") from exc
        names = owned
        base_url = origin + self.settings.trickle().base_path
        channels = SessionChannels(
            input=LocalSubscriber(self.trickle, names[0]),
            output=LocalPublisher(self.trickle, names[1], linger=True),
            control=LocalSubscriber(self.trickle, names[2]),
            events=LocalPublisher(self.trickle, names[3], linger=True),
        )
        response = LiveVideoToVideoResponse(
            publish_url=base_url + names[0],
            subscribe_url=base_url + names[1],
            control_url=base_url + names[2],
            events_url=base_url + names[3],
            whip_url=f"{origin}/whip/{names[0]}",
            whep_url=f"{origin}/whep/{names[1]}",
            events_stream_url=f"{origin}/events/{names[3]}",
            request_id=session_id,
            manifest_id=session_id,
            session_id=session_id,
        )
        return channels, response

    def _remote_channels(
        self, request: LiveVideoToVideoParams, session_id: str
    ) -> tuple[SessionChannels, LiveVideoToVideoResponse]:
        verify_tls = self.settings.runner_tls_verify
        retry = self.remote_retry

        def subscriber(name: str, url: str) -> TrickleSubscriber:
            # Each error names the URL by its field: the client knows which one it gave.
            return TrickleSubscriber(
                url,
                name=name,
                verify_tls=verify_tls,
                max_retries=retry.retries,
                retry_delay_s=retry.delay_s,
                max_retry_delay_s=retry.max_delay_s,
            )

        channels = SessionChannels(
            input=subscriber("subscribe_url", request.subscribe_url),
            output=TricklePublisher(request.publish_url, name="publish_url", verify_tls=verify_tls),
            control=subscriber("control_url", request.control_url) if request.control_url else None,
            events=TricklePublisher(
                request.events_url, "application/json", name="events_url", verify_tls=verify_tls
            )
            if request.events_url
            else None,
        )
        # From the caller's side: it publishes where we subscribe, and reads where we publish.
        response = LiveVideoToVideoResponse(
            publish_url=request.subscribe_url,
            subscribe_url=request.publish_url,
            control_url=request.control_url,
            events_url=request.events_url,
            request_id=request.gateway_request_id or session_id,
            manifest_id=request.manifest_id,
            session_id=session_id,
        )
        return channels, response

    def get(self, session_id: str) -> LiveSession:
        session = self.sessions.get(session_id)
        if session is None:
            raise NotFound(f"no live session {session_id!r}")
        return session

    async def stop(self, session_id: str) -> None:
        await self.get(session_id).stop()

    def by_channel(self, role: str, name: str) -> LiveSession:
        """The session whose `role` channel is `name` (the capability in a handed-out URL)."""
        for session in self.sessions.values():
            if session.channels.get(role) == name:
                return session
        raise NotFound("no live session has this URL (it ended, or it never existed)")

    async def close(self) -> None:
        sessions = list(self.sessions.values())
        # The worker processes end beside the sessions: they finish the frames queued there
        # (the sessions' drain), and a hung one is killed instead of holding the drain up.
        await asyncio.gather(
            *(session.stop("shutdown") for session in sessions),
            self.runtime.close_process_workers(),
        )
        await self.peers.close_all()

    def worker_failure(self) -> str | None:
        """Why a device's worker process failed for good (`--worker-process`), or None."""
        for device in self.runtime.known_devices():
            failure = device.failure()
            if failure is not None:
                return failure
        return None

    def capacity(self) -> Capacity:
        return self.admission.capacity(list(self.sessions.values()))

    def health(self) -> str:
        if self.worker_failure() is not None:
            return "ERROR"
        states = {session.state for session in self.sessions.values() if session.running}
        if not states:
            return "IDLE"
        if "ERROR" in states:
            return "ERROR"
        if "LOADING" in states:
            return "LOADING"
        return "OK"
