"""A batch route's model, through the runtime's cache: loaded once, shared by every request.
A request for a model that is loading waits for it on the event loop, within `--load-wait-s`;
past that it is a 503 with Retry-After."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from protocol.errors import InvalidRequest, Unavailable
from runtime.device import DeviceSpec
from runtime.library_logs import route_library_logs
from runtime.model_cache import Lease, OverBudget, StillLoading
from runtime.models import BadModelId, ModelNotFound, folder_size, resolve_model
from runtime.runtime import Runtime
from runtime.worker_errors import WorkerError

from . import remote

logger = logging.getLogger(__name__)

T = TypeVar("T")
Loader = Callable[[Path, DeviceSpec], Any]


def pipeline_class_name(path: Path) -> str:
    """The `_class_name` of a diffusers folder's model_index.json ("" when there is none)."""
    try:
        return str(json.loads((path / "model_index.json").read_text()).get("_class_name", ""))
    except (OSError, ValueError):
        return ""


def quiet_loading() -> None:
    """No progress bars from diffusers and transformers, and their warnings routed into the
    service's log: the service logs its own lines. Called before a loader imports the library's
    classes, as importing some already warns (transformers' image processors without
    torchvision)."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    route_library_logs()


def _lease(
    runtime: Runtime,
    kind: str,
    model_id: str,
    load: Loader,
    retry_after_s: float,
    loop: asyncio.AbstractEventLoop,
) -> Lease[Any]:
    # Placement: a job goes to a device that has its model (loaded, or loading: it waits
    # there), else to the least busy device with room for it.
    device = runtime.where_loaded(kind, model_id)
    if device is not None:
        # The common case, a loaded model, touches no disk: finding the folder and sizing
        # it (a walk of every file) is only for a model that has to be loaded.
        loaded = device.models.ready(device.key(kind, model_id))
        if loaded is not None:
            model = loaded.value
            if not (isinstance(model, remote.RemoteModel) and model.stale):
                return loaded
            # The restart forgets the old worker's models; one that finished loading just as
            # its worker was replaced escaped that, and would refuse every request.
            loaded.release()
            device.models.forget(lambda value: value is model)
    try:
        path = resolve_model(model_id, runtime.config.models_dir)
    except BadModelId as exc:
        raise InvalidRequest(f"model id {model_id!r} refused: {exc}") from exc
    except ModelNotFound as exc:
        logger.warning("%s (%s)", exc, exc.where)
        raise Unavailable(str(exc)) from exc
    size = folder_size(path)
    if device is None:
        device = runtime.with_room(size)
    if runtime.config.worker_process:
        loader = remote.loader(device, load, path, loop)
    else:
        spec = device.spec
        loader = lambda: load(path, spec)  # noqa: E731
    try:
        return device.models.request(
            device.key(kind, model_id), loader, estimate=size, retry_after_s=retry_after_s
        )
    except StillLoading:
        raise  # waited for by `lease_model`
    except OverBudget as exc:
        raise Unavailable(
            f"model {model_id} cannot be loaded now: {exc}", retry_after_s=30
        ) from exc
    except WorkerError as exc:  # the worker process was lost or failed during the load
        raise remote.unavailable(exc) from exc
    except Exception as exc:  # the background load failed: report it to this caller, once
        raise Unavailable(
            f"model {model_id} failed to load ({load_error(exc)}); the next request tries again"
        ) from exc


async def lease_model(
    runtime: Runtime,
    kind: str,
    model_id: str,
    load: Loader,
    retry_after_s: float = 5.0,
    wait_s: float = 0.0,
) -> Lease[Any]:
    """The loaded model, held until the lease is released. A model that is loading (this
    call starts the load when nobody has) is waited for, up to `wait_s`. Raises Unavailable
    (503): with Retry-After while it still loads after that or cannot fit yet, without it when
    it is not on this machine."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    while True:
        try:
            # Resolving a model reads the disk, and the runtime's first use imports torch.
            return await asyncio.to_thread(
                _lease, runtime, kind, model_id, load, retry_after_s, loop
            )
        except StillLoading as exc:
            remaining = deadline - loop.time()
            if remaining <= 0 or not await _ended_within(exc.done, remaining):
                raise Unavailable(
                    f"model {model_id} is still loading"
                    + (f" after {wait_s:g} s of waiting" if wait_s > 0 else "")
                    + f"; retry in {max(1, round(exc.retry_after_s))} s",
                    retry_after_s=exc.retry_after_s,
                ) from exc
            # The load ended: ask again (a failed load is reported to the first who asks).


async def _ended_within(done: Future[None], seconds: float) -> bool:
    # Shielded: a waiter that gives up must not cancel the load's future for the others.
    waiter = asyncio.shield(asyncio.wrap_future(done))
    try:
        await asyncio.wait_for(waiter, seconds)
    except TimeoutError:
        return False
    return True


def load_error(exc: BaseException) -> str:
    """A load failure in words: the exception's own message, or its kind when it has none."""
    text = str(exc).strip()
    return text if text else exc.__class__.__name__
