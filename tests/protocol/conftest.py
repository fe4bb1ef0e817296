"""Fixtures of the trickle server tests (conformance and hardening)."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest


@pytest.fixture
async def http(trickle_factory) -> AsyncIterator[aiohttp.ClientSession]:
    # Depends on the factory so that it is torn down before the servers it started are.
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def c(trickle) -> str:
    """URL of channel `c`, created in process with MIME video/MP2T."""
    trickle.server.create_channel("c", "video/MP2T")
    return trickle.url("c")
