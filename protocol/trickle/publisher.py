"""Trickle publisher over HTTP (go-livepeer trickle/trickle_publisher.go).

One POST per segment, streamed with chunked transfer. The POST for the next seq is always opened
ahead of time (preconnect), so a segment starts without a connection set-up. `write(data)` retries a
failed segment on the next seq, after deleting the half-written one so its readers are released.

    async with TricklePublisher("http://host/trickle/abc") as publisher:
        await publisher.write(segment_bytes)
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import aiohttp
from multidict import CIMultiDictProxy

from . import headers as h
from .errors import EndOfStream, StreamNotFound, TrickleError, TrickleHTTPError

logger = logging.getLogger(__name__)

_END = None  # queued to end a POST body
MAX_IGNORED_BODY = 4096  # what is read of an answer whose body is not used, so the connection
# can be reused; a longer one is dropped with its connection
ERROR_BODY_CHARS = 200  # what an error keeps of a refusal's body (TrickleHTTPError.body)
ERROR_BODY_WAIT_S = 5.0


async def error_body(response: aiohttp.ClientResponse) -> str:
    """The start of a refusal's body, read within a bound of bytes and time: a remote
    server's answer can be any size, or never end."""
    try:
        async with asyncio.timeout(ERROR_BODY_WAIT_S):
            data = await response.content.read(ERROR_BODY_CHARS)
    except (TimeoutError, aiohttp.ClientError, OSError):
        return ""
    return data.decode(errors="replace")


def client_session(*, verify_tls: bool = True) -> aiohttp.ClientSession:
    """A session suited to trickle: no overall timeout (segments stream for seconds and
    preconnects wait), a bounded connect, and TLS certificates verified unless `verify_tls` is
    False (go-livepeer and ai-runner never verify, for orchestrators' self-signed
    certificates; here that is the operator's choice).

    Requests made with it pass `allow_redirects=False`: trickle servers never redirect, and
    following one would take a request from a host the operator allowed to any other."""
    return aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=10, connect=10),
        connector=aiohttp.TCPConnector(ssl=verify_tls, limit=0),
    )


class _PendingPost:
    """One POST whose body is fed from a small queue; started before its data exists."""

    def __init__(self, session: aiohttp.ClientSession, url: str, seq: int, mime: str) -> None:
        self.seq = seq
        self.url = f"{url}/{seq}"
        self.sent = 0
        self._queue: asyncio.Queue[bytes | None] = asyncio.Queue(maxsize=4)
        self.task = asyncio.create_task(self._post(session, mime), name=f"trickle-post-{seq}")

    async def _body(self) -> AsyncIterator[bytes]:
        # An empty first chunk makes aiohttp send the request headers now, so the server sees
        # the preconnect (and pre-creates the seq) before any data exists.
        yield b""
        while (chunk := await self._queue.get()) is not _END:
            yield chunk

    async def _post(
        self, session: aiohttp.ClientSession, mime: str
    ) -> tuple[int, CIMultiDictProxy[str], str]:
        async with session.post(
            self.url, data=self._body(), headers={"Content-Type": mime}, allow_redirects=False
        ) as response:
            body = "" if response.status == 200 else await error_body(response)
            return response.status, response.headers, body

    async def put(self, chunk: bytes | None) -> None:
        """Queue a chunk (None ends the body); fails at once if the POST already ended, so a
        server that answered early (404, closed) cannot leave the writer blocked."""
        if self.task.done():
            self.task.result()  # raises the POST's error, if any
            raise _AnsweredEarly()
        if not self._queue.full():
            # The common case, taken without a task: the POST is draining the queue.
            self._queue.put_nowait(chunk)
            if chunk:
                self.sent += len(chunk)
            return
        put = asyncio.ensure_future(self._queue.put(chunk))
        done, _ = await asyncio.wait((put, self.task), return_when=asyncio.FIRST_COMPLETED)
        if put not in done:
            put.cancel()
            self.task.result()
            raise _AnsweredEarly()
        if chunk:
            self.sent += len(chunk)

    def answer(self) -> tuple[int, CIMultiDictProxy[str], str] | None:
        """The server's answer if the POST has already ended with one."""
        task = self.task
        if task.done() and not task.cancelled() and task.exception() is None:
            return task.result()
        return None

    async def cancel(self) -> None:
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)


class _AnsweredEarly(Exception):
    """The server finished the POST before the publisher finished its body."""


class SegmentWriter:
    def __init__(self, pending: _PendingPost) -> None:
        self.seq = pending.seq
        self._pending = pending

    async def write(self, chunk: bytes) -> None:
        if chunk:
            await self._pending.put(bytes(chunk))


class TricklePublisher:
    """Publishes consecutive segments to the trickle channel at `url` (no trailing slash).
    `name` says in error messages which URL this is to its user (default: the URL)."""

    def __init__(
        self,
        url: str,
        mime: str = "video/MP2T",
        *,
        session: aiohttp.ClientSession | None = None,
        start_seq: int = 0,
        retries: int = 3,
        retry_delay_s: float = 0.25,
        name: str | None = None,
        verify_tls: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name
        self.verify_tls = verify_tls
        self.mime = mime
        self.seq = start_seq
        self.retries = retries
        self.retry_delay_s = retry_delay_s
        self._session = session
        self._owns_session = session is None
        self._pending: _PendingPost | None = None
        self._closed = False

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = client_session(verify_tls=self.verify_tls)
        return self._session

    async def _take(self, seq: int) -> _PendingPost:
        """The preconnected POST for `seq`, or a fresh one when it is missing or already over."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.seq == seq and not pending.task.done():
            return pending
        if pending is not None:
            await pending.cancel()
        return _PendingPost(self.session, self.url, seq, self.mime)

    def _preconnect(self, seq: int) -> None:
        self._pending = _PendingPost(self.session, self.url, seq, self.mime)

    @asynccontextmanager
    async def segment(self) -> AsyncIterator[SegmentWriter]:
        """Stream one segment chunk by chunk. Raises StreamNotFound, EndOfStream or
        TrickleHTTPError for the server's answer; on any failure the seq is deleted so that its
        readers are released, and the publisher moves on to the next seq."""
        if self._closed:
            raise TrickleError("publisher is closed")
        seq = self.seq
        pending = await self._take(seq)
        self._preconnect(seq + 1)
        self.seq = seq + 1
        try:
            yield SegmentWriter(pending)
            await pending.put(_END)
            answer = await pending.task
        except BaseException as exc:
            answer = pending.answer()
            await pending.cancel()
            if not isinstance(exc, asyncio.CancelledError):
                await self._delete_seq(seq)
            if answer is not None:
                self._check(*answer, pending.url)
            if isinstance(exc, _AnsweredEarly):
                what = self.name or pending.url
                raise TrickleError(f"{what} answered before the segment was sent") from exc
            raise
        self._check(*answer, pending.url)

    def _check(self, status: int, resp_headers: CIMultiDictProxy[str], body: str, url: str) -> None:
        if h.CLOSED in resp_headers:
            raise EndOfStream(self.url)
        if status == 404:
            raise StreamNotFound(self.url)
        if status >= 300:
            raise TrickleHTTPError(status, url, self.name, body)

    async def write(self, data: bytes) -> int:
        """Publish `data` as one segment, retrying on the next seq after a transport error or a
        5xx. Returns the seq it landed on."""
        attempt = 0
        while True:
            try:
                async with self.segment() as writer:
                    await writer.write(data)
                return writer.seq
            except (StreamNotFound, EndOfStream):
                raise
            except TrickleHTTPError as exc:
                if exc.status < 500 or attempt >= self.retries:
                    raise
                error: Exception = exc
            except (aiohttp.ClientError, OSError, TrickleError) as exc:
                if attempt >= self.retries:
                    raise
                error = exc
            attempt += 1
            logger.info("segment retry url=%s attempt=%d error=%r", self.url, attempt, error)
            await asyncio.sleep(self.retry_delay_s)

    async def _delete_seq(self, seq: int) -> None:
        try:
            async with self.session.delete(f"{self.url}/{seq}", allow_redirects=False) as response:
                await response.content.read(MAX_IGNORED_BODY)
        except (aiohttp.ClientError, OSError) as exc:
            logger.debug("segment delete failed url=%s seq=%d error=%r", self.url, seq, exc)

    async def close(self, delete: bool = True) -> None:
        """Delete the channel (which ends subscribers with end of stream), release the
        preconnected POST and close the HTTP session if this publisher made it."""
        if self._closed:
            return
        self._closed = True
        try:
            if delete:
                try:
                    async with self.session.delete(self.url, allow_redirects=False) as response:
                        await response.content.read(MAX_IGNORED_BODY)
                except (aiohttp.ClientError, OSError) as exc:
                    logger.info("channel delete failed url=%s error=%r", self.url, exc)
            pending, self._pending = self._pending, None
            if pending is not None:
                if delete:
                    # The DELETE made the server answer the preconnect; collect it briefly.
                    try:
                        async with asyncio.timeout(1.0):
                            await asyncio.gather(pending.task, return_exceptions=True)
                    except TimeoutError:
                        pass
                await pending.cancel()
        finally:
            if self._owns_session and self._session is not None:
                await self._session.close()

    async def __aenter__(self) -> TricklePublisher:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
