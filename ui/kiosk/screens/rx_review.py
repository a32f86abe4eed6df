"""One prescription under review, in three steps: the drugs, the drug-rule warnings (each acknowledged in words;
a blocking rule said plainly), the decision with its reason; then confirmed by the pharmacist's face."""

from __future__ import annotations

from typing import TYPE_CHECKING

from kivy.metrics import dp
from kivy.uix.boxlayout import BoxLayout
from kivy.uix.widget import Widget

from ui.i18n import text
from ui.kiosk.screens.base import KioskScreen
from ui.kiosk.widgets import HintLabel, KioskButton, KioskLabel, Panel, StatusLabel
from ui.viewmodels.review import ReviewState, ReviewStep
from ui.viewmodels.staff_ports import Verdict

if TYPE_CHECKING:
    from ui.kiosk.app import KioskApp
    from ui.viewmodels.review import ReviewViewModel

VERDICTS = (Verdict.APPROVED, Verdict.REJECTED, Verdict.RETURNED)


class RxReviewScreen(KioskScreen):
    def attach(self, app: KioskApp) -> None:
        self._app = app
        staff = app.models.staff
        if staff is not None:
            self.follow(app, staff.review)

    def render(self, state: ReviewState) -> None:
        super().render(state)
        staff = self._app.models.staff
        if staff is None or state.summary is None:
            return
        body = self.ids.body
        body.clear_widgets()
        review = staff.review
        if state.step is ReviewStep.LINES:
            self._lines(body, state)
        elif state.step is ReviewStep.FINDINGS:
            self._findings(body, state, review)
        else:
            self._decide(body, state, review)
        body.add_widget(Widget())  # takes the space left, so the content starts at the top

    def _panel(self) -> Panel:
        theme = self._app.theme
        panel = Panel(
            orientation="vertical",
            size_hint_y=None,
            padding=(dp(16), dp(6)),
            spacing=theme.spacing / 3,
            bg_color=theme.surface,
        )
        panel.bind(minimum_height=panel.setter("height"))
        return panel

    def _lines(self, body: BoxLayout, state: ReviewState) -> None:
        for line in state.lines:
            panel = self._panel()
            panel.add_widget(KioskLabel(text=line.title, bold=True))
            panel.add_widget(HintLabel(text=line.detail, halign="left"))
            body.add_widget(panel)

    def _findings(self, body: BoxLayout, state: ReviewState, review: ReviewViewModel) -> None:
        if not state.findings:
            body.add_widget(KioskLabel(text=text("staff.rx.no_findings")))
        for view in state.findings:
            panel = self._panel()
            panel.add_widget(KioskLabel(text=view.label, bold=True))
            row = BoxLayout(orientation="horizontal", size_hint_y=None, spacing=self._app.theme.spacing)
            status = "danger" if view.finding.blocks or not view.acknowledged else "ok"
            mark = "√ " if view.acknowledged else "! "
            row.add_widget(StatusLabel(text=mark + view.status, status=status))
            if not view.finding.blocks and not view.acknowledged:
                ack = KioskButton(text=text("staff.rx.acknowledge"), size_hint_x=0.35)
                ack.bind(on_release=lambda _b, rule=view.finding.rule_id: review.acknowledge(rule))
                row.add_widget(ack)
            row.bind(minimum_height=row.setter("height"))
            panel.add_widget(row)
            body.add_widget(panel)

    def _decide(self, body: BoxLayout, state: ReviewState, review: ReviewViewModel) -> None:
        spacing = self._app.theme.spacing
        verdicts = BoxLayout(orientation="horizontal", size_hint_y=None, spacing=spacing)
        for verdict in VERDICTS:
            chosen = state.verdict is verdict
            label = ("√ " if chosen else "") + text(f"staff.verdict.{verdict.value}")
            button = KioskButton(
                text=label,
                secondary=not chosen,
                disabled=verdict is Verdict.APPROVED and not state.can_approve,
            )
            button.bind(on_release=lambda _b, v=verdict: review.choose(v))
            verdicts.add_widget(button)
        verdicts.bind(minimum_height=verdicts.setter("height"))
        body.add_widget(verdicts)
        if not state.reason_choices:
            return
        body.add_widget(KioskLabel(text=text("staff.rx.choose_reason")))
        reasons = BoxLayout(orientation="horizontal", size_hint_y=None, spacing=spacing)
        for key in state.reason_choices:
            chosen = state.reason == key
            button = KioskButton(text=("√ " if chosen else "") + text(key), secondary=not chosen)
            button.bind(on_release=lambda _b, k=key: review.choose_reason(k))
            reasons.add_widget(button)
        reasons.bind(minimum_height=reasons.setter("height"))
        body.add_widget(reasons)
