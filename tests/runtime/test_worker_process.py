"""The supervised worker process: calls and frames across the boundary, live before batch,
and what happens when the child hangs, aborts, exits, is killed, raises or poisons its device.
After every test nothing of the worker is left: no thread, descriptor, shared-memory segment,
process or task."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from multiprocessing import resource_tracker
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from runtime.frame_ring import SEGMENT_PREFIX
from runtime.worker_errors import (
    CallTimedOut,
    OperationFailed,
    StaleObject,
    WorkerBusy,
    WorkerLost,
    WorkerUnavailable,
)
from runtime.worker_process import (
    ProcessWorker,
    ProcessWorkerConfig,
    RestartInfo,
    start_fork_server,
)
from tests.runtime.worker_test_ops import only_here
from tests.waiting import WAIT_S, poll_until, poll_until_blocking, wait_until

pytestmark = pytest.mark.blockbuster

OPS = "tests.runtime.worker_test_ops"
SLOT = 64 * 64 * 3


def config(**overrides: Any) -> ProcessWorkerConfig:
    settings: dict[str, Any] = dict(
        name="test",
        slots=4,
        slot_bytes=SLOT,
        call_timeout_s=30.0,
        backoff_base_s=0.01,
        backoff_max_s=0.05,
        stop_grace_s=5.0,
        kill_wait_s=5.0,
    )
    settings.update(overrides)
    return ProcessWorkerConfig(**settings)


def children() -> set[int]:
    """Our worker processes, and any other process we started: every descendant but
    multiprocessing's resource tracker (one per service process, started with the first
    shared-memory segment, and what unlinks them if we die) and its fork server (one per
    service process: the workers are its children)."""
    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if b"resource_tracker" not in cmdline:
            parents[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found: set[int] = set()
    frontier = {os.getpid()}
    while frontier:
        frontier = {pid for pid, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {pid for pid in found if not _is_fork_server(pid)}


def _is_fork_server(pid: int) -> bool:
    try:
        return b"forkserver" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def segments(pid: int | None = None) -> set[str]:
    prefix = f"{SEGMENT_PREFIX}{pid or os.getpid()}-"
    return {name for name in os.listdir("/dev/shm") if name.startswith(prefix)}


def snapshot() -> dict[str, Any]:
    return {
        # The loop's default executor (which starts the processes) keeps its threads.
        "threads": {t for t in threading.enumerate() if not t.name.startswith("asyncio_")},
        # Less the fork server's: a fresh one (the old one killed) may take another number.
        "fds": set(os.listdir("/proc/self/fd")) - {str(_fork_server_fd())},
        "segments": segments(),
        "processes": children(),
    }


def _fork_server_fd() -> int | None:
    from multiprocessing import forkserver

    return forkserver._forkserver._forkserver_alive_fd  # type: ignore[attr-defined,no-any-return]


def new_since(before: dict[str, Any]) -> dict[str, Any]:
    """What exists now and did not before (what an earlier test left may end meanwhile)."""
    now = snapshot()
    return {key: now[key] - before[key] for key in now if now[key] - before[key]}


@pytest.fixture(autouse=True)
async def nothing_left_behind() -> AsyncIterator[None]:
    # The tracker and its pipe live as long as this process: started here, not counted.
    resource_tracker.ensure_running()
    # As the tracker: one per process, what the workers are forked from.
    await asyncio.to_thread(start_fork_server)
    before = snapshot()
    yield
    if not await poll_until(lambda: not new_since(before)):
        pytest.fail(f"left behind: {new_since(before)}")


@pytest.fixture
async def worker() -> AsyncIterator[ProcessWorker]:
    async with ProcessWorker(config()) as worker:
        yield worker


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


async def running(worker: ProcessWorker, count: int = 1) -> None:
    await wait_until(lambda: worker.status().running == count, f"{count} call(s) running")


async def test_calls_and_frames_cross_the_boundary(worker: ProcessWorker) -> None:
    status = worker.status()
    assert status.state == "ready" and status.generation == 1
    assert await worker.call("runtime.worker_ops:ping") == status.pid != os.getpid()
    frame = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    inverted = await worker.call(f"{OPS}:invert", frame=frame)
    np.testing.assert_array_equal(inverted, 255 - frame)
    # A result frame is the caller's own copy, not a slot a later call will overwrite.
    assert inverted.flags.writeable and inverted.base is None
    cropped = await worker.call(f"{OPS}:crop", 16, frame=frame)
    np.testing.assert_array_equal(cropped, frame[:16, :16])
    assert await worker.submit_batch(f"{OPS}:add", 2, b=3) == 5
    floats = np.linspace(0, 1, 12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(
        await worker.call("runtime.worker_ops:noop", frame=floats), floats
    )


async def test_errors_come_back_as_type_and_message_and_the_worker_goes_on(
    worker: ProcessWorker,
) -> None:
    pid = worker.status().pid
    with pytest.raises(OperationFailed) as failed:
        await worker.call(f"{OPS}:fail", "no such style")
    assert (failed.value.type_name, failed.value.message) == ("ValueError", "no such style")
    with pytest.raises(OperationFailed, match="cannot be sent back"):
        await worker.call(f"{OPS}:unpicklable")
    with pytest.raises(OperationFailed) as missing:
        await worker.call("tests.runtime.no_such_module:run")
    assert missing.value.type_name == "ModuleNotFoundError"
    with pytest.raises(ValueError, match=r"package\.module:attribute"):
        worker.submit("not a path")
    with pytest.raises(TypeError, match="cannot be sent to the worker"):
        worker.submit(f"{OPS}:add", threading.Lock())
    with pytest.raises(ValueError, match="positive number of seconds"):
        worker.submit(f"{OPS}:add", 1, timeout_s=0)
    # Values one side cannot unpickle fail their call, not the pipe.
    with pytest.raises(OperationFailed, match="service cannot read the result"):
        await worker.call(f"{OPS}:only_here")
    with pytest.raises(OperationFailed) as unreadable:
        await worker.call(f"{OPS}:add", only_here("only_in_the_service"))
    assert unreadable.value.type_name == "ModuleNotFoundError"
    too_big = np.zeros((65, 64, 3), np.uint8)
    with pytest.raises(ValueError, match=f"larger than the worker's {SLOT}-byte frame slots"):
        worker.submit("runtime.worker_ops:noop", frame=too_big)
    assert await worker.call(f"{OPS}:add", 1) == 1
    assert worker.status().pid == pid and worker.status().generation == 1


async def test_live_calls_run_before_queued_batch_calls(
    worker: ProcessWorker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    blocker = worker.submit(f"{OPS}:wait_for_file", str(gate))
    await running(worker)
    # Queued while the worker is busy, so only priority orders them.
    batch = [worker.submit_batch(f"{OPS}:tick", f"b{i}") for i in range(3)]
    live = [worker.submit(f"{OPS}:tick", f"l{i}") for i in range(2)]
    gate.touch()
    assert await blocker == "released"
    assert await asyncio.gather(*live) == [0, 1]
    assert await asyncio.gather(*batch) == [2, 3, 4]


async def test_a_batch_job_lets_live_calls_in_between_its_steps(
    worker: ProcessWorker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    job = worker.submit_batch(f"{OPS}:steps_until_file", str(gate))
    await running(worker)
    # Answered while the job still runs: it would otherwise wait for the gate, which only
    # opens after it.
    async with asyncio.timeout(WAIT_S):
        assert await worker.call(f"{OPS}:add", 1) == 1
        assert await worker.call(f"{OPS}:add", 2) == 2
    assert not job.done()
    gate.touch()
    assert await job == 2


async def test_frames_past_the_slots_are_refused_and_slots_come_back(
    worker: ProcessWorker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    frame = np.ones((8, 8, 3), np.uint8)
    held = [worker.submit(f"{OPS}:frame_after_file", str(gate), frame=frame)]
    held += [worker.submit("runtime.worker_ops:noop", frame=frame) for _ in range(3)]
    with pytest.raises(WorkerBusy, match="all 4 frame slots"):
        worker.submit("runtime.worker_ops:noop", frame=frame)
    # A cancelled call that had not started gives its slots back once the child skips it.
    held[3].cancel()
    gate.touch()
    await asyncio.gather(*held[:3])
    for _ in range(6):
        await worker.call("runtime.worker_ops:noop", frame=frame)


async def test_calls_past_the_bound_are_refused(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    async with ProcessWorker(config(max_calls=2)) as worker:
        calls = [worker.submit(f"{OPS}:wait_for_file", str(gate)), worker.submit(f"{OPS}:add", 1)]
        with pytest.raises(WorkerBusy, match="2 calls in flight"):
            worker.submit(f"{OPS}:add", 2)
        gate.touch()
        assert await asyncio.gather(*calls) == ["released", 1]
        assert await worker.call(f"{OPS}:add", 3) == 3


async def test_a_timeout_counts_from_when_the_call_started(worker: ProcessWorker) -> None:
    slow = worker.submit(f"{OPS}:sleep", 0.5)
    # Queued behind the slow call for longer than its own limit: not timed out.
    quick = worker.submit(f"{OPS}:add", 7, timeout_s=0.25)
    assert await asyncio.gather(slow, quick) == [0.5, 7]
    assert worker.status().generation == 1


async def test_a_hung_call_times_out_and_a_fresh_worker_serves() -> None:
    restarts: list[RestartInfo] = []
    async with ProcessWorker(config(), on_restart=restarts.append) as worker:
        first_pid = worker.status().pid
        hung = worker.submit(f"{OPS}:hang", timeout_s=0.2)
        queued = worker.submit_batch(f"{OPS}:add", 1)
        with pytest.raises(CallTimedOut, match=f"{OPS}:hang ran past its 0.2 s timeout") as late:
            await hung
        assert late.value.retry_after_s is not None
        with pytest.raises(WorkerLost) as lost:
            await queued
        assert not isinstance(lost.value, CallTimedOut)
        await worker.wait_ready()
        assert await worker.call(f"{OPS}:add", 2) == 2
        status = worker.status()
        assert (status.generation, status.restarts, status.state) == (2, 1, "ready")
        assert status.pid != first_pid and first_pid is not None and pid_gone(first_pid)
        assert "timeout" in (status.last_failure or "")
        await wait_until(lambda: len(restarts) == 1, "the restart hook")
        assert restarts[0].generation == 2 and "timeout" in restarts[0].reason


async def kill_from_outside(worker: ProcessWorker, gate: Path) -> asyncio.Future[Any]:
    held = worker.submit(f"{OPS}:wait_for_file", str(gate))
    await running(worker)
    pid = worker.status().pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    return held


CRASHES = {
    "abort": ("abort", (), "aborted (SIGABRT)"),
    "sys.exit": ("exit_with", (3,), "exited with status 3"),
    "poisoned device": ("poison", (), "device failed (DevicePoisoned"),
    "CUDA fault": ("cuda_fault", (), "illegal memory access"),
}


@pytest.mark.parametrize("crash", [*CRASHES, "SIGKILL"])
async def test_a_crashed_worker_fails_its_calls_and_is_replaced(
    worker: ProcessWorker, crash: str, tmp_path: Path
) -> None:
    first_pid = worker.status().pid
    assert first_pid is not None
    frame = np.zeros((4, 4, 3), np.uint8)
    if crash == "SIGKILL":
        crashing = await kill_from_outside(worker, tmp_path / "never")
        said = "killed by SIGKILL"
    else:
        op, args, said = CRASHES[crash]
        crashing = worker.submit(f"{OPS}:{op}", *args)
    queued = [
        worker.submit_batch(f"{OPS}:add", 1),
        worker.submit("runtime.worker_ops:noop", frame=frame),
    ]
    for call in [crashing, *queued]:
        with pytest.raises(WorkerLost, match=re.escape(said)) as lost:
            await call
        assert lost.value.retry_after_s is not None
    await worker.wait_ready()
    assert worker.status().generation == 2
    assert await worker.call("runtime.worker_ops:ping") not in (first_pid, None)
    assert (await worker.call("runtime.worker_ops:noop", frame=frame)).shape == (4, 4, 3)
    assert pid_gone(first_pid)


async def test_calls_while_restarting_are_refused_with_a_retry_after(tmp_path: Path) -> None:
    async with ProcessWorker(config(backoff_base_s=30.0, backoff_max_s=30.0)) as worker:
        with pytest.raises(WorkerLost):
            await worker.call(f"{OPS}:abort")
        await wait_until(lambda: worker.status().state == "restarting", "the backoff")
        with pytest.raises(WorkerUnavailable, match="restarting") as refused:
            worker.submit(f"{OPS}:add", 1)
        assert refused.value.retry_after_s is not None and refused.value.retry_after_s >= 1
        status = worker.status()
        assert status.retry_in_s is not None and status.retry_in_s > 0


async def test_repeated_crashes_end_in_a_failed_state() -> None:
    async with ProcessWorker(config(max_failures=3)) as worker:
        for _ in range(3):
            await worker.wait_ready()
            with pytest.raises(WorkerLost, match="SIGABRT"):
                await worker.call(f"{OPS}:abort")
        with pytest.raises(WorkerUnavailable, match="failed 3 times"):
            await worker.wait_ready()
        status = worker.status()
        assert (status.state, status.recent_failures, status.pid) == ("failed", 3, None)
        assert "SIGABRT" in (status.last_failure or "")
        with pytest.raises(WorkerUnavailable, match="failed 3 times") as refused:
            worker.submit(f"{OPS}:add", 1)
        assert refused.value.retry_after_s is None


async def test_close_finishes_queued_work() -> None:
    worker = ProcessWorker(config())
    await worker.start()
    calls = [worker.submit_batch(f"{OPS}:sleep", 0.05), worker.submit(f"{OPS}:add", 4)]
    await worker.close()
    assert await asyncio.gather(*calls) == [0.05, 4]
    with pytest.raises(WorkerUnavailable, match="shut down"):
        worker.submit(f"{OPS}:add", 1)
    await worker.close()


async def test_close_with_a_hung_worker_ends_within_its_bound() -> None:
    worker = ProcessWorker(config(stop_grace_s=0.2, kill_wait_s=1.0))
    await worker.start()
    pid = worker.status().pid
    assert pid is not None
    hung = worker.submit(f"{OPS}:hang_ignoring_sigterm", timeout_s=float("inf"))
    await running(worker)
    async with asyncio.timeout(10):
        await worker.close()
    with pytest.raises(WorkerLost, match="shut down"):
        await hung
    assert pid_gone(pid)


async def test_streams_come_item_by_item_and_stop_when_left(worker: ProcessWorker) -> None:
    assert [t async for t in worker.stream(f"{OPS}:tokens", 4)] == ["t0", "t1", "t2", "t3"]
    taken = []
    async with contextlib.aclosing(worker.stream(f"{OPS}:endless")) as items:
        async for item in items:
            taken.append(item)
            if len(taken) == 3:
                break
    assert taken == [0, 1, 2]
    # The endless generator was stopped in the child, or this would wait behind it forever.
    assert await worker.call(f"{OPS}:add", 5) == 5
    got = []
    with pytest.raises(OperationFailed, match="ran out of words"):
        async for item in worker.stream(f"{OPS}:tokens_then_fail"):
            got.append(item)
    assert got == ["a"]


async def test_objects_live_in_the_worker_until_it_is_replaced(worker: ProcessWorker) -> None:
    counter = await worker.create(f"{OPS}:Counter", 10)
    assert await worker.call(counter.method("add"), 1) == 11
    assert await worker.call(counter.method("add"), 2) == 13
    worker.release(counter)
    with pytest.raises(OperationFailed, match="released"):
        await worker.call(counter.method("add"), 1)
    again = await worker.create(f"{OPS}:Counter", 0)
    with pytest.raises(WorkerLost):
        await worker.call(f"{OPS}:abort")
    await worker.wait_ready()
    with pytest.raises(StaleObject, match="restarted"):
        worker.submit(again.method("add"), 1)


async def test_a_load_on_the_loader_lane_holds_up_no_main_lane_call(
    worker: ProcessWorker, tmp_path: Path
) -> None:
    gate = tmp_path / "gate"
    load = asyncio.ensure_future(worker.create(f"{OPS}:HeldLoad", str(gate), loader=True))
    await running(worker)
    frame = np.random.default_rng(2).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    done = 0
    # Frames and small calls on the main thread: each would wait for the gate, which only
    # opens after them, if the load held that thread.
    async with asyncio.timeout(WAIT_S):
        while done < 20:
            np.testing.assert_array_equal(
                await worker.call(f"{OPS}:invert", frame=frame), 255 - frame
            )
            assert await worker.submit_batch(f"{OPS}:add", done) == done
            done += 1
    assert not load.done() and worker.status().running == 1
    gate.touch()
    held = await load
    # Kept in the child like any object made with `create`; its methods run on the main lane.
    assert await worker.call(held.method("made_on")) == "worker-loader"
    worker.release(held)


async def test_loads_run_one_at_a_time_in_order(worker: ProcessWorker, tmp_path: Path) -> None:
    gates = [tmp_path / f"gate{i}" for i in range(3)]
    loads = [
        asyncio.ensure_future(worker.call(f"{OPS}:load_until_file", str(g), loader=True))
        for g in gates
    ]
    await running(worker)
    # A main-lane round trip: the child has read all three loads by its end.
    assert await worker.call(f"{OPS}:loads_started") == 1
    loads[2].cancel()  # not started: skipped, never run
    assert worker.status().running == 1
    gates[1].touch()  # the second load's gate: it still waits for the first
    assert await worker.call(f"{OPS}:loads_started") == 1
    gates[0].touch()
    assert await loads[0] == 1
    assert await loads[1] == 1  # it ran alone
    with pytest.raises(asyncio.CancelledError):
        await loads[2]
    await wait_until(lambda: worker.status().in_flight == 0, "the cancelled load skipped")
    assert await worker.call(f"{OPS}:loads_started") == 2


async def test_a_load_hands_its_shared_work_to_the_main_thread(worker: ProcessWorker) -> None:
    from runtime.worker_child import on_main

    assert await worker.call(f"{OPS}:threads_of_a_load", loader=True) == (
        "worker-loader",
        "MainThread",
    )
    # On the main lane, and outside a worker process, it runs where it is called.
    assert await worker.call(f"{OPS}:threads_of_a_load") == ("MainThread", "MainThread")
    assert on_main(lambda: threading.current_thread().name) == threading.current_thread().name
    with pytest.raises(OperationFailed, match="the warm-up failed"):
        await worker.call(f"{OPS}:fail_on_main", loader=True)
    assert worker.status().generation == 1


async def test_replies_of_both_lanes_never_interleave(worker: ProcessWorker) -> None:
    size = 1 << 20  # many writes to the pipe each
    frame = np.ones((8, 8, 3), np.uint8)
    loads = [
        asyncio.ensure_future(worker.call(f"{OPS}:payload", size, loader=True)) for _ in range(4)
    ]
    frames = 0
    while not all(load.done() for load in loads):
        assert (await worker.call(f"{OPS}:invert", frame=frame) == 254).all()
        frames += 1
    for load in loads:
        assert await load == bytes(range(256)) * (size // 256)
    assert worker.status().generation == 1 and frames > 0


async def test_a_hung_load_times_out_and_a_fresh_worker_serves() -> None:
    restarts: list[RestartInfo] = []
    async with ProcessWorker(config(), on_restart=restarts.append) as worker:
        first_pid = worker.status().pid
        with pytest.raises(CallTimedOut, match=f"{OPS}:hang ran past its 0.2 s timeout"):
            await worker.call(f"{OPS}:hang", loader=True, timeout_s=0.2)
        await worker.wait_ready()
        assert await worker.call(f"{OPS}:threads_of_a_load", loader=True) == (
            "worker-loader",
            "MainThread",
        )
        status = worker.status()
        assert (status.generation, status.restarts) == (2, 1)
        assert first_pid is not None and pid_gone(first_pid)
        await wait_until(lambda: len(restarts) == 1, "the restart hook")


@pytest.mark.parametrize("crash", ["abort", "sys.exit", "poisoned device"])
async def test_a_crash_on_the_loader_lane_replaces_the_worker(
    worker: ProcessWorker, crash: str
) -> None:
    op, args, said = CRASHES[crash]
    with pytest.raises(WorkerLost, match=re.escape(said)):
        await worker.call(f"{OPS}:{op}", *args, loader=True)
    await worker.wait_ready()
    assert worker.status().generation == 2
    assert await worker.call(f"{OPS}:add", 1, loader=True) == 1


async def test_close_finishes_queued_loads_and_what_they_hand_over(tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    worker = ProcessWorker(config())
    await worker.start()
    calls = [
        asyncio.ensure_future(worker.call(f"{OPS}:wait_for_file", str(gate), loader=True)),
        asyncio.ensure_future(worker.call(f"{OPS}:threads_of_a_load", loader=True)),
    ]
    await running(worker)
    await wait_until(lambda: worker.status().in_flight == 2, "both loads sent")
    closing = asyncio.ensure_future(worker.close())
    await wait_until(lambda: worker.status().state == "closed", "the close begun")
    gate.touch()
    await closing
    assert await asyncio.gather(*calls) == ["released", ("worker-loader", "MainThread")]


PARENT = """
import asyncio, os, sys
from runtime.worker_process import ProcessWorker, ProcessWorkerConfig

async def main():
    worker = ProcessWorker(ProcessWorkerConfig(name="orphan", slots=2, slot_bytes=1024))
    await worker.start()
    print(worker.status().pid, flush=True)
    await asyncio.Event().wait()

if __name__ == "__main__":
    asyncio.run(main())
"""


def test_a_killed_service_leaves_no_worker_and_no_segment(tmp_path: Path) -> None:
    script = tmp_path / "service.py"
    script.write_text(PARENT)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    service = subprocess.Popen(
        [sys.executable, str(script)], stdout=subprocess.PIPE, env=env, text=True
    )
    try:
        assert service.stdout is not None
        child = int(service.stdout.readline())
        assert len(segments(service.pid)) == 2
        service.kill()
        service.wait()
        # The worker sees its requests pipe close and exits; the resource tracker unlinks.
        assert poll_until_blocking(lambda: pid_gone(child)), "the worker outlived the service"
        assert poll_until_blocking(lambda: not segments(service.pid)), "segments left"
    finally:
        service.kill()
        service.wait()
        if service.stdout is not None:
            service.stdout.close()


def ended(pid: int) -> bool:
    """Gone, or a zombie (an orphan waits for whoever adopted it to collect its status)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


async def test_a_killed_fork_server_costs_one_restart(worker: ProcessWorker) -> None:
    """The fork server dying (the OOM killer, an operator's kill) takes the worker it forked
    off the supervision it reports exits through: that worker is replaced by a fresh one,
    from a fresh fork server, and ends."""
    from multiprocessing import forkserver

    first = worker.status().pid
    assert first is not None
    server = forkserver._forkserver._forkserver_pid  # type: ignore[attr-defined]
    assert server is not None
    os.kill(server, signal.SIGKILL)
    await wait_until(
        lambda: worker.status().generation == 2 and worker.status().state == "ready",
        "a fresh worker",
    )
    assert await worker.call("runtime.worker_ops:ping") not in (first, None)
    await wait_until(lambda: ended(first), "the first worker to end")
