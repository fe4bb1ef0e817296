"""Live pipelines, by name. `builtin_pipelines()` is what the service offers by default."""

from __future__ import annotations

from .base import LivePipeline, PipelineParams
from .effects import CartoonPipeline
from .passthrough import NoopPipeline


def builtin_pipelines() -> dict[str, type[LivePipeline]]:
    return {cls.name: cls for cls in (NoopPipeline, CartoonPipeline)}


__all__ = ["LivePipeline", "PipelineParams", "builtin_pipelines"]
