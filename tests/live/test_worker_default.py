"""Live sessions' pipelines run in a worker process by default (`--no-worker-process` runs them
in the service's own process), and a pipeline the worker process cannot import is refused in
words, not with the AttributeError its import would raise there."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from live.app import create_app
from live.keys import SESSIONS
from live.pipelines.passthrough import NoopPipeline
from live.settings import Settings, parse_settings
from tests.live.conftest import PIPELINES
from tests.live.streams import EventLog, start_session, wait_gone

HOW_TO_FIX = "--no-worker-process"


def pipeline_made_in_a_function() -> type[NoopPipeline]:
    class Inverted(NoopPipeline):
        name = "inverted"

        def process(self, image: np.ndarray) -> np.ndarray:
            return 255 - image

    return Inverted


def test_pipelines_run_in_worker_processes_unless_turned_off() -> None:
    assert parse_settings([], {}).worker_process is True
    assert parse_settings([], {}).runtime().worker_process is True
    assert parse_settings(["--no-worker-process"], {}).runtime().worker_process is False
    assert parse_settings([], {"LIVE_V2V_WORKER_PROCESS": "false"}).worker_process is False
    # The flag wins over the variable, as for every setting.
    on = parse_settings(["--worker-process"], {"LIVE_V2V_WORKER_PROCESS": "0"})
    assert on.worker_process is True


def test_a_pipeline_made_in_a_function_is_refused_at_start() -> None:
    cls = pipeline_made_in_a_function()
    with pytest.raises(ValueError, match="is defined inside a function") as refused:
        create_app(Settings(), {**PIPELINES, cls.name: cls})
    assert HOW_TO_FIX in str(refused.value)
    create_app(Settings(worker_process=False), {**PIPELINES, cls.name: cls})  # in process: runs


async def test_a_pipeline_added_later_that_no_import_reaches_fails_its_session_in_words(
    aiohttp_client,
) -> None:
    client = await aiohttp_client(
        create_app(Settings(status_interval_s=0.5, trickle_linger_s=0.05), PIPELINES)
    )
    cls = pipeline_made_in_a_function()
    client.app[SESSIONS].pipelines[cls.name] = cls  # as an embedding application may
    info = await start_session(client, model_id=cls.name)
    events = EventLog(info["events_url"])
    reading = asyncio.create_task(events.run())
    error = await events.wait_event(lambda e: e["type"] == "error")
    assert "is defined inside a function" in error["message"], error
    assert HOW_TO_FIX in error["message"] and "AttributeError" not in error["message"]
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    await wait_gone(client, info["session_id"])
    await reading
