"""HTTP routes of live sessions: start, status, params, stop; and the pipeline list."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from batch.route import GATEWAY_PREFIXES
from protocol.api import LiveVideoToVideoParams
from protocol.errors import InvalidFields, InvalidRequest
from protocol.requests import read_json, require_bearer

from .keys import SESSIONS, SETTINGS


def check_auth(request: web.Request) -> None:
    require_bearer(request, request.app[SETTINGS].auth_token)


def public_origin(request: web.Request) -> str:
    """Where clients reach the service: --public-url, else what this request was sent to."""
    settings = request.app[SETTINGS]
    if settings.public_url:
        return settings.public_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


async def post_live_video_to_video(request: web.Request) -> web.Response:
    check_auth(request)
    try:
        body = LiveVideoToVideoParams.model_validate(await read_json(request))
    except ValidationError as exc:
        raise InvalidFields.from_validation(exc, "body") from exc
    response = await request.app[SESSIONS].start(body, public_origin(request))
    return web.json_response(response.model_dump())


async def get_session(request: web.Request) -> web.Response:
    check_auth(request)
    manager = request.app[SESSIONS]
    session = manager.get(request.match_info["id"])
    status = session.status().model_dump(mode="json")
    device = manager.admission.device_of(session.id)
    return web.json_response({"id": session.id, "ended": session.ended, "device": device, **status})


async def post_session_params(request: web.Request) -> web.Response:
    check_auth(request)
    session = request.app[SESSIONS].get(request.match_info["id"])
    body = await read_json(request)
    if not isinstance(body, dict):
        raise InvalidRequest("params must be a JSON object")
    try:
        outcome = await session.update_params(body)
    except ValidationError:
        raise  # 422 with loc/msg/type, from the error middleware
    except ValueError as exc:
        raise InvalidRequest(str(exc)) from exc
    return web.json_response({"outcome": outcome, "params": session.params.model_dump()})


async def delete_session(request: web.Request) -> web.Response:
    check_auth(request)
    manager = request.app[SESSIONS]
    session_id = request.match_info["id"]
    await manager.stop(session_id)
    return web.json_response({"id": session_id, "ended": True})


async def get_pipelines(request: web.Request) -> web.Response:
    known = await request.app[SESSIONS].availability()
    return web.json_response({"default": known.default, "pipelines": known.pipelines})


def add_live_routes(app: web.Application) -> None:
    app.router.add_post("/live-video-to-video", post_live_video_to_video)
    # ai-runner (FastAPI) serves the route with a trailing slash too; gateways may use either.
    app.router.add_post("/live-video-to-video/", post_live_video_to_video)
    # Livepeer's gateway API, where its SDKs call it (`livepeer-ai`'s live_video_to_video).
    for prefix in GATEWAY_PREFIXES:
        app.router.add_post(prefix + "/live-video-to-video", post_live_video_to_video)
    app.router.add_get("/live-video-to-video/{id}", get_session)
    app.router.add_post("/live-video-to-video/{id}/params", post_session_params)
    app.router.add_delete("/live-video-to-video/{id}", delete_session)
    app.router.add_get("/pipelines", get_pipelines)
