"""Issue 18, finding 3 on the batch routes: JSON nested past the bounded reader's depth, in a
body or in a form field that carries JSON, is a 4xx naming the field, never a 500."""

from __future__ import annotations

from aiohttp import FormData

from protocol.bounded_json import JSON_MAX_DEPTH

from .audio_clips import WAV, tone
from .conftest import png
from .test_audio_routes import audio_form
from .test_image_routes import form

PAST_PYTHON = 1_100
"""Deeper than Python's recursion limit: what raised RecursionError (a 500) before."""
PAST_BOUND = JSON_MAX_DEPTH + 1
"""Just past the reader's bound: parsed before, refused now."""


def nested_array(depth: int) -> str:
    return "[" * depth + "]" * depth


def nested_object(depth: int) -> str:
    return '{"a":' * depth + "1" + "}" * depth


async def only_error(response) -> dict:  # type: ignore[no-untyped-def]
    assert response.status == 422, await response.text()
    (error,) = (await response.json())["detail"]
    return error


async def test_audio_to_text_metadata_nested_too_deeply_is_422(batch_service) -> None:
    client = await batch_service(warm=())
    audio = tone(WAV, 1.0, 8_000)
    for depth in (PAST_PYTHON, PAST_BOUND):
        data = audio_form(audio, metadata=nested_object(depth))
        error = await only_error(await client.post("/audio-to-text", data=data))
        assert error["loc"] == ["body", "metadata"]
        assert "nested too deeply" in error["msg"]
    # Within the bound it is taken as before.
    data = audio_form(audio, metadata=nested_object(3))
    response = await client.post("/audio-to-text", data=data)
    assert response.status == 200, await response.text()


async def test_segment_anything_2_prompts_nested_too_deeply_are_422(batch_service) -> None:
    client = await batch_service(warm=())
    for field in ("point_coords", "point_labels", "box", "mask_input"):
        for depth in (PAST_PYTHON, PAST_BOUND):
            data = form(png(96, 64), **{field: nested_array(depth)})
            response = await client.post("/segment-anything-2", data=data)
            assert response.status == 422, await response.text()
            errors = (await response.json())["detail"]
            assert [e["loc"] for e in errors if "nested" in e["msg"]] == [["body", field]]


async def test_llm_history_and_json_bodies_nested_too_deeply_are_refused(batch_service) -> None:
    client = await batch_service(warm=())
    for depth in (PAST_PYTHON, PAST_BOUND):
        data = FormData({"prompt": "hi", "history": nested_array(depth)})
        error = await only_error(await client.post("/api/beta/generate/llm", data=data))
        assert error["loc"] == ["body", "history"]
        assert "nested too deeply" in error["msg"]
        body = '{"messages": ' + nested_array(depth) + "}"
        response = await client.post(
            "/llm", data=body, headers={"Content-Type": "application/json"}
        )
        assert response.status == 400, await response.text()
        assert "nested too deeply" in (await response.json())["detail"]["msg"]
