"""A live session's pipeline inside a device's worker process (`--worker-process`).

Imported by the worker process only (runtime/worker_child.py), never by the service:
`ProcessCalls` (process_calls.py) names `HostedPipeline` by import path and `create`s one per
session. Each is built, loaded, fed, changed and unloaded here, so the service's process
never imports the pipeline's libraries (torch, diffusers).

Threads. A pipeline is built and loaded on the worker's loader lane (`ProcessCalls.load` sends
it there): one thread, one load at a time, beside the main thread, which goes on running the
other sessions' frames. What a load does there must not touch modules those frames use:
- reading weights (`from_pretrained`), moving them to the device and wrapping them for a
  compile: new modules, which nobody has until the model cache hands them out at the load's end;
- the model cache (`acquire`, a release when a load fails, evicting a model nobody leases):
  it is locked, and what it evicts has no user;
- allocations on the device beside the main thread's: the allocator is thread-safe; they may
  slow a frame a little while the weights copy, as loads in the service's process do.
What runs shared modules (prompt encoding, the warm-up's passes, a compile's first run and its
CUDA graphs, which belong to the thread that records them) is handed to the main thread with
`runtime.worker_child.on_main`, where it waits its turn like a live frame (`diffusion.py`'s
`load`). Everything else of a pipeline (process, apply, unload) runs on the main thread.

The worker process serves one device: its `Device` (runtime/hosted_device.py), with the
model cache, is shared by every session's pipeline and batch model there.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from runtime.hosted_device import device_here
from runtime.runtime import RuntimeConfig

from .logs import PIPELINE, SESSION_ID, STAGE, LogSetup, log_like_the_service
from .pipelines.base import LivePipeline, PipelineContext, PipelineParams

logger = logging.getLogger(__name__)


def pipeline_class(path: str) -> type[LivePipeline]:
    """The pipeline class at `module:QualName`."""
    module_name, _, qualname = path.partition(":")
    found: Any = importlib.import_module(module_name)
    for part in qualname.split("."):
        found = getattr(found, part)
    if not (isinstance(found, type) and issubclass(found, LivePipeline)):
        raise TypeError(f"{path} is not a live pipeline")
    return found


class HostedPipeline:
    """One session's pipeline, loaded when made (a failed load gives back what it took)."""

    def __init__(
        self,
        pipeline_path: str,
        params: PipelineParams,
        device: tuple[str, str, str],
        config: RuntimeConfig,
        log: LogSetup | None = None,
    ) -> None:
        self.log = log
        if log is not None:
            log_like_the_service(log.level, log.format)
        with self._session():
            cls = pipeline_class(pipeline_path)
            self.pipeline = cls(params, PipelineContext(device_here(*device, config)))
            try:
                self.pipeline.load()
            except BaseException:
                try:
                    self.pipeline.unload()
                except Exception:
                    logger.warning("unloading a pipeline that failed to load failed", exc_info=True)
                raise

    @contextlib.contextmanager
    def _session(self, stage: str | None = None) -> Iterator[None]:
        """This session's context on the lines written meanwhile, as in the service's process
        (set and reset per call: the calls of several sessions take turns on this thread)."""
        if self.log is None:
            yield
            return
        tokens = (
            (SESSION_ID, SESSION_ID.set(self.log.session)),
            (PIPELINE, PIPELINE.set(self.log.pipeline)),
            (STAGE, STAGE.set(stage)),
        )
        try:
            yield
        finally:
            for var, token in reversed(tokens):
                var.reset(token)  # type: ignore[attr-defined]

    def process(self, frame: np.ndarray) -> np.ndarray | None:
        """The output frame, or None when it is the input itself (a pass-through pipeline):
        the service then keeps its own input frame, and its decoded form, as the output."""
        # The slot is the service's and read-only: a pipeline may keep or change its input.
        image = frame.copy()
        with self._session("inference"):
            out = self.pipeline.process(image)
        return None if out is image else out

    def apply(self, params: PipelineParams) -> None:
        with self._session():
            self.pipeline.apply(params)

    def keeps_serving(self, new: PipelineParams) -> bool:
        with self._session():
            return self.pipeline.keeps_serving_during_reload(new)

    def unload(self) -> None:
        with self._session():
            self.pipeline.unload()
