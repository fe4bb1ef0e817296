"""The service against Livepeer's runner spec itself (tests/data/, unmodified): schemathesis
generates requests for every batch route from the runner's OpenAPI document and sends them to
the real service with the tiny models loaded. No answer may be a server error, and every answer
the runner spec describes (its status listed there) must match the spec's schema for it.

Not checked: that every status is one the runner spec lists. The spec lists 413 and 415 only
for some routes and 503 for none, and the service answers those where the runner would too
(an upload too large, a body that is not a form, a model loading or a full queue); its own
document lists them (tests/live/test_schemathesis.py checks that). Not run either: the runner
spec's /live-video-to-video, which there is the runner mode's start (the service needs
--runner-hosts for it), and /health and the like, which tests/live covers.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

import batch
from live.settings import Settings
from tests.schemathesis_support import (
    AUTH,
    FILES,
    NOT_A_SERVER_ERROR,
    REQUEST_TIMEOUT_S,
    TOKEN,
    WARM,
    SentBefore,
    bound_work,
    event_stream_conformance,
    one_torch_thread,
    png,
    running_service,
)

schemathesis = pytest.importorskip("schemathesis")

from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.specs.openapi.checks import response_schema_conformance  # noqa: E402

RUNNER_SPEC = Path(__file__).parents[1] / "data" / "livepeer-ai-runner-openapi.yaml"
SPEC = yaml.safe_load(RUNNER_SPEC.read_text())
BATCH_OPERATIONS = [route.operation.operation_id for route in batch.ROUTES]
MAX_EXAMPLES = 25

CONFIG = {
    # As tests/live/test_schemathesis.py: the same requests on every run, no shrinking, no
    # example database in the work tree.
    "seed": 1,
    "generation": {"max-examples": MAX_EXAMPLES, "no-shrink": True, "database": "none"},
    "checks": {"not_a_server_error": NOT_A_SERVER_ERROR},
}
CHECKS = [not_a_server_error, response_schema_conformance, event_stream_conformance(SPEC)]

schema = schemathesis.openapi.from_path(
    RUNNER_SPEC, config=schemathesis.Config.from_dict(CONFIG)
).include(operation_id=BATCH_OPERATIONS)


def test_every_batch_route_is_a_runner_spec_operation() -> None:
    operations = {
        op["operationId"]: (method.upper(), path)
        for path, item in SPEC["paths"].items()
        for method, op in item.items()
    }
    for operation in (route.operation for route in batch.ROUTES):
        assert operations[operation.operation_id] == (operation.method, operation.path)
        spec_op = SPEC["paths"][operation.path][operation.method.lower()]
        assert list(spec_op["requestBody"]["content"]) == [operation.request_type]


# One valid, small request per route, for answers the generated requests rarely get: the
# runner spec bounds nothing, so most requests it calls valid are ones the service refuses
# (an empty prompt or message list, any string as a chat role, a width of 7).
PNG, WAV = FILES["image"], FILES["audio"]
VALID: list[tuple[str, dict[str, Any]]] = [
    (
        "genTextToImage",
        {"prompt": "a red square", "width": 64, "height": 64, "num_inference_steps": 2},
    ),
    ("genImageToImage", {"prompt": "make it blue", "image": PNG, "num_inference_steps": 2}),
    ("genImageToVideo", {"image": PNG, "width": 64, "height": 64, "num_inference_steps": 2}),
    ("genUpscale", {"prompt": "sharp", "image": png(16), "num_inference_steps": 2}),
    ("genLLM", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}),
    ("genLLM", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "stream": True}),
    # Found by schemathesis: a top_p too small for float32 left no token to sample (a 500).
    ("genLLM", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "top_p": 5e-324}),
    ("genAudioToText", {"audio": WAV}),
    ("genAudioToText", {"audio": WAV, "return_timestamps": "word"}),
    ("genAudioToText", {"audio": WAV, "return_timestamps": "false"}),
    ("genTextToSpeech", {"text": "Hello there."}),
    ("genImageToText", {"image": PNG}),
    ("genImageToText", {"image": PNG, "prompt": "a picture of"}),
    ("genSegmentAnything2", {"image": PNG, "point_coords": "[[32, 32]]", "point_labels": "[1]"}),
    ("genSegmentAnything2", {"image": PNG, "box": "[8, 8, 40, 40]", "multimask_output": False}),
]


@pytest.fixture(scope="module")
def service_url(tiny_models_dir: Path) -> Iterator[str]:
    settings = Settings(auth_token=TOKEN, models_dir=tiny_models_dir, warm=WARM)
    with one_torch_thread(), running_service(settings) as service:
        yield service.url


sent_before = SentBefore()


@schema.parametrize()
def test_service_answers_as_the_runner_spec_says(case: Any, service_url: str) -> None:
    bound_work(case)
    if sent_before(case):
        return
    case.call_and_validate(
        base_url=service_url, headers=AUTH, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
    )


@pytest.mark.parametrize(("operation_id", "body"), VALID)
def test_valid_requests_answer_as_the_runner_spec_says(
    operation_id: str, body: dict[str, Any], service_url: str
) -> None:
    operation = schema.find_operation_by_id(operation_id)
    case = operation.Case(body=dict(body))
    response = case.call_and_validate(
        base_url=service_url, headers=AUTH, checks=CHECKS, timeout=REQUEST_TIMEOUT_S
    )
    assert response.status_code == 200, response.text
