"""What every batch route shares: its description (one `BatchRoute` per module), the app's
batch state, request parsing into the spec's models, and running a job on a leased model."""

from __future__ import annotations

import logging
import random
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any, TypeVar, get_args, get_origin

from aiohttp import web
from pydantic import BaseModel, ValidationError

from protocol.errors import InvalidFields, Unavailable
from protocol.openapi import Operation
from protocol.requests import JSON_LIMIT, read_json, require_bearer
from runtime.runtime import Runtime

from . import remote
from .config import BatchConfig
from .jobs import BatchJobs, StepGate, drive
from .models import Loader, lease_model
from .uploads import read_form

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


# What every batch route may answer besides 200 (the runner's list, with 413, 415 and 503).
BATCH_ERRORS = (400, 401, 413, 415, 422, 500, 503)


GATEWAY_PREFIXES = ("/api/beta/generate", "/api/generate")
"""Where Livepeer's gateway-shaped API is mounted beside the runner's routes: the path prefix
of Livepeer Studio's generate API, as its Python SDK (`livepeer`, `/api/beta/generate/...`) and
its JavaScript SDK (`livepeer` on npm, `/api/generate/...`) call it. `livepeer-ai` takes either
as its server URL."""


@dataclass(frozen=True)
class BatchRoute:
    """One batch pipeline: its route, its default model, how to load a model for it, and what
    the OpenAPI document says of it (`operations`, derived from the rest).

    The runner's route answers with `response`; where Livepeer's gateway answers otherwise
    (image-to-video: the video as one URL), `gateway_handler` and `gateway_response` serve the
    gateway-shaped routes, else they share `handler`."""

    name: str  # the route without its slash, also the model cache's kind
    default_model: str
    load: Loader
    handler: Handler
    operation_id: str
    summary: str
    description: str
    request: type[BaseModel]
    response: type[BaseModel]
    gateway_handler: Handler | None = None
    gateway_response: type[BaseModel] | None = None

    @property
    def operation(self) -> Operation:
        """The runner's route."""
        # A body with an uploaded file is a form; any other is JSON.
        multipart = any(f.annotation is bytes for f in self.request.model_fields.values())
        return Operation(
            method="POST",
            path=f"/{self.name}",
            operation_id=self.operation_id,
            summary=self.summary,
            description=self.description,
            request=self.request,
            request_type="multipart/form-data" if multipart else "application/json",
            response=self.response,
            errors=BATCH_ERRORS,
            tags=("generate",),
        )

    def routes(self) -> list[tuple[Operation, Handler]]:
        """Every path of this pipeline with its handler: the runner's route, the same with a
        trailing slash (as the runner's FastAPI serves it), and the gateway-shaped routes."""
        runner = self.operation
        routes = [
            (runner, self.handler),
            (
                replace(
                    runner,
                    path=runner.path + "/",
                    operation_id=runner.operation_id + "Slash",
                    description=runner.description + " The same route as without the slash.",
                ),
                self.handler,
            ),
        ]
        for prefix in GATEWAY_PREFIXES:
            gateway = replace(
                runner,
                path=prefix + runner.path,
                operation_id=gateway_operation_id(prefix, runner.operation_id),
                description=runner.description + " Livepeer's gateway API (its SDKs' paths).",
                response=self.gateway_response or self.response,
                tags=("gateway",),
            )
            routes.append((gateway, self.gateway_handler or self.handler))
        return routes

    def operations(self) -> list[Operation]:
        return [operation for operation, _ in self.routes()]


def gateway_operation_id(prefix: str, operation_id: str) -> str:
    """`genTextToImage` under `/api/beta/generate` is `apiBetaGenerateGenTextToImage`."""
    words = [w for part in prefix.strip("/").split("/") for w in part.split("-")]
    head = words[0] + "".join(w.capitalize() for w in words[1:])
    return head + operation_id[0].upper() + operation_id[1:]


@dataclass(frozen=True)
class BatchState:
    runtime: Runtime
    config: BatchConfig
    jobs: BatchJobs


BATCH = web.AppKey("batch", BatchState)


def batch_state(request: web.Request) -> BatchState:
    state = request.app[BATCH]
    require_bearer(request, state.config.auth_token)
    return state


async def parse_json(request: web.Request, model: type[M], limit: int) -> M:
    body = await read_json(request, min(limit, JSON_LIMIT))
    if isinstance(body, dict):
        body = integral_floats(model, body)
    try:
        # Strict, as the runner's FastAPI: "1024" is not an integer in JSON.
        return model.model_validate(body, strict=True)
    except ValidationError as exc:
        raise InvalidFields.from_validation(exc, "body") from exc


def integral_floats(model: type[BaseModel], body: dict[str, Any]) -> dict[str, Any]:
    """`7.0` where an integer is expected becomes 7: JSON Schema calls it an integer, and
    strict validation would not. Strings stay refused."""
    fixed = dict(body)
    for name, field in model.model_fields.items():
        value = fixed.get(name)
        if isinstance(value, float) and value.is_integer():
            kinds = [_bare(kind) for kind in get_args(field.annotation) or (field.annotation,)]
            if int in kinds and float not in kinds:
                fixed[name] = int(value)
    return fixed


def _bare(kind: Any) -> Any:
    return get_args(kind)[0] if get_origin(kind) is Annotated else kind


async def parse_form(request: web.Request, model: type[M], limit: int) -> M:
    fields = await read_form(request, limit)
    try:
        # Lax: every multipart field arrives as text ("7.5", "true").
        return model.model_validate(fields)
    except ValidationError as exc:
        raise InvalidFields.from_validation(exc, "body") from exc


def pick_seed(seed: int | None) -> int:
    return seed if seed is not None else random.randrange(2**32)


async def run_on_model(
    state: BatchState,
    route: BatchRoute,
    model_id: str,
    job: Callable[..., Any],
    *args: Any,
    gate: StepGate | None = None,
    on_item: Callable[[Any], None] | None = None,
) -> Any:
    """Run `job(model, *args, gate)` as a batch job on the route's model (`model_id`, or the
    route's default), which stays leased, so never evicted, until the job is over. With
    `on_item`, `job` is a generator: `on_item` hears each item it yields as it comes, and
    what it returns is the result.

    `job` is a module-level function: with `--worker-process` it runs in the worker process
    of the model's device, imported there by name, and `args` and its result cross pickled."""
    model_id = model_id or route.default_model
    config = state.config
    lease = await lease_model(
        state.runtime, route.name, model_id, route.load, config.retry_after_s, config.load_wait_s
    )
    model = lease.value
    try:
        if isinstance(model, remote.RemoteModel):
            gate = gate or state.jobs.gate()
            return await state.jobs.run_remote(
                lambda: remote.run(model, job, args, gate, on_item),
                finished=lease.release,
                device=lease.key.device,
            )

        def work(gate: StepGate) -> Any:
            out = job(model, *args, gate)
            return out if on_item is None else drive(out, on_item)

        # Released when the job's thread is done with the model, which for a job cancelled
        # by its client is after this handler has gone: never evicted under a running job.
        return await state.jobs.run(
            work,
            gate=gate,
            finished=lease.release,
            device=lease.key.device,  # the device the model is on
        )
    except Exception as exc:
        if not out_of_memory(exc):
            raise
        raise Unavailable(
            f"the device ran out of memory running {model_id}; retry later or ask for less "
            "(smaller images, fewer of them)",
            retry_after_s=state.jobs.typical_duration(),
        ) from exc


def out_of_memory(exc: BaseException) -> bool:
    if isinstance(exc, MemoryError):
        return True
    # Only where torch is loaded already: a model in a worker process reports MemoryError.
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(exc, torch.OutOfMemoryError)
