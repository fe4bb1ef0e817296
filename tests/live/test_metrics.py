"""`GET /metrics`: a real service, a real session over trickle, the text Prometheus scrapes."""

from __future__ import annotations

import asyncio

from prometheus_client.parser import text_string_to_metric_families

from live.keys import RUNTIME, TRICKLE
from live.stats import STAGES
from protocol.clips import make_clip
from runtime.model_cache import ModelKey
from tests.live.streams import run_stream, wait_gone
from tests.waiting import wait_until

TOKEN = "metrics-secret"


async def scrape(client, **headers: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of `/metrics`, by name and sorted labels (parsed as Prometheus would)."""
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200, await response.text()
    assert response.content_type == "text/plain"
    samples = {}
    for family in text_string_to_metric_families(await response.text()):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: dict, name: str, **labels: str) -> float | None:
    return samples.get((name, tuple(sorted(labels.items()))))


async def test_a_session_shows_in_the_counters_and_histograms(service) -> None:
    client = await service(trickle_linger_s=0.05)
    during: dict = {}

    async def look(info, viewer, events) -> None:
        await viewer.wait_frames(10)
        response = await client.get(f"/live-video-to-video/{info['session_id']}")
        assert response.status == 200
        during["status"] = await response.json()
        during["samples"] = await scrape(client)

    info, viewer, events = await run_stream(
        client, make_clip(45), body={"model_id": "noop"}, during=look
    )

    # While it ran: its GET times every stage of the frame loop, and it is counted as live.
    stages = during["status"]["stages"]
    assert set(stages) == set(STAGES)
    for name, figures in stages.items():
        assert figures["p50_ms"] is not None and figures["p95_ms"] is not None, name
        assert figures["p50_ms"] <= figures["p95_ms"], name
    live = during["samples"]
    assert sum(v for (n, labels), v in live.items() if n == "live_v2v_sessions") == 1
    assert any(n == "live_v2v_sessions" and ("pipeline", "noop") in labels for (n, labels) in live)
    assert value(live, "live_v2v_frames_in_total", pipeline="noop") >= 10

    # Once it ended: the counters are its final figures, the histograms saw every timing.
    await wait_gone(client, info["session_id"])
    final = events.of_type("status")[-1]
    samples = await scrape(client)
    assert value(samples, "live_v2v_frames_in_total", pipeline="noop") == final["frames_in"] == 45
    assert value(samples, "live_v2v_frames_out_total", pipeline="noop") == final["frames_out"]
    assert (
        value(samples, "live_v2v_frames_dropped_total", pipeline="noop") == final["frames_dropped"]
    )
    assert final["frames_out"] == len(viewer.frames)
    for name, figures in final["stages"].items():
        count = value(samples, "live_v2v_stage_seconds_count", pipeline="noop", stage=name)
        assert count == figures["frames"], name  # 45 frames: the stats' window holds them all
    delays = value(samples, "live_v2v_ingest_to_output_seconds_count", pipeline="noop")
    assert delays == final["frames_out"]
    assert not any(n == "live_v2v_sessions" for (n, _) in samples)
    assert value(samples, "live_v2v_output_fps", pipeline="noop") is None
    # Its channels are gone (once the output and events channels' linger is over); the
    # bytes it moved over HTTP stay counted.
    await wait_until(lambda: not client.app[TRICKLE].channels, "the channels to be deleted")
    samples = await scrape(client)
    assert value(samples, "live_v2v_trickle_channels") == 0
    assert value(samples, "live_v2v_trickle_received_bytes_total") > 0
    assert value(samples, "live_v2v_trickle_sent_bytes_total") > 0
    assert value(samples, "live_v2v_webrtc_peers", kind="whip") == 0
    assert value(samples, "live_v2v_webrtc_peers", kind="whep") == 0


async def test_counters_add_up_over_sessions(service) -> None:
    client = await service()
    for _ in range(2):
        info, _, _ = await run_stream(client, make_clip(15), body={"model_id": "noop"})
        await wait_gone(client, info["session_id"])
    samples = await scrape(client)
    assert value(samples, "live_v2v_frames_in_total", pipeline="noop") == 30


async def test_batch_requests_show_by_route_and_status(service) -> None:
    client = await service()
    for body in ({}, {"prompt": 5}):
        response = await client.post("/text-to-image", json=body)
        assert response.status == 422
    assert (await client.get("/health")).status == 200  # not a batch route: not counted
    samples = await scrape(client)
    labels = {"route": "/text-to-image", "status": "422"}
    assert value(samples, "live_v2v_batch_requests_total", **labels) == 2
    assert value(samples, "live_v2v_batch_request_seconds_count", **labels) == 2
    counted = {dict(labels)["route"] for (n, labels) in samples if n.startswith("live_v2v_batch")}
    assert counted == {"/text-to-image"}


async def test_a_loaded_model_shows_its_load_time(service) -> None:
    client = await service()
    models = client.app[RUNTIME].models
    key = ModelKey("test", "tiny/model", "cpu", "float32")
    # A real load through the cache (off the event loop, as the service loads), of a tiny value.
    lease = await asyncio.to_thread(models.acquire, key, dict)
    try:
        samples = await scrape(client)
    finally:
        lease.release()
    load = value(
        samples, "live_v2v_model_load_seconds", kind="test", model_id="tiny/model", device="cpu"
    )
    assert load is not None and load >= 0


async def test_metrics_take_the_token_when_one_is_set(service) -> None:
    client = await service(auth_token=TOKEN)
    response = await client.get("/metrics")
    assert response.status == 401
    assert (await response.json())["detail"]["msg"]
    response = await client.get("/metrics", headers={"Authorization": "Bearer wrong"})
    assert response.status == 401
    samples = await scrape(client, Authorization=f"Bearer {TOKEN}")
    assert value(samples, "live_v2v_trickle_channels") == 0
