"""`noop`: frames pass through unchanged; the reference for the service's own overhead."""

from __future__ import annotations

import numpy as np

from .base import LivePipeline


class NoopPipeline(LivePipeline):
    name = "noop"
    description = "passes frames through unchanged"

    def process(self, image: np.ndarray) -> np.ndarray:
        return image
