"""Live sessions and a batch job on the same device: a batch job yields between its denoising
steps, so a live frame waits at most for the step under way, and live output keeps flowing
while the job runs."""

from __future__ import annotations

import asyncio

from live.keys import RUNTIME, SESSIONS
from protocol.clips import make_clip
from tests.live.streams import publish_clip, start_session
from tests.waiting import wait_until

STEPS = 40


async def test_live_frames_wait_at_most_one_step_of_a_batch_job(batch_service) -> None:
    client = await batch_service(warm=("text-to-image",), device="cpu")
    runtime, sessions = client.app[RUNTIME], client.app[SESSIONS]
    noop = await start_session(client, model_id="noop")
    diffusion = await start_session(
        client,
        model_id="streamdiffusion",
        params={"width": 64, "height": 64, "t_index_list": [20], "prompt": "a cat"},
    )
    noop_stats = sessions.get(noop["session_id"]).stats
    diffusion_session = sessions.get(diffusion["session_id"])
    await asyncio.wait_for(diffusion_session.wait_ready(), 60)
    diffusion_stats = diffusion_session.stats
    clip = make_clip(600, width=64, height=64)  # 20 s at 30 fps: outlasts the batch job
    publishing = [
        asyncio.create_task(publish_clip(info["publish_url"], clip, close=False))
        for info in (noop, diffusion)
    ]
    try:
        await wait_until(
            lambda: noop_stats.frames_out > 10 and diffusion_stats.frames_out > 3,
            "both live sessions to put out frames",
            within=30,
        )
        worker = runtime.worker()
        before = (noop_stats.frames_in, noop_stats.frames_out, diffusion_stats.frames_out)
        steps_before, live_before = worker.safe_points, worker.done_live
        request = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": STEPS}
        response = await client.post("/text-to-image", json=request)
        assert response.status == 200, await response.text()
        after = (noop_stats.frames_in, noop_stats.frames_out, diffusion_stats.frames_out)
        assert not all(task.done() for task in publishing), "the clip ended before the job"
    finally:
        for task in publishing:
            task.cancel()
        await asyncio.gather(*publishing, return_exceptions=True)

    # The job stopped at each of its steps to let live work through...
    assert worker.safe_points - steps_before == STEPS
    # ...so no live frame ever waited for more than the step under way.
    assert worker.max_live_wait_steps <= 1
    # The diffusion session's frames ran between the job's steps.
    assert worker.done_live > live_before
    assert after[2] > before[2]
    # The noop session (no device work) kept its output flowing through the job.
    noop_in, noop_out = after[0] - before[0], after[1] - before[1]
    assert noop_in > 0
    assert noop_out >= 0.8 * noop_in, (noop_in, noop_out)
