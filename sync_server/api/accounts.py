"""`/api/v1/auth/*` (login, logout, me, own password change), `/api/v1/accounts` (security administration),
`/api/v1/password-policy`, `/api/v1/reveal` (personal data in clear, with a mandatory reason) and `/api/v1/audit`
(the auditor's view of the server's audit chain).

Owns request and response shapes of these routes, masking personal fields by the caller's roles
(`sync_server.masking.present`) and recording every admin action, every read of personal data and every reveal in
the server's hash-chained audit log. Which role may call what is `sync_server.authz`; the rules are
`sync_server.accounts`. It must never return or log a password or a token other than the session token a login
creates, and never write personal values into the audit log (subject and field only).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Query, Request, Response, status
from pydantic import BaseModel, ConfigDict, Field, SecretStr
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from protocol.gm.audit_chain import load_chain_key, verify_chain
from protocol.gm.errors import CryptoError
from sync_server import accounts
from sync_server.accounts import AccountError, PasswordPolicy, Role
from sync_server.api.deps import (
    ClockDep,
    PrincipalDep,
    RuntimeDep,
    SessionDep,
    SettingsDep,
    WriterSessionDep,
    clear_session_cookie,
    set_session_cookie,
)
from sync_server.api.schemas import ErrorOut, UnprocessableOut
from sync_server.audit import CHAIN_FILE
from sync_server.db.models import Account
from sync_server.masking import PersonalField, present, reveal_source

logger = logging.getLogger(__name__)

router = APIRouter(prefix="/api/v1", tags=["accounts"])

_ERRORS: dict[int | str, dict[str, Any]] = {
    404: {"model": ErrorOut},
    409: {"model": ErrorOut},
    422: {"model": UnprocessableOut},
}


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=1, max_length=64)
    password: SecretStr = Field(min_length=1, max_length=256)


class LoginOut(BaseModel):
    token: str = Field(description="Opaque bearer token: send 'Authorization: Bearer <token>'. Shown once.")
    expires_at: datetime
    roles: list[Role]
    must_change_password: bool = Field(description="Only /auth/me, /auth/password and /auth/logout work until then.")


class PasswordChangeIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    old_password: SecretStr = Field(min_length=1, max_length=256)
    new_password: SecretStr = Field(min_length=1, max_length=256)


class AccountOut(BaseModel):
    username: str
    roles: list[Role]
    institution_id: int | None
    region_prefix: str | None
    name: str | None = Field(description="Masked unless it is the caller's own account.")
    phone: str | None
    id_number: str | None
    disabled: bool
    locked_until: datetime | None
    password_changed_at: datetime
    must_change_password: bool
    created_at: datetime
    created_by: str

    @classmethod
    def of(cls, account: Account, viewer: frozenset[Role], *, own: bool = False) -> AccountOut:
        return cls(
            username=account.username,
            roles=sorted(accounts.account_roles(account)),
            institution_id=account.institution_id,
            region_prefix=account.region_prefix,
            name=present(PersonalField.NAME, account.name, viewer, own=own),
            phone=present(PersonalField.PHONE, account.phone, viewer, own=own),
            id_number=present(PersonalField.ID_NUMBER, account.id_number, viewer, own=own),
            disabled=account.disabled_at is not None,
            locked_until=account.locked_until,
            password_changed_at=account.password_changed_at,
            must_change_password=account.must_change_password,
            created_at=account.created_at,
            created_by=account.created_by,
        )


class AccountList(BaseModel):
    items: list[AccountOut]
    total: int


class AccountIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    username: str = Field(min_length=3, max_length=64)
    roles: list[Role] = Field(min_length=1)
    password: SecretStr = Field(
        min_length=1, max_length=256, description="The initial password; it must be changed at first login."
    )
    institution_id: int | None = None
    region_prefix: str | None = Field(default=None, max_length=6)
    name: str | None = Field(default=None, max_length=50)
    phone: str | None = Field(default=None, max_length=20)
    id_number: str | None = Field(default=None, max_length=20)


class RolesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    roles: list[Role] = Field(min_length=1)
    institution_id: int | None = None
    region_prefix: str | None = Field(default=None, max_length=6)


class PasswordResetIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    password: SecretStr = Field(
        min_length=1, max_length=256, description="A temporary password; it must be changed at next login."
    )


class RevealIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: str = Field(min_length=1, max_length=32, description="Kind of subject, e.g. 'account'.")
    subject_id: str = Field(min_length=1, max_length=64)
    field: PersonalField
    reason: str = Field(min_length=4, max_length=200, description="Why the clear value is needed (audited).")


class RevealOut(BaseModel):
    kind: str
    subject_id: str
    field: PersonalField
    value: str


class AuditOut(BaseModel):
    intact: bool
    entries_checked: int
    detail: str
    items: list[dict[str, Any]]


def _refusal(exc: AccountError) -> HTTPException:
    code = {
        accounts.UnknownAccountError: 404,
        accounts.AccountExistsError: 409,
    }.get(type(exc), 422)
    return HTTPException(status_code=code, detail=str(exc))


def _account_or_404(session: Session, username: str) -> Account:
    try:
        return accounts.get_account(session, username)
    except accounts.UnknownAccountError as exc:
        raise _refusal(exc) from exc


# ---------------------------------------------------------------- login sessions


@router.post("/auth/login", response_model=LoginOut, responses={401: {"model": ErrorOut}, 423: {"model": ErrorOut}})
def login(
    body: LoginIn,
    request: Request,
    response: Response,
    session: WriterSessionDep,
    runtime: RuntimeDep,
    clock: ClockDep,
) -> LoginOut:
    """Exchange a username and password for a session token. Failures count towards the lockout. The token also
    comes as the HttpOnly, SameSite=Strict page cookie, which opens only the read-only operator pages (and signing
    out): every action needs the token as `Authorization: Bearer`."""
    policy = runtime.settings.account_policy
    now = clock.now()
    failure: accounts.AuthenticationError | None = None
    with session.begin():  # committed on failure too: the failure count and a lockout must stick
        try:
            account = accounts.authenticate(
                session, body.username, body.password.get_secret_value(), policy=policy, now=now
            )
        except accounts.AuthenticationError as exc:
            failure = exc
        else:
            token, expires = accounts.open_session(session, account, policy=policy, now=now)
            out = LoginOut(
                token=token,
                expires_at=expires,
                roles=sorted(accounts.account_roles(account)),
                must_change_password=accounts.password_expired(account, policy=policy, now=now),
            )
    if isinstance(failure, accounts.AccountLockedError):
        runtime.audit.record("auth.locked", username=body.username)
        raise HTTPException(status_code=423, detail=str(failure)) from failure
    if failure is not None:
        runtime.audit.record("auth.login_failed", username=body.username)
        raise HTTPException(
            status_code=status.HTTP_401_UNAUTHORIZED, detail=str(failure), headers={"WWW-Authenticate": "Bearer"}
        ) from failure
    runtime.audit.record("auth.login", username=body.username)
    set_session_cookie(response, request, out.token, out.expires_at - now)
    return out


@router.post("/auth/logout", status_code=status.HTTP_204_NO_CONTENT)
def logout(
    request: Request, principal: PrincipalDep, session: WriterSessionDep, clock: ClockDep, runtime: RuntimeDep
) -> Response:
    """End the caller's login session (the bearer token's, or the page cookie's) and clear the page cookie."""
    if principal.session_id is not None:
        with session.begin():
            accounts.end_session(session, principal.session_id, now=clock.now())
        runtime.audit.record("auth.logout", username=principal.username)
    response = Response(status_code=status.HTTP_204_NO_CONTENT)
    clear_session_cookie(response, request)
    return response


@router.get("/auth/me", response_model=AccountOut, responses={404: {"model": ErrorOut}})
def me(principal: PrincipalDep, session: SessionDep) -> AccountOut:
    """The caller's own account, its personal fields in clear. Admin tokens have no account (404)."""
    if principal.username is None:
        raise HTTPException(status_code=404, detail=f"{principal.name!r} is an admin token, not an account")
    return AccountOut.of(_account_or_404(session, principal.username), principal.roles, own=True)


@router.post("/auth/password", status_code=status.HTTP_204_NO_CONTENT, responses=_ERRORS)
def change_own_password(
    body: PasswordChangeIn, principal: PrincipalDep, session: WriterSessionDep, runtime: RuntimeDep, clock: ClockDep
) -> Response:
    """Change the caller's own password (the policy and the history apply)."""
    if principal.username is None:
        raise HTTPException(status_code=404, detail="admin tokens have no password")
    try:
        with session.begin():
            account = _account_or_404(session, principal.username)
            accounts.change_password(
                session,
                account,
                old=body.old_password.get_secret_value(),
                new=body.new_password.get_secret_value(),
                policy=runtime.settings.account_policy,
                now=clock.now(),
            )
    except accounts.AuthenticationError as exc:
        raise HTTPException(status_code=422, detail=str(exc)) from exc
    except AccountError as exc:
        raise _refusal(exc) from exc
    runtime.audit.record("account.password_changed", username=principal.username, by=principal.name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


# ---------------------------------------------------------------- security administration


@router.get("/accounts", response_model=AccountList)
def list_accounts(
    principal: PrincipalDep,
    session: SessionDep,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 200,
    offset: Annotated[int, Query(ge=0)] = 0,
) -> AccountList:
    """Accounts by username, personal fields masked. The read is audited."""
    total = session.scalar(select(func.count()).select_from(Account)) or 0
    rows = list(session.scalars(select(Account).order_by(Account.username).limit(limit).offset(offset)))
    runtime.audit.record("personal_data.read", by=principal.name, kind="account", count=len(rows), masked=True)
    return AccountList(items=[AccountOut.of(row, principal.roles) for row in rows], total=total)


@router.get("/accounts/{username}", response_model=AccountOut, responses=_ERRORS)
def get_account(username: str, principal: PrincipalDep, session: SessionDep, runtime: RuntimeDep) -> AccountOut:
    account = _account_or_404(session, username)
    runtime.audit.record("personal_data.read", by=principal.name, kind="account", subject_id=username, masked=True)
    return AccountOut.of(account, principal.roles, own=username == principal.username)


@router.post("/accounts", response_model=AccountOut, status_code=status.HTTP_201_CREATED, responses=_ERRORS)
def create_account(
    body: AccountIn, principal: PrincipalDep, session: WriterSessionDep, settings: SettingsDep, runtime: RuntimeDep
) -> AccountOut:
    """Create an account with an initial password the holder must change at first login (never echoed)."""
    try:
        with session.begin():
            account, _ = accounts.create_account(
                session,
                username=body.username,
                roles=frozenset(body.roles),
                password=body.password.get_secret_value(),
                policy=settings.account_policy,
                now=runtime.clock.now(),
                created_by=principal.name,
                institution_id=body.institution_id,
                region_prefix=body.region_prefix,
                name=body.name,
                phone=body.phone,
                id_number=body.id_number,
            )
            out = AccountOut.of(account, principal.roles)
    except AccountError as exc:
        runtime.audit.record("account.create_refused", username=body.username, by=principal.name, detail=str(exc))
        raise _refusal(exc) from exc
    runtime.audit.record("account.created", username=body.username, roles=sorted(body.roles), by=principal.name)
    return out


@router.put("/accounts/{username}/roles", response_model=AccountOut, responses=_ERRORS)
def set_roles(
    username: str, body: RolesIn, principal: PrincipalDep, session: WriterSessionDep, runtime: RuntimeDep
) -> AccountOut:
    """Replace the account's roles (三员 separation and scope rules apply)."""
    if username == principal.username:
        raise HTTPException(status_code=422, detail="an administrator cannot change their own roles")
    try:
        with session.begin():
            account = _account_or_404(session, username)
            accounts.set_roles(
                account, frozenset(body.roles), institution_id=body.institution_id, region_prefix=body.region_prefix
            )
            out = AccountOut.of(account, principal.roles)
    except AccountError as exc:
        runtime.audit.record("account.roles_refused", username=username, by=principal.name, detail=str(exc))
        raise _refusal(exc) from exc
    runtime.audit.record("account.roles_changed", username=username, roles=sorted(body.roles), by=principal.name)
    return out


def _lifecycle(
    username: str, principal: PrincipalDep, session: Session, runtime: RuntimeDep, *, disable: bool
) -> AccountOut:
    if username == principal.username:
        raise HTTPException(status_code=422, detail="an administrator cannot disable or enable their own account")
    with session.begin():
        account = _account_or_404(session, username)
        if disable:
            accounts.disable(session, account, now=runtime.clock.now())
        else:
            accounts.enable(account)
        out = AccountOut.of(account, principal.roles)
    runtime.audit.record(f"account.{'disabled' if disable else 'enabled'}", username=username, by=principal.name)
    return out


@router.post("/accounts/{username}/disable", response_model=AccountOut, responses=_ERRORS)
def disable_account(
    username: str, principal: PrincipalDep, session: WriterSessionDep, runtime: RuntimeDep
) -> AccountOut:
    """Disable the account and end its sessions."""
    return _lifecycle(username, principal, session, runtime, disable=True)


@router.post("/accounts/{username}/enable", response_model=AccountOut, responses=_ERRORS)
def enable_account(
    username: str, principal: PrincipalDep, session: WriterSessionDep, runtime: RuntimeDep
) -> AccountOut:
    return _lifecycle(username, principal, session, runtime, disable=False)


@router.post("/accounts/{username}/password-reset", response_model=AccountOut, responses=_ERRORS)
def reset_password(
    username: str, body: PasswordResetIn, principal: PrincipalDep, session: WriterSessionDep, runtime: RuntimeDep
) -> AccountOut:
    """Set a temporary password (changed at next login), end the account's sessions and clear its lockout."""
    if username == principal.username:
        raise HTTPException(status_code=422, detail="change your own password with POST /api/v1/auth/password")
    try:
        with session.begin():
            account = _account_or_404(session, username)
            accounts.reset_password(
                session,
                account,
                policy=runtime.settings.account_policy,
                now=runtime.clock.now(),
                password=body.password.get_secret_value(),
            )
            out = AccountOut.of(account, principal.roles)
    except AccountError as exc:
        raise _refusal(exc) from exc
    runtime.audit.record("account.password_reset", username=username, by=principal.name)
    return out


@router.get("/password-policy", response_model=PasswordPolicy)
def password_policy(settings: SettingsDep) -> PasswordPolicy:
    return settings.account_policy


# ---------------------------------------------------------------- personal data and the audit log


@router.post("/reveal", response_model=RevealOut, responses={403: {"model": ErrorOut}, **_ERRORS})
def reveal(body: RevealIn, principal: PrincipalDep, session: SessionDep, runtime: RuntimeDep) -> RevealOut:
    """One personal field in clear, for a stated reason. Every reveal, and every refused one, is audited."""
    source = reveal_source(body.kind)
    if source is None:
        raise HTTPException(status_code=404, detail=f"nothing of kind {body.kind!r} can be revealed")
    what = {"by": principal.name, "kind": body.kind, "subject_id": body.subject_id, "field": body.field.value}
    if not source.roles & principal.roles:
        runtime.audit.record("personal_data.reveal_refused", **what, reason=body.reason)
        raise HTTPException(
            status_code=403, detail=f"revealing {body.kind} data needs one of {', '.join(sorted(source.roles))}"
        )
    if body.field not in source.fields:
        raise HTTPException(status_code=422, detail=f"{body.kind} has no revealable field {body.field.value!r}")
    value = source.fetch(session, body.subject_id, body.field)
    if value is None:
        raise HTTPException(status_code=404, detail=f"no {body.field.value} for {body.kind} {body.subject_id!r}")
    runtime.audit.record("personal_data.revealed", **what, reason=body.reason)
    return RevealOut(kind=body.kind, subject_id=body.subject_id, field=body.field, value=value)


@router.get("/audit", response_model=AuditOut)
def read_audit(
    principal: PrincipalDep,
    runtime: RuntimeDep,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AuditOut:
    """The newest `limit` entries of this server's audit chain and whether the whole chain verifies. The read is
    itself recorded first, so it is the newest entry."""
    runtime.audit.record("audit.read", by=principal.name, limit=limit)
    chain = runtime.audit.path or runtime.audit.directory / CHAIN_FILE
    try:
        report = verify_chain(chain, load_chain_key(runtime.audit.key_file))
        lines = chain.read_text(encoding="utf-8").splitlines()
    except (OSError, CryptoError) as exc:
        logger.error("cannot read the audit chain %s: %s", chain, exc)
        raise HTTPException(status_code=503, detail="the audit chain cannot be read") from exc
    items = [json.loads(line) for line in lines[-limit:] if line.strip()]
    return AuditOut(intact=report.ok, entries_checked=report.entries, detail=report.detail, items=items)
