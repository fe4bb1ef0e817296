"""Publishers written elsewhere: ffmpeg's HTTP client (closes its socket right after a segment's
last byte), Livepeer's gateway SDK (asks `/next`, mixes `-1` with explicit seqs), ai-runner's
publisher (the next segment the instant the previous body ends), and a body sent to the create
route. Each is spoken over a bare socket (tests/raw_publisher.py), as those clients speak it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

import aiohttp
import pytest

from protocol.trickle import TrickleServer, TrickleSubscriber
from protocol.trickle import channel as channel_module
from tests.raw_publisher import PreconnectingPublisher, post_and_close, post_head

from .test_trickle_conformance import (
    CLOSED,
    LATEST,
    SEQ,
    WAIT_S,
    RawHTTP,
    assert_blocks,
    cancel,
    fetch,
    get_headers,
    read_all,
    read_some,
    runner_host,
    start_get,
    until,
)

SEGMENTS = 100


@contextlib.asynccontextmanager
async def host(trickle, handler_cancellation: bool) -> AsyncIterator[tuple[TrickleServer, str]]:
    """aiohttp's test server (handlers cancelled when their client leaves, as `live serve`
    runs them) or a runner with aiohttp's defaults (they are not)."""
    if handler_cancellation:
        yield trickle.server, trickle.url()
    else:
        async with runner_host() as found:
            yield found


@pytest.mark.parametrize("handler_cancellation", [True, False])
@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_no_segment_is_lost_when_the_publisher_closes_after_its_last_byte(
    trickle, http, framing, handler_cancellation
) -> None:
    async with host(trickle, handler_cancellation) as (server, base):
        server.create_channel("c", "video/MP2T")
        c = base + "c"
        payloads = [os.urandom(1000 + 997 * seq) for seq in range(SEGMENTS + 1)]
        for seq in range(SEGMENTS):
            # The reader asks before the bytes exist half the time, after them the other half.
            waiting = start_get(http, f"{c}/{seq}") if seq % 2 else None
            await post_and_close(f"{c}/{seq}", payloads[seq], framing)
            resp = await asyncio.wait_for(waiting or get_headers(http, f"{c}/{seq}"), WAIT_S)
            assert resp.status == 200, seq
            # The whole segment and its end: a lost tail or a segment never closed times out.
            assert await read_all(resp) == payloads[seq], seq
        # The GET for the next seq waits for it, then returns it whole.
        waiting = start_get(http, f"{c}/{SEGMENTS}")
        try:
            await assert_blocks(waiting)
            await post_and_close(f"{c}/{SEGMENTS}", payloads[SEGMENTS], framing)
            resp = await asyncio.wait_for(waiting, WAIT_S)
            assert await read_all(resp) == payloads[SEGMENTS]
        finally:
            await cancel(waiting)
        assert (await fetch(http, "GET", f"{c}/next")).body == b"%d" % (SEGMENTS + 1)


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_a_body_cut_short_stays_a_partial_segment(
    trickle, http, handler_cancellation
) -> None:
    # Content-Length promises 10 bytes, 4 come, then the socket closes (FIN, not RST): the
    # segment is partial and stays open for its readers, as go-livepeer leaves it (check 32).
    async with host(trickle, handler_cancellation) as (server, base):
        server.create_channel("c", "video/MP2T")
        c = base + "c"
        raw = await RawHTTP.connect(c)
        raw.writer.write(post_head(f"{c}/0", "content-length", 10) + b"abcd")
        await raw.writer.drain()
        reader = await asyncio.wait_for(get_headers(http, f"{c}/0"), WAIT_S)
        try:
            assert await read_some(reader, 4) == b"abcd"
            await raw.close()
            await until(lambda: server.get("c").segment(0).writer is None, "the upload to end")
            rest = asyncio.create_task(reader.content.read())
            try:
                await assert_blocks(rest)
            finally:
                await cancel(rest)
            assert not server.get("c").segment(0).closed
        finally:
            reader.close()


# -- GET {channel}/next for the publisher ---------------------------------------------------


async def test_next_answers_whoever_may_write_the_channel(trickle, http) -> None:
    write_only = trickle.server.create_channel("in", outside_reads=False)
    read_only = trickle.server.create_channel("out", outside_writes=False)
    trickle.server.create_channel("hidden", outside_reads=False, outside_writes=False)
    for channel in (write_only, read_only):
        reply = await fetch(http, "GET", trickle.url(channel.name) + "/next")
        assert reply.status == 200, channel.name
        assert reply.headers[LATEST] == "0"
        assert reply.body == b"0"
    await post_and_close(trickle.url("in") + "/0", b"segment", "chunked")
    await until(lambda: write_only.next_write == 1, "the segment")
    reply = await fetch(http, "GET", trickle.url("in") + "/next")
    assert reply.headers[LATEST] == "1"
    assert (await fetch(http, "GET", trickle.url("hidden") + "/next")).status == 403
    # Reading a segment of the write-only channel stays forbidden.
    assert (await fetch(http, "GET", trickle.url("in") + "/0")).status == 403


# -- Livepeer's gateway SDK: /next, then -1 or explicit seqs -------------------------------


async def read_in_order(http: aiohttp.ClientSession, url: str, count: int) -> list[bytes]:
    got: list[bytes] = []
    async with TrickleSubscriber(url, start_seq=0, session=http) as subscriber:
        async for segment in subscriber:
            got.append(await segment.read())
            if len(got) == count:
                break
    return got


@pytest.mark.parametrize("ask_next", [True, False], ids=["next-answered", "next-unanswered"])
async def test_gateway_sdk_request_sequence_loses_no_segment(trickle, c, http, ask_next) -> None:
    # MediaPublish: GET /next; the first POST goes to Lp-Trickle-Latest with Lp-Trickle-Reset
    # (to -1 when /next gave no Latest), the next POST is opened at once at that seq + 1.
    first = -1
    if ask_next:
        raw = await RawHTTP.connect(c)
        raw.send_head("GET", f"{c}/next", {})
        _, reply = await raw.read_final()
        await raw.close()
        first = int(reply.headers[LATEST])
    payloads = [b"segment %d " % seq * 500 for seq in range(8)]
    reader = asyncio.create_task(read_in_order(http, c, len(payloads)))
    publisher = PreconnectingPublisher(c, first, reset_first=True)
    try:
        for payload in payloads:
            await publisher.segment(payload)
            # The SDK's writer waits for each segment's bytes; the reader keeps up.
        answers = await asyncio.wait_for(publisher.close(), WAIT_S)
        assert [a.status for a in answers] == [200] * len(payloads)
        assert [int(a.headers[SEQ]) for a in answers] == list(range(len(payloads)))
        assert await asyncio.wait_for(reader, WAIT_S) == payloads
    finally:
        await cancel(reader)


# -- back to back ----------------------------------------------------------------------------


async def test_back_to_back_segments_all_reach_a_reader_in_order(trickle, c, http) -> None:
    # ai-runner's publisher: each segment's bytes the instant the previous body ended.
    payloads = [os.urandom(20_000 + seq) for seq in range(24)]
    reader = asyncio.create_task(read_in_order(http, c, len(payloads)))
    await until(lambda: trickle.server.get("c").parked_count == 1, "the reader to wait")
    publisher = PreconnectingPublisher(c, 0)
    try:
        for payload in payloads:
            await publisher.segment(payload)
        assert await asyncio.wait_for(reader, WAIT_S) == payloads
        await asyncio.wait_for(publisher.close(), WAIT_S)
    finally:
        await cancel(reader)


# -- POST {channel} with a body --------------------------------------------------------------


@pytest.mark.parametrize("framing", ["chunked", "content-length"])
async def test_a_body_posted_to_the_create_route_is_refused_naming_the_segment_route(
    trickle, c, http, framing
) -> None:
    raw = await RawHTTP.connect(c)
    try:
        raw.writer.write(post_head(c, framing, 12))
        raw.writer.write(b"c\r\nsegment data\r\n0\r\n\r\n" if framing == "chunked" else b"x" * 12)
        _, reply = await asyncio.wait_for(raw.read_final(), WAIT_S)
    finally:
        await raw.close()
    assert reply.status == 400
    assert reply.headers["Content-Type"].startswith("application/json")
    detail = __import__("json").loads(reply.body)["detail"]
    assert f"{c}/-1" in detail
    assert trickle.server.get("c").next_write == 0  # nothing was filed anywhere
    # A bodiless POST still creates (or confirms) the channel.
    assert (await fetch(http, "POST", c)).status == 200
    assert (await fetch(http, "POST", c, data=b"")).status == 200
    assert CLOSED not in (await fetch(http, "GET", f"{c}/next")).headers


async def test_a_reader_that_stops_asking_holds_the_publisher_only_briefly(
    trickle_factory, http
) -> None:
    # The wait for readers is bounded: one that read seq 0 and left delays the publisher by
    # at most the grace, then the ring moves on without it (seq 1 is gone: 470).
    host = await trickle_factory(reader_grace_s=0.2)
    host.server.create_channel("c", "video/MP2T")
    c = host.url("c")
    waiting = start_get(http, f"{c}/0")
    await until(lambda: host.server.get("c").parked_count == 1, "the reader to wait")
    publisher = PreconnectingPublisher(c, 0)
    for seq in range(12):
        await publisher.segment(b"segment %d" % seq)
    answers = await asyncio.wait_for(publisher.close(), WAIT_S)
    assert [int(a.headers[SEQ]) for a in answers] == list(range(12))
    resp = await asyncio.wait_for(waiting, WAIT_S)
    assert await read_all(resp) == b"segment 0"
    reply = await fetch(http, "GET", f"{c}/1")
    assert reply.status == 470
    assert reply.headers[LATEST] == "12"


class FrozenClock:
    """The channel's clock, moved only by the test: the grace is measured without waiting."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


async def test_a_reader_parked_longer_than_the_grace_still_gets_every_segment(
    trickle, c, http, monkeypatch
) -> None:
    # ffmpeg's way: each segment a POST on its own connection, closed after the last byte, so
    # the POSTs of a burst are all in the server at once. A reader that waited at the live
    # edge longer than the grace is not behind: the POSTs that would push out the segments it
    # has yet to ask for still wait for it.
    clock = FrozenClock()
    monkeypatch.setattr(channel_module, "time", clock)
    channel = trickle.server.get("c")
    waiting = start_get(http, f"{c}/0")
    await until(lambda: channel.parked_count == 1, "the reader to wait")
    clock.now += 10 * trickle.server.config.reader_grace_s  # it waits long for seq 0
    payloads = [b"segment %d " % seq * 100 for seq in range(7)]
    for seq, payload in enumerate(payloads):
        await post_and_close(f"{c}/{seq}", payload, "content-length")
    # Seq 6 would push out seq 1, which the reader (still in seq 0) has yet to ask for.
    await until(
        lambda: channel.next_write == 7 or channel.writers_waiting == 1,
        "seq 6 to be filed or held",
    )
    resp = await asyncio.wait_for(waiting, WAIT_S)
    got = [await read_all(resp)]
    for seq in range(1, len(payloads)):
        reply = await fetch(http, "GET", f"{c}/{seq}")
        assert reply.status == 200, f"seq {seq}: {reply.status}"
        got.append(reply.body)
    assert got == payloads
