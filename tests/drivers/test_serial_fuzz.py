"""Property-based tests: the serial codecs and field parsers raise only their typed errors on arbitrary bytes,
and valid frames and records survive build -> parse unchanged."""

from __future__ import annotations

import contextlib
import dataclasses
from collections import deque

from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from drivers.card_reader import InvalidCardDataError, ReaderProtocolError, id_check_char, id_number_problem
from drivers.idcard import PREAMBLE, parse_id_text, parse_read_data
from drivers.idcard import decode_frame as decode_sam_frame
from drivers.idcard import decode_response as decode_sam_response
from drivers.idcard import encode_frame as encode_sam_frame
from drivers.idcard import read_frame as read_sam_frame
from drivers.qr_scanner import MalformedScanError, QrLineAssembler, QrScannerConfig, UndecodableCodeError, decode_code
from drivers.serial_link import FrameError, SerialLinkError
from drivers.sscard import (
    DEFAULT_LAYOUT,
    ReaderFrameConfig,
    build_card_data,
    decode_value,
    encode_tlv,
    parse_tlv,
    split_response_apdu,
)
from drivers.sscard import decode_frame as decode_reader_frame
from drivers.sscard import encode_frame as encode_reader_frame
from drivers.sscard import read_frame as read_reader_frame
from hardware_sim.idcard_sim import IdCardSimulator, encode_id_text, synthetic_card
from hardware_sim.sscard_sim import SsCardSimulator, synthetic_ss_card

FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
VARIANTS = [DEFAULT_LAYOUT.frame, ReaderFrameConfig(length_bytes=1, bcc_covers_stx=True, max_length=255)]
CJK = st.characters(min_codepoint=0x4E00, max_codepoint=0x9FA5)


class BytesLink:
    """A ByteLink that yields fixed bytes, then silence; with `TickClock` a read never waits for real."""

    def __init__(self, data: bytes) -> None:
        self._data = deque(data)

    @property
    def port(self) -> str:
        return "bytes"

    def open(self) -> None:
        pass

    def write(self, data: bytes) -> None:
        pass

    def read(self, max_bytes: int, timeout_s: float) -> bytes:
        n = min(max_bytes, len(self._data))
        return bytes(self._data.popleft() for _ in range(n))

    def discard_input(self) -> None:
        self._data.clear()

    def close(self) -> None:
        pass


class TickClock:
    """Each call is 10 ms later: deadlines pass after a bounded number of empty reads."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 0.01
        return self.now


class NullLine:
    def __init__(self) -> None:
        self.sent = bytearray()

    def send(self, data: bytes) -> None:
        self.sent += data

    def unplug(self) -> None:
        pass


# ---------------------------------------------------------------- SAM (ID card) frames


@FUZZ
@given(st.binary(max_size=600))
def test_sam_frame_decoder_raises_only_frame_errors(data: bytes) -> None:
    for candidate in (data, PREAMBLE + data):
        try:
            body = decode_sam_frame(candidate)
        except FrameError:
            continue
        assert encode_sam_frame(body) == candidate


@FUZZ
@given(st.binary(min_size=3, max_size=1500))
def test_sam_frames_round_trip(body: bytes) -> None:
    frame = encode_sam_frame(body)
    assert decode_sam_frame(frame) == body
    response = decode_sam_response(body)
    assert bytes([response.sw1, response.sw2, response.sw3]) + response.data == body
    clock = TickClock()
    assert read_sam_frame(BytesLink(frame), clock() + 1.0, clock) == body


@FUZZ
@given(st.binary(max_size=400), st.binary(min_size=3, max_size=64))
def test_sam_stream_reader_resynchronises_or_raises_only_link_errors(noise: bytes, body: bytes) -> None:
    clock = TickClock()
    with contextlib.suppress(SerialLinkError):
        read_sam_frame(BytesLink(noise), clock() + 1.0, clock)
    assume(PREAMBLE[:1] not in noise[-4:] and PREAMBLE not in noise and len(noise) <= 256)
    clock = TickClock()
    assert read_sam_frame(BytesLink(noise + encode_sam_frame(body)), clock() + 1.0, clock) == body


# ---------------------------------------------------------------- ID card text


@FUZZ
@given(st.binary(min_size=256, max_size=256) | st.binary(max_size=300))
def test_id_text_parser_raises_only_invalid_card_data(text: bytes) -> None:
    with contextlib.suppress(InvalidCardDataError):
        parse_id_text(text)


@FUZZ
@given(st.binary(max_size=1400))
def test_read_response_parser_raises_only_invalid_card_data(data: bytes) -> None:
    for with_fingerprint in (False, True):
        with contextlib.suppress(InvalidCardDataError):
            parse_read_data(data, with_fingerprint=with_fingerprint)


@FUZZ
@given(st.integers(0, 10**6), st.text(CJK, min_size=1, max_size=15), st.text(CJK, min_size=0, max_size=35))
def test_id_text_round_trips(seed: int, name: str, address: str) -> None:
    card = dataclasses.replace(synthetic_card(seed), name=name, address=address)
    assert parse_id_text(encode_id_text(card), card.photo_wlt) == card


@FUZZ
@given(st.text(st.sampled_from("0123456789X"), min_size=0, max_size=20))
def test_identity_number_validation_never_raises(number: str) -> None:
    problem = id_number_problem(number)
    if problem is None:
        assert id_check_char(number[:17]) == number[17]


# ---------------------------------------------------------------- social-security reader frames, TLV, fields


@FUZZ
@given(st.binary(max_size=600), st.sampled_from(VARIANTS))
def test_reader_frame_decoder_raises_only_frame_errors(data: bytes, variant: ReaderFrameConfig) -> None:
    for candidate in (data, b"\x02" + data):
        try:
            code, payload = decode_reader_frame(candidate, variant)
        except FrameError:
            continue
        assert encode_reader_frame(code, payload, variant) == candidate
    clock = TickClock()
    with contextlib.suppress(SerialLinkError):
        read_reader_frame(BytesLink(data), variant, clock() + 1.0, clock)


@FUZZ
@given(st.integers(0, 255), st.binary(max_size=250), st.sampled_from(VARIANTS))
def test_reader_frames_round_trip(code: int, payload: bytes, variant: ReaderFrameConfig) -> None:
    frame = encode_reader_frame(code, payload, variant)
    assert decode_reader_frame(frame, variant) == (code, payload)
    clock = TickClock()
    assert read_reader_frame(BytesLink(frame), variant, clock() + 1.0, clock) == (code, payload)


@FUZZ
@given(st.binary(max_size=300))
def test_tlv_and_apdu_parsers_raise_only_typed_errors(data: bytes) -> None:
    with contextlib.suppress(InvalidCardDataError):
        parse_tlv(data)
    with contextlib.suppress(ReaderProtocolError):
        split_response_apdu(data)
    for encoding in ("ascii", "gbk", "utf-8", "bcd"):
        with contextlib.suppress(InvalidCardDataError):
            decode_value(data, encoding)


@FUZZ
@given(st.dictionaries(st.integers(1, 254), st.binary(max_size=200), max_size=6))
def test_tlv_round_trips(values: dict[int, bytes]) -> None:
    record = b"".join(encode_tlv(tag, value) for tag, value in values.items())
    assert parse_tlv(record + b"\xff" * 4) == values


SS_FIELDS = [
    "card_identification_code",
    "card_number",
    "ss_number",
    "name",
    "card_type",
    "issue_date",
    "expiry_date",
    "sex",
    "ethnicity",
    "birthplace",
    "birth_date",
]
_VALID_SS = synthetic_ss_card(2)
VALID_SS_VALUES = {
    "card_identification_code": _VALID_SS.card_identification_code,
    "card_number": _VALID_SS.card_number,
    "ss_number": _VALID_SS.ss_number,
    "name": _VALID_SS.name,
    "sex": "1",
    "ethnicity": "01",
    "birth_date": _VALID_SS.ss_number[6:14],
    "issue_date": "20200101",
}


@FUZZ
@given(st.dictionaries(st.sampled_from(SS_FIELDS), st.text(max_size=20) | st.text("0123456789X", max_size=20)))
def test_card_builder_raises_only_invalid_card_data(overrides: dict[str, str]) -> None:
    # Start from a valid card so that each mutated field, not only the first required one, is exercised.
    values = {**VALID_SS_VALUES, **overrides}
    with contextlib.suppress(InvalidCardDataError):
        card = build_card_data(values, "contact")
        assert card.ss_number == values["ss_number"]


# ---------------------------------------------------------------- QR line assembly


@FUZZ
@given(
    st.lists(st.tuples(st.binary(max_size=80), st.floats(0, 2)), max_size=20),
    st.sampled_from(["cr", "crlf", "lf", "none"]),
    st.sampled_from(["", "02"]),
)
def test_qr_assembler_never_raises(chunks: list[tuple[bytes, float]], suffix: str, prefix: str) -> None:
    config = QrScannerConfig.model_validate({"suffix": suffix, "prefix_hex": prefix, "max_code_bytes": 64})
    assembler = QrLineAssembler(config)
    now = 0.0
    for data, gap in chunks:
        now += gap
        for item in assembler.feed(data, now):
            assert isinstance(item, bytes | MalformedScanError)
            if isinstance(item, bytes):
                assert 0 < len(item) <= 64
                with contextlib.suppress(UndecodableCodeError):
                    decode_code(item, config)
    assembler.tick(now + 10)
    assert not assembler.has_partial


@FUZZ
@given(
    st.lists(st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E) | CJK, min_size=1, max_size=60), max_size=8),
    st.lists(st.integers(1, 40), min_size=1, max_size=10),
    st.sampled_from([("cr", b"\r"), ("crlf", b"\r\n"), ("lf", b"\n")]),
)
def test_qr_codes_round_trip_however_the_bytes_are_split(
    codes: list[str], cuts: list[int], suffix: tuple[str, bytes]
) -> None:
    config = QrScannerConfig.model_validate({"suffix": suffix[0], "max_code_bytes": 256})
    stream = b"".join(c.encode() + suffix[1] for c in codes)
    assembler = QrLineAssembler(config)
    got: list[str] = []
    position, i = 0, 0
    while position < len(stream):
        step = cuts[i % len(cuts)]
        for item in assembler.feed(stream[position : position + step], 0.001 * i):
            assert isinstance(item, bytes)
            got.append(decode_code(item, config))
        position += step
        i += 1
    assert got == codes


# ---------------------------------------------------------------- simulators survive arbitrary host bytes


@FUZZ
@given(st.binary(max_size=300))
def test_simulators_never_crash_on_arbitrary_host_bytes(data: bytes) -> None:
    id_sim, ss_sim, line = IdCardSimulator(synthetic_card(1)), SsCardSimulator(synthetic_ss_card(1)), NullLine()
    for byte in data + encode_sam_frame(bytes([0x20, 0x01])):
        id_sim.on_byte(byte, line)
    for byte in data:
        ss_sim.on_byte(byte, line)
    assert line.sent  # the valid find-card frame at the end was answered
