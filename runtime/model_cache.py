"""Loaded models, shared by everyone who asks for the same one, within a memory budget.

A model is named by a `ModelKey`: what was built from the weights (`kind`: the live
pipeline's components, a batch route's diffusers pipeline), the model id, the device and the
dtype. Two live sessions of one model therefore hold one copy of its weights; each keeps only
its own per-stream state.

Users hold a `Lease` while they use a model. The least recently used model that nobody holds
is evicted when a load needs room; a model in use never is. Loading happens once per key: a
second caller waits for the first one's load (`acquire`), or is told it is under way
(`request`, which batch routes use to wait on the event loop, within a bound, rather than on a
thread: `StillLoading.done` resolves when the load ends).

Thread-safe: live pipelines load on their session's loader thread, batch routes from the event
loop through `request` and a loader thread owned here.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class ModelKey:
    kind: str
    model_id: str
    device: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.kind}:{self.model_id} on {self.device}/{self.dtype}"


class OverBudget(MemoryError):
    """A model does not fit the memory budget even after evicting every unused model."""


class StillLoading(Exception):
    """`request` found the model loading; try again later."""

    def __init__(self, key: ModelKey, retry_after_s: float, done: Future[None]) -> None:
        super().__init__(f"model {key.model_id} is loading; retry in {retry_after_s:.0f} s")
        self.key = key
        self.retry_after_s = retry_after_s
        self.done = done
        """Resolved when the load ends, well or not: a caller may wait on it, then ask again."""


@dataclass
class _Entry:
    key: ModelKey
    estimate: int
    loaded: threading.Event = field(default_factory=threading.Event)
    value: Any = None
    error: BaseException | None = None
    size: int = 0
    users: int = 0
    last_used: float = 0.0
    started: float = field(default_factory=time.monotonic)
    load_seconds: float = 0.0
    done: Future[None] = field(default_factory=Future)
    """Resolved (None) once `loaded` is set: what asyncio callers wait on without a thread."""


class Lease(Generic[T]):
    """A model in use. Release it (or leave its `with` block) when done; releasing twice is
    harmless."""

    def __init__(self, cache: ModelCache, entry: _Entry) -> None:
        self._cache = cache
        self._entry: _Entry | None = entry

    @property
    def value(self) -> T:
        assert self._entry is not None, "lease already released"
        return self._entry.value  # type: ignore[no-any-return]

    @property
    def key(self) -> ModelKey:
        assert self._entry is not None, "lease already released"
        return self._entry.key

    def release(self) -> None:
        entry, self._entry = self._entry, None
        if entry is not None:
            self._cache._release(entry)

    def __enter__(self) -> T:
        return self.value

    def __exit__(self, *exc: object) -> None:
        self.release()


@dataclass(frozen=True)
class ModelInfo:
    key: ModelKey
    state: str  # "loading" or "ready"
    size_bytes: int
    users: int
    load_seconds: float


def module_bytes(value: Any) -> int:
    """Bytes of the tensors a loaded model holds: the parameters and buffers of every torch
    module in it (a module, a diffusers pipeline's components, or a dict or object of them),
    each storage counted once. A model kept in a worker process says its own size
    (`model_bytes`): counting it here would import torch for nothing."""
    remote = getattr(value, "model_bytes", None)
    if isinstance(remote, int):
        return remote
    import torch

    seen: set[int] = set()
    total = 0

    def add(module: torch.nn.Module) -> None:
        nonlocal total
        for tensor in [*module.parameters(), *module.buffers()]:
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in seen:
                seen.add(storage.data_ptr())
                total += storage.nbytes()

    parts: list[Any] = [value]
    if hasattr(value, "components") and isinstance(value.components, dict):
        parts = list(value.components.values())
    elif isinstance(value, dict):
        parts = list(value.values())
    elif hasattr(value, "__dict__") and not isinstance(value, torch.nn.Module):
        parts = list(vars(value).values())
    for part in parts:
        if isinstance(part, torch.nn.Module):
            add(part)
    return total


class ModelCache:
    def __init__(
        self,
        budget_bytes: int | None = None,
        on_evict: Callable[[], None] | None = None,
        on_drop: Callable[[Any], None] | None = None,
    ) -> None:
        self.budget_bytes = budget_bytes
        self._on_evict = on_evict
        """Called after evicting, outside the lock (the runtime returns freed GPU memory)."""
        self._on_drop = on_drop
        """Called with each model evicted or forgotten, outside the lock: a model kept in a
        worker process is freed there."""
        self._dropped: list[Any] = []
        self._lock = threading.Lock()
        self._entries: dict[ModelKey, _Entry] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="model-loader")
        self._background: set[Future[Any]] = set()
        self.loads = 0
        self.evictions = 0
        self._evicted = False

    # -- using a model --------------------------------------------------------------------------

    def acquire(self, key: ModelKey, load: Callable[[], T], estimate: int = 0) -> Lease[T]:
        """The model of `key`, loading it with `load()` on this thread if nobody has it yet, or
        waiting for the load under way. Blocking. Raises what `load` raised, or OverBudget."""
        while True:
            with self._dropping_if_refused(), self._lock:
                entry = self._entries.get(key)
                if entry is not None and entry.error is not None and entry.loaded.is_set():
                    del self._entries[key]  # a failed background load: this caller retries
                    entry = None
                mine = entry is None
                if entry is None:
                    entry = self._begin(key, estimate)
                elif entry.loaded.is_set() and entry.error is None:
                    return self._lease(entry)
            if mine:
                self._load(entry, load)
            else:
                entry.loaded.wait()
            with self._lock:
                if entry.error is not None:
                    if mine:
                        raise entry.error
                    continue  # the other caller's load failed: try again, ours may succeed
                if self._entries.get(key) is entry:
                    return self._lease(entry)

    def ready(self, key: ModelKey) -> Lease[Any] | None:
        """The model of `key` if it is loaded and sound, else None (never loads)."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.loaded.is_set() and entry.error is None:
                return self._lease(entry)
            return None

    def request(
        self, key: ModelKey, load: Callable[[], T], estimate: int = 0, retry_after_s: float = 5
    ) -> Lease[T]:
        """The model of `key` if it is loaded; otherwise start loading it in the background
        and raise StillLoading. A load that failed raises its error once, to the next caller."""
        with self._dropping_if_refused(), self._lock:
            entry = self._entries.get(key)
            if entry is not None and entry.loaded.is_set():
                if entry.error is None:
                    return self._lease(entry)
                del self._entries[key]  # report the failure once; the next request retries
                raise entry.error
            if entry is None:
                entry = self._begin(key, estimate)
                future = self._loader.submit(self._load, entry, load, keep_error=True)
                self._background.add(future)
                future.add_done_callback(self._background.discard)
            elapsed = time.monotonic() - entry.started
        raise StillLoading(key, max(1.0, retry_after_s - elapsed), entry.done)

    def _begin(self, key: ModelKey, estimate: int) -> _Entry:
        # Under the lock: make room first, so that a model which cannot fit is refused before
        # it takes any memory.
        self._make_room(estimate, exclude=None)
        entry = _Entry(key, estimate)
        self._entries[key] = entry
        return entry

    @contextlib.contextmanager
    def _dropping_if_refused(self) -> Iterator[None]:
        """Around taking the lock to begin a load: a model that does not fit after all may
        have evicted others on the way, and with no load coming to see to them they go now
        (a model in a worker process is freed there)."""
        try:
            yield
        except OverBudget:
            self._after_evicting()
            raise

    def _after_evicting(self) -> None:
        with self._lock:
            evicted, self._evicted = self._evicted, False
            dropped, self._dropped = self._dropped, []
        if self._on_drop is not None:
            for value in dropped:
                self._on_drop(value)
        if evicted and self._on_evict is not None:
            self._on_evict()

    def forget(self, predicate: Callable[[Any], bool]) -> int:
        """Forget the loaded models whose value `predicate` accepts, in use or not (how many):
        the models of a worker process that was restarted are gone with it. A lease on one
        stays harmless to release."""
        with self._lock:
            gone = [
                e
                for e in self._entries.values()
                if e.loaded.is_set() and e.error is None and predicate(e.value)
            ]
            for entry in gone:
                del self._entries[entry.key]
                logger.info("forgetting model %s: %s", entry.key, "its worker process ended")
        return len(gone)

    def _load(self, entry: _Entry, load: Callable[[], Any], keep_error: bool = False) -> None:
        self._after_evicting()
        logger.info("loading model %s", entry.key)
        started = time.monotonic()
        try:
            value = load()
            size = module_bytes(value)
        except BaseException as exc:
            logger.warning("model %s failed to load: %s", entry.key, exc)
            with self._lock:
                entry.error = exc
                if not keep_error and self._entries.get(entry.key) is entry:
                    del self._entries[entry.key]
            self._finish(entry)
            return
        with self._lock:
            entry.value, entry.size = value, size
            entry.load_seconds = time.monotonic() - started
            entry.last_used = time.monotonic()
            self.loads += 1
            try:
                self._make_room(0, exclude=entry)
            except OverBudget:
                pass  # every other model is in use: over budget until one is released
        self._after_evicting()
        logger.info(
            "model ready %s seconds=%.1f size_mb=%.1f",
            entry.key,
            entry.load_seconds,
            size / 2**20,
        )
        self._finish(entry)

    @staticmethod
    def _finish(entry: _Entry) -> None:
        entry.loaded.set()
        entry.done.set_result(None)

    def _lease(self, entry: _Entry) -> Lease[Any]:
        entry.users += 1
        entry.last_used = time.monotonic()
        return Lease(self, entry)

    def _release(self, entry: _Entry) -> None:
        with self._lock:
            entry.users -= 1
            entry.last_used = time.monotonic()

    # -- memory ---------------------------------------------------------------------------------

    def _used(self) -> int:
        return sum(e.size or e.estimate for e in self._entries.values())

    def _make_room(self, needed: int, exclude: _Entry | None) -> None:
        """Evict unused models, least recently used first, until `needed` more bytes fit."""
        budget = self.budget_bytes
        if budget is None:
            return
        if needed > budget:
            raise OverBudget(
                f"the model needs about {needed / 2**30:.2f} GiB and the model memory budget "
                f"is {budget / 2**30:.2f} GiB (--model-memory-gb)"
            )
        idle = sorted(
            (
                e
                for e in self._entries.values()
                if e is not exclude and e.users == 0 and e.loaded.is_set()
            ),
            key=lambda e: e.last_used,
        )
        while self._used() + needed > budget and idle:
            victim = idle.pop(0)
            del self._entries[victim.key]
            self._dropped.append(victim.value)
            victim.value = None
            self.evictions += 1
            self._evicted = True
            logger.info("evicting model %s (least recently used) to make room", victim.key)
        if self._used() + needed > budget:
            in_use = ", ".join(
                e.key.model_id for e in self._entries.values() if e.users or not e.loaded.is_set()
            )
            raise OverBudget(
                f"the model needs about {needed / 2**30:.2f} GiB and the models in use "
                f"({in_use}) leave too little of the {budget / 2**30:.2f} GiB budget"
            )

    # -- reading --------------------------------------------------------------------------------

    def loading(self) -> bool:
        with self._lock:
            return any(not e.loaded.is_set() for e in self._entries.values())

    def models(self) -> list[ModelInfo]:
        with self._lock:
            return [
                ModelInfo(
                    e.key,
                    "ready" if e.loaded.is_set() else "loading",
                    # A model loading takes its expected size: admission counts it.
                    e.size or e.estimate,
                    e.users,
                    e.load_seconds,
                )
                for e in self._entries.values()
                if e.error is None
            ]

    def __iter__(self) -> Iterator[ModelKey]:
        with self._lock:
            return iter(list(self._entries))

    def close(self) -> None:
        """Wait for background loads, then forget every model."""
        self._loader.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            unfinished = [e for e in self._entries.values() if not e.loaded.is_set()]
            self._entries.clear()
        for entry in unfinished:  # a queued load that never ran: release whoever waits on it
            entry.error = RuntimeError("the service is shutting down")
            self._finish(entry)
