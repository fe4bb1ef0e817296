"""Blocking work off the event loop, on a given thread, keeping the caller's log context."""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable
from concurrent.futures import Executor
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")


async def run_in(pool: Executor, fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args)` on `pool`; unlike `run_in_executor` it carries the context variables over,
    so log lines written on the thread still name their session."""
    context = contextvars.copy_context()
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(pool, lambda: context.run(fn, *args, **kwargs))
