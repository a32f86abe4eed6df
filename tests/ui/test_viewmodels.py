"""The kiosk's view-models without Kivy: navigation, the idle timeout that clears personal data, care mode and voice,
error recovery, identity attempts (masked results, live face guidance, late results dropped), paging, maintenance."""

from __future__ import annotations

import pytest

from tests.terminal.conftest import FakeClock
from tests.ui.fakes import FakeIdentity, FakeMaintenance, FakeQueries
from ui.i18n import text
from ui.viewmodels.base import inline_runner
from ui.viewmodels.identity import Phase, offers_non_face
from ui.viewmodels.kiosk import ERROR_RECOVERY_S, IDLE_TIMEOUT_CARE_S, IDLE_TIMEOUT_S, ScreenName
from ui.viewmodels.models import KioskModels, build_models
from ui.viewmodels.ports import Guidance, IdentityOutcome, Method, QueryKind
from ui.voice import RecordingSpeaker


def models(
    clock: FakeClock, identity: FakeIdentity | None = None, speaker: RecordingSpeaker | None = None
) -> KioskModels:
    return build_models(
        clock,
        identity=identity or FakeIdentity(),
        queries=FakeQueries(),
        maintenance=FakeMaintenance(),
        speaker=speaker,
        runner=inline_runner,
    )


def screen(m: KioskModels) -> ScreenName:
    """The screen showing now (a call, so the type checker does not narrow it across intents)."""
    return m.kiosk.state.screen


def test_a_qr_check_shows_only_masked_values_and_lands_on_the_result() -> None:
    m = models(FakeClock())
    m.identity.open()
    assert screen(m) is ScreenName.IDENTITY
    m.identity.choose(Method.QR)
    state = m.identity.state
    assert screen(m) is ScreenName.RESULT
    assert (state.phase, state.ok) == (Phase.RESULT, True)
    assert state.result_lines[0] == text("result.name", name="张*")
    assert "110***********1234" in state.result_lines[1]


def test_idle_timeout_returns_to_the_start_and_forgets_the_person() -> None:
    clock = FakeClock()
    m = models(clock)
    m.identity.open()
    m.identity.choose(Method.ID_CARD)
    clock.advance(IDLE_TIMEOUT_S - 9)
    m.tick()
    assert m.kiosk.state.idle_warning == text("common.idle_warning", seconds=9)
    assert screen(m) is ScreenName.RESULT
    clock.advance(10)
    m.tick()
    assert screen(m) is ScreenName.ATTRACT
    assert m.identity.state.result_lines == ()
    assert m.identity.state.ok is None
    assert m.kiosk.state.idle_warning == ""


def test_a_touch_restarts_the_idle_clock_and_care_mode_waits_longer() -> None:
    clock = FakeClock()
    m = models(clock)
    m.kiosk.set_care_mode(True)
    m.identity.open()
    clock.advance(IDLE_TIMEOUT_S + 1)
    m.tick()
    assert screen(m) is ScreenName.IDENTITY  # care mode: twice the time
    clock.advance(IDLE_TIMEOUT_CARE_S - IDLE_TIMEOUT_S - 5)
    m.kiosk.touch()
    clock.advance(IDLE_TIMEOUT_CARE_S - 1)
    m.tick()
    assert screen(m) is ScreenName.IDENTITY
    clock.advance(2)
    m.tick()
    assert screen(m) is ScreenName.ATTRACT


def test_the_attract_screen_never_times_out() -> None:
    clock = FakeClock()
    m = models(clock)
    clock.advance(10 * IDLE_TIMEOUT_CARE_S)
    m.tick()
    assert screen(m) is ScreenName.ATTRACT


def test_a_result_arriving_after_the_citizen_left_is_dropped() -> None:
    clock = FakeClock()
    identity = FakeIdentity()
    m = models(clock, identity)
    identity.before_answer = m.kiosk.home  # the idle timeout fires while the reader is still waiting
    m.identity.open()
    m.identity.choose(Method.ID_CARD)
    assert screen(m) is ScreenName.ATTRACT
    assert m.identity.state.result_lines == ()


def test_face_guidance_is_shown_live_and_spoken_once_in_care_mode() -> None:
    challenge = Guidance("请慢慢向左转头", "Please turn your head slowly to the left", is_challenge=True)
    identity = FakeIdentity(guidance=(challenge, challenge, challenge))
    seen: list[str] = []
    speaker = RecordingSpeaker()
    m = models(FakeClock(), identity, speaker)
    m.kiosk.set_care_mode(True)
    m.identity.subscribe(lambda s: seen.append(s.guidance))
    m.identity.open()
    m.identity.choose(Method.FACE)
    assert "请慢慢向左转头" in seen
    assert speaker.phrases.count("请慢慢向左转头") == 1
    assert speaker.phrases[:2] == [text("voice.identity"), text("voice.face")]
    assert speaker.phrases[-1] == text("voice.ok")


def test_no_voice_outside_care_mode() -> None:
    speaker = RecordingSpeaker()
    m = models(FakeClock(), speaker=speaker)
    m.identity.open()
    m.identity.choose(Method.QR)
    assert speaker.phrases == []


def test_a_refusal_is_stated_in_words() -> None:
    identity = FakeIdentity(outcome=IdentityOutcome(False, reason="reason.code_expired"))
    m = models(FakeClock(), identity)
    m.identity.open()
    m.identity.choose(Method.QR)
    assert m.identity.state.ok is False
    assert m.identity.state.title == text("result.fail.title")
    assert m.identity.state.result_lines == (text("reason.code_expired"),)


@pytest.mark.parametrize("methods", [frozenset(), frozenset({Method.FACE}), frozenset({Method.QR})])
def test_non_face_methods_are_always_offered_and_missing_devices_are_disabled(methods: frozenset[Method]) -> None:
    identity = FakeIdentity(methods=methods)
    m = models(FakeClock(), identity)
    m.identity.open()
    state = m.identity.state
    assert offers_non_face(state)
    assert [c.method for c in state.choices] == [Method.QR, Method.FACE, Method.ID_CARD, Method.SS_CARD]
    for choice in state.choices:
        assert choice.enabled == (choice.method in methods)
        if not choice.enabled:
            assert choice.label.endswith(text("identity.unavailable"))
    m.identity.choose(Method.SS_CARD)  # a disabled method does nothing
    assert identity.calls == ([Method.SS_CARD] if Method.SS_CARD in methods else [])


def test_a_failing_port_shows_the_calm_error_screen_which_recovers_by_itself() -> None:
    clock = FakeClock()
    identity = FakeIdentity()

    def explode() -> None:
        raise OSError("reader exploded")

    identity.before_answer = explode
    m = models(clock, identity)
    m.identity.open()
    m.identity.choose(Method.QR)
    assert screen(m) is ScreenName.ERROR
    assert m.kiosk.state.error_text == text("error.body")
    assert "exploded" not in m.kiosk.state.error_text
    clock.advance(ERROR_RECOVERY_S)
    m.tick()
    assert screen(m) is ScreenName.ATTRACT


def test_waiting_shows_elapsed_time_against_an_estimate() -> None:
    clock = FakeClock()
    identity = FakeIdentity()
    m = models(clock, identity)
    progress: list[str] = []

    def wait_a_while() -> None:
        clock.advance(3)
        m.identity.tick()
        progress.append(m.identity.state.progress)

    identity.before_answer = wait_a_while
    m.identity.open()
    m.identity.choose(Method.QR)
    assert progress == [text("common.elapsed", elapsed=3, eta=10)]


def test_the_paged_list_shows_fewer_larger_rows_in_care_mode() -> None:
    m = models(FakeClock())
    m.queries.open(QueryKind.DRUGS, "阿莫西林")
    state = m.queries.state
    assert (len(state.rows), state.page, state.pages, state.has_prev, state.has_next) == (5, 0, 3, False, True)
    m.queries.next_page()
    m.queries.next_page()
    m.queries.next_page()  # past the end: stays on the last page
    assert (m.queries.state.page, len(m.queries.state.rows), m.queries.state.has_next) == (2, 1, False)
    m.kiosk.set_care_mode(True)
    m.queries.repage()
    assert (len(m.queries.state.rows), m.queries.state.pages) == (3, 4)
    assert m.queries.state.page_label == text("common.page", page=1, pages=4)


def test_an_empty_search_asks_what_to_look_for() -> None:
    m = models(FakeClock())
    m.queries.open("drugs")
    assert screen(m) is ScreenName.QUERY_LIST
    assert m.queries.state.message == text("queries.needle_hint")
    assert m.queries.state.rows == ()


def test_maintenance_needs_the_admin_credential_and_speaks_english() -> None:
    m = models(FakeClock())
    m.maintenance.open()
    assert screen(m) is ScreenName.MAINTENANCE_LOGIN
    assert m.kiosk.state.locale.value == "en"
    m.maintenance.sign_in("guess")
    assert m.maintenance.state.message == "Wrong password"
    assert screen(m) is ScreenName.MAINTENANCE_LOGIN
    m.maintenance.sign_in("s3cret-admin")
    state = m.maintenance.state
    assert screen(m) is ScreenName.MAINTENANCE
    assert "Network: offline" in state.lines
    assert "Outbox: 12 record(s), oldest 5 min" in state.lines
    assert "Last sync: never" in state.lines
    assert "id_card_reader: UNAVAILABLE — no such port" in state.peripherals
    assert "qr_scanner: OK" in state.peripherals
    m.maintenance.sign_out()
    assert (screen(m), m.maintenance.state.signed_in) == (ScreenName.ATTRACT, False)


def test_a_register_request_opens_the_pos_screen_then_clears_itself() -> None:
    clock = FakeClock()
    speaker = RecordingSpeaker()
    m = models(clock, speaker=speaker)
    m.kiosk.set_care_mode(True)
    m.pos.started()
    assert screen(m) is ScreenName.POS
    assert m.pos.state.instruction == text("pos.waiting")
    m.pos.instruct("请出示医保电子凭证", "Please show your medical-insurance code")
    m.pos.instruct("请出示医保电子凭证", "Please show your medical-insurance code")
    assert m.pos.state.instruction == "请出示医保电子凭证"
    assert speaker.phrases == [text("voice.pos"), "请出示医保电子凭证"]
    clock.advance(4)
    m.tick()
    assert m.pos.state.progress == text("common.elapsed", elapsed=4, eta=15)
    m.pos.finished(True, "诸**", "1101**********5203", None)
    assert (m.pos.state.done, m.pos.state.ok, m.pos.state.title) == (True, True, text("pos.ok"))
    assert "1101**********5203" in m.pos.state.result_lines[1]
    clock.advance(7)
    m.tick()
    assert screen(m) is ScreenName.POS
    clock.advance(1)
    m.tick()
    assert screen(m) is ScreenName.ATTRACT
    assert m.pos.state.result_lines == ()


def test_a_register_outcome_left_behind_never_sends_a_later_screen_home() -> None:
    # Someone moved on from the POS outcome (here the staff menu) before it was cleared: the outcome is forgotten
    # at the next tick, and what is on screen now is not sent back to the start when the outcome's time runs out.
    clock = FakeClock()
    m = models(clock)
    m.pos.started()
    m.pos.finished(True, "诸**", "1101**********5203", None)
    m.kiosk.go(ScreenName.MAINTENANCE_LOGIN)
    m.tick()
    assert (m.pos.state.done, m.pos.state.result_lines) == (False, ())
    clock.advance(30)
    m.tick()
    assert screen(m) is ScreenName.MAINTENANCE_LOGIN


def test_a_refused_register_request_says_why_in_words() -> None:
    m = models(FakeClock())
    m.pos.started()
    m.pos.finished(False, None, None, "offline")
    assert m.pos.state.title == text("pos.fail")
    assert m.pos.state.result_lines == (text("pos.refused", reason="offline"),)


def test_a_register_request_that_never_reports_back_still_leaves_the_screen() -> None:
    clock = FakeClock()
    m = models(clock)
    m.pos.started(proxy=True)
    assert m.pos.state.step == text("proxy.step_beneficiary")
    clock.advance(119)
    m.tick()
    assert screen(m) is ScreenName.POS
    clock.advance(1)
    m.tick()
    assert screen(m) is ScreenName.ATTRACT
