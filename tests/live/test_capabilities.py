"""A URL handed to a client grants one thing (issue 9): channel names that cannot be derived,
channels that refuse outside writes or reads, limits that fit their content."""

from __future__ import annotations

import asyncio

import aiohttp

from live.keys import TRICKLE
from protocol.clips import make_clip
from tests.live.streams import EventLog, Viewer, publish_clip, run_stream, start_session


def channel_of(url: str) -> str:
    return url.rsplit("/", 1)[1]


async def test_each_url_names_its_own_unguessable_channel(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    names = [
        channel_of(info[k]) for k in ("publish_url", "subscribe_url", "control_url", "events_url")
    ]
    assert len(set(names)) == 4
    for name in names:
        assert len(name) >= 32  # 128 random bits in hex
        assert info["session_id"] not in name and not any(
            other in name for other in names if other != name
        )
    await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_a_viewer_cannot_write_delete_or_reach_other_channels(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    out = channel_of(info["subscribe_url"])
    events = channel_of(info["events_url"])
    base = "/trickle/"
    # Writes and deletes on what the service writes are refused ...
    for path in (f"{out}/0", f"{out}/-1", f"{events}/5"):
        response = await client.post(base + path, data=b"injected")
        assert response.status == 403, path
    assert (await client.delete(base + out)).status == 403
    assert (await client.delete(f"{base}{out}/0")).status == 403
    # ... and so are reads of what only the service reads.
    assert (await client.get(base + channel_of(info["publish_url"]) + "/0")).status == 403
    assert (await client.get(base + channel_of(info["control_url"]) + "/-1")).status == 403
    # The derived names of the old scheme do not exist.
    for suffix in ("", "-out", "-control", "-events"):
        assert (await client.post(f"{base}{info['session_id']}{suffix}/0", data=b"x")).status == 404
    await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_an_outside_write_attempt_does_not_disturb_output_or_events(service) -> None:
    client = await service()

    async def attack(info, viewer, events) -> None:
        await viewer.wait_frames(10)
        async with aiohttp.ClientSession() as http:
            for url in (info["subscribe_url"], info["events_url"]):
                async with http.post(url + "/-1", data=b"{}") as response:
                    assert response.status == 403

    _, viewer, events = await run_stream(
        client, make_clip(60), body={"model_id": "noop"}, during=attack
    )
    assert viewer.indices == list(range(60))
    final = events.of_type("status")[-1]
    assert final["end_reason"] == "input ended" and final["frames_out"] == 60


async def test_control_and_events_segments_are_refused_past_one_mib(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    big = b"{" + b" " * (1024 * 1024) + b"}"
    response = await client.post(f"/trickle/{channel_of(info['control_url'])}/-1", data=big)
    assert response.status == 413
    await client.delete(f"/live-video-to-video/{info['session_id']}")


async def test_trickle_seqs_are_ascii_int64(service) -> None:
    client = await service()
    trickle = client.app[TRICKLE]
    trickle.create_channel("c")
    for seq in ("99999999999999999999", "1_0", "\u0663", "+1", " 1"):
        response = await client.post(f"/trickle/c/{seq}", data=b"x")
        assert response.status == 400, seq
    assert (await client.get("/trickle/c/next")).headers["Lp-Trickle-Latest"] == "0"


async def test_the_channel_limit_refuses_a_session_with_429_and_leaves_nothing(service) -> None:
    client = await service(trickle_max_channels=6)
    first = await start_session(client, model_id="noop")
    response = await client.post("/live-video-to-video", json={"model_id": "noop"})
    assert response.status == 429
    assert "channels" in (await response.json())["detail"]["msg"]
    assert len(client.app[TRICKLE].channels) == 4
    await client.delete(f"/live-video-to-video/{first['session_id']}")
    assert not client.app[TRICKLE].channels


async def test_publishing_and_watching_with_the_handed_out_urls_still_works(service) -> None:
    client = await service()
    info = await start_session(client, model_id="noop")
    viewer = Viewer(info["subscribe_url"])
    events = EventLog(info["events_url"])
    tasks = [asyncio.create_task(viewer.run()), asyncio.create_task(events.run())]
    await publish_clip(info["publish_url"], make_clip(30))
    await asyncio.wait_for(asyncio.gather(*tasks), 20)
    assert viewer.indices == list(range(30))
