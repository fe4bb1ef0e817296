#!/usr/bin/python3
"""A WHIP publisher and a WHEP viewer on GStreamer's webrtcbin, for live-v2v or any WHIP/WHEP
server. Runs under Debian's python3 with its own packages only:

    apt install python3-gi gir1.2-gst-plugins-base-1.0 gir1.2-gst-plugins-bad-1.0 \\
        gstreamer1.0-nice gstreamer1.0-plugins-good gstreamer1.0-plugins-bad \\
        gstreamer1.0-plugins-ugly gstreamer1.0-libav

    # publish a test pattern (or --source numbered, frames that carry their index)
    python3 gstreamer_webrtc.py publish \\
        'http://HOST:8000/live-video-to-video/whip?model_id=cartoon' --token TOKEN --codec h264
    # watch: the WHEP URL (a session's whep_url, or the Link rel="urn:ietf:params:whep" that
    # the publisher prints)
    python3 gstreamer_webrtc.py watch http://HOST:8000/whep/CHANNEL --frames 90 --save out/

Both print one JSON object per line on stdout: {"event": "created", ...} with the resource
URL and the headers that matter, {"event": "connected"}, and at the end {"event": "done", ...}
with counts. `--ice-address 127.0.0.1` gathers candidates on that address only (libnice
leaves loopback out otherwise), for a server on the same machine. `--trickle` sends the offer
at once and the candidates afterwards by PATCH (RFC 9725 §4.3) instead of gathering first.
Debian's GStreamer 1.22 has no whipsink: this is the same protocol, written out.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from email.message import Message

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstSdp", "1.0")
gi.require_version("GstWebRTC", "1.0")
from gi.repository import Gst, GstSdp, GstWebRTC  # noqa: E402

BITS = 12  # as protocol/clips.py in live-v2v: the frame index in 12 blocks at the top
BAND = 16
CONNECT_TIMEOUT_S = 30.0

ENCODERS = {
    "vp8": (
        "vp8enc deadline=1 cpu-used=8 keyframe-max-dist=60 lag-in-frames=0 "
        "error-resilient=partitions ! rtpvp8pay pt=96 picture-id-mode=15-bit ! "
        "application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000"
    ),
    # Constrained baseline, packetization-mode 1: what browsers and aiortc take.
    "h264": (
        "x264enc tune=zerolatency speed-preset=ultrafast key-int-max=60 bitrate=1500 ! "
        "video/x-h264,profile=constrained-baseline,level=(string)3.1 ! "
        "rtph264pay pt=102 config-interval=-1 aggregate-mode=zero-latency ! "
        "application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
        "packetization-mode=(string)1"
    ),
}
DECODERS = {"vp8": "rtpvp8depay ! vp8dec", "h264": "rtph264depay ! avdec_h264"}
RECEIVE_CAPS = {
    "vp8": "application/x-rtp,media=video,encoding-name=VP8,payload=96,clock-rate=90000",
    "h264": (
        "application/x-rtp,media=video,encoding-name=H264,payload=102,clock-rate=90000,"
        "packetization-mode=(string)1,profile-level-id=(string)42e01f"
    ),
}


def say(event: str, **fields: object) -> None:
    print(json.dumps({"event": event, **fields}), flush=True)


def fail(message: str) -> None:
    say("error", detail=message)
    sys.exit(1)


def http(
    method: str, url: str, body: str | None, content_type: str | None, headers: dict[str, str]
) -> tuple[int, Message, str]:
    data = body.encode() if body is not None else None
    request = urllib.request.Request(url, data=data, method=method, headers=dict(headers))
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.headers, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read().decode(errors="replace")


def set_up_ice(webrtc: Gst.Element, addresses: list[str]) -> object:
    """No UPnP port mapping (libnice would ask the LAN's router), and host candidates on
    `addresses` only when given.

    libnice leaves loopback out of its candidates and GStreamer exposes no setting for the
    addresses, so this calls libnice's own nice_agent_add_local_address on webrtcbin's agent
    (through ctypes: Debian ships no GObject-introspection data for libnice). PyGObject's hash
    of a GObject is its C pointer. Returns the agent's Python wrapper, to keep while the
    pipeline lives: webrtcbin's ICE object is floating, so the wrapper takes the only reference,
    and dropping it would free the agent under webrtcbin."""
    ice = webrtc.get_property("ice-agent")
    agent = ice.get_property("agent")
    agent.set_property("upnp", False)
    if not addresses:
        return ice
    nice = ctypes.CDLL("libnice.so.10")
    nice.nice_address_new.restype = ctypes.c_void_p
    nice.nice_address_set_from_string.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    nice.nice_agent_add_local_address.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
    nice.nice_address_free.argtypes = [ctypes.c_void_p]
    for address in addresses:
        native = nice.nice_address_new()
        if not nice.nice_address_set_from_string(native, address.encode()):
            fail(f"--ice-address {address} is not an IP address")
        nice.nice_agent_add_local_address(ctypes.c_void_p(hash(agent)), native)
        nice.nice_address_free(native)
    return ice


def numbered_band(index: int, width: int) -> bytes:
    """The top BAND rows of a frame carrying `index`, as live-v2v's numbered_frame paints it
    (black band, white blocks for the set bits), in RGB."""
    block = width // BITS
    row = bytearray(width * 3)
    for bit in range(BITS):
        if index >> bit & 1:
            start, end = bit * block + 2, (bit + 1) * block - 2
            row[start * 3 : end * 3] = b"\xff" * ((end - start) * 3)
    black = bytes(width * 3)
    return black * 2 + bytes(row) * (BAND - 4) + black * 2


def read_index(data: bytes, width: int) -> int | None:
    """The index of a numbered frame (RGB bytes), or None: the middle of each block, rows 4
    to BAND - 4, averaged."""
    block = width // BITS
    if block < 6:
        return None
    margin = min(4, block // 3)
    index = 0
    for bit in range(BITS):
        total = count = 0
        for y in range(4, BAND - 4):
            row = y * width * 3
            start, end = row + (bit * block + margin) * 3, row + ((bit + 1) * block - margin) * 3
            chunk = data[start:end]
            total += sum(chunk)
            count += len(chunk)
        value = total / count
        if 60 < value < 190:
            return None
        if value >= 190:
            index |= 1 << bit
    return index


class Client:
    """One webrtcbin, its HTTP resource and its life: offer, POST, answer, DELETE."""

    def __init__(self, args: argparse.Namespace, pipeline: str) -> None:
        self.args = args
        parsed = Gst.parse_launch(pipeline)
        if isinstance(parsed, Gst.Pipeline):
            self.pipeline = parsed
        else:  # one element alone comes back bare
            self.pipeline = Gst.Pipeline.new("client")
            self.pipeline.add(parsed)
        self.webrtc = self.pipeline.get_by_name("webrtc")
        self._ice = set_up_ice(self.webrtc, args.ice_address)
        self.connected = threading.Event()
        self.failed = threading.Event()
        self.gathered = threading.Event()
        self.candidates: list[tuple[int, str]] = []
        self.resource: str | None = None
        self.etag: str | None = None
        self.lock = threading.Lock()
        self.webrtc.connect("notify::connection-state", self._on_state)
        self.webrtc.connect("notify::ice-gathering-state", self._on_gathering)
        self.webrtc.connect("on-ice-candidate", self._on_candidate)

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.args.token}"} if self.args.token else {}

    def _on_state(self, webrtc: Gst.Element, _: object) -> None:
        state = webrtc.get_property("connection-state")
        if state == GstWebRTC.WebRTCPeerConnectionState.CONNECTED:
            self.connected.set()
        elif state == GstWebRTC.WebRTCPeerConnectionState.FAILED:
            self.failed.set()

    def _on_gathering(self, webrtc: Gst.Element, _: object) -> None:
        if webrtc.get_property("ice-gathering-state") == GstWebRTC.WebRTCICEGatheringState.COMPLETE:
            self.gathered.set()
            with self.lock:
                ready = self.resource is not None
            if ready and self.args.trickle:
                self._send_candidates()  # the rest, and end-of-candidates

    def _on_candidate(self, _: Gst.Element, mline: int, candidate: str) -> None:
        with self.lock:
            self.candidates.append((mline, candidate))
            ready = self.resource is not None
        if ready and self.args.trickle:
            self._send_candidates()

    def _promise(self, signal: str, *args: object) -> Gst.Structure | None:
        promise = Gst.Promise.new()
        self.webrtc.emit(signal, *args, promise)
        promise.wait()
        return promise.get_reply()

    def negotiate(self, url: str) -> None:
        """Offer, POST it, take the answer (RFC 9725 §4.2)."""
        reply = self._promise("create-offer", None)
        offer = reply.get_value("offer") if reply else None
        if offer is None:
            fail("webrtcbin made no offer (no codec for the pipeline's caps?)")
        self._promise("set-local-description", offer)
        if not self.args.trickle:
            # The complete offer in one request: no PATCH needed.
            if not self.gathered.wait(CONNECT_TIMEOUT_S):
                fail("ICE gathering did not complete")
        sdp = self.webrtc.get_property("local-description").sdp.as_text()
        status, headers, body = http("POST", url, sdp, "application/sdp", self.headers())
        if status != 201:
            fail(f"POST {url}: {status} {body}")
        resource = urllib.parse.urljoin(url, headers.get("Location", ""))
        with self.lock:
            self.resource, self.etag = resource, headers.get("ETag")
        say(
            "created",
            resource=resource,
            session=headers.get("X-Session-Id"),
            etag=self.etag,
            accept_patch=headers.get("Accept-Patch"),
            links=headers.get_all("Link") or [],
            setup=sorted({ln[8:] for ln in body.splitlines() if ln.startswith("a=setup:")}),
            codecs=[ln for ln in body.splitlines() if ln.startswith(("a=rtpmap", "a=fmtp"))],
        )
        ok, message = GstSdp.SDPMessage.new_from_text(body)
        if ok != GstSdp.SDPResult.OK:
            fail("the answer is not SDP")
        answer = GstWebRTC.WebRTCSessionDescription.new(GstWebRTC.WebRTCSDPType.ANSWER, message)
        self._promise("set-remote-description", answer)
        if self.args.trickle:
            self._send_candidates()

    def _send_candidates(self) -> None:
        """PATCH the candidates gathered so far as an SDP fragment (RFC 8840), If-Match the
        answer's ETag; with end-of-candidates once gathering is over."""
        with self.lock:
            pending, self.candidates = self.candidates, []
            resource, etag = self.resource, self.etag
        done = self.gathered.is_set()
        if not pending and not done:
            return
        local = self.webrtc.get_property("local-description").sdp.as_text()
        ice = [ln for ln in local.splitlines() if ln.startswith(("a=ice-ufrag:", "a=ice-pwd:"))]
        lines = [*ice[:2], "m=video 9 UDP/TLS/RTP/SAVPF 0", "a=mid:video0"]
        mids = [ln[6:] for ln in local.splitlines() if ln.startswith("a=mid:")]
        if mids:
            lines[-1] = f"a=mid:{mids[0]}"
        lines += [f"a={candidate}" for _, candidate in pending if candidate]
        if done:
            lines.append("a=end-of-candidates")
        headers = {**self.headers(), "If-Match": etag or "*"}
        assert resource is not None
        status, _, body = http(
            "PATCH",
            resource,
            "\r\n".join(lines) + "\r\n",
            "application/trickle-ice-sdpfrag",
            headers,
        )
        say("patched", status=status, candidates=len(pending), detail=body or None)

    def wait_connected(self) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT_S
        while not self.connected.is_set():
            if self.failed.is_set() or time.monotonic() > deadline:
                fail("the WebRTC connection failed (ICE or DTLS): see GST_DEBUG=webrtc*:5")
            self.check_bus(0.05)
        say("connected")

    def check_bus(self, timeout_s: float) -> bool:
        """False once the pipeline ended (EOS); exits on an error."""
        message = self.pipeline.get_bus().timed_pop_filtered(
            int(timeout_s * Gst.SECOND), Gst.MessageType.ERROR | Gst.MessageType.EOS
        )
        if message is None:
            return True
        if message.type == Gst.MessageType.ERROR:
            error, debug = message.parse_error()
            fail(f"GStreamer: {error.message} ({debug})")
        return False

    def leave(self) -> None:
        if self.resource:
            http("DELETE", self.resource, None, None, self.headers())
        self.pipeline.set_state(Gst.State.NULL)


def publish(args: argparse.Namespace) -> None:
    width, height = args.size
    raw = f"video/x-raw,width={width},height={height},framerate={args.fps}/1"
    if args.source == "numbered":
        source = (
            f"appsrc name=src is-live=true format=time do-timestamp=true "
            f"caps={raw},format=RGB ! videoconvert"
        )
    else:
        # I420, what the encoders take: the pattern as painted is what goes out.
        source = f"videotestsrc is-live=true pattern={args.source} ! {raw},format=I420"
    client = Client(
        args,
        f"{source} ! queue max-size-buffers=1 leaky=downstream ! {ENCODERS[args.codec]} ! "
        "webrtcbin name=webrtc bundle-policy=max-bundle",
    )
    client.pipeline.set_state(Gst.State.PLAYING)
    transceiver = client.webrtc.emit("get-transceiver", 0)
    transceiver.set_property("direction", GstWebRTC.WebRTCRTPTransceiverDirection.SENDONLY)
    client.negotiate(args.url)
    client.wait_connected()
    sent = 0
    appsrc = client.pipeline.get_by_name("src")
    started = time.monotonic()
    try:
        if appsrc is None:
            while time.monotonic() - started < args.seconds and client.check_bus(0.1):
                pass
            sent = int((time.monotonic() - started) * args.fps)
        else:
            # Frames that carry their index; each one's send time (CLOCK_MONOTONIC, the clock
            # of Python's time.monotonic in every process) goes to stdout for a latency bench.
            body = bytes([90, 120, 150]) * (width * (height - BAND))
            while sent < args.seconds * args.fps and sent < 1 << BITS:
                due = started + sent / args.fps
                time.sleep(max(0.0, due - time.monotonic()))
                frame = numbered_band(sent, width) + body
                appsrc.emit("push-buffer", Gst.Buffer.new_wrapped(frame))
                say("sent", index=sent, at=time.monotonic())
                sent += 1
                client.check_bus(0)
    except KeyboardInterrupt:
        pass  # Ctrl-C: leave as at the end
    finally:
        client.leave()
    say("done", frames=sent, codec=args.codec)


def watch(args: argparse.Namespace) -> None:
    client = Client(args, f"webrtcbin name=webrtc bundle-policy=max-bundle latency={args.latency}")
    frames = 0
    done = threading.Event()
    if args.save:
        os.makedirs(args.save, exist_ok=True)

    def on_sample(sink: Gst.Element) -> Gst.FlowReturn:
        nonlocal frames
        sample = sink.emit("pull-sample")
        at = time.monotonic()
        structure = sample.get_caps().get_structure(0)
        width, height = structure.get_value("width"), structure.get_value("height")
        buffer = sample.get_buffer()
        ok, mapped = buffer.map(Gst.MapFlags.READ)
        if ok:
            try:
                data = bytes(mapped.data)
            finally:
                buffer.unmap(mapped)
            if args.read_index:
                say("frame", index=read_index(data, width), at=at)
            if args.save and frames < args.frames:
                with open(os.path.join(args.save, f"frame-{frames:05d}.ppm"), "wb") as out:
                    out.write(b"P6 %d %d 255\n" % (width, height) + data)
        frames += 1
        if args.frames and frames >= args.frames:
            done.set()
        return Gst.FlowReturn.OK

    def on_pad(_: Gst.Element, pad: Gst.Pad) -> None:
        if pad.direction != Gst.PadDirection.SRC:
            return
        # Packets to decoded RGB frames, none held back: no sync to the clock, newest first.
        chain = Gst.parse_bin_from_description(
            f"{DECODERS[args.codec]} ! videoconvert ! video/x-raw,format=RGB ! "
            "appsink name=frames emit-signals=true sync=false max-buffers=2 drop=false",
            True,
        )
        client.pipeline.add(chain)
        chain.sync_state_with_parent()
        chain.get_by_name("frames").connect("new-sample", on_sample)
        linked = pad.link(chain.get_static_pad("sink"))
        caps = pad.get_current_caps()
        encoding = caps.get_structure(0).get_value("encoding-name") if caps else None
        say("track", encoding=encoding, linked=linked == Gst.PadLinkReturn.OK)

    client.webrtc.connect("pad-added", on_pad)
    client.webrtc.emit(
        "add-transceiver",
        GstWebRTC.WebRTCRTPTransceiverDirection.RECVONLY,
        Gst.Caps.from_string(RECEIVE_CAPS[args.codec]),
    )
    client.pipeline.set_state(Gst.State.PLAYING)
    client.negotiate(args.url)
    client.wait_connected()
    started = time.monotonic()
    try:
        while not done.is_set() and client.check_bus(0.1):
            if time.monotonic() - started > args.seconds:
                break
    except KeyboardInterrupt:
        pass
    finally:
        client.leave()
    say("done", frames=frames, codec=args.codec, saved=args.save)
    if args.frames and frames < args.frames:
        sys.exit(2)


def size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height or width)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["publish", "watch"])
    parser.add_argument("url", help="the WHIP (publish) or WHEP (watch) endpoint URL")
    parser.add_argument("--token", help="bearer token (the service's --auth-token)")
    parser.add_argument("--codec", choices=sorted(ENCODERS), default="vp8")
    parser.add_argument("--ice-address", action="append", default=[], metavar="IP")
    parser.add_argument("--trickle", action="store_true", help="send candidates by PATCH")
    parser.add_argument(
        "--seconds", type=float, default=30.0, help="publish this long; watch at most this long"
    )
    parser.add_argument(
        "--source",
        default="colors",
        help="videotestsrc pattern (colors, smpte, ball, ...) or numbered: frames that carry "
        "their index, for a latency bench",
    )
    parser.add_argument("--size", type=size, default=(320, 240), help="WIDTHxHEIGHT")
    parser.add_argument("--fps", type=int, default=30)
    parser.add_argument("--frames", type=int, default=0, help="watch: stop after N frames")
    parser.add_argument("--save", help="watch: save the first --frames frames as PPM here")
    parser.add_argument(
        "--read-index", action="store_true", help="watch: print each frame's painted index"
    )
    parser.add_argument(
        "--latency",
        type=int,
        default=200,
        help="watch: jitter buffer in ms (GStreamer's default 200; 0 for the least delay)",
    )
    args = parser.parse_args()
    Gst.init(None)
    if Gst.ElementFactory.find("webrtcbin") is None:
        fail("GStreamer's webrtcbin is missing (gstreamer1.0-plugins-bad, gstreamer1.0-nice)")
    (publish if args.mode == "publish" else watch)(args)


if __name__ == "__main__":
    main()
