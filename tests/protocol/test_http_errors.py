"""A request aiohttp cannot parse is the client's mistake: with `quiet_client_errors` installed it
is answered 4xx and logged as one INFO line, never as an ERROR with a traceback; our own errors
still are."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web

from protocol.http_errors import AIOHTTP_SERVER_LOGGER, ClientErrorFilter, quiet_client_errors
from tests.waiting import wait_until

WAIT_S = 5.0
LONG_PATH = "/trickle/" + "a" * (8200 - len("/trickle/"))


@pytest.fixture
def quiet() -> Iterator[ClientErrorFilter]:
    installed = quiet_client_errors()
    try:
        yield installed
    finally:
        logging.getLogger(AIOHTTP_SERVER_LOGGER).removeFilter(installed)


async def raw_request(url: str, path: str) -> bytes:
    """Send a GET for `path` by hand (aiohttp's client would refuse to) and return the status
    line of the answer."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: {parts.netloc}\r\n\r\n".encode())
        return await asyncio.wait_for(reader.readline(), WAIT_S)
    finally:
        writer.close()
        await writer.wait_closed()


def errors_with_traceback(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno >= logging.ERROR and r.exc_info]


async def refused_status(trickle, caplog) -> int:
    assert len(LONG_PATH) == 8200
    status_line = await raw_request(trickle.url(), LONG_PATH)
    status = int(status_line.split()[1])
    # aiohttp logs after it has written the answer: wait for the record, not for time.
    await wait_until(
        lambda: any(r.name == AIOHTTP_SERVER_LOGGER for r in caplog.records),
        "aiohttp's record of the refused request",
        within=WAIT_S,
    )
    return status


async def test_without_the_filter_aiohttp_logs_an_error_traceback(trickle, caplog) -> None:
    # Pins down what the filter is for, so an aiohttp upgrade that changes it is noticed.
    caplog.set_level(logging.DEBUG, logger=AIOHTTP_SERVER_LOGGER)
    assert 400 <= await refused_status(trickle, caplog) < 500
    assert errors_with_traceback(caplog)


async def test_long_path_is_refused_without_an_error_traceback(trickle, caplog, quiet) -> None:
    caplog.set_level(logging.DEBUG, logger=AIOHTTP_SERVER_LOGGER)
    assert 400 <= await refused_status(trickle, caplog) < 500
    assert not errors_with_traceback(caplog)
    [record] = [r for r in caplog.records if r.name == AIOHTTP_SERVER_LOGGER]
    assert record.levelno == logging.INFO
    assert record.exc_info is None
    message = record.getMessage()
    assert "bad request refused" in message
    assert "\n" not in message
    assert len(message) < 400  # the 8,200 bytes are not copied into the log
    # The server goes on serving.
    async with aiohttp.ClientSession() as session:
        async with session.get(trickle.url("c/next")) as resp:
            assert resp.status == 404


async def test_a_handler_error_keeps_its_traceback(aiohttp_server, caplog, quiet) -> None:
    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("a bug of ours")

    app = web.Application()
    app.router.add_get("/broken", broken)
    server = await aiohttp_server(app)
    caplog.set_level(logging.DEBUG, logger=AIOHTTP_SERVER_LOGGER)
    async with aiohttp.ClientSession() as session:
        async with session.get(server.make_url("/broken")) as resp:
            assert resp.status == 500
    [record] = errors_with_traceback(caplog)
    assert isinstance(record.exc_info[1], RuntimeError)


def test_installing_twice_installs_once(quiet) -> None:
    assert quiet_client_errors() is quiet
    logger = logging.getLogger(AIOHTTP_SERVER_LOGGER)
    assert sum(isinstance(f, ClientErrorFilter) for f in logger.filters) == 1
