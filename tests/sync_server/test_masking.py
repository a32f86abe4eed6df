"""Masking of ID numbers, names and phones by role, and the reveal: a mandatory reason, only for the roles a source
allows, every reveal and refusal in the server's audit chain (checked with the chain verifier), no clear value in it.

Runs against SQLite and PostgreSQL.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import Engine

from sync_server.accounts import Role
from sync_server.masking import (
    PersonalField,
    mask_id_number,
    mask_name,
    mask_phone,
    present,
    register_reveal_source,
    reveal_kinds,
    reveal_source,
)
from tests.sync_server.conftest import FakeClock
from tests.sync_server.test_accounts import accounts_app, audit_events, login, make_account, make_institution

ID_NUMBER = "320102199001011234"
NAME = "王小明"
PHONE = "13812345678"


@pytest.mark.parametrize(
    ("mask", "value", "masked"),
    [
        (mask_id_number, ID_NUMBER, "320*************34"),
        (mask_id_number, "H1234567", "H12***67"),
        (mask_id_number, "1234", "1***"),
        (mask_name, NAME, "王**"),
        (mask_name, "欧阳娜娜", "欧***"),
        (mask_name, "李", "李"),
        (mask_phone, PHONE, "138****5678"),
        (mask_phone, "025-5888", "******88"),
    ],
)
def test_mask_formats(mask: object, value: str, masked: str) -> None:
    assert callable(mask)
    assert mask(value) == masked
    assert len(mask(value)) == len(value)


@pytest.mark.parametrize("role", list(Role))
def test_every_role_sees_masks_unless_it_is_its_own_record(role: Role) -> None:
    roles = frozenset({role})
    assert present(PersonalField.ID_NUMBER, ID_NUMBER, roles) == "320*************34"
    assert present(PersonalField.NAME, NAME, roles) == "王**"
    assert present(PersonalField.PHONE, PHONE, roles) == "138****5678"
    assert present(PersonalField.PHONE, PHONE, roles, own=True) == PHONE
    assert present(PersonalField.NAME, None, roles) is None


def test_reveal_sources_are_registered_once() -> None:
    assert "account" in reveal_kinds()
    source = reveal_source("account")
    assert source is not None
    with pytest.raises(ValueError, match="twice"):
        register_reveal_source("account", source)


def test_responses_mask_and_reveal_needs_a_reason_and_is_audited(
    engine: Engine, clock: FakeClock, tmp_path: Path
) -> None:
    inst = make_institution(engine)
    make_account(engine, "sec", Role.SECURITY_ADMIN)
    make_account(engine, "aud", Role.AUDITOR)
    make_account(engine, "phil", Role.PHARMACIST, institution_id=inst, name=NAME, phone=PHONE, id_number=ID_NUMBER)
    data = tmp_path / "data"
    with accounts_app(engine, clock, data) as client:
        sec, aud, phil = login(client, "sec"), login(client, "aud"), login(client, "phil")
        for viewer in (sec, aud):
            listed = {a["username"]: a for a in client.get("/api/v1/accounts", headers=viewer).json()["items"]}
            assert (listed["phil"]["name"], listed["phil"]["phone"], listed["phil"]["id_number"]) == (
                "王**",
                "138****5678",
                "320*************34",
            )
            one = client.get("/api/v1/accounts/phil", headers=viewer).json()
            assert one["id_number"] == "320*************34"
        own = client.get("/api/v1/auth/me", headers=phil).json()
        assert (own["name"], own["phone"], own["id_number"]) == (NAME, PHONE, ID_NUMBER)

        ask = {"kind": "account", "subject_id": "phil", "field": "id_number"}
        assert client.post("/api/v1/reveal", headers=sec, json=ask).status_code == 422  # no reason
        assert client.post("/api/v1/reveal", headers=sec, json={**ask, "reason": ""}).status_code == 422
        reason = "identity check for a password reset, ticket 4711"
        shown = client.post("/api/v1/reveal", headers=sec, json={**ask, "reason": reason})
        assert shown.status_code == 200, shown.text
        assert shown.json()["value"] == ID_NUMBER
        refused = client.post("/api/v1/reveal", headers=phil, json={**ask, "subject_id": "sec", "reason": "curious"})
        assert refused.status_code == 403  # a pharmacist may not reveal accounts' data
        assert client.post("/api/v1/reveal", headers=aud, json={**ask, "reason": reason}).status_code == 403
        unknown = client.post("/api/v1/reveal", headers=sec, json={**ask, "kind": "nothing", "reason": reason})
        assert unknown.status_code == 404

    events = audit_events(data)  # verifies the HMAC-SM3 chain first
    revealed = [e for e in events if e["type"] == "personal_data.revealed"]
    assert revealed == [
        {
            "type": "personal_data.revealed",
            "by": "account:sec",
            "kind": "account",
            "subject_id": "phil",
            "field": "id_number",
            "reason": reason,
        }
    ]
    assert [e["by"] for e in events if e["type"] == "personal_data.reveal_refused"] == ["account:phil"]
    assert sum(1 for e in events if e["type"] == "personal_data.read") == 4  # two lists, two single reads
    chain_text = (data / "audit" / "server-audit.jsonl").read_text()
    for clear in (ID_NUMBER, NAME, PHONE):
        assert clear not in chain_text
