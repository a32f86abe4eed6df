"""The kiosk's word catalogues: every key in every locale, with the same placeholders."""

from __future__ import annotations

import string

import pytest

from ui.i18n import CATALOGUES, Locale, text


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


def test_every_key_exists_in_every_locale_with_the_same_placeholders() -> None:
    zh, en = CATALOGUES[Locale.ZH_CN], CATALOGUES[Locale.EN]
    assert set(zh) == set(en)
    assert {k: _fields(v) for k, v in zh.items()} == {k: _fields(v) for k, v in en.items()}
    assert all(v.strip() for v in (*zh.values(), *en.values()))


def test_lookup_fills_placeholders_and_a_missing_key_is_an_error() -> None:
    assert text("common.page", page=2, pages=5) == "第 2 / 5 页"
    assert text("common.page", Locale.EN, page=2, pages=5) == "Page 2 / 5"
    with pytest.raises(KeyError):
        text("no.such.key")
