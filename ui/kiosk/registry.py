"""Where each screen lives: its module and class, imported (with the .kv beside it) the first time it is shown.

To add a screen: add a `ScreenName` member (`ui.viewmodels.kiosk`), a module `ui/kiosk/screens/<name>.py` with a
`KioskScreen` subclass and `<name>.kv` beside it, and one line here. docs/kiosk.md walks through it.
"""

from __future__ import annotations

from typing import Final

from ui.viewmodels.kiosk import ScreenName

SCREENS: Final[dict[ScreenName, tuple[str, str]]] = {
    ScreenName.ATTRACT: ("ui.kiosk.screens.attract", "AttractScreen"),
    ScreenName.IDENTITY: ("ui.kiosk.screens.identity", "IdentityScreen"),
    ScreenName.SCAN: ("ui.kiosk.screens.scan", "ScanScreen"),
    ScreenName.FACE: ("ui.kiosk.screens.face", "FaceScreen"),
    ScreenName.RESULT: ("ui.kiosk.screens.result", "ResultScreen"),
    ScreenName.QUERIES: ("ui.kiosk.screens.queries", "QueriesScreen"),
    ScreenName.QUERY_LIST: ("ui.kiosk.screens.query_list", "QueryListScreen"),
    ScreenName.MAINTENANCE_LOGIN: ("ui.kiosk.screens.maintenance_login", "MaintenanceLoginScreen"),
    ScreenName.MAINTENANCE: ("ui.kiosk.screens.maintenance", "MaintenanceScreen"),
    ScreenName.POS: ("ui.kiosk.screens.pos", "PosScreen"),
    ScreenName.ERROR: ("ui.kiosk.screens.error", "ErrorScreen"),
    # staff screens (pharmacist, review, binding)
    ScreenName.STAFF: ("ui.kiosk.screens.staff_menu", "StaffMenuScreen"),
    ScreenName.STAFF_WAIT: ("ui.kiosk.screens.staff_wait", "StaffWaitScreen"),
    ScreenName.STAFF_RESULT: ("ui.kiosk.screens.staff_result", "StaffResultScreen"),
    ScreenName.ATTENDANCE: ("ui.kiosk.screens.attendance", "AttendanceScreen"),
    ScreenName.RX_LIST: ("ui.kiosk.screens.rx_list", "RxListScreen"),
    ScreenName.RX_REVIEW: ("ui.kiosk.screens.rx_review", "RxReviewScreen"),
    ScreenName.BINDING: ("ui.kiosk.screens.binding", "BindingScreen"),
    # national queries (K-11…K-16)
    ScreenName.NATIONAL_ID: ("ui.kiosk.screens.national_id", "NationalIdScreen"),
    ScreenName.NATIONAL_LIST: ("ui.kiosk.screens.national_list", "NationalListScreen"),
    # pharmacist face enrolment and re-verification
    ScreenName.ENROL_LIST: ("ui.kiosk.screens.enrol_list", "EnrolListScreen"),
    ScreenName.ENROL_CONSENT: ("ui.kiosk.screens.enrol_consent", "EnrolConsentScreen"),
    ScreenName.REVERIFY: ("ui.kiosk.screens.reverify", "ReverifyScreen"),
}
