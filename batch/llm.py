"""`POST /llm`: chat completions from a causal language model (transformers), in the runner's
shapes (ai-runner runner/app/routes/llm.py and pipelines/llm.py, which use vLLM).

The model runs on the device's inference worker like every batch job, one token per step: the
token loop calls the job's gate between tokens, so live frames wait at most one token, and a
streamed answer whose client went away stops at its next token. Without `stream` the answer is
one `LLMResponse` with the whole message; with it, server-sent events as the runner sends them:

    data: {"id": "chatcmpl-...", ..., "choices": [{"index": 0, "finish_reason": "",
           "delta": {"role": "assistant", "content": " the"}}],
           "usage": {"prompt_tokens": 12, "completion_tokens": 1, "total_tokens": 13}}
    ...                                    one event per generated token, usage so far
    data: {..., "choices": [{"index": 0, "finish_reason": "stop", "delta": {...}}], ...}
    data: [DONE]

The last event carries `finish_reason` ("stop" at the end of the turn, "length" at
`max_tokens`, as OpenAI says; the runner says "stop" for both) and the final usage.

A choice leaves out the one of `delta` and `message` it does not carry. The runner writes it
as null, but its spec types both as an `LLMMessage` object (not nullable), and the spec is the
reference (tests/batch/test_runner_spec.py); a client reading either key gets "no message" from
an absent key just as from a null.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
import time
import uuid
from collections.abc import Generator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from protocol.batch_api import (
    LLMChoice,
    LLMMessage,
    LLMRequest,
    LLMResponse,
    LLMTokenUsage,
    StudioLLMForm,
    StudioLLMResponse,
)
from protocol.errors import InvalidFields, InvalidRequest, ServiceError, in_words
from runtime.device import DeviceSpec

from .jobs import StepGate, drive
from .models import quiet_loading
from .route import BatchRoute, BatchState, batch_state, parse_form, parse_json, run_on_model
from .uploads import MULTIPART, URLENCODED

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "meta-llama/Meta-Llama-3.1-8B-Instruct"

GREEDY_BELOW = 1e-5
"""Temperatures under this pick the likeliest token (as vLLM does): dividing logits by a
temperature this small overflows."""


# --- the model ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ChatModel:
    """A loaded causal LM with what the token loop needs to know about it."""

    model: Any
    tokenizer: Any
    stop_ids: frozenset[int]
    """Tokens that end the answer: the tokenizer's eos and the generation config's (Llama 3.1
    Instruct stops on <|eot_id|> and <|end_of_text|>)."""
    context: int
    """Positions the model has: the prompt and the answer together must fit."""
    cache_arg: str
    """The forward() keyword of the KV cache: `cache` in newer transformers 5.x releases,
    `past_key_values` before."""


def load(path: Path, spec: DeviceSpec) -> ChatModel:
    quiet_loading()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if not tokenizer.chat_template:
        # Refused at load, so the 503 says why and no request gets as far as a raw prompt.
        raise ValueError(f"{path.name} has no chat template: it is not a chat model")
    # Straight onto the device: an 8B model in fp16 is 16 GB that need not pass through RAM.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=spec.dtype, device_map=spec.device)
    model.eval()
    stop_ids = {
        *_token_ids(tokenizer.eos_token_id),
        *_token_ids(getattr(model.generation_config, "eos_token_id", None)),
        *_token_ids(model.config.eos_token_id),
    }
    context = getattr(model.config, "max_position_embeddings", None) or tokenizer.model_max_length
    parameters = inspect.signature(model.forward).parameters
    cache_arg = "cache" if "cache" in parameters else "past_key_values"
    return ChatModel(model, tokenizer, frozenset(stop_ids), int(context), cache_arg)


def _token_ids(value: int | list[int] | None) -> list[int]:
    """A config's `eos_token_id`: one id, a list of them, or none."""
    if value is None:
        return []
    return list(value) if isinstance(value, list) else [value]


# --- generation (on the worker's thread) ----------------------------------------------------


@dataclass(frozen=True)
class Progress:
    """One generated token, as the stream reports it."""

    text: str
    """The text it completes; "" while a character is still incomplete, or for a special token."""
    prompt_tokens: int
    completion_tokens: int
    """Tokens generated so far, this one included."""


@dataclass(frozen=True)
class Completion:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" or "length"
    rest: str = ""
    """Text that no `Progress` carried: the end of a character the model never completed.
    Included in `text`; a stream sends it with the last event."""


class IncrementalText:
    """Generated tokens to text, piece by piece, never splitting a character: a byte-level
    tokenizer's token can be half of a UTF-8 character, which decodes to U+FFFD until the next
    token completes it. Decoding a window of a few tokens (rather than each token alone) also
    keeps the spaces that sentencepiece tokenizers derive from the token before; this is the
    approach of transformers' TextStreamer and vLLM's detokenizer."""

    def __init__(self, tokenizer: Any) -> None:
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix = 0  # start of the window, for context
        self._read = 0  # tokens whose text was handed out

    def push(self, token: int) -> str:
        """The new text that `token` completes ("" when none is complete yet)."""
        self._ids.append(token)
        done = self._decode(self._prefix, self._read)
        text = self._decode(self._prefix, len(self._ids))
        if len(text) <= len(done) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(done) :]

    def rest(self) -> str:
        """What is left once no token follows (an incomplete character, as U+FFFD)."""
        done = self._decode(self._prefix, self._read)
        return self._decode(self._prefix, len(self._ids))[len(done) :]

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=True)


def prompt_ids(chat: ChatModel, messages: list[LLMMessage]) -> list[int]:
    """The conversation through the model's chat template, ready for the assistant's turn."""
    from jinja2 import TemplateError

    try:
        # The runner leaves out add_generation_prompt; without it the model would go on
        # writing the user's turn rather than answer it.
        text = chat.tokenizer.apply_chat_template(
            [message.model_dump() for message in messages],
            tokenize=False,
            add_generation_prompt=True,
        )
    except TemplateError as exc:  # templates raise for what they refuse (roles out of turn)
        msg = f"the model's chat template refused the messages: {in_words(exc)}"
        raise InvalidRequest(msg) from exc
    # The template writes the special tokens (<|begin_of_text|>) itself.
    return list(chat.tokenizer(text, add_special_tokens=False)["input_ids"])


def next_token(logits: Any, request: LLMRequest, generator: Any) -> int:
    """The next token from the last position's logits: the likeliest at temperature 0, else
    sampled after temperature, top-k and top-p (nucleus) filtering."""
    import torch

    if request.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    logits = logits.float() / request.temperature
    if 0 < request.top_k < logits.numel():
        kth = torch.topk(logits, request.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if request.top_p < 1.0:
        ordered, order = torch.sort(logits, descending=True)
        probs = ordered.softmax(-1)
        # Keep the likeliest tokens until their mass reaches top_p; the first always stays.
        outside = probs.cumsum(-1) - probs >= request.top_p
        # Set, not left to the sum: a top_p below float32's smallest number (5e-324 is a
        # valid top_p) compares as 0, which left no token at all (a 500).
        outside[0] = False
        logits = logits.scatter(0, order, ordered.masked_fill(outside, float("-inf")))
    probs = logits.softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def tokens(
    chat: ChatModel, request: LLMRequest, gate: StepGate
) -> Generator[Progress, None, Completion]:
    """The answer to `request.messages`, one token per model call with a KV cache: yields the
    progress at each token as it comes, returns the completion. Raises InvalidRequest when
    the prompt and `max_tokens` pass the model's context, JobCancelled when the gate is."""
    import torch
    from transformers import DynamicCache

    ids = prompt_ids(chat, request.messages)
    if len(ids) + request.max_tokens > chat.context:
        raise InvalidRequest(
            f"the messages are {len(ids)} tokens; with max_tokens {request.max_tokens} that "
            f"passes the model's context of {chat.context} tokens"
        )
    device = chat.model.device
    generator = torch.Generator(device).manual_seed(random.randrange(2**63))
    cache = DynamicCache(config=chat.model.config)
    text = IncrementalText(chat.tokenizer)
    pieces: list[str] = []
    inputs = torch.tensor([ids], device=device)
    finish, count = "length", 0
    with torch.inference_mode():
        while count < request.max_tokens:
            gate.step()  # the safe point: live frames first; stops here when cancelled
            # Only the last position's logits: a long prompt's would be vocabulary-sized each.
            out = chat.model(
                input_ids=inputs, use_cache=True, logits_to_keep=1, **{chat.cache_arg: cache}
            )
            token = next_token(out.logits[0, -1], request, generator)
            count += 1
            if token in chat.stop_ids:
                finish = "stop"
                break
            piece = text.push(token)
            pieces.append(piece)
            yield Progress(piece, len(ids), count)
            inputs = torch.tensor([[token]], device=device)
    rest = text.rest()
    return Completion("".join(pieces) + rest, len(ids), count, finish, rest)


def generate(chat: ChatModel, request: LLMRequest, gate: StepGate) -> Completion:
    """The whole answer at once (`tokens`, without hearing of each)."""
    return drive(tokens(chat, request, gate), lambda _: None)


# --- the route ------------------------------------------------------------------------------

SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
DONE = b"data: [DONE]\n\n"


@dataclass(frozen=True)
class Answer:
    """What every response of one completion repeats (a stream's events share it)."""

    id: str
    model: str
    created: int

    def response(
        self, prompt_tokens: int, completion_tokens: int, choice: LLMChoice
    ) -> LLMResponse:
        usage = LLMTokenUsage(
            prompt_tokens=prompt_tokens,
            completion_tokens=completion_tokens,
            total_tokens=prompt_tokens + completion_tokens,
        )
        return LLMResponse(
            id=self.id, model=self.model, created=self.created, usage=usage, choices=[choice]
        )


def assistant(content: str) -> LLMMessage:
    return LLMMessage(role="assistant", content=content)


def sse(data: str) -> bytes:
    return f"data: {data}\n\n".encode()


async def handle(request: web.Request) -> web.StreamResponse:
    state = batch_state(request)
    params = await parse_json(request, LLMRequest, state.config.max_upload_bytes)
    return await respond(request, state, params)


async def handle_gateway(request: web.Request) -> web.StreamResponse:
    """The gateway-shaped route: JSON as the runner's, or Livepeer Studio's older form body
    (its SDKs' `llm`), answered in that API's shape."""
    if request.content_type not in (MULTIPART, URLENCODED):
        return await handle(request)
    state = batch_state(request)
    form = await parse_form(request, StudioLLMForm, state.config.max_upload_bytes)
    if form.stream:
        raise InvalidRequest("stream is taken with a JSON body (messages); the form answers whole")
    try:
        params = form.chat_request()
    except ValidationError as exc:
        raise InvalidFields.from_validation(exc, "body", "history") from exc
    except ValueError as exc:
        error = {"loc": ["body", "history"], "msg": str(exc), "type": "value_error"}
        raise InvalidFields([error]) from exc
    done = await run_on_model(state, ROUTE, params.model, generate, params)
    body = StudioLLMResponse(
        response=done.text, tokens_used=done.prompt_tokens + done.completion_tokens
    )
    return web.json_response(body.model_dump())


async def respond(
    request: web.Request, state: BatchState, params: LLMRequest
) -> web.StreamResponse:
    answer = Answer(f"chatcmpl-{uuid.uuid4()}", params.model or DEFAULT_MODEL, int(time.time()))
    if params.stream:
        return await stream(request, state, params, answer)
    done = await run_on_model(state, ROUTE, params.model, generate, params)
    choice = LLMChoice(index=0, finish_reason=done.finish_reason, message=assistant(done.text))
    body = answer.response(done.prompt_tokens, done.completion_tokens, choice)
    return web.json_response(body.model_dump(mode="json", exclude_none=True))


async def stream(
    request: web.Request, state: BatchState, params: LLMRequest, answer: Answer
) -> web.StreamResponse:
    """Server-sent events, one per token as the worker generates it.

    Until the first token, an error (the model loading, the queue full, a prompt too long) is
    a plain JSON answer with its status. Once the stream has started, the 200 is sent: an error
    then ends the stream with the runner's error event, `data: {"error": "..."}`, and no
    `[DONE]` after it (ai-runner's stream_generator does the same)."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Progress | None] = asyncio.Queue()  # None: the job is over

    def on_token(progress: Progress) -> None:  # on the worker's thread, or the event loop
        loop.call_soon_threadsafe(queue.put_nowait, progress)

    gate = state.jobs.gate()
    job = asyncio.create_task(
        run_on_model(
            state,
            ROUTE,
            params.model,
            tokens,
            params,
            gate=gate,
            on_item=on_token,
        ),
        name=f"llm {answer.id}",
    )
    # Runs after every token the job reported: both reach the loop through its queue, in order.
    job.add_done_callback(lambda _: queue.put_nowait(None))
    response = web.StreamResponse(headers=SSE_HEADERS)
    try:
        progress = await queue.get()
        if progress is None:
            job.result()  # failed before its first token: raises, answered as JSON
        await response.prepare(request)
        while progress is not None:
            choice = LLMChoice(index=0, delta=assistant(progress.text))
            chunk = answer.response(progress.prompt_tokens, progress.completion_tokens, choice)
            await response.write(sse(chunk.model_dump_json(exclude_none=True)))
            progress = await queue.get()
        try:
            done = job.result()
        except Exception as exc:
            logger.warning("llm stream failed id=%s", answer.id, exc_info=True)
            msg = exc.msg if isinstance(exc, ServiceError) else "Internal server error"
            await response.write(sse(json.dumps({"error": msg})))
            return response
        last = LLMChoice(index=0, finish_reason=done.finish_reason, delta=assistant(done.rest))
        final = answer.response(done.prompt_tokens, done.completion_tokens, last)
        await response.write(sse(final.model_dump_json(exclude_none=True)))
        await response.write(DONE)
        return response
    except ConnectionResetError:
        # The client went away and a write failed (aiohttp's ClientConnectionResetError is a
        # ConnectionResetError). With handler_cancellation, as the CLI serves, this handler is
        # cancelled as soon as the client goes instead; `finally` stops the job either way.
        logger.info("llm client gone, generation stopped id=%s", answer.id)
        return response
    finally:
        # The job stops at its next token (a no-op when it is over), and is awaited: when this
        # returns, the worker is free and the job no longer counts against the batch queue.
        gate.cancelled.set()
        await asyncio.wait([job])
        if not job.cancelled():
            job.exception()  # retrieved: reported above, or nobody's to hear


ROUTE = BatchRoute(
    name="llm",
    default_model=DEFAULT_MODEL,
    load=load,
    handler=handle,
    operation_id="genLLM",
    summary="LLM",
    description=(
        "Generate text using a language model. With `stream: true` the answer is "
        "text/event-stream: one `data: {LLMResponse}` event per generated token (the new "
        "text in `choices[0].delta`, the usage so far), the last one with `finish_reason` "
        "and the final usage, then `data: [DONE]`."
    ),
    request=LLMRequest,
    response=LLMResponse,
    gateway_handler=handle_gateway,
)
