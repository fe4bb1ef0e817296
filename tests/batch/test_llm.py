"""`POST /llm` end to end over real HTTP, on a tiny random model of the Llama 3 architecture with
a real byte-level BPE tokenizer and chat template: the runner's completion and stream shapes,
usage that adds up, a stream that stops when its client goes away, and live frames that keep
flowing beside it.

Some tests pace the model with a forward pre-hook (`Pace`): each model call (one per token)
waits until the test lets it through, so which token the server is on is known at each moment,
on any machine and without timing. The model itself runs unchanged.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import AsyncIterator
from contextlib import aclosing
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from batch import llm
from batch.route import BATCH
from live.app import create_app
from live.keys import RUNTIME
from live.settings import Settings
from protocol.batch_api import LLMMessage, LLMRequest, LLMResponse
from protocol.client import Client, InvalidResponse, RetryPolicy, StreamError
from protocol.errors import Unavailable, error_middleware
from runtime.device import choose_device
from runtime.tiny_llm import LLAMA_31_8B_INSTRUCT, build_tiny_llama3
from tests.waiting import poll_until, wait_until

from .conftest import assert_live_kept_up, live_pair
from .test_image_routes import api

MODEL = LLAMA_31_8B_INSTRUCT
HELLO = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about the sea."},
]
GREEDY = {"messages": HELLO, "temperature": 0}


def served_model(app: web.Application) -> llm.ChatModel:
    """The service's own loaded model (warm, so `acquire` loads nothing): tests that hook it
    run the service in process (`worker_process=False`)."""
    runtime = app[RUNTIME]
    with runtime.models.acquire(runtime.key("llm", MODEL), lambda: None) as chat:
        assert isinstance(chat, llm.ChatModel)
        return chat


class Pace:
    """A forward pre-hook that lets model calls through only as the test allows: call n waits
    until `allow` has been called n times in all. Runs on the worker's thread."""

    def __init__(self) -> None:
        self.calls = 0
        self.allowed = 0
        self._changed = threading.Condition()

    def allow(self, calls: int = 1) -> None:
        with self._changed:
            self.allowed += calls
            self._changed.notify_all()

    @property
    def waiting(self) -> bool:
        """A model call is held (the one after the `allowed` ones)."""
        return self.calls > self.allowed

    def __call__(self, module: Any, args: Any) -> None:
        with self._changed:
            self.calls += 1
            if not self._changed.wait_for(lambda: self.calls <= self.allowed, timeout=60):
                raise TimeoutError("the test never let this model call through")


def events(body: str) -> list[str]:
    """The `data` of each server-sent event of a whole response body."""
    chunks = [chunk for chunk in body.split("\n\n") if chunk]
    assert all(chunk.startswith("data: ") for chunk in chunks), chunks
    assert body.endswith("\n\n")
    return [chunk.removeprefix("data: ") for chunk in chunks]


# --- completions ----------------------------------------------------------------------------


async def test_a_completion_reports_its_tokens(batch_service) -> None:
    client = await batch_service(warm=("llm",), worker_process=False)
    service = api(client)
    body = await service.llm(**GREEDY, max_tokens=12)
    assert body.model == MODEL
    assert body.id.startswith("chatcmpl-")
    (choice,) = body.choices
    assert choice.index == 0 and choice.delta is None and choice.message is not None
    assert choice.message.role == "assistant"
    usage = body.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # The prompt is the conversation through the model's chat template, and no more.
    messages = [LLMMessage.model_validate(message) for message in HELLO]
    assert usage.prompt_tokens == len(llm.prompt_ids(served_model(client.app), messages))
    # A random model rarely ends its turn; when it does not, max_tokens ends it.
    assert choice.finish_reason in ("stop", "length")
    assert 1 <= usage.completion_tokens <= 12
    assert (choice.finish_reason == "length") == (usage.completion_tokens == 12)

    # Temperature 0 takes the likeliest token each time: the same answer again.
    again = await service.llm(**GREEDY, max_tokens=12)
    assert again.choices[0].message == choice.message
    assert again.id != body.id

    sampled = await service.llm(
        messages=HELLO, temperature=1.2, top_p=0.9, top_k=40, max_tokens=5, model=MODEL
    )
    assert sampled.model == MODEL
    assert sampled.usage.total_tokens == usage.prompt_tokens + sampled.usage.completion_tokens
    assert sampled.usage.completion_tokens <= 5


async def test_a_stream_sends_the_same_answer_token_by_token(batch_service) -> None:
    client = await batch_service(warm=("llm",))
    service = api(client)
    whole = await service.llm(**GREEDY, max_tokens=16)
    chunks = [chunk async for chunk in service.llm_stream(**GREEDY, max_tokens=16)]

    *tokens, last = chunks
    assert len({chunk.id for chunk in chunks}) == 1
    assert [chunk.model for chunk in chunks] == [MODEL] * len(chunks)
    text = "".join(chunk.choices[0].delta.content for chunk in chunks)  # type: ignore[union-attr]
    assert text == whole.choices[0].message.content  # type: ignore[union-attr]
    # One event per token with the usage so far; the last with the reason and the total.
    assert [chunk.choices[0].finish_reason for chunk in tokens] == [""] * len(tokens)
    assert [chunk.usage.completion_tokens for chunk in tokens] == list(range(1, len(tokens) + 1))
    for chunk in chunks:
        assert chunk.usage.prompt_tokens == whole.usage.prompt_tokens
        assert chunk.usage.total_tokens == chunk.usage.prompt_tokens + chunk.usage.completion_tokens
        (choice,) = chunk.choices
        assert choice.message is None and choice.delta is not None
        assert choice.delta.role == "assistant"
    assert last.choices[0].finish_reason == whole.choices[0].finish_reason
    assert last.usage == whole.usage

    # On the wire: the runner's framing, then its terminator.
    response = await client.post("/llm", json={**GREEDY, "max_tokens": 16, "stream": True})
    assert response.status == 200
    assert response.content_type == "text/event-stream"
    data = events(await response.text())
    assert data[-1] == "[DONE]"
    assert len(data) == len(chunks) + 1
    final = json.loads(data[-2])
    assert final["choices"][0]["finish_reason"] == last.choices[0].finish_reason
    assert final["usage"] == last.usage.model_dump()


def end_turn_at(call: int, chat: llm.ChatModel) -> Any:
    """A forward hook making the model's `call`-th call (and every later one) choose its end
    of turn (<|eot_id|>): a model that answers briefly, which the random one rarely does."""
    eot = chat.tokenizer.convert_tokens_to_ids("<|eot_id|>")
    calls = 0

    def hook(module: Any, args: Any, output: Any) -> None:
        nonlocal calls
        calls += 1
        if calls >= call:
            output.logits[..., eot] = 1e4

    return chat.model.register_forward_hook(hook)


async def test_the_end_of_the_turn_stops_the_answer(batch_service) -> None:
    client = await batch_service(warm=("llm",), worker_process=False)
    service = api(client)
    chat = served_model(client.app)
    hook = end_turn_at(4, chat)
    try:
        body = await service.llm(**GREEDY, max_tokens=50)
        (choice,) = body.choices
        assert choice.finish_reason == "stop"
        assert body.usage.completion_tokens == 4  # three tokens of text, then the end of turn
        assert "<|eot_id|>" not in choice.message.content  # type: ignore[union-attr]
    finally:
        hook.remove()

    # An answer that ends at its first token: the stream is its last event alone.
    hook = end_turn_at(1, chat)
    try:
        response = await client.post("/llm", json={**GREEDY, "stream": True})
        assert response.status == 200
        only, done = events(await response.text())
        assert done == "[DONE]"
        chunk = json.loads(only)
        assert chunk["choices"][0]["finish_reason"] == "stop"
        assert chunk["choices"][0]["delta"] == {"role": "assistant", "content": ""}
        assert chunk["usage"]["completion_tokens"] == 1
    finally:
        hook.remove()


# --- streams that end early -----------------------------------------------------------------


@pytest.fixture
async def own_server(tiny_models_dir: Path) -> AsyncIterator[Any]:
    """Start the service with the chat model warm on a port of its own, with or without
    aiohttp's `handler_cancellation` (the CLI turns it on, as aiohttp's test server does)."""
    runners: list[web.AppRunner] = []

    async def start(handler_cancellation: bool) -> tuple[web.AppRunner, str]:
        app = create_app(Settings(models_dir=tiny_models_dir, warm="llm", worker_process=False))
        runner = web.AppRunner(app, handler_cancellation=handler_cancellation)
        runners.append(runner)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        host, port = runner.addresses[0][:2]
        return runner, f"http://{host}:{port}"

    yield start
    for runner in runners:
        await runner.cleanup()


async def wait_loaded(session: aiohttp.ClientSession) -> None:
    """Until /health, asked on `session`'s own connection, no longer says LOADING."""

    async def loaded() -> bool:
        async with session.get("/health") as response:
            return (await response.json())["status"] != "LOADING"

    await wait_until(loaded, "the chat model to load", within=60)


@pytest.mark.parametrize("handler_cancellation", [True, False])
async def test_a_client_that_goes_away_stops_the_generation(
    own_server, handler_cancellation: bool
) -> None:
    """The server hears of it at once when aiohttp cancels the handler of a client that left,
    else when it writes the next token: either way the job stops at its next token."""
    runner, url = await own_server(handler_cancellation)
    app, server = runner.app, runner.server
    assert server is not None
    jobs = app[BATCH].jobs

    def connected() -> int:
        # A connection's handler stays listed until its request is over; its transport goes
        # as soon as the server sees the client go.
        return sum(handler.transport is not None for handler in server.connections)

    async with aiohttp.ClientSession(url) as session:
        await wait_loaded(session)
        pace = Pace()
        hook = served_model(app).model.register_forward_pre_hook(pace)
        request = {**GREEDY, "max_tokens": 200, "stream": True}
        try:
            pace.allow(1)  # the first token, which starts the stream
            response = await session.post("/llm", json=request)
            assert response.status == 200
            streaming = connected()
            read = 0
            while read < 3:
                line = await response.content.readline()
                assert line, "the stream ended before its third token"
                if line.startswith(b"data: "):
                    assert json.loads(line[6:])["usage"]["completion_tokens"] == read + 1
                    read += 1
                    if read < 3:
                        pace.allow(1)
            await wait_until(lambda: pace.waiting, "the model call of the fourth token")
            response.close()  # the client goes away after three chunks
            await wait_until(lambda: connected() < streaming, "the server to see the client go")

            # The model goes on one call at a time, for as long as the job asks for calls.
            while jobs.active:
                pace.allow(1)
                await wait_until(lambda: pace.waiting or not jobs.active, "a call or the end")
        finally:
            hook.remove()
        # The call under way when the client left; without handler cancellation, perhaps one
        # more, started before the write of the one before failed; then none: not 200 tokens.
        assert read + 1 <= pace.calls <= read + (1 if handler_cancellation else 2)
        # The worker is free: the next request runs at once.
        assert jobs.active == 0
        async with session.post("/llm", json={**GREEDY, "max_tokens": 3}) as after:
            assert after.status == 200
            assert (await after.json())["usage"]["completion_tokens"] <= 3


async def test_an_error_during_a_stream_is_its_last_event(batch_service) -> None:
    client = await batch_service(warm=("llm",), worker_process=False)
    jobs = client.app[BATCH].jobs
    calls = 0

    def fail_third_call(module: Any, args: Any) -> None:
        nonlocal calls
        calls += 1
        if calls % 3 == 0:
            raise RuntimeError("the device fell off the bus")

    hook = served_model(client.app).model.register_forward_pre_hook(fail_third_call)
    try:
        response = await client.post("/llm", json={**GREEDY, "max_tokens": 20, "stream": True})
        assert response.status == 200  # sent with the first token, before the failure
        *tokens, error = events(await response.text())
        assert [json.loads(t)["usage"]["completion_tokens"] for t in tokens] == [1, 2]
        assert json.loads(error) == {"error": "Internal server error"}  # no [DONE] after it

        seen = []
        with pytest.raises(StreamError) as raised:
            async for chunk in api(client).llm_stream(**GREEDY, max_tokens=20):
                seen.append(chunk)
        assert len(seen) == 2
        assert raised.value.msg == "Internal server error"

        # The same failure without a stream is a plain 500.
        plain = await client.post("/llm", json={**GREEDY, "max_tokens": 20})
        assert plain.status == 500
        assert (await plain.json())["detail"]["msg"] == "Internal server error"
    finally:
        hook.remove()
    assert jobs.active == 0
    assert (await api(client).llm(**GREEDY, max_tokens=2)).usage.completion_tokens <= 2


def chunk_json(content: str, tokens: int, finish: str = "") -> str:
    choice = {
        "index": 0,
        "finish_reason": finish,
        "delta": {"role": "assistant", "content": content},
    }
    usage = {"prompt_tokens": 5, "completion_tokens": tokens, "total_tokens": 5 + tokens}
    body = {"id": "chatcmpl-1", "model": MODEL, "created": 1, "usage": usage, "choices": [choice]}
    return json.dumps(body)


async def test_the_client_reads_any_event_stream_and_refuses_broken_ones(aiohttp_server) -> None:
    """The typed client against a scripted server: SSE comments and multi-line data, a 503
    before the stream (retried, as every call), and streams that break the format."""
    # One event over two data lines (joined by a newline: still JSON), CRLF line ends.
    head, sep, tail = chunk_json("lo", 2, "stop").partition(', "model"')
    scripts = {
        "ok": [": a comment", "", f"data: {chunk_json('Hel', 1)}", "", "data: [DONE]", ""],
        "split": [f"data: {head}\r", f"data:{sep}{tail}\r", "\r", "data: [DONE]", ""],
        "cut": [f"data: {chunk_json('Hel', 1)}", ""],
        "not-json": ["data: {nope", ""],
        "not-a-chunk": ['data: {"id": "x"}', ""],
    }
    attempts: list[str] = []

    async def handle(request: web.Request) -> web.StreamResponse:
        script = (await request.json())["model"]
        attempts.append(script)
        if script == "ok" and attempts.count("ok") == 1:
            raise Unavailable("loading", retry_after_s=1)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for line in scripts[script]:
            await response.write(f"{line}\n".encode())
        return response

    app = web.Application(middlewares=[error_middleware])
    app.router.add_post("/llm", handle)
    server = await aiohttp_server(app)
    sleeps: list[float] = []

    async def sleep(delay: float) -> None:
        sleeps.append(delay)

    async with Client(str(server.make_url("")), retry=RetryPolicy(sleep=sleep)) as client:

        async def read(script: str) -> list[str]:
            stream = client.llm_stream(messages=HELLO, model=script)
            return [chunk.choices[0].delta.content async for chunk in stream]  # type: ignore

        assert await read("ok") == ["Hel"]
        assert sleeps == [5.0]  # the 503 was retried before the stream started
        assert await read("split") == ["lo"]
        with pytest.raises(InvalidResponse, match="before \\[DONE\\]"):
            await read("cut")
        with pytest.raises(InvalidResponse, match="not JSON"):
            await read("not-json")
        with pytest.raises(InvalidResponse, match="not a valid LLMResponse"):
            await read("not-a-chunk")


# --- refused requests -----------------------------------------------------------------------


async def test_invalid_requests_are_422_naming_the_field(batch_service) -> None:
    client = await batch_service(warm=())
    user = {"role": "user", "content": "hi"}
    cases = [
        ({}, ["body", "messages"]),
        ({"messages": []}, ["body", "messages"]),
        ({"messages": [{"role": "r" * 65, "content": "hi"}]}, ["body", "messages", 0, "role"]),
        ({"messages": [{"role": "user"}]}, ["body", "messages", 0, "content"]),
        ({"messages": [{"role": "user", "content": "\udaf8"}]}, ["body", "messages", 0, "content"]),
        ({"messages": [user], "max_tokens": 0}, ["body", "max_tokens"]),
        ({"messages": [user], "max_tokens": 100_000}, ["body", "max_tokens"]),
        ({"messages": [user], "temperature": "0.5"}, ["body", "temperature"]),
        ({"messages": [user], "temperature": 2.5}, ["body", "temperature"]),
        ({"messages": [user], "top_p": 0}, ["body", "top_p"]),
        ({"messages": [user], "top_k": -2}, ["body", "top_k"]),
        ({"messages": [user], "stream": "yes"}, ["body", "stream"]),
    ]
    for body, loc in cases:
        for stream in (False, True):  # refused before any stream: JSON either way
            sent = {**body, "stream": True} if stream and "stream" not in body else body
            response = await client.post("/llm", json=sent)
            assert response.status == 422, sent
            assert response.content_type == "application/json"
            assert [error["loc"] for error in (await response.json())["detail"]] == [loc], sent

    # The typed client refuses them before sending, and keeps llm() and llm_stream() apart.
    service = api(client)
    with pytest.raises(ValueError, match="messages"):
        await service.llm(messages=[])
    with pytest.raises(ValueError, match="llm_stream"):
        await service.llm(messages=[user], stream=True)


async def test_any_role_is_taken_as_the_runner_takes_it(batch_service) -> None:
    """`role` is any string (up to 64 characters), as the runner's: the model's chat template
    decides what it makes of a role beyond system, user and assistant."""
    client = await batch_service(warm=("llm",))
    for route in ("/llm", "/llm/"):  # the runner serves both
        body = {
            "messages": [
                {"role": "user", "content": "What is the weather?"},
                {"role": "tool", "content": "sunny"},
                {"role": "r" * 64, "content": "hi"},
            ],
            "max_tokens": 2,
        }
        response = await client.post(route, json=body)
        assert response.status == 200, await response.text()
        answer = LLMResponse.model_validate(await response.json())
        assert answer.usage.completion_tokens <= 2
        assert answer.choices[0].message is not None
        assert answer.choices[0].message.role == "assistant"


async def test_a_prompt_past_the_model_context_is_a_400_before_any_stream(batch_service) -> None:
    client = await batch_service(warm=("llm",))
    long = [{"role": "user", "content": "lighthouse " * 400}]
    for stream in (False, True):
        response = await client.post(
            "/llm", json={"messages": long, "max_tokens": 256, "stream": stream}
        )
        assert response.status == 400
        assert response.content_type == "application/json"
        message = (await response.json())["detail"]["msg"]
        assert "passes the model's context of 1024 tokens" in message
    # Asking for fewer tokens makes it fit.
    short = [{"role": "user", "content": "lighthouse " * 100}]
    assert (await api(client).llm(messages=short, max_tokens=2)).usage.completion_tokens <= 2


@pytest.fixture
def odd_chat_models(tiny_models_dir: Path) -> tuple[str, str]:
    """Two variants of the tiny chat model, in the models directory under ids of their own:
    one whose template refuses a system turn (as some models' templates do), one with no chat
    template at all (a base model)."""
    strict_id, base_id = "test/strict-chat", "test/base-llm"
    if not (tiny_models_dir / strict_id).exists():
        strict = build_tiny_llama3(tiny_models_dir / strict_id)
        refuse = (
            "{%- if messages[0]['role'] == 'system' %}"
            "{{- raise_exception('System role not supported') }}{%- endif %}"
        )
        template = strict / "chat_template.jinja"
        template.write_text(refuse + template.read_text())
        base = build_tiny_llama3(tiny_models_dir / base_id)
        (base / "chat_template.jinja").unlink()
    return strict_id, base_id


async def test_models_that_cannot_chat_are_refused_clearly(batch_service, odd_chat_models) -> None:
    strict, base = odd_chat_models
    client = await batch_service(warm=())
    service = api(client)  # waits out each model's load (503 with Retry-After)
    refused = await client.post("/llm", json={"messages": HELLO, "model": "nobody/none"})
    assert refused.status == 503
    assert "live-v2v models pull nobody/none" in (await refused.json())["detail"]["msg"]

    user_only = await service.llm(messages=HELLO[1:], model=strict, max_tokens=2)
    assert user_only.model == strict
    for stream in (False, True):
        body = {"messages": HELLO, "model": strict, "stream": stream}
        response = await client.post("/llm", json=body)
        assert response.status == 400
        assert "System role not supported" in (await response.json())["detail"]["msg"]

    async def base_model_refused() -> bool:
        response = await client.post("/llm", json={"messages": HELLO, "model": base})
        if response.status == 503 and "Retry-After" in response.headers:
            return False  # still loading
        assert response.status == 503
        assert "has no chat template" in (await response.json())["detail"]["msg"]
        return True

    await wait_until(base_model_refused, "the base model's load to fail", within=60)


# --- the token loop's parts -----------------------------------------------------------------


def test_text_comes_out_in_whole_characters(tiny_models_dir: Path) -> None:
    chat = llm.load(tiny_models_dir / MODEL, choose_device("cpu"))
    text = "café ✓ 日本語 🙂 naïve — ½"
    ids = chat.tokenizer(text, add_special_tokens=False)["input_ids"]
    incremental = llm.IncrementalText(chat.tokenizer)
    pieces = [incremental.push(token) for token in ids]
    assert "".join(pieces) + incremental.rest() == text
    assert incremental.rest() == ""
    assert not any("\ufffd" in piece for piece in pieces)
    assert "" in pieces  # some characters did span tokens, and waited for their last byte

    # Cut in the middle of a character, the rest is what there is: the replacement character.
    incremental = llm.IncrementalText(chat.tokenizer)
    cut = chat.tokenizer("🙂", add_special_tokens=False)["input_ids"][:-1]
    assert [incremental.push(token) for token in cut] == [""] * len(cut)
    assert incremental.rest().endswith("\ufffd")


def test_sampling_keeps_to_top_k_and_top_p() -> None:
    import torch

    logits = torch.tensor([0.0, 3.0, 2.9, 1.0, -1.0])
    generator = torch.Generator().manual_seed(0)

    def draws(**fields: Any) -> set[int]:
        request = LLMRequest(messages=[LLMMessage(role="user", content="x")], **fields)
        return {llm.next_token(logits, request, generator) for _ in range(200)}

    assert draws(temperature=0) == {1}
    assert draws(temperature=1.5, top_k=1) == {1}
    assert draws(temperature=1.5, top_k=2) == {1, 2}
    assert draws(temperature=1.5, top_p=0.01) == {1}
    # 1 and 2 hold about 0.70 of the mass at temperature 1: both, and only they, make 0.6.
    assert draws(temperature=1.0, top_p=0.6) == {1, 2}
    assert draws(temperature=2.0, top_k=-1) == {0, 1, 2, 3, 4}


# --- beside live video ----------------------------------------------------------------------

STREAMED_TOKENS = 24


async def test_live_output_flows_while_an_llm_streams(batch_service) -> None:
    # In process on purpose: live frames and the batch job share this process's device worker
    # (batch jobs run in process until they move to the worker process).
    client = await batch_service(warm=("llm",), device="cpu", worker_process=False)
    worker = client.app[RUNTIME].worker()
    pace = Pace()
    hook = served_model(client.app).model.register_forward_pre_hook(pace)
    pacing: asyncio.Task[None] | None = None
    async with live_pair(client, frames=900) as live:  # 30 s: outlasts the stream

        async def a_token_per_noop_frame() -> None:
            # The noop stream's frames are the clock: a token per frame, about 30 per second
            # as an 8B model on a GPU, so the stream spans STREAMED_TOKENS frames anywhere.
            seen = live.noop.frames_out
            while True:
                await poll_until(lambda seen=seen: live.noop.frames_out > seen, within=60)
                seen = live.noop.frames_out
                pace.allow(1)

        try:
            before, live_before = live.counts(), worker.done_live
            pacing = asyncio.create_task(a_token_per_noop_frame())
            request = {**GREEDY, "max_tokens": STREAMED_TOKENS}
            async with aclosing(api(client).llm_stream(**request)) as stream:
                chunks = [chunk async for chunk in stream]
            after = live.counts()
            assert live.still_publishing(), "the clip ended before the stream"
        finally:
            if pacing is not None:
                pacing.cancel()
                await asyncio.gather(pacing, return_exceptions=True)
            hook.remove()

    assert chunks[-1].usage.completion_tokens == pace.calls
    assert worker.done_live > live_before
    assert_live_kept_up(worker, before, after)


async def test_a_cancelled_job_keeps_its_model_until_its_thread_is_out(own_server) -> None:
    """Issue 18, finding 20: a client that leaves mid-answer cancels its handler at once, but
    the job's thread is still inside the model: the model stays leased (never evicted under
    it) until that thread is out, then it is given back."""
    runner, url = await own_server(True)
    app = runner.app
    models = app[RUNTIME].models

    def users() -> int:
        return sum(m.users for m in models.models() if m.key.kind == "llm")

    async with aiohttp.ClientSession(url) as session:
        await wait_loaded(session)
        pace = Pace()
        hook = served_model(app).model.register_forward_pre_hook(pace)
        try:
            asking = asyncio.create_task(session.post("/llm", json=GREEDY))
            await wait_until(lambda: pace.waiting, "the model call of the first token")
            assert users() == 1
            asking.cancel()  # the client goes away while the worker is inside the model
            await asyncio.gather(asking, return_exceptions=True)
            # The handler's part of the job ends when aiohttp cancels it.
            await wait_until(lambda: app[BATCH].jobs.active == 0, "the handler to be cancelled")
            assert pace.waiting, "the job's thread is still inside the model"
            assert users() == 1, "the model was given back while a job still ran on it"
        finally:
            pace.allow(1000)
            hook.remove()
        await wait_until(lambda: users() == 0, "the job's thread to give the model back")
