"""The staff screens in the real Kivy kiosk under a private Xvfb, on simulated hardware: the institution head
applies for binding (face + ID card, then face + 医保码) and the platform's decisions arrive; the pharmacist signs in
by face (the real face pipeline with liveness, on the simulated RGB+IR+depth camera), reads their paged attendance,
reviews a prescription with a quantity warning (acknowledged in words, approval confirmed by face), returns another
with a reason and signs out. Every staff screen is shot in normal and care mode and measured against the care-mode
rules on the live widgets.

The kiosk runs in a child process (`python -m yibao.kiosk_sim_staff`): a Kivy window can be opened once per process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[2]
FACES = REPO / "tests" / "fixtures" / "faces"
STAFF_SCREENS = {"staff", "staff_wait", "staff_result", "attendance", "rx_list", "rx_review", "binding"}
STAFF_SCREENS |= {"enrol_list", "enrol_consent", "reverify"}  # pharmacist face enrolment and re-verification
FLOWS = {
    "sign_in_unbound": "refused",
    "rx_nobody_on_duty": "refused",
    "binding_apply_id_card": "ok",
    "binding_apply_qr": "ok",
    "binding": "bound",
    "sign_in": "ok",
    "approve_before_acknowledging": "refused",
    "review_approve": "ok",
    "review_return": "ok",
    "sign_out": "ok",
    "sign_out_again": "refused",
    "staff_cleared": "cleared",
    # pharmacist face enrolment and re-verification
    "reverify_on_menu": "shown",
    "reverify": "ok",
    "enrol_declined": "nothing recorded",
    "enrol": "ok",
    "enrol_recorded": "template and consent",
}


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("staff-kiosk")
    out, work, path = root / "shots", root / "work", root / "report.json"
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}  # a private Xvfb
    done = subprocess.run(
        [sys.executable, "-m", "yibao.kiosk_sim_staff", str(out), str(FACES), str(work), str(path)],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    result: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return result


def test_every_staff_flow_runs_on_the_simulated_kiosk_in_both_modes(report: dict[str, Any]) -> None:
    assert report["error"] == ""
    for mode in ("normal", "care"):
        assert {name: report["flows"][f"{name}-{mode}"] for name in FLOWS} == FLOWS
        pages = report["flows"][f"attendance_paging-{mode}"]
        assert pages.startswith("2/")
        assert int(pages.split("/")[1]) >= 10  # months of attendance: a large, paged list
    # what was signed and queued: two applications, sign-in, two review decisions, sign-out — per mode
    kinds = ["binding_application", "binding_application", "sign_in", "review_decision", "review_decision", "sign_out"]
    kinds.append("pharmacist_enrolment")  # pharmacist face enrolment (a re-verification is audited, not signed)
    assert report["signed"] == kinds * 2


def test_every_staff_screen_is_shot_in_both_modes_and_passes_the_care_rules(report: dict[str, Any]) -> None:
    shots = report["shots"]
    for mode in ("normal", "care"):
        assert {s["screen"] for s in shots if s["mode"] == mode} >= STAFF_SCREENS
    broken = [f"{s['name']}: {v}" for s in shots if s["mode"] == "care" for v in s["violations"]]
    assert broken == []
    for shot in shots:
        assert Path(shot["png"]).stat().st_size > 10_000, shot["name"]


def test_the_screens_say_things_in_words_and_show_only_masked_data(report: dict[str, Any]) -> None:
    assert report["secrets_shown"] == []
    texts = {(s["name"], s["mode"]): " ".join(s["texts"]) for s in report["shots"]}
    for mode in ("normal", "care"):
        assert "警告：" in texts[("staff_rx_findings", mode)]
        assert "需确认" in texts[("staff_rx_findings", mode)]
        assert "还有 1 条警告需要确认后才能通过" in texts[("staff_rx_findings", mode)]
        rejected = texts[("staff_binding_rejected", mode)]
        assert "申请被驳回" in rejected
        assert "原因：申请人与机构登记的负责人不一致" in rejected
        assert "请联系：昆山市医保中心" in rejected
        assert "请联系" in texts[("staff_binding_unbound", mode)]
        assert "审核中" in texts[("staff_binding_pending", mode)]
        assert "已绑定" in texts[("staff_binding_bound", mode)]
        assert "申请人：" in texts[("staff_binding_applied", mode)]
        assert "头" in texts[("staff_wait", mode)]  # the live liveness challenge, in words
        assert "王**" in texts[("staff_sign_in", mode)]
        assert "签到 " in texts[("staff_attendance", mode)]
        assert "请医师修改用量" in texts[("staff_rx_return", mode)]
        assert "审核结果：通过" in texts[("staff_rx_done", mode)]
        assert "审核结果：" in texts[("staff_rx_reviewed", mode)]
        assert "无需签退" in texts[("staff_sign_out_refused", mode)]
        assert "尚未绑定药店" in texts[("staff_sign_in_unbound", mode)]
        # pharmacist face enrolment and re-verification
        assert "请药师刷脸确认在岗" in texts[("staff_reverify_prompt", mode)]
        assert "需要刷脸确认在岗：王**" in texts[("staff_menu_reverify", mode)]
        assert "已确认在岗" in texts[("staff_reverify_done", mode)]
        assert "YS3205830002" in texts[("staff_enrol_list", mode)]
        assert "尚未采集人脸" in texts[("staff_enrol_list", mode)]
        consent = texts[("staff_enrol_consent", mode)]
        assert "版本 2026-01" in consent
        assert "离职" in consent
        assert "不同意" in consent
        assert "头" in texts[("staff_enrol_wait", mode)]
        assert "人脸与身份证照片比对一致" in texts[("staff_enrol_done", mode)]
        assert "下次联网同步" in texts[("staff_enrol_done", mode)]
