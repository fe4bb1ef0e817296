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

With several devices (`--devices`) checks 2 and 3 are made per device, and admission places the
session: among the devices that can take it, the one with the fewest live sessions (a second
stream on a busy worker would halve both streams' rate), then one that has its model already,
then the one with the most model memory left. A session keeps its device for its life. A refusal
names each device and why it cannot take the session. A device whose worker process failed for
good (`--worker-process`, `Runtime.usable_devices`) takes no session; when every device has, the
answer is 503 without Retry-After (it does not pass by itself) naming each device's last failure.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from protocol.api import Capacity, DeviceCapacity
from protocol.errors import Unavailable
from runtime.device import free_gpu_memory
from runtime.runtime import Device, Runtime

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


@dataclass(frozen=True)
class ModelNeed:
    """The model a session would load (as the model cache names it) and each device's free
    memory when asked (by device label; None where unknown)."""

    kind: str
    model_id: str
    size_bytes: int
    free_gpu: dict[str, int | None]


class Admission:
    """The checks above, the placement, and the capacity they leave (for /health and
    /hardware/stats).

    Keeps one measurement per pipeline: the median seconds per frame of its latest session
    with enough frames, refreshed from running sessions at every check and kept after they end.
    """

    def __init__(self, settings: Settings, runtime: Runtime) -> None:
        self.settings = settings
        self.runtime = runtime
        self.seconds_per_frame: dict[str, float] = {}
        self.reserved: dict[str, tuple[ModelNeed, str]] = {}
        """Model memory of admitted sessions and the label of their device, by session id,
        until they end."""
        self.admitted: set[str] = set()
        self.placed: dict[str, Device] = {}
        """The device of each admitted session that runs on one, by session id."""

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

    def on_device(self, bound: list[LiveSession], device: Device) -> list[LiveSession]:
        return [s for s in bound if self.placed.get(s.id) is device]

    def device_of(self, session_id: str) -> str | None:
        """The label of the device a session runs on, or None (it uses none)."""
        device = self.placed.get(session_id)
        return None if device is None else device.label

    def device_load(self, bound: list[LiveSession]) -> tuple[float, float]:
        """Share of a device the running streams `bound` take (1.0: all of it), and the mean
        input rate of those streams (ASSUMED_FPS when none shows one)."""
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

    def measure(
        self, cls: type[LivePipeline], params: PipelineParams, context: PipelineContext
    ) -> ModelNeed | None:
        """What a session of `cls` would load, and each device's free memory: blocking (it
        resolves the devices, finds and sizes the model's folder, may start CUDA), so called
        off the event loop, before `check`."""
        devices = self.runtime.devices
        try:
            need = cls.model_memory(params, context)
        except LookupError:
            return None  # weights missing: check_available already answered that
        if need is None:
            return None
        # A device's spec sets its default budget (a share of its GPU) the first time.
        free = {d.label: free_gpu_memory(d.spec) for d in devices}
        return ModelNeed(cls.name, need[0], need[1], free)

    def check(
        self,
        cls: type[LivePipeline],
        need: ModelNeed | None,
        sessions: list[LiveSession],
        session_id: str,
    ) -> Device | None:
        """The device a session of `cls` goes to (None for a pipeline that neither runs on
        the device's worker nor loads a model: it uses none). Raises Unavailable (503,
        Retry-After) when it cannot be taken now, without Retry-After when no device can run
        models any more (their worker processes failed for good); else reserves its place and
        its model's memory for `session_id` until `release`. On the event loop, with no await
        between the check and the reservation: two sessions started together see each other's
        models and places even while neither has begun loading."""
        try:
            reason, device = self.placement(cls, need, sessions)
        except Unavailable as exc:
            logger.warning("session refused pipeline=%s reason=%s", cls.name, exc.msg)
            raise
        if reason is not None:
            # An operator sees why clients were turned away, not only the clients.
            logger.info("session refused pipeline=%s reason=%s", cls.name, reason)
            raise Unavailable(reason, retry_after_s=RETRY_AFTER_S)
        self.admitted.add(session_id)
        if device is not None:
            self.placed[session_id] = device
            device.sessions.add(session_id)
            if need is not None:
                self.reserved[session_id] = (need, device.label)
        return device

    def release(self, session_id: str) -> None:
        self.admitted.discard(session_id)
        self.reserved.pop(session_id, None)
        device = self.placed.pop(session_id, None)
        if device is not None:
            device.sessions.discard(session_id)

    def refusal(
        self, cls: type[LivePipeline], need: ModelNeed | None, sessions: list[LiveSession]
    ) -> str | None:
        return self.placement(cls, need, sessions)[0]

    def placement(
        self, cls: type[LivePipeline], need: ModelNeed | None, sessions: list[LiveSession]
    ) -> tuple[str | None, Device | None]:
        """Why a session of `cls` cannot start now (or None), and where it goes."""
        devices: list[Device] = []
        if cls.uses_device or need is not None or self.runtime.config.worker_process:
            # A device whose worker process failed for good takes no session; with none left
            # this raises: 503 without Retry-After, for the operator to act on. (With
            # --worker-process even a pipeline that uses no device runs in a worker: the first
            # usable device's, `SessionManager.session_config`.)
            devices = self.runtime.usable_devices()
        limit = self.settings.max_sessions
        # Admitted sessions count from their admission, before they are registered.
        if len(self.admitted | {session.id for session in sessions}) >= limit:
            return (
                f"the service runs its maximum of {limit} live sessions (--max-sessions); "
                "retry later"
            ), None
        if not cls.uses_device and need is None:
            return None, None
        bound = self.refresh(sessions)
        reasons: dict[str, str] = {}
        able: list[Device] = []
        for device in devices:
            reason = self.memory_reason(need, device)
            if reason is not None:
                reasons[device.label] = (
                    f"pipeline {cls.name} cannot load now on {device.label}: {reason}"
                )
                continue
            reason = self.throughput_reason(cls, self.on_device(bound, device), device.label)
            if reason is not None:
                reasons[device.label] = reason
                continue
            able.append(device)
        if able:
            return None, min(able, key=lambda d: self._preference(d, need))
        if len(devices) == 1:
            return f"{reasons[devices[0].label]}; retry later", None
        return f"no device can take the session: {'; '.join(reasons.values())}; retry later", None

    def _preference(self, device: Device, need: ModelNeed | None) -> tuple[int, bool, float]:
        # Fewest live sessions first (throughput), then a device that has the model already
        # (no second copy), then the most model memory left. `min` keeps --devices order.
        has_model = need is not None and (need.kind, need.model_id) in self.in_use(device)[0]
        left = self.memory_left(device)
        return len(device.sessions), not has_model, -(math.inf if left is None else left)

    def in_use(self, device: Device) -> tuple[set[tuple[str, str]], int, int]:
        """On `device`: the models held (in use, loading, or reserved by an admitted session
        that has not begun loading), the bytes they take, and the bytes of idle models that
        could be evicted. A model loading counts at its expected size."""
        models = device.models.models()
        held: dict[tuple[str, str], int] = {}
        idle = 0
        for m in models:
            if m.users or m.state == "loading":
                held[(m.key.kind, m.key.model_id)] = m.size_bytes
            else:
                idle += m.size_bytes
        for need, label in self.reserved.values():
            if label != device.label:
                continue
            key = (need.kind, need.model_id)
            held[key] = max(held.get(key, 0), need.size_bytes)
        loaded = {(m.key.kind, m.key.model_id) for m in models}
        return loaded | set(held), sum(held.values()), idle

    def memory_left(self, device: Device) -> int | None:
        budget = device.models.budget_bytes
        return None if budget is None else max(0, budget - self.in_use(device)[1])

    def memory_reason(self, need: ModelNeed | None, device: Device) -> str | None:
        if need is None:
            return None
        present, in_use, idle = self.in_use(device)
        if (need.kind, need.model_id) in present:
            return None  # loaded, loading or about to: the session shares it
        return memory_refusal(
            need.size_bytes,
            budget=device.models.budget_bytes,
            in_use=in_use,
            free_gpu=need.free_gpu.get(device.label),
            idle=idle,
        )

    def throughput_reason(
        self, cls: type[LivePipeline], bound: list[LiveSession], label: str
    ) -> str | None:
        """Why the device `label`, whose running device-bound streams are `bound`, cannot take
        one more stream of `cls`, or None."""
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
            f"the device is busy: {label} sustains about {sustained:.1f} fps of pipeline "
            f"{cls.name} (median inference {spf * 1000:.0f} ms per frame), the {len(bound)} "
            f"running stream(s) take {used:.1f} fps and another at {rate:.1f} fps would exceed it"
        )

    # -- what is left ---------------------------------------------------------------------------

    def streams_left(self, bound: list[LiveSession], sessions_left: int) -> dict[str, int]:
        """Per measured pipeline, about how many more streams a device running `bound` takes."""
        load, rate = self.device_load(bound)
        left = {}
        for name, spf in sorted(self.seconds_per_frame.items()):
            free_fps = max(0.0, 1 / spf - load / spf)
            # An idle device takes one stream whatever its rate (see `throughput_reason`).
            fits = math.floor(free_fps / rate) if load > 0 else max(1, math.floor(free_fps / rate))
            left[name] = min(sessions_left, fits)
        return left

    def capacity(self, sessions: list[LiveSession]) -> Capacity:
        """What the service can still take, in all and per device (the devices show once
        resolved: the first session or batch job does it)."""
        bound = self.refresh(sessions)
        sessions_left = max(0, self.settings.max_sessions - len(sessions))
        per_device = []
        for device in self.runtime.known_devices():
            live_done, batch_done = items_done(device)
            # A device whose worker process failed for good takes no more streams.
            left = 0 if device.failure() is not None else sessions_left
            per_device.append(
                DeviceCapacity(
                    device=device.label,
                    sessions=len(device.sessions),
                    batch_jobs=device.jobs,
                    models=sorted({m.key.model_id for m in device.models.models()}),
                    model_memory_budget_bytes=device.models.budget_bytes,
                    model_memory_left_bytes=self.memory_left(device),
                    streams_left=self.streams_left(self.on_device(bound, device), left),
                    live_items_done=live_done,
                    batch_items_done=batch_done,
                )
            )
        budgets = [d.model_memory_budget_bytes for d in per_device]
        lefts = [d.model_memory_left_bytes for d in per_device]
        streams: dict[str, int] = {}
        for d in per_device:
            for name, count in d.streams_left.items():
                streams[name] = min(sessions_left, streams.get(name, 0) + count)
        if not per_device:  # devices not resolved yet: nothing runs, nothing is measured
            budget = self.runtime.config.memory_budget_bytes
            budgets, lefts = [budget], [budget]
        return Capacity(
            sessions_max=self.settings.max_sessions,
            sessions_left=sessions_left,
            model_memory_budget_bytes=_total(budgets),
            model_memory_left_bytes=_total(lefts),
            streams_left=streams,
            devices=per_device,
        )


def _total(values: list[int | None]) -> int | None:
    """The sum, or None (unbounded) when any is."""
    total = 0
    for value in values:
        if value is None:
            return None
        total += value
    return total


def items_done(device: Device) -> tuple[int, int]:
    """Live and batch calls the device's workers ran: its thread's, and the live calls of its
    worker process (`--worker-process`: live sessions' frames and param changes; their loads
    run there at batch priority, so its batch count is not batch jobs)."""
    live = batch = 0
    thread = device.started_worker()
    if thread is not None:
        live, batch = thread.done_live, thread.done_batch
    process = device.started_process_worker()
    return live + (0 if process is None else process.done_live), batch
