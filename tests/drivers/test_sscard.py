"""The real social-security-card driver against the reader simulator on a pty: two vendor layouts, faults."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError

from drivers.card_reader import (
    CardReaderError,
    CardRefusedError,
    CardRemovedError,
    InvalidCardDataError,
    NoCardError,
    ReaderChecksumError,
    ReaderProtocolError,
    ReaderTimeoutError,
    ReaderUnavailableError,
)
from drivers.peripherals import Peripheral
from drivers.serial_link import SerialLink
from drivers.sscard import (
    DEFAULT_LAYOUT,
    SocialSecurityCardData,
    SocialSecurityCardReader,
    SsCardLayout,
    encode_frame,
    read_record,
    select_fid,
)
from hardware_sim.pty_device import PtyDevice
from hardware_sim.sscard_sim import SsCardFault, SsCardSimulator, build_card_files, synthetic_ss_card
from protocol import PeripheralKind, PeripheralState
from tests.drivers.serial_support import FIXTURES, load_transcript

CARD = synthetic_ss_card(11)
VENDOR_B = SsCardLayout.model_validate_json((FIXTURES / "sscard_layout_vendor_b.json").read_text(encoding="utf-8"))


@dataclasses.dataclass
class Rig:
    sim: SsCardSimulator
    device: PtyDevice
    reader: SocialSecurityCardReader


def make_rig(tmp_path: Path, sim: SsCardSimulator, layout: SsCardLayout) -> Iterator[Rig]:
    with PtyDevice(sim, link_path=tmp_path / "ttyUSB-sscard", name="sscard-sim") as device:
        reader = SocialSecurityCardReader(SerialLink(device.path), layout, command_timeout_s=0.3, poll_interval_s=0.02)
        yield Rig(sim, device, reader)
        reader.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    yield from make_rig(tmp_path, SsCardSimulator(CARD), DEFAULT_LAYOUT)


def test_frames_and_apdus_are_the_documented_bytes() -> None:
    frame = DEFAULT_LAYOUT.frame
    assert encode_frame(frame.cmd_power_on_contact, b"", frame) == bytes.fromhex("02 0001 31 30 03")
    assert encode_frame(frame.cmd_apdu_contact, select_fid(b"\x3f\x00"), frame) == bytes.fromhex(
        "02 0008 33 00A4000002 3F00 A2 03"
    )
    assert read_record(7) == bytes.fromhex("00B2070400")
    assert encode_frame(VENDOR_B.frame.cmd_activate_contactless, b"", VENDOR_B.frame) == bytes.fromhex(
        "02 01 61 62 03"  # BCC from STX: 02 ^ 01 ^ 61
    )


def test_reads_a_contact_card_exactly_as_the_recorded_transcript(rig: Rig) -> None:
    assert isinstance(rig.reader, Peripheral)
    assert rig.reader.kind is PeripheralKind.SS_CARD_READER
    card = rig.reader.read_card(timeout_s=1.0)
    assert card == CARD
    assert rig.device.transcript() == load_transcript("sscard_read.hex")
    assert len(card.card_identification_code) == 32
    assert len(card.card_number) == 9
    assert card.ethnicity is not None
    assert rig.reader.status().state is PeripheralState.OK


def test_personal_data_never_reaches_repr_or_logs(rig: Rig, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    card = rig.reader.read_card(timeout_s=1.0)
    for text in (repr(card), str(card), str(card.masked()), caplog.text):
        for secret in (card.name, card.ss_number, card.card_number, card.card_identification_code):
            assert secret not in text
    assert "social-security card read" in caplog.text


def test_contactless_card_is_found_after_the_contact_slot_is_empty(tmp_path: Path) -> None:
    card = synthetic_ss_card(12, interface="contactless")
    for r in make_rig(tmp_path, SsCardSimulator(card, interface="contactless"), DEFAULT_LAYOUT):
        assert r.reader.read_card(timeout_s=1.0) == card


def test_second_vendor_layout_and_frame_variant(tmp_path: Path) -> None:
    card = synthetic_ss_card(13, interface="contactless")
    for r in make_rig(tmp_path, SsCardSimulator(card, VENDOR_B, interface="contactless"), VENDOR_B):
        got = r.reader.read_card(timeout_s=1.0)
        assert (got.card_identification_code, got.card_number, got.ss_number, got.name) == (
            card.card_identification_code,
            card.card_number,
            card.ss_number,
            card.name,
        )
        assert (got.expiry_date, got.sex, got.birth_date) == (card.expiry_date, card.sex, card.birth_date)
        assert (got.issue_date, got.birthplace, got.ethnicity_code) == (None, None, None)  # not in this layout
        assert r.device.transcript()[0] == (">", bytes.fromhex("02 01 61 62 03"))
        assert select_fid(b"\xdd\xf2") in r.sim.apdus
    # The same card under the default layout's reader is not understood: frames differ.
    for r in make_rig(tmp_path, SsCardSimulator(card, VENDOR_B, interface="contactless"), DEFAULT_LAYOUT):
        with pytest.raises(CardReaderError):
            r.reader.read_card(timeout_s=0.2)


def test_no_card_after_polling_leaves_the_reader_ok(rig: Rig) -> None:
    rig.sim.remove()
    with pytest.raises(NoCardError):
        rig.reader.read_card(timeout_s=0.1)
    assert rig.reader.status().state is PeripheralState.OK


FAULTS = [
    (SsCardFault.PULLED_MID_READ, CardRemovedError, PeripheralState.OK),
    (SsCardFault.BAD_CHECKSUM, ReaderChecksumError, PeripheralState.FAULT),
    (SsCardFault.TIMEOUT, ReaderTimeoutError, PeripheralState.FAULT),
    (SsCardFault.GARBAGE, ReaderProtocolError, PeripheralState.FAULT),
]


@pytest.mark.parametrize(("fault", "error", "state"), FAULTS, ids=[f.value for f, _, _ in FAULTS])
def test_each_fault_is_its_typed_error_and_the_next_read_recovers(
    rig: Rig, fault: SsCardFault, error: type[CardReaderError], state: PeripheralState
) -> None:
    first = rig.reader.read_card(timeout_s=1.0)
    on = DEFAULT_LAYOUT.frame.cmd_apdu_contact if fault is not SsCardFault.PULLED_MID_READ else None
    rig.sim.inject(fault, on=on, after_apdus=3)
    with pytest.raises(error):
        rig.reader.read_card(timeout_s=0.5)
    assert rig.reader.status().state is state
    rig.sim.place(CARD)
    assert rig.reader.read_card(timeout_s=1.0) == first == CARD
    assert rig.reader.status().state is PeripheralState.OK


def test_unplugged_reader_is_unavailable_until_it_comes_back(rig: Rig) -> None:
    rig.sim.inject(SsCardFault.UNPLUG)
    with pytest.raises(ReaderUnavailableError):
        rig.reader.read_card(timeout_s=0.5)
    rig.device.unplug()
    with pytest.raises(ReaderUnavailableError):
        rig.reader.read_card(timeout_s=0.5)
    assert rig.reader.status().state is PeripheralState.ABSENT
    rig.device.replug()
    assert rig.reader.read_card(timeout_s=1.0) == CARD


def test_card_without_the_holder_file_is_refused_and_missing_optional_records_are_none(rig: Rig) -> None:
    files = build_card_files(CARD, DEFAULT_LAYOUT)
    ef05 = (b"\x3f\x00", b"\xdd\xf1", b"\xef\x05")
    rig.sim.place_files({ef05: files[ef05]})
    with pytest.raises(CardRefusedError) as info:
        rig.reader.read_card(timeout_s=1.0)
    assert info.value.sw == 0x6A82
    assert rig.reader.status().state is PeripheralState.OK  # the card's problem, not the reader's
    trimmed = {path: dict(records) for path, records in files.items()}
    del trimmed[ef05][0x04]  # no issuing institution record on this card
    rig.sim.place_files(trimmed)
    card = rig.reader.read_card(timeout_s=1.0)
    assert card.issuing_institution is None
    assert card.card_number == CARD.card_number


def test_invalid_social_security_number_is_invalid_card_data(rig: Rig) -> None:
    bad = CARD.ss_number[:17] + ("0" if CARD.ss_number[17] != "0" else "1")
    rig.sim.place(dataclasses.replace(CARD, ss_number=bad))
    with pytest.raises(InvalidCardDataError) as info:
        rig.reader.read_card(timeout_s=1.0)
    assert bad not in str(info.value)


def test_layout_config_fails_closed() -> None:
    raw = DEFAULT_LAYOUT.model_dump()
    with pytest.raises(ValidationError):
        SsCardLayout.model_validate({**raw, "vendor_magic": 1})
    with pytest.raises(ValidationError):
        SsCardLayout.model_validate({**raw, "interfaces": ["contact", "contact"]})
    broken_field = {**raw["fields"], "name": {**raw["fields"]["name"], "file": "3F00/DDF1/EF"}}
    with pytest.raises(ValidationError):
        SsCardLayout.model_validate({**raw, "fields": broken_field})
    missing = {k: v for k, v in raw["fields"].items() if k != "ss_number"}
    with pytest.raises(ValidationError):
        SsCardLayout.model_validate({**raw, "fields": missing})
    assert SsCardLayout.model_validate(raw) == DEFAULT_LAYOUT


def test_card_data_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CARD.name = "x"  # type: ignore[misc]  # proving immutability
    assert isinstance(CARD, SocialSecurityCardData)


def test_composition_root_builds_the_reader_from_a_port_path(rig: Rig) -> None:
    reader = SocialSecurityCardReader.on_port(rig.device.path, DEFAULT_LAYOUT, name="sscard1")
    assert (reader.name, reader.layout.name) == ("sscard1", "mohrss-default")
    assert reader.read_card(timeout_s=1.0) == CARD
    reader.close()
