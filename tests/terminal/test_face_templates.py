"""The face gallery at rest: sealed with SM4-GCM, bound to subject and model, keyed hashes only leave the device."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

import numpy as np
import pytest

from terminal.face_templates import TemplateStore, TemplateStoreError, TemplateTamperedError
from terminal.identity import IdentityStore, PassphraseError

MODEL_A = "a" * 64
MODEL_B = "b" * 64


def _template(seed: int) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(128).astype(np.float32)
    return vector / np.linalg.norm(vector)


PASSPHRASE = "correct horse battery staple"


def _key(tmp_path: Path, passphrase: str = PASSPHRASE) -> bytes:
    return IdentityStore(tmp_path / "identity", passphrase, iterations=1000).template_key()


def test_templates_round_trip_and_no_template_bytes_are_on_disk(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "gallery.db", _key(tmp_path), model_sha256=MODEL_A)
    templates = {f"staff-{i}": _template(i) for i in range(5)}
    hashes = {ref: store.enrol(ref, t) for ref, t in templates.items()}
    store.close()

    reopened = TemplateStore(tmp_path / "gallery.db", _key(tmp_path), model_sha256=MODEL_A)
    gallery = reopened.load_gallery()
    assert gallery.ids == tuple(sorted(templates))
    for i, ref in enumerate(gallery.ids):
        np.testing.assert_allclose(gallery.templates[i], templates[ref], rtol=1e-6)
        assert reopened.template_hash(gallery.templates[i]) == hashes[ref]
    reopened.close()

    raw = b"".join(p.read_bytes() for p in tmp_path.glob("gallery.db*"))
    for t in templates.values():
        assert t.astype("<f4").tobytes()[:16] not in raw  # no plaintext template prefix anywhere in the files
    assert stat.S_IMODE((tmp_path / "gallery.db").stat().st_mode) == 0o600


def test_a_row_moved_to_another_subject_or_altered_does_not_open(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "g.db", _key(tmp_path), model_sha256=MODEL_A)
    store.enrol("alice", _template(1))
    store.enrol("bob", _template(2))
    store.close()
    db = sqlite3.connect(tmp_path / "g.db")
    (alice_blob,) = db.execute("SELECT sealed FROM face_template WHERE subject_ref='alice'").fetchone()
    db.execute("UPDATE face_template SET sealed=? WHERE subject_ref='bob'", (alice_blob,))
    db.commit()
    db.close()
    with pytest.raises(TemplateTamperedError):
        TemplateStore(tmp_path / "g.db", _key(tmp_path), model_sha256=MODEL_A).load_gallery()


def test_templates_of_another_model_are_never_compared_and_are_reported_stale(tmp_path: Path) -> None:
    key = _key(tmp_path)
    old = TemplateStore(tmp_path / "g.db", key, model_sha256=MODEL_A)
    old.enrol("alice", _template(1))
    old.close()
    new = TemplateStore(tmp_path / "g.db", key, model_sha256=MODEL_B)
    assert len(new.load_gallery().ids) == 0
    assert new.stale_subjects() == ["alice"]
    new.enrol("alice", _template(3))
    assert new.stale_subjects() == []
    assert len(new.load_gallery().ids) == 1


def test_template_hashes_differ_between_devices_for_the_same_face(tmp_path: Path) -> None:
    face = _template(7)
    one = TemplateStore(tmp_path / "1.db", _key(tmp_path / "dev1"), model_sha256=MODEL_A)
    two = TemplateStore(tmp_path / "2.db", _key(tmp_path / "dev2"), model_sha256=MODEL_A)
    assert one.template_hash(face) != two.template_hash(face)
    assert one.template_hash(face) == one.template_hash(face.copy())


def test_bad_templates_and_subjects_are_refused(tmp_path: Path) -> None:
    store = TemplateStore(tmp_path / "g.db", _key(tmp_path), model_sha256=MODEL_A)
    with pytest.raises(TemplateStoreError):
        store.enrol("x", np.zeros(128, dtype=np.float32))
    with pytest.raises(TemplateStoreError):
        store.enrol("x", np.full(128, np.nan, dtype=np.float32))
    with pytest.raises(TemplateStoreError):
        store.enrol("", _template(1))
    with pytest.raises(TemplateStoreError):
        TemplateStore(tmp_path / "h.db", b"short", model_sha256=MODEL_A)


def test_the_template_key_is_sealed_and_needs_the_passphrase(tmp_path: Path) -> None:
    first = _key(tmp_path)
    assert _key(tmp_path) == first  # stable across opens
    key_file = (tmp_path / "identity" / "templates.key").read_bytes()
    assert first.hex() not in key_file.decode()
    assert stat.S_IMODE((tmp_path / "identity" / "templates.key").stat().st_mode) == 0o600
    with pytest.raises(PassphraseError):
        _key(tmp_path, "another passphrase entirely")
