"""The screen tour: drives every kiosk flow on (simulated) hardware, screenshots each screen in normal and care
mode, and measures each screen against the care-mode rules.

Owns the script that `yibao kiosk screens` (docs/screens/) and the Xvfb tests run: a director thread walks the
flows through the view-models' intents — exactly what a touch would call — while the rig (the composition root's
simulators) presents codes, cards and a face; every screenshot is taken on the main thread once the screen shows
the expected state, and the widget tree is read for `ui.care.check_widgets`. It returns a JSON-able report.
It never imports `hardware_sim`: the rig comes in through `TourRig`.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Final, Protocol

from kivy.clock import Clock
from kivy.core.window import Window

from ui.care import check_widgets
from ui.i18n import text
from ui.kiosk.app import KioskApp
from ui.kiosk.inspect import widget_facts
from ui.kiosk.tour_national import NationalTourRig, visit_national

# staff screens (pharmacist, review, binding)
from ui.kiosk.tour_staff import visit_staff
from ui.viewmodels.identity import Phase
from ui.viewmodels.kiosk import ScreenName
from ui.viewmodels.models import KioskModels
from ui.viewmodels.ports import Method, QueryKind

logger = logging.getLogger(__name__)

WAIT_S: Final = 60.0
SETTLE_S: Final = 0.4
"""Time for the next frames to draw after a state change (llvmpipe under Xvfb draws a frame in a few ms)."""


class TourError(RuntimeError):
    """A flow did not reach the state the tour waited for."""


class TourRig(Protocol):
    """The simulated surroundings the tour drives (built by the composition root from `hardware_sim`)."""

    @property
    def admin_password(self) -> str: ...

    @property
    def query_needle(self) -> str:
        """A search that finds several pages of catalogue entries."""

    def offer_qr(self, *, valid: bool, delay_s: float) -> None:
        """After `delay_s`, the scanner reads a valid (or a forged) 医保码."""

    def remove_cards(self) -> None: ...

    def place_id_card(self) -> None: ...

    def place_ss_card(self) -> None: ...

    def hold_face_at_challenge(self) -> None:
        """The next liveness challenge waits (the citizen has not moved yet) until `release_face`."""

    def release_face(self) -> None: ...

    # national queries (K-11…K-16)
    @property
    def national(self) -> NationalTourRig | None:
        """The simulated national platform and an insured person's cards; None skips the personal queries."""


@dataclass
class Shot:
    name: str
    mode: str
    screen: str
    png: str
    violations: list[str]
    widgets: int
    texts: list[str]


@dataclass
class TourReport:
    shots: list[Shot] = field(default_factory=list)
    flows: dict[str, str] = field(default_factory=dict)
    error: str = ""
    seconds: float = 0.0

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


class Tour:
    def __init__(
        self,
        app: KioskApp,
        models: KioskModels,
        rig: TourRig,
        out_dir: Path,
        pos: Callable[[], object] | None = None,
        proxy: Callable[[], object] | None = None,
    ) -> None:
        self.pos = pos
        self.proxy = proxy
        self.app = app
        self.models = models
        self.rig = rig
        self.out_dir = out_dir
        self.report = TourReport()
        self.mode = "normal"

    # ------------------------------------------------------------------ helpers (director thread)

    def _main(self, fn: Callable[[], Any]) -> Any:
        """Run an intent on the main thread as a touch would: the touch restarts the idle clock first (the tour
        drives intents, not the touch screen, and a long tour must not run into the idle timeout)."""
        main = self.app.main
        if main is None:
            raise TourError("app not built")

        def touched() -> Any:
            self.models.kiosk.touch()
            return fn()

        return main.call(touched)

    def _wait(self, what: str, predicate: Callable[[], bool], timeout_s: float = WAIT_S) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.05)
        raise TourError(f"timed out waiting for {what}")

    def _on(self, screen: ScreenName) -> None:
        self._wait(f"screen {screen.value}", lambda: self._main(self._current) == screen.value)

    def _current(self) -> str:
        manager = self.app.manager
        return "" if manager is None else str(manager.current)

    def shot(self, name: str, screen: ScreenName) -> Shot:
        self._on(screen)
        time.sleep(SETTLE_S)
        shot: Shot = self._main(lambda: self._capture(name, screen))
        return shot

    def _capture(self, name: str, screen: ScreenName) -> Shot:
        """On the main thread: screenshot the window and read the screen's widgets."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        target = self.out_dir / f"{name}-{self.mode}.png"
        written = Window.screenshot(name=str(self.out_dir / f".{name}-{self.mode}.png"))
        Path(written).replace(target)
        widget = self.app.screen(screen)
        root = self.app.root
        r, g, b, a = (float(c) for c in self.app.theme.background)
        window_bg = (r, g, b, a)
        size = (float(Window.width), float(Window.height))
        facts = [*widget_facts(widget, window_bg, size), *widget_facts(root.ids.banner, window_bg, size)]
        visible = [f for f in facts if f.visible]
        shot = Shot(
            name=name,
            mode=self.mode,
            screen=screen.value,
            png=str(target),
            violations=[str(v) for v in check_widgets(visible)],
            widgets=len(visible),
            texts=[f.text for f in visible if f.text],
        )
        self.report.shots.append(shot)
        return shot

    # ------------------------------------------------------------------ the script

    def run(self) -> TourReport:
        started = time.monotonic()
        try:
            for care in (False, True):
                self.mode = "care" if care else "normal"
                self._main(self.models.kiosk.home)
                self._main(partial(self.models.kiosk.set_care_mode, care))
                self._visit_all()
        except Exception as exc:
            logger.exception("kiosk tour failed")
            self.report.error = f"{type(exc).__name__}: {exc}"
        self.report.seconds = round(time.monotonic() - started, 1)
        return self.report

    def _flow(self, name: str, outcome: str) -> None:
        self.report.flows[f"{name}-{self.mode}"] = outcome

    def _visit_all(self) -> None:
        m = self.models
        self.shot("attract", ScreenName.ATTRACT)

        # Maintenance behind the admin credential: a wrong one is refused in words, the right one opens it
        self._main(m.maintenance.open)
        self._main(lambda: m.maintenance.sign_in("wrong-password"))
        self._wait("refusal", lambda: bool(m.maintenance.state.message))
        self.shot("maintenance_login", ScreenName.MAINTENANCE_LOGIN)
        self._main(lambda: m.maintenance.sign_in(self.rig.admin_password))
        self.shot("maintenance", ScreenName.MAINTENANCE)
        self._flow("maintenance", "signed_in" if m.maintenance.state.signed_in else "refused")
        self._main(m.maintenance.sign_out)

        self._main(m.identity.open)
        self.shot("identity", ScreenName.IDENTITY)

        # 医保码: waiting screen, then the scanner reads a valid code → masked result
        self.rig.offer_qr(valid=True, delay_s=1.5)
        self._main(lambda: m.identity.choose(Method.QR))
        self.shot("scan_qr", ScreenName.SCAN)
        self._result("qr")
        self.shot("result_ok", ScreenName.RESULT)

        # A forged code: the refusal in words
        self._main(m.identity.open)
        self.rig.offer_qr(valid=False, delay_s=0.5)
        self._main(lambda: m.identity.choose(Method.QR))
        self._result("qr_forged")
        self.shot("result_refused", ScreenName.RESULT)

        # ID card and social-security card: waiting with no card, then the card is placed
        for method, place, name in (
            (Method.ID_CARD, self.rig.place_id_card, "id_card"),
            (Method.SS_CARD, self.rig.place_ss_card, "ss_card"),
        ):
            self._main(m.identity.open)
            self.rig.remove_cards()
            self._main(partial(m.identity.choose, method))
            self.shot(f"scan_{name}", ScreenName.SCAN)
            place()
            self._result(name)
            if name == "id_card":
                self.shot("result_card", ScreenName.RESULT)

        # Face: live guidance from the face pipeline (held at the liveness challenge for the screenshot)
        if Method.FACE in m.identity.port.available():
            self._main(m.identity.open)
            self.rig.hold_face_at_challenge()
            self._main(lambda: m.identity.choose(Method.FACE))
            try:
                self._wait("a face challenge", lambda: "头" in m.identity.state.guidance, timeout_s=90)
                self.shot("face", ScreenName.FACE)
            finally:
                self.rig.release_face()
            self._result("face", timeout_s=90)
            self.shot("result_face", ScreenName.RESULT)

        # Queries: the menu, then a large paged list
        self._main(m.queries.open_menu)
        self.shot("queries", ScreenName.QUERIES)
        self._main(lambda: m.queries.open(QueryKind.DRUGS, self.rig.query_needle))
        self._wait("query rows", lambda: not m.queries.state.loading and bool(m.queries.state.rows))
        self.shot("query_list", ScreenName.QUERY_LIST)
        pages = m.queries.state.pages
        self._main(m.queries.next_page)
        self._wait("page 2", lambda: m.queries.state.page == min(1, pages - 1))
        self._flow("query_paging", f"{m.queries.state.page + 1}/{pages}")
        # national queries (K-11…K-16)
        if self.rig.national is not None:
            visit_national(self, self.rig.national)

        # A verification asked by the cash register (what the POS API's worker runs), the buyer shows a 医保码
        if self.pos is not None:
            self._main(m.kiosk.home)
            self.rig.offer_qr(valid=True, delay_s=1.5)
            threading.Thread(target=self.pos, name="tour-pos-request", daemon=True).start()
            self._wait(
                "the POS instruction", lambda: m.pos.state.active and m.pos.state.instruction != text("pos.waiting")
            )
            self.shot("pos", ScreenName.POS)
            self._wait("the POS outcome", lambda: m.pos.state.done)
            self._flow("pos", "ok" if m.pos.state.ok else "refused")
            self.shot("pos_result", ScreenName.POS)

        # A proxy purchase (代购) asked by the register: the beneficiary's code, then the agent's live face
        if self.proxy is not None:
            self._main(m.kiosk.home)
            self.rig.offer_qr(valid=True, delay_s=1.0)
            self.rig.hold_face_at_challenge()
            threading.Thread(target=self.proxy, name="tour-proxy-request", daemon=True).start()
            try:
                self._wait("the proxy purchase's agent step", lambda: "头" in m.pos.state.instruction, timeout_s=90)
                self.shot("proxy_agent", ScreenName.POS)
            finally:
                self.rig.release_face()
            self._wait("the proxy purchase's outcome", lambda: m.pos.state.done, timeout_s=90)
            self._flow("proxy", "ok" if m.pos.state.ok else "refused")

        # staff screens (pharmacist, review, binding)
        visit_staff(self)

        # A crash inside the UI loop: the calm error screen, personal data cleared
        self._main(m.identity.open)

        def explode(_dt: float) -> None:
            raise RuntimeError("tour: a bug in a screen")

        self._main(lambda: Clock.schedule_once(explode, 0))
        self.shot("error", ScreenName.ERROR)
        self._flow(
            "error", "recovered" if m.identity.state.phase is Phase.CHOOSE and not m.identity.state.choices else "kept"
        )
        self._main(m.kiosk.home)
        self._on(ScreenName.ATTRACT)

    def _result(self, name: str, timeout_s: float = WAIT_S) -> None:
        state = self.models.identity
        self._wait(f"{name} result", lambda: state.state.phase is Phase.RESULT, timeout_s)
        self._flow(name, "ok" if state.state.ok else "refused")


def run_tour(
    models: KioskModels,
    rig: TourRig,
    out_dir: Path,
    pos: Callable[[], object] | None = None,
    proxy: Callable[[], object] | None = None,
) -> TourReport:
    """Open the kiosk (windowed), run the tour, close; returns the report. Needs a display (Xvfb in CI). `pos`
    runs one register-initiated verification (blocking), as the POS API's worker would; `proxy` one proxy purchase."""
    report_box: list[TourReport] = []

    def started(app: KioskApp) -> None:
        def direct() -> None:
            tour = Tour(app, models, rig, out_dir, pos, proxy)
            try:
                report_box.append(tour.run())
            finally:
                main = app.main
                if main is not None:
                    main.post(app.stop)

        threading.Thread(target=direct, name="kiosk-tour", daemon=True).start()

    KioskApp(models, on_started=started).run()
    return report_box[0] if report_box else TourReport(error="the kiosk closed before the tour finished")
