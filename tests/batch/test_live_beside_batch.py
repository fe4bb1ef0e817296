"""Live sessions and a batch job on the same device: a batch job yields between its denoising
steps, so a live frame waits at most for the step under way, and live output keeps flowing
while the job runs."""

from __future__ import annotations

from live.keys import RUNTIME

from .conftest import assert_live_kept_up, live_pair

STEPS = 40


async def test_live_frames_wait_at_most_one_step_of_a_batch_job(batch_service) -> None:
    # In process on purpose: live frames and the batch job share this process's device worker
    # (batch jobs run in process until they move to the worker process).
    client = await batch_service(warm=("text-to-image",), device="cpu", worker_process=False)
    worker = client.app[RUNTIME].worker()
    async with live_pair(client, frames=600) as live:  # 20 s: outlasts the batch job
        before = live.counts()
        steps_before, live_before = worker.safe_points, worker.done_live
        request = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": STEPS}
        response = await client.post("/text-to-image", json=request)
        assert response.status == 200, await response.text()
        after = live.counts()
        assert live.still_publishing(), "the clip ended before the job"

    # The job stopped at each of its steps to let live work through...
    assert worker.safe_points - steps_before == STEPS
    assert worker.done_live > live_before
    # ...so no live frame waited for more than the step under way, and both sessions kept up.
    assert_live_kept_up(worker, before, after)
