"""Plain-function fakes of the kiosk's ports (the view-models' seams), for the view-model unit tests."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ui.viewmodels.ports import (
    Guidance,
    IdentityOutcome,
    MaintenanceFacts,
    Method,
    PeripheralFact,
    QueryAnswer,
    QueryKind,
    QueryRow,
    VerifiedPerson,
)

PERSON = VerifiedPerson("张*", "110***********1234", Method.QR)


@dataclass
class FakeIdentity:
    methods: frozenset[Method] = frozenset(Method)
    outcome: IdentityOutcome = field(default_factory=lambda: IdentityOutcome(True, PERSON))
    guidance: tuple[Guidance, ...] = ()
    calls: list[Method] = field(default_factory=list)
    before_answer: Callable[[], None] | None = None
    """Runs inside the device call (what happens while the citizen waits: idle timeout, cancel)."""

    def available(self) -> frozenset[Method]:
        return self.methods

    def _answer(self, method: Method) -> IdentityOutcome:
        self.calls.append(method)
        if self.before_answer is not None:
            self.before_answer()
        return self.outcome

    def scan_qr(self, timeout_s: float) -> IdentityOutcome:
        return self._answer(Method.QR)

    def read_id_card(self, timeout_s: float) -> IdentityOutcome:
        return self._answer(Method.ID_CARD)

    def read_ss_card(self, timeout_s: float) -> IdentityOutcome:
        return self._answer(Method.SS_CARD)

    def verify_face(self, guidance: Callable[[Guidance], None]) -> IdentityOutcome:
        for g in self.guidance:
            guidance(g)
        return self._answer(Method.FACE)


@dataclass
class FakeQueries:
    rows: int = 11

    def search(self, kind: QueryKind, needle: str) -> QueryAnswer:
        return QueryAnswer(tuple(QueryRow(f"{needle} {i}", f"detail {i}") for i in range(self.rows)))


@dataclass
class FakeMaintenance:
    password: str = "s3cret-admin"

    def admin_ok(self, credential: str) -> bool:
        return credential == self.password

    def facts(self) -> MaintenanceFacts:
        return MaintenanceFacts(
            device_id="KIOSK-T-01",
            software_version="0.1.0",
            config_version="cfg-7",
            peripherals=(
                PeripheralFact("qr0", "qr_scanner", "ok", "port /dev/x"),
                PeripheralFact("idcard0", "id_card_reader", "unavailable", "no such port"),
            ),
            outbox_depth=12,
            outbox_oldest_age_s=300.0,
            online=False,
            last_sync_age_s=None,
            model_versions={"dlib_resnet_v1": "441d40d3c99b795d"},
        )
