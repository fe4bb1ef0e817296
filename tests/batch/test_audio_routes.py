"""The audio routes end to end over real HTTP, on tiny random-weight Whisper and VITS models
loaded through the runtime: audio made with PyAV in the containers, codecs and sample rates
users send, transcribed in 30 s windows; speech back as a WAV that PyAV reads. The models'
words are gibberish: shapes, types and times are checked, never words."""

from __future__ import annotations

import io
import json
import tracemalloc
import wave
from pathlib import Path
from typing import Any

import av
import numpy as np
import pytest
from aiohttp import FormData

from batch import audio_to_text
from batch.audio import decode_audio, wav_bytes
from batch.jobs import JobCancelled, StepGate
from live.keys import RUNTIME
from protocol.batch_api import AudioToTextForm, TextToSpeechParams
from protocol.client import APIError, data_url_bytes
from runtime.device import DeviceSpec
from runtime.tiny_audio import MMS_TTS, WHISPER

from .audio_clips import FLAC, M4A_AAC, MP3, OGG_OPUS, WAV, WEBM_OPUS, tone, video_only_mp4
from .conftest import png
from .test_image_routes import api

RUNNER_SPEC = Path(__file__).parents[1] / "data" / "livepeer-ai-runner-openapi.yaml"
CPU = DeviceSpec("cpu", "float32")


@pytest.fixture(scope="module")
def ten_minutes() -> bytes:
    """10 minutes of a tone at 8 kHz, as 8 kbit/s MP3: 600 KB."""
    return tone(MP3, 600.0, 8_000, bit_rate=8_000)


def audio_form(audio: bytes | None, filename: str = "clip.wav", **fields: str) -> FormData:
    data = FormData()
    for name, value in fields.items():
        data.add_field(name, value)
    if audio is not None:
        data.add_field("audio", audio, filename=filename, content_type="application/octet-stream")
    return data


def assert_chunks_within(chunks: list[Any], duration_s: float) -> None:
    for chunk in chunks:
        start, end = chunk.timestamp
        assert isinstance(chunk.text, str) and chunk.text
        # Lossy codecs pad a few ms (encoder delay, the last frame): the decoded audio is
        # a little longer than what was encoded.
        assert 0 <= start <= end <= duration_s + 0.1, chunk


# --- audio-to-text ---------------------------------------------------------------------------


async def test_transcribes_each_container_codec_and_sample_rate(batch_service) -> None:
    service = api(await batch_service(warm=("audio-to-text",)))
    clips = [
        (WAV, 44_100, "stereo"),
        (FLAC, 8_000, "mono"),
        (MP3, 44_100, "stereo"),
        (OGG_OPUS, 48_000, "mono"),
        (M4A_AAC, 8_000, "mono"),
        (WEBM_OPUS, 16_000, "stereo"),
    ]
    for kind, rate, layout in clips:
        data = tone(kind, 2.0, rate, layout)
        result = await service.audio_to_text(audio=data, filename=f"clip.{kind.extension}")
        assert isinstance(result.text, str), kind
        assert result.chunks, kind  # sentence timestamps are the default ('true')
        assert_chunks_within(result.chunks, 2.0)


async def test_return_timestamps_modes(batch_service) -> None:
    service = api(await batch_service(warm=("audio-to-text",)))
    data = tone(FLAC, 3.0, 16_000)
    none = await service.audio_to_text(audio=data, return_timestamps="false")
    assert none.chunks == []
    assert isinstance(none.text, str)
    for value in ("true", "sentence", "TRUE", "1"):
        sentences = await service.audio_to_text(audio=data, return_timestamps=value)
        assert sentences.chunks, value
        assert_chunks_within(sentences.chunks, 3.0)
    words = await service.audio_to_text(audio=data, return_timestamps="word")
    assert words.chunks
    assert_chunks_within(words.chunks, 3.0)
    # The metadata field is accepted (a JSON object) and does not change the result.
    again = await service.audio_to_text(audio=data, return_timestamps="false", metadata='{"a": 1}')
    assert again == none


async def test_a_ten_minute_input_runs_in_twenty_windows_one_at_a_time(
    batch_service, monkeypatch, ten_minutes
) -> None:
    from transformers import WhisperForConditionalGeneration

    fed: list[tuple[int, ...]] = []
    generate = WhisperForConditionalGeneration.generate

    def counting(self: Any, input_features: Any = None, **kwargs: Any) -> Any:
        fed.append(tuple(input_features.shape))
        return generate(self, input_features, **kwargs)

    monkeypatch.setattr(WhisperForConditionalGeneration, "generate", counting)
    # In process: the test watches the model's own generate calls.
    client = await batch_service(warm=("audio-to-text",), worker_process=False)
    worker = client.app[RUNTIME].worker()
    safe_points = worker.safe_points
    result = await api(client).audio_to_text(audio=ten_minutes, filename="long.mp3")

    # Chunked, not truncated: 20 windows of 30 s, each fed alone (128 mel bins x 3000 frames).
    assert fed == [(1, 128, 3000)] * 20
    starts = [chunk.timestamp[0] for chunk in result.chunks]
    assert starts == sorted(starts)
    assert_chunks_within(result.chunks, 600.0)
    assert max(starts) >= 570  # the last window's text is there, at its place in time
    # The job stopped at a safe point before each window and at each token it generated.
    assert worker.safe_points - safe_points > 20


def test_decoding_holds_the_pcm_and_one_window_at_most(ten_minutes) -> None:
    tracemalloc.start()
    try:
        audio = decode_audio(ten_minutes, sample_rate=16_000, window_s=30.0, max_duration_s=3600)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    pcm = 600 * 16_000 * 2  # 16-bit mono at 16 kHz: 19.2 MB, the source's rate and
    window = 30 * 16_000 * 2  # channels never held
    # 20 full windows, then the few ms the MP3 encoder padded.
    assert [len(w) for w in audio.windows][:20] == [30 * 16_000] * 20
    assert audio.duration_s == pytest.approx(600, abs=0.2)
    assert peak < pcm + 2 * window


async def test_a_file_without_an_audio_stream_is_400(batch_service) -> None:
    client = await batch_service(warm=())
    response = await client.post("/audio-to-text", data=audio_form(video_only_mp4(), "v.mp4"))
    assert response.status == 400
    msg = (await response.json())["detail"]["msg"]
    assert "no audio stream" in msg and "video" in msg
    # An image is not read at all: FFmpeg's image demuxers are not on the allowlist.
    response = await client.post("/audio-to-text", data=audio_form(png(16, 16), "a.png"))
    assert response.status == 400
    assert "not audio this service can read" in (await response.json())["detail"]["msg"]


async def test_a_file_that_is_not_audio_is_400(batch_service) -> None:
    client = await batch_service(warm=())
    cases = [
        (b"this is not audio at all, just some text", "not audio"),
        (b"", "empty"),
        (tone(FLAC, 1.0, 8_000)[:200], "truncated"),  # the header and no more
        (wav_bytes(np.zeros(0), 8_000), "no decodable sound"),  # a stream of no samples
        # Chained Ogg whose second part changes from mono to stereo: FFmpeg gives up there.
        (
            tone(OGG_OPUS, 1.0, 48_000) + tone(OGG_OPUS, 1.0, 48_000, "stereo"),
            "FFmpeg cannot decode",
        ),
    ]
    for data, expected in cases:
        response = await client.post("/audio-to-text", data=audio_form(data))
        assert response.status == 400, expected
        message = (await response.json())["detail"]["msg"]
        assert expected in message
        # In words: no FFmpeg error number, no name PyAV gives an in-memory file.
        assert "Errno" not in message and "<none>" not in message, message


async def test_damaged_packets_are_skipped_as_ffmpeg_does(batch_service) -> None:
    """Two MP3 files joined: the second one's header frame does not decode, and the rate and
    channels change there; the audio on both sides of it is read."""
    service = api(await batch_service(warm=("audio-to-text",)))
    joined = tone(MP3, 2.0, 44_100) + tone(MP3, 3.0, 16_000, "stereo")
    result = await service.audio_to_text(audio=joined, filename="joined.mp3")
    assert_chunks_within(result.chunks, 5.1)  # each file's padding
    assert max(chunk.timestamp[1] for chunk in result.chunks) > 2.0


async def test_audio_over_the_duration_bound_is_400(batch_service, monkeypatch) -> None:
    monkeypatch.setattr(audio_to_text, "MAX_DURATION_S", 5.0)
    client = await batch_service(warm=())
    # The WAV header states its length: refused before decoding.
    response = await client.post("/audio-to-text", data=audio_form(tone(WAV, 8.0, 8_000)))
    assert response.status == 400
    msg = (await response.json())["detail"]["msg"]
    assert "longer than" in msg and "header says" in msg
    # A live-recorded WebM states none: refused while decoding, at the bound.
    live = tone(WEBM_OPUS, 8.0, 16_000, options={"live": "1"})
    response = await client.post("/audio-to-text", data=audio_form(live, "rec.webm"))
    assert response.status == 400
    msg = (await response.json())["detail"]["msg"]
    assert "longer than" in msg and "header says" not in msg


async def test_bad_fields_are_422_naming_them(batch_service) -> None:
    client = await batch_service(warm=())
    data = tone(WAV, 1.0, 8_000)
    cases = [
        (audio_form(None, return_timestamps="true"), ["body", "audio"], "missing"),
        (audio_form(data, return_timestamps="segment"), ["body", "return_timestamps"], None),
        (audio_form(data, return_timestamps=""), ["body", "return_timestamps"], None),
        (audio_form(data, metadata="{not json"), ["body", "metadata"], None),
        (audio_form(data, metadata="[1, 2]"), ["body", "metadata"], None),
    ]
    for form, loc, kind in cases:
        response = await client.post("/audio-to-text", data=form)
        assert response.status == 422, loc
        (error,) = (await response.json())["detail"]
        assert error["loc"] == loc
        if kind:
            assert error["type"] == kind


async def test_an_upload_over_the_limit_is_413(batch_service) -> None:
    client = await batch_service(warm=(), max_upload_mb=0.05)
    response = await client.post("/audio-to-text", data=audio_form(tone(WAV, 3.0, 16_000)))
    assert response.status == 413
    assert "0.05 MiB" in (await response.json())["detail"]["msg"]


@pytest.fixture
def tiny_whisper(tiny_models_dir) -> audio_to_text.Whisper:
    return audio_to_text.load(tiny_models_dir / WHISPER, CPU)


@pytest.mark.parametrize("mode", ["sentence", "word", "none"])
def test_a_cancelled_job_stops_at_the_next_token(tiny_whisper, mode: str) -> None:
    audio = decode_audio(
        tone(FLAC, 40.0, 16_000), sample_rate=16_000, window_s=30.0, max_duration_s=60
    )

    def cancel_after_three() -> int:
        # Called at each safe point, as the worker's yield_to_live is: the caller goes away
        # after the window's step and two tokens.
        if gate.steps == 3:
            gate.cancelled.set()
        return 0

    gate = StepGate(cancel_after_three)
    with pytest.raises(JobCancelled):
        audio_to_text.transcribe(tiny_whisper, audio, mode, gate)
    assert gate.steps == 4  # it stopped at the next token, mid-window
    # Word timestamps switch Whisper to eager attention; a stopped job switches it back too.
    assert tiny_whisper.model.config._attn_implementation == "sdpa"


def test_an_english_only_whisper_is_not_asked_for_a_task(tmp_path) -> None:
    from runtime.tiny_audio import build_tiny_whisper

    english = audio_to_text.load(build_tiny_whisper(tmp_path / "en", multilingual=False), CPU)
    audio = decode_audio(
        tone(FLAC, 2.0, 16_000), sample_rate=16_000, window_s=30.0, max_duration_s=60
    )
    result = audio_to_text.transcribe(english, audio, "sentence", StepGate(lambda: 0))
    assert_chunks_within(result.chunks, 2.0)


# 128 mel bands do not fit under 4 kHz: transformers says so while loading, as it should.
@pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")
def test_a_whisper_folder_at_another_sample_rate_does_not_load(tmp_path) -> None:
    from runtime.tiny_audio import build_tiny_whisper

    folder = build_tiny_whisper(tmp_path / "odd")
    config_path = folder / "processor_config.json"
    config = json.loads(config_path.read_text())
    config["feature_extractor"]["sampling_rate"] = 8_000
    config_path.write_text(json.dumps(config))
    with pytest.raises(ValueError, match="takes 8000 Hz audio"):
        audio_to_text.load(folder, CPU)


async def test_the_token_guards_the_audio_routes(batch_service) -> None:
    client = await batch_service(warm=(), auth_token="s3cret")
    for route in ("/audio-to-text", "/text-to-speech"):
        response = await client.post(route, json={"text": "hi"})
        assert response.status == 401, route
        assert "token" in (await response.json())["detail"]["msg"]


# --- text-to-speech --------------------------------------------------------------------------


async def test_text_to_speech_returns_a_wav_pyav_reads(batch_service) -> None:
    service = api(await batch_service(warm=("text-to-speech",)))
    result = await service.text_to_speech(text="Hello there. This is a test, 1 2 3!")
    mime, data = data_url_bytes(result.audio.url)
    assert mime == "audio/wav"
    with wave.open(io.BytesIO(data)) as header:
        stated_rate, stated_samples = header.getframerate(), header.getnframes()
        assert header.getnchannels() == 1 and header.getsampwidth() == 2
    with av.open(io.BytesIO(data)) as container:
        stream = container.streams.audio[0]
        assert stream.codec_context.name == "pcm_s16le"
        assert stream.rate == stated_rate == 16_000
        decoded = sum(frame.samples for frame in container.decode(stream))
        duration = container.duration / 1_000_000
    assert decoded == stated_samples > 0
    assert duration == pytest.approx(stated_samples / stated_rate, abs=1e-3)
    # The same through the model's own id and with a description (used by Parler only).
    again = await service.text_to_speech(text="Again.", model_id=MMS_TTS, description="calm")
    assert data_url_bytes(again.audio.url)[0] == "audio/wav"


async def test_text_to_speech_refuses_bad_text(batch_service) -> None:
    client = await batch_service(warm=("text-to-speech",))
    cases = [
        ({}, "string_too_short"),  # the spec's default, "", is refused
        ({"text": ""}, "string_too_short"),
        ({"text": "   \n"}, "value_error"),
        ({"text": "a" * 601}, "string_too_long"),
        ({"text": 5}, "string_type"),
        ({"text": "hi", "description": "x" * 1001}, "string_too_long"),
    ]
    for body, kind in cases:
        response = await client.post("/text-to-speech", json=body)
        assert response.status == 422, body
        (error,) = (await response.json())["detail"]
        assert error["type"] == kind, body
        assert error["loc"][0] == "body"
    ok = await client.post("/text-to-speech", json={"text": "a" * 600})
    assert ok.status == 200
    # Text without a single character of the voice's alphabet cannot be spoken.
    for text in ("???", "你好"):
        response = await client.post("/text-to-speech", json={"text": text})
        assert response.status == 400, text
        assert "no character this voice can speak" in (await response.json())["detail"]["msg"]


async def test_text_to_speech_says_which_models_it_runs(batch_service, tiny_models_dir) -> None:
    service = api(await batch_service(warm=()))
    parler = tiny_models_dir / "test" / "parler-tts-large-v1"
    parler.mkdir(parents=True, exist_ok=True)
    (parler / "config.json").write_text(json.dumps({"model_type": "parler_tts"}))
    with pytest.raises(APIError) as refused:
        await service.text_to_speech(text="hi", model_id="test/parler-tts-large-v1")
    assert refused.value.status == 503
    assert "parler-tts package is not installed" in refused.value.msg
    assert MMS_TTS in refused.value.msg
    # A model folder of another kind (here the tiny Whisper) is not a voice.
    with pytest.raises(APIError) as refused:
        await service.text_to_speech(text="hi", model_id=WHISPER)
    assert refused.value.status == 503
    assert "is a whisper model" in refused.value.msg


# --- the spec's shapes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs"),
    [(AudioToTextForm, "Body_genAudioToText"), (TextToSpeechParams, "TextToSpeechParams")],
)
def test_request_bodies_match_the_runner_spec(ours: Any, theirs: str) -> None:
    yaml = pytest.importorskip("yaml")
    if not RUNNER_SPEC.is_file():
        pytest.skip(f"the runner spec is not at {RUNNER_SPEC}")
    expected = yaml.safe_load(RUNNER_SPEC.read_text())["components"]["schemas"][theirs]
    schema = ours.model_json_schema()
    assert list(schema["properties"]) == list(expected["properties"])
    for name, prop in expected["properties"].items():
        assert schema["properties"][name].get("default") == prop.get("default"), name
    assert set(schema.get("required", [])) == set(expected.get("required", []))
