"""Lean raw-socket trickle clients for bench/trickle.py's comparison against another server.

The subscriber reads into one preallocated buffer and only counts body bytes (no copy, no
per-chunk object), so on a 2-core machine the server, not the client, is what the figures
measure. The publisher can close its socket right after a segment's last byte without reading
the answer, as ffmpeg's HTTP client and ai-runner's publisher do. Both speak the same HTTP/1.1 to
any trickle server, ours or go-livepeer's.
"""

from __future__ import annotations

import asyncio
import contextlib
from urllib.parse import urlsplit

READ_BUFFER = 1 << 20
MAX_HEAD = 64 * 1024


class ProtocolError(Exception):
    """The server's answer could not be parsed."""


class Answer:
    """One response: status, the headers we use, and how many body bytes came."""

    __slots__ = ("body_bytes", "close", "headers", "status")

    def __init__(self) -> None:
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body_bytes = 0
        self.close = False

    def header_int(self, name: str) -> int | None:
        value = self.headers.get(name)
        try:
            return int(value) if value is not None else None
        except ValueError:
            return None


_HEAD, _SIZE, _DATA, _TRAILER, _LENGTH, _UNTIL_CLOSE, _IDLE = range(7)


class _Connection(asyncio.BufferedProtocol):
    """One keep-alive connection, one request at a time; body bytes are counted, not kept."""

    def __init__(self) -> None:
        self.buffer = bytearray(READ_BUFFER)
        self.view = memoryview(self.buffer)
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.line = bytearray()
        self.remaining = 0
        self.answer = Answer()
        self.done: asyncio.Future[Answer] | None = None
        self.lost = False
        self.on_body: list[int] = [0]
        """Shared counter a caller may watch: body bytes received so far."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def get_buffer(self, sizehint: int) -> memoryview:
        return self.view

    def buffer_updated(self, nbytes: int) -> None:
        try:
            self._feed(self.view[:nbytes])
        except ProtocolError as exc:
            self._fail(exc)

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        if self.state == _UNTIL_CLOSE:
            self._finish()
        elif self.done is not None and not self.done.done():
            self.done.set_exception(ConnectionError(f"connection lost: {exc}"))

    def _fail(self, exc: Exception) -> None:
        if self.done is not None and not self.done.done():
            self.done.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()

    def _finish(self) -> None:
        self.state = _IDLE
        if self.done is not None and not self.done.done():
            self.done.set_result(self.answer)

    def _body(self, n: int) -> None:
        self.answer.body_bytes += n
        self.on_body[0] += n

    def _feed(self, data: memoryview) -> None:
        pos, end = 0, len(data)
        while pos < end:
            state = self.state
            if state == _DATA or state == _LENGTH:
                take = min(self.remaining, end - pos)
                self._body(take)
                self.remaining -= take
                pos += take
                if not self.remaining:
                    if state == _DATA:
                        self.state = _SIZE
                    else:
                        self._finish()
                continue
            if state == _UNTIL_CLOSE:
                self._body(end - pos)
                return
            if state == _IDLE:
                raise ProtocolError("bytes arrived with no request outstanding")
            # A line-oriented state: the head, a chunk-size line, or the trailer.
            before = len(self.line)
            self.line += data[pos : min(end, pos + MAX_HEAD)]
            if state == _HEAD:
                idx = self.line.find(b"\r\n\r\n")
                if idx < 0:
                    if len(self.line) > MAX_HEAD:
                        raise ProtocolError("response head too long")
                    return
                pos += idx + 4 - before
                head, self.line = bytes(self.line[:idx]), bytearray()
                self._head(head)
                continue
            idx = self.line.find(b"\n")
            if idx < 0:
                if len(self.line) > 1024:
                    raise ProtocolError("chunk line too long")
                return
            pos += idx + 1 - before
            text, self.line = bytes(self.line[:idx]).strip(), bytearray()
            if state == _SIZE:
                if not text:
                    continue  # the CRLF that closes the previous chunk's data
                size = int(text.split(b";", 1)[0], 16)
                if size:
                    self.state, self.remaining = _DATA, size
                else:
                    self.state = _TRAILER
            elif not text:  # _TRAILER: the blank line ends the response
                self._finish()

    def _head(self, head: bytes) -> None:
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise ProtocolError(f"bad status line {lines[0]!r}")
        answer = self.answer
        answer.status = int(parts[1])
        if answer.status == 100:  # interim: the real head follows
            return
        for line in lines[1:]:
            name, _, value = line.partition(":")
            answer.headers[name.strip().lower()] = value.strip()
        answer.close = answer.headers.get("connection", "").lower() == "close"
        if "chunked" in answer.headers.get("transfer-encoding", "").lower():
            self.state = _SIZE
        elif (length := answer.header_int("content-length")) is not None:
            self.state, self.remaining = _LENGTH, length
            if not length:
                self._finish()
        elif answer.status in (204, 304) or 100 <= answer.status < 200:
            self._finish()
        else:
            self.state = _UNTIL_CLOSE

    def request(self, raw: bytes) -> asyncio.Future[Answer]:
        assert self.transport is not None and self.state == _IDLE
        self.answer = Answer()
        self.state = _HEAD
        self.done = asyncio.get_running_loop().create_future()
        self.transport.write(raw)
        return self.done


class RawSubscriber:
    """Follows a channel from the live edge (seq -1), segment after segment, on one kept-alive
    connection; records each delivered segment's seq and size. 470 jumps to the latest seq."""

    def __init__(self, url: str, counter: list[int] | None = None) -> None:
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.path = parts.path.rstrip("/")
        self.counter = counter if counter is not None else [0]
        self.delivered: dict[int, int] = {}
        self.done_seq = -1
        self.skipped = 0
        self.progress: asyncio.Event | None = None
        self._conn: _Connection | None = None

    async def _connection(self) -> _Connection:
        if self._conn is None or self._conn.lost:
            loop = asyncio.get_running_loop()
            _, conn = await loop.create_connection(_Connection, self.host, self.port)
            conn.on_body = self.counter
            self._conn = conn
        return self._conn

    async def get(self, seq: int) -> Answer:
        conn = await self._connection()
        request = (
            f"GET {self.path}/{seq} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n\r\n"
        ).encode()
        answer = await conn.request(request)
        if answer.close:
            self.close()
        return answer

    async def run(self, start_seq: int = -1) -> None:
        """Read until the channel ends (an empty 200 or a 404)."""
        seq = start_seq
        while True:
            answer = await self.get(seq)
            actual = answer.header_int("lp-trickle-seq")
            if answer.status == 470:
                latest = answer.header_int("lp-trickle-latest")
                if latest is None or latest <= seq:
                    raise ProtocolError(f"470 for seq {seq} without a later latest")
                self.skipped += latest - max(seq, 0)
                seq = latest
                continue
            if answer.status != 200:
                return
            if actual is None or not answer.body_bytes:
                return  # the end-of-stream answer
            self.delivered[actual] = answer.body_bytes
            self.done_seq = actual
            if self.progress is not None:
                self.progress.set()
            seq = actual + 1

    def close(self) -> None:
        if self._conn is not None and self._conn.transport is not None:
            self._conn.transport.close()
        self._conn = None


async def post_and_close(url: str, seq: int, data: bytes, mime: str = "video/MP2T") -> None:
    """POST one segment with a Content-Length body and close the socket right after its last
    byte, reading nothing back (ffmpeg's and ai-runner's publishers behave so)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    path = parts.path.rstrip("/")
    _, writer = await asyncio.open_connection(host, port)
    try:
        writer.write(
            (
                f"POST {path}/{seq} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: {mime}\r\n"
                f"Content-Length: {len(data)}\r\n\r\n"
            ).encode()
        )
        writer.write(data)
        await writer.drain()
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()
