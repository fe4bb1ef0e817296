"""Live pipelines, by name. `builtin_pipelines()` is what the service offers by default."""

from __future__ import annotations

from .base import LivePipeline, PipelineContext, PipelineParams
from .diffusion import StreamDiffusionPipeline
from .effects import CartoonPipeline
from .passthrough import NoopPipeline


def builtin_pipelines() -> dict[str, type[LivePipeline]]:
    return {cls.name: cls for cls in (NoopPipeline, CartoonPipeline, StreamDiffusionPipeline)}


__all__ = ["LivePipeline", "PipelineContext", "PipelineParams", "builtin_pipelines"]
