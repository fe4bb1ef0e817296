"""Batch jobs across several devices (`--devices cpu,cpu`): a job goes where its model is
loaded, else to the least busy device, and runs on that device's worker."""

from __future__ import annotations

import asyncio

from batch import text_to_image
from live.keys import RUNTIME
from runtime.models import folder_size, resolve_model
from tests.live.streams import start_session, wait_gone
from tests.live.test_metrics import scrape, value
from tests.waiting import wait_until

REQUEST = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}


def not_loading(client):
    async def check() -> bool:
        return (await (await client.get("/health")).json())["status"] != "LOADING"

    return check


def jobs_by_device(samples: dict) -> dict[str, float | None]:
    return {
        d: value(samples, "live_v2v_device_batch_items_total", device=d) for d in ("cpu:0", "cpu:1")
    }


async def test_a_batch_job_goes_where_its_model_is_loaded(batch_service) -> None:
    client = await batch_service(warm=(), devices="cpu,cpu")
    runtime = client.app[RUNTIME]
    second = runtime.device("cpu:1")
    model = text_to_image.DEFAULT_MODEL
    path = resolve_model(model, runtime.config.models_dir)
    # Loaded on the second device only, by the route's own loader (as a warm list would).
    lease = await asyncio.to_thread(
        second.models.acquire,
        second.key("text-to-image", model),
        lambda: text_to_image.load(path, second.spec),
        folder_size(path),
    )
    lease.release()

    response = await client.post("/text-to-image", json=REQUEST)
    assert response.status == 200, await response.text()
    assert jobs_by_device(await scrape(client)) == {"cpu:0": 0, "cpu:1": 1}
    health = await (await client.get("/health")).json()
    models = {d["device"]: d["models"] for d in health["capacity"]["devices"]}
    assert models == {"cpu:0": [], "cpu:1": [model]}  # no second copy was loaded


async def test_a_cold_batch_job_goes_to_the_least_busy_device(batch_service) -> None:
    # In process: the test reads the devices' in-process worker counters.
    client = await batch_service(warm=(), devices="cpu,cpu", worker_process=False)
    # A live session on cpu:0 (the first of equals) makes cpu:1 the less busy device.
    session = await start_session(client, model_id="streamdiffusion")
    try:
        # Loaded first: diffusers' loads are not safe on two threads at once (meta tensors).
        await wait_until(not_loading(client), "the session's model to load", within=60)
        health = await (await client.get("/health")).json()
        sessions = {d["device"]: d["sessions"] for d in health["capacity"]["devices"]}
        assert sessions == {"cpu:0": 1, "cpu:1": 0}
        response = await client.post("/text-to-image", json=REQUEST)
        assert response.status == 200, await response.text()
    finally:
        await client.delete(f"/live-video-to-video/{session['session_id']}")
        await wait_gone(client, session["session_id"])
    assert jobs_by_device(await scrape(client)) == {"cpu:0": 0, "cpu:1": 1}
