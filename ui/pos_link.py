"""The kiosk in the loop of the local POS API (`terminal.pos_api`): a register's verification request shows on the
kiosk's POS screen (`ui.viewmodels.pos`).

Owns `KioskBuyerVerifier`, a `BuyerVerifier` around the runtime's. Kept apart from `ui.services` because importing
`terminal.pos_api` loads FastAPI/uvicorn, which only terminals with `[pos_api] enabled` need. It must never import
Kivy or pass an unmasked value to the screen, and must never use the face verifier without `ui.services.face_lock`
(the kiosk's own face check may be running on another thread).
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext

from terminal.pos_api import AgentCheck, BuyerCheck, BuyerMethod, BuyerVerifier
from terminal.verification import FaceVerifier, Prompt
from ui.services import face_lock
from ui.viewmodels.pos import PosViewModel


class KioskBuyerVerifier:
    """`terminal.pos_api.BuyerVerifier` that shows a POS-initiated verification on the kiosk: the POS screen opens
    when the register's request starts, follows the verifier's instructions (its `show` is `PosViewModel.instruct`)
    and shows the masked outcome when it ends."""

    def __init__(self, inner: BuyerVerifier, screen: PosViewModel, *, face: FaceVerifier | None = None) -> None:
        self.inner = inner
        self.screen = screen
        self.face = face
        self._beneficiary: dict[str, str | None] = {}

    def verify_buyer(self, method: BuyerMethod, cancel: threading.Event, *, with_face: bool = True) -> BuyerCheck:
        # The POS service asks without the buyer's face exactly for a proxy purchase: the agent's face follows
        proxy = not with_face
        self.screen.started(proxy=proxy)
        check = BuyerCheck(None, method.value, "internal_error")
        try:
            # With the buyer's face the inner verifier uses the shared FaceVerifier: serialise it with the kiosk's
            with self._face_in_use() if with_face else nullcontext():
                check = self.inner.verify_buyer(method, cancel, with_face=with_face)
        finally:
            masked = check.identity.masked() if check.identity is not None else {}
            if proxy and check.verified:
                self._beneficiary = masked
                self.screen.agent_step(masked.get("psn_name"))
            else:
                self.screen.finished(check.verified, masked.get("psn_name"), masked.get("certno"), check.reason)
        return check

    def verify_agent_face(self, candidate_refs: Sequence[str], cancel: threading.Event) -> AgentCheck:
        beneficiary, self._beneficiary = self._beneficiary, {}
        result = AgentCheck(None, "face_1toN", "internal_error")
        face = self.face
        try:
            with self._face_in_use():
                previous = face.prompt if face is not None else None
                if face is not None and previous is not None:

                    def prompt(p: Prompt) -> None:
                        self.screen.instruct(p.zh, p.en)  # the live challenge, as on the citizen's own face screen
                        previous(p)

                    face.prompt = prompt
                try:
                    result = self.inner.verify_agent_face(candidate_refs, cancel)
                finally:
                    if face is not None and previous is not None:
                        face.prompt = previous
        finally:
            ok = result.agent_ref is not None and result.reason is None
            self.screen.finished(ok, beneficiary.get("psn_name"), beneficiary.get("certno"), result.reason)
        return result

    @contextmanager
    def _face_in_use(self) -> Iterator[None]:
        """Hold the face verifier's lock (`ui.services.face_lock`) while the register's request uses it."""
        if self.face is None:
            yield
            return
        with face_lock(self.face):
            yield
