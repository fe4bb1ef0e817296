"""The loading frame shown while a pipeline loads or reloads: the last output, grey and dimmed,
with a caption and a spinner, so viewers never see a frozen or broken stream."""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw


class LoadingFrames:
    """Renders loading frames at a fixed size; the dimmed background is computed once per
    change of the last real output."""

    def __init__(self, caption: str = "Loading pipeline...") -> None:
        self.caption = caption
        self._base: np.ndarray | None = None
        self._source_id = 0
        self._tick = 0

    def render(self, last_output: np.ndarray | None, size: tuple[int, int]) -> np.ndarray:
        width, height = size
        source_id = id(last_output) if last_output is not None else 0
        if (
            self._base is None
            or self._base.shape[:2] != (height, width)
            or (source_id != self._source_id)
        ):
            self._source_id = source_id
            if last_output is not None and last_output.shape[:2] == (height, width):
                grey = last_output.mean(axis=2, dtype=np.float32) * 0.35
            else:
                grey = np.full((height, width), 48, np.float32)
            self._base = np.repeat(grey.astype(np.uint8)[:, :, None], 3, axis=2)
        image = Image.fromarray(self._base)
        draw = ImageDraw.Draw(image)
        text_w = draw.textlength(self.caption)
        cx, cy = width / 2, height / 2
        draw.text((cx - text_w / 2, cy + 14), self.caption, fill=(235, 235, 235))
        # An eight-dot spinner whose bright dot advances one step per frame.
        self._tick += 1
        radius = max(4.0, min(width, height) / 20)
        for i in range(8):
            angle = 2 * math.pi * i / 8
            x, y = cx + radius * math.cos(angle), cy - 6 + radius * math.sin(angle)
            shade = 235 if i == self._tick % 8 else 110
            draw.ellipse((x - 2, y - 2, x + 2, y + 2), fill=(shade, shade, shade))
        return np.asarray(image)
