"""Routes described for the OpenAPI document: each route module declares its `Operation`s next
to its handlers, with the pydantic models the handlers use, and the document is generated from
them (never written by hand).

`build_openapi(operations, title=..., version=...)` lays the document out as Livepeer's runner
spec does (openapi 3.1.0, FastAPI's layout): every model's JSON schema under
`components/schemas`, named after the model; request bodies and 200 answers referencing them;
errors as `HTTPError` (`{"detail": {"msg"}}`) or, for 422, `HTTPValidationError`; the bearer
token as the `HTTPBearer` security scheme.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import JsonSchemaMode, models_json_schema

from .batch_api import HTTPError, HTTPValidationError

JSON = "application/json"
MULTIPART = "multipart/form-data"
REF_TEMPLATE = "#/components/schemas/{model}"
SECURITY_SCHEME = "HTTPBearer"

RETRY_AFTER = {
    "description": "Seconds to wait before retrying, when the cause passes (a model loading, "
    "a full queue); absent when it does not (a model that is not on this machine).",
    "schema": {"type": "integer", "minimum": 1},
}

# The runner spec's descriptions of its error answers; the others are HTTP's phrases.
ERROR_DESCRIPTIONS = {
    400: "Bad Request",
    401: "Unauthorized",
    422: "Validation Error",
    500: "Internal Server Error",
    503: "Service Unavailable",
}

OTHER_STATUSES = {470: "Entry Not Found", 499: "Client Closed Request"}

_PATH_PARAM = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    operation_id: str
    summary: str
    description: str = ""
    request: type[BaseModel] | None = None
    request_type: str | None = None
    """"application/json", "multipart/form-data", "application/sdp", ...; with no `request`
    model a non-JSON body is a plain string."""
    response: type[BaseModel] | None = None
    response_type: str = JSON
    """The 200 (`status`) answer's media type; with no `response` model a non-JSON answer is a
    plain string, and an empty type means an answer without a body."""
    errors: tuple[int, ...] = (400, 401, 422, 500)
    auth: bool = True
    tags: tuple[str, ...] = ()
    status: int = 200
    """The status of a successful answer (201 for WHIP's created resource, 204 for OPTIONS)."""
    query: type[BaseModel] | None = None
    """Query parameters, one per field of this model."""
    path_params: tuple[tuple[str, str], ...] = ()
    """Descriptions of `{name}` path segments, as (name, description) pairs."""
    response_headers: tuple[tuple[str, str], ...] = ()
    """Headers of a successful answer, as (name, description) pairs."""
    error_type: str = JSON
    """Media type of error answers: JSON (`HTTPError`, `HTTPValidationError`), or plain text
    for routes that answer in another dialect (trickle's, as go-livepeer's)."""


def path_parameters(path: str) -> list[str]:
    """The names of the `{name}` (or aiohttp's `{name:regex}`) segments of `path`."""
    return _PATH_PARAM.findall(path)


def openapi_path(path: str) -> str:
    """`path` with aiohttp's `{name:regex}` segments written as OpenAPI's `{name}`."""
    return _PATH_PARAM.sub(lambda m: "{" + m.group(1) + "}", path)


def build_openapi(
    operations: list[Operation], *, title: str, version: str, description: str = ""
) -> dict[str, Any]:
    """The OpenAPI 3.1 document of `operations`, schemas generated from their models."""
    schemas = _component_schemas(operations)
    refs = schemas.pop(None)
    paths: dict[str, dict[str, Any]] = {}
    for op in operations:
        entry = paths.setdefault(openapi_path(op.path), {})
        method = op.method.lower()
        if method in entry:
            raise ValueError(f"two operations for {op.method} {op.path}")
        entry[method] = _operation(op, refs)
    ids = [op.operation_id for op in operations]
    duplicates = sorted({i for i in ids if ids.count(i) > 1})
    if duplicates:
        raise ValueError(f"operation ids used twice: {', '.join(duplicates)}")
    info: dict[str, Any] = {"title": title}
    if description:
        info["description"] = description
    info["version"] = version
    tags = sorted({tag for op in operations for tag in op.tags})
    document: dict[str, Any] = {"openapi": "3.1.0", "info": info}
    if tags:
        document["tags"] = [{"name": tag} for tag in tags]
    document["paths"] = paths
    document["components"] = {
        "schemas": dict(sorted(schemas.items())),
        "securitySchemes": {SECURITY_SCHEME: {"type": "http", "scheme": "bearer"}},
    }
    return document


_Key = tuple[type[BaseModel], JsonSchemaMode]


def _component_schemas(operations: list[Operation]) -> dict[Any, Any]:
    """Every model's schema under its name, and (under the key None) each (model, mode)'s
    reference. Request models and query models are read as validated, answers as
    serialized."""
    keys: list[_Key] = [(HTTPError, "serialization"), (HTTPValidationError, "serialization")]
    for op in operations:
        for model, mode in (
            (op.request, "validation"),
            (op.query, "validation"),
            (op.response, "serialization"),
        ):
            if model is not None and (model, mode) not in keys:
                keys.append((model, mode))  # type: ignore[arg-type]
    refs, top = models_json_schema(keys, ref_template=REF_TEMPLATE)
    schemas: dict[Any, Any] = dict(top.get("$defs", {}))
    schemas[None] = refs
    return schemas


def _operation(op: Operation, refs: dict[_Key, dict[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if op.tags:
        out["tags"] = list(op.tags)
    out["summary"] = op.summary
    if op.description:
        out["description"] = op.description
    out["operationId"] = op.operation_id
    parameters = _parameters(op, refs)
    if parameters:
        out["parameters"] = parameters
    body = _request_body(op, refs)
    if body is not None:
        out["requestBody"] = body
    out["responses"] = _responses(op, refs)
    if op.auth:
        out["security"] = [{SECURITY_SCHEME: []}]
    return out


def _parameters(op: Operation, refs: dict[_Key, dict[str, Any]]) -> list[dict[str, Any]]:
    docs = dict(op.path_params)
    params: list[dict[str, Any]] = []
    for name in path_parameters(op.path):
        param: dict[str, Any] = {"name": name, "in": "path", "required": True}
        if name in docs:
            param["description"] = docs[name]
        param["schema"] = {"type": "string"}
        params.append(param)
    if op.query is not None:
        # The query model's own schema, inline: each property is one parameter.
        schema = op.query.model_json_schema(ref_template=REF_TEMPLATE, mode="validation")
        required = set(schema.get("required", ()))
        for name, prop in schema.get("properties", {}).items():
            prop = dict(prop)
            param = {"name": name, "in": "query", "required": name in required}
            text = prop.pop("description", None)
            if text:
                param["description"] = text
            param["schema"] = prop
            params.append(param)
    return params


def _content(
    media_type: str, model: type[BaseModel] | None, ref: dict[str, Any] | None
) -> dict[str, Any]:
    if model is not None and ref is not None:
        return {media_type: {"schema": dict(ref)}}
    if media_type == JSON:
        return {media_type: {"schema": {}}}  # any JSON value
    return {media_type: {"schema": {"type": "string"}}}


def _request_body(op: Operation, refs: dict[_Key, dict[str, Any]]) -> dict[str, Any] | None:
    if op.request is None and op.request_type is None:
        return None
    media_type = op.request_type or JSON
    ref = refs.get((op.request, "validation")) if op.request is not None else None  # type: ignore[arg-type]
    return {"content": _content(media_type, op.request, ref), "required": True}


def _responses(op: Operation, refs: dict[_Key, dict[str, Any]]) -> dict[str, Any]:
    success: dict[str, Any] = {"description": _success_description(op.status)}
    if op.response_headers:
        success["headers"] = {
            name: {"description": text, "schema": {"type": "string"}}
            for name, text in op.response_headers
        }
    if op.response_type:
        ref = refs.get((op.response, "serialization")) if op.response is not None else None  # type: ignore[arg-type]
        success["content"] = _content(op.response_type, op.response, ref)
    responses: dict[str, Any] = {str(op.status): success}
    # As the runner's spec: the errors in their order, 422 last.
    for code in [c for c in op.errors if c != 422] + [c for c in op.errors if c == 422]:
        responses[str(code)] = _error(op, code, refs)
    return responses


def _success_description(status: int) -> str:
    return "Successful Response" if status == 200 else _phrase(status)


def _phrase(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:  # not IANA's: go-livepeer's 470 and nginx's 499
        return OTHER_STATUSES.get(status, f"Status {status}")


def _error(op: Operation, code: int, refs: dict[_Key, dict[str, Any]]) -> dict[str, Any]:
    error: dict[str, Any] = {"description": ERROR_DESCRIPTIONS.get(code) or _phrase(code)}
    if code == 503:
        error["headers"] = {"Retry-After": RETRY_AFTER}
    if op.error_type != JSON:
        error["content"] = {op.error_type: {"schema": {"type": "string"}}}
        return error
    model = HTTPValidationError if code == 422 else HTTPError
    error["content"] = {JSON: {"schema": dict(refs[(model, "serialization")])}}
    return error
