"""Every way a batch request can be wrong gets a clear 4xx (or a 503 that says what to do),
and the service goes on serving."""

from __future__ import annotations

import asyncio
import threading

from aiohttp import FormData

from batch.route import BATCH
from live.keys import RUNTIME
from tests.waiting import wait_until

from .conftest import png
from .test_image_routes import form


async def test_multipart_without_the_file_names_the_field(batch_service) -> None:
    client = await batch_service(warm=())
    data = FormData()
    data.add_field("prompt", "make it blue")
    response = await client.post("/image-to-image", data=data)
    assert response.status == 422
    (error,) = (await response.json())["detail"]
    assert error["loc"] == ["body", "image"]
    assert error["type"] == "missing"


async def test_a_file_that_is_not_an_image_is_a_400(batch_service) -> None:
    client = await batch_service(warm=())
    for route in ("/image-to-image", "/upscale", "/image-to-video"):
        garbage = form(b"this is not a picture at all", prompt="x")
        response = await client.post(route, data=garbage)
        assert response.status == 400, route
        message = (await response.json())["detail"]["msg"]
        assert message == (
            "the image file is not an image this service can read (PNG, JPEG, WebP, GIF, BMP, TIFF)"
        )
    truncated = form(png(64, 64)[:60], prompt="x")
    response = await client.post("/image-to-image", data=truncated)
    assert response.status == 400
    assert "image" in (await response.json())["detail"]["msg"]


async def test_an_image_too_large_or_too_small_is_refused_before_any_work(batch_service) -> None:
    client = await batch_service(warm=())
    response = await client.post("/upscale", data=form(png(1100, 1000), prompt="x"))
    assert response.status == 400
    assert "1100x1000" in (await response.json())["detail"]["msg"]
    response = await client.post("/image-to-image", data=form(png(32, 200), prompt="x"))
    assert response.status == 400
    assert "at least 64" in (await response.json())["detail"]["msg"]


async def test_json_fields_of_the_wrong_type_are_422_naming_them(batch_service) -> None:
    client = await batch_service(warm=())
    cases = [
        ({"prompt": 5}, ["body", "prompt"]),
        ({}, ["body", "prompt"]),
        ({"prompt": "a cat", "width": "1024"}, ["body", "width"]),
        ({"prompt": "a cat", "width": 100}, ["body", "width"]),  # not a multiple of 8
        ({"prompt": "a cat", "num_images_per_prompt": 1000}, ["body", "num_images_per_prompt"]),
        # An optional field: one error on the field, not one per member of `int | None`.
        ({"prompt": "a cat", "seed": -1}, ["body", "seed"]),
        ({"prompt": "a cat", "seed": "7"}, ["body", "seed"]),
    ]
    for body, loc in cases:
        response = await client.post("/text-to-image", json=body)
        assert response.status == 422, body
        assert [error["loc"] for error in (await response.json())["detail"]] == [loc]


async def test_whole_numbers_written_as_floats_are_integers(batch_service) -> None:
    client = await batch_service(warm=())
    body = {"prompt": 5, "width": 64.0, "height": 64.5, "seed": 3.0}
    response = await client.post("/text-to-image", json=body)
    assert response.status == 422
    # 64.0 and 3.0 pass (JSON Schema integers); 64.5 does not; the prompt is not a string.
    locs = sorted(error["loc"] for error in (await response.json())["detail"])
    assert locs == [["body", "height"], ["body", "prompt"]]


async def test_multipart_fields_of_the_wrong_type_are_422(batch_service) -> None:
    client = await batch_service(warm=())
    response = await client.post(
        "/image-to-image", data=form(png(64, 64), prompt="x", strength="much")
    )
    assert response.status == 422
    assert [e["loc"] for e in (await response.json())["detail"]] == [["body", "strength"]]


async def test_wrong_content_types_and_broken_bodies(batch_service) -> None:
    client = await batch_service(warm=())
    as_json = await client.post("/image-to-image", json={"prompt": "x", "image": "aGVsbG8="})
    assert as_json.status == 415
    assert "multipart/form-data" in (await as_json.json())["detail"]["msg"]
    as_form = await client.post("/text-to-image", data=form(png(8, 8), prompt="x"))
    assert as_form.status == 415
    broken = await client.post(
        "/text-to-image", data=b'{"prompt": ', headers={"Content-Type": "application/json"}
    )
    assert broken.status == 400
    assert "not valid JSON" in (await broken.json())["detail"]["msg"]
    bad_boundary = await client.post(
        "/upscale",
        data=b"--nope\r\n\r\ngarbage",
        headers={"Content-Type": "multipart/form-data; boundary=other"},
    )
    assert bad_boundary.status in (400, 422)
    bad_part_header = await client.post(
        "/upscale",
        data=b'--B\r\nContent-Disposition: form-data; name="\x7f"\r\n\r\nx\r\n--B--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=B"},
    )
    assert bad_part_header.status == 400
    assert "multipart" in (await bad_part_header.json())["detail"]["msg"]


async def test_an_upload_over_the_limit_is_413_and_the_service_goes_on(batch_service) -> None:
    client = await batch_service(warm=(), max_upload_mb=0.05)
    big = form(b"\0" * 80_000, prompt="x")
    response = await client.post("/image-to-image", data=big)
    assert response.status == 413
    assert "0.05 MiB" in (await response.json())["detail"]["msg"]

    async def chunks():
        for _ in range(20):  # no Content-Length: the limit is enforced while reading
            yield b"\0" * 8192

    streamed = await client.post(
        "/text-to-image", data=chunks(), headers={"Content-Type": "application/json"}
    )
    assert streamed.status == 413
    small = await client.post("/image-to-image", data=form(b"tiny", prompt="x"))
    assert small.status == 400  # read in full, then refused as not an image


async def test_the_token_guards_every_batch_route(batch_service) -> None:
    client = await batch_service(warm=(), auth_token="s3cret")
    for route in ("/text-to-image", "/image-to-image", "/image-to-video", "/upscale"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "s3cret"}):
            response = await client.post(route, json={"prompt": "x"}, headers=headers)
            assert response.status == 401, (route, headers)
            assert response.headers["WWW-Authenticate"] == "Bearer"
            assert "token" in (await response.json())["detail"]["msg"]
    allowed = await client.post(
        "/text-to-image", json={"prompt": 1}, headers={"Authorization": "Bearer s3cret"}
    )
    assert allowed.status == 422  # past the token check


async def test_a_missing_model_is_503_naming_the_pull_command(batch_service) -> None:
    client = await batch_service(warm=())
    response = await client.post("/text-to-image", json={"prompt": "x", "model_id": "nobody/none"})
    assert response.status == 503
    assert "Retry-After" not in response.headers  # retrying will not help
    message = (await response.json())["detail"]["msg"]
    assert "live-v2v models pull nobody/none" in message


async def test_a_cold_model_is_waited_for_on_the_first_request(batch_service) -> None:
    client = await batch_service(warm=())
    request = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    first = await client.post("/text-to-image", json=request)
    assert first.status == 200, await first.text()
    assert len((await first.json())["images"]) == 1


async def test_without_a_load_wait_a_cold_model_is_503_with_retry_after_then_served(
    batch_service,
) -> None:
    client = await batch_service(warm=(), load_wait_s=0)
    request = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    first = await client.post("/text-to-image", json=request)
    assert first.status == 503
    assert int(first.headers["Retry-After"]) >= 1
    message = (await first.json())["detail"]["msg"]
    assert message.startswith("model SG161222/RealVisXL_V4.0_Lightning is still loading; retry")

    async def served() -> bool:
        response = await client.post("/text-to-image", json=request)
        return response.status == 200

    await wait_until(served, "the model to load and serve", within=60, poll=0.2)


async def test_a_full_queue_is_503_with_retry_after(batch_service) -> None:
    client = await batch_service(warm=("text-to-image",), batch_queue=1)
    jobs = client.app[BATCH].jobs
    # Live work that holds the device until released: the first job waits behind it.
    release = threading.Event()
    holding = client.app[RUNTIME].worker().submit(release.wait, 30)
    request = {"prompt": "x", "width": 64, "height": 64, "num_inference_steps": 1}
    waiting = asyncio.ensure_future(client.post("/text-to-image", json=request))
    try:
        await wait_until(lambda: jobs.active == 1, "the first job to be queued")
        refused = await client.post("/text-to-image", json=request)
        assert refused.status == 503
        assert int(refused.headers["Retry-After"]) >= 1
        assert "queue is full" in (await refused.json())["detail"]["msg"]
    finally:
        release.set()
    assert holding.result(10)
    assert (await waiting).status == 200
    after = await client.post("/text-to-image", json=request)
    assert after.status == 200
