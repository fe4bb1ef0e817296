"""The CUDA branches, on a GPU: streamdiffusion in fp16 on the device, the model memory budget
and admission from the GPU's real memory, eviction giving the memory back, and the GPU figures
of /hardware/stats (NVML). Marked `gpu`: skipped, with the reason, where torch sees no CUDA."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from live.admission import LOAD_MARGIN, memory_refusal
from live.app import create_app
from live.keys import RUNTIME, SESSIONS
from live.pipelines.base import PipelineContext
from live.pipelines.diffusion import StreamDiffusionParams, StreamDiffusionPipeline
from live.settings import Settings
from protocol.clips import numbered_frame
from runtime.device import choose_device, free_gpu_memory
from runtime.runtime import DEFAULT_GPU_SHARE, Runtime, RuntimeConfig
from tests.live.streams import wait_gone
from tests.waiting import wait_until

pytestmark = pytest.mark.gpu

GIB = 2**30
TINY = {"width": 64, "height": 64, "t_index_list": [10, 30]}


@pytest.fixture
async def gpu_service(aiohttp_client, tiny_models_dir):
    settings = Settings(models_dir=tiny_models_dir, device="cuda", status_interval_s=0.5)
    return await aiohttp_client(create_app(settings))


async def test_streamdiffusion_runs_in_fp16_on_the_gpu_within_its_budget(gpu_service) -> None:
    client = gpu_service
    body = {"model_id": "streamdiffusion", "params": TINY}
    response = await client.post("/live-video-to-video", json=body)
    assert response.status == 200, await response.text()
    session_id = (await response.json())["session_id"]
    session = client.app[SESSIONS].get(session_id)
    # Ready means loaded and warmed up: frames went through the UNet and TAESD on the GPU.
    await asyncio.wait_for(session.wait_ready(), 120)
    pipeline = session._pipeline
    assert pipeline.unet.dtype == torch.float16
    assert next(pipeline.unet.parameters()).device.type == "cuda"
    out = await asyncio.to_thread(pipeline.process, numbered_frame(1, 64, 64))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8

    # The budget defaults to a share of this GPU's memory; the model in use is counted in it.
    total = torch.cuda.get_device_properties(0).total_memory
    capacity = (await (await client.get("/health")).json())["capacity"]
    assert capacity["model_memory_budget_bytes"] == int(total * DEFAULT_GPU_SHARE)
    (model,) = client.app[RUNTIME].models.models()
    assert model.size_bytes > 0 and model.users == 1
    assert capacity["model_memory_left_bytes"] < capacity["model_memory_budget_bytes"]
    assert (await client.delete(f"/live-video-to-video/{session_id}")).status == 200
    await wait_gone(client, session_id)


def test_admission_weighs_the_gpus_free_memory_as_it_is() -> None:
    spec = choose_device("cuda")
    torch.cuda.empty_cache()
    before = free_gpu_memory(spec)
    assert before is not None
    block = torch.empty(GIB, dtype=torch.uint8, device=spec.device)
    try:
        after = free_gpu_memory(spec)
        assert after is not None
        assert GIB <= before - after < GIB + GIB // 4
        # Weights that fit in what was free, and no longer in what is left.
        need = int((after + GIB // 2) / LOAD_MARGIN)
        refused = memory_refusal(need, budget=None, in_use=0, free_gpu=after)
        assert refused is not None and "of GPU memory" in refused
        assert memory_refusal(need, budget=None, in_use=0, free_gpu=before) is None
    finally:
        del block
        torch.cuda.empty_cache()


async def test_evicting_a_model_gives_its_gpu_memory_back(tiny_models_dir) -> None:
    runtime = Runtime(RuntimeConfig(models_dir=tiny_models_dir, device="cuda"))
    context = PipelineContext(runtime)
    pipeline = StreamDiffusionPipeline(StreamDiffusionParams(**TINY), context)
    pipeline.load()
    pipeline.process(numbered_frame(0, 64, 64))
    pipeline.unload()  # the weights stay cached, idle
    del pipeline
    torch.cuda.synchronize()
    (cached,) = runtime.models.models()
    held = torch.cuda.memory_allocated()
    reserved = torch.cuda.memory_reserved()
    # A model that needs the whole budget: every idle model is evicted for it.
    runtime.models.budget_bytes = cached.size_bytes + 1024
    with runtime.models.acquire(
        runtime.key("test", "small"),
        lambda: torch.nn.Linear(4, 4).to("cuda"),
        estimate=cached.size_bytes + 1024,
    ):
        assert runtime.models.evictions == 1
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() <= held - cached.size_bytes + 2**20
        assert torch.cuda.memory_reserved() < reserved  # handed back by empty_cache
    await runtime.close()


async def test_hardware_stats_report_the_gpu(gpu_service) -> None:
    client = gpu_service
    block = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    try:
        stats = await (await client.get("/hardware/stats")).json()
        gpus = stats["gpu_stats"]
        assert sorted(gpus) == [str(i) for i in range(torch.cuda.device_count())]
        gpu = gpus["0"]
        assert gpu["name"] == torch.cuda.get_device_name(0)
        assert gpu["memory_total"] == torch.cuda.mem_get_info(0)[1]
        assert gpu["memory_free"] <= gpu["memory_total"] - GIB  # this test holds 1 GiB
        used = gpu["memory_total"] - gpu["memory_free"]
        assert gpu["utilization_memory"] == round(100 * used / gpu["memory_total"])
        assert 0 <= gpu["utilization_compute"] <= 100
        info = await (await client.get("/hardware/info")).json()
        assert info["gpu_info"]["0"]["memory_total"] == gpu["memory_total"]
    finally:
        del block


async def test_hardware_stats_show_a_busy_gpu_through_nvml(gpu_service) -> None:
    try:
        torch.cuda.utilization(0)
    except Exception as exc:
        pytest.skip(f"NVML is not reachable here ({exc.__class__.__name__}); compute shows 0")
    client = gpu_service
    stop = threading.Event()

    def busy() -> None:
        a = torch.randn(4096, 4096, device="cuda", dtype=torch.float16)
        while not stop.is_set():
            for _ in range(50):
                a = a @ a
                a = a / a.norm()
            torch.cuda.synchronize()

    worker = threading.Thread(target=busy, daemon=True)
    worker.start()

    async def busy_reported() -> bool:
        stats = await (await client.get("/hardware/stats")).json()
        return stats["gpu_stats"]["0"]["utilization_compute"] > 0

    try:
        await wait_until(busy_reported, "the GPU's compute utilisation above 0", within=30)
    finally:
        stop.set()
        await asyncio.to_thread(worker.join)
