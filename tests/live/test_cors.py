"""CORS over plain HTTP: preflights, the headers on answers and errors, allowed and refused
origins, `*` against a list. The browser's side of it is tests/live/test_cross_origin.py."""

from __future__ import annotations

from typing import Any

import pytest
from aiohttp import ClientResponse

from live.app import create_app
from live.cli import main
from live.cors import CorsPolicy
from live.settings import Settings
from tests.live.conftest import PIPELINES

PAGE = "http://127.0.0.1:5173"
TOKEN = "s3cret"
CORS_HEADERS = (
    "Access-Control-Allow-Origin",
    "Access-Control-Allow-Methods",
    "Access-Control-Allow-Headers",
    "Access-Control-Expose-Headers",
    "Access-Control-Max-Age",
    "Access-Control-Allow-Credentials",
)


@pytest.fixture
async def start(aiohttp_client: Any) -> Any:
    async def start(**overrides: Any) -> Any:
        settings = Settings(status_interval_s=0.5, auth_token=TOKEN, **overrides)
        return await aiohttp_client(create_app(settings, PIPELINES))

    return start


def preflight(method: str, headers: str = "", origin: str = PAGE) -> dict[str, str]:
    asked = {"Access-Control-Request-Headers": headers} if headers else {}
    return {"Origin": origin, "Access-Control-Request-Method": method, **asked}


def names(value: str) -> set[str]:
    return {n.strip().lower() for n in value.split(",") if n.strip()}


def assert_no_cors(response: ClientResponse) -> None:
    present = [h for h in CORS_HEADERS if h in response.headers]
    assert not present, f"{response.method} {response.url}: {present}"


def assert_readable(response: ClientResponse, origin: str = "*") -> None:
    """What a page needs to read the answer: the origin allowed, the WHIP/WHEP headers exposed,
    and never a credentials opt-in."""
    assert response.headers["Access-Control-Allow-Origin"] == origin
    exposed = names(response.headers["Access-Control-Expose-Headers"])
    assert {"location", "link", "etag", "retry-after", "x-session-id"} <= exposed
    assert "Access-Control-Allow-Credentials" not in response.headers


@pytest.mark.parametrize(
    ("path", "method"),
    [
        ("/live-video-to-video/whip?model_id=noop", "POST"),
        ("/live-video-to-video/abc/whip", "POST"),
        ("/live-video-to-video/abc/whep", "POST"),
        ("/whip/abc", "POST"),
        ("/whep/abc", "POST"),
        ("/webrtc/abc", "DELETE"),
        ("/webrtc/abc", "PATCH"),
        ("/live-video-to-video", "POST"),
        ("/live-video-to-video/abc", "DELETE"),
        ("/live-video-to-video/abc/params", "POST"),
        ("/events/abc", "GET"),
        ("/pipelines", "GET"),
        ("/health", "GET"),
        ("/text-to-image", "POST"),
        ("/upscale", "POST"),
        ("/trickle/abc/0", "POST"),
    ],
)
async def test_a_preflight_is_answered_on_every_route_a_page_calls(start, path, method) -> None:
    client = await start()
    response = await client.options(
        path, headers=preflight(method, "authorization, content-type, if-match")
    )
    assert response.status == 204, await response.text()
    assert_readable(response)
    assert method.lower() in names(response.headers["Access-Control-Allow-Methods"])
    assert {"authorization", "content-type", "if-match"} <= names(
        response.headers["Access-Control-Allow-Headers"]
    )
    assert int(response.headers["Access-Control-Max-Age"]) > 0


async def test_whips_own_options_answer_keeps_its_headers_in_a_preflight(start) -> None:
    client = await start(ice_servers="stun:stun.example:3478")
    response = await client.options(
        "/live-video-to-video/whip", headers=preflight("POST", "authorization, content-type")
    )
    assert response.status == 204
    assert response.headers["Accept-Post"] == "application/sdp"
    assert "stun:stun.example:3478" in response.headers["Link"]
    assert response.headers["Access-Control-Allow-Origin"] == "*"
    # A WHIP client's plain OPTIONS (no preflight) is answered as before, with no CORS headers
    # since it sends no Origin.
    plain = await client.options("/live-video-to-video/whip")
    assert plain.status == 204 and plain.headers["Accept-Post"] == "application/sdp"
    assert_no_cors(plain)


async def test_only_the_request_headers_in_the_allowed_set_are_allowed(start) -> None:
    client = await start()
    response = await client.options(
        "/events/abc", headers=preflight("GET", "Last-Event-ID, X-Forwarded-For, Cookie")
    )
    allowed = names(response.headers["Access-Control-Allow-Headers"])
    assert "last-event-id" in allowed
    assert "x-forwarded-for" not in allowed and "cookie" not in allowed
    trickle = await client.options(
        "/trickle/abc/-1", headers=preflight("POST", "lp-trickle-reset, expect-content")
    )
    assert {"lp-trickle-reset", "expect-content"} <= names(
        trickle.headers["Access-Control-Allow-Headers"]
    )


async def test_error_answers_carry_cors_so_a_page_can_read_the_detail(start) -> None:
    client = await start()
    origin = {"Origin": PAGE}
    unauthorized = await client.post(
        "/live-video-to-video/whip?model_id=noop",
        data="v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n",
        headers={**origin, "Content-Type": "application/sdp"},
    )
    assert unauthorized.status == 401
    assert_readable(unauthorized)
    assert "www-authenticate" in names(unauthorized.headers["Access-Control-Expose-Headers"])
    assert (await unauthorized.json())["detail"]["msg"] == "missing or invalid bearer token"

    gone = await client.delete("/webrtc/nope", headers=origin)
    assert gone.status == 404
    assert_readable(gone)
    assert (await gone.json())["detail"]["msg"] == "no such WHIP or WHEP session"

    bad = await client.post(
        "/text-to-image",
        json={"prompt": ""},
        headers={**origin, "Authorization": f"Bearer {TOKEN}"},
    )
    assert bad.status == 422
    assert_readable(bad)
    assert (await bad.json())["detail"]

    trickle = await client.get("/trickle/nope/0", headers=origin)
    assert trickle.status == 404
    assert_readable(trickle)


async def test_answers_and_streams_carry_cors(start) -> None:
    client = await start()
    origin = {"Origin": PAGE}
    auth = {"Authorization": f"Bearer {TOKEN}"}
    started = await client.post(
        "/live-video-to-video", json={"model_id": "noop"}, headers={**origin, **auth}
    )
    assert started.status == 200
    assert_readable(started)
    body = await started.json()
    try:
        # The server-sent events are a response streamed by its handler: the headers go out
        # before the handler returns, and still carry CORS.
        events_path = "/events/" + body["events_stream_url"].rsplit("/", 1)[1]
        async with client.get(events_path, headers=origin) as events:
            assert events.status == 200
            assert events.content_type == "text/event-stream"
            assert_readable(events)
        # A trickle read exposes the trickle headers.
        output = body["subscribe_url"].split("/trickle/", 1)[1]
        async with client.get(f"/trickle/{output}/next", headers=origin) as read:
            assert_readable(read)
            assert {"lp-trickle-seq", "lp-trickle-latest", "lp-trickle-closed"} <= names(
                read.headers["Access-Control-Expose-Headers"]
            )
    finally:
        stopped = await client.delete(
            f"/live-video-to-video/{body['session_id']}", headers={**origin, **auth}
        )
        assert stopped.status == 200
        assert_readable(stopped)


async def test_a_list_echoes_allowed_origins_and_refuses_others(start) -> None:
    client = await start(cors_origins=f"{PAGE}, https://App.Example:443/")
    for origin in (PAGE, "https://app.example"):
        allowed = await client.options("/pipelines", headers=preflight("GET", origin=origin))
        assert allowed.status == 204
        assert_readable(allowed, origin)
        assert "origin" in names(allowed.headers["Vary"])
        answer = await client.get("/pipelines", headers={"Origin": origin})
        assert_readable(answer, origin)

    # Another origin, or the same host on another port or scheme: no CORS headers at all, so the
    # browser refuses the page its request; the preflight says why in words.
    for origin in ("http://127.0.0.1:8080", "https://127.0.0.1:5173", "https://evil.example"):
        refused = await client.options(
            "/live-video-to-video/whip", headers=preflight("POST", "authorization", origin)
        )
        assert refused.status == 403
        assert_no_cors(refused)
        assert (await refused.json())["detail"]["msg"] == (
            f"the origin {origin} may not call this service (--cors-origins)"
        )
        # A request that needs no preflight is still served (a plain form could send it), but
        # its answer is not marked for the page, so the browser does not let the page read it.
        simple = await client.get("/health", headers={"Origin": origin})
        assert simple.status == 200
        assert_no_cors(simple)
        assert "origin" in names(simple.headers["Vary"])


async def test_any_origin_is_answered_with_a_star_and_no_vary(start) -> None:
    client = await start()
    for origin in (PAGE, "https://anywhere.example", "null"):
        response = await client.get("/health", headers={"Origin": origin})
        assert_readable(response, "*")
        assert "Vary" not in response.headers


async def test_an_empty_list_turns_cors_off(start) -> None:
    client = await start(cors_origins="")
    response = await client.options("/live-video-to-video/whip", headers=preflight("POST"))
    # WHIP's own OPTIONS answer, as any OPTIONS, without CORS: the browser refuses the page.
    assert response.status == 204
    assert_no_cors(response)
    health = await client.get("/health", headers={"Origin": PAGE})
    assert_no_cors(health)


async def test_requests_without_an_origin_get_no_cors_headers(start) -> None:
    client = await start()
    assert_no_cors(await client.get("/health"))


@pytest.mark.parametrize(
    ("value", "words"),
    [
        ("*, https://app.example", "give * alone"),
        ("https://app.example/path", "'https://app.example/path' is not an origin"),
        ("app.example", "'app.example' is not an origin"),
        ("ftp://app.example", "'ftp://app.example' is not an origin"),
        ("https://user@app.example", "is not an origin"),
        ("http://localhost:99999", "'http://localhost:99999' has a bad port"),
    ],
)
def test_a_bad_cors_origins_setting_is_refused_in_words(value, words) -> None:
    with pytest.raises(ValueError, match="--cors-origins") as refused:
        CorsPolicy.parse(value)
    assert words in str(refused.value)


def test_a_bad_cors_origins_flag_stops_the_service_with_one_line(capsys) -> None:
    with pytest.raises(SystemExit) as stopped:
        main(["serve", "--port", "0", "--cors-origins", "https://app.example/page"])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert "--cors-origins: 'https://app.example/page' is not an origin" in err
    assert "Traceback" not in err


def test_origins_are_compared_as_browsers_send_them() -> None:
    policy = CorsPolicy.parse("HTTPS://App.Example:443, http://[::1]:8080/, http://a.example:80")
    assert policy.origins == {"https://app.example", "http://[::1]:8080", "http://a.example"}
    assert policy.allows("https://app.example")
    assert not policy.allows("https://app.example:8443")
    assert CorsPolicy.parse(" * ").any_origin
