"""`python -m bench.gpu`: on a machine without CUDA it is a dry run, said so, through every
section with toy-sized models, and its JSON has every section's figures; a section that fails
or finds no time left is reported and the run goes on, its JSON written as it goes."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from batch import ROUTES
from bench.gpu_report import Report

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "environment",
    "models",
    "cold_start",
    "single",
    "concurrent",
    "live_beside_batch",
    "compiled",
    "hardware",
    "batch_routes",
)


@pytest.mark.timeout(300)
def test_dry_run_goes_through_every_section(tmp_path: Path) -> None:
    out = tmp_path / "gpu.json"
    # Without CUDA the run is dry by itself; with it, --dry asks for one (the real run takes
    # five minutes).
    dry = ["--dry"] if torch.cuda.is_available() else []
    done = subprocess.run(
        [sys.executable, "-m", "bench.gpu", *dry, "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=280,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "DRY RUN" in done.stdout
    assert "Traceback" not in done.stdout + done.stderr
    report = json.loads(out.read_text())
    run = report["run"]
    assert run["dry"] is True
    assert run["why_dry"] == ("--dry" if dry else "torch sees no CUDA GPU")
    sections = report["sections"]
    assert tuple(sections) == SECTIONS
    assert {name: s["status"] for name, s in sections.items()} == dict.fromkeys(SECTIONS, "ok")
    assert report["not_run"] == {}

    assert sections["models"]["sd_turbo_id"] == "random/sd-turbo-dry"
    assert sections["cold_start"]["cold_start_s"] > 0
    assert sections["single"]["fps_total"] > 0
    levels = sections["concurrent"]["levels"]
    assert sorted(levels, key=int) == ["2", "4", "8"]
    for count, level in levels.items():
        assert len(level["fps_per_session"]) == int(count)
        assert all(fps > 0 for fps in level["fps_per_session"])
    beside = sections["live_beside_batch"]
    assert beside["jobs_beside"] >= 1 and beside["steps_timed"] >= 1
    assert beside["wait_beside"]["samples"] >= 1
    # Preemption: a live frame waited through at most one batch step.
    assert beside["most_steps_a_frame_waited"] <= 1
    assert sections["compiled"]["fps_total"] > 0
    assert sections["compiled"]["backend"] == "none (dry run)"
    routes = sections["batch_routes"]["routes"]
    assert set(routes) == {route.name for route in ROUTES}
    assert {name: r["status"] for name, r in routes.items()} == {
        route.name: 200 for route in ROUTES
    }
    assert sections["hardware"]["stats"]["gpu_stats"] == {}


async def test_a_failing_or_late_section_is_reported_and_the_run_goes_on(tmp_path: Path) -> None:
    path = tmp_path / "run.json"
    report = Report(path, 60, time.monotonic(), header={"dry": True}, grace_s=0.1)

    async def fine(budget: float) -> dict:
        return {"fps": 12.5}

    async def broken(budget: float) -> dict:
        raise RuntimeError("CUDA out of memory\nmore lines")

    async def stuck(budget: float) -> dict:
        await asyncio.sleep(3600)
        return {}

    assert await report.section("first", 10, fine)
    # Written after each section: a run killed now leaves this.
    assert json.loads(path.read_text())["sections"]["first"] == {
        "status": "ok",
        "fps": 12.5,
        "seconds": pytest.approx(0, abs=5),
    }
    assert not await report.section("second", 10, broken)
    # Past its budget and the grace after it: abandoned, and said so.
    assert not await report.section("stuck", 0.1, stuck, min_s=0)
    report.budget_s = 0  # the budget is spent: what follows does not start
    assert not await report.section("third", 10, stuck)
    report.finish()
    written = json.loads(path.read_text())
    assert written["sections"]["second"]["status"] == "failed"
    assert written["sections"]["second"]["error"] == "RuntimeError: CUDA out of memory"
    assert written["not_run"]["second"] == "failed: RuntimeError: CUDA out of memory"
    assert written["sections"]["stuck"]["status"] == "timed out"
    assert written["not_run"]["stuck"] == "still running 0 s after it began"
    assert written["sections"]["third"] == {"status": "not run"}
    assert "out of time" in written["not_run"]["third"]
    assert "seconds" in written["run"]
