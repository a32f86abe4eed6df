"""The presence sweeper: marks devices offline when their heartbeat times out, and raises due gap alarms.

Ingest sets `online` when a heartbeat or an 'online' status arrives; nothing arrives when a terminal silently dies
behind a broker that still holds its retained 'online' status, so this thread periodically applies the presence
rule (`sync_server.store.is_online`) to the stored flag. For the same reason it raises the `seq_gap` alarm of a
device whose sequence hole outlived `seq_gap_alarm_after_s` while the device sent nothing more (ingest raises and
clears it when batches arrive). It owns only those two time-based transitions. It must never change anything else
about a device, and it logs a database outage once and the recovery once.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from protocol import Clock, SystemClock
from sync_server.db.engine import session_factory
from sync_server.store import log_seq_gap_changes, raise_due_gap_alarms, sweep_offline

logger = logging.getLogger(__name__)

MAX_IDS_IN_LOG = 10


class PresenceSweeper:
    """Runs `sweep_once()` every `interval_s` seconds on its own thread between `start()` and `stop()`."""

    def __init__(
        self,
        engine: Engine,
        *,
        interval_s: float,
        clock: Clock | None = None,
        gap_alarm_after_s: float | None = None,
    ) -> None:
        self._sessions = session_factory(engine, write_intent=True)
        self._interval_s = interval_s
        self._gap_alarm_after_s = gap_alarm_after_s
        self._clock: Clock = clock if clock is not None else SystemClock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._failing = False

    def sweep_once(self) -> list[str]:
        """Mark timed-out devices offline now (returns their ids) and raise due gap alarms. Raises SQLAlchemyError
        on database failure."""
        now = self._clock.now()
        with self._sessions.begin() as session:
            ids = sweep_offline(session, now=now)
            raised = (
                raise_due_gap_alarms(session, now=now, gap_alarm_after_s=self._gap_alarm_after_s)
                if self._gap_alarm_after_s is not None
                else []
            )
        log_seq_gap_changes(raised)
        if ids:
            shown = ", ".join(ids[:MAX_IDS_IN_LOG]) + (" …" if len(ids) > MAX_IDS_IN_LOG else "")
            logger.info("%d device(s) went offline (heartbeat timed out): %s", len(ids), shown)
        return ids

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="yibao-presence", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None:
            thread.join(timeout_s)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sweep_once()
            except SQLAlchemyError as exc:
                if not self._failing:
                    logger.warning(
                        "presence sweep failed (%s); retrying every %.1f s", type(exc).__name__, self._interval_s
                    )
                    self._failing = True
                continue
            if self._failing:
                logger.info("presence sweep recovered")
                self._failing = False
