"""MPEG-TS both ways: an incremental demuxer (TS packets in, whole PES payloads out) and a muxer.

Why not FFmpeg's demuxer: it holds every H.264 frame until the frame after next has arrived (its
parser looks for the next access unit to end the current one), which is two frame intervals of
delay, and opening it probes for hundreds of milliseconds. Here a PES is emitted as soon as it is
complete: at once when the PES header carries its length (our encoder writes it), else when the
next PES of the same stream starts, else at the end of the segment.

Why our own muxer (`TSMuxer`): FFmpeg's interleaving muxer holds a video packet until a packet of
every other stream with a later timestamp has arrived, which delayed frames by 9 ms median (28 ms
p95) with AAC input; here each packet is written the moment it is given.

Pure Python, no av import; it runs on the decode and encode threads. Garbage is skipped by
resynchronising on the 0x47 sync byte, and counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

TS_PACKET = 188
TS_PAYLOAD = TS_PACKET - 4
SYNC = 0x47
PTS_WRAP = 1 << 33  # PTS, DTS and the PCR base are 33-bit counters of the 90 kHz clock
PTS_MASK = PTS_WRAP - 1

# ISO/IEC 13818-1 stream types we carry.
STREAM_H264 = 0x1B
STREAM_HEVC = 0x24
STREAM_AAC = 0x0F
STREAM_PRIVATE = (
    0x06  # Opus (with an "Opus" registration descriptor), also what FFmpeg uses for VP9
)
STREAM_MP3 = (0x03, 0x04)
VIDEO_TYPES = {STREAM_H264: "h264", STREAM_HEVC: "hevc"}
AUDIO_TYPES = {STREAM_AAC: "aac", 0x03: "mp3", 0x04: "mp3"}
# Video we recognise but do not decode, named for the error a publisher sees.
UNSUPPORTED_VIDEO = {
    0x01: "MPEG-1 video",
    0x02: "MPEG-2 video",
    0x10: "MPEG-4 Part 2 video",
    0x20: "H.264 MVC video",
    0x33: "H.266/VVC video",
    0x42: "AVS video",
    0xD1: "Dirac video",
    0xD2: "AVS2 video",
    0xD4: "AVS3 video",
    0xEA: "VC-1 video",
}
# Registration descriptors (format_identifier) of private-data (0x06) video streams.
REGISTERED_VIDEO = {b"VP09": "VP9", b"VP08": "VP8", b"AV01": "AV1"}
NO_VIDEO = "the input has no video stream (audio only): send H.264 or HEVC video"


def unsupported_video(name: str) -> str:
    """The error a publisher sees for video we cannot decode."""
    return f"{name} in MPEG-TS is not supported: send H.264 or HEVC"


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
    """Feed it bytes as they arrive; it returns the PES packets completed so far.

    `problem` says, once the PMT is known, why the input has no video we can decode (None when
    it has some): an unsupported codec, or audio only.
    """

    def __init__(self) -> None:
        self._pending = b""
        self._pmt_pids: set[int] = set()
        self.streams: dict[int, tuple[str, str]] = {}  # pid -> (kind, codec)
        self._assembling: dict[int, _Assembly] = {}
        self.skipped_bytes = 0
        self.bad_packets = 0
        self.pmt_seen = False
        self.problem: str | None = None
        # Private-data streams with no registration we know: their first PES tells whether
        # they are video (FFmpeg writes VP9 this way, with no descriptor at all).
        self._probing: set[int] = set()
        self._unsupported: dict[int, str] = {}  # pid -> codec name, for the error
        self._pmt = b""
        self._has_audio = False

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
        if self._probing:
            # Private streams that never sent a PES cannot be video we would have decoded.
            self._probing.clear()
            self._judge()
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
        elif pid in self._probing and pusi:
            self._probe(pid, payload)

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
        if section is None or len(section) < 12 or section == self._pmt:
            return  # muxers repeat the PMT: only a new one changes anything
        self._pmt = section
        info_len = ((section[10] & 0x0F) << 8) | section[11]
        pos = 12 + info_len
        body_end = len(section) - 4
        streams: dict[int, tuple[str, str]] = {}
        unsupported: dict[int, str] = {}
        probing: set[int] = set()
        while pos + 5 <= body_end:
            stream_type = section[pos]
            pid = ((section[pos + 1] & 0x1F) << 8) | section[pos + 2]
            es_len = ((section[pos + 3] & 0x0F) << 8) | section[pos + 4]
            descriptors = section[pos + 5 : pos + 5 + es_len]
            registration = _registration(descriptors)
            if stream_type in VIDEO_TYPES:
                streams[pid] = ("video", VIDEO_TYPES[stream_type])
            elif stream_type in AUDIO_TYPES:
                streams[pid] = ("audio", AUDIO_TYPES[stream_type])
            elif stream_type == STREAM_PRIVATE and registration == b"Opus":
                streams[pid] = ("audio", "opus")
            elif stream_type in UNSUPPORTED_VIDEO:
                unsupported[pid] = UNSUPPORTED_VIDEO[stream_type]
            elif stream_type == STREAM_PRIVATE and registration in REGISTERED_VIDEO:
                unsupported[pid] = REGISTERED_VIDEO[registration]
            elif stream_type == STREAM_PRIVATE and registration is None:
                probing.add(pid)
            pos += 5 + es_len
        self.pmt_seen = True
        self._unsupported = unsupported
        self._has_audio = any(kind == "audio" for kind, _ in streams.values())
        self._probing = probing
        if streams != self.streams:
            # A new encoder (new PMT): drop half-assembled packets of streams that went away.
            for pid in set(self._assembling) - set(streams):
                del self._assembling[pid]
            self.streams = streams
        self._judge()

    def _judge(self) -> None:
        if any(kind == "video" for kind, _ in self.streams.values()):
            self.problem = None
        elif self._unsupported:
            self.problem = unsupported_video(next(iter(self._unsupported.values())))
        elif self._probing:
            self.problem = None  # not known until a private stream's first PES arrives
        elif self._has_audio:
            self.problem = NO_VIDEO
        else:
            self.problem = "the input has no video stream: send H.264 or HEVC video"

    def _probe(self, pid: int, payload: bytes) -> None:
        if len(payload) >= 9 and payload[:3] == b"\x00\x00\x01" and 0xE0 <= payload[3] <= 0xEF:
            # A video stream_id: the publisher's muxer knows it is video but gave no codec.
            # A VP9 key frame's header carries the sync code 49 83 42 within its first bytes;
            # other frames do not, so later PES are looked at until one does.
            body = payload[9 + payload[8] :]
            if b"\x49\x83\x42" in body[:4]:
                self._unsupported[pid] = "VP9"
                self._probing.discard(pid)
            else:
                self._unsupported.setdefault(pid, "video of stream type 0x06")
        else:
            self._probing.discard(pid)  # not video: data or audio we do not carry
        self._judge()

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


def _registration(descriptors: bytes) -> bytes | None:
    """The format_identifier of a registration descriptor (tag 0x05), if there is one."""
    pos = 0
    while pos + 2 <= len(descriptors):
        tag, length = descriptors[pos], descriptors[pos + 1]
        if tag == 0x05 and length >= 4:
            return bytes(descriptors[pos + 2 : pos + 6])
        pos += 2 + length
    return None


def _timestamp(b: bytes, i: int) -> int:
    return (
        ((b[i] >> 1) & 0x07) << 30
        | b[i + 1] << 22
        | (b[i + 2] >> 1) << 15
        | b[i + 3] << 7
        | b[i + 4] >> 1
    )


# --- Opus in MPEG-TS (ETSI TS 102 366 style framing, as FFmpeg writes and reads it) -------------

OPUS_CONTROL_PREFIX = 0x3FF  # the first 11 bits of each access unit's control header (0x7FE0)
# Samples at 48 kHz per frame for each TOC config (RFC 6716 §3.1): SILK 10/20/40/60 ms,
# hybrid 10/20 ms, CELT 2.5/5/10/20 ms.
_OPUS_FRAME = [480, 960, 1920, 2880] * 3 + [480, 960] * 2 + [120, 240, 480, 960] * 4


def opus_samples(packet: bytes) -> int:
    """Duration of one raw Opus packet in 48 kHz samples, from its TOC byte (0 if unreadable)."""
    if not packet:
        return 0
    toc = packet[0]
    code = toc & 0x3
    if code == 0:
        count = 1
    elif code in (1, 2):
        count = 2
    elif len(packet) >= 2:
        count = packet[1] & 0x3F
    else:
        return 0
    return count * _OPUS_FRAME[toc >> 3]


def opus_to_90k(samples: int) -> int:
    return samples * 15 // 8  # 90000 / 48000


def split_opus(data: bytes) -> list[bytes]:
    """The raw Opus packets of one PES payload: each access unit's control header is stripped.

    Trim fields (start/end trim of the first/last packet) are skipped: the packets pass through
    unchanged, and the decoder at the far end plays them whole.
    """
    out: list[bytes] = []
    pos = 0
    end = len(data)
    while pos + 2 <= end:
        if ((data[pos] << 8) | data[pos + 1]) >> 5 != OPUS_CONTROL_PREFIX:
            out.append(data[pos:])  # no control header: a bare packet, take the rest as is
            break
        flags = data[pos + 1]
        pos += 2
        size = 0
        while pos < end:
            byte = data[pos]
            pos += 1
            size += byte
            if byte != 0xFF:
                break
        if flags & 0x10:
            pos += 2  # start_trim
        if flags & 0x08:
            pos += 2  # end_trim
        if flags & 0x04 and pos < end:
            pos += 1 + data[pos]  # control_extension_length and its bytes
        if pos >= end:
            break
        out.append(data[pos : pos + size])
        pos += size
    return out


def opus_control_header(size: int) -> bytes:
    """The control header that precedes an Opus access unit of `size` bytes in MPEG-TS."""
    return b"\x7f\xe0" + b"\xff" * (size // 255) + bytes((size % 255,))


# --- The muxer ------------------------------------------------------------------------------------

PAT_PID = 0x0000
PMT_PID = 0x1000
FIRST_ES_PID = 0x0100  # the PIDs FFmpeg uses, so captures look familiar
PROGRAM = 1
MUX_VIDEO = {"h264": STREAM_H264, "hevc": STREAM_HEVC}
MUX_AUDIO = ("aac", "opus")


def _crc_table() -> list[int]:
    table = []
    for i in range(256):
        crc = i << 24
        for _ in range(8):
            crc = ((crc << 1) ^ 0x04C11DB7) if crc & 0x80000000 else crc << 1
        table.append(crc & 0xFFFFFFFF)
    return table


_CRC_TABLE = _crc_table()


def crc32_mpeg2(data: bytes) -> int:
    """The CRC of PSI sections (polynomial 0x04C11DB7, MSB first, no final xor)."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = ((crc << 8) & 0xFFFFFFFF) ^ _CRC_TABLE[(crc >> 24) ^ byte]
    return crc


def _pes_timestamp(prefix: int, ts: int) -> bytes:
    ts &= PTS_MASK
    return bytes(
        (
            (prefix << 4) | ((ts >> 29) & 0x0E) | 1,
            (ts >> 22) & 0xFF,
            ((ts >> 14) & 0xFE) | 1,
            (ts >> 7) & 0xFF,
            ((ts << 1) & 0xFE) | 1,
        )
    )


def _pcr(base: int) -> bytes:
    base &= PTS_MASK
    # 33-bit base, 6 reserved bits (all ones), 9-bit extension (0: we count in 90 kHz).
    return bytes(
        (
            base >> 25,
            (base >> 17) & 0xFF,
            (base >> 9) & 0xFF,
            (base >> 1) & 0xFF,
            ((base & 1) << 7) | 0x7E,
            0,
        )
    )


class TSMuxer:
    """Writes one program of MPEG-TS: each packet goes out at once, nothing is interleaved.

    `tables()` gives PAT and PMT (a segment starts with them); `video()` and `audio()` give the
    TS packets of one access unit. Timestamps are on the 90 kHz clock and may exceed 33 bits:
    they are written modulo 2**33, as the format wraps. The PCR rides on the video PID (on the
    audio PID when there is no video), in every access unit's first packet.
    """

    def __init__(self, video: str | None = "h264", audio: str | None = None, channels: int = 2):
        if video is not None and video not in MUX_VIDEO:
            raise ValueError(f"cannot mux video codec {video!r}")
        if audio is not None and audio not in MUX_AUDIO:
            raise ValueError(f"cannot mux audio codec {audio!r}")
        if video is None and audio is None:
            raise ValueError("a program needs at least one stream")
        self.video_codec = video
        self.audio_codec = audio
        self.channels = channels
        self.video_pid = FIRST_ES_PID if video is not None else None
        self.audio_pid = (FIRST_ES_PID + (video is not None)) if audio is not None else None
        self.pcr_pid = self.video_pid if self.video_pid is not None else self.audio_pid
        self._cc: dict[int, int] = {}

    def tables(self) -> bytes:
        return self._section_packet(PAT_PID, self._pat()) + self._section_packet(
            PMT_PID, self._pmt()
        )

    def video(self, data: bytes, pts: int, dts: int | None = None, keyframe: bool = False) -> bytes:
        assert self.video_pid is not None, "this muxer has no video stream"
        if dts is None:
            dts = pts
        pes = _pes_header(0xE0, len(data), pts, dts, video=True) + data
        return self._packetize(self.video_pid, pes, pcr=dts, random_access=keyframe)

    def audio(self, data: bytes | Sequence[bytes], pts: int) -> bytes:
        """One audio PES: an ADTS frame (or several), or Opus packets, each of which gets its
        control header; several Opus packets (a sequence) share the PES and its pts."""
        assert self.audio_pid is not None, "this muxer has no audio stream"
        if self.audio_codec == "opus":
            packets = [data] if isinstance(data, bytes | bytearray) else data
            data = b"".join(opus_control_header(len(p)) + p for p in packets)
            stream_id = 0xBD  # private_stream_1, as for other stream type 0x06 payloads
        else:
            data = data if isinstance(data, bytes | bytearray) else b"".join(data)
            stream_id = 0xC0  # ADTS AAC goes in as it came
        pes = _pes_header(stream_id, len(data), pts, pts, video=False) + data
        pcr = pts if self.pcr_pid == self.audio_pid else None
        return self._packetize(self.audio_pid, pes, pcr=pcr, random_access=pcr is not None)

    def _pat(self) -> bytes:
        body = PROGRAM.to_bytes(2, "big") + (0xE000 | PMT_PID).to_bytes(2, "big")
        return _section(0x00, 1, body)

    def _pmt(self) -> bytes:
        assert self.pcr_pid is not None
        body = bytearray((0xE000 | self.pcr_pid).to_bytes(2, "big"))
        body += (0xF000).to_bytes(2, "big")  # program_info_length 0
        if self.video_pid is not None and self.video_codec is not None:
            body += _es_entry(MUX_VIDEO[self.video_codec], self.video_pid, b"")
        if self.audio_pid is not None:
            if self.audio_codec == "opus":
                # Registration 'Opus' and the DVB extension descriptor (tag 0x7F, extension
                # 0x80) whose channel_config_code is the channel count for 1 or 2 channels.
                descriptors = b"\x05\x04Opus" + bytes((0x7F, 0x02, 0x80, self.channels))
                body += _es_entry(STREAM_PRIVATE, self.audio_pid, descriptors)
            else:
                body += _es_entry(STREAM_AAC, self.audio_pid, b"")
        return _section(0x02, PROGRAM, bytes(body))

    def _next_cc(self, pid: int) -> int:
        cc = (self._cc.get(pid, -1) + 1) & 0x0F
        self._cc[pid] = cc
        return cc

    def _section_packet(self, pid: int, section: bytes) -> bytes:
        payload = b"\x00" + section  # pointer_field 0
        header = bytes((SYNC, 0x40 | pid >> 8, pid & 0xFF, 0x10 | self._next_cc(pid)))
        return header + payload + b"\xff" * (TS_PAYLOAD - len(payload))

    def _packetize(self, pid: int, pes: bytes, pcr: int | None, random_access: bool) -> bytes:
        out = bytearray()
        pos = 0
        total = len(pes)
        first = True
        while pos < total:
            # The adaptation field: PCR and random access on the first packet of the unit, and
            # stuffing in the last one, so that every packet is exactly 188 bytes.
            af: bytes | None = None  # the adaptation field after its length byte
            if first and (pcr is not None or random_access):
                flags = (0x40 if random_access else 0) | (0x10 if pcr is not None else 0)
                af = bytes((flags,)) + (_pcr(pcr) if pcr is not None else b"")
            room = TS_PAYLOAD - (1 + len(af) if af is not None else 0)
            left = total - pos
            if left < room:
                stuffing = room - left
                if af is not None:
                    af += b"\xff" * stuffing
                elif stuffing == 1:
                    af = b""  # a bare adaptation_field_length of 0 stuffs exactly one byte
                else:
                    af = b"\x00" + b"\xff" * (stuffing - 2)
            chunk = pes[pos : pos + min(room, left)]
            pos += len(chunk)
            pusi = 0x40 if first else 0
            cc = self._next_cc(pid)
            if af is None:
                out += bytes((SYNC, pusi | pid >> 8, pid & 0xFF, 0x10 | cc))
            else:
                out += bytes((SYNC, pusi | pid >> 8, pid & 0xFF, 0x30 | cc, len(af))) + af
            out += chunk
            first = False
        return bytes(out)


def _pes_header(stream_id: int, size: int, pts: int, dts: int, video: bool) -> bytes:
    with_dts = (dts & PTS_MASK) != (pts & PTS_MASK)
    if with_dts:
        fields = _pes_timestamp(0x3, pts) + _pes_timestamp(0x1, dts)
        flags = 0xC0
    else:
        fields = _pes_timestamp(0x2, pts)
        flags = 0x80
    length = 3 + len(fields) + size
    if length > 0xFFFF:
        # Allowed for video only: 0 means "unbounded", the unit ends where the next begins.
        assert video, "audio access unit too large for one PES"
        length = 0
    # 0x84: '10' marker bits and data_alignment_indicator (each PES starts an access unit).
    return (
        b"\x00\x00\x01"
        + bytes((stream_id,))
        + length.to_bytes(2, "big")
        + bytes((0x84, flags, len(fields)))
        + fields
    )


def _es_entry(stream_type: int, pid: int, descriptors: bytes) -> bytes:
    return (
        bytes((stream_type,))
        + (0xE000 | pid).to_bytes(2, "big")
        + (0xF000 | len(descriptors)).to_bytes(2, "big")
        + descriptors
    )


def _section(table_id: int, table_id_ext: int, body: bytes) -> bytes:
    # section_length counts what follows it: 5 header bytes, the body and the CRC.
    length = 5 + len(body) + 4
    head = bytes((table_id, 0xB0 | length >> 8, length & 0xFF))
    head += table_id_ext.to_bytes(2, "big") + bytes((0xC1, 0x00, 0x00))  # version 0, current
    section = head + body
    return section + crc32_mpeg2(section).to_bytes(4, "big")
