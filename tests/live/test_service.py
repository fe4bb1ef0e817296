"""The service as a user starts it: settings, the app, the CLI process and its shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys

import aiohttp
import pytest

from live.app import create_app
from live.keys import TRICKLE
from live.settings import Settings, parse_settings
from tests.live.streams import free_port
from tests.waiting import wait_until

STARTUP_S = 30.0
"""Generous bound for the service process to start answering (only a hung start reaches it)."""


def test_settings_come_from_flags_then_env_then_defaults() -> None:
    env = {"LIVE_V2V_PORT": "9001", "AUTH_TOKEN": "secret", "LIVE_V2V_TRICKLE_AUTOCREATE": "true"}
    settings = parse_settings(["--port", "9002", "--models-dir", "/m"], env)
    assert settings.port == 9002  # flag beats env
    assert settings.auth_token == "secret"  # ai-runner's variable name
    assert settings.trickle_autocreate is True
    assert str(settings.models_dir) == "/m"
    assert parse_settings([], {}).port == 8000


def test_invalid_setting_is_refused_with_its_name() -> None:
    with pytest.raises(ValueError, match="port"):
        parse_settings(["--port", "not-a-port"], {})


def test_trickle_base_path_is_normalised() -> None:
    assert Settings(trickle_base_path="ai/trickle").trickle().base_path == "/ai/trickle/"


async def test_health_is_idle_without_sessions(aiohttp_client) -> None:
    client = await aiohttp_client(create_app(Settings()))
    response = await client.get("/health")
    assert response.status == 200
    assert (await response.json())["status"] == "IDLE"


async def test_unknown_route_answers_json_detail(aiohttp_client) -> None:
    client = await aiohttp_client(create_app(Settings()))
    response = await client.get("/no-such-route")
    assert response.status == 404
    assert "msg" in (await response.json())["detail"]


@pytest.mark.parametrize("base", ["/trickle/", "/ai/trickle/"])
async def test_trickle_is_mounted_at_the_configured_base(aiohttp_client, base: str) -> None:
    app = create_app(Settings(trickle_base_path=base))
    client = await aiohttp_client(app)
    app[TRICKLE].create_channel("c")
    response = await client.post(f"{base}c/0", data=b"hello")
    assert response.status == 200 and response.headers["Lp-Trickle-Seq"] == "0"
    response = await client.get(f"{base}c/0")
    assert await response.read() == b"hello"
    # Trickle keeps go-livepeer's plain-text dialect, not the API's JSON errors.
    response = await client.get(f"{base}missing/0")
    assert response.status == 404 and await response.text() == "Stream not found\n"


def test_protocol_does_not_import_torch() -> None:
    code = "import sys, protocol.trickle; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("command", [["-m", "live", "serve"], ["-m", "live"]])
async def test_cli_serves_and_stops_cleanly_on_sigterm(command: list[str]) -> None:
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        *command,
        "--port",
        str(port),
        stderr=subprocess.PIPE,
        env={**os.environ, "LIVE_V2V_LOG_LEVEL": "INFO"},
    )
    try:
        async with aiohttp.ClientSession() as session:

            async def serving() -> bool:
                try:
                    async with session.get(f"http://127.0.0.1:{port}/health") as response:
                        assert (await response.json())["status"] == "IDLE"
                        return True
                except aiohttp.ClientConnectionError:
                    return False

            await wait_until(serving, "the service to start", within=STARTUP_S, poll=0.1)
            # A reader parked at the live edge must not hold shutdown up: open a session and
            # park a GET on its output, which has no segment yet.
            async with session.post(
                f"http://127.0.0.1:{port}/live-video-to-video", json={"model_id": "noop"}
            ) as response:
                info = await response.json()
            parked = asyncio.create_task(session.get(info["subscribe_url"] + "/0"))
            # Parked once the service has answered something after it on the same loop.
            async with session.get(f"http://127.0.0.1:{port}/health") as response:
                assert response.status == 200
            proc.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.wait_for(proc.communicate(), 10)
            answer = await asyncio.wait_for(parked, 10)
            assert answer.status == 200 and "Lp-Trickle-Closed" in answer.headers
            answer.release()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0, stderr.decode()
    log = stderr.decode()
    assert f"listening url=http://127.0.0.1:{port}" in log
    assert "stopped" in log and "Traceback" not in log


def test_help_documents_every_setting() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "live", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for name in Settings.model_fields:
        assert "--" + name.replace("_", "-") in out
    assert "AUTH_TOKEN" in out


async def test_trickle_wrong_method_stays_plain_text(aiohttp_client) -> None:
    app = create_app(Settings())
    client = await aiohttp_client(app)
    app[TRICKLE].create_channel("c")
    response = await client.put("/trickle/c/0")
    assert response.status == 405
    assert "POST" in response.headers["Allow"]
    assert response.content_type == "text/plain"


async def test_version_and_hardware_answer_the_runners_shapes(aiohttp_client) -> None:
    from protocol.api import HardwareInformation, HardwareStats, Version

    client = await aiohttp_client(create_app(Settings()))
    version = Version.model_validate(await (await client.get("/version")).json())
    assert version.pipeline == "live-video-to-video" and version.version
    assert version.model_id == "cartoon"  # the default live pipeline without diffusion weights
    info = HardwareInformation.model_validate(await (await client.get("/hardware/info")).json())
    stats = HardwareStats.model_validate(await (await client.get("/hardware/stats")).json())
    # This machine has no CUDA GPU: an empty map, not an error (a GPU machine lists each one).
    import torch

    assert len(info.gpu_info) == len(stats.gpu_stats) == torch.cuda.device_count()
