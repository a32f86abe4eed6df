"""`yibao sim day` (issue 5 "Done when"): the town's working day over the real stack reconciles with
`discrepancies` 0, and the reconciliation does see a record the server lost."""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
from sqlalchemy import delete, select

from sync_server.db.engine import create_db_engine
from sync_server.db.models import Purchase, PurchaseLine, PurchaseTraceCode
from yibao.sim_day import SimDayOptions, _server
from yibao.sim_town import Town

pytestmark = pytest.mark.e2e


def test_the_day_reconciles_over_the_real_stack(yibao_cmd: list[str], tmp_path: Path) -> None:
    run = subprocess.run(
        [
            *yibao_cmd,
            "sim",
            "day",
            "--institutions",
            "2",
            "--pharmacists",
            "2",
            "--prescriptions",
            "3",
            "--purchases",
            "5",
            "--workdir",
            str(tmp_path / "day"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["discrepancies"] == 0, report["problems"]
    assert report["terminals"] == 2
    assert report["sign_ins"] == report["sign_outs"] == 4
    assert report["prescriptions"] == 6
    assert sum(report["reviews"].values()) == 6
    assert report["purchases"] == report["verifications"] == 10
    assert report["proxy_purchases"] == 2  # every fifth citizen sends a neighbour
    assert report["events_terminal"] == report["events_server"] > 0


def test_the_reconciliation_sees_a_purchase_the_server_lost(tmp_path: Path) -> None:
    options = SimDayOptions(
        institutions=1, pharmacists_per_institution=1, prescriptions_per_institution=1, purchases_per_institution=2
    )
    with (
        _server(options, tmp_path) as ((server, broker), db_url),
        Town.open(options, tmp_path, server, broker, random.Random(1)) as town,
    ):
        town.morning()
        town.day()
        town.evening()
        lost = town.his[town.kiosks[0].institution_code].purchases[0]
        engine = create_db_engine(db_url)
        try:
            with engine.begin() as conn:  # the server loses one registered purchase (lines and codes with it)
                purchase_id = conn.execute(select(Purchase.id).where(Purchase.settlement_no == lost)).scalar_one()
                for table in (PurchaseTraceCode, PurchaseLine):
                    conn.execute(delete(table).where(table.purchase_id == purchase_id))
                conn.execute(delete(Purchase).where(Purchase.id == purchase_id))
        finally:
            engine.dispose()
        report = town.reconcile(db_url)
    assert report["discrepancies"] == 1
    assert report["problems"] == ["purchases: HIS registered 2, server has 1"]
