"""Service settings: one pydantic model, filled from CLI flags and environment variables.

Every field is a flag (`--max-sessions`) and a variable (`LIVE_V2V_MAX_SESSIONS`); the auth token is
also read from `AUTH_TOKEN`, the name ai-runner uses. Flags win over variables, variables over
defaults.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from batch.config import BatchConfig
from protocol.trickle import TrickleConfig
from runtime.device import device_list
from runtime.runtime import RuntimeConfig

from .cors import CorsPolicy
from .http_server import ConnectionLimits
from .ice import IceSettings

ENV_PREFIX = "LIVE_V2V_"
ENV_ALIASES = {"auth_token": "AUTH_TOKEN"}


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    host: str = Field("127.0.0.1", description="address to listen on")
    port: int = Field(8000, ge=0, le=65535, description="port to listen on (0: any free port)")
    public_url: str | None = Field(
        None, description="base URL clients reach the service at (default: from each request)"
    )
    auth_token: str | None = Field(
        None, description="bearer token required on API routes (env AUTH_TOKEN)"
    )
    cors_origins: str = Field(
        "*",
        description="origins whose pages may call the service from a browser (CORS): * for "
        "any, or comma-separated scheme://host[:port]; empty: none (no CORS headers)",
    )
    models_dir: Path = Field(Path("models"), description="directory holding local models")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field(
        "INFO", description="DEBUG, INFO, WARNING or ERROR"
    )
    log_format: Literal["text", "json"] = Field(
        "text", description="text (for people) or json (one object per line, for collectors)"
    )
    default_pipeline: str = Field(
        "auto",
        description="live pipeline used when a request names none "
        "(auto: streamdiffusion when its model and a GPU are there, else cartoon)",
    )
    device: str = Field(
        "auto",
        pattern=r"^(auto|cpu|mps|cuda(:\d+)?)$",
        description="auto, cpu, cuda, cuda:N or mps: the one-device form of --devices",
    )
    devices: str = Field(
        "",
        max_length=1000,
        description="devices to run models on, one inference worker each, comma-separated "
        "(cuda:0,cuda:1; cpu may repeat: cpu,cpu); empty: --device, whose auto is every "
        "visible CUDA GPU, else the CPU",
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="auto (fp16 on GPU, fp32 on CPU), float16, bfloat16, float32"
    )
    compile: bool = Field(False, description="torch.compile the UNet and decoder on GPU")
    worker_process: bool = Field(
        True,
        description="run live sessions' pipelines in each device's supervised worker process "
        "(restarted on a crash or hang; batch jobs still run in the service's process); "
        "--no-worker-process runs them on threads of the service's own process",
    )
    model_memory_gb: float | None = Field(
        None,
        gt=0,
        description="memory the loaded models may take, least recently used evicted beyond "
        "(default: 80 percent of the GPU; unbounded on the CPU)",
    )
    warm: str = Field(
        "",
        description="models to load at start, comma-separated batch routes, each optionally "
        "=MODEL_ID (text-to-image,upscale=stabilityai/stable-diffusion-x4-upscaler)",
    )
    max_upload_mb: float = Field(50, gt=0, description="largest upload a batch route accepts")
    batch_queue: int = Field(
        8, ge=1, description="batch jobs running or waiting at once (503 with Retry-After beyond)"
    )
    load_wait_s: float = Field(
        120,
        ge=0,
        description="how long a batch request waits for its model to load "
        "(503 with Retry-After beyond; 0: answer at once)",
    )
    video_store_mb: float = Field(
        256,
        gt=0,
        description="memory for the videos of gateway-shaped image-to-video answers "
        "(oldest dropped beyond)",
    )
    video_ttl_s: float = Field(
        600, gt=0, description="how long a video URL of a gateway-shaped answer can be fetched"
    )
    max_sessions: int = Field(4, ge=1, description="live sessions at once (503 beyond)")
    max_connections: int = Field(
        512,
        ge=1,
        description="HTTP connections open at once; past it a new one replaces the longest "
        "idle, or gets 503 when all have a request in flight (lowered to leave 256 files "
        "under the open-files limit)",
    )
    http_header_timeout_s: float = Field(
        10.0,
        gt=0,
        description="a request's line and headers must arrive within this (408 and closed)",
    )
    http_idle_timeout_s: float = Field(
        120.0, gt=0, description="a connection with no request in flight is closed after this"
    )
    http_body_timeout_s: float = Field(
        60.0,
        gt=0,
        description="a request body that sends no byte for this long is cut (connection "
        "closed); trickle publishers pause at most a segment",
    )
    input_timeout_s: float = Field(
        60.0, gt=0, description="a session ends after this long without input"
    )
    status_interval_s: float = Field(10.0, gt=0, description="period of status events")
    frame_timeout_s: float = Field(
        30.0, gt=0, description="a pipeline taking longer on one frame is hung: its session ends"
    )
    segment_s: float = Field(1.0, gt=0, le=10, description="output segment (GOP) length")
    runner_hosts: str = Field(
        "",
        description="runner mode: the trickle hosts (HOST or HOST:PORT, comma-separated, or *) "
        "whose URLs a start request may name; empty: runner mode off, only standalone sessions",
    )
    runner_tls_verify: bool = Field(
        True,
        description="runner mode: verify the TLS certificates of https:// trickle URLs "
        "(--no-runner-tls-verify accepts any certificate, as go-livepeer does, for "
        "orchestrators with self-signed ones)",
    )
    max_viewers: int = Field(4, ge=1, description="WHEP viewers per session (429 beyond)")
    webrtc_max_candidates: int = Field(
        32,
        ge=1,
        le=1000,
        description="ICE candidates a WHIP or WHEP client may trickle per connection "
        "(PATCH; 400 beyond)",
    )
    webrtc_connect_timeout_s: float = Field(
        20.0,
        gt=0,
        le=600,
        description="a WHIP or WHEP connection not connected this long after its answer is "
        "closed (its place under --max-viewers and its UDP ports freed)",
    )
    ice_servers: str = Field(
        "",
        description="STUN/TURN URLs for WebRTC, comma-separated (none: host candidates only, "
        "no outside server contacted)",
    )
    turn_username: str | None = Field(None, description="username for the turn: servers")
    turn_credential: str | None = Field(None, description="credential for the turn: servers")
    ice_host_addresses: str = Field(
        "",
        description="gather WebRTC host candidates on these addresses only, comma-separated "
        "(127.0.0.1 for a loopback-only service; default: every interface but loopback)",
    )
    webrtc_udp_ports: str = Field(
        "",
        pattern=r"^(\d{1,5}-\d{1,5})?$",
        description="UDP ports WebRTC may use, LOW-HIGH (default: any the system gives)",
    )
    record_dir: Path | None = Field(
        None,
        description="record sessions (input, output, params changes) under DIR/<session id>/ "
        "for `live-v2v replay`; unset: recording off",
    )
    record_all: bool = Field(
        True,
        description="with --record-dir: record every session (--no-record-all: only those "
        'whose start request asks with "record": true)',
    )
    trickle_base_path: str = Field(
        "/trickle/", description="where the trickle server is mounted (/ai/trickle/ for Livepeer)"
    )
    trickle_autocreate: bool = Field(False, description="let POST {channel} create channels")
    trickle_max_channels: int = Field(1024, ge=1, description="trickle channels open at once")
    trickle_max_segment_bytes: int = Field(
        64 * 1024 * 1024, ge=1, description="largest trickle segment accepted"
    )
    trickle_max_channel_bytes: int = Field(
        64 * 1024 * 1024,
        ge=1,
        description="memory one trickle channel's segments may take: the oldest are dropped "
        "beyond, and a segment larger than this is refused (413)",
    )
    trickle_idle_timeout_s: float = Field(
        300.0, gt=0, description="idle trickle channels are removed after this"
    )
    trickle_sweep_interval_s: float = Field(60.0, gt=0, description="idle sweep period")
    trickle_linger_s: float = Field(
        5.0,
        ge=0,
        le=60,
        description="an ended session's output and events channels stay readable this long, "
        "so a reader a request behind still gets the last segment and the final status",
    )

    @field_validator("devices")
    @classmethod
    def _devices(cls, value: str, info: ValidationInfo) -> str:
        # Custom errors: the message alone, without pydantic's "Value error, " before it.
        if value.strip() and info.data.get("device", "auto") != "auto":
            raise PydanticCustomError(
                "devices", "give --device or --devices, not both (--devices cpu is --device cpu)"
            )
        try:
            device_list(value)
        except ValueError as exc:
            raise PydanticCustomError("devices", str(exc)) from None
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    def runtime(self) -> RuntimeConfig:
        budget = self.model_memory_gb
        return RuntimeConfig(
            models_dir=self.models_dir,
            device=self.device,
            devices=self.devices,
            dtype=self.dtype,
            compile=self.compile,
            worker_process=self.worker_process,
            memory_budget_bytes=None if budget is None else int(budget * 2**30),
        )

    def batch(self) -> BatchConfig:
        warm = [w.strip() for w in self.warm.split(",") if w.strip()]
        return BatchConfig(
            auth_token=self.auth_token,
            max_upload_bytes=int(self.max_upload_mb * 2**20),
            max_jobs=self.batch_queue,
            warm=warm,
            load_wait_s=self.load_wait_s,
            public_url=self.public_url,
            video_store_bytes=int(self.video_store_mb * 2**20),
            video_ttl_s=self.video_ttl_s,
        )

    def connection_limits(self) -> ConnectionLimits:
        return ConnectionLimits(
            header_timeout_s=self.http_header_timeout_s,
            idle_timeout_s=self.http_idle_timeout_s,
            body_timeout_s=self.http_body_timeout_s,
            max_connections=self.max_connections,
        )

    def cors(self) -> CorsPolicy:
        return CorsPolicy.parse(self.cors_origins)

    def ice(self) -> IceSettings:
        return IceSettings(
            servers=[u.strip() for u in self.ice_servers.split(",") if u.strip()],
            username=self.turn_username,
            credential=self.turn_credential,
        )

    def udp_port_range(self) -> tuple[int, int] | None:
        if not self.webrtc_udp_ports:
            return None
        low, high = (int(p) for p in self.webrtc_udp_ports.split("-"))
        if not 1 <= low <= high <= 65535:
            raise ValueError(f"--webrtc-udp-ports {self.webrtc_udp_ports}: need 1 <= LOW <= HIGH")
        return low, high

    def runner_host_set(self) -> set[str]:
        return {h.strip().lower() for h in self.runner_hosts.split(",") if h.strip()}

    def trickle(self) -> TrickleConfig:
        base = self.trickle_base_path
        if not base.startswith("/"):
            base = "/" + base
        if not base.endswith("/"):
            base += "/"
        return TrickleConfig(
            base_path=base,
            autocreate=self.trickle_autocreate,
            max_channels=self.trickle_max_channels,
            max_segment_bytes=self.trickle_max_segment_bytes,
            max_channel_bytes=self.trickle_max_channel_bytes,
            idle_timeout_s=self.trickle_idle_timeout_s,
            sweep_interval_s=self.trickle_sweep_interval_s,
            linger_s=self.trickle_linger_s,
        )


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _env_name(name: str) -> str:
    return ENV_ALIASES.get(name, ENV_PREFIX + name.upper())


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per Settings field, documented with its description, variable and default."""
    for name, field in Settings.model_fields.items():
        help_text = f"{field.description} [env {_env_name(name)}; default {field.default}]"
        if field.annotation is bool:
            parser.add_argument(
                _flag(name),
                dest=name,
                default=None,
                action=argparse.BooleanOptionalAction,
                help=help_text,
            )
        else:
            parser.add_argument(_flag(name), dest=name, default=None, help=help_text)


def load_settings(
    args: argparse.Namespace | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Settings from flags (parsed by `add_arguments`), then the environment, then defaults."""
    environ = os.environ if environ is None else environ
    values: dict[str, object] = {}
    for name in Settings.model_fields:
        env_value = environ.get(_env_name(name))
        if env_value is not None:
            values[name] = env_value
        flag_value = getattr(args, name, None) if args is not None else None
        if flag_value is not None:
            values[name] = flag_value
    return Settings.model_validate(values)


def parse_settings(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> Settings:
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    return load_settings(parser.parse_args(argv), environ)
