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
INPUT_TIMEOUT_S = 5.0
"""Longer than the 2 s after which a session without input reports DEGRADED_INPUT."""

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


async def run(
    command: str, cwd: Path, stdout: int = asyncio.subprocess.DEVNULL, **env: str
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        shutil.which("bash") or "/bin/bash",
        "-c",
        command,
        cwd=cwd,
        env={**os.environ, **env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=stdout,
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


async def start_by_recipe(service_url: str, cwd: Path) -> dict[str, str]:
    """README's session start, run as written; then the variables it set, as the recipes after
    it see them in the same shell."""
    shown = 'printf "%s\\n" "$SESSION_ID" "$PUBLISH_URL" "$SUBSCRIBE_URL"'
    shell = await run(
        f"{recipe('field()')}\n{shown}", cwd, stdout=asyncio.subprocess.PIPE, SERVICE=service_url
    )
    out, err = await asyncio.wait_for(shell.communicate(), WAIT_S)
    assert shell.returncode == 0, err.decode()
    session_id, publish_url, subscribe_url = out.decode().split()
    return {"SESSION_ID": session_id, "PUBLISH_URL": publish_url, "SUBSCRIBE_URL": subscribe_url}


async def state(client, session_id: str) -> str | None:
    response = await client.get(f"/live-video-to-video/{session_id}")
    return (await response.json())["state"] if response.status == 200 else None


def video_frames(path: Path) -> int:
    with av.open(str(path)) as container:
        return sum(1 for _ in container.decode(video=0))


@pytest.mark.parametrize(
    ("marker", "end"),
    [("-f segment", "delete"), ("-method POST", "input timeout")],
    ids=["segment-then-delete", "long-post-then-input-timeout"],
)
async def test_readme_ffmpeg_recipes_start_feed_read_and_end_a_session(
    service, tmp_path, marker, end
) -> None:
    client = await service(input_timeout_s=INPUT_TIMEOUT_S)
    service_url = str(client.make_url("")).rstrip("/")
    urls = await start_by_recipe(service_url, tmp_path)
    session_id = urls["SESSION_ID"]
    session = client.app[SESSIONS].sessions[session_id]
    assert session.pipeline_cls.name == "cartoon"
    reader = await run(recipe("while curl"), tmp_path, **urls)
    publisher = await run(recipe(marker), tmp_path, **urls)
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
    if end == "delete":
        deleting = await run(recipe("-X DELETE"), tmp_path, SERVICE=service_url, **urls)
        _, err = await asyncio.wait_for(deleting.communicate(), WAIT_S)
        assert deleting.returncode == 0, err.decode()
    else:
        # The publisher is gone: the session waits for it in DEGRADED_INPUT, then ends alone.
        async def degraded() -> bool:
            return await state(client, session_id) == "DEGRADED_INPUT"

        await wait_until(degraded, "the session to wait for its input in DEGRADED_INPUT")
    await asyncio.wait_for(session.wait(), WAIT_S)
    assert await state(client, session_id) is None
    if end != "delete":
        assert session.ended == "no input"
    # The reader's loop ends with the session (its output channel is gone).
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
