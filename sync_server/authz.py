"""The route policy: which roles may call which route of the sync server, declared in ONE table (B-14, B-16).

Owns `ROUTE_POLICIES` (every route of the app, keyed "METHOD /path"; the role x endpoint matrix of
docs/accounts.md), the kinds of policy (`public`, `device`: the endpoint authenticates the device itself by
signature, or a set of roles), and `check_route_policies(app)`, which `create_app` calls so that the app refuses to
start when a route has no policy or a policy names a route that does not exist. The request-time check lives in
`sync_server.api.deps.authorize`. It must never authenticate anybody or touch the database.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Literal

from fastapi import FastAPI
from fastapi.routing import iter_route_contexts
from starlette.routing import Mount

from sync_server.accounts import Role
from sync_server.errors import ConfigurationError


@dataclass(frozen=True)
class Policy:
    kind: Literal["public", "device", "device_session", "roles"]
    roles: frozenset[Role] = frozenset()
    password_change_allowed: bool = False
    """Reachable by an account whose password has expired (it must change it first and can do nothing else)."""
    page: bool = False
    """A server-rendered page: the login session cookie (`PAGE_COOKIE`) is accepted besides a bearer token; without
    valid credentials the browser is sent to /login (303), a role the policy does not list gets a 403 page."""
    cookie: bool = False
    """The login session cookie is accepted (pages, and signing out); every other API route ignores it, so a
    cookie can never make the browser act for the operator (the actions need the bearer token)."""

    def allows(self, roles: frozenset[Role]) -> bool:
        return self.kind != "roles" or bool(self.roles & roles)


PUBLIC = Policy("public")
"""No authentication (health, metrics, the server's public key, the API documentation, login)."""
DEVICE = Policy("device")
"""The terminal authenticates itself in the request (SM2 signature over a claim token or its identity key)."""


DEVICE_SESSION = Policy("device_session")
"""A terminal on the device API (/device/v1): the request is signed with its current MQTT session key
(`X-Device-*` headers, `sync_server.signed_requests`); checked by `authorize` before the handler runs."""


def roles(*allowed: Role, password_change_allowed: bool = False) -> Policy:
    return Policy("roles", frozenset(allowed), password_change_allowed)


def page(*allowed: Role) -> Policy:
    """A server-rendered page readable by `allowed` (the same roles as the API it shows)."""
    return Policy("roles", frozenset(allowed), page=True, cookie=True)


PAGE_COOKIE = "yibao_session"
"""The login session token as an HttpOnly, SameSite=Strict cookie (set by /api/v1/auth/login, cleared by logout):
what lets a browser open the read-only pages; docs/accounts.md "Signing in on the web pages"."""

ANY_ACCOUNT = roles(*(set(Role) - {Role.HIS_CLIENT}), password_change_allowed=True)
ANY_ACCOUNT_COOKIE = Policy("roles", ANY_ACCOUNT.roles, password_change_allowed=True, cookie=True)
"""Any signed-in operator, by bearer token or the page cookie: who am I, and signing out (harmless if forced)."""
FLEET_READERS = roles(Role.DEVICE_ADMIN, Role.REGULATOR)
"""Device registry reads; a regulator sees only devices of institutions in its region."""
DEVICE_ADMIN = roles(Role.DEVICE_ADMIN)
SECURITY = roles(Role.SECURITY_ADMIN)
ACCOUNT_READERS = roles(Role.SECURITY_ADMIN, Role.AUDITOR)
AUDIT_READERS = roles(Role.AUDITOR)
HIS_CLIENTS = roles(Role.HIS_CLIENT)
"""A HIS system of one institution (`X-HIS-*` signed requests); the handler scopes everything to its institution."""
REVEALERS = roles(*(set(Role) - {Role.AUDITOR, Role.DEVICE_ADMIN, Role.HIS_CLIENT}))
"""May ask for a reveal at all; each reveal source narrows this down per kind of subject."""

ROUTE_POLICIES: dict[str, Policy] = {
    # documentation and operations
    "GET /openapi.json": PUBLIC,
    "GET /docs": PUBLIC,
    "GET /docs/oauth2-redirect": PUBLIC,
    "GET /redoc": PUBLIC,
    "MOUNT /static": PUBLIC,
    "GET /healthz": PUBLIC,
    "GET /api/v1/ingest/stats": PUBLIC,
    # device identity: the device signs its own requests
    "GET /api/v1/server-identity": PUBLIC,
    "POST /api/v1/provisioning/enrol": DEVICE,
    "POST /api/v1/provisioning/devices/{device_id}/rotate": DEVICE,
    "POST /api/v1/devices/{device_id}/sessions": DEVICE,
    # provisioning and commands (system administration)
    "POST /api/v1/provisioning/devices": DEVICE_ADMIN,
    "POST /api/v1/provisioning/devices/{device_id}/reset": DEVICE_ADMIN,
    "POST /api/v1/provisioning/devices/{device_id}/revoke": DEVICE_ADMIN,
    "GET /api/v1/provisioning/devices": DEVICE_ADMIN,
    "GET /api/v1/provisioning/devices/{device_id}": DEVICE_ADMIN,
    "POST /api/v1/devices/{device_id}/commands": DEVICE_ADMIN,
    "GET /api/v1/devices/{device_id}/commands": DEVICE_ADMIN,
    "GET /api/v1/commands/{command_id}": DEVICE_ADMIN,
    # the device registry (read)
    "GET /api/v1/devices": FLEET_READERS,
    "GET /api/v1/devices/{device_id}": FLEET_READERS,
    "GET /api/v1/devices/{device_id}/events": DEVICE_ADMIN,
    "GET /api/v1/devices/{device_id}/reconciliation": FLEET_READERS,
    "GET /api/v1/institutions": roles(Role.DEVICE_ADMIN, Role.REGULATOR, Role.INSTITUTION_HEAD),
    # institutions and device binding with approval (docs/binding.md)
    "PUT /api/v1/institutions/{code}": DEVICE_ADMIN,
    "GET /api/v1/binding-applications": FLEET_READERS,
    "POST /api/v1/binding-applications/{application_id}/approve": DEVICE_ADMIN,
    "POST /api/v1/binding-applications/{application_id}/reject": DEVICE_ADMIN,
    "POST /api/v1/devices/{device_id}/unbind": DEVICE_ADMIN,
    "GET /api/v1/binding-history": FLEET_READERS,
    "GET /bindings": page(Role.DEVICE_ADMIN, Role.REGULATOR),
    # operator pages: read with the login session cookie (or a bearer token), for the roles of the API they show,
    # scoped like it; actions on them call the API with the signed-in operator's bearer token (/login)
    "GET /": page(Role.DEVICE_ADMIN, Role.REGULATOR),
    "GET /devices/{device_id}": page(Role.DEVICE_ADMIN, Role.REGULATOR),
    # login sessions
    "POST /api/v1/auth/login": PUBLIC,
    "POST /api/v1/auth/logout": ANY_ACCOUNT_COOKIE,
    "GET /api/v1/auth/me": ANY_ACCOUNT_COOKIE,
    "POST /api/v1/auth/password": ANY_ACCOUNT,
    # accounts (security administration)
    "GET /api/v1/accounts": ACCOUNT_READERS,
    "POST /api/v1/accounts": SECURITY,
    "GET /api/v1/accounts/{username}": ACCOUNT_READERS,
    "PUT /api/v1/accounts/{username}/roles": SECURITY,
    "POST /api/v1/accounts/{username}/disable": SECURITY,
    "POST /api/v1/accounts/{username}/enable": SECURITY,
    "POST /api/v1/accounts/{username}/password-reset": SECURITY,
    "GET /api/v1/password-policy": roles(Role.SECURITY_ADMIN, Role.AUDITOR),
    # personal data and the audit log
    "POST /api/v1/reveal": REVEALERS,
    "GET /api/v1/audit": AUDIT_READERS,
    # machine callers: HIS clients (signed X-HIS-* requests) and terminals on the device API (signed X-Device-*)
    "POST /api/v1/his-clients": DEVICE_ADMIN,
    "GET /api/v1/his-clients": DEVICE_ADMIN,
    "POST /api/v1/his-clients/{client_id}/revoke": DEVICE_ADMIN,
    "GET /his/v1/ping": HIS_CLIENTS,
    "GET /device/v1/whoami": DEVICE_SESSION,
    # purchases and proxy purchase (docs/purchases.md, docs/his-integration.md)
    "POST /his/v1/purchases": HIS_CLIENTS,
    "GET /his/v1/purchases/{settlement_no}": HIS_CLIENTS,
    "POST /his/v1/proxy-relationships": HIS_CLIENTS,
    "DELETE /his/v1/proxy-relationships/{relationship_id}": HIS_CLIENTS,
    "GET /device/v1/proxy-relationships": DEVICE_SESSION,
    "GET /api/v1/purchases": roles(Role.REGULATOR, Role.INSTITUTION_HEAD),
    "GET /api/v1/verifications": roles(Role.REGULATOR, Role.INSTITUTION_HEAD),
    # back-office statistics (D-04, docs/statistics.md): scoped to a regulator's region, an institution head's
    # institution; the page shows what the caller's role may see of them, in the same scope (docs/statistics.md)
    "GET /api/v1/statistics/devices": roles(Role.DEVICE_ADMIN, Role.REGULATOR, Role.INSTITUTION_HEAD),
    "GET /api/v1/statistics/verifications": roles(Role.REGULATOR, Role.INSTITUTION_HEAD),
    "GET /api/v1/statistics/prescriptions": roles(Role.REGULATOR, Role.INSTITUTION_HEAD),
    "GET /statistics": page(Role.DEVICE_ADMIN, Role.REGULATOR, Role.INSTITUTION_HEAD),
    # prescriptions and their review (docs/prescriptions.md)
    "POST /his/v1/prescriptions": HIS_CLIENTS,
    "GET /his/v1/prescriptions/{rx_no}": HIS_CLIENTS,
    "POST /his/v1/prescriptions/{rx_no}/settlement": HIS_CLIENTS,
    "GET /device/v1/prescriptions/pending": DEVICE_SESSION,
    "GET /device/v1/prescriptions/reviewed": DEVICE_SESSION,
    "GET /device/v1/purchase-history": DEVICE_SESSION,
    "GET /api/v1/prescriptions": roles(Role.REGULATOR, Role.INSTITUTION_HEAD, Role.PHARMACIST),
    "GET /api/v1/prescriptions/{prescription_id}": roles(Role.REGULATOR, Role.INSTITUTION_HEAD, Role.PHARMACIST),
    # catalogues and the drug-usage rules (docs/catalogue.md); citizen queries relayed to the national platform
    "POST /api/v1/catalogues/{kind}/versions": roles(Role.DEVICE_ADMIN, Role.REGULATOR),
    "GET /api/v1/catalogues": roles(Role.DEVICE_ADMIN, Role.REGULATOR),
    "GET /api/v1/drug-rules": roles(Role.DEVICE_ADMIN, Role.REGULATOR),
    "PUT /api/v1/drug-rules": roles(Role.REGULATOR),
    "GET /catalogue": page(Role.DEVICE_ADMIN, Role.REGULATOR),
    "GET /device/v1/catalogues": DEVICE_SESSION,
    "GET /device/v1/catalogues/{kind}": DEVICE_SESSION,
    "GET /device/v1/drug-rules": DEVICE_SESSION,
    "POST /device/v1/national/{query}": DEVICE_SESSION,
    # the web sign-in form; the page holds nothing, the script on it calls POST /api/v1/auth/login
    "GET /login": PUBLIC,
    # pharmacists and attendance (docs/pharmacists.md)
    "GET /api/v1/pharmacist-sessions": roles(Role.REGULATOR, Role.INSTITUTION_HEAD, Role.PHARMACIST),
    "PUT /his/v1/pharmacists": HIS_CLIENTS,
    "POST /device/v1/pharmacists/{code}/template": DEVICE_SESSION,
    "GET /device/v1/pharmacists": DEVICE_SESSION,
    "GET /device/v1/pharmacist-sessions": DEVICE_SESSION,
}


def route_keys(app: FastAPI) -> Iterator[str]:
    """ "METHOD /path" of every route the app serves (HEAD rides along with GET and is not listed)."""
    for context in iter_route_contexts(app.routes):
        if isinstance(context.original_route, Mount):
            yield f"MOUNT {context.path}"
            continue
        for method in sorted(context.methods or ()):
            if method != "HEAD":
                yield f"{method} {context.path}"


def check_route_policies(app: FastAPI) -> None:
    """Refuse to serve an app whose routes and `ROUTE_POLICIES` disagree (a new route must declare its policy)."""
    served = set(route_keys(app))
    missing = sorted(served - ROUTE_POLICIES.keys())
    stale = sorted(ROUTE_POLICIES.keys() - served)
    if missing:
        raise ConfigurationError(f"routes without an authorisation policy in sync_server/authz.py: {missing}")
    if stale:
        raise ConfigurationError(f"authorisation policies for routes the app does not serve: {stale}")


def policy_for(method: str, path: str) -> Policy | None:
    return ROUTE_POLICIES.get(f"{'GET' if method == 'HEAD' else method} {path}")


SECURITY_SCHEMES: dict[str, dict[str, Any]] = {
    "HTTPBearer": {
        "type": "http",
        "scheme": "bearer",
        "description": "A login session token (`POST /api/v1/auth/login`) or an admin token "
        "(`yibao server admin-token`).",
    },
    "HisSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "X-HIS-Client",
        "description": "A HIS client's HMAC-SM3 request signature: `X-HIS-Client`, `X-HIS-Timestamp`, `X-HIS-Nonce` "
        "and `X-HIS-Signature` over the method, path, timestamp, nonce and body digest (docs/his-integration.md).",
    },
    "DeviceSignature": {
        "type": "apiKey",
        "in": "header",
        "name": "X-Device-Id",
        "description": "A terminal's request signature with its current MQTT session key (`X-Device-*` headers; "
        "docs/identity.md).",
    },
}


def document_security(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` (the app's OpenAPI document) with each operation's `security` as its route policy has it: a HIS
    client's signature, a bearer token, a terminal's signature, or none for a public route. Set here from
    `ROUTE_POLICIES`, not from the handlers' dependencies: `authorize` checks every route itself."""
    schema.setdefault("components", {})["securitySchemes"] = SECURITY_SCHEMES
    for path, operations in schema.get("paths", {}).items():
        for method, operation in operations.items():
            policy = policy_for(method.upper(), path)
            needs: list[dict[str, list[str]]] = []
            if policy is not None and policy.kind == "roles":
                if Role.HIS_CLIENT in policy.roles:
                    needs.append({"HisSignature": []})
                if policy.roles - {Role.HIS_CLIENT}:
                    needs.append({"HTTPBearer": []})
            elif policy is not None and policy.kind == "device_session":
                needs.append({"DeviceSignature": []})
            if needs:
                operation["security"] = needs
            else:
                operation.pop("security", None)
    return schema


ROLE_COLUMNS = (
    Role.DEVICE_ADMIN,
    Role.INSTITUTION_HEAD,
    Role.PHARMACIST,
    Role.CASHIER,
    Role.REGULATOR,
    Role.SECURITY_ADMIN,
    Role.AUDITOR,
    Role.HIS_CLIENT,
)


def matrix_markdown() -> str:
    """The role x endpoint matrix as a Markdown table (docs/accounts.md embeds it; a test keeps them equal)."""
    header = "| Route | anonymous | " + " | ".join(r.value for r in ROLE_COLUMNS) + " |"
    rule = "|---|---|" + "---|" * len(ROLE_COLUMNS)
    rows = [header, rule]
    for key in sorted(ROUTE_POLICIES):
        policy = ROUTE_POLICIES[key]
        if policy.kind == "roles":
            anonymous = "→ /login" if policy.page else "—"
            cells = [anonymous] + ["✔" if role in policy.roles else "—" for role in ROLE_COLUMNS]
        else:
            cells = [policy.kind] * (len(ROLE_COLUMNS) + 1)
        rows.append(f"| `{key}` | " + " | ".join(cells) + " |")
    return "\n".join(rows) + "\n"
