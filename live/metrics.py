"""Prometheus metrics at `GET /metrics`, from one registry per app (never the global one).

Where the service already keeps the state (sessions and their counters, trickle channels,
WebRTC peers, loaded models) a collector reads it at scrape time, so nothing is counted twice
and nothing can drift. Per-event figures (stage times, ingest-to-output delay, batch request
durations) are real histogram observations: a session's stats pass each timing on to a
`SessionObserver`, and a middleware times the batch routes.

Frame counters stay monotonic across sessions: a live session's counts are read from its
stats, and when it ends its final counts move into per-pipeline totals in the same step as it
leaves the session manager.

`/metrics` takes the bearer token when one is set, as every other control route: it is
read-only but tells who is streaming what. Prometheus sends it with `authorization:
{credentials: TOKEN}` (or `bearer_token`) in the scrape config.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from protocol.requests import require_bearer
from protocol.trickle import TrickleServer
from runtime.runtime import Runtime

from .admission import items_done
from .keys import METRICS, SETTINGS
from .session import LiveSession
from .sessions import SessionManager
from .stats import ALL_STAGES

NAMESPACE = "live_v2v"

# Stage times are milliseconds on a GPU and up to seconds on a CPU; the delay adds buffering.
STAGE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
DELAY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)
# A batch request can wait for a model load or run a video model for minutes.
BATCH_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)


@dataclass
class FrameTotals:
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0


class SessionObserver:
    """One session's view of the histograms: the children of its pipeline's label, bound once
    so that an observation is one call (the stats call it on every frame)."""

    def __init__(self, metrics: ServiceMetrics, pipeline: str) -> None:
        self._stages = {name: metrics.stage_seconds.labels(pipeline, name) for name in ALL_STAGES}
        self._delay = metrics.delay_seconds.labels(pipeline)

    def stage(self, name: str, seconds: float) -> None:
        self._stages[name].observe(seconds)

    def delay(self, seconds: float) -> None:
        self._delay.observe(seconds)


class ServiceMetrics:
    """The app's registry, its histograms, and the collector of the state it reads."""

    def __init__(
        self,
        sessions: SessionManager,
        trickle: TrickleServer,
        runtime: Runtime,
        batch_paths: Iterable[str],
    ) -> None:
        self.registry = CollectorRegistry()
        self.sessions = sessions
        self.trickle = trickle
        self.runtime = runtime
        self.batch_paths = frozenset(batch_paths)
        self.ended_totals: dict[str, FrameTotals] = collections.defaultdict(FrameTotals)
        """Final counts of ended sessions, by pipeline."""
        self._pipelines: dict[str, str] = {}
        """The pipeline label each live session was counted under (its id to the name)."""
        self.stage_seconds = Histogram(
            "stage_seconds",
            "Time a frame spends in each stage of the frame loop",
            ["pipeline", "stage"],
            namespace=NAMESPACE,
            buckets=STAGE_BUCKETS,
            registry=self.registry,
        )
        self.delay_seconds = Histogram(
            "ingest_to_output_seconds",
            "Delay from a frame's last input byte to its output being sent",
            ["pipeline"],
            namespace=NAMESPACE,
            buckets=DELAY_BUCKETS,
            registry=self.registry,
        )
        self.batch_requests = Counter(
            "batch_requests",
            "Batch requests answered, by route and status",
            ["route", "status"],
            namespace=NAMESPACE,
            registry=self.registry,
        )
        self.batch_seconds = Histogram(
            "batch_request_seconds",
            "Time to answer a batch request, by route and status",
            ["route", "status"],
            namespace=NAMESPACE,
            buckets=BATCH_BUCKETS,
            registry=self.registry,
        )
        self.registry.register(_StateCollector(self))
        sessions.listeners.append(self)

    # -- sessions (SessionListener) ------------------------------------------------------------

    def started(self, session: LiveSession) -> None:
        pipeline = session.pipeline_cls.name
        self._pipelines[session.id] = pipeline
        session.stats.observer = SessionObserver(self, pipeline)

    def ended(self, session: LiveSession) -> None:
        pipeline = self._pipelines.pop(session.id, session.pipeline_cls.name)
        totals = self.ended_totals[pipeline]
        totals.frames_in += session.stats.frames_in
        totals.frames_out += session.stats.frames_out
        totals.frames_dropped += session.stats.frames_dropped

    def frame_totals(self) -> dict[str, FrameTotals]:
        """Every frame counted so far, by pipeline: ended sessions plus live ones."""
        result = {name: FrameTotals(**vars(t)) for name, t in self.ended_totals.items()}
        for session in self.sessions.sessions.values():
            pipeline = self._pipelines.get(session.id, session.pipeline_cls.name)
            totals = result.setdefault(pipeline, FrameTotals())
            totals.frames_in += session.stats.frames_in
            totals.frames_out += session.stats.frames_out
            totals.frames_dropped += session.stats.frames_dropped
        return result

    # -- batch routes --------------------------------------------------------------------------

    def observe_batch(self, route: str, status: int, seconds: float) -> None:
        self.batch_requests.labels(route, str(status)).inc()
        self.batch_seconds.labels(route, str(status)).observe(seconds)

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Counts and times the batch routes; outermost, so it sees the status the error
        middleware answered with."""
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else None
        if route not in self.batch_paths:
            return await handler(request)
        assert route is not None
        started = time.perf_counter()
        # Counted when answered: the error middleware inside turns every failure into a
        # response; a request whose client left (cancelled) is not counted.
        response = await handler(request)
        self.observe_batch(route, response.status, time.perf_counter() - started)
        return response

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _StateCollector(Collector):
    """What the service holds right now, read at scrape time."""

    def __init__(self, metrics: ServiceMetrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        m = self.metrics
        sessions = list(m.sessions.sessions.values())

        active = GaugeMetricFamily(
            f"{NAMESPACE}_sessions",
            "Live sessions, by pipeline and state",
            labels=["pipeline", "state"],
        )
        by_state = collections.Counter((s.pipeline_cls.name, s.current_state()) for s in sessions)
        for (pipeline, state), count in sorted(by_state.items()):
            active.add_metric([pipeline, state], count)
        yield active

        fps_in = GaugeMetricFamily(
            f"{NAMESPACE}_input_fps",
            "Input frame rate, summed over live sessions",
            labels=["pipeline"],
        )
        fps_out = GaugeMetricFamily(
            f"{NAMESPACE}_output_fps",
            "Output frame rate, summed over live sessions",
            labels=["pipeline"],
        )
        rates: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0])
        for session in sessions:
            got_in, got_out = session.stats.fps()
            rate = rates[session.pipeline_cls.name]
            rate[0] += got_in
            rate[1] += got_out
        for pipeline, (got_in, got_out) in sorted(rates.items()):
            fps_in.add_metric([pipeline], got_in)
            fps_out.add_metric([pipeline], got_out)
        yield fps_in
        yield fps_out

        frames = {
            name: CounterMetricFamily(f"{NAMESPACE}_{name}", help_text, labels=["pipeline"])
            for name, help_text in (
                ("frames_in", "Video frames decoded from session inputs"),
                ("frames_out", "Processed frames sessions sent to their outputs"),
                ("frames_dropped", "Frames dropped before the pipeline or at the output"),
            )
        }
        for pipeline, totals in sorted(m.frame_totals().items()):
            for name, family in frames.items():
                family.add_metric([pipeline], getattr(totals, name))
        yield from frames.values()

        yield from _device_families(m)

        yield GaugeMetricFamily(
            f"{NAMESPACE}_trickle_channels", "Trickle channels open", value=len(m.trickle.channels)
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_trickle_received_bytes",
            "Segment bytes trickle publishers wrote over HTTP",
            value=m.trickle.bytes_in,
        )
        yield CounterMetricFamily(
            f"{NAMESPACE}_trickle_sent_bytes",
            "Segment bytes sent to trickle subscribers over HTTP",
            value=m.trickle.bytes_out,
        )

        peers = GaugeMetricFamily(
            f"{NAMESPACE}_webrtc_peers", "WebRTC peers connected, by kind", labels=["kind"]
        )
        by_kind = collections.Counter(p.kind for p in m.sessions.peers.peers.values())
        for kind in ("whip", "whep"):
            peers.add_metric([kind], by_kind.get(kind, 0))
        yield peers


async def get_metrics(request: web.Request) -> web.Response:
    require_bearer(request, request.app[SETTINGS].auth_token)
    body = request.app[METRICS].render()
    response = web.Response(body=body)
    # Set whole: prometheus's type carries a version parameter aiohttp's content_type refuses.
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


def add_metrics_route(app: web.Application) -> None:
    app.router.add_get("/metrics", get_metrics)


def _device_families(m: ServiceMetrics) -> Iterator[Metric]:
    """Per device of `--devices` (once resolved: the first session or job does it): its
    models, its live sessions and what its inference worker ran."""
    load = GaugeMetricFamily(
        f"{NAMESPACE}_model_load_seconds",
        "How long each loaded model took to load",
        labels=["kind", "model_id", "device"],
    )
    size = GaugeMetricFamily(
        f"{NAMESPACE}_model_bytes",
        "Memory each loaded model takes",
        labels=["kind", "model_id", "device"],
    )
    sessions = GaugeMetricFamily(
        f"{NAMESPACE}_device_sessions", "Live sessions placed on each device", labels=["device"]
    )
    jobs = GaugeMetricFamily(
        f"{NAMESPACE}_device_batch_jobs",
        "Batch jobs running or waiting on each device's worker",
        labels=["device"],
    )
    live_items = CounterMetricFamily(
        f"{NAMESPACE}_device_live_items",
        "Live calls (frames, loads, param changes) each device's worker ran",
        labels=["device"],
    )
    batch_items = CounterMetricFamily(
        f"{NAMESPACE}_device_batch_items",
        "Batch jobs each device's worker ran",
        labels=["device"],
    )
    for device in m.runtime.known_devices():
        label = device.label
        for info in device.models.models():
            if info.state == "ready":
                names = [info.key.kind, info.key.model_id, label]
                load.add_metric(names, info.load_seconds)
                size.add_metric(names, info.size_bytes)
        sessions.add_metric([label], len(device.sessions))
        jobs.add_metric([label], device.jobs)
        live_done, batch_done = items_done(device)
        live_items.add_metric([label], live_done)
        batch_items.add_metric([label], batch_done)
    yield from (load, size, sessions, jobs, live_items, batch_items)
