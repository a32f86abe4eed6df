"""A person's earlier purchases for the drug rules' period checks (K-35, P-05): `ServerPurchaseHistory`, the
platform's lookback over the device API (`GET /device/v1/purchase-history`), used at purchase (`terminal.pos_api`)
and at prescription review (`terminal.review`).

Owns the `PurchaseHistorySource` seam and turning the server's answer into the rule engine's `HistoryLine`s. It must
never log a person reference or raise: a lookback that fails answers None and the caller says the period rules saw
the current purchase or prescription only.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any, Final, Protocol

from protocol import ContractError
from protocol.catalogue import DrugEntry
from protocol.drug_rules import HistoryLine
from protocol.purchase import MAX_HISTORY_DAYS, parse_purchase_history
from terminal.errors import TerminalError

logger = logging.getLogger(__name__)

HISTORY_PATH: Final = "/device/v1/purchase-history"


class PurchaseHistorySource(Protocol):
    """A person's earlier purchases for the period rules (`ServerPurchaseHistory`); None when unavailable."""

    def lines(self, person_ref: str, *, at: datetime) -> tuple[HistoryLine, ...] | None: ...


class ServerPurchaseHistory:
    """The platform's lookback (`GET /device/v1/purchase-history`): every institution's registered purchases of the
    person in the last `days` days, drug codes resolved to generic names through the catalogue (`drug`), so rules
    keyed on a generic name count other manufacturers' packs too. A failure is logged (never with the reference)
    and answered None: the verification goes on, and says the period rules saw this purchase only."""

    def __init__(
        self,
        source: JsonSource,
        drug: Callable[[str], DrugEntry | None],
        *,
        days: int = MAX_HISTORY_DAYS,
    ) -> None:
        self._source = source
        self._drug = drug
        self._days = days

    def lines(self, person_ref: str, *, at: datetime) -> tuple[HistoryLine, ...] | None:
        try:
            raw = self._source.get_json(HISTORY_PATH, {"person_ref": person_ref, "days": str(self._days)})
            history = parse_purchase_history(raw)
        except (TerminalError, ContractError) as exc:  # the server away or refusing, or a broken answer
            logger.warning("purchase history lookback failed: %s", type(exc).__name__)
            return None
        if history.person_ref != person_ref:
            logger.warning("purchase history lookback answered for another person: ignored")
            return None
        found: list[HistoryLine] = []
        for line in history.lines:
            if line.settled_at > at:
                continue
            entry = self._drug(line.med_list_codg)
            found.append(
                HistoryLine(
                    purchase_ref=f"server:{line.purchase_id}",
                    at=line.settled_at,
                    drug_code=line.med_list_codg,
                    generic_name="" if entry is None else entry.generic_name,
                    quantity=math.ceil(line.quantity - 1e-9),
                )
            )
        return tuple(found)


class JsonSource(Protocol):
    """The device-authenticated server API (`terminal.server_api.ServerApi`): a signed GET returning decoded JSON."""

    def get_json(self, path: str, params: Mapping[str, str] | None = None) -> Any: ...
