"""Issue 18, runner mode attacked: a start request names trickle URLs on hosts the operator
allowed, and those hosts misbehave. Real HTTP(S) servers on 127.0.0.1 play the allowed host that
redirects, the unlisted host it points at, a control channel that refuses, and an orchestrator
with a self-signed certificate."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import ssl

import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from live.keys import SESSIONS
from live.sessions import RemoteRetry
from protocol.clips import make_clip
from protocol.trickle import LocalPublisher, TrickleConfig, TrickleServer, create_trickle_app
from tests.live.streams import EventLog, free_port, publish_clip, start_session, wait_gone

SECRET = "internal-admin-page: do not show this to anyone"
FAST_RETRY = RemoteRetry(retries=2, delay_s=0.01, max_delay_s=0.01)


def host_of(server) -> str:
    return f"127.0.0.1:{server.port}"


def base_url(server) -> str:
    """The server's URL without a trailing slash, for a redirect to prefix paths with."""
    return str(server.make_url("")).rstrip("/")


async def final_status(client, info: dict, events: EventLog) -> dict:
    """Once the session is gone, its last status event: the one with an end reason."""
    await wait_gone(client, info["session_id"])
    return await events.wait_event(lambda e: e["type"] == "status" and e["end_reason"])


@pytest.fixture
async def unlisted(aiohttp_server):
    """A host the operator did not allow: counts every request, answers with a secret."""
    seen: list[str] = []

    async def answer(request: web.Request) -> web.Response:
        seen.append(f"{request.method} {request.path}")
        return web.Response(text=SECRET)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return await aiohttp_server(app), seen


def misbehaving_app(status: int, location: str | None = None) -> web.Application:
    """A host whose every answer is `status` (a redirect to `location`, or a refusal whose
    body carries the secret)."""

    async def answer(request: web.Request) -> web.Response:
        if location is not None:
            return web.Response(status=status, headers={"Location": location + request.path})
        return web.Response(status=status, text=SECRET)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def events_of(orchestrator, name: str) -> tuple[EventLog, asyncio.Task[None]]:
    orchestrator.server.create_channel(name)
    events = EventLog(orchestrator.url(name))
    return events, asyncio.create_task(events.run())


async def stop_reading(task: asyncio.Task[None]) -> None:
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


def error_messages(events: EventLog) -> list[str]:
    return [e["message"] for e in events.of_type("error")]


@pytest.mark.parametrize("status", [302, 307])
async def test_a_redirecting_input_url_is_not_followed_and_its_target_never_shown(
    service, trickle_factory, aiohttp_server, unlisted, status
) -> None:
    elsewhere, seen = unlisted
    redirector = await aiohttp_server(misbehaving_app(status, base_url(elsewhere)))
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    orchestrator.server.create_channel("gw-out")
    client = await service(runner_hosts=f"{host_of(redirector)},{host_of(orchestrator.http)}")
    client.app[SESSIONS].remote_retry = FAST_RETRY
    events, reading = await events_of(orchestrator, "gw-events")
    info = await start_session(
        client,
        model_id="noop",
        subscribe_url=str(redirector.make_url("/ai/trickle/gw")),
        publish_url=orchestrator.url("gw-out"),
        events_url=orchestrator.url("gw-events"),
    )
    final = await final_status(client, info, events)
    await stop_reading(reading)
    assert seen == []  # not one request reached the host the operator did not allow
    messages = error_messages(events)
    assert any(f"subscribe_url answered HTTP {status}, a redirect" in m for m in messages), messages
    assert all(SECRET not in m and str(elsewhere.port) not in m for m in messages), messages
    assert final["state"] == "ERROR" and final["end_reason"].startswith("input failed")
    assert SECRET not in final["end_reason"]


async def test_a_redirecting_output_url_is_not_followed(
    service, trickle_factory, aiohttp_server, unlisted
) -> None:
    elsewhere, seen = unlisted
    redirector = await aiohttp_server(misbehaving_app(307, base_url(elsewhere)))
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    orchestrator.server.create_channel("gw")
    client = await service(runner_hosts=f"{host_of(redirector)},{host_of(orchestrator.http)}")
    events, reading = await events_of(orchestrator, "gw-events")
    info = await start_session(
        client,
        model_id="noop",
        subscribe_url=orchestrator.url("gw"),
        publish_url=str(redirector.make_url("/ai/trickle/gw-out")),
        events_url=orchestrator.url("gw-events"),
    )
    publishing = asyncio.create_task(publish_clip(orchestrator.url("gw"), make_clip(30)))
    failed = await events.wait_event(lambda e: "output segment failed" in e.get("message", ""))
    assert "publish_url answered HTTP 307, a redirect" in failed["message"]
    await asyncio.wait_for(publishing, 30)
    await client.delete(f"/live-video-to-video/{info['session_id']}")
    await stop_reading(reading)
    assert seen == []
    assert all(SECRET not in m for m in error_messages(events))


@pytest.mark.parametrize("answer", ["refusal", "redirect"])
async def test_a_failing_control_url_is_an_error_event_and_a_clean_end(
    service, trickle_factory, aiohttp_server, unlisted, answer
) -> None:
    elsewhere, seen = unlisted
    control = await aiohttp_server(
        misbehaving_app(500) if answer == "refusal" else misbehaving_app(307, base_url(elsewhere))
    )
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    for name in ("gw", "gw-out"):
        orchestrator.server.create_channel(name)
    client = await service(runner_hosts=f"{host_of(control)},{host_of(orchestrator.http)}")
    client.app[SESSIONS].remote_retry = FAST_RETRY
    events, reading = await events_of(orchestrator, "gw-events")
    info = await start_session(
        client,
        model_id="noop",
        subscribe_url=orchestrator.url("gw"),
        publish_url=orchestrator.url("gw-out"),
        control_url=str(control.make_url("/ai/trickle/gw-control")),
        events_url=orchestrator.url("gw-events"),
    )
    final = await final_status(client, info, events)
    await stop_reading(reading)
    status = 500 if answer == "refusal" else 307
    messages = error_messages(events)
    assert any(f"control: control_url answered HTTP {status}" in m for m in messages), messages
    assert any("cannot read the control channel" in m for m in messages), messages
    assert all(SECRET not in m and "Traceback" not in m for m in messages), messages
    assert final["state"] == "ERROR"
    assert final["end_reason"].startswith(f"control failed: control_url answered HTTP {status}")
    assert "internal error" not in final["end_reason"]
    assert seen == []
    assert (await client.get("/health")).status == 200
    again = await start_session(client, model_id="noop")  # the service goes on
    await client.delete(f"/live-video-to-video/{again['session_id']}")


@pytest.mark.parametrize(
    "url",
    ["http://h:1:2/in", "http://127.0.0.1:99999/in", "http://127.0.0.1:port/in", "http://[::1/in"],
)
@pytest.mark.parametrize("hosts", ["127.0.0.1:8935", "*"])
async def test_a_runner_url_with_a_malformed_port_is_a_400_naming_the_field(
    service, url, hosts
) -> None:
    client = await service(runner_hosts=hosts)
    response = await client.post(
        "/live-video-to-video",
        json={"model_id": "noop", "subscribe_url": "http://127.0.0.1:8935/in", "publish_url": url},
    )
    assert response.status == 400, await response.text()
    msg = (await response.json())["detail"]["msg"]
    assert "publish_url" in msg and "port" in msg
    assert not client.app[SESSIONS].sessions


def self_signed(tmp_path) -> ssl.SSLContext:
    """A server context with a certificate for 127.0.0.1 that nobody signed but itself."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_path, key_path)
    return context


@pytest.mark.parametrize("verify", [True, False], ids=["verified", "not-verified"])
async def test_a_self_signed_orchestrator_is_refused_unless_verification_is_off(
    service, trickle_factory, aiohttp_server, tmp_path, verify
) -> None:
    tls = TrickleServer(TrickleConfig(base_path="/ai/trickle/"))
    app = web.Application()
    app.add_subapp("/ai/trickle/", create_trickle_app(tls))
    https = await aiohttp_server(app, ssl=self_signed(tmp_path))
    for name in ("gw", "gw-out"):
        tls.create_channel(name)
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    client = await service(runner_hosts="127.0.0.1", runner_tls_verify=verify)
    client.app[SESSIONS].remote_retry = FAST_RETRY
    events, reading = await events_of(orchestrator, "gw-events")
    info = await start_session(
        client,
        model_id="noop",
        subscribe_url=str(https.make_url("/ai/trickle/gw")),
        publish_url=str(https.make_url("/ai/trickle/gw-out")),
        events_url=orchestrator.url("gw-events"),
    )
    assert https.scheme == "https"
    if verify:
        final = await final_status(client, info, events)
        refused = [m for m in error_messages(events) if "subscribe_url" in m]
        assert refused and "TLS certificate" in refused[0] and "not trusted" in refused[0]
        assert final["state"] == "ERROR" and final["end_reason"].startswith("input failed")
    else:
        clip = make_clip(30)
        async with LocalPublisher(tls, "gw") as publisher:
            for frames in clip.segments:
                await publisher.write(b"".join(frames))
            # Read over HTTPS, processed, and published back over HTTPS.
            await events.wait_event(lambda e: e["type"] == "runner_send_first_processed_segment")
        await wait_gone(client, info["session_id"])
        assert not [m for m in error_messages(events) if "TLS" in m]
    await stop_reading(reading)


async def test_an_unreachable_input_is_said_in_words_not_as_an_exception_repr(
    service, trickle_factory
) -> None:
    closed_port = free_port()
    orchestrator = await trickle_factory(base_path="/ai/trickle/")
    orchestrator.server.create_channel("gw-out")
    client = await service(runner_hosts="127.0.0.1")
    client.app[SESSIONS].remote_retry = FAST_RETRY
    events, reading = await events_of(orchestrator, "gw-events")
    info = await start_session(
        client,
        model_id="noop",
        subscribe_url=f"http://127.0.0.1:{closed_port}/ai/trickle/gw",
        publish_url=orchestrator.url("gw-out"),
        events_url=orchestrator.url("gw-events"),
    )
    final = await final_status(client, info, events)
    await stop_reading(reading)
    reached = f"cannot reach subscribe_url: cannot connect to 127.0.0.1:{closed_port}"
    messages = error_messages(events)
    assert any(f"{reached}: connection refused; retry 1 of 2" in m for m in messages), messages
    assert (
        final["end_reason"] == f"input failed: cannot read the input: {reached}: connection refused"
    )
    for text in [*messages, final["end_reason"]]:
        assert "Error(" not in text and "('" not in text and "ConnectionKey" not in text, text
