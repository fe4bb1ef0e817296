"""Public API schemas, field for field as Livepeer's runner OpenAPI spec (shared/seeds)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

URL_MAX_CHARS = 2048
"""Characters of a URL a start request names."""
NAME_MAX_CHARS = 256
"""Characters of a pipeline name or an id a gateway passes for its logs."""
PARAMS_MAX_ENTRIES = 100
"""Fields of a start request's `params` (StreamDiffusion has about 40)."""


class LiveVideoToVideoParams(BaseModel):
    """Body of `POST /live-video-to-video`.

    The spec requires `subscribe_url` and `publish_url`; here both may be left out together,
    which asks the service to host the channels itself (standalone mode).
    """

    # A newer gateway may send fields we do not know yet: ignore them rather than fail.
    model_config = ConfigDict(extra="ignore")

    subscribe_url: str = Field(
        "",
        max_length=URL_MAX_CHARS,
        description="Source URL of the incoming stream to subscribe to.",
    )
    publish_url: str = Field(
        "",
        max_length=URL_MAX_CHARS,
        description="Destination URL of the outgoing stream to publish.",
    )
    control_url: str = Field(
        "", max_length=URL_MAX_CHARS, description="Trickle URL of the control channel."
    )
    events_url: str = Field(
        "", max_length=URL_MAX_CHARS, description="Trickle URL of the events channel."
    )
    model_id: str = Field(
        "",
        max_length=NAME_MAX_CHARS,
        description="Name of the live pipeline (not a Hugging Face id).",
    )
    params: dict[str, Any] = Field(
        default_factory=dict,
        max_length=PARAMS_MAX_ENTRIES,
        description="Initial pipeline params.",
    )
    gateway_request_id: str = Field(
        "", max_length=NAME_MAX_CHARS, description="The ID of the Gateway request (logging)."
    )
    manifest_id: str = Field(
        "",
        max_length=NAME_MAX_CHARS,
        description="The manifest ID from the orchestrator (logging).",
    )
    stream_id: str = Field("", max_length=NAME_MAX_CHARS, description="The Stream ID (logging).")
    # Ours, beyond the spec: ask for this session to be recorded (the operator's --record-dir).
    record: bool = Field(False, description="Record this session (needs --record-dir).")


class LiveVideoToVideoResponse(BaseModel):
    """Answer of `POST /live-video-to-video`, URLs from the caller's point of view: publish its
    video to `publish_url`, read the result from `subscribe_url`.

    Standalone, each URL is a capability for exactly what its description says, held by
    whoever has it (no token); none reveals another. Hand each to whoever needs that one."""

    subscribe_url: str = Field(
        description="Read the output (trickle GET). Standalone: the capability to watch, the "
        "same as `whep_url`; it grants nothing else."
    )
    publish_url: str = Field(
        description="Publish the input (trickle POST). Standalone: the capability to publish, "
        "the same as `whip_url`; it cannot read the output, control or events."
    )
    control_url: str = Field(
        "", description="Send params changes (trickle POST of JSON). Grants nothing else."
    )
    events_url: str = Field(
        "", description="Read the session's events (trickle GET of JSON). Grants nothing else."
    )
    request_id: str = ""
    manifest_id: str = ""
    # Ours, beyond the spec: the session id for the status/params/stop routes, and (standalone)
    # the WebRTC endpoints and the page's event stream, each a capability like the URLs above.
    session_id: str = Field(
        "",
        description="The session's id for the token-guarded routes (status, params, stop, "
        "WHIP, WHEP under /live-video-to-video/{id}/); without the token it grants nothing.",
    )
    whip_url: str = Field(
        "",
        description="Publish the input over WebRTC (WHIP POST of an SDP offer): the same "
        "capability as `publish_url`. Its answer carries no WHEP link: watching takes "
        "`whep_url`.",
    )
    whep_url: str = Field(
        "",
        description="Watch the output over WebRTC (WHEP POST of an SDP offer): the same "
        "capability as `subscribe_url`.",
    )
    events_stream_url: str = Field(
        "",
        description="Read the session's events as Server-Sent Events: the same capability "
        "as `events_url`.",
    )


class Version(BaseModel):
    pipeline: str
    model_id: str
    version: str = Field(description="The version of the Runner")


class GPUComputeInfo(BaseModel):
    """One GPU's identity and memory (bytes), as the runner's spec has it."""

    id: str
    name: str
    memory_total: int
    memory_free: int
    major: int
    minor: int


class GPUUtilizationInfo(BaseModel):
    id: str
    name: str
    memory_total: int
    memory_free: int
    utilization_compute: int
    utilization_memory: int


class HardwareInformation(BaseModel):
    pipeline: str
    model_id: str
    gpu_info: dict[str, GPUComputeInfo]


class DeviceCapacity(BaseModel):
    """Ours: one device of `--devices` (one inference worker) and what runs on it."""

    device: str = Field(description="cuda:0, cuda:1, cpu, or cpu:0, cpu:1 for repeated CPUs")
    sessions: int = Field(description="Live sessions placed on this device.")
    batch_jobs: int = Field(description="Batch jobs running or waiting on its worker.")
    models: list[str] = Field(description="Model ids loaded or loading on this device.")
    model_memory_budget_bytes: int | None
    model_memory_left_bytes: int | None
    streams_left: dict[str, int] = Field(default_factory=dict)
    live_items_done: int = Field(description="Live calls (frames, loads) its worker ran.")
    batch_items_done: int = Field(description="Batch jobs its worker ran.")


class Capacity(BaseModel):
    """Ours, beyond the spec: what the service can still take (see live/admission.py)."""

    sessions_max: int
    sessions_left: int
    model_memory_budget_bytes: int | None = Field(
        description="Memory cached models may take; null: unbounded (CPU without a budget)."
    )
    model_memory_left_bytes: int | None = Field(
        description="The budget less the models in use or loading; null: unbounded."
    )
    streams_left: dict[str, int] = Field(
        default_factory=dict,
        description="Per device-bound pipeline with measured inference times: about how many "
        "more streams the devices sustain, at the running streams' input rate.",
    )
    devices: list[DeviceCapacity] = Field(
        default_factory=list,
        description="Per device (once the first session or job has resolved them).",
    )


class HardwareStats(BaseModel):
    pipeline: str
    model_id: str
    gpu_stats: dict[str, GPUUtilizationInfo]
    capacity: Capacity | None = None
    """Ours, beyond the spec."""
