"""The serial-device simulators on their own: synthetic cards are valid, the pty behaves like a serial line,
and the simulated modules answer malformed host input the way the real ones document."""

from __future__ import annotations

import datetime as dt
import threading
import time
from pathlib import Path

import pytest
import serial

from drivers.card_reader import id_birth_date, id_number_problem, id_sex_digit_is_male
from drivers.idcard import TEXT_LAYOUT, SamCommand, SamStatus, decode_frame, decode_response, encode_request
from drivers.serial_link import SerialLink, read_exact
from drivers.sscard import DEFAULT_LAYOUT, encode_frame, read_record, select_fid
from drivers.sscard import read_frame as read_reader_frame
from hardware_sim.idcard_sim import TEXT_FIELD_CHARS, IdCardSimulator, encode_id_text, synthetic_card
from hardware_sim.pty_device import DeviceLine, PtyDevice
from hardware_sim.qr_scanner_sim import QrScannerSimulator
from hardware_sim.sscard_sim import SsCardSimulator, synthetic_ss_card

# Not a ScriptedLink: this model is served by PtyDevice, the tests talk to it through real pyserial.


class Echo:
    """A device that answers every byte with byte+1, to see the pty deliver bytes one at a time, unaltered."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def attach(self, line: DeviceLine) -> None:
        pass

    def on_byte(self, byte: int, line: DeviceLine) -> None:
        self.seen.append(byte)
        line.send(bytes([(byte + 1) % 256]))


def test_synthetic_cards_are_valid_and_consistent() -> None:
    for seed in range(300):
        card = synthetic_card(seed)
        assert id_number_problem(card.id_number) is None
        assert id_birth_date(card.id_number) == card.birth_date
        assert id_sex_digit_is_male(card.id_number) == (card.sex.value == "1")
        assert len(encode_id_text(card)) == 256
        assert len(card.photo_wlt) == 1024
        age_at_issue = (card.valid_from - card.birth_date).days // 365
        assert (card.valid_until is None) == (age_at_issue >= 46)
    assert len({synthetic_card(s).id_number for s in range(300)}) == 300


def test_simulator_text_layout_matches_the_drivers_independently_written_layout() -> None:
    offset = 0
    for field, chars in TEXT_FIELD_CHARS:
        assert TEXT_LAYOUT[field] == (offset, 2 * chars)
        offset += 2 * chars
    assert offset == 256


def test_pty_delivers_raw_bytes_without_echo_or_line_discipline(tmp_path: Path) -> None:
    model = Echo()
    with PtyDevice(model, link_path=tmp_path / "ttyECHO") as device:
        link = SerialLink(device.path)
        payload = bytes(range(256))  # includes CR, LF, XON/XOFF, ^C, ^D: all must pass untouched
        link.write(payload)
        back = read_exact(link, 256, time.monotonic() + 2)
        assert back == bytes((b + 1) % 256 for b in payload)
        assert model.seen == list(payload)
        runs = device.transcript()
        assert b"".join(d for direction, d in runs if direction == ">") == payload
        assert b"".join(d for direction, d in runs if direction == "<") == back
        link.close()


def test_unplug_removes_the_port_and_replug_brings_it_back_at_the_same_path(tmp_path: Path) -> None:
    device = PtyDevice(Echo(), link_path=tmp_path / "ttyUSB0").start()
    try:
        path = device.path
        assert Path(path).exists()
        device.unplug()
        plugged_after_unplug = device.plugged  # read afresh: mypy would narrow a repeated property access
        assert not plugged_after_unplug
        assert not Path(path).exists()
        with pytest.raises(serial.SerialException):
            serial.Serial(path)
        device.replug()
        plugged_after_replug = device.plugged
        assert plugged_after_replug
        assert device.path == path
        with serial.Serial(path, timeout=1) as port:
            port.write(b"A")
            assert port.read(1) == b"B"
    finally:
        device.stop()
    assert not any(t.name.endswith("-pty") and t.is_alive() for t in threading.enumerate())


def test_id_simulator_reports_our_checksum_errors_and_unknown_commands(tmp_path: Path) -> None:
    with PtyDevice(IdCardSimulator(synthetic_card(3)), link_path=tmp_path / "ttyID") as device:
        link = SerialLink(device.path)
        bad = bytearray(encode_request(SamCommand.FIND_CARD))
        bad[-1] ^= 0xFF
        link.write(bytes(bad))
        reply = read_exact(link, 11, time.monotonic() + 2)
        assert decode_response(decode_frame(reply)).sw3 == SamStatus.CHECKSUM_ERROR
        link.write(bytes.fromhex("AAAAAA9669 0003 77 77") + bytes([0x00 ^ 0x03 ^ 0x77 ^ 0x77]))
        reply = read_exact(link, 11, time.monotonic() + 2)
        assert decode_response(decode_frame(reply)).sw3 == SamStatus.COMMAND_ERROR
        link.close()


def test_ss_simulator_speaks_iso7816_status_words(tmp_path: Path) -> None:
    frame = DEFAULT_LAYOUT.frame
    with PtyDevice(SsCardSimulator(synthetic_ss_card(4)), link_path=tmp_path / "ttySS") as device:
        link = SerialLink(device.path)

        def command(code: int, data: bytes = b"") -> tuple[int, bytes]:
            link.write(encode_frame(code, data, frame))
            return read_reader_frame(link, frame, time.monotonic() + 2)

        assert command(frame.cmd_apdu_contact, select_fid(b"\x3f\x00"))[0] == frame.status_card_error  # unpowered
        assert command(frame.cmd_activate_contactless)[0] == frame.status_no_card  # the card is in the contact slot
        status, atr = command(frame.cmd_power_on_contact)
        assert (status, atr[:1]) == (frame.status_ok, b"\x3b")
        assert command(frame.cmd_apdu_contact, select_fid(b"\x3f\x00")) == (frame.status_ok, b"\x90\x00")
        assert command(frame.cmd_apdu_contact, read_record(1)) == (frame.status_ok, b"\x69\x86")  # no EF selected
        assert command(frame.cmd_apdu_contact, select_fid(b"\xab\xcd")) == (frame.status_ok, b"\x6a\x82")
        assert command(frame.cmd_apdu_contact, select_fid(b"\xdd\xf1"))[1] == b"\x90\x00"
        assert command(frame.cmd_apdu_contact, select_fid(b"\xef\x05"))[1] == b"\x90\x00"
        assert command(frame.cmd_apdu_contact, read_record(0x30)) == (frame.status_ok, b"\x6a\x83")
        assert command(frame.cmd_apdu_contact, bytes.fromhex("00CA0000"))[1] == b"\x6d\x00"
        assert command(0x7E)[0] == 0x04
        link.close()


def test_qr_simulator_in_command_mode_ignores_other_bytes_and_answers_the_trigger(tmp_path: Path) -> None:
    trigger = bytes.fromhex("7E0008010002 01ABCD")
    sim = QrScannerSimulator(trigger=trigger)
    with PtyDevice(sim, link_path=tmp_path / "ttyQR") as device:
        sim.scan("code-1")
        link = SerialLink(device.path)
        link.write(b"hello" + trigger[:4] + b"x")
        assert link.read(100, 0.1) == b""
        link.write(trigger)
        assert read_exact(link, 7, time.monotonic() + 2) == b"code-1\r"
        assert sim.triggers == 1
        link.close()


def test_synthetic_ss_card_belongs_to_the_synthetic_person() -> None:
    person, card = synthetic_card(5), synthetic_ss_card(5)
    assert (card.ss_number, card.name, card.birth_date) == (person.id_number, person.name, person.birth_date)
    assert card.expiry_date is not None
    assert card.issue_date is not None
    assert card.expiry_date > card.issue_date > dt.date(2019, 12, 31)
