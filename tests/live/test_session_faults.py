"""What users found when they tried the live spine (issue 8), each case over real HTTP trickle:
publishers that send whole segments, outputs that vanish, media the service cannot take, and
sessions whose end or state was not reported truthfully."""

from __future__ import annotations

import asyncio
import logging
from urllib.parse import urlsplit

import pytest
from aiohttp import ClientSession

from live.keys import SESSIONS, TRICKLE
from live.logs import SessionFilter
from live.pipelines.passthrough import NoopPipeline
from protocol.clips import audio_only_clip, foreign_clip, make_clip
from protocol.media import CLOCK
from protocol.trickle import TricklePublisher
from tests.live.streams import (
    WAIT_S,
    EventLog,
    Viewer,
    free_port,
    publish_clip,
    run_stream,
    start_session,
    wait_gone,
    watch,
)
from tests.waiting import wait_until

FRAME = CLOCK // 30


def final_status(events: EventLog) -> dict:
    status = events.of_type("status")[-1]
    assert status["end_reason"], "the last status of a session says why it ended"
    return status


async def test_whole_segment_posts_lose_no_frames_to_chunking(service) -> None:
    client = await service()
    clip = make_clip(150)  # five 1 s segments, each POSTed in one write when complete
    info = await start_session(client, model_id="noop")
    session = client.app[SESSIONS].sessions[info["session_id"]]
    viewer, events, tasks = watch(info)
    await publish_clip(info["publish_url"], clip, whole_segments=True, close=False)
    # The stream ends (DELETE) once the session has read the last segment: a DELETE ends the
    # channel at once, so a session still pacing the segment before would never get it.
    await wait_until(lambda: session.stats.frames_in >= 150, "every frame into the session")
    async with ClientSession() as http:
        await http.delete(info["publish_url"])
    await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)

    final = final_status(events)
    # Every frame of every whole-segment POST was decoded, and none was lost before the
    # pipeline: noop is never busy, so whatever a burst's chunking does, each frame reaches it.
    assert final["frames_in"] == 150
    (sink,) = final["sinks"]
    assert final["frames_dropped"] == sink["dropped"]
    # The burst was spread to its frame times (held by the pacer), not handed on at once.
    assert final["stages"]["pace"]["p50_ms"] > 0
    # What went out kept its order and timestamps; the rest is counted as dropped (an encoder
    # slower than the frame rate, as on a loaded machine, drops at the output only).
    got = [i for i in viewer.indices if i is not None]
    loading = len(viewer.frames) - len(got)  # stand-ins (no index) while noop loads
    assert len(got) == final["frames_out"] == sink["sent"] - loading
    assert final["frames_out"] + final["frames_dropped"] + loading == 150
    assert got == sorted(got) and got[-1] == 149
    # Most went out: unpaced, each burst leaves the encoder about one frame in fifteen.
    assert len(got) > 150 // 2, len(got)
    by_index = dict(zip(viewer.indices, (f.pts for f in viewer.frames), strict=True))
    assert all(by_index[i] == clip.pts[i] for i in got)  # timestamps kept


async def test_output_channel_deleted_mid_stream_ends_the_session(service, caplog) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    session_id = info["session_id"]
    viewer, events, tasks = watch(info)
    publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(300)))
    await viewer.wait_frames(15)
    with caplog.at_level(logging.INFO):
        # As an orchestrator closing its channel would (outside clients may not delete it).
        output = info["subscribe_url"].rsplit("/", 1)[1]
        assert client.app[TRICKLE].delete_channel(output)
        await wait_gone(client, session_id)
    await asyncio.wait_for(tasks[1], 10)
    final = final_status(events)
    assert final["end_reason"] == "output closed" and final["state"] == "OFFLINE"
    assert "never retrieved" not in caplog.text and "Traceback" not in caplog.text
    publishing.cancel()
    await asyncio.gather(publishing, tasks[0], return_exceptions=True)


async def test_odd_size_params_are_refused_up_front(service) -> None:
    client = await service()
    response = await client.post(
        "/live-video-to-video", json={"model_id": "noop", "params": {"width": 17, "height": 17}}
    )
    assert response.status == 422
    detail = (await response.json())["detail"]
    assert {tuple(d["loc"]) for d in detail} == {
        ("body", "params", "width"),
        ("body", "params", "height"),
    }
    assert "multiple of 2" in detail[0]["msg"]


async def test_odd_size_input_is_cropped_to_even_and_flows(service) -> None:
    client = await service()
    clip = make_clip(30, width=321, height=241)
    _, viewer, events = await run_stream(client, clip, body={"model_id": "noop"})
    assert len(viewer.frames) == 30
    assert {f.frame.shape[:2] for f in viewer.frames} == {(240, 320)}
    assert not events.of_type("error")
    assert final_status(events)["end_reason"] == "input ended"


@pytest.mark.parametrize(
    ("segment", "message"),
    [
        (lambda: foreign_clip("mpeg2video"), "MPEG-2 video in MPEG-TS is not supported"),
        (lambda: foreign_clip("vp9"), "VP9 in MPEG-TS is not supported: send H.264 or HEVC"),
        (audio_only_clip, "the input has no video stream (audio only)"),
    ],
    ids=["mpeg2", "vp9", "audio-only"],
)
async def test_media_the_service_cannot_take_is_reported(service, segment, message) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    events = EventLog(info["events_url"])
    reading = asyncio.create_task(events.run())
    async with TricklePublisher(info["publish_url"]) as publisher:
        await publisher.write(segment())
        error = await events.wait_event(lambda e: e["type"] == "error")
    assert message in error["message"]
    await asyncio.wait_for(reading, 20)
    assert final_status(events)["end_reason"] == "input ended"


async def test_b_frames_decode_every_frame_with_its_timestamp(service) -> None:
    client = await service()
    clip = make_clip(60, bframes=2)
    _, viewer, events = await run_stream(client, clip, body={"model_id": "noop"})
    assert viewer.indices == list(range(60))
    assert [f.pts for f in viewer.frames] == clip.pts
    assert not events.of_type("error")


async def test_a_pts_wrap_loses_no_frame_and_counters_count_what_was_sent(service) -> None:
    client = await service()
    clip = make_clip(90, first_pts=2**33 - 45 * FRAME)  # wraps half way through
    _, viewer, events = await run_stream(client, clip, body={"model_id": "noop"})
    assert viewer.indices == list(range(90))
    pts = [f.pts for f in viewer.frames]
    assert pts == sorted(pts) and len(set(pts)) == 90
    assert final_status(events)["frames_out"] == 90


async def test_runner_mode_unreachable_input_is_an_error_and_a_true_end(
    service, trickle_factory
) -> None:
    client = await service(runner_hosts="127.0.0.1")
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    for suffix in ("-out", "-events"):
        orchestrator.server.create_channel("gw" + suffix)
    events = EventLog(orchestrator.url("gw-events"))
    reading = asyncio.create_task(events.run())
    info = await start_session(
        client,
        model_id="noop",
        subscribe_url=f"http://127.0.0.1:{free_port()}/ai/trickle/gw",
        publish_url=orchestrator.url("gw-out"),
        events_url=orchestrator.url("gw-events"),
    )
    retry = await events.wait_event(lambda e: e["type"] == "error")
    assert "cannot reach" in retry["message"] and "retry 1 of 5" in retry["message"]
    error = await events.wait_event(lambda e: "cannot read the input" in e.get("message", ""))
    assert "retry" not in error["message"]
    await wait_gone(client, info["session_id"])
    final = await events.wait_event(lambda e: e["type"] == "status" and e["end_reason"])
    assert final["state"] == "ERROR" and final["end_reason"].startswith("input failed")
    reading.cancel()
    await asyncio.gather(reading, return_exceptions=True)


@pytest.mark.parametrize(
    "url", ["file:///etc/passwd", "gopher://127.0.0.1:70/x", "http://", "not a url"]
)
async def test_runner_mode_malformed_urls_are_refused_before_starting(service, url) -> None:
    client = await service(runner_hosts="*")
    response = await client.post(
        "/live-video-to-video",
        json={"model_id": "noop", "subscribe_url": url, "publish_url": "http://127.0.0.1:1/o"},
    )
    assert response.status == 400
    assert "subscribe_url" in (await response.json())["detail"]["msg"]
    assert not client.app[SESSIONS].sessions


async def test_delete_publishes_a_final_status_that_says_stopped(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    viewer, events, tasks = watch(info)
    publishing = asyncio.create_task(publish_clip(info["publish_url"], make_clip(300)))
    await viewer.wait_frames(10)
    assert (await client.delete(f"/live-video-to-video/{info['session_id']}")).status == 200
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    final = final_status(events)
    assert final["state"] == "OFFLINE" and final["end_reason"] == "stopped"
    assert final["frames_out"] == len(viewer.frames)
    publishing.cancel()
    await asyncio.gather(publishing, return_exceptions=True)


async def test_a_normal_end_is_offline_and_traces_come_in_order(service) -> None:
    client = await service()
    _, viewer, events = await run_stream(client, make_clip(30), body={"model_id": "noop"})
    final = final_status(events)
    assert final["state"] == "OFFLINE" and final["end_reason"] == "input ended"
    traces = [e["type"] for e in (x["event"] for x in events.events) if e["type"] != "status"]
    assert traces[:3] == [
        "runner_receive_stream_request",
        "runner_receive_first_ingest_segment",
        "runner_send_first_processed_segment",
    ]


class LoggingPipeline(NoopPipeline):
    """Logs from the inference thread, as a real pipeline's libraries do."""

    name = "logging"

    def process(self, image):
        logging.getLogger("tests.pipeline").info("frame processed")
        return image


async def test_every_log_line_of_a_session_names_it_threads_included(service) -> None:
    # In process on purpose: the pipeline's lines from this process's inference threads (a
    # worker process's lines reach the service's stderr: test_service_log).
    client = await service(worker_process=False)
    client.app[SESSIONS].pipelines["logging"] = LoggingPipeline
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    handler.addFilter(SessionFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    old_level = root.level
    root.setLevel(logging.INFO)
    try:
        runs = [run_stream(client, make_clip(15), body={"model_id": "logging"}) for _ in range(2)]
        results = await asyncio.gather(*runs)
        for info, _, _ in results:
            await wait_gone(client, info["session_id"])  # its last line is written by then
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)
    ids = {info["session_id"] for info, _, _ in results}
    processed = [r for r in records if r.getMessage() == "frame processed"]
    assert {r.session for r in processed} == ids  # type: ignore[attr-defined]
    assert all(r.threadName.startswith("infer") for r in processed)
    ended = [r for r in records if r.getMessage().startswith("session ended")]
    assert {r.session for r in ended} == ids  # type: ignore[attr-defined]


async def test_params_a_pipeline_has_no_use_for_are_ignored_not_errors(service) -> None:
    client = await service()
    clip = make_clip(90)

    async def probe(info, viewer, events) -> None:
        await viewer.wait_frames(10)
        async with TricklePublisher(info["control_url"], "application/json") as control:
            await control.write(b'{"prompt": "probe", "width": 128, "height": 128}')
            # Messages apply in order: once this one shows, the probe was handled.
            await control.write(b'{"show_reloading_frame": false}')
            status = await events.wait_event(
                lambda e: (
                    e["type"] == "status"
                    and (e["inference_status"]["last_params"] or {}).get("show_reloading_frame")
                    is False
                )
            )
        params = status["inference_status"]["last_params"]
        assert params["width"] is None and "prompt" not in params

    _, viewer, events = await run_stream(client, clip, body={"model_id": "noop"}, during=probe)
    assert not events.of_type("error")
    assert len(viewer.frames) == 90
    states = [s["state"] for s in events.of_type("status")[1:-1]]
    assert "DEGRADED_INFERENCE" not in states


async def test_a_rejected_control_message_degrades_only_until_frames_flow(service) -> None:
    client = await service()
    clip = make_clip(120)

    async def bad(info, viewer, events) -> None:
        await viewer.wait_frames(10)
        async with TricklePublisher(info["control_url"], "application/json") as control:
            await control.write(b'{"strength": "very"}')
            error = await events.wait_event(lambda e: e["type"] == "error")
            assert "strength" in error["message"]
            at = events.events.index(next(x for x in events.events if x["event"] is error))
            await events.wait_event(lambda e: e["type"] == "status", after=at + 1)
            back = await events.wait_event(
                lambda e: e["type"] == "status" and e["state"] == "ONLINE", after=at + 1
            )
        assert back["inference_status"]["last_error"] == error["message"]

    _, viewer, events = await run_stream(client, clip, body={"model_id": "cartoon"}, during=bad)
    assert len(viewer.frames) == 120


async def test_a_publisher_that_drops_mid_segment_does_not_freeze_the_input(service) -> None:
    """A publisher whose connection drops mid-segment, then comes back with the next seq: the
    session moves on at once (the dropped segment is ended) instead of waiting for it to fall
    out of the ring, which lost the next four segments."""
    client = await service()
    info = await start_session(client, model_id="noop")
    viewer = Viewer(info["subscribe_url"])
    reading = asyncio.create_task(viewer.run())
    clip = make_clip(90)
    parts = urlsplit(info["publish_url"])
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    writer.write(
        f"POST {parts.path}/0 HTTP/1.1\r\nHost: {parts.netloc}\r\n"
        "Transfer-Encoding: chunked\r\n\r\n".encode()
    )
    for data in clip.segments[0][:10]:
        writer.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    await writer.drain()
    await viewer.wait_frames(5)
    writer.transport.abort()  # the connection drops, no end of body, no DELETE
    # It comes back with the next seq, as a reconnecting publisher does.
    async with TricklePublisher(info["publish_url"], start_seq=1) as publisher:
        for frames in clip.segments[1:]:
            await publisher.write(b"".join(frames))
        # Before it ends the stream (its close deletes the channel), what it sent gets out.
        await viewer.wait_frames(70)
    await asyncio.wait_for(reading, 30)
    got = [i for i in viewer.indices if i is not None]
    assert set(range(30, 90)) <= set(got), ("segments after the drop were lost", got)
    assert got == sorted(got)
