"""Finding 11 of issue 18: a model id is a Hugging Face id, never a path. Each entry point
that takes one (batch routes' `model_id`, `/llm`'s `model`, streamdiffusion's `model_id` and
`vae_id` at start, through `POST …/params` and on the control channel) is attacked with an
absolute path, `..`, `~` and a symlink that leads out of the models directory; none loads."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aiohttp
import pytest

from live.app import create_app
from live.keys import RUNTIME
from live.settings import Settings
from runtime.tiny import LLAMA_31_8B_INSTRUCT, SD_TURBO
from tests.live.streams import EventLog, start_session

TINY_PROMPT = {"prompt": "a cat", "width": 64, "height": 64, "t_index_list": [10, 30]}


def path_ids(outside: Path) -> list[str]:
    """Ids that name a folder outside the models directory, each of them a real model."""
    return [
        str(outside),  # absolute
        f"../{outside.parent.name}/{outside.name}",  # up and back down
        f"x/../../{outside.parent.name}/{outside.name}",
        "~/" + outside.name,
        f"{outside}/../{outside.name}",
    ]


@pytest.fixture
def models_dir(tmp_path: Path, tiny_models_dir: Path) -> Path:
    """A models directory of its own, holding only a symlink to a model outside it."""
    models = tmp_path / "models"
    (models / "test").mkdir(parents=True)
    (models / "test" / "escape").symlink_to(tiny_models_dir / SD_TURBO, target_is_directory=True)
    (models / "test" / "llm-escape").symlink_to(tiny_models_dir / LLAMA_31_8B_INSTRUCT)
    return models


def nothing_loaded(client) -> bool:  # type: ignore[no-untyped-def]
    return not client.app[RUNTIME].models.models()


async def test_batch_and_llm_model_ids_are_never_paths(
    aiohttp_client, models_dir, tiny_models_dir, one_torch_thread
) -> None:
    client = await aiohttp_client(create_app(Settings(models_dir=models_dir, device="cpu")))
    sd, llm = tiny_models_dir / SD_TURBO, tiny_models_dir / LLAMA_31_8B_INSTRUCT
    message = [{"role": "user", "content": "hi"}]
    for bad in path_ids(sd):
        response = await client.post("/text-to-image", json={"model_id": bad, "prompt": "a"})
        assert response.status == 422, (bad, await response.text())
        detail = (await response.json())["detail"]
        assert detail[0]["loc"] == ["body", "model_id"]
        assert "never a path" in detail[0]["msg"]
    for bad in path_ids(llm):
        response = await client.post("/llm", json={"model": bad, "messages": message})
        assert response.status == 422, (bad, await response.text())
        assert (await response.json())["detail"][0]["loc"] == ["body", "model"]
    # A well-formed id whose folder is a symlink out of the models directory: not here.
    response = await client.post("/text-to-image", json={"model_id": "test/escape", "prompt": "a"})
    assert response.status == 503, await response.text()
    assert "not on this machine" in (await response.json())["detail"]["msg"]
    response = await client.post("/llm", json={"model": "test/llm-escape", "messages": message})
    assert response.status == 503, await response.text()
    # The multipart form route of another batch route takes the same check.
    form = aiohttp.FormData({"model_id": str(sd), "prompt": "a"})
    form.add_field("image", b"\x89PNG", filename="a.png", content_type="image/png")
    response = await client.post("/image-to-image", data=form)
    assert response.status == 422, await response.text()
    assert nothing_loaded(client)
    assert str(models_dir.resolve()) not in json.dumps(
        await (await client.get("/pipelines")).json()
    )


async def test_live_model_ids_are_never_paths(
    aiohttp_client, models_dir, tiny_models_dir, one_torch_thread
) -> None:
    client = await aiohttp_client(
        create_app(Settings(models_dir=tiny_models_dir, device="cpu", status_interval_s=0.5))
    )
    outside = models_dir / "test"  # not inside tiny_models_dir: a copy there would be loaded
    (outside / "sd").symlink_to(tiny_models_dir / SD_TURBO, target_is_directory=True)
    for field in ("model_id", "vae_id"):
        for bad in path_ids(outside / "sd"):
            params = {**TINY_PROMPT, field: bad}
            body = {"model_id": "streamdiffusion", "params": params}
            response = await client.post("/live-video-to-video", json=body)
            assert response.status == 422, (field, bad, await response.text())
            detail = (await response.json())["detail"]
            assert detail[0]["loc"][-1] == field, detail
    # A session of the real model, then every control door tried on it.
    info = await start_session(client, model_id="streamdiffusion", params=TINY_PROMPT)
    url = f"/live-video-to-video/{info['session_id']}/params"
    for field in ("model_id", "vae_id"):
        for bad in path_ids(outside / "sd"):
            response = await client.post(url, json={**TINY_PROMPT, field: bad})
            assert response.status == 422, (field, bad, await response.text())
    events = EventLog(info["events_url"])
    async with aiohttp.ClientSession() as http:
        reading = asyncio.create_task(events.run())
        try:
            control = {**TINY_PROMPT, "model_id": str(tiny_models_dir / SD_TURBO)}
            async with http.post(info["control_url"] + "/0", json=control) as response:
                assert response.status == 200
            error = await events.wait_event(lambda e: e["type"] == "error")
            assert "model_id" in error["message"], error
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
    status = await (await client.get(f"/live-video-to-video/{info['session_id']}")).json()
    assert not status["ended"]
    assert status["inference_status"]["last_params"]["model_id"] == SD_TURBO
    assert all(not m.key.model_id.startswith("/") for m in client.app[RUNTIME].models.models())
    assert (await client.delete(f"/live-video-to-video/{info['session_id']}")).status == 200
