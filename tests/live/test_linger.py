"""An ended session's output and events channels linger: a reader a request behind still gets
the final status, reads past it end at once, and outside writes are refused."""

from __future__ import annotations

import asyncio
import json

import aiohttp

from live.event_stream import channel_of
from live.keys import SESSIONS, TRICKLE
from protocol.clips import make_clip
from protocol.trickle import TrickleSubscriber
from tests.live.streams import publish_clip, start_session, wait_gone
from tests.waiting import WAIT_S, wait_until


async def test_a_reader_that_asks_after_the_end_still_gets_the_final_status(service) -> None:
    # A linger far longer than any wait here: the end of stream below waits for none of it.
    client = await service(trickle_linger_s=60)
    info = await start_session(client, model_id="noop")
    await publish_clip(info["publish_url"], make_clip(30), realtime=False)
    await wait_gone(client, info["session_id"])
    # First asked for now, after the session ended and its channels were let go: from seq 0
    # (behind the ring: moved on to the last segment) and the last segment by its seq.
    async with TrickleSubscriber(info["events_url"], start_seq=0) as late:
        async with asyncio.timeout(WAIT_S):
            messages = [json.loads(await segment.read()) async for segment in late]
        assert late.ended == "closed"
    final = messages[-1]["event"]
    assert final["type"] == "status" and final["state"] == "OFFLINE", final
    assert final["end_reason"] == "input ended"
    events = info["events_url"]
    async with aiohttp.ClientSession() as http, asyncio.timeout(WAIT_S):
        async with http.get(f"{events}/-2") as response:
            assert response.status == 200
            last = int(response.headers["Lp-Trickle-Seq"])
            assert json.loads(await response.read())["event"] == final
        async with http.get(f"{events}/{last + 1}") as response:
            assert response.headers["Lp-Trickle-Closed"] == "terminated"
        async with http.post(f"{events}/-1", data=b"{}") as response:
            assert response.status == 404
        async with http.post(f"{info['subscribe_url']}/-1", data=b"x") as response:
            assert response.status == 404
        async with http.get(f"{info['publish_url']}/next") as response:
            assert response.status == 404  # the input channel went at once, as ever


async def test_the_channels_go_when_the_linger_ends(service) -> None:
    client = await service(trickle_linger_s=1.0)
    info = await start_session(client, model_id="noop")
    session = client.app[SESSIONS].sessions[info["session_id"]]
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    await asyncio.wait_for(session.wait(), WAIT_S)
    trickle = client.app[TRICKLE]
    # Right after the end: the output and events channels linger, ended; the others are gone.
    lingering = {name for name, channel in trickle.channels.items() if channel.closed}
    assert lingering == {channel_of(info["subscribe_url"]), channel_of(info["events_url"])}
    assert set(trickle.channels) == lingering
    await wait_until(lambda: not trickle.channels, "the linger to end")
    async with aiohttp.ClientSession() as http, http.get(info["events_url"] + "/0") as response:
        assert response.status == 404
