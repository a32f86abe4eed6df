"""Schema-driven fuzzing of EVERY `/his/v1/` operation of the app's OpenAPI document (schemathesis), with valid HIS
signatures, over real HTTP against a real server on SQLite.

The operations are read from `create_app(...).openapi()` at test time, so an endpoint another change adds under
`/his/v1/` is fuzzed as soon as it is merged, with no edit here. Each request is signed in a `requests` auth hook on
the prepared request (the exact body bytes and path with query that go on the wire, `protocol.request_signing`),
so the server's signature check passes and the fuzzing reaches the handlers. For every generated case the response
must not be a server error (5xx) and must conform to the schema the document declares for its status code (a 422
from our own validation has FastAPI's validation-error shape, a 409 the documented problem shape, ...).

Examples in the request schemas (`PurchaseIn`, `ProxyRelationshipIn`) make the explicit-example phase register real
purchases and relationships, so the stateful paths (200 on a repeat, 409 on a conflict, 404 on another id) are hit
too, not only the 422 of random bodies.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from pydantic import SecretStr
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from sync_server.app import create_app
from sync_server.db.engine import create_db_engine
from sync_server.db.migrate import upgrade
from sync_server.identity import create_server_key
from sync_server.settings import ServerSettings
from tests.sync_server.conftest import INSTITUTION_CODE, TEST_ADMIN_TOKEN, seed_fleet, serving
from tests.sync_server.signed_requests import HisSigner, make_his_client

HIS_PATHS = r"^/his/v1/"


class SignedByHis(requests.auth.AuthBase):
    """Signs the request exactly as prepared (method, path with query, body bytes) with the HIS client's secret."""

    def __init__(self, signer: HisSigner) -> None:
        self.signer = signer

    def __call__(self, request: requests.PreparedRequest) -> requests.PreparedRequest:
        body = request.body or b""
        if isinstance(body, str):
            raw = body.encode("utf-8")
        elif isinstance(body, bytes):
            raw = body
        else:  # a streamed body: schemathesis never sends one, and it could not be signed before sending
            raise TypeError("cannot sign a streamed request body")
        method = request.method or "GET"
        request.headers.update(self.signer.headers(method, request.path_url, raw, now=time.time()))
        request.headers.pop("Authorization", None)
        return request


@dataclass
class HisTarget:
    url: str
    session: requests.Session


def _his_schema() -> Any:
    """The app's OpenAPI document, /his/v1 operations only; read at collection (the routes need no database)."""
    with tempfile.TemporaryDirectory() as data_dir:
        document = create_app(ServerSettings(data_dir=Path(data_dir))).openapi()
    return schemathesis.openapi.from_dict(document).include(path_regex=HIS_PATHS)


schema = _his_schema()
parametrize_every_operation: Callable[[Callable[..., None]], Callable[..., None]] = schema.parametrize()
"""One test per operation of `schema` (typed here: schemathesis' decorator is not)."""
SEEN: dict[str, set[int]] = {}
"""Statuses answered per operation during the fuzzing (checked by the last test of this module)."""


@pytest.fixture(scope="module")
def his_target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HisTarget]:
    db_url = f"sqlite:///{tmp_path_factory.mktemp('his-fuzz') / 'server.sqlite3'}"
    upgrade(db_url)
    engine = create_db_engine(db_url)
    seed_fleet(engine)  # INSTITUTION_CODE, with kiosk-001 bound to it
    settings = ServerSettings(
        database_url=db_url,
        bootstrap_admin_token=SecretStr(TEST_ADMIN_TOKEN),  # module scope: the autouse env fixture has not run
        data_dir=tmp_path_factory.mktemp("his-fuzz-data"),
    )
    create_server_key(settings, iterations=1000)
    app = create_app(settings, engine=engine, start_ingest=False)
    try:
        with serving(app) as client:
            signer = make_his_client(client, INSTITUTION_CODE)
            session = requests.Session()
            session.auth = SignedByHis(signer)
            yield HisTarget(str(client.base_url).rstrip("/"), session)
            session.close()
    finally:
        engine.dispose()


@parametrize_every_operation
@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,
)
def test_every_his_operation(case: Any, his_target: HisTarget) -> None:
    response = case.call(base_url=his_target.url, session=his_target.session)
    assert response.status_code != 401, f"the signature was refused: {response.text[:200]}"
    SEEN.setdefault(f"{case.method.upper()} {case.path}", set()).add(response.status_code)
    case.validate_response(response, checks=[not_a_server_error, response_schema_conformance])


def test_the_fuzzed_operations_are_all_his_operations(his_target: HisTarget) -> None:
    """The filter keeps every /his/v1 operation of the app (and nothing else), including the purchase ones."""
    operations = {f"{op.ok().method.upper()} {op.ok().path}" for op in schema.get_all_operations()}
    with httpx.Client(base_url=his_target.url) as client:
        document = client.get("/openapi.json").json()
    expected = {
        f"{method.upper()} {path}"
        for path, item in document["paths"].items()
        if path.startswith("/his/v1/")
        for method in item
    }
    assert operations == expected
    assert {"POST /his/v1/purchases", "GET /his/v1/purchases/{settlement_no}"} <= operations
    assert len(operations) >= 5


def test_signing_helper_matches_the_server(his_target: HisTarget) -> None:
    """The auth hook itself: a signed GET is accepted, the same request unsigned is refused."""
    ok = his_target.session.get(f"{his_target.url}/his/v1/ping", timeout=10)
    assert ok.status_code == 200, ok.text
    assert requests.get(f"{his_target.url}/his/v1/ping", timeout=10).status_code == 401


def test_the_fuzzing_reached_the_handlers() -> None:
    """Not only 422s: the schemas' examples registered a purchase and a relationship (runs after the fuzzing)."""
    if not SEEN:
        pytest.skip("run together with test_every_his_operation")
    assert 201 in SEEN["POST /his/v1/purchases"]
    assert 201 in SEEN["POST /his/v1/proxy-relationships"]
    assert 422 in SEEN["POST /his/v1/purchases"]
