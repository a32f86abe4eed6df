"""The terminal's binding status: the store survives a restart and refuses a damaged file, the handlers set (never
toggle) the state, a late rejection does not undo a binding, and applying signs a record through the seam given
(a real SM2 signature that `protocol.evidence` verifies) and shows 'pending'."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from pydantic import JsonValue

from protocol import CommandKind, DeviceCommand, Envelope, PayloadType, SignedRecord, SignedRecordKind
from protocol.binding import ApplicantVerification, parse_binding_application
from protocol.evidence import sign_device_record, verify_device_record
from protocol.gm.sm2 import SM2PrivateKey
from terminal.binding import (
    BindingError,
    BindingState,
    BindingStore,
    apply_for_binding,
    binding_application_record,
    binding_handlers,
)
from terminal.verification import FaceDecision, FaceOutcome

T0 = datetime(2026, 3, 1, 8, 0, tzinfo=UTC)
DEVICE = "SIM-0001"


def _command(kind: CommandKind, **args: Any) -> DeviceCommand:
    return DeviceCommand(
        command_id=uuid.uuid4(),
        device_id=DEVICE,
        kind=kind,
        issued_at=T0,
        expires_at=T0 + timedelta(hours=1),
        args=args,
    )


def _approved(application_id: int = 1) -> DeviceCommand:
    return _command(
        CommandKind.BINDING_DECISION,
        application_id=application_id,
        approved=True,
        institution_code="H31011500042",
        institution_name="示例大药房",
        reason="ok",
        contact="12393",
    )


def _rejected(application_id: int = 2) -> DeviceCommand:
    return _command(CommandKind.BINDING_DECISION, application_id=application_id, approved=False, reason="资料不全")


def test_decisions_set_the_status_and_it_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "binding.json"
    handlers = binding_handlers(BindingStore(path), lambda: T0)
    assert handlers[CommandKind.BINDING_DECISION](_approved()).detail == "binding bound"
    reopened = BindingStore(path).load()
    assert (reopened.state, reopened.institution_name, reopened.contact) == (BindingState.BOUND, "示例大药房", "12393")
    # a late rejection of an older application does not undo the binding
    handlers[CommandKind.BINDING_DECISION](_rejected())
    assert BindingStore(path).load().state is BindingState.BOUND
    handlers[CommandKind.UNBIND](_command(CommandKind.UNBIND, reason="搬迁", contact="12393"))
    handlers[CommandKind.UNBIND](_command(CommandKind.UNBIND, reason="搬迁"))  # twice: still unbound
    status = BindingStore(path).load()
    assert (status.state, status.institution_code, status.reason) == (BindingState.UNBOUND, None, "搬迁")
    handlers[CommandKind.BINDING_DECISION](_rejected())
    assert BindingStore(path).load().reason == "资料不全"


def test_a_damaged_status_file_is_an_error_not_a_silent_unbound(tmp_path: Path) -> None:
    path = tmp_path / "binding.json"
    path.write_text("{not json", encoding="utf-8")
    with pytest.raises(BindingError):
        BindingStore(path).load()
    path.write_text('{"state": "sideways"}', encoding="utf-8")
    with pytest.raises(BindingError):
        BindingStore(path).load()


def _decision(outcome: FaceOutcome = FaceOutcome.ACCEPTED) -> FaceDecision:
    return FaceDecision(
        outcome=outcome,
        method="face_1to1",
        subject_ref="head-7f3a",
        similarity=0.8,
        threshold=0.6,
        liveness=None,
        quality_issues=(),
        model_sha256="0" * 64,
        template_hash="cd" * 16,
        frames=3,
        duration_ms=500.0,
    )


def test_applying_signs_a_record_without_personal_data_and_shows_pending(tmp_path: Path) -> None:
    key = SM2PrivateKey.generate()
    signed: list[Envelope] = []

    def record_signed(kind: SignedRecordKind, record: dict[str, JsonValue]) -> Envelope:
        payload = sign_device_record(key, device_id=DEVICE, key_epoch=1, record_type=kind, record=record)
        env = Envelope(
            device_id=DEVICE,
            seq=len(signed) + 1,
            message_id=uuid.uuid4(),
            device_time=T0,
            boot_id=uuid.uuid4(),
            monotonic_ns=1,
            payload_type=PayloadType.SIGNED_RECORD,
            payload=payload,
        )
        signed.append(env)
        return env

    store = BindingStore(tmp_path / "binding.json")
    record = binding_application_record(
        _decision(),
        verification=ApplicantVerification.FACE_ID_CARD,
        institution_code="H31011500042",
        applicant_masked="张**",
        reason="新设备",
        applied_at=T0,
    )
    env = apply_for_binding(record_signed, store, record, now=T0)
    assert store.load().state is BindingState.PENDING
    assert store.load().institution_code == "H31011500042"
    payload = env.payload
    assert isinstance(payload, SignedRecord)
    verify_device_record(payload, device_id=DEVICE, device_key=key.public_key)
    parsed = parse_binding_application(dict(payload.record))
    assert (parsed.applicant_ref, parsed.face_template_hash) == ("head-7f3a", "cd" * 16)
    assert "张三" not in str(payload)

    # a bound terminal must be unbound before it applies again
    binding_handlers(store, lambda: T0)[CommandKind.BINDING_DECISION](_approved())
    with pytest.raises(BindingError):
        apply_for_binding(record_signed, store, record, now=T0)
    assert len(signed) == 1
    with pytest.raises(BindingError):
        binding_application_record(
            _decision(FaceOutcome.LIVENESS_FAILED),
            verification=ApplicantVerification.FACE_ID_CARD,
            institution_code="H31011500042",
            applicant_masked=None,
            reason="x",
            applied_at=T0,
        )


def test_the_runtime_keeps_its_binding_status_beside_the_outbox(tmp_path: Path) -> None:
    from terminal.config import parse_terminal_config
    from terminal.runtime import build_runtime
    from tests.terminal.conftest import FakeClock, terminal_raw_config
    from tests.terminal.fakes import ScriptedLink

    config = parse_terminal_config(terminal_raw_config(tmp_path), source="test.toml", base_dir=tmp_path)
    clock = FakeClock()
    runtime = build_runtime(config, [], clock, link=ScriptedLink(clock))
    try:
        assert runtime.binding is not None
        assert runtime.binding.load().state == "unbound"
    finally:
        runtime.stop()
