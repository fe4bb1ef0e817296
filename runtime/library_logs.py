"""diffusers' and transformers' log lines go through the process's own logging.

Both libraries give their root logger a handler of their own that writes to stderr, bypassing
the service's format (no time, level or session), and stop it from propagating. What they say on
a normal load is chatter that reads like a fault ("config attributes ... will be ignored",
"modules ... should be kept in float32: []", "requires torchvision"), so the service's handler
lowers their warnings to DEBUG (`live.logs`); their errors stay errors.

They set this up when first imported, which happens inside a model load, so the loaders call
`route_library_logs` once they have imported them and before they load anything, rather than
the service at start (importing diffusers costs seconds that a service serving only `noop` or
`cartoon` never pays).
"""

from __future__ import annotations

import logging
import threading

LIBRARIES = ("diffusers", "transformers")
"""The libraries whose loggers are routed (their logger names: the package names)."""

_lock = threading.Lock()


def route_library_logs() -> None:
    """Take the libraries' own stderr handlers off and let their records propagate to the root
    logger's handlers. Idempotent; cheap once the libraries are imported."""
    with _lock:
        if all(_routed(name) for name in LIBRARIES):
            return
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library in (diffusers_logging, transformers_logging):
            library.disable_default_handler()
            library.enable_propagation()


def _routed(name: str) -> bool:
    logger = logging.getLogger(name)
    return logger.propagate and not logger.handlers and logger.level != logging.NOTSET


def is_library_record(record: logging.LogRecord) -> bool:
    return any(record.name == name or record.name.startswith(f"{name}.") for name in LIBRARIES)
