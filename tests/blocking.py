"""A watch on the event loop for tests marked `blockbuster`: any blocking call (file or socket
I/O, `time.sleep`, a lock wait, an import that reads the disk) made on the loop's thread from
the service's own code raises `BlockingError` there, and the test fails, even where the error
middleware turned it into a 500 or a session logged it and went on.

Work the service hands to threads (`asyncio.to_thread`, the inference worker, the session's
load thread: torch imports and diffusers loads) is not watched: only the loop's thread is.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from blockbuster import BlockBuster, BlockingError, blockbuster_ctx

SERVICE = ["live", "batch", "protocol", "runtime"]
"""Blocking calls are flagged when one of these packages is on the stack."""


def _allow_known_safe(buster: BlockBuster) -> None:
    """Calls that block for microseconds by design, or before the service serves; each
    allowed only where it is made."""
    for function in buster.functions.values():
        # The app factory runs once, before the service takes a request (the CLI calls it
        # before the loop runs; tests call it in their own coroutine).
        function.can_block_in("live/app.py", {"create_app"})
    # logging's handlers take a lock and write a line to stderr or a capture buffer.
    for name in ("threading.Lock.acquire", "threading.RLock.acquire", "io.TextIOWrapper.write"):
        if name in buster.functions:
            buster.functions[name].can_block_in(
                "logging/__init__.py", {"handle", "emit", "acquire", "flush"}
            )
    # A worker process's exit status, from multiprocessing's fork server: read only once the
    # process's sentinel is readable, which is when the server has written it.
    if "os.read" in buster.functions:
        buster.functions["os.read"].can_block_in("multiprocessing/forkserver.py", {"read_signed"})
    # asyncio's own machinery: thread pools hand off work under a lock held for an instant.
    for name in ("threading.Lock.acquire", "threading.RLock.acquire"):
        if name in buster.functions:
            buster.functions[name].can_block_in("concurrent/futures/thread.py", {"submit"})
            buster.functions[name].can_block_in("asyncio/base_events.py", {"run_in_executor"})


@dataclass
class LoopWatch:
    """What was caught: blocking calls the service made on the loop's thread."""

    found: list[str] = field(default_factory=list)


class _Catch(logging.Handler):
    """A BlockingError the service caught and logged (a 500, a session's error) still counts."""

    def __init__(self, watch: LoopWatch) -> None:
        super().__init__(logging.DEBUG)
        self.watch = watch

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        while error is not None:
            if isinstance(error, BlockingError):
                self.watch.found.append(str(error))
                return
            error = error.__cause__ or error.__context__


@contextmanager
def watching_the_loop() -> Iterator[LoopWatch]:
    watch = LoopWatch()
    catch = _Catch(watch)
    root = logging.getLogger()
    root.addHandler(catch)
    try:
        with blockbuster_ctx(SERVICE) as buster:
            _allow_known_safe(buster)
            yield watch
    finally:
        root.removeHandler(catch)
