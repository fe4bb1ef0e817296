"""The live pipeline interface: load, update params (live or reload), process a frame, unload.

Pipelines are synchronous objects driven from the session's threads: `load` and `unload` on the
loader thread, `process` and `apply` on the inference thread, never two calls at once on the
inference side. Each declares which of its params apply live; any other change reloads.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, JsonValue

from runtime.device import DeviceSpec, choose_device
from runtime.runtime import RuntimeConfig

if TYPE_CHECKING:
    from runtime.runtime import Device, Runtime


ADVANCED: dict[str, JsonValue] = {"x-ui": "advanced"}
"""A param's `json_schema_extra` when a form should fold it away: it fine-tunes, it is not what
people reach for first."""

HIDDEN: dict[str, JsonValue] = {"x-ui": "hidden"}
"""A param's `json_schema_extra` when a form should not offer it: it is accepted so that a
Livepeer gateway's full parameter sets validate, but it names a feature this runner refuses
when enabled, or one only such a feature uses."""


def _sentence_case(name: str, _info: object) -> str:
    # One label style for every client that shows the schema: "edge_threshold" -> "Edge
    # threshold" (pydantic's default would say "Edge Threshold").
    return name.replace("_", " ").capitalize()


class PipelineParams(BaseModel):
    """Params every live pipeline accepts. Unknown fields are refused, as ai-runner does.

    Their JSON schema is what `/pipelines` shows and the page builds its form from: titles in
    sentence case, `x-ui` (ADVANCED, HIDDEN) saying how prominently a form offers each."""

    model_config = ConfigDict(extra="forbid", field_title_generator=_sentence_case)

    width: int | None = Field(
        None,
        ge=16,
        le=4096,
        multiple_of=2,
        description="output width, even (default: the input's); fixed per stream",
    )
    height: int | None = Field(
        None,
        ge=16,
        le=4096,
        multiple_of=2,
        description="output height, even (default: the input's); fixed per stream",
    )
    show_reloading_frame: bool = Field(
        True, description="show the loading frame while reloading", json_schema_extra=ADVANCED
    )


class PipelineContext:
    """What a pipeline needs from the service: the runtime, which holds the shared weights and
    says where models are and which device and dtype they run on. Nothing here restates its
    settings: a context reads them from the runtime it holds.

    Without a runtime (a bench, an offline replay) the pipeline loads a private copy of its
    weights, on the device and dtype of a `RuntimeConfig` of its own (`PipelineContext.private`).
    """

    def __init__(
        self, runtime: Runtime | Device | None = None, *, config: RuntimeConfig | None = None
    ):
        if runtime is not None and config is not None:
            raise ValueError("a context takes its settings from the runtime or a config, not both")
        self.runtime = runtime
        self._config = config or RuntimeConfig()

    @classmethod
    def private(cls, **settings: Any) -> PipelineContext:
        """A context without a runtime: `settings` are RuntimeConfig's (models_dir, device...)."""
        return cls(config=RuntimeConfig(**settings))

    @property
    def config(self) -> RuntimeConfig:
        return self.runtime.config if self.runtime is not None else self._config

    @property
    def models_dir(self) -> Path:
        return self.config.models_dir

    @property
    def device(self) -> str:
        """The device setting: a placed device's own (`cuda:1`, `cpu`), else the first one
        named (`--devices`/`--device`), else auto."""
        setting = getattr(self.runtime, "setting", None)  # a `Device` has one, a `Runtime` not
        if setting:
            return setting
        names = self.config.device_names()
        return names[0] if names else "auto"

    @property
    def dtype(self) -> str:
        return self.config.dtype

    @property
    def compile(self) -> bool:
        return self.config.compile

    @property
    def spec(self) -> DeviceSpec:
        """The device and dtype models run on: the runtime's choice, made once (imports
        torch: call it off the event loop)."""
        if self.runtime is not None:
            return self.runtime.spec
        return choose_device(self._config.device, self._config.dtype)


class LivePipeline(ABC):
    name: ClassVar[str]
    description: ClassVar[str] = ""
    Params: ClassVar[type[PipelineParams]] = PipelineParams
    live_params: ClassVar[frozenset[str]] = frozenset()
    """Fields whose change applies without a reload."""
    passes_through: ClassVar[bool] = False
    """`process` returns its input untouched and does nothing else: the input's RGB image is
    not made, the host does not call `process` for a frame without one, and sinks encode the
    input's decoded frame. A subclass that overrides `process` passes through only if it says
    so itself (see `__init_subclass__`)."""
    uses_device: ClassVar[bool] = False
    """Runs on the device's shared inference worker rather than the session's own thread."""
    requires_gpu: ClassVar[bool] = False
    """Made for a GPU: real time only there (on the CPU it runs, slowly, when asked to)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # A `process` of its own looks at the frames (a delay, a failure, a count) unless the
        # class says otherwise: inheriting `passes_through` would skip it.
        if "process" in vars(cls) and "passes_through" not in vars(cls):
            cls.passes_through = False

    def __init__(self, params: PipelineParams, context: PipelineContext | None = None) -> None:
        self.params = params
        self.context = context or PipelineContext()

    @classmethod
    def check_available(cls, params: PipelineParams, context: PipelineContext) -> str | None:
        """Raise LookupError (or RuntimeError) with a user-facing reason when this pipeline
        cannot run here (weights missing, no suitable device). Cheap: no loading. Returns a
        remark on how it runs here when there is one to make (not real time), else None."""
        return None

    @classmethod
    def model_ids(cls, params: PipelineParams) -> list[str]:
        """The models a session with `params` loads (what `live-v2v models pull` fetches for
        this pipeline), or none."""
        return []

    @classmethod
    def model_memory(
        cls, params: PipelineParams, context: PipelineContext
    ) -> tuple[str, int] | None:
        """The cached model a session with `params` loads (its id in the runtime's model cache,
        under `kind=cls.name`) and its estimated bytes, or None when it loads none. Cheap:
        admission asks it before a session starts."""
        return None

    def keeps_serving_during_reload(self, new: PipelineParams) -> bool:
        """Whether this (old) pipeline may go on processing while `new` loads beside it."""
        return False

    @classmethod
    def parse_params(cls, raw: dict[str, object]) -> PipelineParams:
        """A complete parameter set; missing fields take their defaults (Livepeer semantics).
        Raises pydantic.ValidationError."""
        return cls.Params.model_validate(raw)

    @classmethod
    def unused_params(cls, raw: dict[str, object]) -> set[str]:
        """Fields of `raw` this pipeline does not have (only a pipeline whose Params ignore
        extra fields accepts them; the others refuse them in `parse_params`)."""
        return set(raw) - set(cls.Params.model_fields)

    @classmethod
    def needs_reload(cls, old: PipelineParams, new: PipelineParams) -> bool:
        changed = {
            name for name in type(new).model_fields if getattr(old, name) != getattr(new, name)
        }
        return bool(changed - cls.live_params)

    def load(self) -> None:  # noqa: B027 - optional hook: many pipelines have nothing to load
        """Load weights and warm up (blocking; the loader thread). Running modules another
        session may be running too (a warm-up) goes through `runtime.worker_child.on_main`,
        which puts it on a worker process's main thread (see live/pipeline_child.py)."""

    def apply(self, params: PipelineParams) -> None:
        """Take new params whose changes are all in `live_params`."""
        self.params = params

    @abstractmethod
    def process(self, image: np.ndarray) -> np.ndarray:
        """One H x W x 3 uint8 RGB frame in, one out (blocking; the inference thread)."""

    def unload(self) -> None:  # noqa: B027 - optional hook
        """Release what `load` took."""
