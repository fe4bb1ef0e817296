"""Placement with a device whose worker process failed for good (`--worker-process`): the
runtime's `usable_devices`, `where_loaded` and `with_room` (batch jobs' placement) skip it, and
with no device left they refuse with a 503 that does not say to retry."""

from __future__ import annotations

import asyncio
from dataclasses import replace

import pytest

from protocol.errors import Unavailable
from runtime.runtime import Device, Runtime, RuntimeConfig
from runtime.worker_errors import WorkerLost
from tests.runtime.test_worker_process import OPS
from tests.waiting import wait_until


async def fail_for_good(device: Device) -> None:
    """Make `device`'s worker process fail for good: one that gives up at its first failure
    (the defaults: 5 within 300 s, from 0.5 s apart; the same path, slower), then an
    operation that aborts it."""
    worker = await device.process_worker()
    worker.config = replace(worker.config, max_failures=1)
    with pytest.raises(WorkerLost, match="SIGABRT"):
        await worker.call(f"{OPS}:abort")
    await wait_until(lambda: worker.status().state == "failed", f"{device.label}'s worker failed")


async def test_placement_skips_a_failed_device_and_refuses_when_none_is_left() -> None:
    runtime = Runtime(RuntimeConfig(devices="cpu,cpu", worker_process=True))
    try:
        first, second = await asyncio.to_thread(lambda: runtime.devices)
        key = await asyncio.to_thread(first.key, "test", "some/model")
        with first.models.acquire(key, object):
            assert runtime.where_loaded("test", "some/model") is first
            assert runtime.with_room(1) is first  # `--devices` order breaks the tie
            await fail_for_good(first)
            assert first.failure() is not None and second.failure() is None
            assert runtime.usable_devices() == [second]
            # Its model is no reason to go there any more: the job loads it elsewhere.
            assert runtime.where_loaded("test", "some/model") is None
            assert runtime.with_room(1) is second

        await fail_for_good(second)
        for place in (
            runtime.usable_devices,
            lambda: runtime.where_loaded("test", "some/model"),
            lambda: runtime.with_room(1),
        ):
            with pytest.raises(Unavailable) as refused:
                place()
            assert refused.value.retry_after_s is None and not refused.value.headers
            message = refused.value.msg
            for label in ("cpu:0", "cpu:1"):
                assert f"the worker process of {label} failed 1 time within 300 s" in message
            assert "(last: the worker process aborted (SIGABRT))" in message
            assert "look at /health and the service's logs" in message
            assert "restart the service" in message
    finally:
        await runtime.close()


async def test_a_restarting_worker_is_not_failed() -> None:
    runtime = Runtime(RuntimeConfig(device="cpu", worker_process=True))
    try:
        device = runtime.device()
        worker = await device.process_worker()
        with pytest.raises(WorkerLost, match="SIGABRT"):
            await worker.call(f"{OPS}:abort")
        # Restarting (after a backoff): work waits for it, so placement still takes it.
        assert worker.status().state in ("restarting", "starting", "ready")
        assert device.failure() is None and runtime.usable_devices() == [device]
        await worker.wait_ready()
        assert device.failure() is None
    finally:
        await runtime.close()
