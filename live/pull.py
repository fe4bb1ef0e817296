"""`live-v2v models pull NAME`: what a name fetches (a model id, or every model a live pipeline
loads), and whether this host should fetch it at all, said before any network access."""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path

from protocol.model_ids import BadModelId, check_model_id

from .pipelines import LivePipeline


@dataclass(frozen=True)
class PullPlan:
    name: str
    pipeline: str | None
    """The live pipeline `name` named, or None for a model id."""
    model_ids: list[str]

    def describe(self) -> str:
        models = ", ".join(self.model_ids)
        return f"the models of {self.pipeline} ({models})" if self.pipeline else models


def plan_pull(name: str, pipelines: dict[str, type[LivePipeline]]) -> PullPlan:
    """The models `name` stands for: a live pipeline's (those its default params load), or the
    model id itself. Raises BadModelId for a name that is neither."""
    pipeline = pipelines.get(name)
    if pipeline is not None:
        return PullPlan(name, name, pipeline.model_ids(pipeline.parse_params({})))
    try:
        check_model_id(name)
    except BadModelId as exc:
        known = ", ".join(sorted(pipelines))
        raise BadModelId(f"{exc}; nor is it a live pipeline ({known})") from exc
    return PullPlan(name, None, [name])


def no_gpu_refusal(plan: PullPlan) -> str:
    what = f"{plan.describe()} are" if plan.pipeline else f"{plan.name} is"
    return (
        f"{what} for a GPU pipeline, and this host has no CUDA GPU: on the CPU such models "
        "run far from real time. "
        "Here, the cartoon and noop pipelines need no models, and `live-v2v models tiny DIR` "
        "writes tiny random test models (then `live-v2v serve --models-dir DIR --device cpu`). "
        "To download anyway, add --no-gpu-ok."
    )


def run_pull(args: argparse.Namespace, models_dir: Path) -> int:
    from runtime.device import has_gpu
    from runtime.models import pull_model

    from .pipelines import builtin_pipelines

    try:
        plan = plan_pull(args.name, builtin_pipelines())
    except BadModelId as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not plan.model_ids:
        print(f"{plan.name} uses no models: nothing to fetch")
        return 0
    # Before any download: a GPU-less host learns it now, not after gigabytes.
    if not args.no_gpu_ok and not has_gpu():
        print(f"error: {no_gpu_refusal(plan)}", file=sys.stderr)
        return 2
    print(f"fetching {plan.describe()} into {models_dir}")
    for model_id in plan.model_ids:
        try:
            path = pull_model(model_id, models_dir)
        except ConnectionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        print(f"downloaded {model_id} to {path}")
    return 0
