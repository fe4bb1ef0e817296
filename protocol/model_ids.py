"""What a model id may be: a Hugging Face id, `owner/name` or `name`, never a path.

A model id names a folder on the service's machine (runtime/models.py), so this check is what
keeps a client from naming any other folder. Request models take `ModelId` (empty: the
route's default), so that a bad id is a 422 naming the field before anything reads the disk.
"""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator

MODEL_ID_MAX_CHARS = 96
"""Hugging Face's own bound on a repo id (owner and name together)."""
_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9_-])?")


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
    if len(parts) > 2 or any(not _PART.fullmatch(part) or ".." in part for part in parts):
        raise BadModelId(
            "a model id is a Hugging Face id, `owner/name` or `name`: letters, digits, '.', "
            "'_' and '-', starting with a letter or digit, no '..' (never a path)"
        )
    return model_id


def _optional(model_id: str) -> str:
    return check_model_id(model_id) if model_id else model_id


ModelId = Annotated[str, AfterValidator(check_model_id)]
"""A model id in a request: a Hugging Face id."""
OptionalModelId = Annotated[str, AfterValidator(_optional)]
"""A model id in a request, or empty for the route's default."""
