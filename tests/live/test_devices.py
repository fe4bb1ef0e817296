"""Several devices (`--devices`): one inference worker each, sessions placed across them, and
each device shown on /health, /hardware/stats and /metrics. On the CPU: `cpu,cpu` is two
workers, as two GPUs would be."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from pydantic import ValidationError

from live.app import StartupError, create_app
from live.pipelines.passthrough import NoopPipeline
from live.settings import Settings
from protocol.clips import make_clip
from runtime.device import device_labels, device_list
from tests.live.conftest import PIPELINES
from tests.live.streams import publish_clip, start_session, wait_gone, wait_loaded
from tests.live.test_metrics import scrape, value
from tests.waiting import wait_until


class DeviceNoop(NoopPipeline):
    """The noop pipeline on its device's shared inference worker, as a model would run."""

    name = "device-noop"
    uses_device = True
    passes_through = False  # it stands in for a model: its frames go to the worker


@pytest.fixture
async def two_cpus(aiohttp_client):
    async def start(**overrides):
        settings = Settings(status_interval_s=0.5, devices="cpu,cpu", **overrides)
        pipelines = {**PIPELINES, DeviceNoop.name: DeviceNoop}
        return await aiohttp_client(create_app(settings, pipelines))

    return start


def devices_of(capacity: dict) -> dict[str, dict]:
    return {d["device"]: d for d in capacity["devices"]}


async def test_two_sessions_run_on_two_workers(two_cpus) -> None:
    client = await two_cpus()
    first = await start_session(client, model_id="device-noop")
    second = await start_session(client, model_id="device-noop")
    # A pipeline off the device workers takes no device.
    other = await start_session(client, model_id="noop")
    health = await (await client.get("/health")).json()
    placed = devices_of(health["capacity"])
    assert set(placed) == {"cpu:0", "cpu:1"}
    assert [placed[d]["sessions"] for d in ("cpu:0", "cpu:1")] == [1, 1]
    status = [
        await (await client.get(f"/live-video-to-video/{info['session_id']}")).json()
        for info in (first, second, other)
    ]
    assert [s["device"] for s in status] == ["cpu:0", "cpu:1", None]

    clip = make_clip(60)
    for info in (first, second):  # each in its device's worker process, started just now
        await wait_loaded(client, info["session_id"])
    publishing = [
        asyncio.create_task(publish_clip(info["publish_url"], clip)) for info in (first, second)
    ]
    try:

        async def both_ran_frames() -> bool:
            samples = await scrape(client)
            done = [
                value(samples, "live_v2v_device_live_items_total", device=d) or 0
                for d in ("cpu:0", "cpu:1")
            ]
            return min(done) >= 10

        await wait_until(both_ran_frames, "frames on both workers", within=30)
        samples = await scrape(client)
        for device in ("cpu:0", "cpu:1"):
            assert value(samples, "live_v2v_device_sessions", device=device) == 1
        stats = await (await client.get("/hardware/stats")).json()
        assert stats["gpu_stats"] == {}  # the runner's map is GPUs only; the CPUs are ours
        workers = devices_of(stats["capacity"])
        assert all(workers[d]["live_items_done"] >= 10 for d in ("cpu:0", "cpu:1"))
    finally:
        for task in publishing:
            task.cancel()
        for task in publishing:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        for info in (first, second, other):
            await client.delete(f"/live-video-to-video/{info['session_id']}")
            await wait_gone(client, info["session_id"])

    samples = await scrape(client)
    for device in ("cpu:0", "cpu:1"):
        assert value(samples, "live_v2v_device_sessions", device=device) == 0


async def test_a_refusal_names_each_device(two_cpus, tiny_models_dir) -> None:
    client = await two_cpus(model_memory_gb=0.000001, models_dir=tiny_models_dir)
    response = await client.post("/live-video-to-video", json={"model_id": "streamdiffusion"})
    assert response.status == 503, await response.text()
    assert int(response.headers["Retry-After"]) > 0
    detail = (await response.json())["detail"]["msg"]
    assert "no device can take the session" in detail
    assert "cannot load now on cpu:0: " in detail and "cannot load now on cpu:1: " in detail
    assert "--model-memory-gb" in detail
    capacity = (await (await client.get("/health")).json())["capacity"]
    budgets = [d["model_memory_budget_bytes"] for d in capacity["devices"]]
    assert budgets == [int(0.000001 * 2**30)] * 2  # the budget is per device


def test_devices_settings() -> None:
    assert device_list("") is None and device_list("auto") is None
    assert device_list("cuda,cuda:1") == ["cuda:0", "cuda:1"]
    assert device_labels(device_list("cpu,cpu")) == ["cpu:0", "cpu:1"]
    assert device_labels(["cpu"]) == ["cpu"]
    assert Settings(devices="cpu,cpu").runtime().device_names() == ["cpu", "cpu"]
    assert Settings(device="cpu").runtime().device_names() == ["cpu"]
    for bad, words in (
        ({"devices": "gpu"}, '"gpu" is not a device'),
        ({"devices": "cuda:0,cuda"}, "a GPU is named twice"),
        ({"devices": "cpu", "device": "cpu"}, "not both"),
        ({"devices": ",".join(["cpu"] * 65)}, "at most 64"),
    ):
        with pytest.raises(ValidationError, match=words):
            Settings(**bad)


async def test_a_device_this_host_lacks_is_refused_at_start(aiohttp_client) -> None:
    from runtime.device import has_cuda

    if has_cuda():
        pytest.skip("this host has a CUDA GPU")
    app = create_app(Settings(devices="cpu,cuda:1"), PIPELINES)
    with pytest.raises(StartupError, match="device cuda:1 was asked for, but torch sees no CUDA"):
        await aiohttp_client(app)


@pytest.mark.gpu
def test_auto_is_every_visible_gpu_each_with_its_own_budget() -> None:
    import torch

    from runtime.device import has_cuda
    from runtime.runtime import DEFAULT_GPU_SHARE, Runtime, RuntimeConfig

    if not has_cuda():
        pytest.skip("needs CUDA")
    devices = Runtime(RuntimeConfig()).devices
    count = torch.cuda.device_count()
    assert [d.label for d in devices] == [f"cuda:{i}" for i in range(count)]
    for index, device in enumerate(devices):
        assert (device.spec.device, device.spec.dtype_name) == (device.label, "float16")
        total = torch.cuda.get_device_properties(index).total_memory
        assert device.models.budget_bytes == int(total * DEFAULT_GPU_SHARE)
