"""WHIP (RFC 9725) and WHEP routes: SDP offer in, 201 with the answer and a resource to DELETE.

Two ways in, as for trickle: the API routes under `/live-video-to-video/{id}/` take the bearer
token; `/whip/{channel}` and `/whep/{channel}`, handed out by a session start, are capabilities
(the channel names are the session's random trickle names for input and output).
`POST /live-video-to-video/whip` starts a session and publishes to it in one request, so a plain
WHIP client (OBS, GStreamer, a browser) goes live with one URL.
"""

from __future__ import annotations

from collections.abc import Awaitable

from aiohttp import web
from pydantic import ValidationError

from protocol.api import LiveVideoToVideoParams
from protocol.bounded_json import JSONRefused, loads
from protocol.errors import (
    Conflict,
    InvalidFields,
    InvalidRequest,
    NotFound,
    ServiceError,
    TooBusy,
    Unavailable,
    UnsupportedMediaType,
    in_words,
)

from .keys import SESSIONS, SETTINGS
from .routes import check_auth, public_origin
from .sdp_offer import check_offer
from .sdpfrag import TRICKLE_ICE, parse_fragment
from .session import LiveSession
from .webrtc import ClosedWhileAnswering, NoCandidates, Peer, Peers

SDP = "application/sdp"
MAX_SDP_BYTES = 64 * 1024
"""The largest SDP offer or trickle-ICE fragment taken (a browser's offer is 5-10 KiB)."""
RETRY_AFTER_S = 10
"""Retry-After of a refusal that passes when a connection leaves (viewer cap, UDP ports)."""


class PreconditionFailed(ServiceError):
    status = 412


class PreconditionRequired(ServiceError):
    status = 428


async def _read_sdp(request: web.Request, what: str) -> str:
    if (request.content_length or 0) > MAX_SDP_BYTES:
        raise InvalidRequest(f"{what} over {MAX_SDP_BYTES} bytes")
    body = b""
    # `read(n)` returns what has arrived so far: an offer in several TCP segments is read whole.
    while chunk := await request.content.read(MAX_SDP_BYTES + 1 - len(body)):
        body += chunk
        if len(body) > MAX_SDP_BYTES:
            break
    if len(body) > MAX_SDP_BYTES:
        raise InvalidRequest(f"{what} over {MAX_SDP_BYTES} bytes")
    return body.decode("utf-8", errors="replace")


async def read_offer(request: web.Request) -> str:
    if request.content_type != SDP:
        raise UnsupportedMediaType(f"send the SDP offer as {SDP}")
    offer = await _read_sdp(request, "an SDP offer")
    if "v=0" not in offer or "m=" not in offer:
        raise InvalidRequest("the body is not an SDP offer (no v= or m= line)")
    check_offer(offer)  # before any peer connection is made for it
    return offer


def _created(request: web.Request, answer: str, peer: Peer, links: list[str]) -> web.Response:
    ice = request.app[SETTINGS].ice().link_headers()
    response = web.Response(
        status=201,
        text=answer,
        content_type=SDP,
        headers={"Location": f"/webrtc/{peer.id}", "ETag": peer.etag, "Accept-Patch": TRICKLE_ICE},
    )
    for link in [*ice, *links]:
        response.headers.add("Link", link)
    return response


async def _publish(
    request: web.Request,
    session: LiveSession,
    offer: str | None = None,
    *,
    with_whep_link: bool,
) -> web.Response:
    """`with_whep_link` for the token's routes only: the WHEP URL is the output's capability,
    which a publish capability (`/whip/{input channel}`) must not reveal."""
    if not session.running:
        raise NotFound("this session has ended")
    whip = session.whip
    if whip is None or whip.closed:
        raise Conflict(
            "this session is not fed over WHIP: its input is a trickle channel "
            "(runner mode, or a trickle publisher came first)"
        )
    offer = offer if offer is not None else await read_offer(request)
    peers = request.app[SESSIONS].peers
    # A publisher that comes back replaces the one before it (one input per session).
    await _close_publishers(peers, session.id)
    peer, answer = await _negotiate(request, peers.publish(session.id, whip, offer))
    # Publishers that negotiated at the same time: the last one answered stays.
    await _close_publishers(peers, session.id, but=peer)
    await _keep_if_wanted(request, session, peers, peer)
    links = []
    if with_whep_link:
        whep = f"{public_origin(request)}/whep/{session.channels.get('output', '')}"
        links.append(f'<{whep}>; rel="urn:ietf:params:whep"')
    return _created(request, answer, peer, links)


async def _close_publishers(peers: Peers, session_id: str, but: Peer | None = None) -> None:
    """Close the session's answered publishers (but `but`). One still negotiating is left to
    finish: it closes the others in turn, so the last one answered stays."""
    # Chosen in one step: a publisher answered while these close is not among them.
    replaced = [
        p.id
        for p in peers.peers.values()
        if p.session_id == session_id and p.kind == "whip" and p.answered and p is not but
    ]
    for peer_id in replaced:
        await peers.close(peer_id)


async def _keep_if_wanted(
    request: web.Request, session: LiveSession, peers: Peers, peer: Peer
) -> None:
    """Close a peer answered for nobody. A session that ended while the offer was read or
    answered has closed its peers already: this one would be left over. A client that left
    meanwhile never learns the peer's Location: closed now rather than at
    --webrtc-connect-timeout-s (under `live-v2v serve` its request is cancelled instead)."""
    if not session.running:
        await peers.close(peer.id)
        raise NotFound("the session ended while this offer was being answered")
    if request.transport is None or request.transport.is_closing():
        await peers.close(peer.id)


async def _play(request: web.Request, session: LiveSession) -> web.Response:
    if not session.running:
        raise NotFound("this session has ended")
    settings = request.app[SETTINGS]
    peers = request.app[SESSIONS].peers
    # Reserved before the first await, or offers arriving together would all pass the check.
    reservation = peers.reserve(session.id, "whep", settings.max_viewers)
    if reservation is None:
        raise TooBusy(
            f"this session has its maximum of {settings.max_viewers} WHEP viewers",
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    try:
        offer = await read_offer(request)
        peer, answer = await _negotiate(
            request, peers.play(session.id, offer, session.add_sink, reservation)
        )
    finally:
        reservation.release()
    await _keep_if_wanted(request, session, peers, peer)
    return _created(request, answer, peer, [])


async def _negotiate(
    request: web.Request, negotiation: Awaitable[tuple[Peer, str]]
) -> tuple[Peer, str]:
    try:
        return await negotiation
    except ValueError as exc:
        # aiortc refuses offers it cannot answer (no common codec, bad SDP) with ValueError.
        raise InvalidRequest(f"cannot answer this SDP offer: {in_words(exc)}") from exc
    except ClosedWhileAnswering as exc:
        raise NotFound("the session ended while this offer was being answered") from exc
    except NoCandidates as exc:
        ports = request.app[SETTINGS].udp_port_range()
        if ports is not None:
            raise Unavailable(
                f"the WebRTC port range is used up: every UDP port in {ports[0]}-{ports[1]} "
                "(--webrtc-udp-ports) is in use by other connections; try again when one "
                "leaves",
                retry_after_s=RETRY_AFTER_S,
            ) from exc
        raise Unavailable(
            "no ICE candidate could be gathered for this connection: the service could not "
            "open a UDP port on its addresses (--ice-host-addresses)",
            retry_after_s=RETRY_AFTER_S,
        ) from exc


async def post_whip_capability(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].by_channel("input", request.match_info["channel"])
    return await _publish(request, session, with_whep_link=False)


async def post_whep_capability(request: web.Request) -> web.Response:
    session = request.app[SESSIONS].by_channel("output", request.match_info["channel"])
    return await _play(request, session)


async def post_session_whip(request: web.Request) -> web.Response:
    check_auth(request)
    session = request.app[SESSIONS].get(request.match_info["id"])
    return await _publish(request, session, with_whep_link=True)


async def post_session_whep(request: web.Request) -> web.Response:
    check_auth(request)
    return await _play(request, request.app[SESSIONS].get(request.match_info["id"]))


async def post_whip_new_session(request: web.Request) -> web.Response:
    """Start a session (pipeline and params from the query string) and publish to it."""
    check_auth(request)
    offer = await read_offer(request)  # a bad request is refused before a session starts
    try:
        params = loads(request.query.get("params", "{}"), what="params")
    except JSONRefused as exc:
        raise InvalidRequest(str(exc)) from None
    try:
        body = LiveVideoToVideoParams(model_id=request.query.get("model_id", ""), params=params)
    except ValidationError as exc:
        raise InvalidFields.from_validation(exc, "query") from exc
    manager = request.app[SESSIONS]
    started = await manager.start(body, public_origin(request))
    session = manager.get(started.session_id)
    try:
        response = await _publish(request, session, offer, with_whep_link=True)
    except BaseException:
        await session.stop("stopped")
        raise
    response.headers["X-Session-Id"] = session.id
    return response


async def delete_peer(request: web.Request) -> web.Response:
    if not await request.app[SESSIONS].peers.close(request.match_info["peer"]):
        raise NotFound("no such WHIP or WHEP session")
    return web.Response(status=200)


def _check_if_match(request: web.Request, peer: Peer) -> None:
    # RFC 9725 §4.3.1: PATCHes may arrive out of order, so each names the ICE session it was
    # meant for; a missing tag is 428, another session's (or a weak one) 412.
    header = request.headers.get("If-Match")
    if header is None:
        raise PreconditionRequired(
            "send If-Match with the ETag of the WHIP or WHEP answer (or * for an ICE restart)"
        )
    tags = [tag.strip() for tag in header.split(",")]
    if "*" not in tags and peer.etag not in tags:
        raise PreconditionFailed(
            "If-Match does not name this connection's ICE session (its ETag is in the answer)"
        )


async def patch_peer(request: web.Request) -> web.Response:
    """Trickle ICE (RFC 9725 §4.3): the client's late candidates, 204. ICE restarts are
    refused with 422, as the RFC asks of a session that trickles but cannot restart (aiortc
    has no ICE restart); the connection goes on with its current ICE session."""
    peer = request.app[SESSIONS].peers.peers.get(request.match_info["peer"])
    if peer is None:
        raise NotFound("no such WHIP or WHEP session")
    _check_if_match(request, peer)
    if request.content_type != TRICKLE_ICE:
        raise UnsupportedMediaType(f"send ICE candidates as {TRICKLE_ICE}")
    fragment = parse_fragment(await _read_sdp(request, "an SDP fragment"))
    ufrag, pwd = peer.remote_ice
    if (fragment.ufrag is not None and fragment.ufrag != ufrag) or (
        fragment.pwd is not None and fragment.pwd != pwd
    ):
        # 422 in the service's validation shape (`detail` a list), as the document says.
        raise InvalidFields(
            [
                {
                    "loc": ["body", "ice-ufrag"],
                    "msg": "ICE restarts are not supported: new ICE credentials in a PATCH "
                    "are refused; the connection keeps its ICE session (POST again to start "
                    "a new one)",
                    "type": "ice_restart",
                }
            ]
        )
    limit = request.app[SETTINGS].webrtc_max_candidates
    if peer.trickled + len(fragment.candidates) > limit:
        raise InvalidRequest(
            f"more than {limit} trickled ICE candidates for one connection "
            "(--webrtc-max-candidates)"
        )
    peer.trickled += len(fragment.candidates)  # before any await: PATCHes may overlap
    await request.app[SESSIONS].peers.trickle(peer, fragment)
    return web.Response(status=204)


async def peer_options(request: web.Request) -> web.Response:
    return web.Response(
        status=204, headers={"Allow": "DELETE, OPTIONS, PATCH", "Accept-Patch": TRICKLE_ICE}
    )


async def options(request: web.Request) -> web.Response:
    # RFC 9725 §4.4: OPTIONS may be used for CORS preflight and to learn the ICE servers.
    response = web.Response(status=204, headers={"Accept-Post": SDP, "Allow": "OPTIONS, POST"})
    for link in request.app[SETTINGS].ice().link_headers():
        response.headers.add("Link", link)
    return response


def add_webrtc_routes(app: web.Application) -> None:
    router = app.router
    router.add_post("/live-video-to-video/whip", post_whip_new_session)
    router.add_post("/live-video-to-video/{id}/whip", post_session_whip)
    router.add_post("/live-video-to-video/{id}/whep", post_session_whep)
    router.add_post("/whip/{channel}", post_whip_capability)
    router.add_post("/whep/{channel}", post_whep_capability)
    router.add_delete("/webrtc/{peer}", delete_peer)
    router.add_patch("/webrtc/{peer}", patch_peer)
    router.add_route("OPTIONS", "/webrtc/{peer}", peer_options)
    for path in (
        "/live-video-to-video/whip",
        "/live-video-to-video/{id}/whip",
        "/live-video-to-video/{id}/whep",
        "/whip/{channel}",
        "/whep/{channel}",
    ):
        router.add_route("OPTIONS", path, options)
