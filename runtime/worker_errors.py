"""What a call into a worker process can end with, besides its result.

Errors cross the process boundary as a type name and a message, never as a pickled exception:
an exception class the parent cannot import, or one whose constructor takes other arguments,
would fail to unpickle and hide the real error. Callers therefore match on these types, and
read `type_name` for what the operation itself raised.

`retry_after_s` is set where trying again later can succeed: a batch route maps such an error
to 503 with `Retry-After`.
"""

from __future__ import annotations


class WorkerError(Exception):
    """Base of every error a worker call raises besides the operation's own."""

    retry_after_s: float | None = None


class OperationFailed(WorkerError):
    """The operation raised in the worker; the worker goes on serving."""

    def __init__(self, type_name: str, message: str) -> None:
        super().__init__(f"{type_name}: {message}" if message else type_name)
        self.type_name = type_name
        self.message = message


class WorkerLost(WorkerError):
    """The worker process ended (crashed, was killed, hung, or its device was poisoned) while
    this call was queued or running there. A fresh worker is started; try again."""

    def __init__(self, reason: str, retry_after_s: float | None = 1.0) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class CallTimedOut(WorkerLost):
    """This call ran past its timeout, counted from when the worker started it; the worker
    was ended so the device serves others again."""


class WorkerUnavailable(WorkerError):
    """The worker cannot take calls now: it is restarting (`retry_after_s` says when to try
    again), it failed too often (`retry_after_s` is None) or it is shut down."""

    def __init__(self, reason: str, retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


class WorkerBusy(WorkerError):
    """Every shared-memory frame slot is taken by calls in flight: drop this frame or retry."""

    retry_after_s = 1.0


class StaleObject(WorkerError):
    """The object lived in a worker process that has since been replaced: create it again
    (the restart hook is where that happens)."""


class DevicePoisoned(Exception):
    """Raised by an operation, in the worker, when its device can no longer be used by this
    process (a CUDA illegal memory access, a device-side assert): the worker is replaced."""


# CUDA errors after which the context is unusable for the rest of the process. Out of memory
# is not among them: freeing memory and retrying works in the same process.
_POISONING_MARKERS = (
    "illegal memory access",
    "device-side assert",
    "unspecified launch failure",
    "misaligned address",
    "illegal instruction",
    "CUBLAS_STATUS_EXECUTION_FAILED",
    "CUDNN_STATUS_EXECUTION_FAILED",
    "uncorrectable ECC error",
)


def poisons_device(exc: BaseException) -> bool:
    """Whether `exc`, raised by an operation, leaves the worker's device unusable."""
    if isinstance(exc, DevicePoisoned):
        return True
    if type(exc).__name__ == "OutOfMemoryError":
        return False
    text = str(exc)
    return any(marker in text for marker in _POISONING_MARKERS)
