"""A live session fed by trickle publishers written elsewhere, spoken over a bare socket
(tests/raw_publisher.py): ffmpeg's habit of closing right after a segment's last byte, and the
request sequence of Livepeer's gateway SDK (`livepeer-gateway` MediaPublish) for video and for
control messages.
"""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from live.keys import SESSIONS
from protocol.clips import make_clip
from tests.raw_publisher import PreconnectingPublisher, post_and_close
from tests.waiting import wait_until

from .streams import WAIT_S, start_session, wait_gone, watch

SEGMENTS = 100


def session_of(client, info: dict):
    return client.app[SESSIONS].sessions[info["session_id"]]


async def ask_next(http: aiohttp.ClientSession, url: str) -> int:
    """What MediaPublish asks before its first POST; -1 when no Lp-Trickle-Latest comes back."""
    async with http.get(f"{url}/next") as response:
        latest = response.headers.get("Lp-Trickle-Latest")
    return int(latest) if latest is not None else -1


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_session_input_keeps_every_segment_of_a_publisher_that_closes_at_once(
    service, framing
) -> None:
    client = await service()
    clip = make_clip(2 * SEGMENTS, segment_s=1 / 15)
    assert len(clip.segments) == SEGMENTS
    info = await start_session(client, model_id="noop")
    viewer, _, tasks = watch(info)
    session = session_of(client, info)
    sent = 0
    async with aiohttp.ClientSession() as http:
        try:
            for frames in clip.segments:
                await post_and_close(
                    f"{info['publish_url']}/{sent // 2}", b"".join(frames), framing
                )
                sent += len(frames)
                # Next segment once this one is in: a camera's pace, without a clock.
                await wait_until(
                    lambda sent=sent: session.stats.frames_in >= sent,
                    f"frame {sent} into the session (got {session.stats.frames_in})",
                    within=WAIT_S,
                )
            # The last frame always goes out (the newest is never dropped); those before it
            # may not, if the output is slower than the frame rate (a loaded machine).
            await wait_until(
                lambda: bool(viewer.frames) and viewer.frames[-1].index == sent - 1,
                f"frame {sent - 1} out",
                within=WAIT_S,
            )
        finally:
            await http.delete(info["publish_url"])
            await asyncio.wait_for(asyncio.gather(*tasks), WAIT_S)
    stats = session.stats
    assert stats.frames_in == 2 * SEGMENTS
    # Out in order, each frame once; loading frames (no index) stand in while noop loads; what
    # did not go out is counted as dropped.
    got = [i for i in viewer.indices if i is not None]
    loading = len(viewer.frames) - len(got)
    assert got == sorted(set(got)) and len(got) == stats.frames_out
    assert stats.frames_out + stats.frames_dropped + loading == 2 * SEGMENTS
    await wait_gone(client, info["session_id"])


@pytest.mark.parametrize("next_answered", [True, False], ids=["next", "no-next"])
async def test_gateway_sdk_request_sequence_reaches_the_session(service, next_answered) -> None:
    # MediaPublish: GET /next, first POST at Lp-Trickle-Latest (or -1 without it) with
    # Lp-Trickle-Reset, then seq + 1, + 2, ... each opened before the previous body ends.
    client = await service()
    clip = make_clip(240)
    info = await start_session(client, model_id="cartoon")
    session = session_of(client, info)
    async with aiohttp.ClientSession() as http:
        try:
            first = await ask_next(http, info["publish_url"]) if next_answered else -1
            if next_answered:
                assert first == 0
            video = PreconnectingPublisher(info["publish_url"], first, reset_first=True)
            sent = 0
            for frames in clip.segments:
                await video.segment(b"".join(frames))
                sent += len(frames)
                await wait_until(
                    lambda sent=sent: session.stats.frames_in >= sent,
                    f"frame {sent} into the session (got {session.stats.frames_in})",
                    within=WAIT_S,
                )
            answers = await asyncio.wait_for(video.close(), WAIT_S)
            assert [a.status for a in answers] == [200] * len(clip.segments)

            first = await ask_next(http, info["control_url"]) if next_answered else -1
            control = PreconnectingPublisher(info["control_url"], first, reset_first=True)
            for strength in (0.3, 0.5):
                await control.segment(b'{"strength": %.1f}' % strength)
                await wait_until(
                    lambda: getattr(session.params, "strength", None) == strength,  # noqa: B023
                    f"strength {strength} to take",
                    within=WAIT_S,
                )
            await asyncio.wait_for(control.close(), WAIT_S)
        finally:
            await http.delete(info["publish_url"])
    # Every frame reached the session (its output may drop some: cartoon is slower than this
    # unpaced input on a loaded machine, and a live session drops rather than queues).
    assert session.stats.frames_in == 240
    await wait_gone(client, info["session_id"])
