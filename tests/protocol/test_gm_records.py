"""Canonical JSON and SM2-signed records."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.gm import (
    CanonicalFormError,
    InvalidSignatureError,
    SM2PrivateKey,
    canonical_json,
    sign_record,
    verify_record,
)


def test_canonical_form_is_sorted_compact_utf8() -> None:
    assert canonical_json({"b": 1, "a": [True, None, "药"], "c": {"y": 2, "x": 1.5}}) == (
        '{"a":[true,null,"药"],"b":1,"c":{"x":1.5,"y":2}}'.encode()
    )


@pytest.mark.parametrize("bad", [{"x": math.nan}, {"x": math.inf}, {1: "int key"}, {"x": {1, 2}}, [b"bytes"]])
def test_not_canonical_is_refused(bad: object) -> None:
    with pytest.raises(CanonicalFormError):
        canonical_json(bad)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(value=st.dictionaries(st.text(max_size=8), json_values, max_size=6))
def test_key_order_does_not_change_the_bytes(value: dict[str, object]) -> None:
    reordered = dict(reversed(list(value.items())))
    assert canonical_json(value) == canonical_json(reordered)


def test_signed_record_verifies_and_any_change_is_refused() -> None:
    key = SM2PrivateKey.generate()
    record = {"decision": "approve", "prescription": "RX-1", "reviewer": "PH-7", "seq": 3}
    signature = sign_record(key, record)
    verify_record(key.public_key, dict(reversed(list(record.items()))), signature)
    with pytest.raises(InvalidSignatureError):
        verify_record(key.public_key, {**record, "decision": "reject"}, signature)
    with pytest.raises(InvalidSignatureError):
        verify_record(SM2PrivateKey.generate().public_key, record, signature)
    with pytest.raises(InvalidSignatureError, match="not hex"):
        verify_record(key.public_key, record, "xyz")
