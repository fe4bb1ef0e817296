"""Admission control: whether the service can take another live session, and if not, why.

Checked before a session starts, each refusal a 503 with Retry-After and a detail naming the
limit, so that a client (or go-livepeer) learns at once what an overload would have shown later
as an out-of-memory error or a stream dropping most of its frames:

1. sessions: at most `--max-sessions` at once;
2. model memory: the weights the pipeline loads against what the model memory budget
   (`--model-memory-gb`; on CUDA 80 % of the GPU by default) leaves beside the models in use,
   and on CUDA against the GPU's free memory. A model already loaded is shared: it needs nothing
   more. On the CPU free memory is unknown, so only the budget applies;
3. device throughput, for device-bound pipelines (`uses_device`, one inference worker per
   device): the frames per second the worker sustains for a pipeline, measured as 1 / the median
   inference time of its sessions, against the input rate of the streams already running. With
   no measurement yet, or nothing running, a session is admitted: a lone stream faster than the
   device still runs (dropping frames, its status hint telling the publisher the rate to send).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from typing import TYPE_CHECKING

from protocol.api import Capacity
from protocol.errors import Unavailable
from runtime.device import choose_device, free_gpu_memory
from runtime.runtime import Runtime

from .pipelines.base import LivePipeline, PipelineContext, PipelineParams
from .settings import Settings

if TYPE_CHECKING:
    from .session import LiveSession

logger = logging.getLogger(__name__)

RETRY_AFTER_S = 10
MIN_FRAMES = 5
"""Inference timings a session needs before its median counts as the pipeline's measurement."""
ASSUMED_FPS = 30.0
"""Input rate assumed for a new stream when no running stream shows one (a camera's)."""
LOAD_MARGIN = 1.3
"""Free GPU memory wanted per byte of weights: activations and allocator slack come on top."""

GIB = 2**30


def memory_refusal(
    needed: int,
    *,
    budget: int | None,
    in_use: int,
    free_gpu: int | None = None,
    idle: int = 0,
) -> str | None:
    """Why `needed` more bytes of weights cannot load, or None. `in_use`: bytes of models in use
    or loading (never evicted); `idle`: bytes of cached models nobody uses (evicted for room);
    `free_gpu`: free device memory, None where unknown (CPU, MPS)."""
    if budget is not None and needed > budget - in_use:
        return (
            f"the model needs about {_size(needed)} and the model memory budget is "
            f"{_size(budget)} (--model-memory-gb), {_size(in_use)} of it held by models in use"
        )
    if free_gpu is not None and free_gpu + idle < needed * LOAD_MARGIN:
        return (
            f"the model needs about {_size(needed)} of GPU memory and {_size(free_gpu)} is "
            f"free ({_size(idle)} more once idle models are evicted)"
        )
    return None


def _size(count: int) -> str:
    for unit, scale in (("GiB", GIB), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


class Admission:
    """The checks above, and the capacity they leave (for /health and /hardware/stats).

    Keeps one measurement per pipeline: the median seconds per frame of its latest session
    with enough frames, refreshed from running sessions at every check and kept after they end.
    """

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.seconds_per_frame: dict[str, float] = {}

    # -- measurements ---------------------------------------------------------------------------

    def observe(self, session: LiveSession) -> None:
        p50 = session.stats.inference_p50_s(MIN_FRAMES)
        # Only the device's shared worker is a limit across sessions; other pipelines run
        # on their session's own thread.
        if p50 is not None and session.pipeline_cls.uses_device:
            self.seconds_per_frame[session.pipeline_cls.name] = p50

    def refresh(self, sessions: Iterable[LiveSession]) -> list[LiveSession]:
        """Measure the running sessions; the device-bound ones among them."""
        bound = []
        for session in sessions:
            if not session.running:
                continue
            self.observe(session)
            if session.pipeline_cls.uses_device:
                bound.append(session)
        return bound

    def device_load(self, bound: list[LiveSession]) -> tuple[float, float]:
        """Share of the device the running streams take (1.0: all of it), and the mean input
        rate of those streams (ASSUMED_FPS when none shows one)."""
        load = 0.0
        rates = []
        for session in bound:
            fps_in, _ = session.stats.fps()
            spf = self.seconds_per_frame.get(session.pipeline_cls.name)
            if spf is not None and fps_in > 0:
                load += fps_in * spf
                rates.append(fps_in)
        return load, (sum(rates) / len(rates) if rates else ASSUMED_FPS)

    # -- the checks -----------------------------------------------------------------------------

    def check(
        self,
        cls: type[LivePipeline],
        params: PipelineParams,
        context: PipelineContext,
        sessions: list[LiveSession],
    ) -> None:
        """Raise Unavailable (503, Retry-After) when a session of `cls` cannot be taken now."""
        reason = self.refusal(cls, params, context, sessions)
        if reason is not None:
            # An operator sees why clients were turned away, not only the clients.
            logger.info("session refused pipeline=%s reason=%s", cls.name, reason)
            raise Unavailable(reason, retry_after_s=RETRY_AFTER_S)

    def refusal(
        self,
        cls: type[LivePipeline],
        params: PipelineParams,
        context: PipelineContext,
        sessions: list[LiveSession],
    ) -> str | None:
        limit = self.settings.max_sessions
        if len(sessions) >= limit:
            return (
                f"the service runs its maximum of {limit} live sessions (--max-sessions); "
                "retry later"
            )
        reason = self.memory_reason(cls, params, context)
        if reason is not None:
            return f"pipeline {cls.name} cannot load now: {reason}; retry later"
        return self.throughput_reason(cls, sessions)

    def memory_reason(
        self, cls: type[LivePipeline], params: PipelineParams, context: PipelineContext
    ) -> str | None:
        try:
            need = cls.model_memory(params, context)
        except LookupError:
            return None  # weights missing: check_available already answered that
        if need is None:
            return None
        model_id, needed = need
        cache = self.runtime.models
        models = cache.models()
        if any(m.key.kind == cls.name and m.key.model_id == model_id for m in models):
            return None  # loaded or loading: the session shares it
        spec = choose_device(context.device, context.dtype)
        if spec.device.startswith("cuda"):
            self.runtime.spec  # noqa: B018 - sets the default budget: a share of the GPU
        in_use = sum(m.size_bytes for m in models if m.users or m.state == "loading")
        idle = sum(m.size_bytes for m in models if not m.users and m.state == "ready")
        return memory_refusal(
            needed,
            budget=cache.budget_bytes,
            in_use=in_use,
            free_gpu=free_gpu_memory(spec),
            idle=idle,
        )

    def throughput_reason(self, cls: type[LivePipeline], sessions: list[LiveSession]) -> str | None:
        bound = self.refresh(sessions)
        if not cls.uses_device:
            return None
        spf = self.seconds_per_frame.get(cls.name)
        if spf is None:
            return None  # not measured yet: the first session of a pipeline is admitted
        load, rate = self.device_load(bound)
        if load <= 0:
            return None  # the device is idle
        sustained = 1 / spf
        used = load / spf  # the running streams' demand, in frames/s of this pipeline
        if used + rate <= sustained:
            return None
        return (
            f"the device is busy: it sustains about {sustained:.1f} fps of pipeline {cls.name} "
            f"(median inference {spf * 1000:.0f} ms per frame), the {len(bound)} running "
            f"stream(s) take {used:.1f} fps and another at {rate:.1f} fps would exceed it; "
            "retry later"
        )

    # -- what is left ---------------------------------------------------------------------------

    def capacity(self, sessions: list[LiveSession]) -> Capacity:
        bound = self.refresh(sessions)
        sessions_left = max(0, self.settings.max_sessions - len(sessions))
        budget = self.runtime.models.budget_bytes
        left = None
        if budget is not None:
            in_use = sum(
                m.size_bytes
                for m in self.runtime.models.models()
                if m.users or m.state == "loading"
            )
            left = max(0, budget - in_use)
        load, rate = self.device_load(bound)
        streams_left = {}
        for name, spf in sorted(self.seconds_per_frame.items()):
            free_fps = max(0.0, 1 / spf - load / spf)
            # An idle device takes one stream whatever its rate (see `throughput_reason`).
            fits = math.floor(free_fps / rate) if load > 0 else max(1, math.floor(free_fps / rate))
            streams_left[name] = min(sessions_left, fits)
        return Capacity(
            sessions_max=self.settings.max_sessions,
            sessions_left=sessions_left,
            model_memory_budget_bytes=budget,
            model_memory_left_bytes=left,
            streams_left=streams_left,
        )
