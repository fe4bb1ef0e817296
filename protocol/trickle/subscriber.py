"""Trickle subscriber over HTTP (go-livepeer trickle/trickle_subscriber.go).

Starts at -2 (the current segment) or a given seq, follows `Lp-Trickle-Seq`, jumps to
`Lp-Trickle-Latest` after a 470, and ends on 404 or `Lp-Trickle-Closed`. The GET for the next seq is
opened as soon as the current one's headers arrive, so the next segment starts with no round trip.

    async with TrickleSubscriber("http://host/trickle/abc-out") as subscriber:
        async for segment in subscriber:
            async for chunk in segment:
                ...
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable

import aiohttp

from . import headers as h
from .errors import TrickleError, TrickleHTTPError, client_error_in_words
from .publisher import client_session, error_body

logger = logging.getLogger(__name__)

READ_CHUNK = 256 * 1024


class HTTPSegment:
    """One segment being received; iterate for chunks as they arrive, or `read()` it whole."""

    def __init__(self, seq: int, response: aiohttp.ClientResponse, read_timeout_s: float) -> None:
        self.seq = seq
        self.latest = h.parse_int(response.headers.get(h.LATEST), -1)
        self.content_type = response.headers.get("Content-Type", "")
        self._response = response
        self._read_timeout_s = read_timeout_s

    async def __aiter__(self) -> AsyncIterator[bytes]:
        content = self._response.content
        try:
            while True:
                async with asyncio.timeout(self._read_timeout_s):
                    chunk = await content.readany()
                if not chunk:
                    return
                yield chunk
        finally:
            self.close()

    async def read(self) -> bytes:
        return b"".join([chunk async for chunk in self])

    def close(self) -> None:
        self._response.release()


class TrickleSubscriber:
    """Reads the trickle channel at `url` segment by segment. `name` says in error messages
    which URL this is to its user (default: the URL)."""

    def __init__(
        self,
        url: str,
        start_seq: int = h.LATEST_SEQ,
        *,
        session: aiohttp.ClientSession | None = None,
        max_retries: int = 5,
        retry_delay_s: float = 0.5,
        max_retry_delay_s: float = 4.0,
        header_timeout_s: float = 20.0,
        read_timeout_s: float = 60.0,
        name: str | None = None,
        verify_tls: bool = True,
    ) -> None:
        self.url = url.rstrip("/")
        self.name = name or self.url
        self.verify_tls = verify_tls
        self.seq = start_seq
        self.max_retries = max_retries
        self.retry_delay_s = retry_delay_s
        self.max_retry_delay_s = max_retry_delay_s
        self.on_retry: Callable[[str], None] | None = None
        """Told each failure that will be retried (the session turns it into an error event)."""
        self.header_timeout_s = header_timeout_s
        self.read_timeout_s = read_timeout_s
        self.ended: str | None = None
        """Why the stream ended: "closed" (Lp-Trickle-Closed) or "not found" (404)."""
        self.skipped = 0
        """Times the subscriber fell behind the ring and jumped to the live edge."""
        self._session = session
        self._owns_session = session is None
        self._pending: tuple[int, asyncio.Task[aiohttp.ClientResponse]] | None = None
        self._current: HTTPSegment | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = client_session(verify_tls=self.verify_tls)
        return self._session

    async def _get(self, seq: int) -> aiohttp.ClientResponse:
        # A GET parks at the live edge until the segment starts; a silent server is asked
        # again every header_timeout_s rather than trusted forever (Go refreshes every 20 s).
        while True:
            try:
                async with asyncio.timeout(self.header_timeout_s):
                    # Never redirected: see client_session.
                    return await self.session.get(f"{self.url}/{seq}", allow_redirects=False)
            except TimeoutError:
                logger.debug("segment wait refreshed url=%s seq=%d", self.url, seq)

    def _open(self, seq: int) -> asyncio.Task[aiohttp.ClientResponse]:
        return asyncio.create_task(self._get(seq), name=f"trickle-get-{seq}")

    async def _drop_pending(self) -> None:
        if self._pending is None:
            return
        _, task = self._pending
        self._pending = None
        task.cancel()
        results = await asyncio.gather(task, return_exceptions=True)
        if isinstance(results[0], aiohttp.ClientResponse):
            results[0].release()

    def __aiter__(self) -> TrickleSubscriber:
        return self

    async def __anext__(self) -> HTTPSegment:
        segment = await self.next()
        if segment is None:
            raise StopAsyncIteration
        return segment

    async def next(self) -> HTTPSegment | None:
        """The next segment, or None at end of stream. Raises TrickleError after
        `max_retries` consecutive failures."""
        if self._current is not None:
            self._current.close()
            self._current = None
        if self.ended:
            return None
        failures = 0
        while True:
            if self._pending is not None and self._pending[0] == self.seq:
                task = self._pending[1]
                self._pending = None
            else:
                await self._drop_pending()
                task = self._open(self.seq)
            try:
                response = await task
            except (aiohttp.ClientError, OSError) as exc:
                failures += 1
                problem = f"cannot reach {self.name}: {client_error_in_words(exc)}"
                if failures > self.max_retries:
                    raise TrickleError(problem) from exc
                logger.info("segment read retry url=%s seq=%d error=%r", self.url, self.seq, exc)
                await self._back_off(failures, problem)
                continue

            if h.CLOSED in response.headers:
                response.release()
                self.ended = "closed"
                return None
            if response.status == 404:
                response.release()
                self.ended = "not found"
                return None
            if response.status == 470:
                latest = h.parse_int(response.headers.get(h.LATEST), h.NEXT_SEQ)
                response.release()
                logger.info("fell behind url=%s seq=%d latest=%d", self.url, self.seq, latest)
                self.skipped += 1
                self.seq = latest
                failures += 1
                if failures > self.max_retries:
                    raise TrickleError(f"{self.name} keeps answering 470 (segment gone)")
                continue
            if response.status != 200:
                body = await error_body(response)
                response.close()  # not drained: the rest of a refusal can be any size
                error = TrickleHTTPError(response.status, f"{self.url}/{self.seq}", self.name, body)
                logger.info("segment read failed url=%s status=%d", error.url, error.status)
                failures += 1
                if failures > self.max_retries:
                    raise error
                await self._back_off(failures, str(error))
                continue

            seq = h.parse_int(response.headers.get(h.SEQ), self.seq)
            if seq >= 0:
                self.seq = seq + 1
                self._pending = (self.seq, self._open(self.seq))
            self._current = HTTPSegment(seq, response, self.read_timeout_s)
            return self._current

    async def _back_off(self, failures: int, problem: str) -> None:
        # Doubling waits, capped: a remote that is down gets a bounded number of tries over a
        # bounded time (0.5 + 1 + 2 + 4 + 4 s by default), not a tight loop.
        delay = min(self.retry_delay_s * 2 ** (failures - 1), self.max_retry_delay_s)
        if self.on_retry is not None:
            self.on_retry(f"{problem}; retry {failures} of {self.max_retries} in {delay:.1f} s")
        await asyncio.sleep(delay)

    async def close(self) -> None:
        if self._current is not None:
            self._current.close()
            self._current = None
        await self._drop_pending()
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> TrickleSubscriber:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
