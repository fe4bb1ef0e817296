"""Issue 9 with the token on: runner mode only towards hosts the operator allowed, clean 4xx
for a client's mistakes, Livepeer's error shapes, and one-line CLI errors."""

from __future__ import annotations

import subprocess
import sys

import pytest
from aiohttp import web

from live.keys import SESSIONS

TOKEN = "s3cret"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
async def victim(aiohttp_server):
    """A listener that counts every request it gets: SSRF attempts must never reach it."""
    seen: list[str] = []

    async def record(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", record)
    server = await aiohttp_server(app)
    return server, seen


def runner_body(base: str) -> dict:
    return {
        "model_id": "noop",
        "subscribe_url": f"{base}/ai/trickle/x",
        "publish_url": f"{base}/ai/trickle/x-out",
        "control_url": f"{base}/ai/trickle/x-control",
        "events_url": f"{base}/ai/trickle/x-events",
    }


async def test_runner_mode_is_off_unless_the_operator_names_hosts(service, victim) -> None:
    server, seen = victim
    client = await service(auth_token=TOKEN)
    response = await client.post(
        "/live-video-to-video", json=runner_body(str(server.make_url("")).rstrip("/")), headers=AUTH
    )
    assert response.status == 403
    assert "--runner-hosts" in (await response.json())["detail"]["msg"]
    assert seen == []


async def test_runner_mode_refuses_hosts_not_allowed(service, victim) -> None:
    server, seen = victim
    client = await service(auth_token=TOKEN, runner_hosts="orchestrator.example:8935")
    for base in (str(server.make_url("")).rstrip("/"), f"http://localhost:{server.port}"):
        response = await client.post("/live-video-to-video", json=runner_body(base), headers=AUTH)
        assert response.status == 403
        assert "not an allowed trickle host" in (await response.json())["detail"]["msg"]
    for url in ("file:///etc/passwd", "gopher://127.0.0.1:70/_x"):
        body = {**runner_body(str(server.make_url("")).rstrip("/")), "control_url": url}
        response = await client.post("/live-video-to-video", json=body, headers=AUTH)
        assert response.status == 400
    assert seen == []
    assert not client.app[SESSIONS].sessions


async def test_the_token_guards_the_api_with_a_bearer_challenge(service) -> None:
    client = await service(auth_token=TOKEN)
    for method, path in (
        ("POST", "/live-video-to-video"),
        ("GET", "/live-video-to-video/abc"),
        ("POST", "/live-video-to-video/abc/params"),
        ("DELETE", "/live-video-to-video/abc"),
    ):
        response = await client.request(method, path, json={})
        assert response.status == 401, path
        assert response.headers["WWW-Authenticate"] == "Bearer"
    wrong = await client.post(
        "/live-video-to-video", json={}, headers={"Authorization": "Bearer nope"}
    )
    assert wrong.status == 401


async def test_a_trailing_slash_starts_a_session_too(service) -> None:
    client = await service(auth_token=TOKEN)
    response = await client.post("/live-video-to-video/", json={"model_id": "noop"}, headers=AUTH)
    assert response.status == 200
    session_id = (await response.json())["session_id"]
    await client.delete(f"/live-video-to-video/{session_id}", headers=AUTH)


async def test_a_deeply_nested_body_is_a_400_not_a_500(service) -> None:
    client = await service(auth_token=TOKEN)
    body = b"[" * 200_000 + b"]" * 200_000
    response = await client.post(
        "/live-video-to-video",
        data=body,
        headers={**AUTH, "Content-Type": "application/json"},
    )
    assert response.status == 400
    assert "nested" in (await response.json())["detail"]["msg"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "live", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--log-level", "bogus"], "--log-level"),
        (["--dtype", "int8"], "--dtype"),
        (["--device", "tpu"], "--device"),
        (["--default-pipeline", "bogus", "--port", "0"], "--default-pipeline 'bogus'"),
    ],
)
def test_cli_mistakes_are_one_line_that_says_what_to_change(args, says) -> None:
    result = run_cli(*args)
    assert result.returncode == 2
    assert says in result.stderr
    assert "Traceback" not in result.stderr
    assert len([line for line in result.stderr.splitlines() if "error" in line]) == 1


def test_a_port_in_use_is_one_line_too() -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        result = run_cli("--port", str(sock.getsockname()[1]), "--log-level", "WARNING")
    assert result.returncode == 2
    assert "cannot listen on 127.0.0.1" in result.stderr and "--port" in result.stderr
    assert "Traceback" not in result.stderr
