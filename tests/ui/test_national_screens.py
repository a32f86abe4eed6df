"""The personal queries on the national platform in the screen tour under Xvfb (the shared `tour` run): the
national-platform simulator behind the server's real platform client and relay, the kiosk's real card readers and
e-voucher service, every item shown as a large paged list in both modes, and every failure in words."""

from __future__ import annotations

from typing import Any

from tests.ui.conftest import TourRun
from ui.i18n import text
from ui.viewmodels.queries import ROWS_PER_PAGE, ROWS_PER_PAGE_CARE

NATIONAL_SHOTS = (
    "national_id",
    "national_refused",
    "national_wait",
    "national_person",
    "national_settlements",
    "national_credits",
    "national_contributions",
    "national_unavailable",
)


def _shot(tour: TourRun, name: str, mode: str) -> dict[str, Any]:
    return next(s for s in tour.shots(mode) if s["name"] == name)


def _rows_and_pages(flow: str) -> tuple[int, int]:
    rows, pages = flow.replace(" rows,", "").replace(" pages", "").split()
    return int(rows), int(pages)


def test_each_personal_query_ends_as_expected_in_both_modes(tour: TourRun) -> None:
    flows = tour.report["flows"]
    for mode in ("normal", "care"):
        assert flows[f"national_qr-{mode}"] == "refused"  # the e-voucher's token is unknown to this platform
        assert flows[f"national_person-{mode}"] == "ok"
        assert flows[f"national_ss_card-{mode}"] == "ok"
        assert flows[f"national_unavailable-{mode}"] == "said"
    for kind in ("settlements", "credits", "contributions"):
        normal_rows, normal_pages = _rows_and_pages(flows[f"national_{kind}-normal"])
        care_rows, care_pages = _rows_and_pages(flows[f"national_{kind}-care"])
        assert 0 < normal_rows <= ROWS_PER_PAGE, kind
        assert 0 < care_rows <= ROWS_PER_PAGE_CARE, kind
        assert care_pages >= normal_pages, kind
    assert _rows_and_pages(flows["national_credits-care"])[1] > _rows_and_pages(flows["national_credits-normal"])[1]


def test_the_national_screens_meet_the_care_rules_and_show_masked_values(tour: TourRun) -> None:
    for name in NATIONAL_SHOTS:
        assert _shot(tour, name, "care")["violations"] == [], name
    assert tour.report["secrets_shown"] == []  # the insured person's name, ID and card numbers among them
    person = _shot(tour, "national_person", "care")["texts"]
    assert any(t.startswith("姓名：") and "*" in t for t in person)
    assert any(t.startswith("证件号：") and "*" * 10 in t for t in person)
    menu = _shot(tour, "queries", "care")["texts"]
    assert menu.index(text("national.person")) < menu.index(text("queries.drugs"))  # the personal items first


def test_the_wait_and_the_failures_are_said_in_words(tour: TourRun) -> None:
    for mode in ("normal", "care"):
        assert text("national.code_expired") in _shot(tour, "national_refused", mode)["texts"]
        assert text("national.unavailable") in _shot(tour, "national_unavailable", mode)["texts"]
        assert any(t.startswith("已等待") and "预计约" in t for t in _shot(tour, "national_wait", mode)["texts"])
    choice = _shot(tour, "national_id", "care")["texts"]
    assert text("identity.face") not in choice  # a query needs the credential, never the face
    assert text("voice.national") in tour.report["spoken"]
