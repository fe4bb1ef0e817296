"""What a model id may be: a Hugging Face id, `owner/name` or `name`, never a path.

A model id names a folder on the service's machine (runtime/models.py), so this check is what
keeps a client from naming any other folder. Request models take `ModelId` (empty: the
route's default), so that a bad id is a 422 naming the field before anything reads the disk.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, WithJsonSchema

MODEL_ID_MAX_CHARS = 96
"""Hugging Face's own bound on a repo id (owner and name together)."""
# A part starts with a letter or digit; a '.' is always followed by another character, so
# neither '..' nor a trailing '.' can occur. No lookahead: the OpenAPI document carries it.
_PART_PATTERN = r"[A-Za-z0-9](?:\.?[A-Za-z0-9_-])*"
_PART = re.compile(_PART_PATTERN)
PATTERN = rf"^{_PART_PATTERN}(?:/{_PART_PATTERN})?$"
"""A model id, as a regular expression (with the length bound, what `check_model_id` takes)."""


class BadModelId(ValueError):
    """A model id that is not a Hugging Face-style id."""


def check_model_id(model_id: str) -> str:
    """`model_id` if it is a Hugging Face-style id, else BadModelId saying why: no absolute
    path, no `..`, no `~`, one `/` at most, letters, digits, `.`, `_` and `-` only."""
    if not model_id:
        raise BadModelId("the model id is empty")
    if len(model_id) > MODEL_ID_MAX_CHARS:
        raise BadModelId(f"a model id has at most {MODEL_ID_MAX_CHARS} characters")
    parts = model_id.split("/")
    if len(parts) > 2 or any(not _PART.fullmatch(part) for part in parts):
        raise BadModelId(
            "a model id is a Hugging Face id, `owner/name` or `name`: letters, digits, '.', "
            "'_' and '-', starting with a letter or digit, no '..' (never a path)"
        )
    return model_id


def _optional(model_id: str) -> str:
    return check_model_id(model_id) if model_id else model_id


ModelId = Annotated[
    str,
    AfterValidator(check_model_id),
    WithJsonSchema({"type": "string", "maxLength": MODEL_ID_MAX_CHARS, "pattern": PATTERN}),
]
"""A model id in a request: a Hugging Face id."""
OptionalModelId = Annotated[
    str,
    AfterValidator(_optional),
    WithJsonSchema({"type": "string", "maxLength": MODEL_ID_MAX_CHARS, "pattern": f"^$|{PATTERN}"}),
]
"""A model id in a request, or empty for the route's default."""
