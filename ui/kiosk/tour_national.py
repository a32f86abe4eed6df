"""The screen tour's part for the personal queries on the national platform (K-11…K-16): the credential choice, a
医保码 the platform refuses, the wait on an ID card, the person and each record list (paged), the social-security
card, and the platform down — each in words on the screen.

Owns the script only; `ui.kiosk.tour.Tour` calls `visit_national` once per mode when its rig brings a simulated
platform (`NationalTourRig`). It never imports `hardware_sim`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from ui.i18n import text
from ui.viewmodels.kiosk import ScreenName
from ui.viewmodels.national import NationalPhase
from ui.viewmodels.ports import Method, NationalKind

if TYPE_CHECKING:
    from ui.kiosk.tour import Tour


class NationalTourRig(Protocol):
    """The simulated national platform and one insured person's cards (built by the composition root)."""

    def place_id_card(self) -> None: ...

    def place_ss_card(self) -> None: ...

    def set_reachable(self, reachable: bool) -> None: ...


def visit_national(tour: Tour, rig: NationalTourRig) -> None:
    m = tour.models
    vm = m.national

    def listed() -> bool:
        return vm.state.phase is NationalPhase.LIST and not vm.state.loading

    # The choice of credential (no face), then a 医保码 the platform does not accept: said in words, choose again
    tour._main(m.queries.open_menu)
    tour._main(lambda: vm.open(NationalKind.PERSON))
    tour.shot("national_id", ScreenName.NATIONAL_ID)
    tour.rig.offer_qr(valid=True, delay_s=0.5)
    tour._main(lambda: vm.choose(Method.QR))
    tour._wait("the refused code in words", lambda: vm.state.phase is NationalPhase.CHOOSE and bool(vm.state.message))
    tour.shot("national_refused", ScreenName.NATIONAL_ID)
    tour._flow("national_qr", "refused" if vm.state.message == text("national.code_expired") else vm.state.message)

    # The ID card: the wait (elapsed against the estimate), then 个人信息 / 参保 / 余额
    tour.rig.remove_cards()
    tour._main(lambda: vm.choose(Method.ID_CARD))
    tour._wait("the wait on the card", lambda: vm.state.phase is NationalPhase.WAITING and bool(vm.state.progress))
    tour.shot("national_wait", ScreenName.NATIONAL_ID)
    rig.place_id_card()
    tour._wait("the person", listed)
    tour.shot("national_person", ScreenName.NATIONAL_LIST)
    tour._flow("national_person", "ok" if vm.state.rows else vm.state.message)

    # Each record list without showing the card again; the settlements paged
    def record_list(kind: NationalKind) -> None:
        tour._main(vm.menu)
        tour._main(lambda: vm.open(kind))
        tour._wait(f"the {kind.value}", lambda: listed() and vm.state.kind is kind)
        tour.shot(f"national_{kind.value}", ScreenName.NATIONAL_LIST)
        tour._flow(f"national_{kind.value}", f"{len(vm.state.rows)} rows, {vm.state.pages} pages")

    for kind in (NationalKind.SETTLEMENTS, NationalKind.CREDITS, NationalKind.CONTRIBUTIONS):
        record_list(kind)
        if kind is NationalKind.SETTLEMENTS and vm.state.has_next:
            tour._main(vm.next_page)
            tour._wait("page 2", lambda: vm.state.page == 1)
    tour._main(vm.finish)
    tour._on(ScreenName.ATTRACT)

    # The social-security card (card number + 卡识别码)
    rig.place_ss_card()
    tour._main(m.queries.open_menu)
    tour._main(lambda: vm.open(NationalKind.PERSON))
    tour._main(lambda: vm.choose(Method.SS_CARD))
    tour._wait("the person by social-security card", listed)
    tour._flow("national_ss_card", "ok" if vm.state.rows else vm.state.message)

    # The platform down: "暂时无法查询，请稍后再试"
    tour._main(m.kiosk.home)
    rig.set_reachable(False)
    try:
        rig.place_id_card()
        tour._main(m.queries.open_menu)
        tour._main(lambda: vm.open(NationalKind.SETTLEMENTS))
        tour._main(lambda: vm.choose(Method.ID_CARD))
        tour._wait("the outage in words", lambda: vm.state.phase is NationalPhase.CHOOSE and bool(vm.state.message))
        tour.shot("national_unavailable", ScreenName.NATIONAL_ID)
        tour._flow("national_unavailable", "said" if vm.state.message == text("national.unavailable") else "other")
    finally:
        rig.set_reachable(True)
    tour._main(m.kiosk.home)
    tour._on(ScreenName.ATTRACT)
