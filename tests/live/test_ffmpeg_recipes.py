"""README's "Publish with ffmpeg" recipes, run as written (Debian's ffmpeg and curl, through
bash, with the session's URLs in the environment) against the real service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import shutil
import signal
from pathlib import Path

import av
import pytest

from live.keys import SESSIONS
from tests.waiting import wait_until

from .streams import WAIT_S, start_session

FFMPEG = Path("/usr/bin/ffmpeg")
README = Path(__file__).resolve().parents[2] / "README.md"
FRAMES = 60
"""Output frames that must come out while the publisher still runs (2 s at 30 fps)."""

pytestmark = pytest.mark.skipif(not FFMPEG.exists(), reason="needs Debian's ffmpeg")


def recipes() -> list[str]:
    """The shell blocks of README's "Publish with ffmpeg" section, in order."""
    text = README.read_text()
    section = text.split("#### Publish with ffmpeg", 1)[1].split("\n#", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def recipe(marker: str) -> str:
    found = [block for block in recipes() if marker in block]
    assert len(found) == 1, f"README has no single ffmpeg recipe with {marker!r}"
    return found[0]


async def run(command: str, cwd: Path, **urls: str) -> asyncio.subprocess.Process:
    env = {**os.environ, **urls}
    return await asyncio.create_subprocess_exec(
        shutil.which("bash") or "/bin/bash",
        "-c",
        command,
        cwd=cwd,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: stopped as a whole, as Ctrl-C would
    )


async def stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
    try:
        await asyncio.wait_for(process.wait(), WAIT_S)
    except TimeoutError:
        os.killpg(process.pid, signal.SIGKILL)
        await process.wait()


def video_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize("marker", ["-f segment", "-method POST"], ids=["segment", "long-post"])
async def test_readme_ffmpeg_recipe_feeds_a_session_and_the_reader_gets_its_output(
    service, tmp_path, marker
) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    session = client.app[SESSIONS].sessions[info["session_id"]]
    reader = await run(recipe("curl"), tmp_path, SUBSCRIBE_URL=info["subscribe_url"])
    publisher = await run(recipe(marker), tmp_path, PUBLISH_URL=info["publish_url"])
    try:
        # Frames come out of the session while the publisher is still at work (for the long
        # POST: while its one segment is still streaming).
        await wait_until(
            lambda: session.stats.frames_out >= FRAMES or publisher.returncode is not None,
            f"{FRAMES} frames out of the session",
            within=60,
        )
        assert publisher.returncode is None, (await publisher.stderr.read()).decode()[-2000:]
        assert session.stats.frames_out >= FRAMES
    finally:
        await stop(publisher)
        # The reader's loop ends with the session (its output channel is gone).
        await client.delete(f"/live-video-to-video/{info['session_id']}")
        await asyncio.wait_for(reader.wait(), WAIT_S)
    output = tmp_path / "output.ts"
    assert output.exists(), (await reader.stderr.read()).decode()[-2000:]
    assert video_frames(output) >= FRAMES


async def test_ffmpeg_posting_to_the_channel_url_itself_is_refused_and_logged(
    service, tmp_path, caplog
) -> None:
    # `-method POST $PUBLISH_URL` (no seq) was answered 200, every byte dropped, nothing
    # logged. ffmpeg never reads a POST's answer (it exits 0 either way), so the refusal shows
    # in the service's log, and the 400 names the URL to use (tests/protocol).
    caplog.set_level(logging.INFO, logger="protocol.trickle.server")
    client = await service()
    info = await start_session(client, model_id="noop")
    session = client.app[SESSIONS].sessions[info["session_id"]]
    command = (
        "ffmpeg -nostdin -re -f lavfi -i testsrc=size=320x240:rate=30 -t 2 -c:v libx264 "
        '-preset ultrafast -f mpegts -method POST "$PUBLISH_URL"'
    )
    ffmpeg = await run(command, tmp_path, PUBLISH_URL=info["publish_url"])
    await asyncio.wait_for(ffmpeg.communicate(), 60)
    assert "body posted to the create route refused" in caplog.text
    assert session.stats.frames_in == 0
    await client.delete(f"/live-video-to-video/{info['session_id']}")
