"""Session recording and replay: a session recorded over real trickle, then its recording run
through a pipeline offline (in process and by the `live-v2v replay` command)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import stat
import subprocess
import sys
from pathlib import Path

from live.edges import MediaContext
from live.pipelines.passthrough import NoopPipeline
from live.recording import CONTROL, INPUT, OUTPUT, ReplaySource, replay
from live.stats import SessionStats
from protocol.clips import make_clip, read_index
from protocol.media import VideoFrame
from tests.live.streams import publish_clip, start_session, wait_gone, watch

FRAMES = 60
REPO = Path(__file__).resolve().parents[2]


async def recorded_frames(path: Path) -> list[VideoFrame]:
    errors: list[str] = []
    context = MediaContext(errors.append, SessionStats(), logging.getLogger("test"))
    source = ReplaySource(path)
    try:
        frames = [item async for item in source.items(context) if isinstance(item, VideoFrame)]
    finally:
        await source.close()
    assert not errors, errors
    return frames


async def record_session(client, **body) -> tuple[dict, list]:
    """A noop session fed FRAMES numbered frames, with one params change while it runs."""
    info = await start_session(client, model_id="noop", **body)
    viewer, events, tasks = watch(info)
    publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(FRAMES)))
    await viewer.wait_frames(10)
    changed = await client.post(
        f"/live-video-to-video/{info['session_id']}/params", json={"show_reloading_frame": False}
    )
    assert changed.status == 200, await changed.text()
    await asyncio.wait_for(publishing, 30)
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    await wait_gone(client, info["session_id"])
    return info, viewer.frames


async def test_a_recorded_session_replays_to_as_many_frames(service, tmp_path) -> None:
    client = await service(record_dir=tmp_path)
    info, seen = await record_session(client)
    directory = tmp_path / info["session_id"]
    assert {INPUT, OUTPUT, CONTROL} <= {p.name for p in directory.iterdir()}

    recorded_in = await recorded_frames(directory / INPUT)
    assert [read_index(f.image) for f in recorded_in] == list(range(FRAMES))
    recorded_out = await recorded_frames(directory / OUTPUT)
    assert len(recorded_out) == len(seen)  # what the viewer got, the recording kept
    assert [f.pts for f in recorded_out] == [f.pts for f in seen]

    control = [json.loads(line) for line in (directory / CONTROL).read_text().splitlines()]
    assert control[0]["outcome"] == "start" and control[1]["outcome"] in ("live", "reload")
    assert control[0]["params"]["show_reloading_frame"] is True
    assert control[1]["params"]["show_reloading_frame"] is False
    assert 0 <= control[0]["t"] < control[1]["t"]
    assert control[0]["time_ms"] <= control[1]["time_ms"]
    assert control[0]["pts"] is None and control[1]["pts"] is not None

    result = await replay(directory, NoopPipeline)
    assert (result.frames_in, result.frames_out) == (FRAMES, FRAMES)
    assert result.params_changes == 1 and not result.errors
    replayed = await recorded_frames(result.output)
    assert [read_index(f.image) for f in replayed] == list(range(FRAMES))
    assert [f.pts for f in replayed] == [f.pts for f in recorded_in]


async def test_only_sessions_that_ask_are_recorded_when_not_all_are(service, tmp_path) -> None:
    client = await service(record_dir=tmp_path, record_all=False)
    plain = await start_session(client, model_id="noop")
    asked = await start_session(client, model_id="noop", record=True)
    for info in (plain, asked):
        await client.delete(f"/live-video-to-video/{info['session_id']}")
    assert [p.name for p in tmp_path.iterdir()] == [asked["session_id"]]
    control = (tmp_path / asked["session_id"] / CONTROL).read_text().splitlines()
    assert json.loads(control[0])["outcome"] == "start"


async def test_asking_for_a_recording_when_recording_is_off_is_a_400(service) -> None:
    client = await service()
    response = await client.post("/live-video-to-video", json={"model_id": "noop", "record": True})
    assert response.status == 400
    assert "--record-dir" in (await response.json())["detail"]["msg"]
    response = await client.post("/live-video-to-video", json={"record": "maybe"})
    assert response.status == 422


async def test_a_recording_dir_that_cannot_be_made_is_a_503(service, tmp_path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    client = await service(record_dir=blocker)
    response = await client.post("/live-video-to-video", json={"model_id": "noop"})
    assert response.status == 503
    assert "cannot record" in (await response.json())["detail"]["msg"]


async def test_recordings_are_readable_by_the_service_s_user_alone(service, tmp_path) -> None:
    """A recording is someone's video and prompts: 0700 folders, 0600 files (they were 0755
    and 0644), whatever the umask, the record dir included when the service makes it."""
    record_dir = tmp_path / "made" / "by-the-service"
    old_umask = os.umask(0o022)
    try:
        client = await service(record_dir=record_dir)
        info = await start_session(client, model_id="noop")
        viewer, events, tasks = watch(info)
        await publish_clip(info["publish_url"], make_clip(15), realtime=False)
        await asyncio.wait_for(asyncio.gather(*tasks), 20)
        await wait_gone(client, info["session_id"])
    finally:
        os.umask(old_umask)
    assert viewer.frames
    directory = record_dir / info["session_id"]

    def check_modes() -> None:  # on a thread: the test's loop is watched for blocking calls
        for folder in (record_dir.parent, record_dir, directory):
            assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
        files = sorted(p.name for p in directory.iterdir())
        assert {INPUT, OUTPUT, CONTROL} <= set(files)
        for name in files:
            assert stat.S_IMODE((directory / name).stat().st_mode) == 0o600, name

    await asyncio.to_thread(check_modes)
    result = await replay(directory, NoopPipeline)  # a replay's output is private too
    assert stat.S_IMODE((await asyncio.to_thread(result.output.stat)).st_mode) == 0o600


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "live", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_the_replay_command_prints_frames_in_and_out(service, tmp_path) -> None:
    client = await service(record_dir=tmp_path)
    info, _ = await record_session(client)
    directory = tmp_path / info["session_id"]
    done = await asyncio.to_thread(
        run_cli, "replay", str(directory), "--pipeline", "noop", "--params", "{}"
    )
    assert done.returncode == 0, done.stderr
    assert f"frames in {FRAMES} out {FRAMES}" in done.stdout
    assert "params changes 0" in done.stdout
    assert (directory / "replay-noop.ts").stat().st_size > 0


def test_replay_command_mistakes_are_one_line(tmp_path) -> None:
    for args, says in (
        (("replay", str(tmp_path), "--pipeline", "nope"), "unknown pipeline 'nope'"),
        (("replay", str(tmp_path), "--pipeline", "noop"), "not a session recording"),
        (("replay", str(tmp_path), "--pipeline", "noop", "--params", "{"), "not JSON"),
        (("replay", str(tmp_path), "--pipeline", "noop", "--params", "[]"), "JSON object"),
    ):
        done = run_cli(*args)
        assert done.returncode == 2, (args, done.stderr)
        assert says in done.stderr and "Traceback" not in done.stderr, done.stderr
