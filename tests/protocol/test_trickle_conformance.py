"""The trickle server against protocol/trickle.md §6, check by check (1-35), over real HTTP on
127.0.0.1. Expected values are go-livepeer's; where this server deliberately differs (§7.1
negative seqs, §7.2 next_write kept as a maximum unless a write lands more than a ring behind it,
a channel DELETE answered after the requests it releases) no check below depends on it.

Requests that must stay open (preconnected or half-sent POSTs) use an aiohttp body fed from a
queue; wire-level behaviour (early 404, interim 100 responses, a reset connection) uses raw
HTTP/1.1 over asyncio streams. "Blocks" means no response headers within BLOCK_S.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from protocol.trickle import TrickleConfig, TrickleServer, create_trickle_app
from tests.waiting import wait_until

SEQ = "Lp-Trickle-Seq"
LATEST = "Lp-Trickle-Latest"
CLOSED = "Lp-Trickle-Closed"
RESET = "Lp-Trickle-Reset"

BLOCK_S = 0.5
"""How long a request must stay without response headers to count as blocked."""
WAIT_S = 5.0
"""Upper bound for anything that is expected to happen promptly."""


# -- helpers ------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str] | CIMultiDict[str]
    body: bytes


async def fetch(session: aiohttp.ClientSession, method: str, url: str, **kwargs) -> Reply:
    async with session.request(method, url, **kwargs) as resp:
        body = await resp.read()
        return Reply(resp.status, resp.headers, body)


async def get_headers(session: aiohttp.ClientSession, url: str) -> aiohttp.ClientResponse:
    """A GET that returns as soon as the response headers arrive (body left unread)."""
    return await session.get(url)


def start_get(session: aiohttp.ClientSession, url: str) -> asyncio.Task[aiohttp.ClientResponse]:
    return asyncio.create_task(get_headers(session, url))


async def assert_blocks(task: asyncio.Task, seconds: float = BLOCK_S) -> None:
    """The request behind `task` has no response headers after `seconds`."""
    done, _ = await asyncio.wait({task}, timeout=seconds)
    assert not done, "expected the request to block, but it was answered"


async def read_all(resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await asyncio.wait_for(resp.read(), WAIT_S)
    finally:
        resp.release()


async def read_some(resp: aiohttp.ClientResponse, size: int) -> bytes:
    """Exactly `size` body bytes, which must arrive promptly (the body stays open)."""
    return await asyncio.wait_for(resp.content.readexactly(size), WAIT_S)


async def cancel(*tasks: asyncio.Task) -> None:
    for task in tasks:
        task.cancel()
    for task in tasks:
        try:
            result = await task
        except (asyncio.CancelledError, Exception):
            continue
        if isinstance(result, aiohttp.ClientResponse):
            result.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    await wait_until(condition, what, within=WAIT_S)


class OpenPost:
    """A POST whose streaming body is fed piece by piece; `reply()` waits for its response."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
    ) -> None:
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.task = asyncio.create_task(self._run(session, url, headers or {}))

    async def _body(self) -> AsyncIterator[bytes]:
        yield b""  # makes aiohttp send the request headers right away
        while (chunk := await self._queue.get()) is not None:
            yield chunk

    async def _run(self, session: aiohttp.ClientSession, url: str, headers: dict) -> Reply:
        resp = await session.post(url, data=self._body(), headers=headers)
        try:
            # Not resp.read(): that also waits for the upload, and some answers come before the
            # body has ended.
            body = await resp.content.read()
            return Reply(resp.status, resp.headers, body)
        finally:
            resp.close()

    def send(self, data: bytes) -> None:
        self._queue.put_nowait(data)

    def finish(self) -> None:
        self._queue.put_nowait(None)

    @property
    def answered(self) -> bool:
        return self.task.done()

    async def reply(self) -> Reply:
        return await asyncio.wait_for(asyncio.shield(self.task), WAIT_S)

    async def close(self) -> None:
        await cancel(self.task)


class RawHTTP:
    """HTTP/1.1 spoken by hand, for what aiohttp's client hides."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str):
        self.reader = reader
        self.writer = writer
        self.host = host
        self.buf = b""

    @classmethod
    async def connect(cls, url: str) -> RawHTTP:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
        return cls(reader, writer, parts.netloc)

    def send_head(self, method: str, url: str, headers: dict[str, str]) -> None:
        lines = [f"{method} {urlsplit(url).path} HTTP/1.1", f"Host: {self.host}"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self.writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))

    def send_chunk(self, data: bytes) -> None:
        self.writer.write(b"%x\r\n%s\r\n" % (len(data), data))

    def end_chunks(self) -> None:
        self.writer.write(b"0\r\n\r\n")

    async def _fill(self) -> None:
        chunk = await self.reader.read(65536)
        if not chunk:
            raise EOFError("connection closed")
        self.buf += chunk

    async def _take(self, size: int) -> bytes:
        while len(self.buf) < size:
            await self._fill()
        data, self.buf = self.buf[:size], self.buf[size:]
        return data

    async def _line(self) -> bytes:
        while b"\r\n" not in self.buf:
            await self._fill()
        line, self.buf = self.buf.split(b"\r\n", 1)
        return line

    async def read_head(self) -> tuple[str, CIMultiDict[str]]:
        """The next status line and its headers (interim responses included)."""
        while b"\r\n\r\n" not in self.buf:
            await self._fill()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status_line, *lines = head.decode("latin-1").split("\r\n")
        headers: CIMultiDict[str] = CIMultiDict()
        for line in lines:
            name, _, value = line.partition(":")
            headers.add(name.strip(), value.strip())
        return status_line, headers

    async def read_body(self, headers: CIMultiDict[str]) -> bytes:
        if "Content-Length" in headers:
            return await self._take(int(headers["Content-Length"]))
        if headers.get("Transfer-Encoding", "").lower() == "chunked":
            body = b""
            while size := int((await self._line()).split(b";")[0], 16):
                body += await self._take(size)
                await self._take(2)
            await self._line()
            return body
        try:
            while True:
                await self._fill()
        except EOFError:
            pass
        body, self.buf = self.buf, b""
        return body

    async def read_final(self) -> tuple[list[str], Reply]:
        """Interim status lines skipped on the way, and the final response."""
        interim = []
        while True:
            status_line, headers = await self.read_head()
            status = int(status_line.split()[1])
            if status >= 200:
                return interim, Reply(status, headers, await self.read_body(headers))
            interim.append(status_line)

    def reset(self) -> None:
        """Drop the connection with a TCP RST (SO_LINGER 0), as a crashed client would."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


# -- fixtures -----------------------------------------------------------------------------------


# `http` and `c` are in conftest.py, shared with the hardening tests.


async def publish(http: aiohttp.ClientSession, url: str, body: bytes, **kwargs) -> Reply:
    reply = await fetch(http, "POST", url, data=body, **kwargs)
    assert reply.status == 200, reply
    return reply


async def next_seq(http: aiohttp.ClientSession, c: str) -> bytes:
    reply = await fetch(http, "GET", f"{c}/next")
    assert reply.status == 200
    return reply.body


# -- checks 1-5: routing and errors ------------------------------------------------------------


async def test_check_01_next_on_fresh_channel(c, http) -> None:
    reply = await fetch(http, "GET", f"{c}/next")
    assert reply.status == 200
    assert reply.body == b"0"
    assert reply.headers[LATEST] == "0"
    assert CLOSED not in reply.headers


async def test_check_02_unknown_channel_is_404(trickle, http) -> None:
    x = trickle.url("x")
    for method, url in (("GET", f"{x}/next"), ("GET", f"{x}/0"), ("DELETE", f"{x}/0")):
        reply = await fetch(http, method, url)
        assert reply.status == 404, (method, url)
        assert reply.body == b"Stream not found\n"


async def test_check_03_post_to_unknown_channel_is_404_before_the_body(trickle) -> None:
    x = trickle.url("x")
    # Body not even started.
    raw = await RawHTTP.connect(x)
    try:
        raw.send_head("POST", f"{x}/0", {"Transfer-Encoding": "chunked"})
        interim, reply = await asyncio.wait_for(raw.read_final(), WAIT_S)
        assert interim == []
        assert reply.status == 404
        assert reply.headers["Connection"].lower() == "close"
        assert reply.body == b"Stream not found\n"
    finally:
        await raw.close()
    # Body started but never finished.
    raw = await RawHTTP.connect(x)
    try:
        raw.send_head("POST", f"{x}/0", {"Transfer-Encoding": "chunked"})
        raw.send_chunk(b"ab")
        _, reply = await asyncio.wait_for(raw.read_final(), WAIT_S)
        assert reply.status == 404
        assert reply.headers["Connection"].lower() == "close"
    finally:
        await raw.close()


async def test_check_04_delete_unknown_channel_is_400(trickle, http) -> None:
    reply = await fetch(http, "DELETE", trickle.url("x"))
    assert reply.status == 400
    assert reply.body == b"Invalid stream\n"


async def test_check_05_non_integer_seq_is_400(c, http) -> None:
    for method in ("GET", "POST", "DELETE"):
        reply = await fetch(http, method, f"{c}/abc", data=b"x" if method == "POST" else None)
        assert reply.status == 400, method
        assert reply.body == b"Invalid idx\n"


# -- checks 6-13: publishing and seq resolution ------------------------------------------------


async def test_check_06_post_segment(c, http) -> None:
    reply = await fetch(http, "POST", f"{c}/0", data=b"hello")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers[SEQ] == "0"


async def test_check_07_get_published_segment(c, http) -> None:
    await publish(http, f"{c}/0", b"hello", headers={"Content-Type": "application/json"})
    reply = await fetch(http, "GET", f"{c}/0")
    assert reply.status == 200
    assert reply.body == b"hello"
    assert reply.headers[SEQ] == "0"
    assert reply.headers[LATEST] == "1"
    assert reply.headers["Content-Type"] == "video/MP2T"


async def test_check_08_next_after_publish(c, http) -> None:
    await publish(http, f"{c}/0", b"hello")
    assert await next_seq(http, c) == b"1"


async def test_check_09_post_minus_one_goes_to_next_write(c, http) -> None:
    await publish(http, f"{c}/0", b"hello")
    reply = await fetch(http, "POST", f"{c}/-1", data=b"x")
    assert reply.status == 200
    assert reply.headers[SEQ] == "1"
    assert await next_seq(http, c) == b"2"
    assert (await fetch(http, "GET", f"{c}/1")).body == b"x"


async def test_check_10_first_byte_advances_next(trickle, c, http) -> None:
    n = 3
    post = OpenPost(http, f"{c}/{n}")
    try:
        channel = trickle.server.get("c")
        await until(lambda: channel.segment(n) is not None, "the preconnect")
        # Parked: the POST handler waits for its first byte, and next has not moved.
        await until(lambda: channel.parked_count == 1, "the preconnect to park")
        assert await next_seq(http, c) == b"0"
        post.send(b"a")

        async def advanced() -> bool:
            return await next_seq(http, c) == b"%d" % (n + 1)

        await wait_until(advanced, "next to move past the first byte", within=WAIT_S)
        assert await next_seq(http, c) == b"%d" % (n + 1)
        assert not post.answered
        post.finish()
        reply = await post.reply()
        assert reply.status == 200
        assert reply.headers[SEQ] == str(n)
    finally:
        await post.close()


async def test_check_11_get_minus_one_waits_for_next_publish(c, http) -> None:
    # Fresh channel: -1 resolves to 0.
    waiting = start_get(http, f"{c}/-1")
    try:
        await assert_blocks(waiting)
        await publish(http, f"{c}/0", b"first")
        resp = await asyncio.wait_for(waiting, WAIT_S)
        assert resp.status == 200
        assert resp.headers[SEQ] == "0"
        assert LATEST not in resp.headers
        assert await read_all(resp) == b"first"
    finally:
        await cancel(waiting)
    # Now next_write is 1: -1 resolves to 1.
    waiting = start_get(http, f"{c}/-1")
    try:
        await assert_blocks(waiting)
        await publish(http, f"{c}/-1", b"second")
        resp = await asyncio.wait_for(waiting, WAIT_S)
        assert resp.status == 200
        assert resp.headers[SEQ] == "1"
        assert LATEST not in resp.headers
        assert await read_all(resp) == b"second"
    finally:
        await cancel(waiting)


async def test_check_12_get_minus_two_is_latest_segment(c, http) -> None:
    k = 2
    for seq in range(k + 1):
        await publish(http, f"{c}/{seq}", b"segment %d" % seq)
    reply = await fetch(http, "GET", f"{c}/-2")
    assert reply.status == 200
    assert reply.body == b"segment %d" % k
    assert reply.headers[SEQ] == str(k)
    assert reply.headers[LATEST] == str(k + 1)


async def test_check_13_get_minus_two_on_fresh_channel_waits_for_seq_0(c, http) -> None:
    waiting = start_get(http, f"{c}/-2")
    try:
        await assert_blocks(waiting)
        await publish(http, f"{c}/0", b"zero")
        resp = await asyncio.wait_for(waiting, WAIT_S)
        assert resp.status == 200
        assert resp.headers[SEQ] == "0"
        assert LATEST not in resp.headers  # seq 0 was next_write when the GET arrived
        assert await read_all(resp) == b"zero"
    finally:
        await cancel(waiting)


# -- checks 14-16: reading while the segment is written ----------------------------------------


async def test_check_14_read_mid_publish(c, http) -> None:
    post = OpenPost(http, f"{c}/0")
    reader = None
    try:
        post.send(b"AB")
        # "Within a short time": headers and the bytes so far in under a second.
        reader = await asyncio.wait_for(get_headers(http, f"{c}/0"), 1.0)
        assert reader.status == 200
        assert reader.headers[SEQ] == "0"
        assert reader.headers["Content-Type"] == "video/MP2T"
        assert await asyncio.wait_for(reader.content.readexactly(2), 1.0) == b"AB"
        post.send(b"CD")
        post.finish()
        rest = await read_all(reader)
        assert b"AB" + rest == b"ABCD"
        reply = await post.reply()
        assert reply.status == 200
        assert reply.headers[SEQ] == "0"
    finally:
        if reader is not None:
            reader.close()
        await post.close()


async def test_check_15_every_reader_gets_the_segment_from_byte_0(c, http) -> None:
    post = OpenPost(http, f"{c}/0")
    readers: list[aiohttp.ClientResponse] = []
    try:
        post.send(b"AB")
        first = await asyncio.wait_for(get_headers(http, f"{c}/0"), WAIT_S)
        readers.append(first)
        assert await read_some(first, 2) == b"AB"
        second = await asyncio.wait_for(get_headers(http, f"{c}/0"), WAIT_S)
        readers.append(second)
        assert await read_some(second, 2) == b"AB"
        post.send(b"CD")
        post.finish()
        assert (await post.reply()).status == 200
        third = await fetch(http, "GET", f"{c}/0")
        assert b"AB" + await read_all(first) == b"ABCD"
        assert b"AB" + await read_all(second) == b"ABCD"
        assert third.status == 200
        assert third.body == b"ABCD"
    finally:
        for resp in readers:
            resp.close()
        await post.close()


async def test_check_16_chunks_stream_to_attached_reader(c, http) -> None:
    loop = asyncio.get_running_loop()
    post = OpenPost(http, f"{c}/0")
    reader = None
    try:
        post.send(b"chunk 0;")
        reader = await asyncio.wait_for(get_headers(http, f"{c}/0"), WAIT_S)
        assert await read_some(reader, 8) == b"chunk 0;"
        for i in range(1, 6):
            chunk = b"chunk %d;" % i
            sent = loop.time()
            post.send(chunk)
            got = await asyncio.wait_for(reader.content.readexactly(len(chunk)), 0.5)
            assert got == chunk
            assert loop.time() - sent < 0.5
            assert not post.answered
        post.finish()
        assert await read_all(reader) == b""
        assert (await post.reply()).status == 200
    finally:
        if reader is not None:
            reader.close()
        await post.close()


# -- checks 17-21: which seqs exist --------------------------------------------------------------


async def test_check_17_get_beyond_next_is_470(c, http) -> None:
    n = 2
    for seq in range(n):
        await publish(http, f"{c}/{seq}", b"s")
    reply = await fetch(http, "GET", f"{c}/{n + 2}")
    assert reply.status == 470
    assert reply.body == b"Entry not found"
    assert reply.headers[SEQ] == str(n + 2)
    assert reply.headers[LATEST] == str(n)


async def test_check_18_seq_1_grace_on_fresh_channel(c, http) -> None:
    waiting = start_get(http, f"{c}/1")
    try:
        await assert_blocks(waiting)
        reply = await fetch(http, "GET", f"{c}/2")
        assert reply.status == 470
        assert reply.body == b"Entry not found"
        assert reply.headers[SEQ] == "2"
        assert reply.headers[LATEST] == "0"
        await publish(http, f"{c}/1", b"one")
        resp = await asyncio.wait_for(waiting, WAIT_S)
        assert resp.status == 200
        assert resp.headers[SEQ] == "1"
        assert await read_all(resp) == b"one"
    finally:
        await cancel(waiting)


async def test_check_19_publisher_preconnect_makes_seq_readable(trickle, c, http) -> None:
    n = 0
    await publish(http, f"{c}/{n}", b"s")  # next_write = n + 1
    before = await fetch(http, "GET", f"{c}/{n + 2}")
    assert before.status == 470
    post = OpenPost(http, f"{c}/{n + 2}")
    waiting = None
    try:
        await until(lambda: trickle.server.get("c").segment(n + 2) is not None, "the preconnect")
        waiting = start_get(http, f"{c}/{n + 2}")
        await assert_blocks(waiting)
        post.send(b"preconnected")
        post.finish()
        resp = await asyncio.wait_for(waiting, WAIT_S)
        assert resp.status == 200
        assert resp.headers[SEQ] == str(n + 2)
        assert resp.headers[LATEST] == str(n + 1)
        assert await read_all(resp) == b"preconnected"
        assert (await post.reply()).headers[SEQ] == str(n + 2)
    finally:
        if waiting is not None:
            await cancel(waiting)
        await post.close()


async def test_check_20_ring_of_five(c, http) -> None:
    for seq in range(7):
        await publish(http, f"{c}/{seq}", b"segment %d" % seq)
    for seq in (0, 1):
        reply = await fetch(http, "GET", f"{c}/{seq}")
        assert reply.status == 470, seq
        assert reply.body == b"Entry not found"
        assert reply.headers[SEQ] == str(seq)
        assert reply.headers[LATEST] == "7"
    for seq in range(2, 7):
        reply = await fetch(http, "GET", f"{c}/{seq}")
        assert reply.status == 200, seq
        assert reply.body == b"segment %d" % seq
        assert reply.headers[SEQ] == str(seq)


async def test_check_21_empty_segment(c, http) -> None:
    n = 2
    reply = await fetch(http, "POST", f"{c}/{n}", data=b"")
    assert reply.status == 200
    assert reply.headers[SEQ] == str(n)
    assert reply.headers["Connection"].lower() == "close"
    assert await next_seq(http, c) == b"%d" % (n + 1)
    reply = await fetch(http, "GET", f"{c}/{n}")
    assert reply.status == 200
    assert reply.body == b""
    assert reply.headers[SEQ] == str(n)
    assert reply.headers[LATEST] == str(n + 1)
    assert CLOSED not in reply.headers


# -- checks 22-23: keepalive and ordering --------------------------------------------------------


async def test_check_22_silent_post_gets_interim_100_keepalives(trickle_factory, http) -> None:
    # go-livepeer: 100 Continue after every 10 s of silence; scaled down to 0.3 s here.
    host = await trickle_factory(keepalive_interval_s=0.3)
    host.server.create_channel("c", "video/MP2T")
    c = host.url("c")
    raw = await RawHTTP.connect(c)
    try:
        raw.send_head("POST", f"{c}/0", {"Transfer-Encoding": "chunked"})
        interim = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 1.1
        while (left := deadline - loop.time()) > 0:
            try:
                status_line, _ = await asyncio.wait_for(raw.read_head(), left)
            except TimeoutError:
                break
            interim.append(status_line)
        assert len(interim) >= 2
        assert set(interim) == {"HTTP/1.1 100 Continue"}
        raw.send_chunk(b"data")
        raw.end_chunks()
        more_interim, reply = await asyncio.wait_for(raw.read_final(), WAIT_S)
        assert set(more_interim) <= {"HTTP/1.1 100 Continue"}
        assert reply.status == 200
        assert reply.headers[SEQ] == "0"
        assert reply.body == b""
    finally:
        await raw.close()
    assert (await fetch(http, "GET", f"{c}/0")).body == b"data"


async def test_check_23_no_ordering_enforcement(c, http) -> None:
    reply = await fetch(http, "POST", f"{c}/10", data=b"ten")
    assert reply.status == 200
    assert reply.headers[SEQ] == "10"
    assert await next_seq(http, c) == b"11"


# -- checks 24-29: closing channels and segments ---------------------------------------------


async def test_check_24_channel_delete_ends_waiting_subscriber(c, http) -> None:
    await publish(http, f"{c}/0", b"s")
    waiting = start_get(http, f"{c}/1")
    try:
        await assert_blocks(waiting)
        reply = await fetch(http, "DELETE", c)
        assert reply.status == 200
        resp = await asyncio.wait_for(waiting, WAIT_S)
        assert resp.status == 200
        assert resp.headers[CLOSED] == "terminated"
        assert resp.headers[SEQ] == "1"
        assert resp.headers[LATEST] == "1"
        assert await read_all(resp) == b""
    finally:
        await cancel(waiting)


async def test_check_25_channel_delete_ends_waiting_publisher(trickle, c, http) -> None:
    n = 1
    await publish(http, f"{c}/0", b"s")
    post = OpenPost(http, f"{c}/{n}")
    try:
        await until(lambda: trickle.server.get("c").segment(n) is not None, "the preconnect")
        assert (await fetch(http, "DELETE", c)).status == 200
        reply = await post.reply()  # the body was never ended
        assert reply.status == 200
        assert reply.headers[CLOSED] == "terminated"
        assert reply.headers[SEQ] == str(n)
        assert reply.headers["Connection"].lower() == "close"
        assert reply.body == b""
    finally:
        await post.close()


async def test_check_26_channel_delete_lets_reader_finish(c, http) -> None:
    post = OpenPost(http, f"{c}/0")
    reader = None
    try:
        post.send(b"ab")
        reader = await asyncio.wait_for(get_headers(http, f"{c}/0"), WAIT_S)
        assert await read_some(reader, 2) == b"ab"
        assert (await fetch(http, "DELETE", c)).status == 200
        assert await read_all(reader) == b""  # a normal end of body after "ab"
        # The upload in progress is answered at once with the end of stream (hardening:
        # test_upload_cut_by_a_delete_ends_with_a_closed_header_go_clients_see).
        post.finish()
        reply = await post.reply()
        assert reply.status == 200
        assert reply.headers[SEQ] == "0"
        assert reply.headers[CLOSED] == "terminated"
    finally:
        if reader is not None:
            reader.close()
        await post.close()


async def test_check_27_deleted_channel_is_gone(c, http) -> None:
    await publish(http, f"{c}/0", b"s")
    assert (await fetch(http, "DELETE", c)).status == 200
    assert (await fetch(http, "GET", f"{c}/next")).status == 404
    assert (await fetch(http, "GET", f"{c}/0")).status == 404
    reply = await fetch(http, "POST", f"{c}/0", data=b"again")
    assert reply.status == 404
    assert reply.headers["Connection"].lower() == "close"
    assert (await fetch(http, "DELETE", c)).status == 400


async def test_check_28_segment_delete(c, http) -> None:
    n = 0
    post = OpenPost(http, f"{c}/{n}")
    reader = None
    try:
        post.send(b"ab")
        reader = await asyncio.wait_for(get_headers(http, f"{c}/{n}"), WAIT_S)
        assert await read_some(reader, 2) == b"ab"
        assert (await fetch(http, "DELETE", f"{c}/{n}")).status == 200
        assert await read_all(reader) == b""  # end of body right after "ab"
        assert not post.answered
        again = await asyncio.wait_for(fetch(http, "GET", f"{c}/{n}"), BLOCK_S)
        assert again.status == 200
        assert again.body == b"ab"
        post.finish()
        assert (await post.reply()).status == 200
    finally:
        if reader is not None:
            reader.close()
        await post.close()


async def test_check_29_delete_nonexistent_segment_is_400(c, http) -> None:
    await publish(http, f"{c}/0", b"s")
    reply = await fetch(http, "DELETE", f"{c}/5")  # slot 0 holds seq 0
    assert reply.status == 400
    assert reply.body == b"Nonexistent segment\n"
    reply = await fetch(http, "DELETE", f"{c}/3")  # slot 3 holds nothing
    assert reply.status == 400
    assert reply.body == b"Nonexistent segment\n"


# -- checks 30-32: reset and aborted publishers ------------------------------------------------


async def test_check_30_reset_closes_lower_seqs(c, http) -> None:
    post = OpenPost(http, f"{c}/0")
    reader = None
    try:
        post.send(b"Hello")
        reader = await asyncio.wait_for(get_headers(http, f"{c}/0"), WAIT_S)
        assert await read_some(reader, 5) == b"Hello"
        reply = await fetch(http, "POST", f"{c}/-1", data=b"after-reset", headers={RESET: "true"})
        assert reply.status == 200
        assert reply.headers[SEQ] == "1"
        assert await read_all(reader) == b""  # the blocked reader ends with exactly "Hello"
        assert (await fetch(http, "GET", f"{c}/0")).body == b"Hello"
        assert (await fetch(http, "GET", f"{c}/1")).body == b"after-reset"
        post.finish()
        assert (await post.reply()).status == 200
    finally:
        if reader is not None:
            reader.close()
        await post.close()


async def test_check_31_reset_spares_higher_seqs(trickle, c, http) -> None:
    n = 2
    for seq in range(n):
        await publish(http, f"{c}/{seq}", b"s")
    ahead = OpenPost(http, f"{c}/{n + 1}")
    try:
        await until(lambda: trickle.server.get("c").segment(n + 1) is not None, "the preconnect")
        reply = await fetch(http, "POST", f"{c}/{n}", data=b"reset", headers={RESET: "true"})
        assert reply.status == 200
        assert reply.headers[SEQ] == str(n)
        await asyncio.sleep(BLOCK_S)
        assert not ahead.answered
        ahead.send(b"ahead")
        ahead.finish()
        reply = await ahead.reply()
        assert reply.status == 200
        assert reply.headers[SEQ] == str(n + 1)
        assert (await fetch(http, "GET", f"{c}/{n + 1}")).body == b"ahead"
    finally:
        await ahead.close()


@contextlib.asynccontextmanager
async def runner_host() -> AsyncIterator[tuple[TrickleServer, str]]:
    """A server started like live/cli.py does (aiohttp's AppRunner defaults, so handlers are
    not cancelled when their client goes away, unlike aiohttp's TestServer)."""
    server = TrickleServer(TrickleConfig())
    app = web.Application()
    app.add_subapp("/trickle/", create_trickle_app(server))
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        yield server, f"http://{host}:{port}/trickle/"
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_check_32_aborted_publisher_leaves_segment_open(
    trickle, http, caplog, handler_cancellation
) -> None:
    caplog.set_level(logging.INFO, logger="protocol.trickle.server")
    async with contextlib.AsyncExitStack() as stack:
        if handler_cancellation:
            server, base = trickle.server, trickle.url()
        else:
            server, base = await stack.enter_async_context(runner_host())
        server.create_channel("c", "video/MP2T")
        c, n = base + "c", 0
        raw = await RawHTTP.connect(c)
        stack.push_async_callback(raw.close)
        raw.send_head("POST", f"{c}/{n}", {"Transfer-Encoding": "chunked"})
        raw.send_chunk(b"ab")
        await raw.writer.drain()
        reader = await asyncio.wait_for(get_headers(http, f"{c}/{n}"), WAIT_S)
        stack.callback(reader.close)
        assert reader.status == 200
        assert await read_some(reader, 2) == b"ab"
        # aiohttp's Server keeps a connection until the handler it runs has finished.
        open_connections = len(trickle.http.runner.server.connections)
        raw.reset()
        if handler_cancellation:
            # The POST handler is cancelled on connection loss: wait until it has finished.
            await until(
                lambda: len(trickle.http.runner.server.connections) < open_connections,
                "the POST handler to finish",
            )
        else:
            # The handler itself sees the reset and answers 500 (nobody left to receive it).
            await until(lambda: "publish aborted" in caplog.text, "the server to see the reset")
        rest = asyncio.create_task(reader.content.read())
        try:
            await assert_blocks(rest)  # no end of body: the segment is not complete
        finally:
            await cancel(rest)
        assert not server.get("c").segment(n).closed
        assert (await fetch(http, "DELETE", f"{c}/{n}")).status == 200
        assert await read_all(reader) == b""
        assert (await fetch(http, "GET", f"{c}/{n}")).body == b"ab"


# -- checks 33-35: idle sweep, create route, large payloads ------------------------------------


SWEEP_POLL_S = 0.03
"""How often check 33 reads an idle channel: the resolution of the sweep time it measures."""
PUBLISH_GAP_S = 0.1
"""Check 33's publisher pacing: under its 0.3 s idle timeout, 8 gaps well over it."""


async def test_check_33_idle_channels_are_swept(trickle_factory, http) -> None:
    timeout, interval = 0.3, 0.1
    host = await trickle_factory(idle_timeout_s=timeout, sweep_interval_s=interval)
    host.server.create_channel("c", "video/MP2T")
    c = host.url("c")
    loop = asyncio.get_running_loop()
    await publish(http, f"{c}/0", b"s")
    written = loop.time()
    gone_after: float | None = None

    async def swept() -> bool:
        nonlocal gone_after
        # Reads alone do not keep the channel alive.
        status = (await fetch(http, "GET", f"{c}/next")).status
        if status == 404:
            gone_after = loop.time() - written
            return True
        assert status == 200
        assert (await fetch(http, "GET", f"{c}/0")).status == 200
        return False

    await wait_until(swept, "the idle channel to be swept", within=2.0, poll=SWEEP_POLL_S)
    assert gone_after is not None, "channel was never swept"
    assert timeout - 0.05 <= gone_after <= timeout + interval + 0.5

    # First bytes of POSTs do keep a channel alive; names starting with "_" are exempt.
    host.server.create_channel("live", "video/MP2T")
    host.server.create_channel("_exempt", "video/MP2T")
    live = host.url("live")
    for seq in range(8):
        await publish(http, f"{live}/{seq}", b"s")
        # Each gap is shorter than the idle timeout, all of them far longer: the behaviour
        # under test is that the publisher's pacing alone keeps the channel alive.
        await asyncio.sleep(PUBLISH_GAP_S)
    assert (await fetch(http, "GET", f"{live}/next")).status == 200
    assert (await fetch(http, "GET", host.url("_exempt") + "/next")).status == 200


async def test_check_34_create_route(c, http, trickle_factory) -> None:
    reply = await fetch(http, "POST", c, headers={"Expect-Content": "application/json"})
    assert reply.status == 200
    await publish(http, f"{c}/0", b"s")
    # The existing channel's MIME type is not changed.
    assert (await fetch(http, "GET", f"{c}/0")).headers["Content-Type"] == "video/MP2T"

    missing = c.rsplit("/", 1)[0] + "/missing"
    reply = await fetch(http, "POST", missing, headers={"Expect-Content": "application/json"})
    assert reply.status == 404
    assert reply.body == b"Stream not found\n"

    host = await trickle_factory(autocreate=True)
    new = host.url("new")
    reply = await fetch(http, "POST", new, headers={"Expect-Content": "application/json"})
    assert reply.status == 200
    assert host.server.get("new").mime == "application/json"
    await publish(http, f"{new}/0", b"{}", headers={"Content-Type": "text/plain"})
    reply = await fetch(http, "GET", f"{new}/0")
    assert reply.body == b"{}"
    assert reply.headers["Content-Type"] == "application/json"


async def test_check_35_five_mib_round_trip(c, http) -> None:
    payload = os.urandom(5 * 1024 * 1024)
    early = start_get(http, f"{c}/0")
    try:
        await assert_blocks(early, 0.1)

        async def body() -> AsyncIterator[bytes]:
            for start in range(0, len(payload), 256 * 1024):
                yield payload[start : start + 256 * 1024]

        reply = await fetch(http, "POST", f"{c}/0", data=body())
        assert reply.status == 200
        assert reply.headers[SEQ] == "0"
        resp = await asyncio.wait_for(early, WAIT_S)
        assert resp.status == 200
        got = await read_all(resp)
        assert len(got) == len(payload)
        assert got == payload
    finally:
        await cancel(early)
    late = await fetch(http, "GET", f"{c}/0")
    assert late.status == 200
    assert len(late.body) == len(payload)
    assert late.body == payload


# -- extra ---------------------------------------------------------------------------------------


async def test_go_livepeer_base_path(trickle_factory, http) -> None:
    host = await trickle_factory(base_path="/ai/trickle/")
    host.server.create_channel("c", "video/MP2T")
    c = host.url("c")
    assert c.endswith("/ai/trickle/c")
    reply = await fetch(http, "POST", f"{c}/-1", data=b"hello")
    assert reply.status == 200
    assert reply.headers[SEQ] == "0"
    reply = await fetch(http, "GET", f"{c}/0")
    assert reply.status == 200
    assert reply.body == b"hello"
    assert reply.headers["Content-Type"] == "video/MP2T"
    assert await next_seq(http, c) == b"1"
    other = c.replace("/ai/trickle/", "/trickle/")
    assert (await fetch(http, "GET", f"{other}/next")).status == 404
    assert (await fetch(http, "DELETE", c)).status == 200
    assert (await fetch(http, "GET", f"{c}/next")).status == 404
