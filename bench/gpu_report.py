"""The GPU acceptance run's report: sections run against one global deadline, each failure
caught and said, the JSON rewritten after every section so that a run cut short still leaves
what it measured."""

from __future__ import annotations

import asyncio
import json
import os
import time
import traceback
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

Figures = dict[str, Any]
Section = Callable[[float], Awaitable[Figures]]
"""A section: called with the seconds it may take, returns its figures."""

GRACE_S = 20.0
"""How far past its budget a section is let run before it is abandoned: sections watch their
own budget; this catches one stuck in a single call (a load, a compile)."""


def pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))] if ordered else float("nan")


def latency_ms(seconds: Sequence[float]) -> Figures:
    """p50/p95/max of durations in seconds, as rounded milliseconds."""
    return {
        "p50_ms": round(pct(seconds, 0.5) * 1000, 2),
        "p95_ms": round(pct(seconds, 0.95) * 1000, 2),
        "max_ms": round(max(seconds) * 1000, 2) if seconds else float("nan"),
        "samples": len(seconds),
    }


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0] if text else '(no message)'}"


class Report:
    """Figures by section, what could not run and why, written to `path` as it goes."""

    def __init__(
        self,
        path: Path | None,
        budget_s: float,
        started: float,
        header: Figures,
        grace_s: float = GRACE_S,
    ) -> None:
        self.path = path
        self.grace_s = grace_s
        self.budget_s = budget_s
        self.started = started
        self.data: Figures = {
            "run": header | {"started_at": datetime.now(UTC).isoformat(timespec="seconds")},
            "sections": {},
            "not_run": {},
        }
        self.write()

    def left(self) -> float:
        return self.started + self.budget_s - time.monotonic()

    def say(self, line: str) -> None:
        print(line, flush=True)

    def not_run(self, what: str, reason: str) -> None:
        self.data["not_run"][what] = reason
        self.say(f"  not run: {what}: {reason}")
        self.write()

    async def section(self, name: str, planned_s: float, run: Section, min_s: float = 2.0) -> bool:
        """Run one section within min(planned_s, time left); record its figures or why it
        failed or did not run. True when it ran to the end."""
        left = self.left()
        budget = min(planned_s, left)
        if budget < min_s:
            kept = " for the sections after it" if planned_s < left else ""
            self.data["sections"][name] = {"status": "not run"}
            self.not_run(name, f"out of time ({max(0.0, left):.0f} s of the budget left{kept})")
            return False
        self.say(f"== {name} (up to {budget:.0f} s)")
        started = time.monotonic()
        entry: Figures
        try:
            figures = await asyncio.wait_for(run(budget), budget + self.grace_s)
            entry = {"status": "ok", **figures}
        except TimeoutError:
            entry = {"status": "timed out"}
            self.not_run(name, f"still running {budget + self.grace_s:.0f} s after it began")
        except Exception as exc:
            entry = {"status": "failed", "error": one_line(exc)}
            self.say(f"  FAILED: {one_line(exc)}")
            self.say("  " + "  ".join(traceback.format_exception(exc)[-3:]).rstrip())
            self.data["not_run"][name] = f"failed: {one_line(exc)}"
        entry["seconds"] = round(time.monotonic() - started, 2)
        self.data["sections"][name] = entry
        self.write()
        return entry["status"] == "ok"

    def finish(self) -> None:
        self.data["run"]["seconds"] = round(time.monotonic() - self.started, 1)
        self.write()
        not_run = self.data["not_run"]
        if not_run:
            self.say("== could not run")
            for what, reason in not_run.items():
                self.say(f"  {what}: {reason}")
        self.say(f"== done in {self.data['run']['seconds']:.0f} s")

    def write(self) -> None:
        if self.path is None:
            return
        # Whole or not at all: a reader never sees half a file.
        partial = self.path.with_name(self.path.name + ".partial")
        partial.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(partial, self.path)
