"""Quiet logging of malformed requests for aiohttp servers.

aiohttp answers a request it cannot parse (a request line over 8,190 bytes, a broken header,
bad chunked framing, ...) with a 4xx itself, before any handler runs, and logs it on the
`aiohttp.server` logger with `logger.exception("Error handling request from %s", ...)`
(web_protocol.py `RequestHandler.handle_error`): an ERROR with a full traceback for what is the
client's mistake, which anyone can trigger at will to flood the logs.

`quiet_client_errors()` installs a filter on that logger that turns those records into one INFO
line without traceback. Errors of our own (a handler raising, answered 500) stay ERROR records
with their traceback.

The parser's message quotes the offending line, and a header line can be `Authorization` with a
client's token in it: neither the log line nor the 400 body (`QuietRequestHandler`) repeats the
client's bytes, only the parser's reason ("Invalid header value char").
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler

AIOHTTP_SERVER_LOGGER = "aiohttp.server"
_MAX_REASON = 100
"""Characters of the parser's reason kept."""
_QUOTED = re.compile(r"""[:\s]*(?:['"]|b['"]).*""", re.DOTALL)


def refusal_reason(exc: HttpProcessingError) -> str:
    """What the parser found wrong, without the bytes it quotes: its message's first line up to
    any quotation ("Invalid header value char", "Bad status line")."""
    first = (exc.message or "").splitlines()[0] if exc.message else ""
    reason = _QUOTED.sub("", first).strip(" :")[:_MAX_REASON]
    return reason or "malformed request"


class ClientErrorFilter(logging.Filter):
    """Rewrites aiohttp's records of requests it refused as unparseable (4xx) into a one-line
    INFO record without exc_info; lets every other record through unchanged."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if not isinstance(exc, HttpProcessingError) or not 400 <= exc.code < 500:
            return True
        remote = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
        # The reason only: the parser's message quotes the client's bytes (a token, a
        # capability URL); %r keeps even the reason on one line.
        record.msg = "bad request refused remote=%s status=%d error=%s detail=%r"
        record.args = (remote, exc.code, type(exc).__name__, refusal_reason(exc))
        # Never raise the level: aiohttp already logs some of these (a bad method on a fresh
        # connection, usually TLS or port scans) at DEBUG.
        level = min(record.levelno, logging.INFO)
        record.levelno = level
        record.levelname = logging.getLevelName(level)
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_client_errors(logger: logging.Logger | None = None) -> ClientErrorFilter:
    """Install ClientErrorFilter on `logger` (default: aiohttp's `aiohttp.server`, where aiohttp
    logs them; a filter on a parent logger would not see them). Idempotent; returns the filter
    so that a caller can remove it."""
    logger = logger or logging.getLogger(AIOHTTP_SERVER_LOGGER)
    for existing in logger.filters:
        if isinstance(existing, ClientErrorFilter):
            return existing
    installed = ClientErrorFilter()
    logger.addFilter(installed)
    return installed


class QuietRequestHandler(RequestHandler):
    """aiohttp's request handler, but its 4xx for a request it cannot parse gives the reason
    only (a server with handlers of its own subclasses this one)."""

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if isinstance(exc, HttpProcessingError) and 400 <= status < 500:
            message = f"{HTTPStatus(status).phrase}: {refusal_reason(exc)}"
        return super().handle_error(request, status, exc, message)
