"""The real ID-card driver against the SAM simulator on a pty, byte for byte: happy path, each fault, recovery."""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from drivers.card_reader import (
    CardReaderError,
    CardRemovedError,
    InvalidCardDataError,
    NoCardError,
    ReaderChecksumError,
    ReaderFaultError,
    ReaderProtocolError,
    ReaderTimeoutError,
    ReaderUnavailableError,
    Sex,
    id_check_char,
)
from drivers.idcard import (
    IdCardData,
    IdCardReader,
    SamCommand,
    SamStatus,
    encode_request,
    encode_response,
    parse_id_text,
    parse_read_data,
)
from drivers.peripherals import Peripheral
from drivers.serial_link import SerialLink
from hardware_sim.idcard_sim import (
    IdCardFault,
    IdCardSimulator,
    encode_id_text,
    read_response_data,
    synthetic_card,
)
from hardware_sim.pty_device import PtyDevice
from protocol import PeripheralKind, PeripheralState
from tests.drivers.serial_support import ScriptedLink, load_transcript

CARD = synthetic_card(7)


@dataclasses.dataclass
class Rig:
    sim: IdCardSimulator
    device: PtyDevice
    reader: IdCardReader


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    sim = IdCardSimulator(CARD)
    with PtyDevice(sim, link_path=tmp_path / "ttyUSB-idcard", name="idcard-sim") as device:
        reader = IdCardReader(SerialLink(device.path), command_timeout_s=0.3, poll_interval_s=0.02)
        yield Rig(sim, device, reader)
        reader.close()


def test_request_frames_are_the_ones_in_the_vendor_manuals() -> None:
    # Published byte strings of the SAM module manuals, checksum included.
    assert encode_request(SamCommand.FIND_CARD) == bytes.fromhex("AAAAAA9669 0003 2001 22")
    assert encode_request(SamCommand.SELECT_CARD) == bytes.fromhex("AAAAAA9669 0003 2002 21")
    assert encode_request(SamCommand.READ_TEXT_PHOTO) == bytes.fromhex("AAAAAA9669 0003 3001 32")
    assert encode_request(SamCommand.RESET) == bytes.fromhex("AAAAAA9669 0003 10FF EC")
    assert encode_request(SamCommand.SAM_STATUS) == bytes.fromhex("AAAAAA9669 0003 11FF ED")
    assert encode_request(SamCommand.READ_SAM_ID) == bytes.fromhex("AAAAAA9669 0003 12FF EE")
    assert encode_response(SamStatus.FIND_SUCCESS, bytes(4)) == bytes.fromhex("AAAAAA9669 0008 00009F 00000000 97")
    assert encode_response(SamStatus.FIND_FAILED) == bytes.fromhex("AAAAAA9669 0004 000080 84")


def test_identity_number_check_character_matches_the_standards_examples() -> None:
    assert id_check_char("11010519491231002") == "X"  # GB 11643-1999's own example
    assert id_check_char("44052418800101001") == "4"
    assert id_check_char(CARD.id_number[:17]) == CARD.id_number[17]


def test_reads_a_card_over_the_pty_exactly_as_the_recorded_transcript(rig: Rig) -> None:
    assert rig.reader.read_card(timeout_s=1.0) == CARD
    assert rig.device.transcript() == load_transcript("idcard_read.hex")


def test_transcript_responses_decode_to_the_card_without_a_device() -> None:
    runs = load_transcript("idcard_read.hex")
    read_reply = runs[-1][1]
    body = read_reply[7:-1]
    assert body[:3] == bytes([0, 0, SamStatus.SUCCESS])
    card = parse_read_data(body[3:])
    assert (card.name, card.id_number, card.birth_date) == (CARD.name, CARD.id_number, CARD.birth_date)
    assert len(card.photo_wlt) == 1024


def test_card_fields_decode_and_personal_data_never_reaches_repr_or_logs(
    rig: Rig, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    card = rig.reader.read_card(timeout_s=1.0)
    assert card.ethnicity == {"01": "汉族", "03": "回族", "08": "壮族", "11": "满族"}[card.ethnicity_code]
    assert card.sex in (Sex.MALE, Sex.FEMALE)
    assert card.birth_date.strftime("%Y%m%d") == card.id_number[6:14]
    for text in (repr(card), str(card), str(card.masked()), caplog.text):
        assert card.id_number not in text
        assert card.name not in text
        assert card.address not in text
    assert card.masked()["id_number"].startswith(card.id_number[:3])
    assert "ID card read" in caplog.text


def test_reader_is_a_peripheral_and_reports_sam_details(rig: Rig) -> None:
    assert isinstance(rig.reader, Peripheral)
    assert rig.reader.kind is PeripheralKind.ID_CARD_READER
    rig.reader.reset()
    rig.reader.sam_status()
    assert rig.reader.sam_id().count("-") == 3
    status = rig.reader.status()
    assert (status.state, status.simulated) == (PeripheralState.OK, False)


def test_waits_for_a_card_and_gives_up_with_no_card(rig: Rig) -> None:
    rig.sim.remove()
    with pytest.raises(NoCardError):
        rig.reader.read_card(timeout_s=0.15)
    assert rig.sim.commands.count(SamCommand.FIND_CARD) >= 3  # it polled, not asked once
    assert rig.reader.status().state is PeripheralState.OK  # an empty reader is a healthy reader
    threading.Timer(0.1, rig.sim.place, args=(CARD,)).start()
    assert rig.reader.read_card(timeout_s=2.0) == CARD


FAULTS = [
    (IdCardFault.PULLED_MID_READ, CardRemovedError, PeripheralState.OK),
    (IdCardFault.NO_CARD_ON_SELECT, CardRemovedError, PeripheralState.OK),
    (IdCardFault.BAD_CHECKSUM, ReaderChecksumError, PeripheralState.FAULT),
    (IdCardFault.TIMEOUT, ReaderTimeoutError, PeripheralState.FAULT),
    (IdCardFault.GARBAGE, ReaderProtocolError, PeripheralState.FAULT),
]


@pytest.mark.parametrize(("fault", "error", "state"), FAULTS, ids=[f.value for f, _, _ in FAULTS])
def test_each_fault_is_its_typed_error_and_the_next_read_recovers(
    rig: Rig, fault: IdCardFault, error: type[CardReaderError], state: PeripheralState
) -> None:
    first = rig.reader.read_card(timeout_s=1.0)
    rig.sim.inject(fault)
    with pytest.raises(error):
        rig.reader.read_card(timeout_s=0.5)
    assert rig.reader.status().state is state
    assert first == CARD  # the card read before the fault is untouched (immutable)
    rig.sim.place(CARD)  # the holder puts the card back
    assert rig.reader.read_card(timeout_s=1.0) == CARD
    assert rig.reader.status().state is PeripheralState.OK


@pytest.mark.parametrize("command", [SamCommand.FIND_CARD, SamCommand.SELECT_CARD, SamCommand.READ_TEXT_PHOTO])
def test_bad_checksum_in_any_reply_is_detected(rig: Rig, command: SamCommand) -> None:
    rig.sim.inject(IdCardFault.BAD_CHECKSUM, on=command)
    with pytest.raises(ReaderChecksumError):
        rig.reader.read_card(timeout_s=0.5)
    assert rig.reader.read_card(timeout_s=1.0) == CARD


def test_line_noise_before_a_reply_is_skipped_by_resynchronising_on_the_preamble(rig: Rig) -> None:
    rig.sim.inject(IdCardFault.LINE_NOISE, on=SamCommand.READ_TEXT_PHOTO)
    assert rig.reader.read_card(timeout_s=1.0) == CARD


def test_unplugged_reader_is_unavailable_until_it_comes_back(rig: Rig) -> None:
    rig.sim.inject(IdCardFault.UNPLUG)
    with pytest.raises(ReaderUnavailableError):
        rig.reader.read_card(timeout_s=0.5)
    rig.device.unplug()  # wait for the pty to be gone (the fault closes it from the serving thread)
    with pytest.raises(ReaderUnavailableError):
        rig.reader.read_card(timeout_s=0.5)
    assert rig.reader.status().state is PeripheralState.ABSENT
    rig.device.replug()
    assert rig.reader.read_card(timeout_s=1.0) == CARD
    assert rig.reader.status().state is PeripheralState.OK


def test_module_reported_checksum_error_and_fault_statuses_are_typed() -> None:
    statuses = iter([SamStatus.CHECKSUM_ERROR, SamStatus.SAM_SELF_TEST_FAILED])
    link = ScriptedLink(lambda _request: encode_response(next(statuses)))
    reader = IdCardReader(link, command_timeout_s=0.2)
    with pytest.raises(ReaderChecksumError):
        reader.read_card(timeout_s=0.2)
    with pytest.raises(ReaderFaultError) as info:
        reader.read_card(timeout_s=0.2)
    assert info.value.status == SamStatus.SAM_SELF_TEST_FAILED
    assert reader.status().state is PeripheralState.FAULT
    assert link.written[0] == encode_request(SamCommand.FIND_CARD)


def test_fingerprint_read_returns_the_fingerprint_block(rig: Rig) -> None:
    with_fp = dataclasses.replace(CARD, fingerprint=bytes(range(256)) * 4)
    rig.sim.place(with_fp)
    card = rig.reader.read_card(timeout_s=1.0, with_fingerprint=True)
    assert card.fingerprint == with_fp.fingerprint
    assert rig.sim.commands[-1] is SamCommand.READ_TEXT_PHOTO_FINGERPRINT


def _text(**changes: object) -> bytes:
    return encode_id_text(dataclasses.replace(CARD, **changes))  # type: ignore[arg-type]  # test builds bad cards


def test_long_term_validity_and_invalid_cards() -> None:
    long_term = parse_id_text(_text(valid_until=None))
    assert long_term.long_term
    wrong_check = CARD.id_number[:17] + ("0" if CARD.id_number[17] != "0" else "1")
    with pytest.raises(InvalidCardDataError, match="check digit"):
        parse_id_text(_text(id_number=wrong_check))
    with pytest.raises(InvalidCardDataError, match="birth date"):
        parse_id_text(_text(birth_date=CARD.birth_date + dt.timedelta(days=1)))
    other_sex = Sex.FEMALE if CARD.sex is Sex.MALE else Sex.MALE
    with pytest.raises(InvalidCardDataError, match="sex"):
        parse_id_text(_text(sex=other_sex))
    with pytest.raises(InvalidCardDataError, match="ethnicity"):
        parse_id_text(_text(ethnicity_code="77"))
    with pytest.raises(InvalidCardDataError):
        parse_read_data(read_response_data(CARD)[:-1])


def test_invalid_card_text_is_card_data_invalid_and_leaves_the_reader_ok(rig: Rig) -> None:
    bad = dataclasses.replace(CARD, id_number=CARD.id_number[:17] + ("0" if CARD.id_number[17] != "0" else "1"))
    rig.sim.place(bad)
    with pytest.raises(InvalidCardDataError) as info:
        rig.reader.read_card(timeout_s=1.0)
    assert bad.id_number not in str(info.value)
    assert rig.reader.status().state is PeripheralState.OK


def test_card_data_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        CARD.name = "x"  # type: ignore[misc]  # proving immutability
    assert isinstance(CARD, IdCardData)


def test_composition_root_builds_the_reader_from_a_port_path(rig: Rig) -> None:
    reader = IdCardReader.on_port(rig.device.path, name="idcard1")
    assert reader.name == "idcard1"
    assert reader.read_card(timeout_s=1.0) == CARD
    reader.close()
