"""`--log-format json`: the service's own logging configuration, one JSON object per line."""

from __future__ import annotations

import contextvars
import io
import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest

from live.logs import NOISY, PIPELINE, SESSION_ID, STAGE, configure_logging
from live.settings import parse_settings
from live.threads import run_in
from protocol.clips import make_clip
from protocol.http_errors import AIOHTTP_SERVER_LOGGER
from tests.live.streams import run_stream, wait_gone


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    """The service's logging set up as `--log-format json` would, writing into a buffer. Logging
    is process-wide: every logger it touches is put back afterwards (handlers, levels, and the
    filter it puts on aiohttp's server logger, which other tests check the absence of)."""
    root = logging.getLogger()
    touched = [logging.getLogger(name) for name in (*NOISY, AIOHTTP_SERVER_LOGGER)]
    saved = [(lg, lg.handlers[:], lg.filters[:], lg.level) for lg in (root, *touched)]
    stream = io.StringIO()
    configure_logging("INFO", parse_settings(["--log-format", "json"]).log_format, stream)
    try:
        yield stream
    finally:
        for lg, handlers, filters, level in saved:
            lg.handlers[:], lg.filters[:] = handlers, filters
            lg.setLevel(level)


def lines(stream: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def test_the_format_is_a_setting() -> None:
    assert parse_settings([]).log_format == "text"
    assert parse_settings([], {"LIVE_V2V_LOG_FORMAT": "json"}).log_format == "json"
    with pytest.raises(ValueError, match="log_format"):
        parse_settings(["--log-format", "xml"])


def test_a_line_in_a_session_names_it(json_log: io.StringIO) -> None:
    def in_session() -> None:
        SESSION_ID.set("abc123")
        PIPELINE.set("noop")
        STAGE.set("inference")
        logging.getLogger("live.test").warning("frame %d late", 7)

    contextvars.copy_context().run(in_session)
    logging.getLogger("live.other").info("outside any session")
    inside, outside = lines(json_log)
    assert inside["level"] == "WARNING"
    assert inside["logger"] == "live.test"
    assert inside["message"] == "frame 7 late"
    assert (inside["session"], inside["pipeline"], inside["stage"]) == (
        "abc123",
        "noop",
        "inference",
    )
    assert inside["time"].endswith("+00:00")
    assert "exc_info" not in inside
    assert outside["message"] == "outside any session"
    assert not {"session", "pipeline", "stage"} & set(outside)


def test_an_exception_is_one_field(json_log: io.StringIO) -> None:
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("live.test").exception("it failed")
    (line,) = lines(json_log)
    assert line["message"] == "it failed"
    assert line["level"] == "ERROR"
    assert "RuntimeError: boom" in line["exc_info"]
    assert line["exc_info"].startswith("Traceback")


async def test_a_session_writes_its_lines_with_its_context(service, json_log) -> None:
    client = await service()
    body = {"model_id": "flaky"}  # fails on frames 10 to 13
    info, _, _ = await run_stream(client, make_clip(20), body=body)
    await wait_gone(client, info["session_id"])
    logged = lines(json_log)
    failed = [line for line in logged if line["message"].startswith("pipeline failed on a frame")]
    assert failed
    for line in failed:
        # The pipeline's message in words, not the exception's repr (RuntimeError('boom')).
        assert line["message"].startswith("pipeline failed on a frame: boom"), line["message"]
        assert line["level"] == "WARNING"
        assert (line["session"], line["pipeline"]) == (info["session_id"], "flaky")
        assert line["stage"] == "inference"  # written by the frame loop's inference task
    (ended,) = [line for line in logged if line["message"].startswith("session ended")]
    assert (ended["session"], ended["pipeline"]) == (info["session_id"], "flaky")
    assert "stage" not in ended


async def test_threads_carry_the_context(json_log: io.StringIO) -> None:
    SESSION_ID.set("s1")
    STAGE.set("inference")
    with ThreadPoolExecutor(1) as pool:
        await run_in(pool, logging.getLogger("live.test").info, "from a thread")
    (line,) = lines(json_log)
    assert (line["session"], line["stage"]) == ("s1", "inference")
