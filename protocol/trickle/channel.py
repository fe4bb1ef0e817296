"""Channel and segment state of the trickle server (go-livepeer trickle/trickle_server.go `Stream`,
trickle/segment_buffer.go).

A channel keeps a ring of five segments; segment `seq` lives in slot `seq % 5`. A segment is an
append-only list of byte chunks plus a closed flag; every reader keeps its own offset, so each one
gets the segment from byte 0 however late it attaches. Everything here runs on the event loop and
is shared by the HTTP handlers (server.py) and the in-process clients (local.py).

Memory: the bytes a channel's ring holds are counted (`Channel.held_bytes`) and kept within its
budget (`max_bytes`) by dropping the oldest segments first. Live readers want the newest bytes;
a reader that far behind would be sent to the live edge anyway, while refusing the newest
segment would stop the stream for everyone. On a channel whose only reader is the service
(`single_reader`, a session's input), each chunk is freed as soon as that reader has taken it.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator

from .errors import SegmentDropped
from .headers import LATEST_SEQ, NEXT_SEQ

RING_SIZE = 5
MAX_READERS_FOLLOWED = 64
"""Readers whose next request a channel remembers (Channel.wait_for_readers); the oldest go."""


class Changed:
    """When a segment last changed; held apart from it, so that remembering it for a reader
    does not keep the segment's bytes."""

    __slots__ = ("at",)

    def __init__(self) -> None:
        self.at = time.monotonic()


class Segment:
    """One published unit: chunks appended by one publisher, read from byte 0 by any reader."""

    __slots__ = (
        "_changed",
        "_followers",
        "_followers_due",
        "_on_close",
        "changed",
        "channel",
        "chunks",
        "closed",
        "count",
        "cut",
        "dropped",
        "held",
        "release_read",
        "seq",
        "size",
        "writer",
    )

    def __init__(self, seq: int, channel: Channel | None = None) -> None:
        self.seq = seq
        self.chunks: list[bytes] = []
        self.size = 0
        """Bytes written to it (what the segment limit counts)."""
        self.held = 0
        """Bytes of it still in memory."""
        self.count = 0
        """Chunks written to it."""
        self.channel = channel
        """The channel whose ring holds it, told of its growth; None once it left the ring."""
        self.release_read = channel is not None and channel.single_reader
        """Free each chunk once the (one) reader has taken it."""
        self.dropped = False
        """Dropped (for its channel's budget, or passed by its one reader): its bytes are
        gone, new ones are not kept."""
        self.cut = False
        """Dropped before its writer finished it: no reader can have had it whole."""
        self.closed = False
        self.writer: object | None = None
        """The publisher whose first byte claimed this segment (Channel.claim); None before."""
        self._on_close: list[Callable[[], None]] | None = None
        # One event per generation: set on every change, then replaced, so a waiter that is
        # cancelled never disturbs the others (awaiting a shared future would cancel it).
        self._changed: asyncio.Event | None = None
        self._followers: list[Callable[[], bool]] = []
        self._followers_due = False
        self.changed = Changed()
        """When it last took bytes or was closed: a reader in it is not behind before then."""

    @property
    def has_data(self) -> bool:
        return self.size > 0

    def append(self, data: bytes) -> None:
        if data:
            self.size += len(data)
            if self.dropped:
                return  # its writer is still sending; nobody can read it any more
            self.chunks.append(data)
            self.count += 1
            self.held += len(data)
            self._notify()
            if self.channel is not None:
                self.channel.grew(self, len(data))

    def drop(self) -> None:
        """Free its bytes and close it. The chunk list is emptied in place, so a reader in the
        middle of it sees that it was cut short (`SegmentDropped`) rather than a whole
        segment."""
        if self.channel is not None:
            self.channel.held_bytes -= self.held
        self.cut = not self.closed
        self.dropped = True
        self.held = 0
        self.chunks.clear()
        self.close()

    def _release(self, index: int) -> None:
        chunks = self.chunks
        if index < len(chunks) and chunks[index]:
            size = len(chunks[index])
            chunks[index] = b""  # the index stays: other offsets into the list keep meaning
            self.held -= size
            if self.channel is not None:
                self.channel.held_bytes -= size

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._notify()
            callbacks, self._on_close = self._on_close, None
            for callback in callbacks or ():
                callback()

    @contextlib.contextmanager
    def on_close(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call `callback` if the segment is closed while the block runs (at once if it already
        is): a POST waiting for its first byte is woken this way without a task of its own."""
        if self.closed:
            callback()
            yield
            return
        if self._on_close is None:
            self._on_close = []
        self._on_close.append(callback)
        try:
            yield
        finally:
            if self._on_close is not None and callback in self._on_close:
                self._on_close.remove(callback)

    def _notify(self) -> None:
        self.changed.at = time.monotonic()
        if self._followers and not self._followers_due:
            self._followers_due = True
            asyncio.get_running_loop().call_soon(self._run_followers)
        event, self._changed = self._changed, None
        if event is not None:
            event.set()

    def _run_followers(self) -> None:
        self._followers_due = False
        self._followers = [follower for follower in self._followers if follower()]

    def follow(self, follower: Callable[[], bool]) -> None:
        """Call `follower` once per event-loop turn in which the segment changed (chunks
        appended, closed), all followers in one callback, until it returns False or `unfollow`
        is called: readers at the live edge take new chunks with one wakeup for all of them
        rather than a task switch each (server.py's subscribers), and the chunks of one turn
        together. It must not raise, and must not block."""
        self._followers.append(follower)

    def unfollow(self, follower: Callable[[], bool]) -> None:
        with contextlib.suppress(ValueError):
            self._followers.remove(follower)

    async def wait_beyond(self, chunk_count: int) -> None:
        """Wait until the segment holds more than `chunk_count` chunks or is closed."""
        while len(self.chunks) <= chunk_count and not self.closed:
            if self._changed is None:
                self._changed = asyncio.Event()
            await self._changed.wait()

    async def wait_started(self) -> None:
        """Wait until the first byte arrived or the segment was closed."""
        await self.wait_beyond(0)

    async def wait_closed(self) -> None:
        """Wait until the segment is closed, however many bytes arrive meanwhile."""
        while not self.closed:
            await self.wait_beyond(len(self.chunks))

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        """Every chunk from byte 0, then each new one as it is appended, until closed.
        Raises SegmentDropped when the segment was dropped before this reader had it all.

        Chunks go out as they came in, never joined: a join would copy the segment once per
        subscriber (measured: twice the server CPU per MB at 8 subscribers), and aiohttp
        frames each write as one chunk anyway.
        """
        sent = 0
        chunks = self.chunks
        while True:
            if sent < len(chunks):
                yield chunks[sent]
                if self.release_read:
                    self._release(sent)  # the reader asked for more: it is done with this one
                sent += 1
                continue
            if self.closed:
                self.check_whole(sent)
                return
            await self.wait_beyond(sent)

    def check_whole(self, chunks_read: int) -> None:
        """Raise SegmentDropped if a reader that got `chunks_read` chunks lost the rest."""
        if self.dropped and (self.cut or chunks_read < self.count):
            raise SegmentDropped(self.seq)


class Channel:
    """A named pub/sub topic: the ring, `next_write` and the idle clock."""

    def __init__(
        self,
        name: str,
        mime: str,
        *,
        outside_writes: bool = True,
        outside_reads: bool = True,
        max_segment_bytes: int | None = None,
        max_bytes: int | None = None,
        single_reader: bool = False,
    ) -> None:
        if single_reader and outside_reads:
            raise ValueError("a channel with one in-process reader cannot be read over HTTP")
        self.name = name
        self.mime = mime
        self.max_bytes = max_bytes
        """The most bytes its ring holds (None: no budget); the oldest segments go beyond."""
        self.held_bytes = 0
        """Bytes its ring's segments hold now."""
        self.single_reader = single_reader
        """Only one in-process reader: chunks are freed as it reads them (a session's input)."""
        self.dropped = 0
        """Segments dropped to stay within `max_bytes` (what readers lost)."""
        self.outside_writes = outside_writes
        """False: only the service (in process) writes or deletes it; HTTP writes get 403."""
        self.outside_reads = outside_reads
        """False: only the service reads it; HTTP reads get 403."""
        self.max_segment_bytes = max_segment_bytes
        """None: the server's limit."""
        self.ring: list[Segment | None] = [None] * RING_SIZE
        self.next_write = 0
        self.write_time = time.monotonic()
        self.closed = False
        """No segment follows (`end`); while it is still listed by its server it lingers:
        what was written is readable, nothing more can be written."""
        # Segments that HTTP requests are parked on (a preconnected POST before its first byte, a
        # GET at the live edge), one entry per request, so that a channel DELETE can release
        # every one of them and answer only after they have been answered.
        self._parked: list[Segment] = []
        self._unparked: asyncio.Event | None = None
        self._on_close: list[Callable[[], None]] = []
        # The seq each recent reader will ask for next, and when it asked for the one before.
        self._wanted: list[tuple[int, float, Changed]] = []
        self._reader_moved: asyncio.Event | None = None
        self.writers_waiting = 0
        """Writers held now by `wait_for_readers`."""
        self.read_time = -math.inf
        """When a reader last asked for a segment (time.monotonic())."""
        self.paused = False
        """Its in-process publisher stopped between segments (nobody read them): the live edge
        is the next segment it writes, not the last one it wrote (see `resolve_read_seq`)."""

    # -- seq resolution -------------------------------------------------------------------------

    def resolve_write_seq(self, seq: int) -> int:
        return self.next_write if seq == NEXT_SEQ else seq

    def resolve_read_seq(self, seq: int) -> int:
        if seq == NEXT_SEQ:
            return self.next_write
        if seq == LATEST_SEQ:
            # A paused publisher's last segment is history: a reader joining waits for the next
            # one, which the publisher starts for it at a keyframe.
            # An ended channel's last segment is its last word, paused or not.
            paused = self.paused and not self.closed
            return self.next_write if paused else max(self.next_write - 1, 0)
        return seq

    # -- segments -------------------------------------------------------------------------------

    def segment(self, seq: int) -> Segment | None:
        """The segment for `seq` if its slot still holds it."""
        found = self.ring[seq % RING_SIZE]
        return found if found is not None and found.seq == seq else None

    def get_for_write(self, seq: int) -> Segment:
        """The segment a publisher writes `seq` into: the existing one (pre-created by a reader,
        or a repeated POST) or a fresh one that evicts and closes the slot's previous occupant."""
        found = self.segment(seq)
        if found is not None:
            return found
        previous = self.ring[seq % RING_SIZE]
        fresh = self._place(Segment(seq, self))
        if previous is not None:
            previous.close()
        return fresh

    def _place(self, segment: Segment) -> Segment:
        """Put `segment` in its slot; the previous occupant leaves the ring and the count (its
        readers in progress keep it until they are done)."""
        slot = segment.seq % RING_SIZE
        previous = self.ring[slot]
        if previous is not None:
            self.held_bytes -= previous.held
            previous.channel = None
        self.ring[slot] = segment
        return segment

    def _forget_before(self, seq: int) -> None:
        """The one reader moved on to `seq`: what is older can never be read, so it goes
        (segments it skipped when it fell behind, too)."""
        for found in self.ring:
            if found is not None and found.seq < seq:
                self._drop(found)

    def grew(self, segment: Segment, size: int) -> None:
        """`segment` of the ring took `size` more bytes: over the budget, drop the other
        segments, oldest first, until it fits."""
        self.held_bytes += size
        if self.max_bytes is None or self.held_bytes <= self.max_bytes:
            return
        others = sorted(
            (s for s in self.ring if s is not None and s is not segment and s.held),
            key=lambda s: s.seq,
        )
        for old in others:
            if self.held_bytes <= self.max_bytes:
                break
            self._drop(old)
            self.dropped += 1

    def _drop(self, segment: Segment) -> None:
        """Take `segment` out of the ring (a reader asking for it gets 470) and free it."""
        self.ring[segment.seq % RING_SIZE] = None
        segment.drop()
        segment.channel = None

    def get_for_read(self, seq: int) -> Segment | None:
        """The segment a subscriber reads, pre-created when it is the next one to be written
        (or seq 1 on a fresh channel, go-livepeer's grace case); None means 470."""
        if self.single_reader:
            self._forget_before(seq)
        found = self.segment(seq)
        if found is not None:
            self._note_reader(seq, found)
            return found
        if self.closed:
            return None
        if seq == self.next_write or (self.next_write == 0 and seq == 1):
            # livepeer-compat: pre-creation replaces the slot occupant without closing it
            # (protocol/trickle.md §1.3.3 step 3); a reader attached to it keeps its object.
            fresh = self._place(Segment(seq, self))
            self._note_reader(seq, fresh)
            return fresh
        return None

    # -- readers a publisher waits for ----------------------------------------------------------

    def has_readers(self, within_s: float) -> bool:
        """Whether anyone reads the channel: a request waiting for a segment to start, or a
        reader that asked for a segment less than `within_s` ago. (A waiting request can also
        be a preconnected POST: only on a channel outside clients may write.)"""
        return bool(self._parked) or time.monotonic() - self.read_time < within_s

    def _note_reader(self, seq: int, segment: Segment) -> None:
        """A reader asked for `seq` and got `segment`: it will ask for `seq + 1` next, if it
        reads in order."""
        now = time.monotonic()
        self.read_time = now
        wanted = self._wanted
        for index, (want, _, _) in enumerate(wanted):
            if want == seq:
                wanted[index] = (seq + 1, now, segment.changed)
                break
        else:
            wanted.append((seq + 1, now, segment.changed))
            if len(wanted) > MAX_READERS_FOLLOWED:
                del wanted[0]
        if self._reader_moved is not None:
            self._reader_moved.set()
            self._reader_moved = None

    def _reader_needs(self, seq: int, grace_s: float) -> float | None:
        """If writing `seq` would push out of the ring a segment that a reader reading in order
        has yet to ask for: how long that reader may still take. None when no such reader.

        A reader's grace runs from its last request, or from the last change of the segment
        it is in if that came later: a reader parked at the live edge, or taking a segment
        still being written, is waiting for the publisher, not behind it (with concurrent
        POSTs, as ffmpeg's publisher sends them, a reader parked longer than the grace would
        otherwise let every held POST go at once and lose the segments after its own)."""
        occupant = self.ring[seq % RING_SIZE]
        if occupant is None or occupant.seq >= seq:
            return None
        now = time.monotonic()
        kept: list[tuple[int, float, Changed]] = []
        longest: float | None = None
        for entry in self._wanted:
            want, at, changed = entry
            left = max(at, changed.at) + grace_s - now
            if left <= 0:
                continue
            kept.append(entry)
            if want <= occupant.seq and (longest is None or left > longest):
                longest = left
        self._wanted = kept
        return longest

    async def wait_for_readers(self, seq: int, grace_s: float) -> None:
        """Hold the writer of `seq` while a reader still needs the segment it would push out
        of the ring, each reader at most `grace_s` after its last request."""
        while not self.closed and (left := self._reader_needs(seq, grace_s)) is not None:
            if self._reader_moved is None:
                self._reader_moved = asyncio.Event()
            self.writers_waiting += 1
            try:
                async with asyncio.timeout(left):
                    await self._reader_moved.wait()
            except TimeoutError:
                pass
            finally:
                self.writers_waiting -= 1

    def claim(self, segment: Segment, writer: object) -> Segment:
        """The segment that `writer`'s first byte goes into, marked written.

        `segment` itself, unless another publisher already claimed it: then a fresh segment at
        the live edge. Two publishers on one seq happen with clients that mix `-1` and explicit
        seqs (a POST to -1 is filed at next_write, and the client's next explicit seq can be
        that same number): go-livepeer appends both bodies into one segment, whose readers
        then see the second one cut short or not at all. Here the later body becomes the next
        segment and its answer's Lp-Trickle-Seq says where it went.
        """
        if segment.writer is None or segment.writer is writer:
            segment.writer = writer
            self.mark_written(segment.seq)
            return segment
        seq = self.next_write
        while True:
            target = self.get_for_write(seq)
            if target.writer is None:
                break
            seq += 1
        target.writer = writer
        self.mark_written(seq)
        return target

    def mark_written(self, seq: int) -> None:
        """Record a first byte (or an empty completion) on `seq`.

        Deliberate difference from go-livepeer, which assigns `next_write = seq + 1`: we keep the
        maximum, so segments arriving a little out of order cannot move the live edge backwards
        and make subscribers reread history (protocol/trickle.md §7.2). No §6 check depends on it.

        A write more than a ring behind the edge is no reordering, though: the edge was set by a
        stray far-ahead seq (one POST to seq 10^12 would otherwise park every reader that
        follows the channel there for good) or the publisher restarted its count. Then the edge
        follows the publisher that is writing, as in go-livepeer, and the segments of the
        abandoned timeline are closed so their waiting readers move on now.
        """
        if seq + 1 < self.next_write - RING_SIZE:
            self.next_write = seq + 1
            for found in self.ring:
                if found is not None and found.seq >= self.next_write + RING_SIZE:
                    found.close()
        else:
            self.next_write = max(self.next_write, seq + 1)
        self.write_time = time.monotonic()
        self.paused = False

    def reset_below(self, seq: int) -> None:
        """Lp-Trickle-Reset: close every segment older than `seq`, sparing preconnected ones."""
        for found in self.ring:
            if found is not None and found.seq < seq:
                found.close()

    @contextlib.contextmanager
    def on_close(self, callback: Callable[[], None]) -> Iterator[None]:
        """Call `callback` if the channel is closed while the block runs: an upload in progress
        learns of it without a task of its own."""
        self._on_close.append(callback)
        try:
            yield
        finally:
            self._on_close.remove(callback)

    def end(self) -> None:
        """No segment follows: close every segment, releasing all waiting readers (they get
        end of stream) and preconnected publishers, but keep what was written readable
        until `close` (a channel lingering after its session ended, TrickleServer.linger)."""
        self.closed = True
        for callback in list(self._on_close):
            callback()
        if self._reader_moved is not None:
            self._reader_moved.set()
            self._reader_moved = None
        for found in self.ring:
            if found is not None:
                found.close()
        # A request can be parked on a segment that left the ring without being closed (GET
        # pre-creation replaces the occupant): release it too rather than leave it hanging.
        for found in self._parked:
            found.close()

    def close(self) -> None:
        """End the channel and free its segments (it is being deleted)."""
        self.end()
        for found in self.ring:
            if found is not None:
                found.channel = None
        self.ring = [None] * RING_SIZE
        self.held_bytes = 0

    # -- requests parked on a segment -------------------------------------------------------------

    @contextlib.contextmanager
    def parked(self, segment: Segment) -> Iterator[None]:
        """Count a request as parked on `segment` until the block ends; the block should end
        only once the request's response is written, which `wait_unparked` then waits for."""
        self._parked.append(segment)
        try:
            yield
        finally:
            self._parked.remove(segment)
            if not self._parked and self._unparked is not None:
                self._unparked.set()
                self._unparked = None

    @property
    def parked_count(self) -> int:
        return len(self._parked)

    async def wait_unparked(self) -> None:
        """Wait until no request is parked on this channel."""
        while self._parked:
            if self._unparked is None:
                self._unparked = asyncio.Event()
            await self._unparked.wait()
