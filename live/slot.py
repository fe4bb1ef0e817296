"""The only queue between camera and model: a slot that holds the newest item."""

from __future__ import annotations

import asyncio
from typing import Generic, TypeVar

T = TypeVar("T")


class LatestSlot(Generic[T]):
    """Holds only the newest item: `put` replaces and never waits, `get` waits for one.

    Latency therefore stays flat however slow the consumer is; what it could not take is
    counted in `replaced` (reported as dropped frames). Event-loop only.
    """

    def __init__(self) -> None:
        self._item: T | None = None
        self._full = asyncio.Event()
        self._empty = asyncio.Event()
        self._empty.set()
        self._closed = False
        self.replaced = 0

    def put(self, item: T) -> bool:
        """Hold `item`; True when it replaced one the consumer never took."""
        if self._closed:
            return False
        replaced = self._full.is_set()
        if replaced:
            self.replaced += 1
        self._item = item
        self._full.set()
        self._empty.clear()
        return replaced

    async def get(self) -> T | None:
        """The newest item, or None once the slot is closed and empty."""
        while not self._full.is_set():
            if self._closed:
                return None
            await self._full.wait()
        self._full.clear()
        self._empty.set()
        item, self._item = self._item, None
        if item is None and self._closed:
            return None
        return item

    def close(self) -> None:
        """No more items: `get` returns what is held, then None."""
        self._closed = True
        self._full.set()  # wakes a waiting get(); with no item held it returns None
        self._empty.set()

    async def taken(self) -> None:
        """Until the item held, if any, has been taken (or the slot closed): a producer that
        must lose nothing waits on it before each `put`."""
        await self._empty.wait()


def put_dropping_oldest(queue: asyncio.Queue[T], item: T) -> None:
    """Put `item` in a bounded queue now; when it is full the oldest item goes, so a reader
    that falls behind holds a bounded amount and still gets the newest."""
    if queue.full():
        queue.get_nowait()
    queue.put_nowait(item)
