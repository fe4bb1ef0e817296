"""Issue 18, finding 16: the publishers of two sessions send segments of the largest size the
service accepts, back to back. Each input channel once held a ring of five of them (+538 MiB
for two sessions at the default limit); now each stays within its byte budget while they come,
and holds nothing once the session has read them."""

from __future__ import annotations

import asyncio
import os

from live.keys import SESSIONS, TRICKLE
from protocol.trickle import TricklePublisher
from protocol.trickle.channel import Channel
from tests.live.streams import start_session
from tests.waiting import wait_until

KIB = 1024
SEGMENT = 256 * KIB  # --trickle-max-segment-bytes
BUDGET = 2 * SEGMENT  # --trickle-max-channel-bytes
SEGMENTS = 8


def ring_bytes(channel: Channel) -> int:
    """What the channel's ring holds, counted from its segments' chunks (not its counter)."""
    return sum(len(c) for s in channel.ring if s is not None for c in s.chunks)


async def test_two_sessions_fed_maximum_segments_hold_bounded_memory(service) -> None:
    client = await service(trickle_max_segment_bytes=SEGMENT, trickle_max_channel_bytes=BUDGET)
    trickle = client.app[TRICKLE]
    sessions = [await start_session(client, model_id="noop") for _ in range(2)]
    inputs = [trickle.get(info["publish_url"].rsplit("/", 1)[1]) for info in sessions]
    peak = 0

    def measure() -> None:
        nonlocal peak
        for channel in inputs:
            held = ring_bytes(channel)
            assert held <= BUDGET, held
            assert channel.held_bytes == held
        peak = max(peak, sum(ring_bytes(channel) for channel in inputs))

    async def publish(url: str) -> None:
        publisher = TricklePublisher(url)
        try:
            for _ in range(SEGMENTS):
                await publisher.write(os.urandom(SEGMENT))  # not MPEG-TS: read, then refused
                measure()
            # What the session has read is freed: nothing of the input stays behind.
            await wait_until(lambda: ring_bytes(publisher_channel(url)) == 0, "input read")
        finally:
            await publisher.close(delete=False)  # the sessions go on: the stream did not end

    def publisher_channel(url: str) -> Channel:
        return inputs[[info["publish_url"] for info in sessions].index(url)]

    await asyncio.gather(*(publish(info["publish_url"]) for info in sessions))
    assert peak <= 2 * BUDGET
    for info in sessions:
        assert client.app[SESSIONS].get(info["session_id"]).running  # both still going
        await client.delete(f"/live-video-to-video/{info['session_id']}")
