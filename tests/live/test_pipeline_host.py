"""The pipeline host (live/pipeline_host.py) as sessions and replays use it: an out-of-memory
restart gives the old pipeline's memory back before the new one loads; a replay goes through
the same host (recorded params changes, live and by reload, a failing frame restarting it)."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from live.app import create_app
from live.edges import MediaContext
from live.pipelines.base import PipelineContext, PipelineParams
from live.pipelines.passthrough import NoopPipeline
from live.recording import CONTROL, INPUT, ReplaySource, TsFile, replay
from live.settings import Settings
from live.stats import SessionStats
from protocol.clips import make_clip, numbered_frame, read_index
from protocol.media import SegmentEncoder, VideoFrame
from runtime.runtime import Runtime, RuntimeConfig
from tests.live.conftest import PIPELINES
from tests.live.streams import run_stream, wait_gone

BUFFER_BYTES = 64 * 2**20  # what one loaded instance holds: real, touched memory
STEP = 3000  # 30 fps on the 90 kHz clock
FRAMES = 60


class RoomForOne(NoopPipeline):
    """Holds a large buffer while loaded, on a device with room for one: a load while another
    instance still holds its buffer runs out of memory. The first instance runs out of memory
    on frame 10 (its state is then suspect: the session restarts it)."""

    name = "room-for-one"
    alive = 0
    loads = 0
    alive_at_load: ClassVar[list[int]] = []

    def load(self) -> None:
        cls = type(self)
        cls.alive_at_load.append(cls.alive)
        if cls.alive:
            raise MemoryError("out of memory: the previous instance still holds its buffer")
        cls.loads += 1
        self.number = cls.loads
        self.buffer = np.ones(BUFFER_BYTES, np.uint8)
        cls.alive += 1

    def process(self, image: np.ndarray) -> np.ndarray:
        if self.number == 1 and read_index(image) == 10:
            raise MemoryError("CUDA out of memory (simulated)")
        return image

    def unload(self) -> None:
        if self.__dict__.pop("buffer", None) is not None:
            type(self).alive -= 1


async def test_an_out_of_memory_restart_unloads_the_old_pipeline_before_loading(
    aiohttp_client,
) -> None:
    RoomForOne.alive, RoomForOne.loads, RoomForOne.alive_at_load = 0, 0, []
    pipelines = {**PIPELINES, RoomForOne.name: RoomForOne}
    # In process on purpose: the counts it checks are class attributes of this process.
    settings = Settings(status_interval_s=0.5, worker_process=False)
    client = await aiohttp_client(create_app(settings, pipelines))
    body = {"model_id": RoomForOne.name}
    info, viewer, events = await run_stream(client, make_clip(FRAMES), body=body)
    # The final status goes out before the session unloads its pipeline: wait for the release.
    await wait_gone(client, info["session_id"])
    (restart,) = events.of_type("restart")
    assert "out of memory" in restart["restart_logs"][0]
    assert not [e for e in events.of_type("error") if "failed to load" in e["message"]]
    # Nothing held the buffer when each load began: the old one was given back first.
    assert RoomForOne.alive_at_load == [0, 0] and RoomForOne.loads == 2
    good = [i for i in viewer.indices if i is not None]
    assert good[-1] == FRAMES - 1
    assert RoomForOne.alive == 0  # and the session's end unloaded the second one


class ShadeParams(PipelineParams):
    level: int = 0
    gain: int = 0


class Shade(NoopPipeline):
    """Paints its params into the frame's bottom band (`level` by reload, `gain` live) and runs
    out of memory on frame 40 of its second load."""

    name = "shade"
    Params = ShadeParams
    live_params = frozenset({"gain"})
    loads = 0
    alive = 0
    alive_at_load: ClassVar[list[int]] = []

    def load(self) -> None:
        cls = type(self)
        cls.alive_at_load.append(cls.alive)
        cls.loads += 1
        cls.alive += 1
        self.number = cls.loads

    def process(self, image: np.ndarray) -> np.ndarray:
        if self.number == 2 and read_index(image) == 40:
            raise MemoryError("out of memory (simulated)")
        out = image.copy()
        out[-32:] = shade(self.params)
        return out

    def unload(self) -> None:
        type(self).alive -= 1


def shade(params: PipelineParams) -> int:
    assert isinstance(params, ShadeParams)
    return 40 + 100 * params.level + 60 * params.gain


def write_recording(directory: Path, changes: list[tuple[int | None, dict]]) -> None:
    """A session recording as the service leaves one: numbered frames and params changes."""
    directory.mkdir()
    file = TsFile(directory / INPUT)
    encoder = SegmentEncoder(file)
    for i in range(FRAMES):
        encoder.encode(numbered_frame(i), i * STEP)
    encoder.close()
    file.close()
    lines = [{"pts": pts, "params": params} for pts, params in changes]
    (directory / CONTROL).write_text("".join(json.dumps(line) + "\n" for line in lines))


async def read_frames(path: Path) -> list[VideoFrame]:
    context = MediaContext(lambda _: None, SessionStats(), logging.getLogger("test"))
    source = ReplaySource(path)
    try:
        return [item async for item in source.items(context) if isinstance(item, VideoFrame)]
    finally:
        await source.close()


async def test_a_replay_goes_through_the_pipeline_host(tmp_path) -> None:
    """Each recorded change applies from its frame (live, then by a reload that waits for the
    new pipeline: no loading frame, no frame dropped), and a frame that runs out of memory is
    reported and restarts the pipeline, as in a session, instead of ending the replay."""
    Shade.loads, Shade.alive, Shade.alive_at_load = 0, 0, []
    directory = tmp_path / "recording"
    changes = [(None, {}), (15 * STEP, {"gain": 1}), (30 * STEP, {"level": 1, "gain": 1})]
    await asyncio.to_thread(write_recording, directory, changes)

    result = await replay(directory, Shade)

    assert result.ended == "input ended" and result.params_changes == 2
    assert (result.frames_in, result.frames_out) == (FRAMES, FRAMES - 1)
    assert any("out of memory" in problem for problem in result.errors), result.errors
    assert Shade.loads == 3 and Shade.alive_at_load == [0, 0, 0] and Shade.alive == 0
    frames = await read_frames(result.output)
    indices = [read_index(f.image) for f in frames]
    assert indices == [i for i in range(FRAMES) if i != 40]
    for index, frame in zip(indices, frames, strict=True):
        assert index is not None
        params = ShadeParams(gain=int(index >= 15), level=int(index >= 30))
        band = frame.image[-24:-8].astype(float).mean()
        assert abs(band - shade(params)) < 20, (index, band)
        assert frame.pts == index * STEP


class FailsToLoad(NoopPipeline):
    name = "fails-to-load"

    def load(self) -> None:
        raise RuntimeError("the weights are not there")


async def test_a_replay_whose_pipeline_cannot_load_stops_saying_so(tmp_path) -> None:
    directory = tmp_path / "recording"
    await asyncio.to_thread(write_recording, directory, [(None, {})])
    result = await replay(directory, FailsToLoad)
    assert result.ended == "pipeline failed to load" and result.frames_out == 0
    assert any("the weights are not there" in problem for problem in result.errors)


def test_a_pipeline_context_reads_its_settings_from_the_runtime(tmp_path) -> None:
    """One source of truth: what a pipeline is told of the models folder, device, dtype and
    compile is the runtime's, and so is the device choice; a bench without a runtime has a
    config of its own, never both."""
    config = RuntimeConfig(models_dir=tmp_path, device="cpu", dtype="float32", compile=True)
    runtime = Runtime(config)
    context = PipelineContext(runtime)
    told = (context.models_dir, context.device, context.dtype, context.compile)
    assert told == (tmp_path, "cpu", "float32", True)
    assert context.spec is runtime.spec
    private = PipelineContext.private(models_dir=tmp_path, device="cpu")
    assert private.runtime is None and (private.models_dir, private.device) == (tmp_path, "cpu")
    with pytest.raises(ValueError, match="not both"):
        PipelineContext(runtime, config=config)
