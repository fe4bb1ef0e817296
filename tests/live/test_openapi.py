"""The OpenAPI document at /openapi.json and the docs page at /docs, read from the real service
over HTTP: every route is in it, every reference resolves, the batch bodies are the runner
spec's, and the document is valid OpenAPI 3.1."""

from __future__ import annotations

import hashlib
import re
from base64 import b64encode
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web

from live.app import create_app
from live.settings import Settings
from protocol.openapi import openapi_path

TOKEN = "docs-token"
RUNNER_SPEC = Path(__file__).parents[1] / "data" / "livepeer-ai-runner-openapi.yaml"
METHODS = {"get", "put", "post", "delete", "options", "head", "patch", "trace"}

# The runner spec's request body schemas, and the route whose body each one is.
SPEC_BODIES = {
    "TextToImageParams": "/text-to-image",
    "Body_genImageToImage": "/image-to-image",
    "Body_genImageToVideo": "/image-to-video",
    "Body_genUpscale": "/upscale",
    "Body_genAudioToText": "/audio-to-text",
    "TextToSpeechParams": "/text-to-speech",
    "Body_genImageToText": "/image-to-text",
    "Body_genSegmentAnything2": "/segment-anything-2",
    "LLMRequest": "/llm",
}


@pytest.fixture(scope="module")
def runner_spec() -> dict[str, Any]:
    return yaml.safe_load(RUNNER_SPEC.read_text())  # tests/data/README.md says where from


async def start(aiohttp_client: Any, **settings: Any) -> Any:
    app = create_app(Settings(auth_token=TOKEN, **settings))
    return await aiohttp_client(app)


async def fetch_document(client: Any) -> dict[str, Any]:
    response = await client.get("/openapi.json")  # no token: the document is public
    assert response.status == 200
    assert response.content_type == "application/json"
    return await response.json()


def router_routes(app: web.Application) -> set[tuple[str, str]]:
    """(METHOD, OpenAPI path) of every route the app answers, its sub-apps' included."""
    routes = set()
    for route in app.router.routes():
        if route.method == "HEAD":
            continue  # aiohttp adds HEAD beside every GET by itself; the document lists GETs
        resource = route.resource
        assert resource is not None
        if isinstance(resource, web.StaticResource):
            # A static folder is one resource answering every file below its prefix.
            path = resource.canonical.rstrip("/") + "/{filename}"
        else:
            path = openapi_path(resource.canonical)
        routes.add((route.method, path))
    for resource in app.router.resources():
        if isinstance(resource, web.PrefixedSubAppResource):
            # The sub-app's resources carry the prefix already (aiohttp adds it on mounting).
            routes |= router_routes(resource._app)
    return routes


def document_routes(document: dict[str, Any]) -> set[tuple[str, str]]:
    return {
        (method.upper(), path)
        for path, item in document["paths"].items()
        for method in item
        if method in METHODS
    }


@pytest.mark.parametrize("base", ["/trickle/", "/ai/trickle/"])
async def test_document_lists_every_route_of_the_service(aiohttp_client, base: str) -> None:
    client = await start(aiohttp_client, trickle_base_path=base)
    document = await fetch_document(client)
    served = router_routes(client.app)
    documented = document_routes(document)
    assert served - documented == set(), "routes missing from the document"
    assert documented - served == set(), "documented routes the service does not have"
    # The trickle routes follow the configured base path.
    assert ("GET", f"{base}{{channel}}/{{seq}}") in documented


async def test_document_is_built_once_and_needs_no_token(aiohttp_client) -> None:
    client = await start(aiohttp_client)
    first = await client.get("/openapi.json")
    second = await client.get("/openapi.json")
    assert first.status == second.status == 200
    assert await first.read() == await second.read()
    # An API route beside it does want the token.
    refused = await client.post("/live-video-to-video", json={})
    assert refused.status == 401


def references(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["$ref"]] if isinstance(node.get("$ref"), str) else []
        return found + [ref for value in node.values() for ref in references(value)]
    if isinstance(node, list):
        return [ref for value in node for ref in references(value)]
    return []


def resolve(document: dict[str, Any], ref: str) -> Any:
    assert ref.startswith("#/"), f"{ref}: only local references are expected"
    node: Any = document
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        assert isinstance(node, dict) and part in node, f"{ref} does not resolve"
        node = node[part]
    return node


async def test_every_reference_resolves(aiohttp_client) -> None:
    document = await fetch_document(await start(aiohttp_client))
    refs = references(document)
    assert refs
    for ref in set(refs):
        assert ref.startswith("#/components/schemas/")
        assert isinstance(resolve(document, ref), dict)
    # And nothing pydantic left under its own $defs.
    assert "$defs" not in str(document)


async def test_layout_follows_the_runner_spec(aiohttp_client, runner_spec) -> None:
    document = await fetch_document(await start(aiohttp_client))
    assert document["openapi"] == "3.1.0"
    assert document["info"]["title"] == "live-v2v"
    assert document["components"]["securitySchemes"] == {
        "HTTPBearer": {"type": "http", "scheme": "bearer"}
    }
    ours, theirs = document["paths"], runner_spec["paths"]
    for path in SPEC_BODIES.values():
        op, expected = ours[path]["post"], theirs[path]["post"]
        assert op["operationId"] == expected["operationId"]
        assert op["tags"] == expected["tags"]
        assert op["security"] == expected["security"] == [{"HTTPBearer": []}]
        assert op["requestBody"]["content"].keys() == expected["requestBody"]["content"].keys()
        assert op["responses"]["200"] == {
            "description": "Successful Response",
            "content": {
                "application/json": {
                    "schema": {
                        "$ref": expected["responses"]["200"]["content"]["application/json"][
                            "schema"
                        ]["$ref"]
                    }
                }
            },
        }
        for code, answer in expected["responses"].items():
            assert op["responses"][code]["content"] == answer["content"] or code == "200"
        # Ours beyond the spec: 503 (a model loading, the queue full), with Retry-After.
        assert "Retry-After" in op["responses"]["503"]["headers"]
    start_op = ours["/live-video-to-video"]["post"]
    assert start_op["operationId"] == theirs["/live-video-to-video"]["post"]["operationId"]
    for path in ("/health", "/version", "/hardware/info", "/hardware/stats"):
        assert ours[path]["get"]["operationId"] == theirs[path]["get"]["operationId"]
        assert "security" not in ours[path]["get"]
    # Path parameters come from the {id} segments.
    status = ours["/live-video-to-video/{id}"]["get"]
    assert status["parameters"][0] | {"description": ""} == {
        "name": "id",
        "in": "path",
        "required": True,
        "description": "",
        "schema": {"type": "string"},
    }
    # Non-JSON bodies say so: WHIP's SDP, trickle's plain-text errors.
    whip = ours["/live-video-to-video/whip"]["post"]
    sdp = {"application/sdp": {"schema": {"type": "string"}}}
    assert whip["requestBody"]["content"] == whip["responses"]["201"]["content"] == sdp
    segment = ours["/trickle/{channel}/{seq}"]["get"]
    assert "security" not in segment
    assert segment["responses"]["404"]["content"] == {"text/plain": {"schema": {"type": "string"}}}


def body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    (media,) = document["paths"][path]["post"]["requestBody"]["content"].values()
    return resolve(document, media["schema"]["$ref"])


def defaults(schema: dict[str, Any]) -> dict[str, Any]:
    # The runner's spec gives no default for its optional `seed` (FastAPI omits a None
    # default); pydantic writes `default: null`: both mean "absent: none".
    return {
        name: prop.get("default")
        for name, prop in schema["properties"].items()
        if prop.get("default") is not None
    }


@pytest.mark.parametrize(("spec_name", "path"), sorted(SPEC_BODIES.items()))
async def test_batch_bodies_match_the_runner_spec(
    aiohttp_client, runner_spec, spec_name, path
) -> None:
    document = await fetch_document(await start(aiohttp_client))
    expected = runner_spec["components"]["schemas"][spec_name]
    ours = body_schema(document, path)
    assert list(ours["properties"]) == list(expected["properties"])
    assert defaults(ours) == defaults(expected)
    assert set(ours.get("required", [])) == set(expected.get("required", []))
    # Multipart bodies upload a file (an image, audio): a binary string in both documents.
    (media_type,) = document["paths"][path]["post"]["requestBody"]["content"]
    files = [
        name for name, prop in expected["properties"].items() if prop.get("format") == "binary"
    ]
    assert bool(files) == (media_type == "multipart/form-data")
    for name in files:
        assert ours["properties"][name] | {"description": ""} == {
            "type": "string",
            "format": "binary",
            "title": expected["properties"][name]["title"],
            "description": "",
        }


async def test_document_is_valid_openapi(aiohttp_client) -> None:
    schemathesis = pytest.importorskip("schemathesis")
    document = await fetch_document(await start(aiohttp_client))
    schema = schemathesis.openapi.from_dict(document)
    schema.validate()  # against the OpenAPI 3.1 meta-schema; raises on any violation
    labels = {result.ok().label for result in schema.get_all_operations()}
    assert len(labels) == len(document_routes(document))


async def test_documented_security_is_what_the_routes_ask(aiohttp_client) -> None:
    """Each operation the document marks with HTTPBearer refuses a request without the token
    before anything else; the public ones never ask for it."""
    client = await start(aiohttp_client)
    document = await fetch_document(client)
    for path, item in document["paths"].items():
        for method, op in item.items():
            url = re.sub(r"\{[^}]+\}", "x", path)
            if "security" in op:
                response = await client.request(method.upper(), url)
                assert response.status == 401, f"{method.upper()} {path}"
                assert (await response.json())["detail"]["msg"]
            elif path in ("/health", "/version", "/pipelines", "/openapi.json", "/docs"):
                response = await client.request(method.upper(), url)
                assert response.status == 200, f"{method.upper()} {path}"


async def test_docs_page_lists_the_operations(aiohttp_client) -> None:
    client = await start(aiohttp_client)
    response = await client.get("/docs")  # no token
    assert response.status == 200
    assert response.content_type == "text/html"
    page = await response.text()
    (script,) = re.findall(r"<script>(.*?)</script>", page, re.S)
    assert 'fetch("openapi.json")' in script
    assert "listOperations" in script
    # Self-contained: nothing loaded from elsewhere, and the page's policy lets exactly its
    # own inline script and style run (by their hashes).
    assert "http://" not in page and "https://" not in page and " src=" not in page
    (style,) = re.findall(r"<style>(.*?)</style>", page, re.S)
    policy = response.headers["Content-Security-Policy"]
    for source in (script, style):
        digest = b64encode(hashlib.sha256(source.encode()).digest()).decode()
        assert f"'sha256-{digest}'" in policy
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
