"""The GET path as bytes on the wire: chunks framed by the server and written gathered, read by
raw sockets (HTTP/1.1 kept alive, HTTP/1.0 close-delimited) and by many subscribers at once."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import AsyncIterator

from protocol.trickle import TricklePublisher, TrickleSubscriber


@contextlib.asynccontextmanager
async def raw_connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A plain TCP connection to the server on 127.0.0.1, closed on exit."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


async def read_head(reader: asyncio.StreamReader) -> tuple[int, dict[str, str]]:
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    return status, headers


async def read_chunked(reader: asyncio.StreamReader) -> list[bytes]:
    """Every chunk of a chunked body up to its terminating empty chunk, checking the framing."""
    chunks = []
    while True:
        size_line = await asyncio.wait_for(reader.readuntil(b"\r\n"), 5)
        size = int(size_line.strip().split(b";")[0], 16)
        if size == 0:
            assert await asyncio.wait_for(reader.readexactly(2), 5) == b"\r\n"
            return chunks
        data = await asyncio.wait_for(reader.readexactly(size + 2), 5)
        assert data.endswith(b"\r\n"), "a chunk's data must be followed by CRLF"
        chunks.append(data[:-2])


async def test_http11_reader_gets_framed_chunks_live_then_gathered_on_one_connection(
    trickle,
) -> None:
    trickle.server.create_channel("c")
    url = trickle.url("c")
    parts = [os.urandom(100), os.urandom(300_000), os.urandom(5)]
    async with raw_connection(trickle.http.port) as (reader, writer):
        # Parked before the first byte: the chunks reach it one by one as they are published.
        writer.write(b"GET /trickle/c/0 HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        async with TricklePublisher(url) as publisher:
            async with publisher.segment() as segment:
                await segment.write(parts[0])
                status, headers = await read_head(reader)
                assert status == 200
                assert headers["transfer-encoding"] == "chunked"
                assert headers["lp-trickle-seq"] == "0"
                for part in parts[1:]:
                    await segment.write(part)
            live = await read_chunked(reader)
            assert b"".join(live) == b"".join(parts)

            # The same connection again, the segment now complete: written in one go.
            writer.write(b"GET /trickle/c/0 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            status, headers = await read_head(reader)
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            assert b"".join(await read_chunked(reader)) == b"".join(parts)


async def test_http10_reader_gets_the_segment_unframed_until_close(trickle) -> None:
    trickle.server.create_channel("c")
    payload = os.urandom(200_000)
    async with TricklePublisher(trickle.url("c")) as publisher:
        await publisher.write(payload)
        async with raw_connection(trickle.http.port) as (reader, writer):
            writer.write(b"GET /trickle/c/0 HTTP/1.0\r\n\r\n")
            await writer.drain()
            status, headers = await read_head(reader)
            assert status == 200
            assert "transfer-encoding" not in headers
            body = await asyncio.wait_for(reader.read(), 5)
    assert body == payload


async def test_eight_subscribers_get_identical_segments(trickle) -> None:
    """Fan-out: eight readers following the channel, each segment written in several chunks
    while they read, all of them get every byte of every segment."""
    trickle.server.create_channel("c")
    url = trickle.url("c")
    segments = [[os.urandom(n) for n in (70_000, 1, 400_000, 33)] for _ in range(4)]

    async def follow(subscriber: TrickleSubscriber) -> list[bytes]:
        got = []
        async for segment in subscriber:
            got.append(await segment.read())
            if len(got) == len(segments):
                return got
        return got

    subscribers = [TrickleSubscriber(url, start_seq=0) for _ in range(8)]
    readers = [asyncio.create_task(follow(s)) for s in subscribers]
    try:
        async with TricklePublisher(url) as publisher:
            for parts in segments:
                async with publisher.segment() as segment:
                    for part in parts:
                        await segment.write(part)
            results = await asyncio.wait_for(asyncio.gather(*readers), 20)
    finally:
        for subscriber in subscribers:
            await subscriber.close()
    expected = [b"".join(parts) for parts in segments]
    assert all(result == expected for result in results)


async def test_head_gets_no_body_and_the_connection_goes_on(trickle) -> None:
    trickle.server.create_channel("c")
    payload = os.urandom(50_000)
    async with TricklePublisher(trickle.url("c")) as publisher:
        await publisher.write(payload)
        async with raw_connection(trickle.http.port) as (reader, writer):
            writer.write(b"HEAD /trickle/c/0 HTTP/1.1\r\nHost: x\r\n\r\n")
            writer.write(b"GET /trickle/c/0 HTTP/1.1\r\nHost: x\r\n\r\n")
            await writer.drain()
            status, headers = await read_head(reader)
            assert status == 200 and headers["lp-trickle-seq"] == "0"
            # The next bytes are the GET's answer, not a body for the HEAD.
            status, headers = await read_head(reader)
            assert status == 200 and headers["transfer-encoding"] == "chunked"
            assert b"".join(await read_chunked(reader)) == payload
