"""The check of a WHIP or WHEP client's SDP offer, before any peer connection is made for it.

aiortc's parser asserts (a bare AssertionError, a KeyError) on malformed lines, so a broken offer
was a 500; and it takes an offer that lacks what the connection needs later (a DTLS fingerprint
it can check), which then failed in a background task after a 201. Here each line aiortc would
choke on is checked with its number and what it should be, and then the offer as a whole: every
media section has ICE credentials, a fingerprint of a hash aiortc checks, and a DTLS role.
"""

from __future__ import annotations

import re

from aiortc import sdp as aiortc_sdp

from protocol.errors import InvalidRequest

from .sdpfrag import candidate_problem

MAX_MEDIA_SECTIONS = 8
"""m= sections an offer may have (WHIP and WHEP use one video and one audio, a browser may add a
data channel): each is a transceiver, without BUNDLE a transport of its own."""

SETUP_ROLES = ("actpass", "active", "passive")
"""`a=setup` values a WebRTC offer may carry (RFC 8842 §5.3; `holdconn` is not one)."""
FINGERPRINT_HASHES = ("sha-256", "sha-384", "sha-512")
"""The hashes aiortc checks a DTLS certificate against."""

_MEDIA = re.compile(r"^m=[^ ]+ \d{1,5} [A-Z/]+ \S.*$")  # aiortc's own pattern, bounded
_CONNECTION = re.compile(r"^c=IN IP[46] [^ ]+$")
_FINGERPRINT = re.compile(r"^\S+ [0-9A-Fa-f]{2}(?::[0-9A-Fa-f]{2})+$")
_RTPMAP = re.compile(r"^\d{1,3} [^/\s]+/\d+(?:/\d+)?$")
_NUMBERED = {
    "rtcp": re.compile(r"^\d{1,5}(?: .*)?$"),
    "ssrc": re.compile(r"^\d+ \S.*$"),
    "ssrc-group": re.compile(r"^\S+(?: \d+)+$"),
    "extmap": re.compile(r"^\d+(?:/\w+)? \S+.*$"),
    "sctp-port": re.compile(r"^\d{1,5}$"),
    "max-message-size": re.compile(r"^\d+$"),
    "rtpmap": _RTPMAP,
}
_SHAPES = {
    "rtcp": "a port, then an optional address",
    "ssrc": "a number, then an attribute",
    "ssrc-group": "a semantics, then numbers",
    "extmap": "a number, then a URI",
    "sctp-port": "a port number",
    "max-message-size": "a number",
    "rtpmap": "payload-type codec/clock-rate",
}


def check_offer(text: str) -> aiortc_sdp.SessionDescription:
    """The offer, parsed; InvalidRequest (400) naming the first thing wrong with it."""
    media = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=":
            _refuse(number, "is not a type=value line")
        if line.startswith("m="):
            media += 1
            if not _MEDIA.match(line):
                _refuse(number, "needs media, port, protocol and formats (m=video 9 UDP/... 96)")
        elif line.startswith("c=") and not _CONNECTION.match(line):
            _refuse(number, "needs IN IP4 or IN IP6 and an address (c=IN IP4 0.0.0.0)")
        elif line.startswith("a="):
            _check_attribute(number, line[2:])
    if media == 0:
        raise InvalidRequest("the SDP offer has no media section (m= line)")
    if media > MAX_MEDIA_SECTIONS:
        raise InvalidRequest(
            f"the SDP offer has {media} media sections; at most {MAX_MEDIA_SECTIONS} are taken"
        )
    try:
        description = aiortc_sdp.SessionDescription.parse(text)
    except Exception:  # aiortc asserts, and raises KeyError or ValueError, on bad lines
        raise InvalidRequest(
            "the SDP offer cannot be read: a line has a field of the wrong kind "
            "(a payload type out of range, text where a number belongs)"
        ) from None
    for index, section in enumerate(description.media):
        _check_section(index, section)
    return description


def _check_attribute(number: int, value: str) -> None:
    name, _, argument = value.partition(":")
    argument = argument.strip()
    if name == "candidate":
        problem = candidate_problem(argument)
        if problem:
            _refuse(number, f"is not an ICE candidate: {problem}")
    elif name == "setup":
        if argument not in SETUP_ROLES:
            _refuse(
                number,
                f"names DTLS role '{argument[:32]}', not one of {', '.join(SETUP_ROLES)}",
            )
    elif name == "fingerprint":
        if not _FINGERPRINT.match(argument):
            _refuse(number, "needs a hash name and a hex fingerprint (sha-256 AB:CD:...)")
    elif name in _NUMBERED and not _NUMBERED[name].match(argument):
        _refuse(number, f"needs {_SHAPES[name]}")
    elif name == "fmtp" and not re.match(r"^\d{1,3}(?: .*)?$", argument):
        _refuse(number, "needs a payload type, then parameters")


def _check_section(index: int, section: aiortc_sdp.MediaDescription) -> None:
    where = f"media section {index + 1} ({section.kind})"
    if not section.ice.usernameFragment or not section.ice.password:
        raise InvalidRequest(f"{where} of the SDP offer has no a=ice-ufrag and a=ice-pwd")
    fingerprints = section.dtls.fingerprints if section.dtls is not None else []
    if not any(f.algorithm.lower() in FINGERPRINT_HASHES for f in fingerprints):
        raise InvalidRequest(
            f"{where} of the SDP offer has no a=fingerprint of a hash this service checks "
            f"({', '.join(FINGERPRINT_HASHES)}): the DTLS connection could not be verified"
        )
    if section.kind in ("audio", "video") and not section.rtcp_mux:
        raise InvalidRequest(f"{where} of the SDP offer has no a=rtcp-mux, which WebRTC needs")


def _refuse(number: int, problem: str) -> None:
    raise InvalidRequest(f"line {number} of the SDP offer {problem}")
