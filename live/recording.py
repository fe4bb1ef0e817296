"""Session recording and offline replay.

A recorded session leaves a directory of its own:

- `input.ts`: the decoded input frames re-encoded (H.264 + the input's audio, MPEG-TS), each
  with its pts on the session's timeline; a tap on the source side, so trickle and WHIP input
  are recorded alike.
- `output.ts`: the frames the session sent out (a sink beside the primary one), their pts kept.
- `input.ts.idx`, `output.ts.idx`: the byte offset of each MPEG-TS segment, one a line (every
  segment is a fresh encoder and muxer, so a reader must start a fresh demuxer there).
- `control.jsonl`: the params at the start and after each change, one JSON object a line, with
  the time since the start (`t`), the wall clock (`time_ms`) and the pts of the newest input
  frame then (`pts`, None before the first), so a replay can apply each at the same frame.

A recording is someone's video and prompts: its folders are made 0700 and its files 0600, for
the service's user alone, whatever the umask.

`replay()` runs a recording through a pipeline offline at full rate (no pacing, no frame
dropped) and writes the output next to the recording; `ReplaySource` reads a recorded input as
a `FrameSource`, at its timestamps or at full rate.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import json
import logging
import math
import os
import sys
import time
from collections.abc import AsyncIterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pydantic import ValidationError

from protocol.media import (
    CLOCK,
    AudioPacket,
    EncoderSettings,
    MediaError,
    Picture,
    SegmentEncoder,
    StreamDecoder,
    VideoFrame,
)
from protocol.messages import now_ms

from .edges import FrameSink, FrameSource, MediaContext, MediaItem, OutputFrame
from .frame_loop import FrameLoop
from .pipeline_host import HostConfig, HostHooks, PipelineHost, ThreadCalls
from .pipelines.base import LivePipeline, PipelineContext, PipelineParams
from .stats import SessionStats
from .threads import run_in

logger = logging.getLogger(__name__)

INPUT = "input.ts"
OUTPUT = "output.ts"
CONTROL = "control.jsonl"
INDEX_SUFFIX = ".idx"
READ_CHUNK = 64 * 1024
TAP_BACKLOG = 30  # input frames waiting for the recorder's encoder before ingest waits on it
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
REPLAY_INPUT_TIMEOUT_S = 3600.0  # a recorded file's next segment decodes in far less


def _private(path: str, flags: int) -> int:
    """An `open()` opener that creates files readable by their owner only."""
    return os.open(path, flags, PRIVATE_FILE)


def private_open(path: Path, mode: str) -> IO[Any]:
    """`path.open(mode)`, a file it creates being 0600 (an existing one keeps its mode)."""
    return open(path, mode, opener=_private)


def make_private_dir(directory: Path) -> None:
    """Make `directory` and any missing parents 0700 (parents that exist are left alone)."""
    missing = []
    for folder in (directory, *directory.parents):
        if folder.exists():
            break
        missing.append(folder)
    for folder in reversed(missing):
        folder.mkdir(mode=PRIVATE_DIR, exist_ok=True)
        os.chmod(folder, PRIVATE_DIR)  # mkdir's mode goes through the umask; this does not


class TsFile:
    """A SegmentSink that appends MPEG-TS segments to a file and their offsets to an index.
    Called on the encoder's thread only."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: IO[bytes] | None = None
        self._index: IO[str] | None = None
        self._offset = 0

    def start(self) -> None:
        if self._file is None:
            self._file = private_open(self.path, "wb")
            self._index = private_open(self.path.with_name(self.path.name + INDEX_SUFFIX), "w")
        assert self._index is not None
        self._index.write(f"{self._offset}\n")

    def write(self, data: bytes) -> None:
        assert self._file is not None
        self._file.write(data)
        self._offset += len(data)

    def end(self) -> None:
        if self._file is not None and self._index is not None:
            self._file.flush()
            self._index.flush()

    def close(self) -> None:
        for handle in (self._file, self._index):
            if handle is not None:
                handle.close()


class _Recorder:
    """One encoder writing one file, on a thread of its own."""

    def __init__(self, path: Path, settings: EncoderSettings) -> None:
        self.file = TsFile(path)
        self.encoder = SegmentEncoder(self.file, settings)
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="record")
        self.frames = 0
        self.problem: str | None = None

    def encode(self, picture: Picture, pts: int, audio: Sequence[AudioPacket]) -> None:
        if self.problem is not None:
            return
        try:
            if self.encoder.encode(picture, pts, audio):
                self.frames += 1
        except (MediaError, OSError) as exc:
            # Recording is a side job: it stops, the session goes on (reported once).
            self.problem = str(exc)

    def finish(self) -> None:
        try:
            self.encoder.close()
        except (MediaError, OSError) as exc:
            self.problem = self.problem or str(exc)
        finally:
            self.file.close()

    async def close(self) -> None:
        try:
            await run_in(self.thread, self.finish)
        finally:
            self.thread.shutdown(wait=False)


class SessionRecording:
    """Everything recorded of one session: wraps its source, adds a sink, logs its params."""

    def __init__(self, directory: Path, settings: EncoderSettings | None = None) -> None:
        self.directory = directory
        make_private_dir(directory)
        self.settings = settings or EncoderSettings()
        self.started = time.monotonic()
        self.last_input_pts: int | None = None
        # control.jsonl is appended on a thread of its own, one line after another in the
        # order the changes came: params change on the event loop, which never waits on disk.
        self._lines = ThreadPoolExecutor(1, thread_name_prefix="record-control")

    def source(self, inner: FrameSource) -> RecordingSource:
        return RecordingSource(inner, self)

    def sink(self) -> RecordingSink:
        return RecordingSink(self)

    def params_changed(self, params: PipelineParams, outcome: str) -> None:
        """One line of `control.jsonl`, appended at once (a few times a session at most) so a
        session that dies still leaves every change it took."""
        line = {
            "t": round(time.monotonic() - self.started, 6),
            "time_ms": now_ms(),
            "pts": self.last_input_pts,
            "outcome": outcome,
            "params": params.model_dump(mode="json"),
        }
        self._lines.submit(self._append, json.dumps(line) + "\n")

    def _append(self, text: str) -> None:
        try:
            with private_open(self.directory / CONTROL, "a") as file:
                file.write(text)
        except OSError as exc:
            # Recording is a side job: the session goes on without its params log.
            logger.warning("recording params failed path=%s: %s", self.directory / CONTROL, exc)

    async def close(self) -> None:
        """Waits for the params lines still to be written, then lets their thread go."""
        await asyncio.wrap_future(self._lines.submit(lambda: None))
        self._lines.shutdown(wait=False)


class RecordingSource(FrameSource):
    """Passes the inner source's items on unchanged, recording them to `input.ts` meanwhile.

    Encoding runs on the recorder's thread without holding ingest back, up to TAP_BACKLOG
    frames behind; beyond that ingest waits (memory stays bounded)."""

    name = "recording"

    def __init__(self, inner: FrameSource, recording: SessionRecording) -> None:
        self.inner = inner
        self.recording = recording
        self._recorder = _Recorder(recording.directory / INPUT, recording.settings)
        self._pending: collections.deque[asyncio.Future[None]] = collections.deque()
        self._reported = False

    def __getattr__(self, name: str) -> Any:
        # The wrapped source's own attributes (FirstOfSource.chosen, ...) stay reachable.
        if name == "inner":  # not set yet (a copy being made): no endless recursion
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def arrives_live(self) -> bool:  # type: ignore[override]
        return self.inner.arrives_live

    async def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        audio: list[AudioPacket] = []
        loop = asyncio.get_running_loop()
        async for item in self.inner.items(context):
            if isinstance(item, AudioPacket):
                audio.append(item)
            else:
                self.recording.last_input_pts = item.pts
                packets, audio = audio, []
                future: Future[None] = self._recorder.thread.submit(
                    self._recorder.encode, item.picture, item.pts, packets
                )
                self._pending.append(asyncio.wrap_future(future, loop=loop))
                while self._pending and self._pending[0].done():
                    self._pending.popleft()
                if len(self._pending) > TAP_BACKLOG:
                    await self._pending.popleft()
                if self._recorder.problem and not self._reported:
                    self._reported = True
                    context.error(f"recording the input stopped: {self._recorder.problem}")
            yield item

    async def close(self) -> None:
        try:
            await self.inner.close()
        finally:
            with contextlib.suppress(Exception):
                await asyncio.gather(*self._pending)
            await self._recorder.close()


class FileSink(FrameSink):
    """Writes the frames it is sent, with their pts and audio, to an MPEG-TS file (and its
    index), encoding on a thread of its own."""

    name = "file"

    def __init__(self, path: Path, settings: EncoderSettings, *, primary: bool = False) -> None:
        self.primary = primary
        self._recorder = _Recorder(path, settings)
        self._context: MediaContext | None = None
        self._reported = False

    @property
    def frames(self) -> int:
        """Frames written so far."""
        return self._recorder.frames

    async def open(self, context: MediaContext) -> None:
        self._context = context

    async def send(self, frame: OutputFrame, audio: Sequence[AudioPacket]) -> bool:
        before = self._recorder.frames
        await run_in(self._recorder.thread, self._recorder.encode, frame.picture, frame.pts, audio)
        if self._recorder.problem and not self._reported and self._context is not None:
            self._reported = True
            self._context.error(f"{self.what} stopped: {self._recorder.problem}")
        return self._recorder.frames > before

    @property
    def what(self) -> str:
        return f"writing {self._recorder.file.path.name}"

    async def close(self) -> None:
        await self._recorder.close()


class RecordingSink(FileSink):
    """Writes the session's output frames, with their pts and audio, to `output.ts`."""

    name = "record"

    def __init__(self, recording: SessionRecording) -> None:
        super().__init__(recording.directory / OUTPUT, recording.settings)
        self._recording = recording

    @property
    def what(self) -> str:
        return "recording the output"

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            # The sink is the recording's last part to close: the session has ended.
            await self._recording.close()


# -- reading a recording back -------------------------------------------------------------------


def _segments(path: Path) -> list[tuple[int, int]]:
    """(start, end) byte ranges of the segments of a recorded file (one range without index)."""
    size = path.stat().st_size
    index = path.with_name(path.name + INDEX_SUFFIX)
    starts = [0]
    if index.exists():
        starts = [int(line) for line in index.read_text().split()] or [0]
    ends = [*starts[1:], size]
    return [(start, end) for start, end in zip(starts, ends, strict=True) if end > start]


class _SegmentReader:
    """Iterates a recorded file segment by segment; each step decodes one segment (blocking)."""

    def __init__(self, path: Path, size: tuple[int, int] | None = None) -> None:
        self.path = path
        self.decoder = StreamDecoder(size)
        self.ranges = _segments(path)

    def __iter__(self) -> _SegmentReader:
        return self

    def __next__(self) -> list[MediaItem]:
        if not self.ranges:
            raise StopIteration
        start, end = self.ranges.pop(0)
        decoder = self.decoder
        decoder.begin_segment()
        items: list[MediaItem] = []
        with self.path.open("rb") as file:
            file.seek(start)
            left = end - start
            while left > 0:
                chunk = file.read(min(READ_CHUNK, left))
                if not chunk:
                    break
                left -= len(chunk)
                items.extend(decoder.feed(chunk))
        items.extend(decoder.end_segment())
        return items


class ReplaySource(FrameSource):
    """A recorded file's frames and audio. `realtime`: each video frame at its presentation
    time (as the camera sent it); otherwise as fast as they decode."""

    name = "replay"

    def __init__(
        self, path: Path, *, realtime: bool = False, size: tuple[int, int] | None = None
    ) -> None:
        self.path = path
        self.realtime = realtime
        self.size = size
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="replay")

    async def items(self, context: MediaContext) -> AsyncIterator[MediaItem]:
        # Its index is read from disk: on the replay's thread, not the loop.
        reader = await run_in(self._thread, _SegmentReader, self.path, self.size)
        first: tuple[int, float] | None = None
        while True:
            items = await run_in(self._thread, next, reader, None)
            if items is None:
                return
            problem = reader.decoder.take_error()
            if problem:
                context.error(f"recording {self.path.name}: {problem}")
            for item in items:
                if self.realtime and isinstance(item, VideoFrame):
                    now = time.monotonic()
                    if first is None:
                        first = (item.pts, now)
                    due = first[1] + (item.pts - first[0]) / CLOCK
                    if due > now:
                        await asyncio.sleep(due - now)
                yield item

    async def close(self) -> None:
        self._thread.shutdown(wait=False)


def read_control(directory: Path) -> list[dict[str, Any]]:
    """The recorded params changes, oldest first ([] when none were recorded)."""
    path = directory / CONTROL
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@dataclass
class ReplayResult:
    frames_in: int
    frames_out: int
    output: Path
    params_changes: int
    errors: list[str]
    ended: str = "input ended"
    """Why it ended: "input ended" when every frame went through."""


async def replay(
    directory: Path,
    pipeline_cls: type[LivePipeline],
    params: dict[str, Any] | None = None,
    *,
    context: PipelineContext | None = None,
    output: Path | None = None,
    encoder: EncoderSettings | None = None,
) -> ReplayResult:
    """Run `directory`'s recorded input through `pipeline_cls` at full rate, every frame in
    order, and encode the result to `output` (default `replay-<pipeline>.ts` beside it).

    With `params` those params hold throughout; without, the recorded params are used: the
    first at the start, each later one from the first frame at or after its recorded pts.
    The pipeline runs in a `PipelineHost` in a lossless `FrameLoop`, as in a session: a
    reload waits for the new pipeline, failures restart it, every problem is in `errors`.
    """
    source_path = directory / INPUT
    # The recording is read from disk off the loop, which may be serving meanwhile.
    if not await asyncio.to_thread(source_path.exists):
        raise FileNotFoundError(f"{source_path} does not exist: not a session recording")
    output = output or directory / f"replay-{pipeline_cls.name}.ts"
    changes: list[tuple[int | None, PipelineParams]] = []
    if params is not None:
        current = pipeline_cls.parse_params(params)
    else:
        recorded = await asyncio.to_thread(read_control, directory)
        current = pipeline_cls.parse_params(recorded[0]["params"] if recorded else {})
        changes = [(e.get("pts"), pipeline_cls.parse_params(e["params"])) for e in recorded[1:]]
    errors: list[str] = []
    stats = SessionStats()
    sink = FileSink(output, encoder or EncoderSettings(), primary=True)

    def stop(reason: str) -> None:
        loop.stop(reason)

    def state(state: str) -> None:
        if state == "ERROR":  # offline, nobody is there to send params that would load
            loop.stop("pipeline failed to load")

    host: PipelineHost[LivePipeline] = PipelineHost(
        pipeline_cls,
        current,
        ThreadCalls(pipeline_cls, context or PipelineContext(), logger),
        HostHooks(error=errors.append, stop=stop, state=state),
        stats,
        logger,
        HostConfig(frame_timeout_s=math.inf, wait_for_load=True),
    )
    applied = 0

    async def process(frame: VideoFrame) -> OutputFrame | None:
        nonlocal applied
        while changes and (changes[0][0] is None or changes[0][0] <= frame.pts):
            new = changes.pop(0)[1]
            applied += 1
            if new != host.params:
                await host.update(new)
        return await host.process(frame)

    media = MediaContext(error=errors.append, stats=stats, log=logger)
    source = ReplaySource(source_path)
    loop = FrameLoop(
        source,
        [sink],
        process,
        media,
        input_timeout_s=REPLAY_INPUT_TIMEOUT_S,
        pace=False,
        lossless=True,
    )
    try:
        async with asyncio.TaskGroup() as group:
            loader = group.create_task(host.run(), name="replay-loader")
            ended = await loop.run()
            loader.cancel()
    finally:
        await host.close()
    return ReplayResult(stats.frames_in, sink.frames, output, applied, errors, ended)


def run_replay(args: argparse.Namespace) -> int:
    """`live-v2v replay DIR --pipeline NAME [--params JSON]`: prints frames in and out."""
    from .pipelines import builtin_pipelines
    from .settings import load_settings

    pipelines = builtin_pipelines()
    cls = pipelines.get(args.pipeline)
    if cls is None:
        print(
            f"error: unknown pipeline {args.pipeline!r}; known: {', '.join(sorted(pipelines))}",
            file=sys.stderr,
        )
        return 2
    params = None
    if args.params is not None:
        try:
            params = json.loads(args.params)
        except json.JSONDecodeError as exc:
            print(f"error: --params is not JSON: {exc}", file=sys.stderr)
            return 2
        if not isinstance(params, dict):
            print("error: --params must be a JSON object", file=sys.stderr)
            return 2
    context = PipelineContext(config=load_settings(args).runtime())
    try:
        result = asyncio.run(replay(args.dir, cls, params, context=context, output=args.output))
    except (FileNotFoundError, ValidationError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for problem in result.errors:
        print(f"warning: {problem}", file=sys.stderr)
    if result.ended != "input ended":
        print(f"error: the replay stopped early: {result.ended}", file=sys.stderr)
    print(
        f"frames in {result.frames_in} out {result.frames_out} "
        f"params changes {result.params_changes} -> {result.output}"
    )
    return 0 if result.ended == "input ended" else 1
