"""An incremental MPEG-TS demuxer: TS packets in, whole PES payloads (access units) out.

Why not FFmpeg's demuxer: it holds every H.264 frame until the frame after next has arrived (its
parser looks for the next access unit to end the current one), which is two frame intervals of
delay, and opening it probes for hundreds of milliseconds. Here a PES is emitted as soon as it is
complete: at once when the PES header carries its length (our encoder writes it), else when the
next PES of the same stream starts, else at the end of the segment.

Pure Python, no av import; it runs on the decode thread. Garbage is skipped by resynchronising on
the 0x47 sync byte, and counted.
"""

from __future__ import annotations

from dataclasses import dataclass, field

TS_PACKET = 188
SYNC = 0x47

# ISO/IEC 13818-1 stream types we carry.
STREAM_H264 = 0x1B
STREAM_HEVC = 0x24
STREAM_AAC = 0x0F
STREAM_PRIVATE = 0x06  # Opus (with an "Opus" registration descriptor)
STREAM_MP3 = (0x03, 0x04)
VIDEO_TYPES = {STREAM_H264: "h264", STREAM_HEVC: "hevc"}
AUDIO_TYPES = {STREAM_AAC: "aac", 0x03: "mp3", 0x04: "mp3"}


@dataclass(slots=True)
class PES:
    """One elementary-stream packet: normally one video frame or a few audio frames."""

    pid: int
    codec: str
    kind: str  # "video" or "audio"
    pts: int | None  # 90 kHz
    dts: int | None
    data: bytes
    random_access: bool = False


@dataclass(slots=True)
class _Assembly:
    codec: str
    kind: str
    pts: int | None = None
    dts: int | None = None
    expected: int | None = None  # payload bytes announced by PES_packet_length
    parts: list[bytes] = field(default_factory=list)
    size: int = 0
    random_access: bool = False


class TSDemuxer:
    """Feed it bytes as they arrive; it returns the PES packets completed so far."""

    def __init__(self) -> None:
        self._pending = b""
        self._pmt_pids: set[int] = set()
        self.streams: dict[int, tuple[str, str]] = {}  # pid -> (kind, codec)
        self._assembling: dict[int, _Assembly] = {}
        self.skipped_bytes = 0
        self.bad_packets = 0

    def feed(self, data: bytes) -> list[PES]:
        buf = self._pending + data if self._pending else data
        out: list[PES] = []
        pos = 0
        end = len(buf)
        while end - pos >= TS_PACKET:
            if buf[pos] != SYNC or (end - pos >= 2 * TS_PACKET and buf[pos + TS_PACKET] != SYNC):
                found = self._resync(buf, pos)
                self.skipped_bytes += (found if found >= 0 else end) - pos
                if found < 0:
                    pos = end
                    break
                pos = found
                continue
            self._packet(buf, pos, out)
            pos += TS_PACKET
        self._pending = buf[pos:]
        return out

    def flush(self) -> list[PES]:
        """End of the segment: emit what is assembled and forget partial packets."""
        out = []
        for pid in list(self._assembling):
            pes = self._finish(pid)
            if pes is not None:
                out.append(pes)
        if self._pending:
            self.skipped_bytes += len(self._pending)
            self._pending = b""
        return out

    @staticmethod
    def _resync(buf: bytes, pos: int) -> int:
        """The next offset where two sync bytes one packet apart begin (or a lone trailing one)."""
        start = pos + 1
        while True:
            found = buf.find(b"\x47", start)
            if found < 0:
                return -1
            if found + TS_PACKET >= len(buf) or buf[found + TS_PACKET] == SYNC:
                return found
            start = found + 1

    def _packet(self, buf: bytes, pos: int, out: list[PES]) -> None:
        b1 = buf[pos + 1]
        if b1 & 0x80:  # transport_error_indicator
            self.bad_packets += 1
            return
        pusi = bool(b1 & 0x40)
        pid = ((b1 & 0x1F) << 8) | buf[pos + 2]
        afc = (buf[pos + 3] >> 4) & 0x3
        start = pos + 4
        random_access = False
        if afc & 0x2:
            af_len = buf[start]
            if af_len and start + 1 < pos + TS_PACKET:
                random_access = bool(buf[start + 1] & 0x40)
            start += 1 + af_len
        if not afc & 0x1 or start >= pos + TS_PACKET:
            return
        payload = buf[start : pos + TS_PACKET]
        if pid == 0:
            if pusi:
                self._parse_pat(payload)
        elif pid in self._pmt_pids:
            if pusi:
                self._parse_pmt(payload)
        elif pid in self.streams:
            self._pes_payload(pid, pusi, payload, random_access, out)

    def _section(self, payload: bytes) -> bytes | None:
        pointer = payload[0]
        section = payload[1 + pointer :]
        if len(section) < 8:
            self.bad_packets += 1
            return None
        length = ((section[1] & 0x0F) << 8) | section[2]
        return section[: 3 + length]

    def _parse_pat(self, payload: bytes) -> None:
        section = self._section(payload)
        if section is None:
            return
        entries = section[8:-4]  # skip header, drop CRC
        pids = set()
        for i in range(0, len(entries) - 3, 4):
            program = (entries[i] << 8) | entries[i + 1]
            pid = ((entries[i + 2] & 0x1F) << 8) | entries[i + 3]
            if program != 0:
                pids.add(pid)
        self._pmt_pids = pids

    def _parse_pmt(self, payload: bytes) -> None:
        section = self._section(payload)
        if section is None or len(section) < 12:
            return
        info_len = ((section[10] & 0x0F) << 8) | section[11]
        pos = 12 + info_len
        body_end = len(section) - 4
        streams: dict[int, tuple[str, str]] = {}
        while pos + 5 <= body_end:
            stream_type = section[pos]
            pid = ((section[pos + 1] & 0x1F) << 8) | section[pos + 2]
            es_len = ((section[pos + 3] & 0x0F) << 8) | section[pos + 4]
            descriptors = section[pos + 5 : pos + 5 + es_len]
            if stream_type in VIDEO_TYPES:
                streams[pid] = ("video", VIDEO_TYPES[stream_type])
            elif stream_type in AUDIO_TYPES:
                streams[pid] = ("audio", AUDIO_TYPES[stream_type])
            elif stream_type == STREAM_PRIVATE and b"Opus" in descriptors:
                streams[pid] = ("audio", "opus")
            pos += 5 + es_len
        if streams != self.streams:
            # A new encoder (new PMT): drop half-assembled packets of streams that went away.
            for pid in set(self._assembling) - set(streams):
                del self._assembling[pid]
            self.streams = streams

    def _pes_payload(
        self, pid: int, pusi: bool, payload: bytes, random_access: bool, out: list[PES]
    ) -> None:
        if pusi:
            previous = self._finish(pid)
            if previous is not None:
                out.append(previous)
            kind, codec = self.streams[pid]
            assembly = self._start(payload, kind, codec)
            if assembly is None:
                self.bad_packets += 1
                return
            assembly.random_access = random_access
            self._assembling[pid] = assembly
        else:
            assembly = self._assembling.get(pid)
            if assembly is None:
                return  # continuation of a packet whose start we never saw
            assembly.parts.append(payload)
            assembly.size += len(payload)
        if assembly.expected is not None and assembly.size >= assembly.expected:
            pes = self._finish(pid)
            if pes is not None:
                out.append(pes)

    @staticmethod
    def _start(payload: bytes, kind: str, codec: str) -> _Assembly | None:
        if len(payload) < 9 or payload[0:3] != b"\x00\x00\x01":
            return None
        packet_length = (payload[4] << 8) | payload[5]
        flags = payload[7]
        header_len = payload[8]
        pts = dts = None
        if flags & 0x80 and len(payload) >= 14:
            pts = _timestamp(payload, 9)
            dts = pts
        if flags & 0x40 and len(payload) >= 19:
            dts = _timestamp(payload, 14)
        body = payload[9 + header_len :]
        expected = packet_length - 3 - header_len if packet_length else None
        return _Assembly(codec, kind, pts, dts, expected, [body], len(body))

    def _finish(self, pid: int) -> PES | None:
        assembly = self._assembling.pop(pid, None)
        if assembly is None or not assembly.size:
            return None
        data = b"".join(assembly.parts)
        if assembly.expected is not None:
            data = data[: assembly.expected]
        return PES(
            pid,
            assembly.codec,
            assembly.kind,
            assembly.pts,
            assembly.dts,
            data,
            assembly.random_access,
        )


def _timestamp(b: bytes, i: int) -> int:
    return (
        ((b[i] >> 1) & 0x07) << 30
        | b[i + 1] << 22
        | (b[i + 2] >> 1) << 15
        | b[i + 3] << 7
        | b[i + 4] >> 1
    )
