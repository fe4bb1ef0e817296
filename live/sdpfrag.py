"""Trickle-ICE SDP fragments (RFC 8840, `application/trickle-ice-sdpfrag`): the body of a WHIP or
WHEP `PATCH` (RFC 9725 §4.3). Parsed to plain data here; the peer connection applies it."""

from __future__ import annotations

from dataclasses import dataclass, field

from protocol.errors import InvalidRequest

TRICKLE_ICE = "application/trickle-ice-sdpfrag"


@dataclass
class FragmentCandidate:
    line: str
    """The candidate attribute's value, after `a=candidate:`."""
    mid: str | None
    mline_index: int
    """Which m-section it came under (0 when the fragment has no m= line: the bundle's first)."""


@dataclass
class Fragment:
    ufrag: str | None = None
    pwd: str | None = None
    candidates: list[FragmentCandidate] = field(default_factory=list)
    end_of_candidates: bool = False


CANDIDATE_SHAPE = "foundation component transport priority address port typ type"


def candidate_problem(value: str) -> str | None:
    """What is wrong with an `a=candidate:` value in words, or None when aiortc can read it."""
    bits = value.split()
    ok = len(bits) >= 8 and bits[6] == "typ"
    if ok:
        try:
            ok = int(bits[1]) >= 1 and int(bits[3]) >= 0 and 0 <= int(bits[5]) <= 65535
            extensions = dict(zip(bits[8::2], bits[9::2], strict=False))
            ok = ok and 0 <= int(extensions.get("rport", "0")) <= 65535
        except ValueError:
            ok = False
    return None if ok else f"it needs {CANDIDATE_SHAPE}"


def _check_candidate(number: int, value: str) -> None:
    if candidate_problem(value) is not None:
        raise InvalidRequest(
            f"line {number} of the SDP fragment is not an ICE candidate "
            "(foundation component transport priority address port typ type)"
        )


def parse_fragment(text: str) -> Fragment:
    """The ICE credentials and candidates of a fragment; 400 for a body that is not one."""
    fragment = Fragment()
    mline_index = 0
    mid: str | None = None
    seen_media = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line:
            continue
        if len(line) < 2 or line[1] != "=" or not line[0].isalpha():
            raise InvalidRequest(f"line {number} of the SDP fragment is not a type=value line")
        kind, value = line[0], line[2:]
        if kind == "m":
            if seen_media:
                mline_index += 1
            seen_media, mid = True, None
            continue
        if kind != "a":
            continue  # c=, o= and the like carry nothing for ICE here
        name, _, argument = value.partition(":")
        if name == "mid":
            mid = argument.strip()
        elif name == "ice-ufrag":
            fragment.ufrag = argument.strip()
        elif name == "ice-pwd":
            fragment.pwd = argument.strip()
        elif name == "end-of-candidates":
            fragment.end_of_candidates = True
        elif name == "candidate":
            _check_candidate(number, argument)
            fragment.candidates.append(FragmentCandidate(argument.strip(), mid, mline_index))
    if not (fragment.candidates or fragment.end_of_candidates or fragment.ufrag):
        raise InvalidRequest(
            "the SDP fragment has no ICE candidate, end-of-candidates or ICE credentials"
        )
    return fragment
