"""`Annotated` dependency aliases for route handlers (`SessionDep`, `WriterSessionDep`, `SettingsDep`, `ClockDep`,
`RuntimeDep`, `AdminDep`) and `require_admin` for whole routers.

Owns how a request reaches the process's `ServerRuntime` (set on `app.state` by the lifespan), the per-request
database session, which is always closed, and admin authentication: `Authorization: Bearer <token>` whose SHA-256 is
an unrevoked row of `admin_tokens`, or the configured bootstrap token (compared in constant time). Anything else is a
401 with a JSON `detail`. It must never create engines, hold globals or log a token.
"""

from __future__ import annotations

import hmac
from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, HTTPException, Request, status
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from protocol import Clock
from sync_server.db.models import AdminToken
from sync_server.identity import token_digest
from sync_server.runtime import ServerRuntime
from sync_server.settings import ServerSettings


def get_runtime(request: Request) -> ServerRuntime:
    runtime = getattr(request.app.state, "runtime", None)
    if not isinstance(runtime, ServerRuntime):
        raise RuntimeError("the server runtime is not started (is the app running inside its lifespan?)")
    return runtime


RuntimeDep = Annotated[ServerRuntime, Depends(get_runtime)]


def get_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.sessions() as session:
        yield session


def get_writer_session(runtime: RuntimeDep) -> Iterator[Session]:
    with runtime.writer_sessions() as session:
        yield session


def get_settings(runtime: RuntimeDep) -> ServerSettings:
    return runtime.settings


def get_clock(runtime: RuntimeDep) -> Clock:
    return runtime.clock


SessionDep = Annotated[Session, Depends(get_session)]
WriterSessionDep = Annotated[Session, Depends(get_writer_session)]
SettingsDep = Annotated[ServerSettings, Depends(get_settings)]
ClockDep = Annotated[Clock, Depends(get_clock)]


_bearer = HTTPBearer(auto_error=False, description="An admin token (`yibao server admin-token create`).")

BOOTSTRAP_ADMIN = "bootstrap"


def _unauthorised(detail: str) -> HTTPException:
    return HTTPException(
        status_code=status.HTTP_401_UNAUTHORIZED, detail=detail, headers={"WWW-Authenticate": "Bearer"}
    )


def require_admin(
    runtime: RuntimeDep, credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
) -> str:
    """The name of the admin token that authenticated this request; 401 otherwise."""
    if credentials is None or credentials.scheme.lower() != "bearer" or not credentials.credentials:
        raise _unauthorised("admin authentication required: send 'Authorization: Bearer <admin token>'")
    token = credentials.credentials
    bootstrap = runtime.settings.bootstrap_admin_token
    if bootstrap is not None and hmac.compare_digest(
        token.encode("utf-8"), bootstrap.get_secret_value().encode("utf-8")
    ):
        return BOOTSTRAP_ADMIN
    with runtime.sessions() as session:
        name = session.scalar(
            select(AdminToken.name).where(AdminToken.sha256 == token_digest(token), AdminToken.revoked_at.is_(None))
        )
    if name is None:
        raise _unauthorised("admin token is not valid (unknown or revoked)")
    return name


AdminDep = Annotated[str, Depends(require_admin)]
