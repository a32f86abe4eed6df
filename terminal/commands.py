"""Carrying out downlink commands on the terminal: at most once per command id, answered exactly once.

Owns `CommandApplier`, which the downlink receiver hands every `protocol.DeviceCommand` addressed to this device, and
the handler registry (`CommandHandler`, a small Protocol keyed by `protocol.CommandKind`). For each command:

1. already answered (its id is in the outbox's `applied_commands`, which survives restarts)? Not carried out again;
   the stored answer is re-sent instead (`Outbox.resend_command_result`: the same record, so the server stores it once);
2. at or past `expires_at` by our clock? Answered `expired`, not carried out;
3. arguments refused by the kind's closed model? Answered `rejected`, naming the argument;
4. otherwise the kind's handler runs and returns an outcome and the records it produced; those records, the
   `CommandResult` and the remembered id are written in ONE outbox transaction.

Handlers today: `ping` (answers `applied`), `log_request` (queues an audit event summarising the terminal's state:
outbox figures, versions, counts; never personal data) and, on an enrolled device, `rotate_keys` (asks the session
manager for a new session key; repeating it is harmless). Every other kind is answered `rejected` with "not supported
yet" until its issue lands: the device tells the server it cannot do it, rather than pretending.

A handler with an effect outside the outbox (writing a config file, rotating keys) must make that effect idempotent
by command id itself: a crash after the effect but before the outbox commit would otherwise repeat it on redelivery.

It must never carry out a command for another device id, never carry out one id twice, never answer one id twice,
never talk to the network (answers travel through the outbox), and never log argument values or personal data.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import timedelta
from enum import StrEnum
from typing import Final, Protocol

from protocol import (
    AuditEvent,
    AuditOutcome,
    Clock,
    CommandKind,
    CommandOutcome,
    CommandResult,
    ContractError,
    DeviceCommand,
    LogRequestArgs,
    Payload,
    parse_command_args,
)
from terminal.outbox import Outbox, OutboxStats

logger = logging.getLogger(__name__)

NOT_SUPPORTED_YET: Final = "not supported yet"
MAX_DETAIL_CHARS: Final = 200


@dataclass(frozen=True, slots=True)
class HandlerOutcome:
    """What a handler did: the outcome, a short detail (no personal data) and the records to queue with the answer."""

    outcome: CommandOutcome
    detail: str = ""
    records: tuple[Payload, ...] = ()


class CommandHandler(Protocol):
    """Carries out one kind of command. Called on the downlink thread, once per command id at most; `args` has
    already passed the kind's closed model (`protocol.parse_command_args`) when there is one."""

    def __call__(self, command: DeviceCommand) -> HandlerOutcome: ...


def ping(command: DeviceCommand) -> HandlerOutcome:
    """The command path works end to end; nothing else happens."""
    return HandlerOutcome(CommandOutcome.APPLIED, "pong")


def not_supported_yet(command: DeviceCommand) -> HandlerOutcome:
    """For kinds whose issue has not landed: an honest refusal the server records."""
    return HandlerOutcome(CommandOutcome.REJECTED, NOT_SUPPORTED_YET)


@dataclass(frozen=True, slots=True)
class TerminalFacts:
    """What a `log_request` summary may say about the terminal besides the outbox: versions only."""

    software_version: str
    config_version: str


@dataclass(slots=True)
class LogRequestHandler:
    """Queues one `system`/`terminal.state_summary` audit event: outbox figures, versions, recent record counts by
    type. Counts and versions only, so nothing in it can identify a person."""

    outbox: Outbox
    facts: TerminalFacts
    clock: Clock
    stats: Callable[[], OutboxStats] | None = None

    def __call__(self, command: DeviceCommand) -> HandlerOutcome:
        args = parse_command_args(command.kind, command.args)
        window_s = args.window_s if isinstance(args, LogRequestArgs) else LogRequestArgs().window_s
        stats = self.stats() if self.stats is not None else self.outbox.stats()
        recent = self.outbox.created_since(self.clock.now() - timedelta(seconds=window_s))
        detail: dict[str, str | int | float | bool | None] = {
            "command_id": str(command.command_id),
            "window_s": window_s,
            "software_version": self.facts.software_version,
            "config_version": self.facts.config_version,
            "outbox_depth": stats.depth,
            "outbox_unpublished": stats.unpublished,
            "outbox_quarantined": stats.quarantined,
            "outbox_sent_total": stats.sent_total,
            "outbox_acked_total": stats.acked_total,
            "outbox_used_bytes": stats.used_bytes,
            "outbox_capacity_bytes": stats.capacity_bytes,
            "alarms": ",".join(stats.alarms)[:256],
            "commands_answered": self.outbox.answered_commands(),
        }
        for payload_type, count in sorted(recent.items())[:8]:
            detail[f"recent_{payload_type}"[:64]] = count
        summary = AuditEvent(
            category="system", action="terminal.state_summary", outcome=AuditOutcome.INFO, detail=detail
        )
        return HandlerOutcome(CommandOutcome.APPLIED, f"state summary queued ({window_s} s window)", (summary,))


@dataclass(frozen=True, slots=True)
class RotateKeysHandler:
    """`rotate_keys`: the session manager starts a new handshake at once (`SessionManager.request_rotation`)."""

    request_rotation: Callable[[str], None]

    def __call__(self, command: DeviceCommand) -> HandlerOutcome:
        self.request_rotation(f"rotate_keys command {command.command_id}")
        return HandlerOutcome(CommandOutcome.APPLIED, "session key rotation requested")


def default_handlers(
    outbox: Outbox,
    facts: TerminalFacts,
    clock: Clock,
    *,
    request_rotation: Callable[[str], None] | None = None,
    extra: Mapping[CommandKind, CommandHandler] | None = None,
) -> dict[CommandKind, CommandHandler]:
    """The registry of this software: every kind has a handler, even if it is the honest "not supported yet".
    `extra` adds handlers owned elsewhere (`terminal.binding.binding_handlers` for binding_decision and unbind)."""
    handlers: dict[CommandKind, CommandHandler] = dict.fromkeys(CommandKind, not_supported_yet)
    handlers[CommandKind.PING] = ping
    handlers[CommandKind.LOG_REQUEST] = LogRequestHandler(outbox, facts, clock)
    if request_rotation is not None:
        handlers[CommandKind.ROTATE_KEYS] = RotateKeysHandler(request_rotation)
    handlers.update(extra or {})
    return handlers


class Disposition(StrEnum):
    """What `CommandApplier.apply` did with one delivered command."""

    ANSWERED = "answered"
    """First delivery: handled (or refused/expired) and the answer queued."""
    REDELIVERED = "redelivered"
    """Answered before: not carried out again; the stored answer was re-sent if needed."""
    REFUSED = "refused"
    """Not ours (another device id): no answer."""


@dataclass(frozen=True, slots=True)
class CommandStats:
    answered: int
    redelivered: int
    refused: int
    by_outcome: Mapping[str, int]


@dataclass
class _Counts:
    answered: int = 0
    redelivered: int = 0
    refused: int = 0
    by_outcome: dict[str, int] = field(default_factory=dict)


class CommandApplier:
    """Carries out each command id once and answers it once, remembering answers in the outbox file."""

    def __init__(
        self,
        outbox: Outbox,
        *,
        device_id: str,
        clock: Clock,
        handlers: Mapping[CommandKind, CommandHandler],
        on_answered: Callable[[DeviceCommand, CommandOutcome], None] | None = None,
    ) -> None:
        """`on_answered` hears of every first answer (the security log of an enrolled device)."""
        self._outbox = outbox
        self._on_answered = on_answered
        self._device_id = device_id
        self._clock = clock
        self._handlers = dict(handlers)
        self._counts = _Counts()
        self._refusal_logged = False

    def stats(self) -> CommandStats:
        c = self._counts
        return CommandStats(c.answered, c.redelivered, c.refused, dict(c.by_outcome))

    def apply(self, command: DeviceCommand) -> Disposition:
        """Handle one delivered command. Raises `terminal.errors.OutboxError` when the outbox cannot record the
        answer; then nothing is remembered and the server's re-publish brings the command again."""
        if command.device_id != self._device_id:
            self._counts.refused += 1
            if not self._refusal_logged:
                self._refusal_logged = True
                logger.warning("commands: refused command %s addressed to another device", command.command_id)
            return Disposition.REFUSED
        previous = self._outbox.command_answer(command.command_id)
        if previous is not None:
            delivery = self._outbox.resend_command_result(previous.result_seq)
            self._counts.redelivered += 1
            logger.info(
                "commands: %s %s delivered again; answered %s before, not carried out again (answer %s)",
                command.kind.value,
                command.command_id,
                previous.outcome.value,
                delivery.value,
            )
            return Disposition.REDELIVERED
        outcome = self._carry_out(command)
        result = CommandResult(
            command_id=command.command_id,
            outcome=outcome.outcome,
            detail=outcome.detail[:MAX_DETAIL_CHARS],
            applied_at=self._clock.now(),
        )
        self._outbox.answer_command(kind=command.kind.value, result=result, records=outcome.records)
        self._counts.answered += 1
        self._counts.by_outcome[outcome.outcome.value] = self._counts.by_outcome.get(outcome.outcome.value, 0) + 1
        logger.info("commands: %s %s answered %s", command.kind.value, command.command_id, outcome.outcome.value)
        if self._on_answered is not None:
            self._on_answered(command, outcome.outcome)
        return Disposition.ANSWERED

    def _carry_out(self, command: DeviceCommand) -> HandlerOutcome:
        if self._clock.now() >= command.expires_at:
            return HandlerOutcome(CommandOutcome.EXPIRED, "arrived after expires_at")
        try:
            parse_command_args(command.kind, command.args)
        except ContractError as exc:
            return HandlerOutcome(CommandOutcome.REJECTED, str(exc))
        handler = self._handlers.get(command.kind, not_supported_yet)
        try:
            return handler(command)
        except Exception as exc:  # a handler bug must become an answer, not an unanswered command
            logger.exception("commands: the %s handler failed", command.kind.value)
            return HandlerOutcome(CommandOutcome.FAILED, f"handler error: {type(exc).__name__}")
