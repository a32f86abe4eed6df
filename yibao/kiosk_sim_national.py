"""The national platform behind the simulated kiosk (`yibao.kiosk_sim`), for the screen tour's personal queries:
the national-platform simulator (`hardware_sim.national_platform`) under the server's REAL platform client
(`sync_server.national.HttpNationalPlatform`: signed envelopes, the platform's signature checked) and the server's
REAL relay (`sync_server.national_relay.NationalRelay`: masking, sealed query_ref, audit), reached in process
instead of over the device API, plus the cards of one synthetic insured person for the kiosk's readers.

This is a composition root (it may choose simulators); everything personal in it is synthetic. The relay's errors
become the kiosk client's (`terminal.national_queries`) exactly as the server's route maps them to HTTP statuses
(`sync_server.api.national`), so the kiosk says the same words as in the field.
"""

from __future__ import annotations

import dataclasses
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Final, TypeVar

import httpx
from pydantic import ValidationError

from drivers.card_reader import Sex
from drivers.idcard import IdCardData
from drivers.sscard import SocialSecurityCardData
from hardware_sim.idcard_sim import synthetic_card
from hardware_sim.kiosk_rig import KioskSimulatorRig
from hardware_sim.national_platform import (
    INSUTYPE_EMPLOYEE,
    SERVICE_PATH,
    NationalPlatformSimulator,
    SyntheticPerson,
)
from hardware_sim.sscard_sim import synthetic_ss_card
from protocol import Clock
from protocol.gm.sm2 import SM2PrivateKey
from protocol.national_query import (
    ContributionsAnswer,
    CreditsAnswer,
    InstitutionsAnswer,
    InstitutionsRequest,
    PersonInfoAnswer,
    PersonInfoRequest,
    RecordsRequest,
    SettlementsAnswer,
)
from sync_server.audit import ServerAudit
from sync_server.national import (
    CredentialRejectedError,
    HttpNationalPlatform,
    NationalPlatformError,
    NationalPlatformSettings,
    PersonNotFoundError,
    UnreachableError,
)
from sync_server.national_relay import NationalRelay, NotConfiguredError, QueryRefRejectedError
from terminal.national_queries import (
    CredentialNotAcceptedError,
    PersonNotInsuredError,
    QueryFailedError,
    QueryUnavailableError,
)

DEVICE_ID: Final = "KIOSK-SIM-01"
PHARMACY_CODE: Final = "P32058300001"
PHARMACY: Final = "康民大药房"
BASE_URL: Final = "http://national.sim"

A = TypeVar("A")


class InProcessRelay:
    """The kiosk's `NationalClient` over the server's relay in this process (what `NationalQueries` reaches over the
    device API in the field)."""

    def __init__(self, relay: NationalRelay, device_id: str) -> None:
        self.relay = relay
        self.device_id = device_id

    def person_info(self, cert_type: str, cert_no: str, *, card_sn: str | None = None) -> PersonInfoAnswer:
        try:
            request = PersonInfoRequest.model_validate(
                {"mdtrt_cert_type": cert_type, "mdtrt_cert_no": cert_no, "card_sn": card_sn}
            )
        except ValidationError as exc:
            raise CredentialNotAcceptedError("the credential is not in a usable form") from exc
        return self._call(lambda: self.relay.person_info(self.device_id, request))

    def settlements(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> SettlementsAnswer:
        request = RecordsRequest(query_ref=query_ref, begndate=begndate, enddate=enddate)
        return self._call(lambda: self.relay.settlements(self.device_id, request))

    def account_credits(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> CreditsAnswer:
        request = RecordsRequest(query_ref=query_ref, begndate=begndate, enddate=enddate)
        return self._call(lambda: self.relay.account_credits(self.device_id, request))

    def contributions(
        self, query_ref: str, begndate: date | None = None, enddate: date | None = None
    ) -> ContributionsAnswer:
        request = RecordsRequest(query_ref=query_ref, begndate=begndate, enddate=enddate)
        return self._call(lambda: self.relay.contributions(self.device_id, request))

    def institutions(self, fixmedins_type: str | None = None, fixmedins_name: str = "") -> InstitutionsAnswer:
        try:
            request = InstitutionsRequest.model_validate(
                {"fixmedins_type": fixmedins_type, "fixmedins_name": fixmedins_name}
            )
        except ValidationError as exc:
            raise QueryFailedError("the institutions request is not valid") from exc
        return self._call(lambda: self.relay.institutions(self.device_id, request))

    @staticmethod
    def _call(ask: Callable[[], A]) -> A:
        try:
            return ask()
        except (NotConfiguredError, UnreachableError) as exc:
            raise QueryUnavailableError("the national platform is not available") from exc
        except (QueryRefRejectedError, CredentialRejectedError) as exc:
            raise CredentialNotAcceptedError("the credential was not accepted") from exc
        except PersonNotFoundError as exc:
            raise PersonNotInsuredError("no insured person behind this credential") from exc
        except NationalPlatformError as exc:
            raise QueryFailedError("the national platform refused or garbled the query") from exc


@dataclass
class SimulatedNational:
    """The platform, the relay client for the kiosk, and one insured person whose cards the tour places."""

    simulator: NationalPlatformSimulator
    platform: HttpNationalPlatform
    audit: ServerAudit
    client: InProcessRelay
    person: SyntheticPerson
    devices: KioskSimulatorRig

    @property
    def secrets(self) -> tuple[str, ...]:
        return (self.person.certno, self.person.psn_name, self.person.card_no)

    def place_id_card(self) -> None:
        self.devices.id_card.place(self.id_card())

    def place_ss_card(self) -> None:
        self.devices.ss_card.place(self.ss_card())

    def set_reachable(self, reachable: bool) -> None:
        self.simulator.reachable = reachable

    def id_card(self) -> IdCardData:
        p = self.person
        return dataclasses.replace(
            synthetic_card(0), name=p.psn_name, id_number=p.certno, birth_date=p.brdy, sex=Sex(p.gend)
        )

    def ss_card(self) -> SocialSecurityCardData:
        p = self.person
        return dataclasses.replace(
            synthetic_ss_card(0),
            name=p.psn_name,
            ss_number=p.certno,
            card_number=p.card_no,
            card_identification_code=p.card_sn,
            birth_date=p.brdy,
            sex=Sex(p.gend),
        )

    def close(self) -> None:
        self.platform.close()
        self.audit.close()


def start_simulated_national(devices: KioskSimulatorRig, clock: Clock, workdir: Path) -> SimulatedNational:
    simulator = NationalPlatformSimulator(clock, people=12, seed=8)
    key = SM2PrivateKey.generate()
    paas_secret = secrets.token_urlsafe(16)
    simulator.register_institution(
        PHARMACY_CODE, PHARMACY, key.public_key, paasid="paas-kiosk-sim", paas_secret=paas_secret
    )

    def gateway(request: httpx.Request) -> httpx.Response:
        if request.url.path != SERVICE_PATH or not simulator.reachable:
            return httpx.Response(503, json={"infcode": -1, "err_msg": "service unavailable"})
        status, answer = simulator.handle(dict(request.headers), request.content)
        return httpx.Response(status, json=answer)

    settings = NationalPlatformSettings.model_validate(
        {
            "base_url": BASE_URL,
            "paasid": "paas-kiosk-sim",
            "paas_secret": paas_secret,
            "fixmedins_code": PHARMACY_CODE,
            "fixmedins_name": PHARMACY,
            "mdtrtarea_admvs": simulator.admdvs,
            "opter": "kiosk01",
            "opter_name": "自助终端",
            "opter_type": "2",
            "platform_public_key_hex": simulator.public_key.hex(),
        }
    )
    http = httpx.Client(base_url=BASE_URL, transport=httpx.MockTransport(gateway))
    platform = HttpNationalPlatform(settings, key, clock=clock, client=http)
    audit = ServerAudit(workdir / "national-relay", clock)
    relay = NationalRelay(platform, secret=secrets.token_bytes(32), clock=clock, audit=audit, ref_ttl_s=600)
    person = next(
        p
        for p in simulator.people
        if p.enrolment.insutype == INSUTYPE_EMPLOYEE and len(p.settlements) > 3 and p.credits and p.contributions
    )
    return SimulatedNational(simulator, platform, audit, InProcessRelay(relay, DEVICE_ID), person, devices)
