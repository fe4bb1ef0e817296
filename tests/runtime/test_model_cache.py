"""The runtime's model cache: one load per model however many ask, least recently used
evicted within the budget, never a model in use, failures reported and retried."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from runtime.model_cache import ModelCache, ModelKey, OverBudget, StillLoading
from tests.waiting import poll_until_blocking

MB = 2**20


def key(name: str) -> ModelKey:
    return ModelKey("test", name, "cpu", "float32")


def weights(megabytes: int) -> torch.nn.Module:
    """A module of exactly `megabytes` MiB of float32 parameters."""
    return torch.nn.Linear(MB // 4, megabytes, bias=False)


def test_many_callers_share_one_load() -> None:
    cache = ModelCache()
    loads = 0
    gate = threading.Event()

    def load() -> torch.nn.Module:
        nonlocal loads
        loads += 1
        gate.wait(10)  # everyone else arrives while this load is under way
        return weights(1)

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(cache.acquire, key("a"), load) for _ in range(4)]
        gate.set()
        leases = [f.result(10) for f in futures]
    assert loads == 1
    assert len({id(lease.value) for lease in leases}) == 1
    (info,) = cache.models()
    assert (info.users, info.size_bytes, info.state) == (4, MB, "ready")
    for lease in leases:
        lease.release()
        lease.release()  # twice is harmless
    assert cache.models()[0].users == 0


def test_least_recently_used_goes_first_and_never_one_in_use() -> None:
    cache = ModelCache(budget_bytes=int(2.5 * MB))
    cache.acquire(key("a"), lambda: weights(1)).release()
    cache.acquire(key("b"), lambda: weights(1)).release()
    cache.acquire(key("a"), lambda: weights(1)).release()  # a is now the more recent
    held = cache.acquire(key("c"), lambda: weights(1), estimate=MB)
    assert sorted(k.model_id for k in cache) == ["a", "c"]
    assert cache.evictions == 1

    other = cache.acquire(key("d"), lambda: weights(1), estimate=MB)  # evicts a, not c
    assert sorted(k.model_id for k in cache) == ["c", "d"]
    with pytest.raises(OverBudget, match="in use"):
        cache.acquire(key("e"), lambda: weights(1), estimate=MB)
    assert sorted(k.model_id for k in cache) == ["c", "d"]  # nothing was evicted for it
    held.release()
    other.release()


def test_a_model_larger_than_the_budget_is_refused_before_loading() -> None:
    cache = ModelCache(budget_bytes=MB)
    loaded = []
    with pytest.raises(OverBudget, match="budget"):
        cache.acquire(key("big"), lambda: loaded.append(1), estimate=2 * MB)
    assert not loaded
    assert list(cache) == []


def test_a_failed_load_raises_and_the_next_caller_tries_again() -> None:
    cache = ModelCache()
    attempts = []

    def flaky() -> torch.nn.Module:
        attempts.append(1)
        if len(attempts) == 1:
            raise OSError("disk hiccup")
        return weights(1)

    with pytest.raises(OSError, match="hiccup"):
        cache.acquire(key("a"), flaky)
    with cache.acquire(key("a"), flaky) as model:
        assert isinstance(model, torch.nn.Linear)
    assert len(attempts) == 2


def test_request_loads_in_the_background_and_reports_its_failure_once() -> None:
    cache = ModelCache()
    release = threading.Event()

    def slow() -> torch.nn.Module:
        release.wait(10)
        return weights(1)

    with pytest.raises(StillLoading) as first:
        cache.request(key("a"), slow, retry_after_s=7)
    assert 1 <= first.value.retry_after_s <= 7
    assert cache.loading()
    with pytest.raises(StillLoading):
        cache.request(key("a"), slow)  # still the same load, not a second one
    release.set()
    cache.acquire(key("a"), slow).release()  # waits for the background load
    assert not cache.loading()
    with cache.request(key("a"), slow) as model:
        assert isinstance(model, torch.nn.Linear)

    def broken() -> torch.nn.Module:
        raise ValueError("corrupt safetensors")

    with pytest.raises(StillLoading):
        cache.request(key("b"), broken)
    assert poll_until_blocking(lambda: not cache.loading()), "the background load never ended"
    with pytest.raises(ValueError, match="corrupt"):
        cache.request(key("b"), broken)
    with pytest.raises(StillLoading):  # reported once; the next request tries again
        cache.request(key("b"), broken)
    cache.close()


@pytest.mark.parametrize("how", ["acquire", "request"])
def test_a_model_evicted_for_a_load_that_is_then_refused_is_dropped_at_once(how: str) -> None:
    """A model kept elsewhere (a worker process) is freed there when it is evicted, even when
    the load it was evicted for does not fit after all and no load follows."""
    dropped: list[object] = []
    cache = ModelCache(budget_bytes=int(2.5 * MB), on_drop=dropped.append)
    cache.acquire(key("a"), lambda: weights(1)).release()
    held = cache.acquire(key("b"), lambda: weights(1))
    with pytest.raises(OverBudget, match="in use"):
        getattr(cache, how)(key("c"), lambda: weights(2), estimate=2 * MB)
    assert [k.model_id for k in cache] == ["b"]  # a was evicted trying to make room
    assert len(dropped) == 1 and isinstance(dropped[0], torch.nn.Linear)
    held.release()
    cache.close()
