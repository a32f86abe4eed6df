"""This terminal's binding to an institution (I-01, I-02): the applying side and the decisions it receives.

Owns:

* `BindingStore`, a small JSON file with the terminal's binding status (`unbound` / `pending` / `bound`), the
  institution's code and name, the last reason and the contact unbound staff should call — what the kiosk UI shows
  (I-02). Written atomically (temp file + rename), so a crash leaves the old or the new status, never half;
* `BindingDecisionHandler` and `UnbindHandler`, the `CommandHandler`s of `binding_decision` and `unbind`
  (`terminal.commands` calls them once per command id; applying one twice would be harmless anyway: both set a
  state, they do not toggle one); `unbind` also runs the `on_unbind` hook, with which the runtime purges the
  pharmacists' face templates (`terminal.pharmacists`, docs/pharmacists.md);
* `binding_application_record` and `apply_for_binding`, which build the signed `binding_application` record from the
  institution head's `FaceDecision` and how they were identified, and hand it to `TerminalRuntime.record_signed`.

It must never store or log personal data: the applicant is a pseudonymous reference plus a masked name, the face is
the decision's template hash.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from pydantic import JsonValue

from protocol import CommandKind, CommandOutcome, DeviceCommand, Envelope, SignedRecordKind
from protocol.binding import ApplicantVerification, BindingApplicationRecord
from protocol.downlink import BindingDecisionArgs, UnbindArgs, parse_command_args
from terminal.commands import CommandHandler, HandlerOutcome
from terminal.errors import TerminalError
from terminal.verification import FaceDecision, FaceOutcome

logger = logging.getLogger(__name__)


class BindingError(TerminalError):
    """The binding status cannot be read or written, or an application cannot be made."""


class BindingState(StrEnum):
    UNBOUND = "unbound"
    PENDING = "pending"
    BOUND = "bound"


@dataclass(frozen=True, slots=True)
class BindingStatus:
    """What the kiosk shows staff about this terminal's binding (no personal data)."""

    state: BindingState = BindingState.UNBOUND
    institution_code: str | None = None
    institution_name: str | None = None
    reason: str | None = None
    """The last decision's reason (a rejection's is worth showing)."""
    contact: str | None = None
    """Whom unbound staff should contact to get the terminal bound."""
    application_id: int | None = None
    updated_at: str | None = None


class BindingStore:
    """The binding status in one JSON file; readers get the last status written."""

    def __init__(self, path: Path) -> None:
        self._path = path

    def load(self) -> BindingStatus:
        try:
            raw = json.loads(self._path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return BindingStatus()
        except (OSError, ValueError) as exc:
            raise BindingError(f"cannot read the binding status {self._path}: {type(exc).__name__}") from exc
        try:
            return BindingStatus(**{**raw, "state": BindingState(raw["state"])})
        except (KeyError, TypeError, ValueError) as exc:
            raise BindingError(f"the binding status {self._path} is malformed") from exc

    def save(self, status: BindingStatus) -> None:
        tmp = self._path.with_suffix(".tmp")
        try:
            self._path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(asdict(status), ensure_ascii=False), encoding="utf-8")
            tmp.replace(self._path)
        except OSError as exc:
            raise BindingError(f"cannot write the binding status {self._path}: {type(exc).__name__}") from exc


@dataclass(frozen=True, slots=True)
class BindingDecisionHandler:
    """`binding_decision`: approved -> bound to the named institution; rejected -> unbound with the reason."""

    store: BindingStore
    now: Callable[[], datetime]

    def __call__(self, command: DeviceCommand) -> HandlerOutcome:
        args = parse_command_args(command.kind, command.args)
        if not isinstance(args, BindingDecisionArgs):  # the applier checked the kind; this narrows the type
            return HandlerOutcome(CommandOutcome.REJECTED, "not a binding decision")
        if args.approved:
            status = BindingStatus(
                BindingState.BOUND,
                args.institution_code,
                args.institution_name,
                args.reason,
                args.contact,
                args.application_id,
                self.now().isoformat(),
            )
        else:
            current = self.store.load()
            if current.state is BindingState.BOUND:
                # A late rejection of an older application must not undo a binding approved since.
                return HandlerOutcome(CommandOutcome.APPLIED, "rejection noted; terminal stays bound")
            status = BindingStatus(
                BindingState.UNBOUND,
                None,
                None,
                args.reason,
                args.contact,
                args.application_id,
                self.now().isoformat(),
            )
        self.store.save(status)
        logger.info("binding status now %s (application %d)", status.state.value, args.application_id)
        return HandlerOutcome(CommandOutcome.APPLIED, f"binding {status.state.value}")


@dataclass(frozen=True, slots=True)
class UnbindHandler:
    """`unbind`: the terminal is no longer bound; staff see the reason and the contact. `on_unbind` then removes
    what belonged to the institution (the pharmacists' face templates, `terminal.pharmacists`); it returns how many
    templates it purged and must be idempotent (a crash before the answer is committed repeats it)."""

    store: BindingStore
    now: Callable[[], datetime]
    on_unbind: Callable[[], int] | None = None

    def __call__(self, command: DeviceCommand) -> HandlerOutcome:
        args = parse_command_args(command.kind, command.args)
        if not isinstance(args, UnbindArgs):
            return HandlerOutcome(CommandOutcome.REJECTED, "not an unbind command")
        status = BindingStatus(BindingState.UNBOUND, reason=args.reason, contact=args.contact)
        self.store.save(replace(status, updated_at=self.now().isoformat()))
        logger.info("binding status now unbound")
        if self.on_unbind is not None:
            purged = self.on_unbind()
            return HandlerOutcome(CommandOutcome.APPLIED, f"binding unbound; {purged} face template(s) purged")
        return HandlerOutcome(CommandOutcome.APPLIED, "binding unbound")


def binding_application_record(
    decision: FaceDecision,
    *,
    verification: ApplicantVerification,
    institution_code: str,
    applicant_masked: str | None,
    reason: str,
    applied_at: datetime,
) -> dict[str, Any]:
    """The record to sign: only an accepted face decision with a subject may apply (`BindingError` otherwise)."""
    if decision.outcome is not FaceOutcome.ACCEPTED or decision.subject_ref is None:
        raise BindingError("the institution head's face verification was not accepted")
    record = BindingApplicationRecord(
        institution_code=institution_code,
        applicant_ref=decision.subject_ref,
        applicant_masked=applicant_masked,
        verification=verification,
        face_template_hash=decision.template_hash,
        face_decision=decision.outcome.value,
        reason=reason,
        applied_at=applied_at,
    )
    return record.to_record()


def apply_for_binding(
    record_signed: Callable[[SignedRecordKind, dict[str, JsonValue]], Envelope],
    store: BindingStore,
    record: dict[str, Any],
    *,
    now: datetime,
) -> Envelope:
    """Sign and queue the application (`TerminalRuntime.record_signed`); the terminal shows 'pending' until the
    server's decision arrives. A bound terminal must be unbound first (docs/binding.md)."""
    current = store.load()
    if current.state is BindingState.BOUND:
        raise BindingError("this terminal is bound already; it must be unbound before applying again")
    envelope = record_signed(SignedRecordKind.BINDING_APPLICATION, record)
    store.save(
        BindingStatus(
            BindingState.PENDING,
            institution_code=str(record["institution_code"]),
            contact=current.contact,
            updated_at=now.isoformat(),
        )
    )
    return envelope


def binding_handlers(
    store: BindingStore, now: Callable[[], datetime], *, on_unbind: Callable[[], int] | None = None
) -> dict[CommandKind, CommandHandler]:
    """The handlers to pass to `terminal.commands.default_handlers(..., extra=...)`; `on_unbind` purges what belonged
    to the institution when `unbind` is carried out."""
    return {
        CommandKind.BINDING_DECISION: BindingDecisionHandler(store, now),
        CommandKind.UNBIND: UnbindHandler(store, now, on_unbind),
    }
