"""Operator accounts: roles (三员 separation), the password policy, argon2id hashing, lockout and bearer sessions.

Owns the rules (which role combinations one account may hold, what a password must look like, when an account is
locked, when a password or session expires) and the only code that reads or writes `accounts`,
`account_password_history` and `account_sessions`. Every function takes the SQLAlchemy session and `now` from the
caller (tests inject a clock). It must never log, return or store a password or a session token in clear (only
argon2id hashes and SHA-256 digests are stored; the one exception is a generated initial password, returned once to
the caller that prints it), and never decide which route a role may call (that is `sync_server.authz`).
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import re
import secrets
import string
from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy import select
from sqlalchemy.orm import Session

from sync_server.db.models import Account, AccountSession, Institution, PasswordHistory

logger = logging.getLogger(__name__)


class Role(StrEnum):
    """What an operator may do (docs/accounts.md has the role x endpoint matrix)."""

    DEVICE_ADMIN = "device_admin"
    """设备管理员 / 系统管理员: devices, provisioning, commands. Not the audit log, not accounts."""
    INSTITUTION_HEAD = "institution_head"
    """机构负责人 of one institution."""
    PHARMACIST = "pharmacist"
    """药师 of one institution."""
    CASHIER = "cashier"
    """收银员 / the POS client of one institution."""
    REGULATOR = "regulator"
    """医保局监管人员, scoped to a 医保区划 code prefix."""
    SECURITY_ADMIN = "security_admin"
    """安全管理员: accounts, roles, password resets. Not devices, not business data, not the audit log."""
    AUDITOR = "auditor"
    """审计员: reads the audit log; changes nothing."""
    HIS_CLIENT = "his_client"
    """A HIS / POS vendor system of one institution on the /his/v1 interfaces. Machine-only: never an account's
    role; it authenticates by request signature (`sync_server.signed_requests`)."""


TRIAD = frozenset({Role.DEVICE_ADMIN, Role.SECURITY_ADMIN, Role.AUDITOR})
"""三员: the system, security and audit administrators; no account holds two of them."""
INSTITUTION_ROLES = frozenset({Role.INSTITUTION_HEAD, Role.PHARMACIST, Role.CASHIER})
"""Roles that belong to one institution (the account has an institution_id)."""
ALONE_ROLES = frozenset({Role.SECURITY_ADMIN, Role.AUDITOR})
"""Roles that combine with no other role: the overseers must not also be the overseen."""

REGION_PREFIX = re.compile(r"^[0-9]{2,6}$")
USERNAME = re.compile(r"^[a-z][a-z0-9._-]{2,63}$")


class AccountError(Exception):
    """Base of the refusals of this module; `str()` is safe to show to the caller (no secret in it)."""


class PasswordPolicyError(AccountError):
    def __init__(self, reasons: list[str]) -> None:
        super().__init__("password refused: " + "; ".join(reasons))
        self.reasons = reasons


class RoleConflictError(AccountError):
    """A role combination 三员 separation (or the scope rules) forbid."""


class AccountExistsError(AccountError):
    """The username is taken."""


class UnknownAccountError(AccountError):
    """No account has that username."""


class AuthenticationError(AccountError):
    """Wrong username or password (deliberately not saying which), or a disabled account."""


class AccountLockedError(AuthenticationError):
    def __init__(self, until: datetime) -> None:
        super().__init__(f"account locked after repeated failures until {until.isoformat()}")
        self.until = until


class PasswordPolicy(BaseModel):
    """The 等保 2.0-style password and session policy (ServerSettings.account_policy)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_length: int = Field(default=10, ge=8, le=128)
    min_classes: int = Field(default=3, ge=1, le=4, description="Of: lower case, upper case, digit, other.")
    history: int = Field(default=5, ge=0, le=24, description="The last N passwords may not be reused.")
    max_failures: int = Field(default=5, ge=1, le=100, description="Consecutive failures that lock the account.")
    lockout_s: float = Field(default=900.0, ge=1.0, description="How long a lockout lasts.")
    max_age_days: float = Field(default=90.0, gt=0, description="A password older than this must be changed.")
    session_ttl_s: float = Field(default=8 * 3600.0, ge=60.0, description="Absolute lifetime of a login session.")
    session_idle_s: float = Field(default=1800.0, ge=60.0, description="A session unused this long ends.")


_CLASSES = (
    ("a lower-case letter", str.islower),
    ("an upper-case letter", str.isupper),
    ("a digit", str.isdigit),
    ("a special character", lambda c: not c.isalnum()),
)

# argon2id (the library default type) with its RFC 9106 "low memory" parameters: 64 MiB, 3 passes.
_hasher = PasswordHasher()


@functools.cache
def _dummy_hash() -> str:
    """Verified against when the username is unknown, so both failures cost the same time."""
    return _hasher.hash(secrets.token_urlsafe(16))


def password_problems(password: str, *, username: str, policy: PasswordPolicy) -> list[str]:
    """Why `password` is refused (empty when it is acceptable). History is checked separately."""
    reasons: list[str] = []
    if len(password) < policy.min_length:
        reasons.append(f"shorter than {policy.min_length} characters")
    classes = [name for name, test in _CLASSES if any(test(c) for c in password)]
    if len(classes) < policy.min_classes:
        reasons.append(
            f"uses {len(classes)} of the 4 character classes (lower, upper, digit, special); "
            f"at least {policy.min_classes} are required"
        )
    if username and username.lower() in password.lower():
        reasons.append("contains the username")
    return reasons


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def _verify(hashed: str, password: str) -> bool:
    try:
        return _hasher.verify(hashed, password)
    except VerifyMismatchError:
        return False
    except (VerificationError, InvalidHashError):
        logger.error("a stored password hash is not a valid argon2 hash")
        return False


def generate_password(policy: PasswordPolicy) -> str:
    """A random password that satisfies `policy` (all four classes, at least 16 characters)."""
    alphabet = string.ascii_letters + string.digits + "-_.!@#%+="
    length = max(16, policy.min_length)
    while True:
        candidate = "".join(secrets.choice(alphabet) for _ in range(length))
        if len([1 for _, test in _CLASSES if any(test(c) for c in candidate)]) == 4:
            return candidate


def check_roles(roles: frozenset[Role], *, institution_id: int | None, region_prefix: str | None) -> None:
    """Refuse a role set 三员 separation or the scope rules forbid, with the reason."""
    if not roles:
        raise RoleConflictError("an account needs at least one role")
    if Role.HIS_CLIENT in roles:
        raise RoleConflictError(
            "his_client is the role of a HIS system (`yibao server his-client create`), not of a person"
        )
    triad = sorted(roles & TRIAD)
    if len(triad) > 1:
        raise RoleConflictError(
            f"三员 separation: {' and '.join(triad)} may not be held by one account "
            "(system, security and audit administration are separate duties)"
        )
    alone = roles & ALONE_ROLES
    if alone and len(roles) > 1:
        raise RoleConflictError(f"三员 separation: {next(iter(alone))} combines with no other role")
    if Role.REGULATOR in roles and roles & INSTITUTION_ROLES:
        raise RoleConflictError("a regulator cannot also work for a regulated institution")
    if roles & INSTITUTION_ROLES and institution_id is None:
        raise RoleConflictError("institution roles (institution_head, pharmacist, cashier) need an institution")
    if not roles & INSTITUTION_ROLES and institution_id is not None:
        raise RoleConflictError("only institution roles are tied to an institution")
    if Role.REGULATOR in roles:
        if region_prefix is None or not REGION_PREFIX.match(region_prefix):
            raise RoleConflictError("a regulator needs a region scope: a 医保区划 code prefix of 2 to 6 digits")
    elif region_prefix is not None:
        raise RoleConflictError("only regulators have a region scope")


def account_roles(account: Account) -> frozenset[Role]:
    return frozenset(Role(r) for r in account.roles)


def create_account(
    session: Session,
    *,
    username: str,
    roles: frozenset[Role],
    policy: PasswordPolicy,
    now: datetime,
    created_by: str,
    password: str | None = None,
    institution_id: int | None = None,
    region_prefix: str | None = None,
    name: str | None = None,
    phone: str | None = None,
    id_number: str | None = None,
    must_change: bool = True,
) -> tuple[Account, str | None]:
    """Create an account; returns it and the generated initial password (None when `password` was given). The
    initial password was chosen by someone else, so by default it must be changed at first login."""
    if not USERNAME.match(username):
        raise AccountError("username: 3 to 64 of a-z 0-9 . _ -, starting with a letter")
    check_roles(roles, institution_id=institution_id, region_prefix=region_prefix)
    if institution_id is not None and session.get(Institution, institution_id) is None:
        raise AccountError(f"institution {institution_id} does not exist")
    if session.scalar(select(Account.id).where(Account.username == username)) is not None:
        raise AccountExistsError(f"account {username!r} already exists")
    generated = password is None
    if password is None:
        password = generate_password(policy)
    problems = password_problems(password, username=username, policy=policy)
    if problems:
        raise PasswordPolicyError(problems)
    hashed = hash_password(password)
    account = Account(
        username=username,
        roles=sorted(r.value for r in roles),
        institution_id=institution_id,
        region_prefix=region_prefix,
        name=name,
        phone=phone,
        id_number=id_number,
        password_hash=hashed,
        password_changed_at=now,
        must_change_password=must_change or generated,
        failed_logins=0,
        created_at=now,
        created_by=created_by,
    )
    session.add(account)
    session.flush()
    session.add(PasswordHistory(account_id=account.id, password_hash=hashed, created_at=now))
    return account, password if generated else None


def get_account(session: Session, username: str) -> Account:
    account = session.scalar(select(Account).where(Account.username == username))
    if account is None:
        raise UnknownAccountError(f"no account {username!r}")
    return account


def authenticate(session: Session, username: str, password: str, *, policy: PasswordPolicy, now: datetime) -> Account:
    """The account if `password` is right; counts failures and locks. The caller commits either way."""
    account = session.scalar(select(Account).where(Account.username == username))
    if account is None:
        _verify(_dummy_hash(), password)
        raise AuthenticationError("wrong username or password")
    if account.locked_until is not None and account.locked_until > now:
        raise AccountLockedError(account.locked_until)
    if not _verify(account.password_hash, password):
        account.failed_logins += 1
        if account.failed_logins >= policy.max_failures:
            account.locked_until = now + timedelta(seconds=policy.lockout_s)
            account.failed_logins = 0
            logger.warning("account %s locked after %d failed logins", account.username, policy.max_failures)
            raise AccountLockedError(account.locked_until)
        raise AuthenticationError("wrong username or password")
    if account.disabled_at is not None:
        raise AuthenticationError("this account is disabled")
    account.failed_logins = 0
    account.locked_until = None
    return account


def password_expired(account: Account, *, policy: PasswordPolicy, now: datetime) -> bool:
    """Must this account change its password before doing anything else?"""
    if account.must_change_password:
        return True
    return now - account.password_changed_at >= timedelta(days=policy.max_age_days)


def change_password(
    session: Session, account: Account, *, old: str, new: str, policy: PasswordPolicy, now: datetime
) -> None:
    """The account's own change: the old password must be right; the new one passes the policy and history."""
    if not _verify(account.password_hash, old):
        raise AuthenticationError("the current password is wrong")
    _set_password(session, account, new, policy=policy, now=now)
    account.must_change_password = False


def reset_password(
    session: Session, account: Account, *, policy: PasswordPolicy, now: datetime, password: str | None = None
) -> str:
    """A security admin's reset to `password` (or a generated one, returned), to be changed at next login; the
    account's sessions end and its lockout is cleared."""
    if password is None:
        password = generate_password(policy)
    _set_password(session, account, password, policy=policy, now=now)
    account.must_change_password = True
    account.failed_logins = 0
    account.locked_until = None
    end_sessions(session, account, now=now)
    return password


def _set_password(session: Session, account: Account, password: str, *, policy: PasswordPolicy, now: datetime) -> None:
    problems = password_problems(password, username=account.username, policy=policy)
    if problems:
        raise PasswordPolicyError(problems)
    if policy.history:
        recent = session.scalars(
            select(PasswordHistory.password_hash)
            .where(PasswordHistory.account_id == account.id)
            .order_by(PasswordHistory.created_at.desc(), PasswordHistory.id.desc())
            .limit(policy.history)
        )
        if any(_verify(h, password) for h in recent):
            raise PasswordPolicyError([f"one of the last {policy.history} passwords of this account"])
    hashed = hash_password(password)
    account.password_hash = hashed
    account.password_changed_at = now
    session.add(PasswordHistory(account_id=account.id, password_hash=hashed, created_at=now))


def set_roles(
    account: Account, roles: frozenset[Role], *, institution_id: int | None, region_prefix: str | None
) -> None:
    check_roles(roles, institution_id=institution_id, region_prefix=region_prefix)
    account.roles = sorted(r.value for r in roles)
    account.institution_id = institution_id
    account.region_prefix = region_prefix


def disable(session: Session, account: Account, *, now: datetime) -> None:
    account.disabled_at = now
    end_sessions(session, account, now=now)


def enable(account: Account) -> None:
    account.disabled_at = None


# ---------------------------------------------------------------- sessions


def session_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


SESSION_PREFIX = "ys_"
"""Session tokens start with this, so a bearer is told apart from an admin token without a second lookup."""


def open_session(session: Session, account: Account, *, policy: PasswordPolicy, now: datetime) -> tuple[str, datetime]:
    """A new opaque bearer token for `account` (returned once; stored as SHA-256) and its absolute expiry."""
    token = SESSION_PREFIX + secrets.token_urlsafe(32)
    expires = now + timedelta(seconds=policy.session_ttl_s)
    session.add(
        AccountSession(
            account_id=account.id, sha256=session_digest(token), created_at=now, expires_at=expires, last_used_at=now
        )
    )
    return token, expires


TOUCH_EVERY_S = 60.0
"""A session's last use is written at most once a minute, so reads do not each take a write lock; the idle
timeout is exact to within this."""


@dataclass(frozen=True)
class ResolvedSession:
    account: Account
    session_id: int
    touch_due: bool
    """The caller should record the use (`touch_session`) in a writing transaction."""


def resolve_session(session: Session, token: str, *, policy: PasswordPolicy, now: datetime) -> ResolvedSession | None:
    """The live session of `token`, or None if unknown, ended, expired, idle too long or its account disabled.
    Read-only: an idle session simply stays refused."""
    digest = session_digest(token)
    row = session.scalar(select(AccountSession).where(AccountSession.sha256 == digest))
    if row is None or not hmac.compare_digest(row.sha256, digest):
        return None
    if row.revoked_at is not None or row.expires_at <= now:
        return None
    if now - row.last_used_at >= timedelta(seconds=policy.session_idle_s):
        return None
    account = session.get(Account, row.account_id)
    if account is None or account.disabled_at is not None:
        return None
    touch_due = now - row.last_used_at >= timedelta(seconds=TOUCH_EVERY_S)
    return ResolvedSession(account=account, session_id=row.id, touch_due=touch_due)


def touch_session(session: Session, session_id: int, *, now: datetime) -> None:
    row = session.get(AccountSession, session_id)
    if row is not None and row.last_used_at < now:
        row.last_used_at = now


def end_session(session: Session, session_id: int, *, now: datetime) -> None:
    row = session.get(AccountSession, session_id)
    if row is not None and row.revoked_at is None:
        row.revoked_at = now


def end_sessions(session: Session, account: Account, *, now: datetime) -> None:
    for row in session.scalars(
        select(AccountSession).where(AccountSession.account_id == account.id, AccountSession.revoked_at.is_(None))
    ):
        row.revoked_at = now
