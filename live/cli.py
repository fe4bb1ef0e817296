"""`live-v2v`: the command line. It only parses settings and runs the app `create_app` builds."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from aiohttp import web
from pydantic import ValidationError

from .app import StartupError, create_app
from .http_server import ServiceRunner, fitted_max_connections, quiet_accept_errors
from .logs import configure_logging
from .settings import Settings, add_arguments, load_settings

logger = logging.getLogger("live")


class CommandParser(argparse.ArgumentParser):
    """A command's parser that refuses what it does not know itself. argparse hands a
    subcommand's unknown arguments up to the top-level parser, whose error shows the top-level
    usage (`live-v2v [-h] COMMAND ...`) instead of the options of the command that was typed."""

    def parse_known_args(  # type: ignore[override]
        self, args: Sequence[str] | None = None, namespace: argparse.Namespace | None = None
    ) -> tuple[argparse.Namespace, list[str]]:
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unrecognized arguments: {' '.join(unknown)}")
        return parsed, unknown


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="live-v2v", description="Real-time AI video restyling service."
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=CommandParser)
    serve = commands.add_parser(
        "serve", help="run the service", description="Run the service until SIGINT or SIGTERM."
    )
    add_arguments(serve)
    models = commands.add_parser("models", help="list, fetch or build models")
    model_commands = models.add_subparsers(dest="models_command", metavar="ACTION", required=True)
    listing = model_commands.add_parser("list", help="models present here, with their sizes")
    pull = model_commands.add_parser(
        "pull",
        help="download a model, or every model of a live pipeline, from the Hugging Face hub",
    )
    pull.add_argument(
        "name", help="a model id (stabilityai/sd-turbo) or a live pipeline (streamdiffusion)"
    )
    pull.add_argument(
        "--no-gpu-ok",
        action="store_true",
        help="download even on a host without a GPU (the models run far from real time there)",
    )
    tiny = model_commands.add_parser(
        "tiny", help="write tiny random-weight models under the real ids (smoke tests)"
    )
    tiny.add_argument("dir", type=Path, help="models directory to write into")
    full = model_commands.add_parser(
        "random-full",
        help="write sd-turbo and TAESD at full size with random weights, as random/... "
        "(GPU timing without downloads)",
        description="Write sd-turbo's UNet, text encoder and VAE and TAESD at their real sizes "
        "with random weights, as random/sd-turbo-full and random/taesd-full (about 5 GB): they "
        "run as fast as the real weights and output noise. Use them with the streamdiffusion "
        'params {"model_id": "random/sd-turbo-full", "vae_id": "random/taesd-full"}.',
    )
    full.add_argument("dir", type=Path, help="models directory to write into")
    replay = commands.add_parser(
        "replay",
        help="run a session recording through a pipeline offline",
        description="Run a recorded session's input through a pipeline at full rate (no "
        "pacing, every frame) and write the output next to the recording.",
    )
    replay.add_argument("dir", type=Path, help="a recording: --record-dir/<session id>")
    replay.add_argument("--pipeline", required=True, help="live pipeline name, e.g. noop")
    replay.add_argument(
        "--params", default=None, help="params as JSON (default: the recorded params changes)"
    )
    replay.add_argument("--output", type=Path, default=None, help="output MPEG-TS file")
    for sub in (listing, pull, replay):
        sub.add_argument(
            "--models-dir",
            type=Path,
            default=None,
            help="models directory [env LIVE_V2V_MODELS_DIR; default models]",
        )
    return parser


def run_models(args: argparse.Namespace) -> int:
    from runtime.models import list_models

    command = args.models_command
    if command == "tiny":
        from runtime.tiny import write_tiny_models

        for path in write_tiny_models(args.dir):
            print(f"wrote {path}")
        print(f"use them with: live-v2v serve --models-dir {args.dir} --device cpu")
        return 0
    if command == "random-full":
        from runtime.random_full import write_random_sd

        for path in write_random_sd(args.dir):
            print(f"wrote {path} (random weights)")
        return 0
    settings = load_settings(args)
    if command == "list":
        found = list_models(settings.models_dir)
        if not found:
            print(f"no models in {settings.models_dir} or the Hugging Face cache")
        for info in found:
            weights = "  random weights" if info.random_weights else ""
            print(
                f"{info.model_id:40s} {info.size_bytes / 2**20:10.1f} MiB  {info.source}"
                f"{weights}  {info.path}"
            )
        return 0
    from .pull import run_pull

    return run_pull(args, settings.models_dir)


async def serve(settings: Settings) -> None:
    """Run until SIGINT/SIGTERM, then shut down: listeners closed, channels closed (which
    releases every parked request), every task cancelled and awaited."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    limits = settings.connection_limits()
    limits = replace(limits, max_connections=fitted_max_connections(limits.max_connections))
    # handler_cancellation: a request whose client left is cancelled at once (a GET parked at
    # the live edge, a publisher gone mid-segment), as under aiohttp's test server.
    runner = ServiceRunner(
        create_app(settings),
        limits,
        access_log=None,
        shutdown_timeout=5.0,
        handler_cancellation=True,
    )
    try:
        await runner.setup()
    except BaseException:
        # A start-up check refused (StartupError): what did start (the runtime) closes.
        await runner.cleanup()
        raise
    restore_loop_errors = quiet_accept_errors(loop)
    try:
        site = web.TCPSite(runner, settings.host, settings.port)
        try:
            await site.start()
        except OSError as exc:
            raise StartupError(
                f"cannot listen on {settings.host}:{settings.port}: {exc.strerror or exc}; "
                "choose another --port (or --host), or stop what uses it"
            ) from exc
        for sock in site._server.sockets if site._server else ():  # type: ignore[union-attr]
            host, port = sock.getsockname()[:2]
            logger.info("listening url=http://%s:%d", host, port)
            if not settings.auth_token and not ipaddress.ip_address(host).is_loopback:
                logger.warning(
                    "listening on %s:%d, beyond loopback, with no token: anyone who reaches "
                    "this port can start sessions and run models; set --auth-token (or "
                    "AUTH_TOKEN)",
                    host,
                    port,
                )
        await stop.wait()
        logger.info("shutting down")
    finally:
        await runner.cleanup()
        restore_loop_errors()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    logger.info("stopped")


def _one_line(exc: ValidationError) -> str:
    return "; ".join(
        f"--{'.'.join(str(p) for p in e['loc']).replace('_', '-')}: {e['msg']}"
        for e in exc.errors()
    )


def _workers_skip_this_script() -> None:
    """Worker processes start with `spawn`, which first runs the parent's main script again in
    each child (multiprocessing's `__mp_main__`). For the `live-v2v` script that is `from
    live.cli import main`: aiohttp, aiortc, PyAV, the whole service, about a second of every
    worker start and restart and their memory for the worker's life. The script does what
    `python -m live` does; said so, spawn leaves it out (it never runs a `__main__` module of a
    package again)."""
    script = sys.modules.get("__main__")
    if script is not None and getattr(script, "__spec__", None) is None:
        script.__spec__ = importlib.util.find_spec("live.__main__")


def main(argv: Sequence[str] | None = None) -> int:
    _workers_skip_this_script()
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or (argv[0].startswith("--") and argv[0] != "--help"):
        # `live-v2v` (or `python -m live --port 9000`) serves, like `live-v2v serve`.
        argv.insert(0, "serve")
    args = parser.parse_args(argv)
    if args.command == "models":
        configure_logging("WARNING")
        return run_models(args)
    if args.command == "replay":
        configure_logging("WARNING")
        from .recording import run_replay

        return run_replay(args)
    try:
        settings = load_settings(args)
        # Parsed here, before logging is set up and anything starts: a bad list is one line.
        settings.cors()
    except ValidationError as exc:
        parser.error(_one_line(exc))
    except ValueError as exc:
        parser.error(str(exc))
    configure_logging(settings.log_level, settings.log_format)
    try:
        asyncio.run(serve(settings))
    except (StartupError, ValueError) as exc:
        # A setting the operator must change: one line, no traceback.
        parser.exit(2, f"{parser.prog}: error: {exc}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
