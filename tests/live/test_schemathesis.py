"""Property-based API tests: schemathesis sends the real service requests generated from its
/openapi.json (valid and invalid ones), and checks that no answer is a server error and that
every answer is one the document describes (its status, its body's schema).

The service runs as users run it, with a bearer token and the tiny models of every batch route
loaded at start (tests/schemathesis_support.py, shared with tests/batch/test_runner_spec.py).
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import requests

from live.openapi import openapi_document
from live.settings import Settings
from tests.schemathesis_support import (
    AUTH,
    NOT_A_SERVER_ERROR,
    REQUEST_TIMEOUT_S,
    TOKEN,
    WARM,
    SentBefore,
    bound_work,
    event_stream_conformance,
    is_positive,
    one_torch_thread,
    running_service,
)

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    response_schema_conformance,
    status_code_conformance,
)

MAX_EXAMPLES = 25

# The batch routes (JSON and multipart), the live session routes and the service's small GETs.
# Not the WebRTC and trickle routes (SDP and media bodies, the latter answered in go-livepeer's
# plain-text dialect), nor the page, the docs and the document itself.
OPERATIONS = [
    "genTextToImage",
    "genImageToImage",
    "genImageToVideo",
    "genUpscale",
    "genLLM",
    "genAudioToText",
    "genTextToSpeech",
    "genImageToText",
    "genSegmentAnything2",
    "genLiveVideoToVideo",
    "getLiveSession",
    "updateLiveSessionParams",
    "stopLiveSession",
    "listPipelines",
    "health",
    "version",
]

CONFIG = {
    # Reproducible: the same requests on every run. No shrinking (a failure is reported as
    # found) and no example database written to the work tree. Hypothesis' deadline is off
    # (schemathesis' default): a batch request runs a model.
    "seed": 1,
    "generation": {"max-examples": MAX_EXAMPLES, "no-shrink": True, "database": "none"},
    # 503 answers' bodies are still checked against the document.
    "checks": {"not_a_server_error": NOT_A_SERVER_ERROR},
}

# The document GET /openapi.json serves (the fixture checks that it is). The schema is loaded
# here, at collection, rather than from the running service through
# `schemathesis.pytest.from_fixture`: that loader reads `request.node._nodeid`, which pytest
# 9.2 no longer has (schemathesis 4.32.5). Loaded here, each operation is a test of its own.
DOCUMENT = openapi_document()
schema = schemathesis.openapi.from_dict(
    copy.deepcopy(DOCUMENT), config=schemathesis.Config.from_dict(CONFIG)
).include(operation_id=OPERATIONS)
CHECKS = [
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
    event_stream_conformance(DOCUMENT),
]

# -- Live sessions ----------------------------------------------------------------------------
# A random session id is never a session's, so only the 404 of the session routes would be
# checked: every other valid request gets the id of a session started for it (and stopped
# after it, as is every session a start request started, so that the next ones still fit
# under the service's session limit).
START_PATHS = {"/live-video-to-video", "/live-video-to-video/"}
SESSION_PATHS = {"/live-video-to-video/{id}", "/live-video-to-video/{id}/params"}
# Picks half of the cases, the same ones on every run.
_half = random.Random(1)


def start_session(url: str) -> str:
    response = requests.post(
        f"{url}/live-video-to-video", json={}, headers=AUTH, timeout=REQUEST_TIMEOUT_S
    )
    assert response.status_code == 200, response.text
    return response.json()["session_id"]


def stop_session(url: str, session_id: str) -> None:
    response = requests.delete(
        f"{url}/live-video-to-video/{session_id}", headers=AUTH, timeout=REQUEST_TIMEOUT_S
    )
    assert response.status_code in (200, 404), response.text  # 404: the request stopped it


def use_a_session(case: Any, url: str) -> str | None:
    """Start a session for `case` and put its id in the path, for every other valid case."""
    if case.path not in SESSION_PATHS:
        return None
    if not is_positive(case) or _half.random() < 0.5:
        return None
    session_id = start_session(url)
    case.path_parameters["id"] = session_id
    return session_id


# -- The service ----------------------------------------------------------------------------


async def served_document(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/openapi.json") as response:
        assert response.status == 200
        return await response.json()


@pytest.fixture(scope="module")
def service_url(tiny_models_dir: Path) -> Iterator[str]:
    settings = Settings(auth_token=TOKEN, models_dir=tiny_models_dir, warm=WARM)
    with one_torch_thread(), running_service(settings) as service:
        assert service.run(served_document(service.url)) == DOCUMENT
        yield service.url


sent_before = SentBefore()


@schema.parametrize()
def test_api_answers_as_documented(case: Any, service_url: str) -> None:
    bound_work(case)
    if sent_before(case):
        return
    session_id = use_a_session(case, service_url)
    try:
        response = case.call_and_validate(
            base_url=service_url, headers=AUTH, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
        )
        if case.path in START_PATHS and response.status_code == 200:
            stop_session(service_url, response.json()["session_id"])
    finally:
        if session_id is not None:
            stop_session(service_url, session_id)
