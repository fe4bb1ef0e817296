"""Live sessions' pipelines run in a worker process by default (`--no-worker-process` runs them
in the service's own process), and a pipeline the worker process cannot import is refused in
words, not with the AttributeError its import would raise there."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from live.app import create_app
from live.keys import SESSIONS
from live.pipelines.passthrough import NoopPipeline
from live.settings import Settings, parse_settings
from tests.live.conftest import PIPELINES
from tests.live.streams import EventLog, free_port, start_session, wait_gone
from tests.live.test_service import STARTUP_S
from tests.live.test_worker_sessions import health_of, service_up
from tests.waiting import wait_until

ROOT = Path(__file__).resolve().parents[2]

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
    # A copy: the app keeps the dict it is given, and the one pipeline added below is this
    # test's alone.
    settings = Settings(status_interval_s=0.5, trickle_linger_s=0.05)
    client = await aiohttp_client(create_app(settings, dict(PIPELINES)))
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


SCRIPT = """import sys
from live.cli import main
if __name__ == "__main__":
    sys.exit(main())
"""
"""What pip writes as the `live-v2v` command (a script, not `python -m live`)."""

SERVICE_LIBRARIES = ("/aiohttp/", "/av/")
"""Paths of the service's compiled libraries, as a process's memory map shows them once
imported (aiohttp's HTTP parser, PyAV's codecs)."""


def libraries_of(pid: int) -> list[str]:
    maps = Path(f"/proc/{pid}/maps").read_text()
    return [lib for lib in SERVICE_LIBRARIES if lib in maps]


async def test_the_live_v2v_script_starts_workers_without_the_service_in_them(tmp_path) -> None:
    script = tmp_path / "live-v2v"
    script.write_text(SCRIPT)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *(str(script), "serve", "--device", "cpu", "--port", str(port)),
        stderr=subprocess.DEVNULL,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        cwd=tmp_path,
    )
    try:
        async with aiohttp.ClientSession() as http:
            await service_up(http, base)
            async with http.post(f"{base}/live-video-to-video", json={"model_id": "cartoon"}) as r:
                assert r.status == 200, await r.text()

            pids: list[int] = []

            async def worker_ready() -> bool:
                body = await health_of(http, base)
                workers = (body or {}).get("workers", [])
                pids[:] = [w["pid"] for w in workers if w["state"] == "ready"]
                return bool(pids)

            await wait_until(worker_ready, "the worker process", within=STARTUP_S)
            in_worker = await asyncio.to_thread(libraries_of, pids[0])
            assert in_worker == []
            # What the check looks for is there in the service's own process.
            assert await asyncio.to_thread(libraries_of, proc.pid) == list(SERVICE_LIBRARIES)
    finally:
        proc.send_signal(signal.SIGTERM)
        await asyncio.wait_for(proc.wait(), 30)
