"""Log context: the session id rides in a context variable, so every line a session's tasks and
threads write names it (tasks inherit the context; threads get it from `run_in`)."""

from __future__ import annotations

import contextvars
import logging
import sys

from protocol.http_errors import quiet_client_errors

SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")


class SessionFilter(logging.Filter):
    """Adds `session` to every record (a handler filter: it sees records of every logger)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = SESSION_ID.get()
        return True


def configure_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SessionFilter())
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(session)s]: %(message)s")
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for noisy in ("aiohttp.access", "aioice", "aiortc", "libav"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # A request aiohttp cannot even parse (an 8 KiB path) is the client's mistake: one line.
    quiet_client_errors()
