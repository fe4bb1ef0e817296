"""Defaults for few-step models. The spec's defaults (50 steps, guidance 7.5) suit classic
models; distilled ones are trained for a handful of steps and little or no guidance, and give
worse images, slower, with the classic defaults. A value the request sets is always kept."""

from __future__ import annotations

from typing import Protocol


class _StepParams(Protocol):
    num_inference_steps: int
    guidance_scale: float
    model_fields_set: set[str]


# (marker in the model id, steps, guidance scale)
FEW_STEP_MODELS = (
    ("lightning", 4, 1.5),  # SDXL Lightning family, RealVisXL Lightning: 4-6 steps, CFG 1-2
    ("turbo", 2, 0.0),  # sd-turbo, sdxl-turbo: 1-4 steps, trained without guidance
    ("lcm", 4, 1.0),  # latent consistency models
)


def few_step_defaults(params: _StepParams, model_id: str) -> tuple[int, float]:
    steps, guidance = params.num_inference_steps, params.guidance_scale
    name = model_id.lower()
    for marker, model_steps, model_guidance in FEW_STEP_MODELS:
        if marker in name:
            if "num_inference_steps" not in params.model_fields_set:
                steps = model_steps
            if "guidance_scale" not in params.model_fields_set:
                guidance = model_guidance
            break
    return steps, guidance
