"""Operations every worker process offers, named by import path ("runtime.worker_ops:noop")."""

from __future__ import annotations

from typing import Any


def noop(frame: Any) -> Any:
    """The frame back, unchanged: what the boundary costs with nothing else on it."""
    return frame


def ping() -> int:
    """The worker's pid: a call with no frame, to see the worker serve."""
    import os

    return os.getpid()
