"""Log context: the session id, its pipeline and the frame-loop stage ride in context variables,
so every line a session's tasks and threads write names them (tasks inherit the context; threads
get it from `run_in`).

Two formats: `text` for people (`... [session]: message`) and `json` for log collectors, one
object per line with time, level, logger, message, and session, pipeline, stage and exc_info
when known.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from typing import Any, Literal

from pydantic import BaseModel

from runtime.library_logs import is_library_record

SESSION_ID: contextvars.ContextVar[str] = contextvars.ContextVar("session_id", default="-")
PIPELINE: contextvars.ContextVar[str | None] = contextvars.ContextVar("pipeline", default=None)
STAGE: contextvars.ContextVar[str | None] = contextvars.ContextVar("stage", default=None)
"""The frame loop's task a line comes from: ingest, inference, or a sink's name."""

LogFormat = Literal["text", "json"]


class LogSetup(BaseModel):
    """How the service logs, and for which session: a worker process writes the lines of a
    session's pipeline (its model loads, its libraries' warnings) to the stderr it shares with
    the service, in the service's format and level, naming the session (pipeline_child.py)."""

    level: int
    format: LogFormat
    session: str
    pipeline: str


NOISY = ("aiohttp.access", "aioice", "aiortc", "libav")
"""Loggers held at WARNING or above: their INFO lines are per packet or per request."""


class SessionFilter(logging.Filter):
    """Adds `session`, `pipeline` and `stage` to every record (a handler filter: it sees records
    of every logger). A `session` passed in `extra` (a session's own log adapter) wins."""

    def filter(self, record: logging.LogRecord) -> bool:
        if not hasattr(record, "session"):
            record.session = SESSION_ID.get()
        if not hasattr(record, "pipeline"):
            record.pipeline = PIPELINE.get()
        if not hasattr(record, "stage"):
            record.stage = STAGE.get()
        return True


class LibraryChatter(logging.Filter):
    """Lowers diffusers' and transformers' warnings to DEBUG (see `runtime.library_logs`):
    shown only under `--log-level DEBUG`. A handler filter, as it must see their child loggers'
    records; their errors pass unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.WARNING or not is_library_record(record):
            return True
        if logging.getLogger().getEffectiveLevel() > logging.DEBUG:
            return False
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line; fields without a value are left out rather than null."""

    def format(self, record: logging.LogRecord) -> str:
        body: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        session = getattr(record, "session", None)
        if session and session != "-":
            body["session"] = session
        for name in ("pipeline", "stage"):
            value = getattr(record, name, None)
            if value:
                body[name] = value
        if record.exc_info:
            body["exc_info"] = self.formatException(record.exc_info)
        if record.stack_info:
            body["stack_info"] = self.formatStack(record.stack_info)
        # default=str: a message argument that JSON cannot hold is already text in `message`;
        # this only guards an odd `extra` value.
        return json.dumps(body, default=str)


def make_handler(log_format: LogFormat = "text", stream: Any = None) -> logging.Handler:
    """The service's log handler: context filter and formatter (stderr by default)."""
    handler = logging.StreamHandler(sys.stderr if stream is None else stream)
    handler.addFilter(SessionFilter())
    handler.addFilter(LibraryChatter())
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(session)s]: %(message)s")
        )
    return handler


_worker_setup: list[tuple[int, LogFormat]] = []
"""The level and format a worker process's handler was set up with (module state, as the
process itself owns it; empty in the service's process)."""


def log_like_the_service(level: int, log_format: LogFormat) -> None:
    """In a worker process: write lines to the stderr it shares with the service, at the
    service's level and in its format (else a library's warning came out bare, through
    logging's last-resort handler)."""
    if _worker_setup == [(level, log_format)]:
        return
    root = logging.getLogger()
    root.handlers[:] = [make_handler(log_format)]
    root.setLevel(level)
    _worker_setup[:] = [(level, log_format)]


def handler_format() -> LogFormat:
    """The format the service's handler writes, as `configure_logging` set it (text when it
    was never called, as under tests): for the worker processes to write alike."""
    root = logging.getLogger()
    json_handler = any(isinstance(h.formatter, JsonFormatter) for h in root.handlers)
    return "json" if json_handler else "text"


def configure_logging(level: str, log_format: LogFormat = "text", stream: Any = None) -> None:
    # Here, not at the top: a worker process uses this module's handler without aiohttp.
    from protocol.http_errors import quiet_client_errors

    root = logging.getLogger()
    root.handlers[:] = [make_handler(log_format, stream)]
    root.setLevel(level.upper())
    for noisy in NOISY:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
    # A request aiohttp cannot even parse (an 8 KiB path) is the client's mistake: one line.
    quiet_client_errors()
