"""Sample prescriptions shared by the server and terminal prescription tests (synthetic; no real person)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from protocol.prescription import PendingPrescription, Prescription, prescription_digest

AMOXICILLIN = "XJ01CAA040A001010100534"
LIQUORICE = "XR05DAF123A001010100001"
"""复方甘草片: a key drug under quantity control."""
PRESCRIBED_AT = datetime(2026, 3, 1, 7, 30, tzinfo=UTC)
DOCTOR_NAME = "王医生"


def prescription_body(rx_no: str = "RX20260301001", **changes: Any) -> dict[str, Any]:
    """A registration body as HIS sends it (JSON-able)."""
    body: dict[str, Any] = {
        "rx_no": rx_no,
        "prescribing_institution_code": "H31011500001",
        "prescribing_institution_name": "浦东新区示例社区卫生服务中心",
        "department_code": "A03",
        "department_name": "内科",
        "prescriber_code": "D310115000123",
        "prescriber_name": DOCTOR_NAME,
        "prescribed_at": PRESCRIBED_AT.isoformat(),
        "source": "1",
        "channel": "2",
        "patient_ref": "his-pt-000981",
        "patient_masked": "李*",
        "patient_age_years": 67,
        "patient_sex": "2",
        "diagnosis_codes": ["J20.900"],
        "lines": [
            {
                "line_no": 1,
                "drug_code": AMOXICILLIN,
                "drug_name": "阿莫西林胶囊",
                "specification": "0.25g*24粒",
                "quantity": 2,
                "unit": "盒",
                "dosage": "口服 一次2粒 一日3次",
                "days_supply": 7,
            },
            {
                "line_no": 2,
                "drug_code": LIQUORICE,
                "drug_name": "复方甘草片",
                "generic_name": "复方甘草片",
                "specification": "100片",
                "quantity": 3,
                "unit": "瓶",
                "dosage": "口服 一次3片 一日3次",
                "days_supply": 10,
            },
        ],
    }
    body.update(changes)
    return body


def pending(prescription_id: int = 1, institution_code: str = "H31011500042", **changes: Any) -> PendingPrescription:
    """A pending prescription as the server serves it (prescriber masked)."""
    body = prescription_body(**changes)
    body["prescriber_name"] = "王**"
    prescription = Prescription.model_validate(body)
    return PendingPrescription(
        prescription_id=prescription_id,
        institution_code=institution_code,
        registered_at=PRESCRIBED_AT,
        content_digest=prescription_digest(prescription),
        prescription=prescription,
    )
