"""The live service under test: the real app, with test pipelines beside the built-in ones."""

from __future__ import annotations

import time

import numpy as np
import pytest

from live.app import create_app
from live.pipelines import builtin_pipelines
from live.pipelines.effects import CartoonPipeline
from live.pipelines.passthrough import NoopPipeline
from live.settings import Settings
from protocol.clips import read_index

SLOW_FRAME_S = 5 / 30  # five times slower than a 30 fps camera
SLOW_LOAD_S = 0.6


class SlowPipeline(NoopPipeline):
    name = "slow"

    def process(self, image: np.ndarray) -> np.ndarray:
        time.sleep(SLOW_FRAME_S)  # a model's compute time, not a wait for an event
        return image


class IdentityPipeline(NoopPipeline):
    """Returns each frame as it came, having had it as RGB: unlike `noop`, it needs the image."""

    name = "identity"

    def process(self, image: np.ndarray) -> np.ndarray:
        return image


class SlowLoadingCartoon(CartoonPipeline):
    name = "slow-cartoon"

    def load(self) -> None:
        time.sleep(SLOW_LOAD_S)
        super().load()


class FlakyPipeline(NoopPipeline):
    """Fails on frames whose painted index is in `bad`."""

    name = "flaky"

    def process(self, image: np.ndarray) -> np.ndarray:
        if read_index(image) in range(10, 14):
            raise RuntimeError("boom")
        return image


class OutOfMemoryOnce(NoopPipeline):
    """Runs out of memory on frame 10 of its first load only, as a GPU pipeline can."""

    name = "oom-once"
    loads = 0

    def load(self) -> None:
        type(self).loads += 1
        self.load_number = type(self).loads

    def process(self, image: np.ndarray) -> np.ndarray:
        if self.load_number == 1 and read_index(image) == 10:
            raise MemoryError("CUDA out of memory (simulated)")
        return image


FRAME_S = 1 / 30

PIPELINES = {
    **builtin_pipelines(),
    **{
        cls.name: cls
        for cls in (
            SlowPipeline,
            SlowLoadingCartoon,
            FlakyPipeline,
            OutOfMemoryOnce,
            IdentityPipeline,
        )
    },
}


@pytest.fixture
async def service(aiohttp_client):
    async def start(**overrides):
        settings = Settings(status_interval_s=0.5, **overrides)
        client = await aiohttp_client(create_app(settings, PIPELINES))
        return client

    return start
