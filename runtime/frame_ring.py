"""Frame slots in shared memory: how frames cross between the service and a worker process.

One segment holds `slots` slots of `slot_bytes` each, sized for the largest frame a call may
carry. The parent creates the segment, owns it and alone hands out slots (`acquire`/`release`),
so no lock spans the two processes: a slot belongs to one call from submit until its reply.
The pipe then carries only a slot index, a shape and a dtype name.

Segments are named with the `lv2v-` prefix and the parent's pid, so a test (or an operator)
can tell ours in /dev/shm. The parent unlinks them on close; if the parent itself dies,
multiprocessing's resource tracker (a helper process that outlives it) unlinks them.
"""

from __future__ import annotations

import logging
import os
import secrets
from math import prod
from multiprocessing import shared_memory
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

SEGMENT_PREFIX = "lv2v-"


FrameSpec = tuple[int, tuple[int, ...], str]
"""Where a frame lies: (slot, shape, dtype name), what the pipe carries. A plain tuple: it is
pickled twice per frame, and a tuple pickles in a fraction of a class's time."""

_DTYPES: dict[str, np.dtype[Any]] = {}


class FrameRing:
    def __init__(self, shm: shared_memory.SharedMemory, slots: int, slot_bytes: int) -> None:
        self._shm = shm
        self.slots = slots
        self.slot_bytes = slot_bytes
        self._closed = False
        self._free = list(range(slots - 1, -1, -1))
        self._owner = False

    @classmethod
    def create(cls, slots: int, slot_bytes: int, role: str) -> FrameRing:
        if slots < 1 or slot_bytes < 1:
            raise ValueError("a frame ring needs at least one slot of at least one byte")
        name = f"{SEGMENT_PREFIX}{os.getpid()}-{role}-{secrets.token_hex(4)}"
        shm = shared_memory.SharedMemory(name=name, create=True, size=slots * slot_bytes)
        ring = cls(shm, slots, slot_bytes)
        ring._owner = True
        return ring

    @classmethod
    def attach(cls, name: str, slots: int, slot_bytes: int) -> FrameRing:
        return cls(shared_memory.SharedMemory(name=name), slots, slot_bytes)

    @property
    def name(self) -> str:
        return self._shm.name

    def acquire(self) -> int | None:
        """A free slot, or None when every slot is taken."""
        return self._free.pop() if self._free else None

    def release(self, slot: int) -> None:
        self._free.append(slot)

    @property
    def free(self) -> int:
        return len(self._free)

    def fits(self, array: np.ndarray) -> bool:
        return array.nbytes <= self.slot_bytes

    def write(self, slot: int, array: np.ndarray) -> FrameSpec:
        """Copy `array` into `slot` (the caller checked that it fits)."""
        if array.dtype.hasobject:
            raise ValueError("a frame holds numbers, not Python objects")
        spec = (slot, array.shape, array.dtype.str)
        np.copyto(self._view(spec), array, casting="no")
        return spec

    def view(self, spec: FrameSpec) -> np.ndarray:
        """The frame in place, read-only: valid until its slot is released (copy to keep it)."""
        view = self._view(spec)
        view.flags.writeable = False
        return view

    def read(self, spec: FrameSpec) -> np.ndarray:
        """A copy of the frame, the caller's to keep."""
        return self._view(spec).copy()

    def _view(self, spec: FrameSpec) -> np.ndarray:
        if self._closed:
            raise ValueError("the frame ring is closed")
        slot, shape, dtype_name = spec
        dtype = _DTYPES.get(dtype_name)
        if dtype is None:
            dtype = _DTYPES[dtype_name] = np.dtype(dtype_name)
        if not 0 <= slot < self.slots:
            raise ValueError(f"frame slot {slot} is out of range")
        if prod(shape) * dtype.itemsize > self.slot_bytes:
            raise ValueError(f"a frame of shape {shape} does not fit a {self.slot_bytes}-byte slot")
        return np.ndarray(shape, dtype, self._shm.buf, slot * self.slot_bytes)

    def close(self) -> None:
        """Unmap the segment, and unlink it when this side created it. Idempotent."""
        if self._closed:
            return
        self._closed = True
        try:
            self._shm.close()
        except BufferError:
            # A view handed out is still alive somewhere; the mapping goes with this process.
            logger.warning("frame ring %s still has frames in use at close", self.name)
        if self._owner:
            try:
                self._shm.unlink()
            except FileNotFoundError:
                pass
