"""What the batch routes take from the service's settings."""

from __future__ import annotations

from pydantic import BaseModel, Field


class BatchConfig(BaseModel):
    auth_token: str | None = None
    max_upload_bytes: int = Field(50 * 2**20, gt=0)
    max_jobs: int = Field(8, ge=1)
    """Jobs running or waiting at once; beyond, 503 with Retry-After."""
    warm: list[str] = Field(default_factory=list)
    """Routes (`text-to-image` or `text-to-image=MODEL_ID`) whose models load at start."""
    retry_after_s: float = 5.0
    """Retry-After given while a model loads, before it has a load time of its own."""
    load_wait_s: float = Field(120.0, ge=0)
    """How long a request waits for its model to load before a 503 with Retry-After."""
    public_url: str | None = None
    """Base URL clients reach the service at (the video URLs of the gateway's answers)."""
    video_store_bytes: int = Field(256 * 2**20, gt=0)
    """Memory the videos of gateway answers may take, oldest dropped beyond."""
    video_ttl_s: float = Field(600.0, gt=0)
    """How long a video of a gateway answer stays fetchable."""
