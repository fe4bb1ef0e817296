"""Live sessions end to end over real HTTP trickle on 127.0.0.1."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from aiohttp.test_utils import TestServer

from live.app import create_app
from live.settings import Settings
from protocol.clips import make_clip, numbered_frame
from tests.live.conftest import FRAME_S, PIPELINES, OutOfMemoryOnce
from tests.live.streams import (
    EventLog,
    Viewer,
    publish_clip,
    run_stream,
    start_session,
    wait_gone,
    watch,
)


async def test_noop_session_delivers_every_frame_in_order_with_timestamps(service) -> None:
    client = await service()
    clip = make_clip(60)
    info, viewer, events = await run_stream(client, clip, body={"model_id": "noop"})
    assert viewer.indices == list(range(60))
    assert [f.pts for f in viewer.frames] == clip.pts
    for received in viewer.frames[:5]:
        expected = numbered_frame(received.index)
        assert np.abs(received.frame.astype(int) - expected).mean() < 6
    traces = [e["type"] for e in (x["event"] for x in events.events)]
    assert "runner_receive_stream_request" in traces
    assert "runner_receive_first_ingest_segment" in traces
    assert "runner_send_first_processed_segment" in traces
    final = events.of_type("status")[-1]
    assert final["frames_out"] == 60 and final["frames_dropped"] == 0
    assert final["latency"]["p50_ms"] is not None
    # The session is gone once its input ended.
    await wait_gone(client, info["session_id"])
    assert (await (await client.get("/health")).json())["status"] == "IDLE"


@pytest.mark.parametrize("codec", ["aac", "opus"])
async def test_audio_comes_out_in_its_own_codec_in_sync(service, codec) -> None:
    import av

    client = await service()
    clip = make_clip(90, audio=codec)
    _, viewer, _ = await run_stream(client, clip, body={"model_id": "cartoon"})
    assert len(viewer.frames) == 90
    assert {packet.codec for packet in viewer.audio} == {codec}  # passed through, not re-encoded
    audio_pts = [packet.pts for packet in viewer.audio]
    assert audio_pts == sorted(audio_pts)
    # Audio packets keep their own timestamps, on the same timeline as the video.
    assert set(audio_pts) <= set(clip.audio_pts)
    assert abs(audio_pts[0] - viewer.frames[0].pts) < 90_000 // 10
    decoder = av.CodecContext.create(codec, "r")
    rate = 48_000
    samples = sum(
        frame.samples for p in viewer.audio for frame in decoder.decode(av.Packet(p.data))
    )
    video_s = (viewer.frames[-1].pts - viewer.frames[0].pts) / 90_000 + 1 / 30
    assert abs(samples / rate - video_s) <= 1 / 30, (samples / rate, video_s)


async def test_cartoon_session_changes_every_frame(service) -> None:
    client = await service()
    clip = make_clip(30)
    _, viewer, _ = await run_stream(client, clip, body={"model_id": "cartoon"})
    assert len(viewer.frames) == 30
    for received in viewer.frames:
        original = numbered_frame(received.index)
        assert np.abs(received.frame.astype(int) - original).mean() > 10


async def test_slow_pipeline_drops_frames_and_latency_stays_flat(service) -> None:
    client = await service()
    clip = make_clip(30 * 30)  # 30 s at 30 fps
    _, viewer, events = await run_stream(client, clip, body={"model_id": "slow"})
    statuses = events.of_type("status")
    final = statuses[-1]
    got = [i for i in viewer.indices if i is not None]
    loading = len(viewer.frames) - len(got)  # stand-ins (no index) while the pipeline loads
    assert got == sorted(set(got)) and len(got) == final["frames_out"] > 0
    # The pipeline takes five frame intervals a frame: most frames are dropped, each counted.
    assert final["frames_out"] + final["frames_dropped"] + loading == final["frames_in"]
    assert final["frames_dropped"] > final["frames_out"]
    # Dropped, not queued, so the delay cannot grow: at no time were more frames inside the
    # session than its stages hold one each (paced, in the pipeline's slot, in the pipeline,
    # in the output's slot, being encoded), however fast the machine runs.
    inside = [s["frames_in"] - s["frames_out"] - s["frames_dropped"] - loading for s in statuses]
    assert max(inside) <= 5, inside


async def test_live_param_change_applies_without_reload(service) -> None:
    client = await service()
    clip = make_clip(90)

    async def change(info, viewer, events) -> None:
        await viewer.wait_frames(30)
        response = await client.post(
            f"/live-video-to-video/{info['session_id']}/params", json={"strength": 0.0}
        )
        assert response.status == 200
        assert (await response.json())["outcome"] == "live"

    _, viewer, events = await run_stream(
        client, clip, body={"model_id": "cartoon", "params": {"strength": 1.0}}, during=change
    )
    diffs = [np.abs(f.frame.astype(int) - numbered_frame(f.index)).mean() for f in viewer.frames]
    assert len(viewer.frames) == 90  # no loading frames, nothing lost
    assert min(diffs[:30]) > 10  # processed
    assert max(diffs[-20:]) < 6  # strength 0: the input
    assert not events.of_type("restart")


async def test_reload_param_shows_loading_frames_then_resumes(service) -> None:
    client = await service()
    clip = make_clip(120)

    async def change(info, viewer, events) -> None:
        await viewer.wait_frames(30)
        response = await client.post(
            f"/live-video-to-video/{info['session_id']}/params", json={"levels": 3}
        )
        assert (await response.json())["outcome"] == "reload"

    _, viewer, events = await run_stream(
        client, clip, body={"model_id": "slow-cartoon"}, during=change
    )
    indices = viewer.indices
    loading = [i for i, index in enumerate(indices) if index is None]
    first_loading = loading[0]
    assert 0 < first_loading
    after = indices[loading[-1] + 1 :]
    assert len(after) > 20 and after == sorted(after)  # resumed, in order
    assert len(viewer.frames) == 120  # a loading frame stands in for every frame meanwhile


async def test_control_channel_update_and_invalid_messages(service) -> None:
    client = await service()
    clip = make_clip(90)

    async def control(info, viewer, events) -> None:
        from protocol.trickle import TricklePublisher

        async with TricklePublisher(info["control_url"], "application/json") as publisher:
            await viewer.wait_frames(20)
            await publisher.write(b'{"keep":"alive"}')
            await publisher.write(b"{not json")
            await publisher.write(b'{"strength": "very"}')
            await publisher.write(b'{"strength": 0.0}')
            # The last message is read once the one after it is on its way (trickle reads
            # ahead); wait until the change shows rather than for a time.
            await events.wait_event(lambda e: "strength" in e.get("message", ""))

    _, viewer, events = await run_stream(client, clip, body={"model_id": "cartoon"}, during=control)
    errors = [e["message"] for e in events.of_type("error")]
    assert any("invalid control message" in m for m in errors)
    assert any("strength" in m for m in errors)
    diffs = [np.abs(f.frame.astype(int) - numbered_frame(f.index)).mean() for f in viewer.frames]
    assert len(viewer.frames) == 90 and max(diffs[-20:]) < 6


async def test_pipeline_failures_are_reported_and_the_pipeline_restarts(service) -> None:
    client = await service()
    _, viewer, events = await run_stream(client, make_clip(60), body={"model_id": "flaky"})
    assert len(events.of_type("error")) >= 3
    restarts = events.of_type("restart")
    assert restarts and restarts[0]["restart_count"] == 1
    good = [i for i in viewer.indices if i is not None]
    assert good[-1] == 59 and not set(good) & set(range(10, 14))


async def test_out_of_memory_restarts_the_pipeline_at_once(service) -> None:
    OutOfMemoryOnce.loads = 0
    # In process on purpose: it counts loads in a class attribute of this process (the worker
    # process's out-of-memory restart: test_worker_sessions).
    client = await service(worker_process=False)
    _, viewer, events = await run_stream(client, make_clip(60), body={"model_id": "oom-once"})
    # One failure is enough: a restart (a fresh load at the same params), not three errors.
    (restart,) = events.of_type("restart")
    assert "out of memory" in restart["restart_logs"][0]
    assert OutOfMemoryOnce.loads == 2
    good = [i for i in viewer.indices if i is not None]
    assert good[-1] == 59


async def test_bad_segments_are_reported_and_the_session_recovers(service) -> None:
    from protocol.trickle import TricklePublisher

    client = await service()
    info = await start_session(client, model_id="noop")
    viewer, events, tasks = watch(info)
    clip = make_clip(60)
    fresh = make_clip(30, first_pts=90_000 * 5)  # another encoder, restarted timestamps

    async def paced(writer, frames) -> None:
        for data in frames:
            await writer.write(data)
            await asyncio.sleep(FRAME_S)  # a camera's frame interval

    async with TricklePublisher(info["publish_url"]) as publisher:
        async with publisher.segment() as writer:
            await paced(writer, clip.segments[0])
        await publisher.write(b"\x00garbage bytes that are not MPEG-TS" * 100)
        async with publisher.segment() as writer:  # truncated mid-frame
            await paced(writer, clip.segments[1][:10])
            await writer.write(clip.segments[1][10][:500])
        # A publisher that vanishes mid-segment.
        with pytest.raises(RuntimeError):
            async with publisher.segment() as writer:
                await paced(writer, clip.segments[0][:5])
                raise RuntimeError("publisher gone")
        async with publisher.segment() as writer:
            await paced(writer, fresh.segments[0])
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    errors = [e["message"] for e in events.of_type("error")]
    assert any("bad MPEG-TS" in m or "decode" in m for m in errors), errors
    indices = viewer.indices
    assert indices[:40] == list(range(40))
    assert indices[-30:] == list(range(30))  # recovered on the next good segment
    pts = [f.pts for f in viewer.frames]
    assert pts == sorted(pts)  # one timeline across restarts and garbage


async def test_runner_mode_against_another_trickle_server(service, trickle_factory) -> None:
    client = await service(runner_hosts="127.0.0.1")
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    for suffix in ("", "-out", "-control", "-events"):
        orchestrator.server.create_channel("mid" + suffix)
    url = orchestrator.url("mid")
    body = {
        "subscribe_url": url,
        "publish_url": url + "-out",
        "control_url": url + "-control",
        "events_url": url + "-events",
        "model_id": "noop",
        "stream_id": "stream-1",
    }
    info = await start_session(client, **body)
    assert info["publish_url"] == url and info["subscribe_url"] == url + "-out"
    viewer = Viewer(url + "-out")
    events = EventLog(url + "-events")
    tasks = [asyncio.create_task(viewer.run()), asyncio.create_task(events.run())]
    await publish_clip(url, make_clip(45))
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert viewer.indices == list(range(45))
    assert events.of_type("status")


async def test_start_request_errors(service) -> None:
    client = await service(max_sessions=1)
    response = await client.post("/live-video-to-video", json={"model_id": "nope"})
    assert response.status == 400
    assert "noop" in (await response.json())["detail"]["msg"]
    response = await client.post(
        "/live-video-to-video", json={"model_id": "cartoon", "params": {"strength": 3}}
    )
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert detail[0]["loc"] == ["body", "params", "strength"] and detail[0]["type"]
    response = await client.post(
        "/live-video-to-video", json={"model_id": "cartoon", "params": {"unknown": 1}}
    )
    assert response.status == 422
    response = await client.post(
        "/live-video-to-video", data=b"{", headers={"Content-Type": "application/json"}
    )
    assert response.status == 400
    response = await client.post("/live-video-to-video", data=b"model_id=noop")
    assert response.status == 415
    response = await client.post("/live-video-to-video", json={"subscribe_url": "http://x/a"})
    assert response.status == 422  # as the runner: publish_url is required once a URL is given
    assert (await response.json())["detail"][0]["loc"] == ["body", "publish_url"]
    first = await start_session(client, model_id="noop")
    response = await client.post("/live-video-to-video", json={"model_id": "noop"})
    assert response.status == 503
    assert response.headers["Retry-After"]
    assert "maximum" in (await response.json())["detail"]["msg"]
    status = await client.get(f"/live-video-to-video/{first['session_id']}")
    assert status.status == 200
    deleted = await client.delete(f"/live-video-to-video/{first['session_id']}")
    assert deleted.status == 200
    assert (await client.delete(f"/live-video-to-video/{first['session_id']}")).status == 404


async def test_auth_token_is_required_when_set(service) -> None:
    client = await service(auth_token="s3cret")
    response = await client.post("/live-video-to-video", json={})
    assert response.status == 401
    response = await client.post(
        "/live-video-to-video",
        json={"model_id": "noop"},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert response.status == 200
    session_id = (await response.json())["session_id"]
    await client.delete(
        f"/live-video-to-video/{session_id}", headers={"Authorization": "Bearer s3cret"}
    )


async def test_session_ends_without_input(service) -> None:
    client = await service(input_timeout_s=0.5)
    info = await start_session(client, model_id="noop")
    events = EventLog(info["events_url"])
    await asyncio.wait_for(events.run(), 5)
    await wait_gone(client, info["session_id"])
    assert (await (await client.get("/health")).json())["status"] == "IDLE"


async def test_shutdown_stops_running_sessions(aiohttp_server, caplog) -> None:
    app = create_app(Settings(status_interval_s=0.5), PIPELINES)
    server: TestServer = await aiohttp_server(app)
    from aiohttp import ClientSession

    async with ClientSession() as http:
        async with http.post(
            server.make_url("/live-video-to-video"), json={"model_id": "noop"}
        ) as response:
            info = await response.json()
        async with http.get(server.make_url("/health")) as response:
            assert (await response.json())["status"] in ("LOADING", "OK")
    viewer, events, watching = watch(info)
    publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(300)))
    await viewer.wait_frames(10)
    with caplog.at_level("INFO"):
        await server.close()
    # The viewer sees the end, nothing hangs, and the last event says why.
    await asyncio.wait_for(watching[0], 10)
    final = await events.wait_event(lambda e: e["type"] == "status" and e["end_reason"])
    assert final["state"] == "OFFLINE" and final["end_reason"] == "shutdown"
    assert "reason=shutdown" in caplog.text
    # The event reader may be retrying a listener that is gone by now: it is not ours to wait.
    for task in (publishing, watching[1]):
        task.cancel()
    await asyncio.gather(publishing, watching[1], return_exceptions=True)
