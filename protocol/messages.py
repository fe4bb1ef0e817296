"""Messages of the control and events channels, in Livepeer's shapes (protocol/trickle.md §3.5-3.6).

Each event travels as one trickle segment: `{"event": {...}, "queue_event_type": "..."}`.
Timestamps are integer milliseconds since the epoch, except `time`/`restart_time` (float seconds),
as ai-runner writes them.
"""

from __future__ import annotations

import json
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from .bounded_json import loads

KEEPALIVE = {"keep": "alive"}

State = Literal["LOADING", "OFFLINE", "ONLINE", "DEGRADED_INPUT", "DEGRADED_INFERENCE", "ERROR"]


def now_ms() -> int:
    return int(time.time() * 1000)


class InputStatus(BaseModel):
    last_input_time: int | None = None
    fps: float = 0.0


class InferenceStatus(BaseModel):
    last_output_time: int | None = None
    fps: float = 0.0
    last_params_update_time: int | None = None
    last_params: dict[str, Any] | None = None
    last_params_hash: str | None = None
    last_error_time: int | None = None
    last_error: str | None = None
    last_restart_time: int | None = None
    last_restart_logs: list[str] | None = None
    restart_count: int = 0


class LatencyStatus(BaseModel):
    """Ours, beyond Livepeer's shape: ingest-to-output delay of recent frames."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    frames: int = 0


class StagePercentiles(BaseModel):
    """Ours: time one stage of the frame loop took, over recent frames."""

    p50_ms: float | None = None
    p95_ms: float | None = None
    frames: int = 0


class SinkStatus(BaseModel):
    """Ours: one receiver of the session's output, what it sent and what it had to drop."""

    name: str
    sent: int = 0
    dropped: int = 0


class PublishHint(BaseModel):
    """Ours: what the publisher may send without the service dropping frames: the input rate the
    pipeline sustains (1 / its median inference time) and its output size."""

    max_fps: float
    width: int | None = None
    height: int | None = None


class StatusEvent(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["status"] = "status"
    pipeline: str
    start_time: int
    state: State
    last_state_update_time: int
    input_status: InputStatus
    inference_status: InferenceStatus
    latency: LatencyStatus = Field(default_factory=LatencyStatus)
    frames_in: int = 0
    frames_out: int = 0
    frames_dropped: int = 0
    stages: dict[str, StagePercentiles] = Field(default_factory=dict)
    """Ours: decode, pace, slot, inference, encode, egress."""
    sinks: list[SinkStatus] = Field(default_factory=list)
    end_reason: str | None = None
    """Ours: set in the final status of a session, why it ended."""
    hint: PublishHint | None = None
    """Ours: set once inference times are measured; a client may send at most this."""
    last_status_timestamp: int | None = None
    timestamp: int = Field(default_factory=now_ms)


class ErrorEvent(BaseModel):
    type: Literal["error"] = "error"
    pipeline: str
    message: str
    time: float = Field(default_factory=time.time)
    timestamp: int = Field(default_factory=now_ms)


class RestartEvent(BaseModel):
    type: Literal["restart"] = "restart"
    pipeline: str
    restart_count: int
    restart_time: float = Field(default_factory=time.time)
    restart_logs: list[str] = Field(default_factory=list)
    timestamp: int = Field(default_factory=now_ms)


TraceType = Literal[
    "runner_receive_stream_request",
    "runner_receive_first_ingest_segment",
    "runner_send_first_processed_segment",
]


class TraceEvent(BaseModel):
    type: TraceType
    timestamp: int = Field(default_factory=now_ms)


Event = StatusEvent | ErrorEvent | RestartEvent | TraceEvent


def encode_event(event: Event) -> bytes:
    """One events-channel segment."""
    queue = "stream_trace" if isinstance(event, TraceEvent) else "ai_stream_events"
    return json.dumps(
        {"event": event.model_dump(mode="json"), "queue_event_type": queue},
        separators=(",", ":"),
    ).encode()


CONTROL_MAX_BYTES = 1024 * 1024
"""The largest control message read (a full StreamDiffusion parameter set is about 2 KiB)."""


def decode_control(data: bytes) -> dict[str, Any] | None:
    """A control segment as a parameter dict; None for a keepalive. Raises ValueError (in
    words) for anything that is not a JSON object within the bounded reader's size and depth."""
    message = loads(data, limit=CONTROL_MAX_BYTES, what="the control message")
    if not isinstance(message, dict):
        raise ValueError("a control message must be a JSON object")
    if message == KEEPALIVE:
        return None
    return message
