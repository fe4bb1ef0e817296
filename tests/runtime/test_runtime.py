"""The model runtime: finding models, devices, the inference worker, the models CLI."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from runtime.device import choose_device
from runtime.models import ModelNotFound, list_models, resolve_model
from runtime.tiny import build_tiny_taesd
from runtime.worker import InferenceWorker


def test_missing_model_names_the_command_that_fetches_it(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFound) as missing:
        resolve_model("stabilityai/sd-turbo", tmp_path)
    message = str(missing.value)
    assert "live-v2v models pull stabilityai/sd-turbo" in message
    # Said to any caller of a public route: the host's paths are only in the operator's log.
    assert str(tmp_path) not in message
    assert str(tmp_path.resolve()) in missing.value.where


def test_models_dir_is_searched_and_listed(tiny_models_dir: Path) -> None:
    assert resolve_model("stabilityai/sd-turbo", tiny_models_dir) == (
        tiny_models_dir / "stabilityai" / "sd-turbo"
    )
    listed = {info.model_id: info for info in list_models(tiny_models_dir)}
    assert {"stabilityai/sd-turbo", "madebyollin/taesd"} <= set(listed)
    assert listed["stabilityai/sd-turbo"].size_bytes > 100_000


def test_device_choice_on_this_machine() -> None:
    spec = choose_device("cpu")
    assert (spec.device, spec.dtype_name) == ("cpu", "float32")
    assert choose_device("cpu", "bfloat16").dtype_name == "bfloat16"
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            choose_device("cuda")
    with pytest.raises(ValueError, match="dtype"):
        choose_device("cpu", "int3")


def test_worker_runs_live_work_before_queued_batch_work() -> None:
    worker = InferenceWorker("test")
    busy = threading.Event()
    gate = threading.Event()
    order: list[str] = []

    def block() -> None:
        busy.set()
        gate.wait()

    try:
        blocker = worker.submit(block)
        # Everything below is queued while the worker is busy, so only priority orders it.
        assert busy.wait(timeout=5), "the worker never started the blocking job"
        batch = [worker.submit_batch(order.append, f"batch{i}") for i in range(3)]
        live = [worker.submit(order.append, f"live{i}") for i in range(2)]
        gate.set()
        for future in [blocker, *batch, *live]:
            future.result(timeout=5)
    finally:
        worker.shutdown()
    assert order == ["live0", "live1", "batch0", "batch1", "batch2"]
    with pytest.raises(RuntimeError, match="shut down"):
        worker.submit(print)


def test_worker_passes_errors_back() -> None:
    worker = InferenceWorker("test")
    try:
        with pytest.raises(ZeroDivisionError):
            worker.submit(lambda: 1 / 0).result(timeout=5)
        assert worker.submit(lambda: 2).result(timeout=5) == 2
    finally:
        worker.shutdown()


def test_models_cli_tiny_then_list(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "live", "models"]
    out = subprocess.run(
        [*run, "tiny", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    assert "stabilityai/sd-turbo" in out
    out = subprocess.run(
        [*run, "list", "--models-dir", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    # Every batch route's default model is there too, under its real id.
    from batch import ROUTES

    lines = {line.split()[0]: line for line in out.splitlines()}
    for model_id in ["stabilityai/sd-turbo", "madebyollin/taesd"] + [
        route.default_model for route in ROUTES
    ]:
        assert model_id in lines, model_id
        # Under the real ids, but not the real weights: the listing says so.
        assert "random weights" in lines[model_id], lines[model_id]
    # A folder with real weights (here: any folder not written as a test model) is not marked.
    real = build_tiny_taesd(tmp_path / "someone" / "own-model")
    assert not (real / "RANDOM_WEIGHTS").exists()
    out = subprocess.run(
        [*run, "list", "--models-dir", str(tmp_path)], capture_output=True, text=True, check=True
    ).stdout
    (own,) = [line for line in out.splitlines() if line.startswith("someone/own-model")]
    assert "random weights" not in own
    pulled = subprocess.run(
        [*run, "pull", "someone/model", "--no-gpu-ok", "--models-dir", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert pulled.returncode == 2
    assert "cannot download someone/model" in pulled.stderr
    assert "Traceback" not in pulled.stderr


def test_a_batch_job_yields_to_live_work_between_its_steps() -> None:
    """A live frame submitted while a batch job runs is served at the job's next step
    boundary, not after the whole job (the order proves it; no clock involved)."""
    worker = InferenceWorker("test")
    order: list[str] = []
    step_two = threading.Event()
    live_queued = threading.Event()

    def batch_job(steps: int) -> str:
        for step in range(steps):
            order.append(f"step{step}")
            if step == 2:
                step_two.set()
                live_queued.wait(30)  # the live frame arrives during this step
            worker.yield_to_live()
        return "done"

    try:
        job = worker.submit_batch(batch_job, 6)
        assert step_two.wait(30)
        live = worker.submit(order.append, "live")
        live_queued.set()
        assert job.result(30) == "done" and live.result(30) is None
        assert order == ["step0", "step1", "step2", "live", "step3", "step4", "step5"]
        assert worker.yield_to_live() == 0  # off the worker's thread it does nothing
    finally:
        worker.shutdown()
