"""Frames that wait are dropped, never queued: a live source's frames are never held back, and a
WHIP publisher's frames that piled up behind a stalled stage give way to the newest."""

from __future__ import annotations

import threading

from live.keys import SESSIONS
from live.memory_io import MemorySink, MemorySource
from live.rtc_receive import FreshDecodeQueue
from tests.live.streams import start_session
from tests.live.test_frame_loop import WAIT_S, indices, run_burst
from tests.live.test_webrtc import NumberedTrack, Watcher, negotiate, peer
from tests.waiting import wait_until

STALL_FRAMES = 60  # frames the camera sends while the conversion is held (2 s at 30 fps)


class LiveMemorySource(MemorySource):
    """Frames as a WebRTC publisher delivers them: each when it was captured."""

    arrives_live = True


async def test_a_live_source_burst_is_not_paced_the_newest_frame_goes_on() -> None:
    # A burst from a live source means the service fell behind (a stalled event loop): these
    # frames are already late, so the loop keeps the newest rather than pacing them all out.
    sink = MemorySink(primary=True)
    session = await run_burst(LiveMemorySource(), sink)
    got = indices(sink)
    assert got == sorted(got) and got[-1] == 59
    assert len(got) < 30, f"{len(got)} of 60 frames went out: the burst was paced, not dropped"
    assert session.stats.frames_out + session.stats.frames_dropped == 60


async def test_whip_frames_behind_a_stalled_conversion_give_way_to_the_newest(service) -> None:
    client = await service(ice_host_addresses="127.0.0.1")
    # A pipeline that takes RGB: for `noop` the source makes none, so it has no conversion.
    info = await start_session(client, model_id="identity")
    session = client.app[SESSIONS].get(info["session_id"])
    publisher = peer()
    camera = NumberedTrack()
    publisher.addTrack(camera)
    watcher = Watcher("video/VP8")
    held = threading.Event()
    release = threading.Event()
    try:
        await negotiate(publisher, info["whip_url"])
        await negotiate(watcher.pc, info["whep_url"])
        await watcher.wait_frames(10)
        # The publisher's frames reach aiortc's decoder through the bounded queue.
        assert isinstance(session.whip._decode_queue, FreshDecodeQueue)

        def hold() -> None:
            held.set()
            release.wait(WAIT_S)

        # Hold the WHIP source's conversion thread, as a starved machine would: the decoded
        # frames that arrive meanwhile have nowhere to go but a queue.
        session.whip._thread.submit(hold)
        await wait_until(held.is_set, "the conversion to be held")
        stalled_at = camera.sent
        await wait_until(
            lambda: camera.sent >= stalled_at + STALL_FRAMES, "the camera to send on", within=30
        )
        in_before, dropped_before = session.stats.frames_in, session.stats.frames_dropped
        released_at = camera.sent
        release.set()
        # A frame captured after the release reaches the viewer: whatever waited is behind it.
        await wait_until(
            lambda: any(i is not None and i >= released_at for i in watcher.indices),
            "a frame sent after the stall to reach the viewer",
            within=30,
        )
        taken = session.stats.frames_in - in_before
        dropped = session.stats.frames_dropped - dropped_before
        # Without dropping, all STALL_FRAMES frames would enter the session, one by one, ahead
        # of the new ones; here the backlog is dropped at once and counted.
        assert taken < STALL_FRAMES // 2, f"the session took {taken} frames of the backlog"
        assert dropped >= STALL_FRAMES // 2, f"only {dropped} stale frames counted as dropped"
        seen = [i for i in watcher.indices if i is not None]
        assert seen == sorted(seen)
        backlog = [i for i in seen if stalled_at + 2 < i < released_at - 10]
        assert len(backlog) <= 2, f"the viewer was shown {len(backlog)} frames of the backlog"
    finally:
        release.set()
        await watcher.close()
        await publisher.close()
        await client.delete(f"/live-video-to-video/{info['session_id']}")
