"""One stats object per session: counters and per-stage timings of the frame loop.

Writers are the frame loop's stages (each on the event loop); readers are status events, the
GET route and Prometheus (live/metrics.py, which also observes each timing). Reading changes
nothing: fps come from timestamps of recent frames, percentiles from bounded windows, so two
readers at once see the same figures.
"""

from __future__ import annotations

import collections
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from protocol.messages import PublishHint, SinkStatus, StagePercentiles

WINDOW = 300  # frames kept per timing window: 10 s at 30 fps
FPS_WINDOW_S = 2.0

STAGES = ("decode", "pace", "slot", "inference", "encode", "egress")
"""decode: bytes to a frame and its RGB image (none for a pipeline that passes frames through;
WHIP: from the frame's last RTP packet); pace: held until the frame's presentation time; slot:
waiting for the pipeline; inference: the pipeline; encode: the frame to bytes (the trickle
output, only while it has a reader); egress: handing the bytes on."""

WEBRTC_STAGES = ("receive", "whep_encode", "whep_send", "whep_delay")
"""receive: a WHIP frame's first RTP packet to its last (the publisher's pacing); whep_encode:
the WHEP encoder, shared by the session's viewers; whep_send: encoded to its RTP packets handed
to the socket; whep_delay: the input frame's last RTP packet to the output's, the service's
whole share of a WHIP-to-WHEP trip."""

ALL_STAGES = STAGES + WEBRTC_STAGES


def percentiles(values: collections.deque[float] | list[float]) -> StagePercentiles:
    ordered = sorted(values)
    if not ordered:
        return StagePercentiles()
    return StagePercentiles(
        p50_ms=round(ordered[len(ordered) // 2] * 1000, 2),
        p95_ms=round(ordered[min(len(ordered) - 1, int(len(ordered) * 0.95))] * 1000, 2),
        frames=len(ordered),
    )


class StatsObserver(Protocol):
    """Sees each timing as it is taken (Prometheus histograms); called on the writer's thread,
    so it must be cheap and thread-safe."""

    def stage(self, name: str, seconds: float) -> None: ...

    def delay(self, seconds: float) -> None: ...


@dataclass
class SinkStats:
    name: str
    sent: int = 0
    dropped: int = 0


@dataclass
class SessionStats:
    frames_in: int = 0
    """Video frames decoded from the input."""
    frames_out: int = 0
    """Processed frames the primary output actually sent (while nobody receives it, the other
    sinks': `FrameLoop.counts_out`)."""
    input_dropped: int = 0
    """Frames dropped before the pipeline: it was busy when a newer one came."""
    last_input_time: int | None = None  # ms since the epoch, as Livepeer's status has them
    last_output_time: int | None = None
    stages: dict[str, collections.deque[float]] = field(
        default_factory=lambda: {name: collections.deque(maxlen=WINDOW) for name in ALL_STAGES}
    )
    latencies: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW)
    )
    """Ingest-to-output delay of recent frames (seconds): last input byte to sent."""
    sinks: dict[str, SinkStats] = field(default_factory=dict)
    primary: str | None = None
    """The sink whose deliveries are `frames_out` (the session's own output)."""
    observer: StatsObserver | None = None
    """Sees every stage timing and ingest-to-output delay (the windows above keep only recent
    ones)."""
    on_frame: Callable[[], None] | None = None
    """Called after each frame in and out (on the event loop): the session checks there
    whether its state changed. Must be cheap."""
    _in_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW)
    )
    _out_times: collections.deque[float] = field(
        default_factory=lambda: collections.deque(maxlen=WINDOW)
    )

    def frame_in(self) -> None:
        self.frames_in += 1
        self.last_input_time = _now_ms()
        self._in_times.append(time.monotonic())
        if self.on_frame is not None:
            self.on_frame()

    def frame_out(self, arrived: float) -> None:
        now = time.monotonic()
        self.frames_out += 1
        self.last_output_time = _now_ms()
        self._out_times.append(now)
        self.latencies.append(now - arrived)
        if self.observer is not None:
            self.observer.delay(now - arrived)
        if self.on_frame is not None:
            self.on_frame()

    def stage(self, name: str, seconds: float) -> None:
        self.stages[name].append(seconds)
        if self.observer is not None:
            self.observer.stage(name, seconds)

    def sink(self, name: str) -> SinkStats:
        found = self.sinks.get(name)
        if found is None:
            found = self.sinks[name] = SinkStats(name)
        return found

    @property
    def frames_dropped(self) -> int:
        """Dropped before the pipeline, plus what the primary output could not take."""
        primary = self.sinks.get(self.primary) if self.primary else None
        return self.input_dropped + (primary.dropped if primary else 0)

    def fps(self) -> tuple[float, float]:
        now = time.monotonic()
        return _rate(self._in_times, now), _rate(self._out_times, now)

    def stage_percentiles(self) -> dict[str, StagePercentiles]:
        return {name: percentiles(values) for name, values in self.stages.items() if values}

    def inference_p50_s(self, min_frames: int = 1) -> float | None:
        """Median inference time of recent frames (seconds), once `min_frames` were measured."""
        values = sorted(self.stages["inference"])
        if len(values) < min_frames or not values:
            return None
        return values[len(values) // 2]

    def hint(self, size: tuple[int, int] | None) -> PublishHint | None:
        """What a publisher may send: the rate inference sustains, at the output size."""
        p50 = self.inference_p50_s()
        if p50 is None:
            return None
        width, height = size or (None, None)
        return PublishHint(max_fps=round(1 / max(p50, 1e-3), 2), width=width, height=height)

    def sink_status(self) -> list[SinkStatus]:
        return [
            SinkStatus(name=s.name, sent=s.sent, dropped=s.dropped) for s in self.sinks.values()
        ]


def _rate(times: collections.deque[float], now: float) -> float:
    recent = [t for t in times if now - t <= FPS_WINDOW_S]
    if len(recent) < 2:
        return 0.0
    # Frames per second over the window, counting the gap up to now so a stalled stream decays.
    return round((len(recent) - 1) / max(now - recent[0], recent[-1] - recent[0], 1e-3), 2)


def _now_ms() -> int:
    return int(time.time() * 1000)
