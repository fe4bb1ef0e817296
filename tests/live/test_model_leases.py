"""Issue 18, findings 20 and 21: a model a live session leases is given back when its load
fails after the lease, and admission counts the models being loaded, not only the loaded ones."""

from __future__ import annotations

import asyncio
from typing import Any

from live.app import create_app
from live.keys import RUNTIME, SESSIONS
from live.pipelines import builtin_pipelines
from live.pipelines.diffusion import StreamDiffusionPipeline
from live.settings import Settings
from tests.live.streams import start_session, wait_gone
from tests.waiting import wait_until

TINY = {"width": 64, "height": 64, "t_index_list": [10, 30], "prompt": "a cat"}


class WarmUpOutOfMemory(StreamDiffusionPipeline):
    """Leases the shared weights, then runs out of memory warming up, as a GPU that holds
    the weights but not the activations does."""

    name = "warm-up-oom"

    def attach(self, **components: Any) -> None:
        raise MemoryError("CUDA out of memory (simulated during the warm-up)")


def users(client) -> dict[str, int]:  # type: ignore[no-untyped-def]
    return {str(m.key): m.users for m in client.app[RUNTIME].models.models()}


async def test_a_load_that_fails_after_leasing_gives_the_model_back(
    aiohttp_client, tiny_models_dir, one_torch_thread
) -> None:
    pipelines = {**builtin_pipelines(), WarmUpOutOfMemory.name: WarmUpOutOfMemory}
    # In process on purpose: it reads the leases of this process's model cache.
    settings = Settings(
        models_dir=tiny_models_dir, device="cpu", status_interval_s=0.5, worker_process=False
    )
    client = await aiohttp_client(create_app(settings, pipelines))
    info = await start_session(client, model_id=WarmUpOutOfMemory.name, params=TINY)
    session = client.app[SESSIONS].get(info["session_id"])
    await wait_until(lambda: session.state == "ERROR", "the load to fail", within=60)
    loaded = users(client)
    assert loaded, "the weights were loaded into the shared cache"
    assert all(count == 0 for count in loaded.values()), loaded
    # Nothing pins the model: a session that ends leaves it evictable, and the health says so.
    assert (await client.delete(f"/live-video-to-video/{info['session_id']}")).status == 200
    await wait_gone(client, info["session_id"])
    assert all(count == 0 for count in users(client).values())


async def test_two_large_models_started_together_are_not_both_admitted(
    aiohttp_client, tiny_models_dir, one_torch_thread
) -> None:
    """Each model fits the budget alone and both do not: of two sessions started in the same
    instant, while neither model has loaded, one is admitted and the other gets a 503."""
    from runtime.models import folder_size, resolve_model

    def sizes() -> int:  # blocking: off the loop the test watches
        return max(
            folder_size(resolve_model(m, tiny_models_dir))
            for m in ("stabilityai/sd-turbo", "test/other-sd")
        )

    size = await asyncio.to_thread(sizes)
    budget_gb = 1.5 * size / 2**30
    settings = Settings(
        models_dir=tiny_models_dir, device="cpu", model_memory_gb=budget_gb, status_interval_s=0.5
    )
    client = await aiohttp_client(create_app(settings))

    async def start(model: str):  # type: ignore[no-untyped-def]
        body = {"model_id": "streamdiffusion", "params": {**TINY, "model_id": model}}
        return await client.post("/live-video-to-video", json=body)

    first, second = await asyncio.gather(start("stabilityai/sd-turbo"), start("test/other-sd"))
    statuses = sorted([first.status, second.status])
    assert statuses == [200, 503], [await first.text(), await second.text()]
    refused = first if first.status == 503 else second
    assert "model memory budget" in (await refused.json())["detail"]["msg"]
    admitted = second if refused is first else first
    session_id = (await admitted.json())["session_id"]
    assert (await client.delete(f"/live-video-to-video/{session_id}")).status == 200
    await wait_gone(client, session_id)
