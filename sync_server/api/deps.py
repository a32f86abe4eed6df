"""`Annotated` dependency aliases for route handlers (`SessionDep`, `WriterSessionDep`, `SettingsDep`, `ClockDep`,
`RuntimeDep`, `AdminDep`, `PrincipalDep`, and `HisCallDep` for the HIS API), `authorize` (the app-wide route-policy
check) and `require_admin`.

Owns how a request reaches the process's `ServerRuntime` (set on `app.state` by the lifespan), the per-request
database session, which is always closed, and authentication of `Authorization: Bearer <token>`:

* an operator login session (`ys_...`, `sync_server.accounts`): the account's roles;
* an unrevoked admin token (SHA-256 in `admin_tokens`) or the configured bootstrap token (compared in constant
  time): the role `device_admin` only (docs/accounts.md);
* a HIS client's `X-HIS-*` request signature (`sync_server.signed_requests`): the role `his_client`, scoped to its
  institution; a terminal's `X-Device-*` signature on `device_session` routes (`DeviceCallerDep`).

`authorize` looks up the matched route's policy in `sync_server.authz` and answers 401 (no or bad credentials), 403
(a role the policy does not list, or a password that must be changed first) before the handler runs. It must never
create engines, hold globals or log a token.
"""

from __future__ import annotations

import hmac
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Annotated, Any, Literal

from fastapi import Depends, HTTPException, Request, Response, status
from fastapi.concurrency import run_in_threadpool
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol import Clock
from protocol.request_signing import RequestAuthError
from sync_server.accounts import (
    SESSION_PREFIX,
    Role,
    account_roles,
    password_expired,
    resolve_session,
    touch_session,
)
from sync_server.authz import PAGE_COOKIE, Policy, policy_for
from sync_server.db.models import AdminToken
from sync_server.errors import IngestError
from sync_server.identity import token_digest
from sync_server.nonces import NonceStoreUnavailableError
from sync_server.runtime import ServerRuntime
from sync_server.settings import ServerSettings
from sync_server.signed_requests import HIS_CLIENT_HEADER, DeviceCaller


async def get_runtime(request: Request) -> ServerRuntime:
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, ServerRuntime):
        raise RuntimeError("the server runtime is not started (is the app running inside its lifespan?)")
    return runtime


RuntimeDep = Annotated[ServerRuntime, Depends(get_runtime)]


async def get_session(runtime: RuntimeDep) -> AsyncIterator[Session]:
    """The request's database session. An async dependency on purpose: its teardown (closing the session, which
    hands the connection back to the pool) runs on the event loop, not in the worker-thread pool. A sync generator
    dependency needs a worker thread to close its session; under load every worker thread can be waiting for a pool
    connection that only such a close would free, and the server deadlocks until the pool timeout (found by
    `yibao bench his`). Creating the session does not connect: the handler's thread does, on first use."""
    session = runtime.sessions()
    try:
        yield session
    finally:
        session.close()


async def get_writer_session(runtime: RuntimeDep) -> AsyncIterator[Session]:
    """As `get_session`, for requests that write (SQLite: the write lock is taken when the transaction begins)."""
    session = runtime.writer_sessions()
    try:
        yield session
    finally:
        session.close()


async def get_settings(runtime: RuntimeDep) -> ServerSettings:
    return runtime.settings


async def get_clock(runtime: RuntimeDep) -> Clock:
    return runtime.clock


SessionDep = Annotated[Session, Depends(get_session)]
WriterSessionDep = Annotated[Session, Depends(get_writer_session)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
ClockDep = Annotated[Clock, Depends(get_clock)]


_bearer = HTTPBearer(
    auto_error=False,
    description="A login session token (`POST /api/v1/auth/login`) or an admin token (`yibao server admin-token`).",
)

BOOTSTRAP_ADMIN = "bootstrap"


@dataclass(frozen=True)
class Principal:
    """Who is calling. `name` is what the audit log records: an admin token's name or `account:<username>`."""

    name: str
    kind: Literal["admin_token", "account", "his_client"]
    roles: frozenset[Role]
    username: str | None = None
    account_id: int | None = None
    session_id: int | None = None
    institution_id: int | None = None
    institution_code: str | None = None
    """Set for a HIS client (from its cached record): its institution's code, without a query per request."""
    region_prefix: str | None = None
    """A regulator's 医保区划 code prefix: region-scoped data outside it is invisible."""
    must_change_password: bool = False


ADMIN_TOKEN_ROLES = frozenset({Role.DEVICE_ADMIN})
"""What the admin bearer tokens (and the bootstrap token) may do: device administration, nothing else."""


def _unauthorised(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def _forbidden(detail: str) -> HTTPException:
    return HTTPException(status_code=status.HTTP_403_FORBIDDEN, detail=detail)


def authenticate(runtime: ServerRuntime, credentials: HTTPAuthorizationCredentials | None) -> Principal:
    """The principal of a bearer token; 401 when there is none or it is not valid."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorised(
            "admin authentication required: send 'Authorization: Bearer <token>' (an admin token or the token "
            "of POST /api/v1/auth/login)"
        )
    token = credentials.credentials
    if token.startswith(SESSION_PREFIX):
        principal = _account_principal(runtime, token)
        if principal is not None:
            return principal
        # Falls through: an admin token is random URL-safe text and may, rarely, start with the same prefix.
    bootstrap = runtime.settings.bootstrap_admin_token
    if bootstrap is not None and hmac.compare_digest(
        token.encode("utf-8"), bootstrap.get_secret_value().encode("utf-8")
    ):
        return Principal(name=BOOTSTRAP_ADMIN, kind="admin_token", roles=ADMIN_TOKEN_ROLES)
    with runtime.sessions() as session:
        name = session.scalar(
            select(AdminToken.name).where(AdminToken.sha256 == token_digest(token), AdminToken.revoked_at.is_(None))
        )
    if name is None:
        if token.startswith(SESSION_PREFIX):
            raise _unauthorised("the session is not valid (unknown, expired, idle too long or ended)")
        raise _unauthorised("admin token is not valid (unknown or revoked)")
    return Principal(name=name, kind="admin_token", roles=ADMIN_TOKEN_ROLES)


def _account_principal(runtime: ServerRuntime, token: str) -> Principal | None:
    policy = runtime.settings.account_policy
    now = runtime.clock.now()
    with runtime.sessions() as session:
        resolved = resolve_session(session, token, policy=policy, now=now)
        if resolved is None:
            return None
        account = resolved.account
        principal = Principal(
            name=f"account:{account.username}",
            kind="account",
            roles=account_roles(account),
            username=account.username,
            account_id=account.id,
            session_id=resolved.session_id,
            institution_id=account.institution_id,
            region_prefix=account.region_prefix,
            must_change_password=password_expired(account, policy=policy, now=now),
        )
    if resolved.touch_due:
        with runtime.writer_sessions.begin() as writer:
            touch_session(writer, resolved.session_id, now=now)
    return principal


def _cached_principal(
    request: Request, runtime: ServerRuntime, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    principal = authenticate(runtime, credentials)
    request.state.principal = principal
    return principal


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


async def _principal_off_loop(
    request: Request, runtime: ServerRuntime, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    """`_cached_principal` from async code: the cached principal at once, a database lookup in a worker thread."""
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    return await run_in_threadpool(_cached_principal, request, runtime, credentials)


async def _raw_body(request: Request) -> bytes:
    """The request body as sent (Starlette caches it, so the handler still gets it): signatures cover it. A body
    with a NUL character (raw or JSON-escaped) is refused here, for every route: no field of ours may hold one, and
    PostgreSQL text cannot store one."""
    body = await request.body()
    if b"\x00" in body or b"\\u0000" in body:
        raise HTTPException(
            status_code=422,
            detail=[{"loc": ["body"], "msg": "NUL characters are not accepted", "type": "value_error"}],
        )
    return body


RawBody = Annotated[bytes, Depends(_raw_body)]


def _signed_path(request: Request) -> str:
    # The path as sent (percent-encoding kept), not the decoded one: the client signed the bytes it sent.
    raw = request.scope.get("raw_path")
    path = raw.decode("latin-1") if isinstance(raw, bytes) else request.url.path
    query = request.url.query
    return path + (f"?{query}" if query else "")


def _signature_refused(exc: RequestAuthError) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED,
        detail={"code": exc.code, "message": str(exc)},
        headers={"WWW-Authenticate": "HMAC-SM3"},
    )


async def _his_principal(request: Request, runtime: ServerRuntime, body: bytes) -> Principal:
    try:
        caller = await runtime.requests.authenticate_his_async(
            request.headers, method=request.method, path=_signed_path(request), body=body
        )
    except RequestAuthError as exc:
        raise _signature_refused(exc) from exc
    except NonceStoreUnavailableError as exc:
        raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
    return Principal(
        name=f"his:{caller.client_id}",
        kind="his_client",
        roles=frozenset({Role.HIS_CLIENT}),
        institution_id=caller.institution_id,
        institution_code=caller.institution_code,
    )


def _authenticate_device(request: Request, runtime: ServerRuntime, body: bytes) -> DeviceCaller:
    try:
        caller = runtime.requests.authenticate_device(
            request.headers, method=request.method, path=_signed_path(request), body=body
        )
    except RequestAuthError as exc:
        raise _signature_refused(exc) from exc
    except (IngestError, NonceStoreUnavailableError) as exc:
        raise HTTPException(status_code=status.HTTP_503_SERVICE_UNAVAILABLE, detail=str(exc)) from exc
    request.state.device_caller = caller
    return caller


class PageLoginRequiredError(Exception):
    """A page was asked for without valid credentials: the app answers 303 to /login?next=<the page>."""

    def __init__(self, next_path: str, *, forget_cookie: bool) -> None:
        super().__init__(next_path)
        self.next_path = next_path
        self.forget_cookie = forget_cookie


class PageForbiddenError(Exception):
    """A signed-in operator whose roles may not read this page (or must change the password first)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def set_session_cookie(response: Response, request: Request, token: str, lifetime: timedelta) -> None:
    """Give the browser the login session as the page cookie: HttpOnly (no script reads it), SameSite=Strict (no
    other site's page makes the browser send it), Secure over HTTPS, kept no longer than the session lasts (the
    server ends an idle session sooner, and then the cookie opens nothing)."""
    response.set_cookie(
        PAGE_COOKIE,
        token,
        max_age=max(0, int(lifetime.total_seconds())),
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )


def clear_session_cookie(response: Response, request: Request) -> None:
    response.delete_cookie(
        PAGE_COOKIE, path="/", secure=request.url.scheme == "https", httponly=True, samesite="strict"
    )


def _page_credentials(
    request: Request, policy: Policy, credentials: HTTPAuthorizationCredentials | None
) -> HTTPAuthorizationCredentials | None:
    """A bearer token if one was sent, else (on a route that accepts it) the login session cookie as one."""
    if credentials is not None or not policy.cookie:
        return credentials
    token = request.cookies.get(PAGE_COOKIE)
    if not token or not token.startswith(SESSION_PREFIX):  # only a login session is ever put in the cookie
        return None
    return HTTPAuthorizationCredentials(scheme="Bearer", credentials=token)


def _page_principal(
    request: Request, runtime: ServerRuntime, policy: Policy, credentials: HTTPAuthorizationCredentials | None
) -> Principal:
    try:
        return _cached_principal(request, runtime, credentials)
    except HTTPException as exc:
        if not policy.page or exc.status_code != status.HTTP_401_UNAUTHORIZED:
            raise
        raise PageLoginRequiredError(_signed_path(request), forget_cookie=PAGE_COOKIE in request.cookies) from exc


async def authorize(request: Request) -> None:
    """The app-wide check of the matched route's policy (`sync_server.authz.ROUTE_POLICIES`). A request carrying
    `X-HIS-Client` is authenticated by its signature (a HIS client), any other by its bearer token (or, on a page,
    the login session cookie); a `device_session` route by the terminal's signature.

    Async on purpose: a public route, and a HIS request whose client is cached, are decided on the event loop
    (the nonce is spent on an async connection); only what needs a blocking database lookup (a bearer token or
    session, a terminal's key) goes to a worker thread.

    It takes the request only, and reads the runtime, the body and the bearer credentials itself: FastAPI spends CPU
    on every sub-dependency of every request (docs/benchmarks.md, "HIS interfaces under load"). The routes that take
    a bearer token declare it through their own `PrincipalDep` or `AdminDep` (OpenAPI's `HTTPBearer`)."""
    runtime = await get_runtime(request)
    body = await _raw_body(request)
    route = request.scope.get("route")
    policy = policy_for(request.method, route.path) if isinstance(route, APIRoute) else None
    if policy is None:
        # create_app refuses to start with an undeclared route; this is the belt to those braces.
        raise _forbidden("this route has no authorisation policy")
    if policy.kind == "device_session":
        await run_in_threadpool(_authenticate_device, request, runtime, body)
        return
    if policy.kind != "roles":
        return
    if HIS_CLIENT_HEADER in request.headers:
        principal = await _his_principal(request, runtime, body)
        request.state.principal = principal
    else:
        credentials = await _bearer(request)
        principal = await run_in_threadpool(
            _page_principal, request, runtime, policy, _page_credentials(request, policy, credentials)
        )
    if principal.must_change_password and not policy.password_change_allowed:
        if policy.page:
            raise PageLoginRequiredError(_signed_path(request), forget_cookie=False)
        raise _forbidden("the password has expired or was set by an administrator: change it first")
    if not policy.allows(principal.roles):
        if policy.page:
            raise PageForbiddenError(", ".join(sorted(principal.roles)))
        raise _forbidden(
            f"not allowed for role(s) {', '.join(sorted(principal.roles))}; "
            f"this route needs one of {', '.join(sorted(policy.roles))}"
        )


async def require_principal(request: Request, runtime: RuntimeDep, credentials: Credentials) -> Principal:
    """The authenticated caller (401 otherwise); the route's roles were already checked by `authorize`, which
    cached the principal, so this normally costs no database query (and no worker-thread hop)."""
    return await _principal_off_loop(request, runtime, credentials)


PrincipalDep = Annotated[Principal, Depends(require_principal)]


@dataclass(frozen=True, slots=True)
class HisCall:
    """A HIS client's request as `authorize` authenticated it, with what its handler needs: one dependency for the
    server's bulk traffic (each FastAPI dependency costs CPU on every request; docs/benchmarks.md)."""

    runtime: ServerRuntime
    client: str
    """The audit name, `his:<client_id>`."""
    institution_id: int
    institution_code: str

    @property
    def client_id(self) -> str:
        return self.client.removeprefix("his:")

    def now(self) -> datetime:
        return self.runtime.clock.now()

    async def audit(self, event_type: str, **fields: Any) -> None:
        """Record `event_type` in the server's audit chain, with this client as `his_client`, from a worker thread
        (the chain is written and synced to disk: never on the event loop)."""
        await run_in_threadpool(self.runtime.audit.record, event_type, his_client=self.client, **fields)


async def require_his_call(request: Request) -> HisCall:
    """The HIS client `authorize` authenticated by its signature (403 on a route outside the HIS API)."""
    principal = getattr(request.state, "principal", None)
    if not isinstance(principal, Principal) or principal.kind != "his_client":
        raise _forbidden("this route is part of the HIS API: sign the request as a HIS client")
    if principal.institution_id is None or principal.institution_code is None:  # a HIS client always has both
        raise _forbidden("this HIS client belongs to no institution")
    return HisCall(await get_runtime(request), principal.name, principal.institution_id, principal.institution_code)


HisCallDep = Annotated[HisCall, Depends(require_his_call)]


async def require_device_caller(request: Request) -> DeviceCaller:
    """The terminal that signed this device-API request (authenticated by `authorize`)."""
    caller = getattr(request.state, "device_caller", None)
    if not isinstance(caller, DeviceCaller):  # a route outside the device_session policy asked for a device
        raise _forbidden("this route is not part of the device API")
    return caller


DeviceCallerDep = Annotated[DeviceCaller, Depends(require_device_caller)]


async def require_admin(request: Request, runtime: RuntimeDep, credentials: Credentials) -> str:
    """The audit name of a caller holding `device_admin` (an admin token or an account); 401/403 otherwise."""
    principal = await _principal_off_loop(request, runtime, credentials)
    if Role.DEVICE_ADMIN not in principal.roles:
        raise _forbidden("device administration needs the device_admin role")
    return principal.name


AdminDep = Annotated[str, Depends(require_admin)]


async def region_prefix(principal: PrincipalDep) -> str | None:
    """The caller's region scope (a regulator's 医保区划 prefix), or None for an unscoped caller."""
    return principal.region_prefix


RegionDep = Annotated[str | None, Depends(region_prefix)]
