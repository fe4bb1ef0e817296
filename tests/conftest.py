"""Shared fixtures: real servers on 127.0.0.1, and a check that no test leaves a task running."""

from __future__ import annotations

import asyncio
import os
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from protocol.trickle import TrickleConfig, TrickleServer, create_trickle_app
from tests.waiting import poll_until

# Never reach a model hub from tests, and keep the Hugging Face cache out of the user's home.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hf-home-"))

LEAK_GRACE_S = 5.0
"""How long a test's cancelled tasks may take to unwind before they count as leaked."""


@dataclass
class TrickleHost:
    """A trickle server on a real port: `url(name)` is a channel's URL."""

    server: TrickleServer
    http: TestServer
    base_path: str

    def url(self, name: str = "") -> str:
        return str(self.http.make_url(self.base_path + name))


@pytest.fixture
def trickle_factory(
    aiohttp_server: Callable[..., object],
) -> Callable[..., object]:
    """Start a trickle server; keyword arguments override TrickleConfig fields."""

    async def start(base_path: str = "/trickle/", **config: object) -> TrickleHost:
        server = TrickleServer(TrickleConfig(base_path=base_path, **config))
        app = web.Application()
        app.add_subapp(base_path, create_trickle_app(server))
        http = await aiohttp_server(app)  # type: ignore[operator]
        return TrickleHost(server, http, base_path)

    return start


@pytest.fixture
async def trickle(trickle_factory: Callable[..., object]) -> TrickleHost:
    return await trickle_factory()  # type: ignore[operator,no-any-return]


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail a test that leaves tasks of its own running once its fixtures are torn down."""
    before = asyncio.all_tasks()
    yield

    def leaked() -> list[asyncio.Task]:
        return [
            t
            for t in asyncio.all_tasks() - before
            if t is not asyncio.current_task() and not t.done()
        ]

    # Give cancelled tasks time to finish unwinding: done as soon as none is left.
    if await poll_until(lambda: not leaked(), within=LEAK_GRACE_S):
        return
    names = sorted(f"{t.get_name()} {t.get_coro()!r:.120}" for t in leaked())
    pytest.fail(f"tasks left running after the test: {names}")


WATCHED_MODULES = (
    "tests/live/test_service.py",
    "tests/live/test_sessions.py",
    "tests/live/test_admission.py",
    "tests/live/test_model_ids.py",
    "tests/live/test_model_leases.py",
    "tests/live/test_events_backlog.py",
    "tests/batch/test_errors.py",
    "tests/live/test_capabilities.py",
    "tests/batch/test_image_routes.py",
    "tests/batch/test_llm.py",
    "tests/batch/test_audio_routes.py",
    "tests/batch/test_vision_routes.py",
    "tests/live/test_recording.py",
)
"""Route tests run under the `blockbuster` watch (besides modules that mark themselves)."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    root = config.rootpath
    for item in items:
        if item.path.relative_to(root).as_posix() in WATCHED_MODULES:
            item.add_marker(pytest.mark.blockbuster)
    skip_gpu_tests_without_cuda(items)


def skip_gpu_tests_without_cuda(items: list[pytest.Item]) -> None:
    """Tests marked `gpu` run the CUDA branches; where torch sees no CUDA GPU they are skipped,
    saying so (torch is imported only when such a test is collected)."""
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(
        reason="needs a CUDA GPU: torch sees none here (torch.cuda.is_available() is False)"
    )
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def _blockbuster(request: pytest.FixtureRequest) -> Iterator[None]:
    """Tests marked `blockbuster` fail when the service blocks its event loop (see
    tests/blocking.py). Started before the test's service and stopped after it."""
    if request.node.get_closest_marker("blockbuster") is None:
        yield
        return
    from tests.blocking import watching_the_loop

    with watching_the_loop() as watch:
        request.node.loop_watch = watch
        yield
    if watch.found:
        pytest.fail("the service blocked its event loop:\n" + "\n".join(watch.found))


@pytest.fixture(scope="session")
def tiny_models_dir(tmp_path_factory: pytest.TempPathFactory):
    """Tiny random-weight models under the real ids, built once and loaded back by the same
    code users run (torch and diffusers are imported only by tests that ask for this)."""
    from runtime.tiny import build_tiny_sd, write_tiny_models

    models = tmp_path_factory.mktemp("models")
    write_tiny_models(models)
    build_tiny_sd(models / "test" / "other-sd", seed=1)
    return models


@pytest.fixture
def one_torch_thread() -> Iterator[None]:
    """One torch thread for tests of tiny models: they gain nothing from more, and while other
    processes load the two CPUs, two threads ran them 10-50 times slower."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
