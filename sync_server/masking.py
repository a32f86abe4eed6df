"""Dynamic masking of personal data by role (S-36, R-21) and the registry of what a reveal may disclose (S-42).

Owns the mask formats (docs/accounts.md): 证件号码 keeps the first 3 and last 2 characters, 姓名 keeps the surname
(the first character) and stars the rest, 联系电话 keeps 3 + **** + the last 4; which roles see a field in clear
without asking (`CLEAR_FIELDS`, empty by default: everyone reveals with a reason); and the reveal sources other
modules register (`register_reveal_source`). It must never log a value it masks or reveals, and never decide
whether a reveal is audited (the reveal endpoint always audits it).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum

from sqlalchemy import select
from sqlalchemy.orm import Session

from sync_server.accounts import Role
from sync_server.db.models import Account


class PersonalField(StrEnum):
    ID_NUMBER = "id_number"
    NAME = "name"
    PHONE = "phone"


def mask_id_number(value: str) -> str:
    """'320102199001011234' -> '320*************34'; short values are starred whole except one character."""
    if len(value) <= 5:
        return value[:1] + "*" * (len(value) - 1)
    return value[:3] + "*" * (len(value) - 5) + value[-2:]


def mask_name(value: str) -> str:
    """'张三丰' -> '张**'; one character stays as it is (the surname alone)."""
    return value[:1] + "*" * (len(value) - 1)


def mask_phone(value: str) -> str:
    """'13812345678' -> '138****5678'; shorter numbers keep only their last 2."""
    if len(value) < 11:
        return "*" * max(0, len(value) - 2) + value[-2:]
    return value[:3] + "*" * (len(value) - 7) + value[-4:]


MASKS: dict[PersonalField, Callable[[str], str]] = {
    PersonalField.ID_NUMBER: mask_id_number,
    PersonalField.NAME: mask_name,
    PersonalField.PHONE: mask_phone,
}

CLEAR_FIELDS: dict[Role, frozenset[PersonalField]] = {}
"""Fields a role sees in clear in ordinary responses. Empty: every role sees masks and reveals with a reason. A
pharmacist dispensing to a named patient (a later issue) will be the first entry."""


def present(field: PersonalField, value: str | None, roles: Iterable[Role], *, own: bool = False) -> str | None:
    """`value` as `roles` may see it in a response; `own` is true for the caller's own record (shown in clear)."""
    if value is None:
        return None
    if own or any(field in CLEAR_FIELDS.get(role, frozenset()) for role in roles):
        return value
    return MASKS[field](value)


# ---------------------------------------------------------------- reveal sources


@dataclass(frozen=True)
class RevealSource:
    """Where the clear value of `kind` records lives and who may ask for it."""

    roles: frozenset[Role]
    fields: frozenset[PersonalField]
    fetch: Callable[[Session, str, PersonalField], str | None]
    """(session, subject id, field) -> the clear value, or None when the subject is unknown or has no value."""


_SOURCES: dict[str, RevealSource] = {}


def register_reveal_source(kind: str, source: RevealSource) -> None:
    if kind in _SOURCES:
        raise ValueError(f"reveal source {kind!r} is registered twice")
    _SOURCES[kind] = source


def reveal_source(kind: str) -> RevealSource | None:
    return _SOURCES.get(kind)


def reveal_kinds() -> list[str]:
    return sorted(_SOURCES)


def _account_field(session: Session, subject_id: str, field: PersonalField) -> str | None:
    account = session.scalar(select(Account).where(Account.username == subject_id))
    if account is None:
        return None
    value: str | None = getattr(account, field.value)
    return value


register_reveal_source(
    "account",
    RevealSource(
        roles=frozenset({Role.SECURITY_ADMIN}),
        fields=frozenset(PersonalField),
        fetch=_account_field,
    ),
)
