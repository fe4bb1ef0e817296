"""The messages between the service and a worker process, and how they are framed on a pipe.

A message is a tuple, pickled, behind a 4-byte big-endian length. Frames never travel here:
a call names its shared-memory slots (`FrameSpec`), see frame_ring.py.

Parent to child:
    (CALL, id, live, target, arguments, frame_in, out_slot, keep, stream, loader)
                      arguments: (args, kwargs), pickled on their own; loader: run it on
                      the child's loader lane (one call at a time, beside the main thread)
    (CANCEL, id)      skip the call if it has not started; end a stream at its next item
    (RELEASE, obj)    forget an object made with `keep`
    (STOP,)           finish what is queued (on both lanes), then exit

Child to parent (from either lane, a whole message at a time):
    (READY, pid)
    (STARTED, id)                         the call's timeout counts from here
    (RESULT, id, value, frame_out)        value pickled on its own; frame_out: a FrameSpec
                                          when the result is a frame
    (ITEM, id, value)                     one item of a stream, pickled on its own
    (DONE, id)                            the stream ended
    (ERROR, id, type_name, message, poisoned)
    (SKIPPED, id)                         cancelled before it started

Arguments and results are pickled on their own inside the message: one the other side cannot
unpickle (a class it cannot import) fails that call, not the pipe.

A target is "package.module:attribute" (a function, or a class to build an object from with
`keep`), or (object id, method name) for an object kept in the child.
"""

from __future__ import annotations

import importlib
import os
import pickle
import struct
from collections.abc import Callable
from typing import Any

CALL, CANCEL, RELEASE, STOP = "call", "cancel", "release", "stop"
READY, STARTED, RESULT, ITEM, DONE, ERROR, SKIPPED = (
    "ready",
    "started",
    "result",
    "item",
    "done",
    "error",
    "skipped",
)

HEADER = struct.Struct("!I")
MAX_MESSAGE_BYTES = 256 * 2**20
"""A message larger than this is refused: results this big belong in a frame slot."""

Target = str | tuple[int, str]


def dumps(value: Any) -> bytes:
    return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)


def loads(data: bytes) -> Any:
    return pickle.loads(data)


def encode(message: tuple[Any, ...]) -> bytes:
    body = dumps(message)
    if len(body) > MAX_MESSAGE_BYTES:
        raise ValueError(f"a message of {len(body)} bytes is over the {MAX_MESSAGE_BYTES} limit")
    return HEADER.pack(len(body)) + body


class Decoder:
    """Splits a byte stream into messages, whatever the chunks it arrives in."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[tuple[Any, ...]]:
        self._buffer += data
        messages = []
        while len(self._buffer) >= HEADER.size:
            (size,) = HEADER.unpack_from(self._buffer)
            if size > MAX_MESSAGE_BYTES:
                raise ValueError(f"a message of {size} bytes is over the limit")
            end = HEADER.size + size
            if len(self._buffer) < end:
                break
            messages.append(pickle.loads(memoryview(self._buffer)[HEADER.size : end]))
            del self._buffer[:end]
        return messages


def read_message(fd: int) -> tuple[Any, ...] | None:
    """The next message from a blocking pipe, or None at its end."""
    header = _read_exactly(fd, HEADER.size)
    if header is None:
        return None
    (size,) = HEADER.unpack(header)
    if size > MAX_MESSAGE_BYTES:
        raise ValueError(f"a message of {size} bytes is over the limit")
    body = _read_exactly(fd, size)
    if body is None:
        return None
    return pickle.loads(body)  # type: ignore[no-any-return]


def _read_exactly(fd: int, size: int) -> bytes | None:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = os.read(fd, size - len(chunks))
        if not chunk:
            return None
        chunks += chunk
    return bytes(chunks)


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def check_path(target: str) -> None:
    """Refuse a target that is not "package.module:attribute", in words."""
    module, sep, attribute = target.partition(":")
    if not sep or not module or not attribute:
        raise ValueError(f"an operation is named 'package.module:attribute', not '{target}'")


def resolve(target: str) -> Callable[..., Any]:
    """The callable a "package.module:attribute" target names (imported in the child)."""
    check_path(target)
    module, _, attribute = target.partition(":")
    value: Any = importlib.import_module(module)
    for part in attribute.split("."):
        value = getattr(value, part)
    if not callable(value):
        raise TypeError(f"{target} is not callable")
    return value  # type: ignore[no-any-return]
