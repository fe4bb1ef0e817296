"""Source combinators: a session whose input may come over more than one transport."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from .edges import FrameSource, MediaContext, MediaItem


class FirstOfSource(FrameSource):
    """Whichever source yields first feeds the session; the others are closed.

    A standalone session can be fed over trickle or WHIP; it commits to the transport the
    publisher actually used, so the input ends when that publisher's stream ends (a source
    that merely waits, like an idle WHIP endpoint, does not keep the session alive). A source
    that ends before yielding anything (a trickle publisher whose video could not be decoded,
    then gone) ends the input too.
    """

    name = "first-of"

    def __init__(self, sources: list[FrameSource]) -> None:
        self.sources = sources
        self.chosen: FrameSource | None = None
        self.decided = asyncio.Event()

    async def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        iterators = [source.items(context) for source in self.sources]
        pending = {
            asyncio.ensure_future(anext(iterator)): n for n, iterator in enumerate(iterators)
        }
        first: MediaItem | None = None
        winner: int | None = None
        ended = False
        try:
            while pending and winner is None and not ended:
                done, _ = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                for future in done:
                    n = pending.pop(future)
                    if future.exception() is None:
                        if winner is None:
                            winner, first = n, future.result()
                    elif isinstance(future.exception(), StopAsyncIteration):
                        ended = True
                    else:
                        raise future.exception()  # type: ignore[misc]
        finally:
            for future in pending:
                future.cancel()
            for future in pending:
                with contextlib.suppress(BaseException):
                    await future
            for n, iterator in enumerate(iterators):
                if n != winner:
                    with contextlib.suppress(Exception):
                        await iterator.aclose()
                    with contextlib.suppress(Exception):
                        await self.sources[n].close()
        if winner is None:
            self.decided.set()
            return  # a source ended before any yielded: the input ended
        self.chosen = self.sources[winner]
        self.decided.set()
        assert first is not None
        yield first
        async for item in iterators[winner]:
            yield item

    @property
    def arrives_live(self) -> bool:  # type: ignore[override]
        return self.chosen is not None and self.chosen.arrives_live

    async def close(self) -> None:
        if self.chosen is not None:
            await self.chosen.close()
