"""The one reader of a client's JSON: a size and a nesting bound checked before parsing.

Python's parser recurses once per level: past about a thousand it raises RecursionError, which
is no ValueError, so it escaped the handlers that expected one (a 500, or a session's control
reader taken down). Below that, a deeply nested value still costs every later step (validation,
`model_dump`, events) a recursion of its own. So the depth is measured first, on the brackets
outside strings (a few numpy passes), and only a value within both bounds is
parsed. Every place that parses JSON a client sent goes through `loads`.
"""

from __future__ import annotations

import json

import numpy as np

JSON_LIMIT = 1024 * 1024
"""The largest JSON value read from a client unless a route says less (an upload's fields too)."""

JSON_MAX_DEPTH = 32
"""Nesting levels a client's JSON value may have (arrays and objects). The deepest real value is
a few levels (SAM2's `mask_input`, a StreamDiffusion ControlNet list): 32 is ample."""


_OPEN, _CLOSE, _QUOTE, _BACKSLASH = 1, 2, 3, 4
_KIND = np.zeros(256, dtype=np.uint8)
_KIND[[ord("["), ord("{")]] = _OPEN
_KIND[[ord("]"), ord("}")]] = _CLOSE
_KIND[ord('"')] = _QUOTE
_KIND[ord("\\")] = _BACKSLASH


class JSONRefused(ValueError):
    """A client's JSON refused: not JSON, over the size, or nested too deeply. The message says
    which, in words, for the client."""


def nesting_depth(data: bytes) -> int:
    """The deepest nesting of arrays and objects in `data`, counting only brackets outside
    strings (for malformed JSON, a number the parser will refuse anyway). Vectorised over the
    few bytes that matter (brackets, quotes, backslashes): about a parse's time at worst."""
    codes = np.frombuffer(data, dtype=np.uint8)
    positions = np.flatnonzero(_KIND[codes])
    if positions.size == 0:
        return 0
    kind = _KIND[codes[positions]]
    quote = kind == _QUOTE
    backslashes = np.flatnonzero(kind == _BACKSLASH)
    if backslashes.size:
        # A quote is escaped when an odd run of backslashes comes right before it.
        index = np.arange(codes.size)
        plain = np.maximum.accumulate(np.where(codes == ord("\\"), -1, index))
        quotes = positions[quote]
        run = quotes - 1 - plain[np.maximum(quotes - 1, 0)]
        run[quotes == 0] = 0
        quote[np.flatnonzero(quote)[run % 2 == 1]] = False
    outside = np.cumsum(quote) % 2 == 0
    steps = ((kind == _OPEN) & outside).astype(np.int32) - ((kind == _CLOSE) & outside)
    return max(0, int(np.cumsum(steps).max()))


def _refuse_constant(name: str) -> None:
    raise JSONRefused(f"{name} is not a finite number")


def _finite(text: str) -> float:
    value = float(text)
    if value in (float("inf"), float("-inf")):
        raise JSONRefused(f"{text[:20]} is not a finite number")
    return value


def loads(
    data: bytes | str,
    *,
    limit: int = JSON_LIMIT,
    what: str = "the body",
    max_depth: int = JSON_MAX_DEPTH,
) -> object:
    """Parse `data` as JSON, refusing with JSONRefused one over `limit` bytes, one nested deeper
    than `max_depth`, NaN and Infinity (not JSON), and anything that is not JSON. `what` names
    the value in the messages ("the body", "metadata")."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > limit:
        raise JSONRefused(f"{what} is over the limit of {_size(limit)}")
    if nesting_depth(raw) > max_depth:
        raise JSONRefused(
            f"{what} is nested too deeply: JSON arrays and objects may nest {max_depth} levels"
        )
    try:
        return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite)
    except JSONRefused as exc:
        raise JSONRefused(f"{what} is not valid JSON: {exc}") from None
    except RecursionError:
        # Unbalanced brackets can fool the count; the parser's own limit still holds.
        raise JSONRefused(f"{what} is nested too deeply") from None
    except ValueError as exc:
        raise JSONRefused(f"{what} is not valid JSON: {_reason(exc)}") from None


def _reason(exc: ValueError) -> str:
    if isinstance(exc, json.JSONDecodeError):
        return f"{exc.msg} at line {exc.lineno} column {exc.colno}"
    if isinstance(exc, UnicodeDecodeError):
        return "it is not UTF-8 text"
    # int() refuses integers of more than 4,300 digits (sys.get_int_max_str_digits).
    return "a number in it is too long"


def _size(limit: int) -> str:
    if limit >= 2**20:
        return f"{limit / 2**20:.3g} MiB"
    if limit >= 1024:
        return f"{limit / 1024:.3g} KiB"
    return f"{limit} bytes"
