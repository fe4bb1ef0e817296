"""Operations the worker-process tests run in the child: ones that work, and ones that hang,
abort, exit, raise or poison the device. Imported by path in the worker process."""

from __future__ import annotations

import itertools
import os
import signal
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from runtime.worker_errors import DevicePoisoned

_ticks = itertools.count()


def invert(frame: np.ndarray) -> np.ndarray:
    return 255 - frame


def crop(frame: np.ndarray, size: int) -> np.ndarray:
    return np.ascontiguousarray(frame[:size, :size])


def add(a: int, b: int = 0) -> int:
    return a + b


def tick(_tag: str) -> int:
    """The order calls ran in, in this worker process."""
    return next(_ticks)


def wait_for_file(path: str) -> str:
    """Hold the worker until the test creates `path`: a call the test knows is running."""
    while not Path(path).exists():
        time.sleep(0.005)
    return "released"


def sleep(seconds: float) -> float:
    time.sleep(seconds)
    return seconds


def hang() -> None:
    threading.Event().wait()


def hang_ignoring_sigterm() -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    threading.Event().wait()


def abort() -> None:
    os.abort()


def exit_with(code: int) -> None:
    sys.exit(code)


def fail(message: str) -> None:
    raise ValueError(message)


def poison() -> None:
    raise DevicePoisoned("the test says the device is gone")


def cuda_fault() -> None:
    raise RuntimeError("CUDA error: an illegal memory access was encountered")


def unpicklable() -> object:
    return lambda: None


def tokens(count: int) -> Iterator[str]:
    for i in range(count):
        yield f"t{i}"


def endless() -> Iterator[int]:
    yield from itertools.count()


def tokens_then_fail() -> Iterator[str]:
    yield "a"
    raise ValueError("the model ran out of words")


class Counter:
    def __init__(self, start: int) -> None:
        self.total = start

    def add(self, n: int) -> int:
        self.total += n
        return self.total


def frame_after_file(frame: np.ndarray, path: str) -> np.ndarray:
    wait_for_file(path)
    return frame


def only_here(module_name: str = "only_in_the_worker") -> object:
    """An object of a module that exists in the calling process alone (the worker's, or the
    service's when a test calls it there), which the other side cannot unpickle."""
    import types

    module = types.ModuleType(module_name)

    class Thing:
        pass

    Thing.__module__, Thing.__qualname__ = module.__name__, "Thing"
    module.Thing = Thing  # type: ignore[attr-defined]
    sys.modules[module.__name__] = module
    return Thing()


def steps_until_file(path: str) -> int:
    """A batch job's steps, letting waiting live calls in between them, until `path` exists:
    how many live calls ran inside it."""
    from runtime.worker_child import yield_to_live

    ran = 0
    while not Path(path).exists():
        time.sleep(0.005)  # one step of work
        ran += yield_to_live()
    return ran


_loads = threading.Lock()
_loads_started = 0
_loads_running = 0


def load_until_file(path: str) -> int:
    """A load for the loader lane, held until `path` exists: how many such loads were running
    at once when it started, itself included."""
    global _loads_started, _loads_running
    with _loads:
        _loads_started += 1
        _loads_running += 1
        running = _loads_running
    try:
        wait_for_file(path)
    finally:
        with _loads:
            _loads_running -= 1
    return running


def loads_started() -> int:
    return _loads_started


class HeldLoad:
    """An object whose making is a load held until `path` exists (as a pipeline's is)."""

    def __init__(self, path: str) -> None:
        self.thread = threading.current_thread().name
        wait_for_file(path)

    def made_on(self) -> str:
        return self.thread


def threads_of_a_load() -> tuple[str, str]:
    """The thread a load runs on, and the one its `on_main` part runs on."""
    from runtime.worker_child import on_main

    return threading.current_thread().name, on_main(lambda: threading.current_thread().name)


def fail_on_main() -> None:
    from runtime.worker_child import on_main

    on_main(lambda: fail("the warm-up failed"))


def payload(size: int) -> bytes:
    """A result large enough to take many writes to the pipe."""
    return bytes(range(256)) * (size // 256)


def kept_objects() -> tuple[int, int]:
    """The objects this worker process keeps for the service, and how many of them are batch
    models that still hold their weights."""
    from batch.hosted import HostedModel
    from runtime import worker_child

    child = worker_child._current
    assert child is not None
    kept = list(child._objects.values())
    holding = sum(isinstance(o, HostedModel) and o.value is not None for o in kept)
    return len(kept), holding
