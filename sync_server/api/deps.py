"""`Annotated` dependency aliases for route handlers (`SessionDep`, `WriterSessionDep`, `SettingsDep`, `ClockDep`,
`RuntimeDep`).

Owns how a request reaches the process's `ServerRuntime` (set on `app.state` by the lifespan) and the per-request
database session, which is always closed. It must never create engines or hold globals.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.orm import Session

from protocol import Clock
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
