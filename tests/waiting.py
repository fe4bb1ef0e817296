"""Waiting on a condition, never on a set time: the shared helpers tests poll with when the code
under test offers no event to await. The limit is generous (only a hung test reaches it); the
poll interval only bounds how soon a met condition is noticed."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import pytest

WAIT_S = 10.0
"""Upper bound for a condition that is expected to hold promptly."""
POLL_S = 0.01
"""How often a condition without an event to await is checked again."""


async def poll_until(
    condition: Callable[[], bool | Awaitable[bool]],
    *,
    within: float = WAIT_S,
    poll: float = POLL_S,
) -> bool:
    """True as soon as `condition()` (plain or async) holds; False after `within` seconds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + within
    while True:
        result = condition()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(poll)


async def wait_until(
    condition: Callable[[], bool | Awaitable[bool]],
    what: str,
    *,
    within: float = WAIT_S,
    poll: float = POLL_S,
) -> None:
    """Return as soon as `condition()` (plain or async) holds; fail the test after `within` s."""
    if not await poll_until(condition, within=within, poll=poll):
        pytest.fail(f"timed out after {within}s waiting for {what}")


def poll_until_blocking(condition: Callable[[], bool], *, within: float = WAIT_S) -> bool:
    """`poll_until` for plain (not async) tests of thread-based code: True as soon as
    `condition()` holds, False after `within` seconds."""
    import time

    deadline = time.monotonic() + within
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(POLL_S)
    return True
