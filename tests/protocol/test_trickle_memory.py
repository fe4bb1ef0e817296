"""Issue 18, finding 16: what one trickle channel may hold in memory. A publisher sending
segments of the largest size no longer pins a whole ring of them: the channel keeps within its
byte budget by dropping its oldest segments, a segment larger than the budget is refused, and a
reader caught in a dropped segment is told so."""

from __future__ import annotations

import os

import aiohttp
import pytest

from protocol.trickle import LocalPublisher, TrickleHTTPError, TricklePublisher
from protocol.trickle.channel import Channel

KIB = 1024
SEGMENT = 64 * KIB
BUDGET = 160 * KIB


def ring_bytes(channel: Channel) -> int:
    """What the channel's ring holds, counted from its segments' chunks (not its counter)."""
    return sum(len(c) for s in channel.ring if s is not None for c in s.chunks)


async def read_back(host, payloads: list[bytes]) -> None:
    """The newest segments are there whole; the oldest were dropped first, and asking for one
    is answered as a segment gone from the ring (470), so a reader jumps to the live edge."""
    async with aiohttp.ClientSession() as http:
        async with http.get(host.url("c/7")) as response:
            assert response.status == 200 and await response.read() == payloads[7]
        async with http.get(host.url("c/6")) as response:
            assert response.status == 200 and await response.read() == payloads[6]
        async with http.get(host.url("c/5")) as response:
            assert response.status == 470


async def test_a_publisher_of_maximum_segments_cannot_pin_the_ring(trickle_factory) -> None:
    host = await trickle_factory(max_segment_bytes=SEGMENT, max_channel_bytes=BUDGET)
    channel = host.server.create_channel("c")
    payloads = [os.urandom(SEGMENT) for _ in range(8)]
    async with TricklePublisher(host.url("c")) as publisher:
        for payload in payloads:
            await publisher.write(payload)
            assert ring_bytes(channel) <= BUDGET
            assert channel.held_bytes == ring_bytes(channel)
        await read_back(host, payloads)
    assert channel.dropped >= 1


async def test_a_segment_larger_than_the_channel_budget_is_a_413(trickle_factory) -> None:
    host = await trickle_factory(max_segment_bytes=1024 * KIB, max_channel_bytes=BUDGET)
    channel = host.server.create_channel("c")
    async with TricklePublisher(host.url("c")) as publisher:
        with pytest.raises(TrickleHTTPError) as refused:
            await publisher.write(os.urandom(BUDGET + KIB))
        assert refused.value.status == 413
        assert str(BUDGET) in refused.value.body
        assert channel.held_bytes <= BUDGET
        await publisher.write(b"small")  # and the channel goes on


async def test_a_reader_in_a_dropped_segment_sees_it_cut_not_short(trickle_factory) -> None:
    host = await trickle_factory(max_segment_bytes=BUDGET, max_channel_bytes=BUDGET)
    channel = host.server.create_channel("c")
    first = LocalPublisher(host.server, "c")
    later = LocalPublisher(host.server, "c", start_seq=1)
    async with aiohttp.ClientSession() as http:
        async with first.segment() as writer:
            await writer.write(os.urandom(SEGMENT))
            async with http.get(host.url("c/0")) as response:
                assert response.status == 200
                assert await response.content.readany()  # in the middle of seq 0
                # The next segment grows past the budget: seq 0, still open, is dropped.
                await later.write(os.urandom(BUDGET - KIB))
                with pytest.raises(aiohttp.ClientPayloadError):
                    await response.read()
    assert channel.segment(0) is None and channel.held_bytes <= BUDGET
