"""A trickle publisher spoken over a bare socket (asyncio streams, no HTTP library), for the
habits of clients written elsewhere: ffmpeg's HTTP client sends a segment's last byte and closes
its socket without waiting for the answer; Livepeer's gateway SDK asks `/next` and mixes `-1`
with explicit seqs.
"""

from __future__ import annotations

import asyncio
from typing import Literal
from urllib.parse import urlsplit

from tests.protocol.test_trickle_conformance import RawHTTP, Reply

Framing = Literal["chunked", "content-length"]


def post_head(url: str, framing: Framing, size: int, extra: dict[str, str] | None = None) -> bytes:
    parts = urlsplit(url)
    lines = [f"POST {parts.path} HTTP/1.1", f"Host: {parts.netloc}", "Content-Type: video/MP2T"]
    if framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
    else:
        lines.append(f"Content-Length: {size}")
    lines += [f"{name}: {value}" for name, value in (extra or {}).items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def chunked(data: bytes, piece: int = 4096) -> bytes:
    """`data` in chunked transfer coding, terminator included."""
    out = [b"%x\r\n%s\r\n" % (len(part), part) for part in _pieces(data, piece)]
    return b"".join(out) + b"0\r\n\r\n"


def _pieces(data: bytes, piece: int) -> list[bytes]:
    return [data[start : start + piece] for start in range(0, len(data), piece)]


async def post_and_close(url: str, body: bytes, framing: Framing) -> None:
    """POST `body` to `url` and close the socket right after its last byte, answer unread
    (what ffmpeg's HTTP client does at the end of each segment)."""
    parts = urlsplit(url)
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        writer.write(post_head(url, framing, len(body)))
        writer.write(chunked(body) if framing == "chunked" else body)
        await writer.drain()
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass


class PreconnectingPublisher:
    """The request pattern of Livepeer's Python publishers (ai-runner's, the `livepeer-gateway`
    SDK's MediaPublish): as a segment starts, the POST for the seq after it is opened (headers
    sent, chunked, no byte yet); a segment's bytes go over the POST opened for it and the next
    segment starts the instant its terminator is sent, without waiting for the answer.

    `first` is the seq of the first POST (`-1` for "the next free one"); later POSTs count on
    from `first + 1`, as the SDK does (after `-1` it goes on at 0). `reset_first` sends
    Lp-Trickle-Reset on the first POST, as the SDK does.
    """

    def __init__(self, url: str, first: int, *, reset_first: bool = False) -> None:
        self.url = url.rstrip("/")
        self.seq = first
        self.reset_first = reset_first
        self._next: tuple[int, RawHTTP] | None = None
        self.answers: list[asyncio.Task[Reply]] = []

    async def _open(self, seq: int, reset: bool) -> RawHTTP:
        raw = await RawHTTP.connect(self.url)
        headers = {"Content-Type": "video/MP2T", "Transfer-Encoding": "chunked"}
        if reset:
            headers["Lp-Trickle-Reset"] = "1"
        raw.send_head("POST", f"{self.url}/{seq}", headers)
        await raw.writer.drain()
        return raw

    async def segment(self, data: bytes) -> None:
        """Send one segment over the POST opened for it; the next POST is opened first."""
        if self._next is None:
            current = await self._open(self.seq, self.reset_first)
        else:
            current = self._next[1]
        self.seq += 1
        self._next = (self.seq, await self._open(self.seq, False))
        current.writer.write(chunked(data))
        await current.writer.drain()
        self.answers.append(asyncio.create_task(_answer(current)))

    async def close(self) -> list[Reply]:
        """The answers of every segment's POST; the unused preconnect is dropped."""
        if self._next is not None:
            await self._next[1].close()
            self._next = None
        try:
            return list(await asyncio.gather(*self.answers))
        finally:
            for task in self.answers:
                task.cancel()


async def _answer(raw: RawHTTP) -> Reply:
    try:
        _, reply = await raw.read_final()
        return reply
    finally:
        await raw.close()
