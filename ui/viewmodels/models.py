"""All the kiosk's view-models built together from the ports, as one typed container the App is given.

Owns the wiring of view-models to the `KioskModel` (navigation, idle timeout, care mode) and to their ports. A new
screen's view-model is added here as a field and built in `build_models`. It must never import Kivy.
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol import Clock
from ui.viewmodels.base import Runner, thread_runner
from ui.viewmodels.identity import IdentityViewModel
from ui.viewmodels.kiosk import KioskModel
from ui.viewmodels.maintenance import MaintenanceViewModel
from ui.viewmodels.national import NationalViewModel, NoNationalQueries
from ui.viewmodels.ports import IdentityPort, MaintenancePort, NationalPort, QueryPort
from ui.viewmodels.pos import PosViewModel
from ui.viewmodels.queries import QueriesViewModel

# staff screens (pharmacist, review, binding)
from ui.viewmodels.staff import StaffModels
from ui.voice import Speaker


@dataclass
class KioskModels:
    kiosk: KioskModel
    identity: IdentityViewModel
    queries: QueriesViewModel
    maintenance: MaintenanceViewModel
    pos: PosViewModel
    # national queries (K-11…K-16)
    national: NationalViewModel
    # staff screens (pharmacist, review, binding)
    staff: StaffModels | None = None

    def tick(self) -> None:
        """Once a second from the UI clock: idle timeout, error recovery, progress lines."""
        self.kiosk.tick()
        self.identity.tick()
        self.pos.tick()
        # staff screens (pharmacist, review, binding)
        if self.staff is not None:
            self.staff.tick()
        # national queries (K-11…K-16)
        self.national.tick()


def build_models(
    clock: Clock,
    *,
    identity: IdentityPort,
    queries: QueryPort,
    maintenance: MaintenancePort,
    speaker: Speaker | None = None,
    runner: Runner = thread_runner,
    # national queries (K-11…K-16)
    national: NationalPort | None = None,
) -> KioskModels:
    kiosk = KioskModel(clock, speaker=speaker)
    return KioskModels(
        kiosk=kiosk,
        identity=IdentityViewModel(kiosk, identity, runner),
        queries=QueriesViewModel(kiosk, queries, runner),
        maintenance=MaintenanceViewModel(kiosk, maintenance),
        pos=PosViewModel(kiosk),
        # national queries (K-11…K-16)
        national=NationalViewModel(kiosk, national if national is not None else NoNationalQueries(), runner),
    )
