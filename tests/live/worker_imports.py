"""Run by test_worker_sessions.py in a fresh interpreter: a streamdiffusion session, then a
text-to-image and an LLM request, with `--worker-process` on the tiny models, then which model
libraries the service's process holds.
Prints one JSON line: {"frames": N, "online": true, "batch": [200, 200], "imported": [...]}."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from aiohttp.test_utils import TestClient, TestServer

from live.app import create_app
from live.settings import Settings
from protocol.clips import make_clip
from tests.live.streams import publish_clip, watch

LIBRARIES = ("diffusers", "transformers", "torch")


async def main(models_dir: Path) -> None:
    settings = Settings(models_dir=models_dir, device="cpu", worker_process=True)
    async with TestClient(TestServer(create_app(settings))) as client:
        body = {
            "model_id": "streamdiffusion",
            "params": {"width": 64, "height": 64, "t_index_list": [10, 30], "prompt": "a cat"},
        }
        response = await client.post("/live-video-to-video", json=body)
        assert response.status == 200, await response.text()
        info = await response.json()
        viewer, events, tasks = watch(info)
        clip = make_clip(900, width=64, height=64)
        publishing = asyncio.create_task(publish_clip(info["publish_url"], clip))
        # Loading the libraries and the model in a fresh worker takes seconds on a busy CPU.
        async with asyncio.timeout(90), events._changed:
            await events._changed.wait_for(
                lambda: any(e["state"] == "ONLINE" for e in events.of_type("status"))
            )
        await viewer.wait_frames(len(viewer.frames) + 10)
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await asyncio.wait_for(asyncio.gather(*tasks), 30)
        publishing.cancel()
        await asyncio.gather(publishing, return_exceptions=True)
        batch = [
            await client.post(path, json=body)
            for path, body in (
                ("/text-to-image", {"prompt": "a cat", "width": 64, "height": 64}),
                ("/llm", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}),
            )
        ]
        result = {
            "frames": len(viewer.frames),
            "online": True,
            "batch": [response.status for response in batch],
            "imported": [name for name in LIBRARIES if name in sys.modules],
        }
    print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1])))
