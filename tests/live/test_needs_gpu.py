"""What needs a GPU says so first: `/pipelines`, `live-v2v models pull` (before any network
access) and `live-v2v serve --default-pipeline`. The CLI runs with CUDA hidden from torch
(`CUDA_VISIBLE_DEVICES=""`), so that these hold on a GPU machine too; in-process checks need a
host without a GPU and are skipped on one."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from live.app import StartupError, check_default_pipeline, create_app
from live.keys import SESSIONS
from live.pipelines import builtin_pipelines
from live.pipelines.diffusion import DEFAULT_MODEL, DEFAULT_VAE
from live.pull import no_gpu_refusal, plan_pull
from live.settings import Settings
from protocol.model_ids import BadModelId
from runtime.device import has_gpu

NEEDS_GPU = "streamdiffusion needs a CUDA GPU for real time, and this host has none"
CLI_S = 60.0


@pytest.fixture
def without_gpu() -> None:
    if has_gpu():
        pytest.skip("in-process checks need a host without a GPU")


def gpu_less_env(**extra: str) -> dict[str, str]:
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", **extra}
    env.pop("HF_HUB_OFFLINE", None)  # were the CLI to download, it would reach HF_ENDPOINT
    return env


@pytest.fixture
async def fake_hub(aiohttp_server) -> tuple[str, list[str]]:
    """An HTTP server standing where the hub would be (HF_ENDPOINT): it records what is asked
    of it and has nothing (404)."""
    asked: list[str] = []

    async def nothing(request: web.Request) -> web.Response:
        asked.append(request.path)
        return web.json_response({"error": "Repository not found"}, status=404)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", nothing)
    server = await aiohttp_server(app)
    return str(server.make_url("")).rstrip("/"), asked


async def run_cli(*args: str, env: dict[str, str]) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "live",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), CLI_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    return proc.returncode or 0, out.decode(), err.decode()


# -- models pull --------------------------------------------------------------------------------


def test_a_pipeline_name_stands_for_every_model_it_loads() -> None:
    pipelines = builtin_pipelines()
    plan = plan_pull("streamdiffusion", pipelines)
    assert plan.pipeline == "streamdiffusion"
    assert plan.model_ids == [DEFAULT_MODEL, DEFAULT_VAE]
    assert plan_pull("cartoon", pipelines).model_ids == []
    assert plan_pull("someone/model", pipelines).model_ids == ["someone/model"]
    with pytest.raises(BadModelId, match="nor is it a live pipeline"):
        plan_pull("../models", pipelines)
    # A model id alone is refused in the same words on a host without a GPU.
    refusal = no_gpu_refusal(plan_pull(DEFAULT_MODEL, pipelines))
    assert refusal.startswith(f"{DEFAULT_MODEL} is for a GPU pipeline") and "--no-gpu-ok" in refusal


async def test_pull_on_a_host_without_gpu_refuses_before_any_download(
    fake_hub, tmp_path: Path
) -> None:
    endpoint, asked = fake_hub
    code, out, err = await run_cli(
        *("models", "pull", "streamdiffusion", "--models-dir", str(tmp_path)),
        env=gpu_less_env(HF_ENDPOINT=endpoint),
    )
    assert code == 2
    says = f"the models of streamdiffusion ({DEFAULT_MODEL}, {DEFAULT_VAE}) are for a GPU pipeline"
    assert says in err
    assert "this host has no CUDA GPU" in err and "--no-gpu-ok" in err
    assert "live-v2v models tiny" in err and "Traceback" not in err
    assert asked == [], "the refusal reached the hub"
    assert await asyncio.to_thread(os.listdir, tmp_path) == []


async def test_pull_with_no_gpu_ok_says_what_it_fetches_and_goes_on(fake_hub, tmp_path) -> None:
    endpoint, asked = fake_hub
    code, out, err = await run_cli(
        *("models", "pull", "streamdiffusion", "--no-gpu-ok", "--models-dir", str(tmp_path)),
        env=gpu_less_env(HF_ENDPOINT=endpoint),
    )
    assert f"fetching the models of streamdiffusion ({DEFAULT_MODEL}, {DEFAULT_VAE})" in out
    # The hub has nothing: the first model fails, said in a line, and the pull stops there.
    assert code == 2
    assert f"cannot download {DEFAULT_MODEL}" in err and "Traceback" not in err
    assert any(DEFAULT_MODEL in path for path in asked)
    assert not any(DEFAULT_VAE in path for path in asked)


# -- /pipelines ---------------------------------------------------------------------------------


async def pipelines(aiohttp_client, **settings: object) -> dict[str, dict[str, object]]:
    client = await aiohttp_client(create_app(Settings(**settings)))
    listing = await (await client.get("/pipelines")).json()
    return {p["name"]: p for p in listing["pipelines"]}


@pytest.mark.usefixtures("without_gpu")
@pytest.mark.parametrize("device", ["auto", "cpu"])
async def test_pipelines_say_the_gpu_comes_first(aiohttp_client, tmp_path, device) -> None:
    listed = await pipelines(aiohttp_client, models_dir=tmp_path, device=device)
    diffusion = listed["streamdiffusion"]
    assert diffusion["requires_gpu"] is True
    reason = str(diffusion["unavailable"])
    assert reason.startswith(NEEDS_GPU)
    assert "cartoon and noop run here" in reason and "live-v2v models tiny" in reason
    # The weights come after the GPU.
    assert reason.index("not on this machine") > reason.index("CUDA GPU")
    for name in ("cartoon", "noop"):
        assert listed[name]["requires_gpu"] is False
        assert listed[name]["unavailable"] is None


@pytest.mark.usefixtures("without_gpu")
async def test_tiny_models_on_the_cpu_run_with_a_note(aiohttp_client, tiny_models_dir) -> None:
    listed = await pipelines(aiohttp_client, models_dir=tiny_models_dir)
    reason = str(listed["streamdiffusion"]["unavailable"])
    assert reason.startswith(NEEDS_GPU) and "--device cpu" in reason
    assert "not on this machine" not in reason
    listed = await pipelines(aiohttp_client, models_dir=tiny_models_dir, device="cpu")
    diffusion = listed["streamdiffusion"]
    assert diffusion["unavailable"] is None
    assert "not real time" in str(diffusion["note"])
    assert listed["cartoon"]["note"] is None


# -- serve --default-pipeline -------------------------------------------------------------------


async def test_serve_refuses_a_gpu_default_pipeline_it_cannot_run(tmp_path) -> None:
    code, _out, err = await run_cli(
        *("serve", "--port", "0", "--default-pipeline", "streamdiffusion"),
        *("--models-dir", str(tmp_path)),
        env=gpu_less_env(),
    )
    assert code == 2
    assert f"--default-pipeline streamdiffusion cannot run here: {NEEDS_GPU}" in err
    assert "live-v2v models tiny" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if "error" in line]) == 1


@pytest.mark.usefixtures("without_gpu")
@pytest.mark.parametrize(("device", "says"), [("auto", "--device cpu"), ("cpu", "not on this")])
async def test_the_start_check_refuses_without_usable_models(
    tiny_models_dir, tmp_path, device, says
) -> None:
    # auto with tiny models: they run only when the CPU is asked for; cpu with none: no models.
    models = tiny_models_dir if device == "auto" else tmp_path
    settings = Settings(models_dir=models, device=device, default_pipeline="streamdiffusion")
    known = await create_app(settings)[SESSIONS].availability()
    with pytest.raises(StartupError, match=NEEDS_GPU) as refused:
        check_default_pipeline(settings, known)
    assert says in str(refused.value)
    check_default_pipeline(Settings(models_dir=models, device=device), known)  # auto: no check


async def test_serve_starts_on_tiny_models_on_the_cpu_and_says_not_real_time(
    tiny_models_dir,
) -> None:
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "live", "serve", "--port", "0", "--device", "cpu"),
        *("--default-pipeline", "streamdiffusion", "--models-dir", str(tiny_models_dir)),
        stderr=subprocess.PIPE,
        env=gpu_less_env(LIVE_V2V_LOG_LEVEL="INFO"),
    )
    assert proc.stderr is not None
    log: list[str] = []
    try:

        async def listening() -> str:
            while True:
                line = (await proc.stderr.readline()).decode()  # type: ignore[union-attr]
                assert line, f"the service exited: {''.join(log)}"
                log.append(line)
                if "listening url=" in line:
                    return line.split("listening url=")[1].strip()

        url = await asyncio.wait_for(listening(), CLI_S)
        async with aiohttp.ClientSession() as http, http.get(f"{url}/pipelines") as response:
            listing = await response.json()
        assert listing["default"] == "streamdiffusion"
        proc.send_signal(signal.SIGTERM)
        rest = await asyncio.wait_for(proc.stderr.read(), CLI_S)
        await asyncio.wait_for(proc.wait(), CLI_S)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    text = "".join(log) + rest.decode()
    assert proc.returncode == 0, text
    assert "streamdiffusion runs on the CPU here: not real time" in text
    assert "Traceback" not in text
