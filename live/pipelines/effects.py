"""`cartoon`: a CPU-cheap stylised look (flat colour bands and inked edges) that makes a processed
stream obvious on a machine without a GPU or model weights."""

from __future__ import annotations

import numpy as np
from pydantic import Field

from .base import LivePipeline, PipelineContext, PipelineParams


class CartoonParams(PipelineParams):
    strength: float = Field(1.0, ge=0.0, le=1.0, description="0: the input, 1: the full effect")
    edge_threshold: float = Field(
        24.0, ge=0.0, le=255.0, description="gradient above which a pixel is inked"
    )
    levels: int = Field(
        6, ge=2, le=32, description="colour bands per channel (rebuilds the palette: reload)"
    )


class CartoonPipeline(LivePipeline):
    name = "cartoon"
    description = "flat colour bands with inked edges; strength and edges apply live"
    Params = CartoonParams
    live_params = frozenset({"strength", "edge_threshold"})

    def __init__(self, params: CartoonParams, context: PipelineContext | None = None) -> None:  # type: ignore[override]
        super().__init__(params, context)
        self.params: CartoonParams = params
        self._palette: np.ndarray | None = None

    def load(self) -> None:
        levels = self.params.levels
        step = 256 / levels
        values = np.arange(256, dtype=np.float32)
        # Each input value maps to the centre of its band: a 256-entry lookup table.
        self._palette = np.clip((values // step) * step + step / 2, 0, 255).astype(np.uint8)

    def process(self, image: np.ndarray) -> np.ndarray:
        if self._palette is None:
            self.load()
        assert self._palette is not None
        flat = np.take(self._palette, image)
        # Edges from the sum of the channels (3x the grey level), in integers, added plane by
        # plane: numpy's float mean over the last axis of an HxWx3 array was two thirds of the
        # effect's CPU at 640x480 (what a starved machine runs short of).
        total = image[..., 0].astype(np.int16)
        total += image[..., 1]
        total += image[..., 2]
        gradient = np.zeros_like(total)
        gradient[:, 1:] += np.abs(np.diff(total, axis=1))
        gradient[1:, :] += np.abs(np.diff(total, axis=0))
        flat[gradient > 3 * self.params.edge_threshold] = 0
        strength = self.params.strength
        if strength >= 1.0:
            return flat
        mixed = image.astype(np.float32) * (1 - strength) + flat.astype(np.float32) * strength
        return mixed.astype(np.uint8)

    def unload(self) -> None:
        self._palette = None
