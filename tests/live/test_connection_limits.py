"""Slow and idle connections against the service as `live-v2v serve` runs it (ServiceRunner on
a real port), attacked with raw sockets: connections that send nothing, headers dripped a byte
at a time, bodies that stall, more connections than the limit; and the long trickle POSTs a
real publisher makes, which must go on working."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import subprocess
import sys
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from live.app import create_app
from live.http_server import ACCEPT_ERROR, GuardedServer, ServiceRunner, quiet_accept_errors
from live.keys import SESSIONS
from live.settings import Settings
from protocol.clips import make_clip
from tests.live.streams import free_port, publish_clip, start_session
from tests.live.test_service import STARTUP_S
from tests.waiting import wait_until

WAIT_S = 20.0  # generous: only a broken guard reaches it


class Service:
    def __init__(self, runner: ServiceRunner) -> None:
        self.runner = runner
        self.port = runner.addresses[0][1]
        self.url = f"http://127.0.0.1:{self.port}"

    @property
    def server(self) -> GuardedServer:
        server = self.runner.server
        assert isinstance(server, GuardedServer)
        return server

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)


@pytest.fixture
async def serve() -> AsyncIterator:
    runners: list[ServiceRunner] = []

    async def start(**overrides: object) -> Service:
        settings = Settings(status_interval_s=0.5, **overrides)
        runner = ServiceRunner(
            create_app(settings),
            settings.connection_limits(),
            access_log=None,
            shutdown_timeout=2.0,
            handler_cancellation=True,
        )
        await runner.setup()
        runners.append(runner)
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return Service(runner)

    yield start
    for runner in runners:
        await runner.cleanup()


async def read_all(reader: asyncio.StreamReader) -> bytes:
    """Everything the service sends until it closes the connection."""
    return await asyncio.wait_for(reader.read(), WAIT_S)


async def test_a_connection_that_sends_nothing_gets_408_and_is_closed(serve) -> None:
    service = await serve(http_header_timeout_s=0.3)
    reader, writer = await service.connect()
    answer = await read_all(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout"), answer
    assert b"--http-header-timeout-s" in answer


async def test_headers_dripped_a_byte_at_a_time_are_cut_off(serve) -> None:
    service = await serve(http_header_timeout_s=0.5)
    reader, writer = await service.connect()
    request = b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-Slow: " + b"a" * 2_000
    sent = 0
    # A byte whenever the service has said nothing for a while: the request would take
    # minutes to finish; the service closes the connection long before.
    while sent < len(request):
        writer.write(request[sent : sent + 1])
        sent += 1
        try:
            answer = await asyncio.wait_for(reader.read(), 0.05)
            break
        except TimeoutError:
            continue
    else:
        pytest.fail("the whole dripped request was taken")
    writer.close()
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert sent < len(request)


async def test_a_body_that_stalls_is_cut_off(serve) -> None:
    service = await serve(http_body_timeout_s=0.3)
    reader, writer = await service.connect()
    writer.write(
        b"POST /live-video-to-video HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 100\r\n\r\n{"
    )
    await wait_until(lambda: service.server.open_connections == 1, "the connection")
    assert await read_all(reader) == b""  # closed without an answer
    writer.close()
    assert service.runner.app[SESSIONS].sessions == {}


async def test_an_idle_kept_alive_connection_is_closed(serve) -> None:
    service = await serve(http_idle_timeout_s=0.3)
    reader, writer = await service.connect()
    writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = await read_all(reader)  # the answer, then the close once idle
    writer.close()
    assert answer.startswith(b"HTTP/1.1 200 OK"), answer


async def test_health_answers_past_the_connection_limit(serve) -> None:
    limit = 8
    service = await serve(max_connections=limit, http_header_timeout_s=60)
    silent = [await service.connect() for _ in range(3 * limit)]
    await wait_until(lambda: service.server.open_connections == limit, "the limit to fill")
    async with aiohttp.ClientSession() as http:
        for _ in range(3):
            async with http.get(f"{service.url}/health") as response:
                assert response.status == 200
    assert service.server.open_connections <= limit
    # The oldest idle connections made room: closed by the service.
    closed = [await read_all(reader) for reader, _ in silent[: 2 * limit]]
    assert closed == [b""] * (2 * limit)
    for _, writer in silent:
        writer.close()


async def test_past_the_limit_with_every_connection_busy_a_new_one_gets_503(serve) -> None:
    limit = 4
    service = await serve(max_connections=limit, http_body_timeout_s=60)
    busy = []
    for _ in range(limit):
        reader, writer = await service.connect()
        # A request in flight: headers in, the body still coming.
        writer.write(
            b"POST /live-video-to-video HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nContent-Length: 100\r\n\r\n{"
        )
        busy.append((reader, writer))
    await wait_until(
        lambda: (
            service.server.open_connections == limit
            and not any(h.idle for h in service.server._open)
        ),
        "every connection to have a request in flight",
    )
    reader, writer = await service.connect()
    answer = await read_all(reader)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 503 Service Unavailable"), answer
    assert b"Retry-After: 1" in answer and b"--max-connections" in answer
    for _, busy_writer in busy:
        busy_writer.close()


async def test_a_trickle_publisher_streams_for_longer_than_the_timeouts(serve) -> None:
    """Segments of 1 s at a camera's pace, the next segment's POST opened ahead and idle until
    it starts: more than the header and body timeouts pass in all, and nothing is cut."""
    service = await serve(http_header_timeout_s=0.5, http_body_timeout_s=1.5)
    async with aiohttp.ClientSession(base_url=service.url) as http:
        info = await start_session(http, model_id="noop")
    session = service.runner.app[SESSIONS].get(info["session_id"])
    clip = make_clip(90, width=64, height=64)  # 3 s
    await asyncio.wait_for(publish_clip(info["publish_url"], clip, close=False), WAIT_S)
    await wait_until(lambda: session.stats.frames_in == 90, "every frame in", within=WAIT_S)


async def test_malformed_requests_get_400_and_one_log_line(serve, caplog) -> None:
    service = await serve()
    answers = []
    with caplog.at_level(logging.DEBUG):
        for index in range(50):
            reader, writer = await service.connect()
            long_line = b"X-Long: " + b"a" * 9_000 if index % 2 else b"GET /" + b"a" * 9_000
            writer.write(long_line + b"\r\n\r\n")
            answers.append(await read_all(reader))
            writer.close()
    assert all(answer.startswith(b"HTTP/1.0 400 Bad Request") for answer in answers)
    said = [
        r
        for r in caplog.records
        if r.name in ("aiohttp.server", "live.http_server") and r.levelno >= logging.INFO
    ]
    assert len(said) == 1, [r.getMessage() for r in said]
    assert "malformed request answered 400" in said[0].getMessage()
    assert said[0].exc_info is None


def test_failed_accepts_are_logged_once_per_interval(caplog) -> None:
    loop = asyncio.new_event_loop()
    restore = quiet_accept_errors(loop, interval_s=3600)
    try:
        with caplog.at_level(logging.WARNING, logger="live.http_server"):
            for _ in range(1_000):
                # What asyncio's accept loop reports at each attempt when out of files.
                loop.call_exception_handler(
                    {"message": ACCEPT_ERROR, "exception": OSError(24, "Too many open files")}
                )
    finally:
        restore()
        loop.close()
    said = [r for r in caplog.records if "cannot accept connections" in r.getMessage()]
    assert len(said) == 1
    assert "Too many open files" in said[0].getMessage()


async def test_the_cli_stays_up_past_the_open_files_limit(tmp_path) -> None:
    """The issue's attack, scaled: `live-v2v serve` under `ulimit -n 400`, and more silent
    connections than that. The connection limit fits itself under the open-files limit, so
    accept() never runs out of files and /health keeps answering."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "live", "serve", "--port", str(port)),
        *("--models-dir", str(tmp_path), "--http-header-timeout-s", "600"),
        stderr=subprocess.PIPE,
        env={**os.environ, "LIVE_V2V_LOG_LEVEL": "INFO"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (400, 400)),
    )
    silent: list[asyncio.StreamWriter] = []
    try:
        # A new connection for every request, as a health checker makes.
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as http:

            async def health() -> bool:
                try:
                    async with http.get(
                        f"http://127.0.0.1:{port}/health",
                        timeout=aiohttp.ClientTimeout(total=5),
                    ) as response:
                        return response.status == 200
                except (aiohttp.ClientError, TimeoutError):
                    return False

            await wait_until(health, "the service to start", within=STARTUP_S, poll=0.1)
            for _ in range(500):
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                silent.append(writer)
            await wait_until(health, "/health past 500 silent connections", within=WAIT_S)
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(proc.communicate(), WAIT_S)
    finally:
        for writer in silent:
            writer.close()
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    log = stderr.decode()
    assert "--max-connections 512 lowered to 144" in log, log
    assert "accept" not in log and "Traceback" not in log, log
