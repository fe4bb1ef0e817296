"""Bounds on the lists and strings of live pipeline params, which any holder of a session's
control URL sets: each entry of a weighted prompt costs a text-encoder pass on the inference
worker every session shares, each weighted seed a noise tensor, so none may grow unbounded.

Constants rather than settings: they are properties of the models (CLIP reads 77 tokens) and of
the params' meaning, the same for every deployment. README's limits table lists them.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field

BLEND_MAX_ENTRIES = 8
"""Entries of a weighted `prompt` or `seed` list (Livepeer's gateways send two or three)."""

PROMPT_MAX_CHARS = 2000
"""Characters of one prompt: CLIP reads 77 tokens (about 300 characters), the rest is cut."""

NAME_MAX_CHARS = 256
"""Characters of a key in an option object (model ids are `protocol.model_ids.ModelId`)."""

URL_MAX_CHARS = 2048
"""Characters of a URL."""

OPTION_MAX_ENTRIES = 16
"""Entries of an option list or object a pipeline takes but does not use yet (ControlNets,
LoRAs, processing stages): enough to name what a gateway asks for and refuse it in words."""

SEED_MIN, SEED_END = -(2**63), 2**64
"""What torch's generator takes as a seed (`manual_seed`)."""

PromptText = Annotated[str, Field(max_length=PROMPT_MAX_CHARS)]
Name = Annotated[str, Field(max_length=NAME_MAX_CHARS)]
Url = Annotated[str, Field(max_length=URL_MAX_CHARS)]
Seed = Annotated[int, Field(ge=SEED_MIN, lt=SEED_END)]
Weight = Annotated[float, Field(allow_inf_nan=False)]
WeightedPrompts = Annotated[
    list[tuple[PromptText, Weight]], Field(min_length=1, max_length=BLEND_MAX_ENTRIES)
]
WeightedSeeds = Annotated[
    list[tuple[Seed, Weight]], Field(min_length=1, max_length=BLEND_MAX_ENTRIES)
]
Options = Annotated[dict[Name, Any], Field(max_length=OPTION_MAX_ENTRIES)]
OptionList = Annotated[list[Options], Field(max_length=OPTION_MAX_ENTRIES)]
