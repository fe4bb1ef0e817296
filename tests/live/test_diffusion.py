"""The streamdiffusion live pipeline on tiny random models, on the CPU, through the real loader."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
import torch

from live.app import create_app
from live.keys import RUNTIME, SESSIONS
from live.pipelines.base import PipelineContext
from live.pipelines.diffusion import StreamDiffusionParams, StreamDiffusionPipeline
from live.settings import Settings
from protocol.clips import make_clip, numbered_frame
from tests.live.streams import publish_clip, wait_loaded, watch


def tiny_params(**overrides) -> StreamDiffusionParams:
    values = {"width": 64, "height": 64, "num_inference_steps": 50, "t_index_list": [10, 30]}
    values.update(overrides)
    return StreamDiffusionParams(**values)


@pytest.fixture
def context(tiny_models_dir) -> PipelineContext:
    return PipelineContext.private(models_dir=tiny_models_dir, device="cpu")


def loaded(context, **overrides) -> StreamDiffusionPipeline:
    pipeline = StreamDiffusionPipeline(tiny_params(**overrides), context)
    pipeline.load()
    return pipeline


@pytest.mark.parametrize("t_index_list", [[20], [10, 30], [5, 15, 25, 40]])
def test_stream_batch_calls_the_unet_once_per_frame(context, t_index_list) -> None:
    pipeline = loaded(context, t_index_list=t_index_list)
    frame = numbered_frame(1, 64, 64)
    before = StreamDiffusionPipeline.unet_calls
    outputs = [pipeline.process(numbered_frame(i, 64, 64)) for i in range(6)]
    assert StreamDiffusionPipeline.unet_calls - before == 6
    assert outputs[-1].shape == (64, 64, 3) and outputs[-1].dtype == np.uint8
    assert np.abs(outputs[-1].astype(int) - frame).mean() > 5


def test_without_denoising_batch_each_step_is_a_unet_call(context) -> None:
    pipeline = loaded(context, t_index_list=[10, 20, 30], use_denoising_batch=False)
    before = StreamDiffusionPipeline.unet_calls
    pipeline.process(numbered_frame(0, 64, 64))
    assert StreamDiffusionPipeline.unet_calls - before == 3


def test_same_seed_and_input_give_the_same_output(context) -> None:
    frames = [numbered_frame(i, 64, 64) for i in range(4)]
    first = [loaded(context, seed=7).process(f) for f in frames[:1]]
    a, b = loaded(context, seed=7), loaded(context, seed=7)
    out_a = [a.process(f) for f in frames]
    out_b = [b.process(f) for f in frames]
    assert all((x == y).all() for x, y in zip(out_a, out_b, strict=True))
    other = loaded(context, seed=8)
    assert any((x != other.process(f)).any() for x, f in zip(out_a, frames, strict=True))
    assert first[0].shape == (64, 64, 3)


def test_prompt_and_seed_apply_live(context) -> None:
    pipeline = loaded(context, t_index_list=[20])
    frame = numbered_frame(3, 64, 64)
    before = pipeline.process(frame)
    new = tiny_params(t_index_list=[20], prompt=[["a red cat", 0.5], ["a dog", 0.5]])
    assert not StreamDiffusionPipeline.needs_reload(pipeline.params, new)
    pipeline.apply(new)
    assert (pipeline.process(frame) != before).any()
    assert StreamDiffusionPipeline.needs_reload(pipeline.params, tiny_params(model_id="x/y"))


def test_similar_image_filter_skips_up_to_the_limit(context) -> None:
    pipeline = loaded(
        context,
        t_index_list=[20],
        enable_similar_image_filter=True,
        similar_image_filter_max_skip_frame=3,
    )
    frame = numbered_frame(5, 64, 64)
    before = StreamDiffusionPipeline.unet_calls
    for _ in range(9):
        pipeline.process(frame)
    # 1 real pass, then 3 skips, 1 pass, 3 skips, 1 pass.
    assert StreamDiffusionPipeline.unet_calls - before == 3


def test_unsupported_and_invalid_params_are_refused() -> None:
    with pytest.raises(ValueError, match="controlnets"):
        tiny_params(controlnets=[{"model_id": "thibaud/controlnet", "enabled": True}])
    with pytest.raises(ValueError, match="num_inference_steps"):
        tiny_params(num_inference_steps=10, t_index_list=[12])
    with pytest.raises(ValueError, match="non-decreasing"):
        tiny_params(t_index_list=[30, 10])
    assert tiny_params(controlnets=[{"model_id": "x", "enabled": False}]).controlnets


@pytest.fixture
async def diffusion_service(aiohttp_client, tiny_models_dir):
    settings = Settings(models_dir=tiny_models_dir, device="cpu", status_interval_s=0.5)
    return await aiohttp_client(create_app(settings))


def grey(frame: np.ndarray) -> bool:
    return float(np.abs(frame.astype(int) - frame.mean(axis=2, keepdims=True)).mean()) < 2


async def test_streamdiffusion_session_end_to_end(diffusion_service, tiny_models_dir) -> None:
    client = diffusion_service
    health = await client.get("/pipelines")
    assert (await health.json())["default"] == "streamdiffusion"
    body = {
        "model_id": "streamdiffusion",
        "params": {"width": 64, "height": 64, "t_index_list": [10, 30], "prompt": "a cat"},
    }
    response = await client.post("/live-video-to-video", json=body)
    assert response.status == 200, await response.text()
    info = await response.json()
    viewer, events, tasks = watch(info)
    await wait_loaded(client, info["session_id"])  # the clip is for the model, not its load

    async def steer() -> None:
        url = f"/live-video-to-video/{info['session_id']}/params"
        await viewer.wait_frames(20)
        live = await client.post(url, json={**body["params"], "prompt": "a red dog"})
        assert (await live.json())["outcome"] == "live"
        await viewer.wait_frames(40)
        reload = await client.post(url, json={**body["params"], "model_id": "test/other-sd"})
        assert (await reload.json())["outcome"] == "reload"

    clip = make_clip(150, width=96, height=80)  # the decoder scales and crops to 64x64
    await asyncio.gather(publish_clip(info["publish_url"], clip), steer())
    await asyncio.wait_for(asyncio.gather(*tasks), 30)

    frames = [f.frame for f in viewer.frames]
    assert len(frames) > 60
    assert all(f.shape == (64, 64, 3) for f in frames)
    loading = [i for i, f in enumerate(frames) if grey(f)]
    assert loading, "the model change showed no loading frame"
    assert len(frames) - loading[-1] > 10, "output did not resume after the reload"
    processed = [f for f in frames if not grey(f)]
    source = numbered_frame(0, 64, 64)
    assert all(np.abs(f.astype(int) - source).mean() > 5 for f in processed[:20])
    assert not events.of_type("restart")
    assert not [e for e in events.of_type("error") if "pipeline" in e["message"]]


async def test_missing_model_gives_503_and_the_service_stays_up(aiohttp_client, tmp_path) -> None:
    client = await aiohttp_client(create_app(Settings(models_dir=tmp_path, device="cpu")))
    pipelines = await (await client.get("/pipelines")).json()
    assert pipelines["default"] == "cartoon"
    response = await client.post("/live-video-to-video", json={"model_id": "streamdiffusion"})
    assert response.status == 503
    message = (await response.json())["detail"]["msg"]
    assert "live-v2v models pull stabilityai/sd-turbo" in message
    assert (await (await client.get("/health")).json())["status"] == "IDLE"
    response = await client.post("/live-video-to-video", json={})
    assert response.status == 200  # the default (cartoon) still works
    session_id = (await response.json())["session_id"]
    assert (await client.delete(f"/live-video-to-video/{session_id}")).status == 200


async def test_no_gpu_gives_503_unless_cpu_is_asked_for(aiohttp_client, tiny_models_dir) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    client = await aiohttp_client(create_app(Settings(models_dir=tiny_models_dir)))
    response = await client.post("/live-video-to-video", json={"model_id": "streamdiffusion"})
    assert response.status == 503
    assert "--device cpu" in (await response.json())["detail"]["msg"]


async def test_two_sessions_of_one_model_share_its_weights(aiohttp_client, tiny_models_dir) -> None:
    """The runtime loads a model once: both sessions' UNets, text encoders and autoencoders
    are the same tensors; each session keeps its own scheduler and stream state."""
    # In process on purpose: it compares the pipelines' tensors, which a worker process keeps.
    settings = Settings(
        models_dir=tiny_models_dir, device="cpu", status_interval_s=0.5, worker_process=False
    )
    client = await aiohttp_client(create_app(settings))
    runtime, sessions = client.app[RUNTIME], client.app[SESSIONS]
    params = {"width": 64, "height": 64, "t_index_list": [10, 30]}
    started = []
    for prompt in ("a cat", "a dog"):
        body = {"model_id": "streamdiffusion", "params": {**params, "prompt": prompt}}
        response = await client.post("/live-video-to-video", json=body)
        assert response.status == 200, await response.text()
        started.append(sessions.get((await response.json())["session_id"]))
    for session in started:
        await asyncio.wait_for(session.wait_ready(), 60)
    a, b = (session.host.pipeline for session in started)

    def storages(pipeline) -> set[int]:
        modules = (pipeline.unet, pipeline.text_encoder, pipeline.vae)
        return {p.untyped_storage().data_ptr() for m in modules for p in m.parameters()}

    assert storages(a) == storages(b)
    assert a.scheduler is not b.scheduler
    assert not torch.equal(a.prompt_embeds, b.prompt_embeds)
    (model,) = [m for m in runtime.models.models() if m.key.kind == "streamdiffusion"]
    assert model.users == 2
    assert model.size_bytes == sum(p.numel() * p.element_size() for p in _parameters(a)) + sum(
        b.numel() * b.element_size() for b in _buffers(a)
    )

    for session in started:
        await client.delete(f"/live-video-to-video/{session.id}")
        await session.wait()
    (model,) = [m for m in runtime.models.models() if m.key.kind == "streamdiffusion"]
    assert model.users == 0  # kept for the next session, until memory is needed


def _parameters(pipeline):  # type: ignore[no-untyped-def]
    for module in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        yield from module.parameters()


def _buffers(pipeline):  # type: ignore[no-untyped-def]
    for module in (pipeline.unet, pipeline.text_encoder, pipeline.vae):
        yield from module.buffers()
