"""What `live-v2v serve` writes to its log, read from the real process's stderr as an operator
sees it: a warning when it listens beyond loopback with no token, and no library chatter that
reads like a fault when a model loads."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import os
import re
import signal
import sys
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

import aiohttp
import pytest

from live.logs import NOISY, configure_logging
from protocol.http_errors import AIOHTTP_SERVER_LOGGER
from runtime.library_logs import LIBRARIES, route_library_logs
from tests.waiting import wait_until

from .streams import WAIT_S

ROOT = Path(__file__).resolve().parents[2]
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (?P<level>[A-Z]+) (?P<logger>\S+) ")
"""A line in the service's own text format: time, level, logger."""
LISTENING = re.compile(r"listening url=http://[^:]+:(?P<port>\d+)")
NO_TOKEN = "beyond loopback, with no token"


class Serve:
    """`python -m live serve ...` (what the `live-v2v` script runs) with its stderr collected
    line by line as it comes."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process
        self.lines: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.process.stderr is not None
        async for raw in self.process.stderr:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    def text(self) -> str:
        return "\n".join(self.lines)

    async def wait_line(self, match: Callable[[str], object], what: str, within: float) -> str:
        found: list[str] = []

        def seen() -> bool:
            found[:] = [line for line in self.lines if match(line)]
            if not found and self.process.returncode is not None:
                pytest.fail(f"the service exited before {what}:\n{self.text()}")
            return bool(found)

        await wait_until(seen, what, within=within)
        return found[0]

    async def port(self) -> int:
        line = await self.wait_line(LISTENING.search, "its listening line", WAIT_S)
        found = LISTENING.search(line)
        assert found is not None
        return int(found["port"])

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self.process.wait(), WAIT_S)
        except TimeoutError:
            self.process.kill()
            await self.process.wait()
        await self._reader


@contextlib.asynccontextmanager
async def serve(args: Sequence[str], env: dict[str, str] | None = None) -> AsyncIterator[Serve]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LIVE_V2V_")}
    environment.pop("AUTH_TOKEN", None)
    # One torch thread: a tiny model gains nothing from more on a shared machine.
    environment.update({"OMP_NUM_THREADS": "1", **(env or {})})
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "live",
        "serve",
        "--port",
        "0",
        *args,
        cwd=ROOT,
        env=environment,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    running = Serve(process)
    try:
        yield running
    finally:
        await running.stop()


async def test_listening_beyond_loopback_without_a_token_warns_at_start() -> None:
    async with serve(["--host", "0.0.0.0"]) as service:
        port = await service.port()
        warning = await service.wait_line(
            lambda line: NO_TOKEN in line, "the no-token warning", WAIT_S
        )
    found = LINE.match(warning)
    assert found is not None and found["level"] == "WARNING", warning
    assert f"0.0.0.0:{port}" in warning
    assert "--auth-token" in warning and "AUTH_TOKEN" in warning


@pytest.mark.parametrize(
    ("args", "env"),
    [(["--host", "0.0.0.0"], {"AUTH_TOKEN": "secret"}), (["--host", "127.0.0.1"], {})],
    ids=["with-a-token", "on-loopback"],
)
async def test_no_warning_with_a_token_or_on_loopback(args: list[str], env: dict[str, str]) -> None:
    async with serve(args, env) as service:
        await service.port()
    assert NO_TOKEN not in service.text()


@pytest.mark.parametrize("first", ["streamdiffusion", "text-to-image"])
async def test_a_tiny_model_load_logs_no_library_chatter(tiny_models_dir, first: str) -> None:
    # diffusers and transformers write warnings of their own to stderr on a normal load (config
    # keys they ignore, "modules ... should be kept in float32: []", a missing torchvision),
    # outside the service's format and reading like faults. Each kind of load comes first in a
    # process of its own: the libraries set up their logging when first imported.
    async with serve(["--models-dir", str(tiny_models_dir), "--device", "cpu"]) as service:
        port = await service.port()
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            if first == "streamdiffusion":
                async with http.post(
                    f"{base}/live-video-to-video", json={"model_id": "streamdiffusion"}
                ) as response:
                    assert response.status == 200, await response.text()
                    session_id = (await response.json())["session_id"]
                await service.wait_line(
                    lambda line: "pipeline ready" in line, "the pipeline to be ready", within=100
                )
                async with http.delete(f"{base}/live-video-to-video/{session_id}") as response:
                    assert response.status == 200
            else:
                body = {
                    "prompt": "a lighthouse",
                    "model_id": "stabilityai/sd-turbo",
                    "width": 64,
                    "height": 64,
                    "num_inference_steps": 1,
                }
                async with http.post(
                    f"{base}/text-to-image", json=body, timeout=aiohttp.ClientTimeout(100)
                ) as response:
                    assert response.status == 200, await response.text()
    assert f"model ready {first}" in service.text()
    for line in service.lines:
        found = LINE.match(line)
        assert found is not None, f"a line outside the service's log format:\n{service.text()}"
        # The service's own warnings may stand (streamdiffusion on a CPU says it is not real
        # time); a library's may not.
        ours = found["logger"].split(".")[0] in ("live", "runtime", "batch", "protocol")
        assert ours or found["level"] in ("DEBUG", "INFO"), f"{line}\n\nin:\n{service.text()}"


@pytest.mark.parametrize(("level", "shown"), [("INFO", False), ("DEBUG", True)])
def test_library_warnings_show_only_at_debug(level: str, shown: bool) -> None:
    # In-process, with the service's logging set up as `--log-level LEVEL` sets it; logging is
    # process-wide, so every logger touched is put back afterwards.
    # (aiohttp's server logger gets a filter that other tests check the absence of.)
    touched = [logging.getLogger(name) for name in ("", *NOISY, *LIBRARIES, AIOHTTP_SERVER_LOGGER)]
    saved = [(lg, lg.handlers[:], lg.filters[:], lg.level, lg.propagate) for lg in touched]
    stream = io.StringIO()
    try:
        configure_logging(level, "text", stream)
        route_library_logs()
        logging.getLogger("diffusers.configuration_utils").warning("config key ignored")
        logging.getLogger("transformers.modeling_utils").error("weights missing")
    finally:
        for lg, handlers, filters, lvl, propagate in saved:
            lg.handlers[:], lg.filters[:] = handlers, filters
            lg.setLevel(lvl)
            lg.propagate = propagate
    text = stream.getvalue()
    assert ("DEBUG diffusers.configuration_utils [-]: config key ignored" in text) == shown, text
    assert "WARNING" not in text
    assert "ERROR transformers.modeling_utils [-]: weights missing" in text
