"""Livepeer Studio's SDKs, unchanged: the JavaScript one (npm `livepeer` 3.5.0, whose `generate`
namespace posts to `/api/generate/...`) run by Node against the service, every method of its
`generate` namespace parsed by its own zod schemas; and the request shape of the Python one
(PyPI `livepeer` 0.3.0, `/api/beta/generate/...`), sent over plain HTTP: that package pins
pydantic below 2.10 and httpx below 0.28, so it cannot be installed beside this service.

The JavaScript SDK comes from tests/batch/studio_sdk/package-lock.json:
`npm ci --prefix tests/batch/studio_sdk` (CI runs it)."""

from __future__ import annotations

import asyncio
import io
import json
import re
import shutil
from pathlib import Path

import av
import httpx
import numpy as np
import pytest
from aiohttp import FormData

from protocol.client import data_url_bytes

from .audio_clips import WAV, tone
from .conftest import png

TOKEN = "studio-token"
SDK_DIR = Path(__file__).parent / "studio_sdk"


async def run_generate(url: str, folder: Path) -> dict:
    node = shutil.which("node")
    if node is None or not (SDK_DIR / "node_modules" / "livepeer").is_dir():
        pytest.fail(f"Node and the Studio SDK are needed: npm ci --prefix {SDK_DIR}")
    script = SDK_DIR / "generate.mjs"
    process = await asyncio.create_subprocess_exec(
        node, str(script), url, TOKEN, str(folder),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 300)
    assert process.returncode == 0, err.decode()
    return json.loads(out)


def image_size(url: str) -> tuple[int, int]:
    from PIL import Image

    mime, data = data_url_bytes(url)
    assert mime == "image/png"
    return Image.open(io.BytesIO(data)).size


async def test_every_generate_method_of_the_javascript_sdk_parses(
    batch_service, tmp_path: Path
) -> None:
    client = await batch_service(warm=(), auth_token=TOKEN)  # cold: each call waits its load
    (tmp_path / "in.png").write_bytes(png(64, 64))
    (tmp_path / "tone.wav").write_bytes(tone(WAV, 2.0, 16_000))
    results = await run_generate(str(client.make_url("")).rstrip("/"), tmp_path)
    failed = {name: r["error"] for name, r in results.items() if "error" in r}
    assert not failed
    parsed = {name: r["parsed"] for name, r in results.items()}
    assert set(parsed) == {
        "textToImage", "imageToImage", "imageToVideo", "upscale", "audioToText",
        "segmentAnything2", "llm",
    }  # fmt: skip

    (image,) = parsed["textToImage"]["imageResponse"]["images"]
    assert image["seed"] == 7 and image_size(image["url"]) == (64, 64)
    (image,) = parsed["imageToImage"]["imageResponse"]["images"]
    assert image["seed"] == 3 and image_size(image["url"]) == (64, 64)
    (image,) = parsed["upscale"]["imageResponse"]["images"]
    assert image_size(image["url"]) == (256, 256)

    (video,) = parsed["imageToVideo"]["videoResponse"]["images"]
    async with httpx.AsyncClient() as http:
        response = await http.get(video["url"])
    assert response.status_code == 200
    with av.open(io.BytesIO(response.content)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    assert len(frames) > 1 and frames[0].shape == (64, 64, 3)

    text = parsed["audioToText"]["textResponse"]
    assert isinstance(text["text"], str) and isinstance(text["chunks"], list)
    masks = parsed["segmentAnything2"]["masksResponse"]
    assert np.array(json.loads(masks["masks"])).shape == (1, 64, 64)
    llm = parsed["llm"]["llmResponse"]
    assert isinstance(llm["response"], str) and llm["tokensUsed"] > 0


# --- Studio's older /llm form, as its Python SDK (livepeer 0.3.0) sends it ------------------


def studio_llm_form(**fields: str) -> FormData:
    form = FormData()
    for name, value in fields.items():
        form.add_field(name, value)
    return form


async def test_the_studio_llm_form_is_answered_in_its_shape(batch_service) -> None:
    client = await batch_service(warm=("llm",), auth_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    history = json.dumps(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    )
    for prefix in ("/api/beta/generate", "/api/generate"):
        response = await client.post(
            f"{prefix}/llm",
            data=studio_llm_form(
                prompt="And now?", system_msg="Be brief.", history=history, max_tokens="3"
            ),
            headers=auth,
        )
        assert response.status == 200, await response.text()
        body = await response.json()
        assert set(body) == {"response", "tokens_used"}
        assert isinstance(body["response"], str)
        # The prompt (four turns through the chat template) and at most 3 generated tokens.
        assert 4 < body["tokens_used"]

    # JSON on the same route is the runner's chat completion.
    chat = await client.post(
        "/api/beta/generate/llm",
        json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2},
        headers=auth,
    )
    assert chat.status == 200
    assert (await chat.json())["choices"][0]["message"]["role"] == "assistant"


async def test_a_bad_studio_llm_form_names_the_field(batch_service) -> None:
    client = await batch_service(warm=(), auth_token=TOKEN)
    auth = {"Authorization": f"Bearer {TOKEN}"}
    url = "/api/beta/generate/llm"
    history = ["body", "history"]
    cases = [
        ({"prompt": "x", "history": "[1,"}, history, "history is not valid JSON"),
        ({"prompt": "x", "history": '{"role": "user"}'}, history, "must be a JSON array"),
        ({"prompt": "x", "history": '[{"role": "user"}]'}, [*history, "content"], "required"),
        ({"history": "[]"}, ["body", "prompt"], "Field required"),
    ]
    for fields, loc, expected in cases:
        response = await client.post(url, data=studio_llm_form(**fields), headers=auth)
        assert response.status == 422, fields
        (error,) = (await response.json())["detail"]
        assert error["loc"] == loc and expected in error["msg"], error
    streamed = await client.post(url, data=studio_llm_form(prompt="x", stream="true"), headers=auth)
    assert streamed.status == 400
    assert "stream is taken with a JSON body" in (await streamed.json())["detail"]["msg"]


def readme_js_recipe() -> str:
    """The README's JavaScript block that uses the Studio SDK (other blocks are browser code)."""
    text = (Path(__file__).parents[2] / "README.md").read_text()
    blocks = [block.split("```", 1)[0] for block in text.split("```js\n")[1:]]
    (recipe,) = [block for block in blocks if 'from "livepeer"' in block]
    return recipe


async def test_the_readme_javascript_recipe_runs_as_written(batch_service, tmp_path: Path) -> None:
    """README's lines with the address and token put in, sizes for tiny models on a CPU, and
    a line printing what the SDK parsed; run beside the SDK's node_modules, where Node
    resolves `livepeer`."""
    client = await batch_service(warm=(), auth_token=TOKEN)
    code = (
        readme_js_recipe()
        .replace("http://127.0.0.1:8000", str(client.make_url("")).rstrip("/"))
        .replace('"TOKEN"', json.dumps(TOKEN))
    ) + "console.log(JSON.stringify(imageResponse));\n"
    code = re.sub(r"(width|height): \d+", r"\1: 64", code)  # tiny models on a CPU
    node = shutil.which("node")
    if node is None or not (SDK_DIR / "node_modules" / "livepeer").is_dir():
        pytest.fail(f"Node and the Studio SDK are needed: npm ci --prefix {SDK_DIR}")
    script = SDK_DIR / f"readme-{tmp_path.name}.mjs"
    script.write_text(code)
    try:
        process = await asyncio.create_subprocess_exec(
            node, str(script), stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
        )
        out, err = await asyncio.wait_for(process.communicate(), 300)
    finally:
        script.unlink()
    assert process.returncode == 0, err.decode()
    (image,) = json.loads(out)["images"]
    assert image_size(image["url"]) == (64, 64)
