"""The service's OpenAPI document at `GET /openapi.json`, and a page listing it at `GET /docs`.

The document is generated (protocol/openapi.py) from `Operation`s: the batch routes declare
theirs next to their handlers (`batch.operations()`); the live routes' are here, one per route
of live/routes.py, live/webrtc_routes.py, live/health.py, live/event_stream.py, live/page.py,
this module and the trickle sub-app, with the pydantic models their handlers use. Where a
handler writes its body without a model, a model below describes exactly what it writes.
Neither route takes the bearer token: the document says which routes do.
"""

from __future__ import annotations

import hashlib
import json
from base64 import b64encode
from dataclasses import replace
from typing import Any, Literal

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, RootModel

from batch.route import GATEWAY_PREFIXES, gateway_operation_id
from protocol.api import (
    Capacity,
    HardwareInformation,
    HardwareStats,
    LiveVideoToVideoParams,
    LiveVideoToVideoResponse,
    Version,
)
from protocol.messages import StatusEvent
from protocol.openapi import Operation, build_openapi

from .keys import SETTINGS

TITLE = "live-v2v"
DESCRIPTION = (
    "Real-time AI video restyling (live-video-to-video over trickle or WebRTC) and the batch "
    "pipelines of Livepeer's AI runner, wire-compatible with its API."
)
SDP = "application/sdp"
TEXT = "text/plain"

# -- Bodies written without a model by their handlers ---------------------------------------


class HealthCheck(BaseModel):
    """`GET /health` (the runner spec's `HealthCheck`, with LOADING while a model loads)."""

    status: Literal["LOADING", "OK", "ERROR", "IDLE"] = Field(
        description="IDLE: no session; LOADING: a session or a batch model is loading; "
        "ERROR: a session failed; OK: sessions running."
    )
    capacity: Capacity | None = Field(
        None, description="Ours, beyond the spec: what the service can still take."
    )
    workers: list[dict[str, Any]] | None = Field(
        None,
        description="Ours, with --worker-process: each device's worker process (state, pid, "
        "restarts, last failure).",
    )
    error: str | None = Field(
        None, description="Ours: why a device's worker process failed for good (status ERROR)."
    )


class PipelineInfo(BaseModel):
    name: str = Field(description="The name to give as `model_id` when starting a session.")
    description: str
    live_params: list[str] = Field(description="Params that change without a reload.")
    params: dict[str, Any] = Field(description="The JSON schema of the pipeline's params.")
    requires_gpu: bool = Field(
        description="Made for a GPU: real time only there (a CUDA GPU; Apple's MPS too)."
    )
    unavailable: str | None = Field(
        description="Why the pipeline cannot run here, or null. On a host without the GPU it "
        "requires, this says so first (and what runs here instead), then any missing weights."
    )
    note: str | None = Field(
        description="How the pipeline runs here when that needs saying (on the CPU: not real "
        "time), or null."
    )


class PipelineList(BaseModel):
    """`GET /pipelines`: the live pipelines and the one used when a start names none."""

    default: str = Field(description="The pipeline a start request without model_id gets.")
    pipelines: list[PipelineInfo]


class SessionStatus(StatusEvent):
    """`GET /live-video-to-video/{id}`: the session's status event, with its id and why it
    ended."""

    id: str
    ended: str | None = Field(
        description="Why the session ended (as `end_reason`), or null while it runs."
    )
    device: str | None = Field(
        description="The device it runs on (cuda:0, cpu, cpu:1), or null for a pipeline that "
        "uses none."
    )


class SessionParams(RootModel[dict[str, Any]]):
    """A complete set of the session's pipeline params (fields not given take their
    defaults); a change to a param outside the pipeline's `live_params` reloads it."""


class ParamsUpdate(BaseModel):
    """`POST /live-video-to-video/{id}/params`: how the new params were applied."""

    outcome: Literal["unchanged", "live", "reload"] = Field(
        description="unchanged: the same params; live: applied at once; reload: the pipeline "
        "reloads with them."
    )
    params: dict[str, Any] = Field(description="The session's params now.")


class SessionStopped(BaseModel):
    """`DELETE /live-video-to-video/{id}`."""

    id: str
    ended: bool = Field(description="Always true.")


class WhipStartQuery(BaseModel):
    """Query of `POST /live-video-to-video/whip`: the session to start."""

    model_config = ConfigDict(extra="ignore")

    model_id: str = Field(
        "", description="Name of the live pipeline (empty: the default pipeline)."
    )
    params: str = Field("{}", description="Initial pipeline params, as a JSON object.")


# -- Operations ---------------------------------------------------------------------------

ID = (("id", "The session id (`session_id` of the start answer)."),)
LIVE = ("live",)
SERVICE = ("service",)
WEBRTC = ("webrtc",)
TRICKLE_TAG = ("trickle",)
WHIP_HEADERS = (
    ("Location", "The WebRTC resource, to DELETE to end this peer and PATCH to trickle ICE."),
    (
        "Link",
        "The ICE servers (RFC 9725); on the token's WHIP routes also the session's WHEP URL "
        '(rel="urn:ietf:params:whep"), never on the WHIP capability `/whip/{channel}`.',
    ),
    ("ETag", "The ICE session's entity-tag, for If-Match on PATCH (RFC 9725 §4.3.1)."),
    ("Accept-Patch", "application/trickle-ice-sdpfrag"),
)


def _webrtc_options(path: str, operation_id: str) -> Operation:
    return Operation(
        method="OPTIONS",
        path=path,
        operation_id=operation_id,
        summary="WebRTC Options",
        description="CORS preflight and ICE server discovery (RFC 9725 §4.4).",
        response_type="",
        status=204,
        response_headers=(
            ("Accept-Post", "application/sdp"),
            ("Allow", "OPTIONS, POST"),
            ("Link", "The ICE servers, one header each."),
        ),
        errors=(500,),
        auth=False,
        tags=WEBRTC,
    )


def _sdp_exchange(path: str, operation_id: str, summary: str, **fields: Any) -> Operation:
    """A WHIP or WHEP POST: an SDP offer in, the SDP answer out as a created resource."""
    shared: dict[str, Any] = {
        "request_type": SDP,
        "response_type": SDP,
        "status": 201,
        "response_headers": WHIP_HEADERS,
        "tags": WEBRTC,
    }
    return Operation("POST", path, operation_id, summary, **{**shared, **fields})


def _webrtc_peer(method: str, operation_id: str, summary: str, **fields: Any) -> Operation:
    """An operation on a WHIP or WHEP peer's resource (its answer's `Location`)."""
    return Operation(
        method,
        "/webrtc/{peer}",
        operation_id,
        summary,
        path_params=(("peer", "The peer id."),),
        auth=False,
        tags=WEBRTC,
        **fields,
    )


def live_operations(trickle_base_path: str = "/trickle/") -> list[Operation]:
    """Every live route's operation, the trickle routes under `trickle_base_path`."""
    start = Operation(
        method="POST",
        path="/live-video-to-video",
        operation_id="genLiveVideoToVideo",
        summary="Live Video To Video",
        description="Start a live session: standalone (no URLs: the service hosts the "
        "channels and hands them out) or runner mode (the gateway's trickle URLs).",
        request=LiveVideoToVideoParams,
        request_type="application/json",
        response=LiveVideoToVideoResponse,
        errors=(400, 401, 403, 413, 415, 429, 500, 503, 422),
        tags=("generate",),
    )
    operations = [
        start,
        replace(
            start,
            path="/live-video-to-video/",
            operation_id="genLiveVideoToVideoSlash",
            description="The same as without the trailing slash (ai-runner answers both).",
        ),
        *(
            replace(
                start,
                path=prefix + "/live-video-to-video",
                operation_id=gateway_operation_id(prefix, start.operation_id),
                description=start.description + " Livepeer's gateway API (its SDKs' paths).",
                tags=("gateway",),
            )
            for prefix in GATEWAY_PREFIXES
        ),
        Operation(
            method="GET",
            path="/live-video-to-video/{id}",
            operation_id="getLiveSession",
            summary="Live Session Status",
            description="The session's current status.",
            response=SessionStatus,
            errors=(401, 404, 500),
            path_params=ID,
            tags=LIVE,
        ),
        Operation(
            method="POST",
            path="/live-video-to-video/{id}/params",
            operation_id="updateLiveSessionParams",
            summary="Update Live Session Params",
            description="Replace the session's pipeline params (as a control message would).",
            request=SessionParams,
            request_type="application/json",
            response=ParamsUpdate,
            errors=(400, 401, 404, 413, 415, 500, 422),
            path_params=ID,
            tags=LIVE,
        ),
        Operation(
            method="DELETE",
            path="/live-video-to-video/{id}",
            operation_id="stopLiveSession",
            summary="Stop Live Session",
            description="Stop the session and release its channels and peers.",
            response=SessionStopped,
            errors=(401, 404, 500),
            path_params=ID,
            tags=LIVE,
        ),
        Operation(
            method="GET",
            path="/pipelines",
            operation_id="listPipelines",
            summary="Pipelines",
            description="The live pipelines, their params and whether they can run here.",
            response=PipelineList,
            errors=(500,),
            auth=False,
            tags=LIVE,
        ),
        # live/webrtc_routes.py
        _sdp_exchange(
            "/live-video-to-video/whip",
            "startLiveSessionWhip",
            summary="Start Live Session over WHIP",
            description="Start a session (pipeline and params from the query) and publish to "
            "it: the body is the WHIP offer, the answer the SDP answer.",
            query=WhipStartQuery,
            response_headers=(
                *WHIP_HEADERS,
                ("X-Session-Id", "The started session's id."),
            ),
            errors=(400, 401, 403, 409, 413, 415, 429, 500, 503, 422),
        ),
        _sdp_exchange(
            "/live-video-to-video/{id}/whip",
            "publishLiveSessionWhip",
            summary="Publish to Live Session (WHIP)",
            description="Publish the session's input over WebRTC; a new publisher replaces "
            "the one before.",
            errors=(400, 401, 404, 409, 415, 500, 503),
            path_params=ID,
        ),
        _sdp_exchange(
            "/live-video-to-video/{id}/whep",
            "playLiveSessionWhep",
            summary="Play Live Session (WHEP)",
            description="Receive the session's output over WebRTC.",
            errors=(400, 401, 404, 415, 429, 500, 503),
            path_params=ID,
        ),
        _sdp_exchange(
            "/whip/{channel}",
            "publishWhip",
            summary="Publish (WHIP capability)",
            description="As the session's WHIP route, without a token: the URL (`whip_url` "
            "of the start answer) is the capability to publish, and only that: its answer "
            "carries no WHEP link (watching takes `whep_url`).",
            errors=(400, 404, 409, 415, 500, 503),
            path_params=(("channel", "The session's input channel name."),),
            auth=False,
        ),
        _sdp_exchange(
            "/whep/{channel}",
            "playWhep",
            summary="Play (WHEP capability)",
            description="As the session's WHEP route, without a token: the URL (`whep_url` "
            "of the start answer) is the capability.",
            errors=(400, 404, 415, 429, 500, 503),
            path_params=(("channel", "The session's output channel name."),),
            auth=False,
        ),
        _webrtc_peer(
            "DELETE",
            "closeWebrtcPeer",
            summary="Close WebRTC Peer",
            description="End a WHIP or WHEP peer (the `Location` of its answer).",
            response_type="",
            errors=(404, 500),
        ),
        _webrtc_peer(
            "PATCH",
            "trickleWebrtcPeer",
            summary="Trickle ICE to WebRTC Peer",
            description="Add the client's ICE candidates (RFC 9725 §4.3): an RFC 8840 "
            "fragment, with If-Match naming the answer's ETag (428 without, 412 for another). "
            "An ICE restart (new ufrag/pwd) is refused with 422: not supported.",
            request_type="application/trickle-ice-sdpfrag",
            response_type="",
            status=204,
            errors=(400, 404, 412, 415, 428, 500, 422),
        ),
        _webrtc_peer(
            "OPTIONS",
            "optionsWebrtcPeer",
            summary="WebRTC Peer Options",
            description="What the resource takes: DELETE, and PATCH with trickle ICE.",
            response_type="",
            status=204,
            response_headers=(
                ("Allow", "DELETE, OPTIONS, PATCH"),
                ("Accept-Patch", "application/trickle-ice-sdpfrag"),
            ),
            errors=(500,),
        ),
        _webrtc_options("/live-video-to-video/whip", "optionsStartLiveSessionWhip"),
        _webrtc_options("/live-video-to-video/{id}/whip", "optionsPublishLiveSessionWhip"),
        _webrtc_options("/live-video-to-video/{id}/whep", "optionsPlayLiveSessionWhep"),
        _webrtc_options("/whip/{channel}", "optionsPublishWhip"),
        _webrtc_options("/whep/{channel}", "optionsPlayWhep"),
        # live/event_stream.py
        Operation(
            method="GET",
            path="/events/{channel}",
            operation_id="streamLiveSessionEvents",
            summary="Live Session Events",
            description="Server-sent events: the session's status, then each of its events "
            "as the events channel carries them (`data: <json>`), until its final status.",
            response_type="text/event-stream",
            errors=(404, 500),
            path_params=(("channel", "The session's events channel name."),),
            auth=False,
            tags=LIVE,
        ),
        # live/health.py
        Operation(
            method="GET",
            path="/health",
            operation_id="health",
            summary="Health",
            response=HealthCheck,
            errors=(500,),
            auth=False,
            tags=SERVICE,
        ),
        Operation(
            method="GET",
            path="/version",
            operation_id="version",
            summary="Version",
            response=Version,
            errors=(500,),
            auth=False,
            tags=SERVICE,
        ),
        Operation(
            method="GET",
            path="/hardware/info",
            operation_id="hardware_info",
            summary="Hardware Info",
            response=HardwareInformation,
            errors=(500,),
            auth=False,
            tags=SERVICE,
        ),
        Operation(
            method="GET",
            path="/hardware/stats",
            operation_id="hardware_stats",
            summary="Hardware Stats",
            response=HardwareStats,
            errors=(500,),
            auth=False,
            tags=SERVICE,
        ),
        # live/metrics.py
        Operation(
            method="GET",
            path="/metrics",
            operation_id="metrics",
            summary="Prometheus Metrics",
            description="Sessions, frames, stage times, batch requests, trickle and WebRTC "
            "figures in Prometheus's text format. Takes the token when one is set.",
            response_type="text/plain",
            errors=(401, 500),
            tags=SERVICE,
        ),
        # live/page.py
        Operation(
            method="GET",
            path="/",
            operation_id="page",
            summary="Web Page",
            description="The browser page: camera in, restyled video out.",
            response_type="text/html",
            errors=(),
            auth=False,
            tags=SERVICE,
        ),
        Operation(
            method="GET",
            path="/web/{filename}",
            operation_id="pageAsset",
            summary="Web Page Files",
            description="The page's scripts and styles.",
            response_type="application/octet-stream",
            errors=(403, 404),
            path_params=(("filename", "A file of the web/ folder."),),
            auth=False,
            tags=SERVICE,
        ),
        # this module
        Operation(
            method="GET",
            path="/openapi.json",
            operation_id="openapi",
            summary="OpenAPI Document",
            description="This document.",
            errors=(),
            auth=False,
            tags=SERVICE,
        ),
        Operation(
            method="GET",
            path="/docs",
            operation_id="docs",
            summary="API Docs",
            description="A page listing this document's operations.",
            response_type="text/html",
            errors=(),
            auth=False,
            tags=SERVICE,
        ),
    ]
    return operations + trickle_operations(trickle_base_path)


def trickle_operations(base: str) -> list[Operation]:
    """The trickle sub-app's routes (protocol/trickle/server.py), answering in go-livepeer's
    plain-text dialect: no token (channel names are capabilities), errors as text."""
    base = "/" + base.strip("/") + "/" if base.strip("/") else "/"
    channel = (("channel", "The channel name (letters, digits, '.', '_', '-')."),)
    seq = (
        *channel,
        ("seq", "The segment number; -1: the next one, -2 (GET only): the latest started."),
    )
    seq_headers = (
        ("Lp-Trickle-Seq", "The segment's number."),
        ("Lp-Trickle-Latest", "The channel's next segment to be written."),
        ("Lp-Trickle-Closed", "'terminated' once the channel has ended."),
    )

    def op(method: str, path: str, operation_id: str, summary: str, **kw: Any) -> Operation:
        kw.setdefault("response_type", "")
        return Operation(
            method=method,
            path=base + path,
            operation_id=operation_id,
            summary=summary,
            auth=False,
            error_type=TEXT,
            tags=TRICKLE_TAG,
            **kw,
        )

    return [
        op(
            "POST",
            "{channel}",
            "trickleCreateChannel",
            "Create Channel",
            description="Create the channel (when the server autocreates), or confirm it "
            "exists. `Expect-Content` names its media type.",
            errors=(400, 404, 429),
            path_params=channel,
        ),
        op(
            "DELETE",
            "{channel}",
            "trickleDeleteChannel",
            "Delete Channel",
            description="End the channel: its readers see the end of the stream.",
            errors=(400, 403),
            path_params=channel,
        ),
        op(
            "GET",
            "{channel}/next",
            "trickleNextSeq",
            "Next Segment Number",
            description="The number of the segment to be written next, as text.",
            response_type=TEXT,
            response_headers=seq_headers[1:],
            errors=(400, 403, 404),
            path_params=channel,
        ),
        op(
            "GET",
            "{channel}/{seq}",
            "trickleReadSegment",
            "Read Segment",
            description="The segment's bytes, streamed as they are written (the channel's "
            "media type). 470: the segment is gone or not yet started.",
            response_type="application/octet-stream",
            response_headers=seq_headers,
            errors=(400, 403, 404, 470, 499),
            path_params=seq,
        ),
        op(
            "POST",
            "{channel}/{seq}",
            "trickleWriteSegment",
            "Write Segment",
            description="Write the segment, streamed (readers get its bytes as they arrive).",
            request_type="application/octet-stream",
            response_headers=seq_headers[:1] + seq_headers[2:],
            errors=(400, 403, 404, 413),
            path_params=seq,
        ),
        op(
            "DELETE",
            "{channel}/{seq}",
            "trickleCloseSegment",
            "Close Segment",
            description="Close a segment that is being written.",
            errors=(400, 403, 404),
            path_params=seq,
        ),
    ]


def service_operations(trickle_base_path: str = "/trickle/") -> list[Operation]:
    """Every operation of the service: the batch routes, then the live ones."""
    from batch import operations as batch_operations

    return [*batch_operations(), *live_operations(trickle_base_path)]


def openapi_document(trickle_base_path: str = "/trickle/") -> dict[str, Any]:
    from .health import service_version

    return build_openapi(
        service_operations(trickle_base_path),
        title=TITLE,
        version=service_version(),
        description=DESCRIPTION,
    )


# -- Routes -------------------------------------------------------------------------------


def add_openapi_routes(app: web.Application) -> None:
    """`GET /openapi.json` (built on its first request, then served as built) and
    `GET /docs`. Neither takes the bearer token."""
    built: list[bytes] = []

    async def get_openapi(request: web.Request) -> web.Response:
        if not built:
            document = openapi_document(request.app[SETTINGS].trickle().base_path)
            built.append(json.dumps(document, separators=(",", ":")).encode())
        return web.Response(body=built[0], content_type="application/json")

    async def get_docs(request: web.Request) -> web.Response:
        return web.Response(
            text=DOCS_HTML,
            content_type="text/html",
            headers={"Content-Security-Policy": DOCS_POLICY, "Cache-Control": "no-cache"},
        )

    app.router.add_get("/openapi.json", get_openapi)
    app.router.add_get("/docs", get_docs)


# -- The docs page ------------------------------------------------------------------------
# One self-contained page: its style and script are inline (nothing outside is reachable), and
# its policy allows exactly those two by their hashes, plus fetching /openapi.json. The
# script writes only text nodes (textContent), never markup taken from the document.

DOCS_STYLE = """
body { font: 15px/1.45 system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem;
  color: #1d1d1f; }
h1 { margin-bottom: 0; } .sub { color: #666; margin-top: .2rem; }
details.op { border: 1px solid #ddd; border-radius: 6px; margin: .4rem 0; }
details.op > summary { cursor: pointer; padding: .45rem .6rem; list-style: none; }
details.op[open] > summary { border-bottom: 1px solid #ddd; }
.body { padding: .3rem .8rem .8rem; }
.m { display: inline-block; min-width: 4.5rem; font: bold 12px monospace; color: #fff;
  text-align: center; border-radius: 3px; padding: 2px 0; margin-right: .5rem; }
.GET { background: #2b7bb9; } .POST { background: #2f9e44; } .DELETE { background: #c92a2a; }
.OPTIONS { background: #777; } .PUT, .PATCH { background: #d9822b; }
.path { font-family: monospace; font-weight: bold; } .sum { color: #555; margin-left: .5rem; }
.lock { color: #b8860b; margin-left: .4rem; font-size: 12px; }
table { border-collapse: collapse; width: 100%; margin: .3rem 0; font-size: 14px; }
th, td { text-align: left; border-bottom: 1px solid #eee; padding: 3px 6px; vertical-align: top; }
code, .t { font-family: monospace; } .t { color: #8a3ffc; } h4 { margin: .7rem 0 .2rem; }
"""

DOCS_SCRIPT = """
const el = (tag, text, cls) => {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
};
let doc = null;
const resolve = (s) => {
  for (let i = 0; s && s.$ref && i < 20; i++) {
    s = s.$ref.split("/").slice(1).reduce((o, k) => (o ? o[k] : undefined), doc);
  }
  return s || {};
};
const typeOf = (s) => {
  if (!s) return "any";
  if (s.$ref) return s.$ref.split("/").pop();
  if (s.anyOf || s.oneOf) return (s.anyOf || s.oneOf).map(typeOf).join(" | ");
  if (s.enum) return s.enum.map((v) => JSON.stringify(v)).join(" | ");
  if (s.const !== undefined) return JSON.stringify(s.const);
  if (s.type === "array") return typeOf(s.items) + "[]";
  if (s.type === "object" && s.additionalProperties) return "object";
  const t = s.type || "any";
  return s.format ? t + " (" + s.format + ")" : String(t);
};
const describe = (s) => {
  const choices = [s, resolve(s), ...(s.anyOf || s.oneOf || []).map(resolve)];
  return choices.map((c) => c.description).find(Boolean) || "";
};
const fieldsTable = (schema) => {
  const s = resolve(schema);
  if (!s.properties) return el("p", "Type: " + typeOf(schema), "t");
  const table = el("table");
  const head = table.insertRow();
  for (const h of ["field", "type", "default", "description"]) head.append(el("th", h));
  const required = new Set(s.required || []);
  for (const [name, prop] of Object.entries(s.properties)) {
    const row = table.insertRow();
    row.append(el("td", name + (required.has(name) ? " *" : ""), "t"));
    row.append(el("td", typeOf(prop)));
    row.append(el("td", "default" in prop ? JSON.stringify(prop.default) : ""));
    row.append(el("td", describe(prop)));
  }
  return table;
};
const content = (box, c) => {
  for (const [mediaType, media] of Object.entries(c || {})) {
    box.append(el("div", mediaType, "t"));
    box.append(fieldsTable(media.schema));
  }
};
const operation = (path, method, op) => {
  const box = el("details", null, "op");
  box.id = op.operationId;
  const head = el("summary");
  head.append(el("span", method.toUpperCase(), "m " + method.toUpperCase()));
  head.append(el("span", path, "path"), el("span", op.summary, "sum"));
  if (op.security && op.security.length) head.append(el("span", "token", "lock"));
  box.append(head);
  const body = el("div", null, "body");
  if (op.description) body.append(el("p", op.description));
  body.append(el("p", "operationId: " + op.operationId, "t"));
  if (op.parameters && op.parameters.length) {
    body.append(el("h4", "Parameters"));
    const table = el("table");
    for (const p of op.parameters) {
      const row = table.insertRow();
      row.append(el("td", p.name + (p.required ? " *" : ""), "t"), el("td", p.in));
      row.append(el("td", typeOf(p.schema)), el("td", p.description || ""));
    }
    body.append(table);
  }
  if (op.requestBody) {
    body.append(el("h4", "Request body"));
    content(body, op.requestBody.content);
  }
  body.append(el("h4", "Responses"));
  for (const [code, r] of Object.entries(op.responses || {})) {
    body.append(el("div", code + " " + (r.description || ""), "t"));
    for (const [name, h] of Object.entries(r.headers || {})) {
      body.append(el("div", "header " + name + ": " + (h.description || "")));
    }
    for (const [mediaType, media] of Object.entries(r.content || {})) {
      body.append(el("div", "  " + mediaType + ": " + typeOf(media.schema)));
    }
  }
  box.append(body);
  return box;
};
const listOperations = async () => {
  const main = document.getElementById("operations");
  try {
    const response = await fetch("openapi.json");
    doc = await response.json();
  } catch (err) {
    main.append(el("p", "Cannot load openapi.json: " + err));
    return;
  }
  document.getElementById("title").textContent = doc.info.title + " " + doc.info.version;
  document.getElementById("about").textContent = doc.info.description || "";
  const groups = new Map();
  for (const [path, item] of Object.entries(doc.paths)) {
    for (const [method, op] of Object.entries(item)) {
      const tag = (op.tags && op.tags[0]) || "other";
      if (!groups.has(tag)) groups.set(tag, []);
      groups.get(tag).push(operation(path, method, op));
    }
  }
  for (const [tag, ops] of groups) {
    main.append(el("h2", tag));
    main.append(...ops);
  }
};
listOperations();
"""


def _csp_hash(source: str) -> str:
    return "'sha256-" + b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


DOCS_POLICY = (
    f"default-src 'none'; script-src {_csp_hash(DOCS_SCRIPT)}; "
    f"style-src {_csp_hash(DOCS_STYLE)}; connect-src 'self'; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)

DOCS_HTML = f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>live-v2v API</title>
<style>{DOCS_STYLE}</style>
</head>
<body>
<h1 id="title">live-v2v API</h1>
<p class="sub" id="about"></p>
<p class="sub">From <a href="openapi.json">openapi.json</a>. Fields marked * are required;
operations marked token take <code>Authorization: Bearer &lt;token&gt;</code> when the service
has one.</p>
<main id="operations"></main>
<script>{DOCS_SCRIPT}</script>
</body>
</html>
"""
