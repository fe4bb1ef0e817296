"""Service errors and their HTTP mapping, shared by every route (live and batch alike).

    ServiceError (status, msg)
    ├── InvalidRequest      400
    ├── Unauthorized        401 (with WWW-Authenticate: Bearer)
    ├── Forbidden           403
    ├── NotFound            404
    ├── Conflict            409
    ├── PayloadTooLarge     413
    ├── UnsupportedMediaType 415
    ├── TooBusy             429 (trickle channel limit reached)
    └── Unavailable         503 (model absent, capacity reached)

One middleware answers them as Livepeer does, `{"detail": {"msg": ...}}`; pydantic validation
errors become 422 `{"detail": [{"loc", "msg", "type"}]}`; anything else is logged with its
traceback and answered 500 without one. Trickle routes answer in their own plain-text dialect.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from .trickle import TRICKLE_SERVER

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class ServiceError(Exception):
    status = 500

    def __init__(self, msg: str, *, headers: dict[str, str] | None = None) -> None:
        super().__init__(msg)
        self.msg = msg
        self.headers = headers or {}


class InvalidRequest(ServiceError, ValueError):
    status = 400


class Unauthorized(ServiceError):
    status = 401

    def __init__(self, msg: str) -> None:
        super().__init__(msg, headers={"WWW-Authenticate": "Bearer"})


class Forbidden(ServiceError):
    status = 403


class InvalidFields(ServiceError, ValueError):
    """422 in FastAPI's shape, as Livepeer's runner answers: `loc` starts at the request part
    ("body"), then the field path."""

    status = 422

    def __init__(self, errors: list[dict[str, object]]) -> None:
        super().__init__("; ".join(str(e.get("msg")) for e in errors))
        self.errors = errors

    @classmethod
    def from_validation(cls, exc: ValidationError, *loc: str | int) -> InvalidFields:
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        return cls(
            [{**e, "loc": [*loc, *_field_path(e["loc"])]} for e in _one_per_optional(errors)]
        )


# Where a field is `X | None`, pydantic reports a bad value once per member of the union,
# each with the member's tag in `loc` ("constrained-int", "none"). A client wants one error
# on the field: the one against X.
_UNION_TAGS = {"none", "int", "float", "str", "bool", "bytes", "dict", "list"}


def _is_union_tag(part: object) -> bool:
    return isinstance(part, str) and (part in _UNION_TAGS or "-" in part or "[" in part)


def _field_path(loc: tuple[str | int, ...] | list[str | int]) -> list[str | int]:
    return [part for part in loc if not _is_union_tag(part)]


def _one_per_optional(errors: list[Any]) -> list[Any]:
    fields_with_others = {
        tuple(_field_path(e["loc"])) for e in errors if e["type"] != "none_required"
    }
    return [
        e
        for e in errors
        if not (e["type"] == "none_required" and tuple(_field_path(e["loc"])) in fields_with_others)
    ]


class NotFound(ServiceError, LookupError):
    status = 404


class UnsupportedMediaType(ServiceError):
    status = 415


class Conflict(ServiceError):
    status = 409


class PayloadTooLarge(ServiceError):
    status = 413


class TooBusy(ServiceError):
    status = 429


class Unavailable(ServiceError):
    """503; with `retry_after_s` for what passes (a model loading, a full queue), without it
    for what does not (a model that is not on this machine)."""

    status = 503

    def __init__(self, msg: str, *, retry_after_s: float | None = None) -> None:
        headers = (
            {} if retry_after_s is None else {"Retry-After": str(max(1, round(retry_after_s)))}
        )
        super().__init__(msg, headers=headers)
        self.retry_after_s = retry_after_s


# What libraries put in their messages that means nothing to a client: an object's repr
# (PIL: "cannot identify image file <_io.BytesIO object at 0x7f...>"), FFmpeg's error number
# and the file name PyAV reports for an in-memory file ("[Errno 1094995529] ...: '<none>'").
_NOISE = (
    re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>"),
    re.compile(r"\[Errno -?\d+\]\s*"),
    re.compile(r":\s*'<none>'"),
)
_CAMEL = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def in_words(exc: BaseException) -> str:
    """An exception's message for a person: its text without object reprs or error numbers,
    or, when it has no text, its kind in words (`TimeoutError`: "timeout error")."""
    text = str(exc)
    for noise in _NOISE:
        text = noise.sub("", text)
    text = text.strip(" :;,")
    if text:
        return text
    return _CAMEL.sub(" ", exc.__class__.__name__).lower()


def error_body(msg: str) -> dict[str, object]:
    return {"detail": {"msg": msg}}


def _in_trickle(request: web.Request) -> bool:
    # Trickle routes keep go-livepeer's plain-text answers (405 with Allow included).
    return any(TRICKLE_SERVER in app for app in request.match_info.apps)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ValidationError as exc:
        detail = exc.errors(include_url=False, include_context=False, include_input=False)
        return web.json_response({"detail": detail}, status=422)
    except InvalidFields as exc:
        return web.json_response({"detail": exc.errors}, status=422)
    except ServiceError as exc:
        return web.json_response(error_body(exc.msg), status=exc.status, headers=exc.headers)
    except web.HTTPException as exc:
        if exc.status < 400 or _in_trickle(request):
            raise
        # Keep headers such as Allow on a 405, drop the text/plain Content-Type.
        kept = {k: v for k, v in exc.headers.items() if k.lower() != "content-type"}
        return web.json_response(error_body(exc.reason), status=exc.status, headers=kept)
    except Exception:
        logger.exception("unhandled error path=%s", request.path)
        return web.json_response(error_body("Internal server error"), status=500)
