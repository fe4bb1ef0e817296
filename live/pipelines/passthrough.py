"""`noop`: frames pass through unchanged; the reference for the service's own overhead."""

from __future__ import annotations

import numpy as np
from pydantic import ConfigDict

from .base import LivePipeline, PipelineParams


class NoopParams(PipelineParams):
    # As ai-runner's noop: any params are accepted, and those it has no use for are ignored
    # (the session logs which), so a gateway's full parameter set never errors here.
    model_config = ConfigDict(extra="ignore")


class NoopPipeline(LivePipeline):
    name = "noop"
    description = "passes frames through unchanged (params it has no use for are ignored)"
    Params = NoopParams
    passes_through = True

    def process(self, image: np.ndarray) -> np.ndarray:
        return image
