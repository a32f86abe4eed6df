"""Catalogues that sync down to terminals: what a catalogue entry is, how versions move, and how a version is proven.

Three catalogues (REQUIREMENTS E-13; K-17…K-19; Y-15): the 医保药品目录 (`DrugEntry`), the 诊疗项目目录
(`TreatmentItem`) and the lists of 定点医疗机构 / 定点零售药店 (`DesignatedInstitution`). Each catalogue kind has its
own integer version line, 1, 2, 3 … set by the server when the regulator publishes. A terminal holds exactly one
version of each kind and moves forward by:

* `CatalogueSnapshot` — every entry of version N (first fill, or recovery after a gap or a hash mismatch);
* `CatalogueDelta` — from version `from_version` to `to_version`: entries upserted (whole entries, never patches) and
  codes deleted. A terminal applies it only when it holds exactly `from_version`.

Both carry `content_hash`, the SM3 digest of the whole catalogue state at the version they lead to (`content_hash`
below). After applying, the terminal recomputes it from what it stores and refuses the result (rolling back) unless it
matches, so "I hold version N" is a checkable claim, not a counter. `CatalogueVersionNotice` is the small message that
tells a terminal a new version exists (small enough for a device command or a downlink message); the bulk documents
travel over HTTPS because 20,000 drugs are megabytes, far above `MAX_DOWNLINK_BYTES`.

The hash is built from per-entry digests (`entry_digest`) so that a terminal can re-check a 20,000-entry catalogue
after a small delta by hashing stored 32-byte digests instead of re-serialising every entry.

This module owns those shapes and the hash. It must never grow behaviour of either side (no storage, no network) and
never carry personal data: catalogues describe drugs, services and institutions, never people.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum
from typing import Annotated, Final, Literal, Self

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, model_validator

from protocol.envelope import ContractError, summarise_validation_error
from protocol.gm.records import canonical_json
from protocol.gm.sm3 import sm3_digest

CATALOGUE_SCHEMA_VERSION: Final = 1
"""Schema version of the catalogue documents; bump on an incompatible change (a terminal refuses unknown versions)."""

HASH_PURPOSE: Final = b"yibao-catalogue-v1"
"""Domain-separation prefix of `content_hash`: no other SM3 digest in the system starts with these bytes."""

MAX_CATALOGUE_DOCUMENT_BYTES: Final = 64 * 1024 * 1024
"""Larger snapshot or delta documents are refused before parsing (the national drug list is ~100k entries)."""

MAX_DELTA_ENTRIES: Final = 200_000

_Hash = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$", description="SM3 digest, lowercase hex.")]
_Text = Annotated[str, Field(min_length=1, max_length=128)]
_OptText = Annotated[str, Field(max_length=256)]
_RegionCode = Annotated[str, Field(pattern=r"^[0-9]{6}$", description="医保区划 (admdvs): 6-digit region code.")]
_PriceFen = Annotated[int, Field(ge=0, le=10**10, description="Price in fen (0.01 yuan): integers, never floats.")]


class _Closed(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogueKind(StrEnum):
    """Which catalogue a document belongs to; each kind has its own version line."""

    DRUG = "drug"
    """医保药品目录 (K-17)."""
    TREATMENT = "treatment"
    """诊疗项目目录 (K-18)."""
    INSTITUTION = "institution"
    """定点医疗机构 and 定点零售药店 (K-19)."""


class ChargeCategory(StrEnum):
    """医保目录类别 / 收费项目等级 (甲/乙/丙): how much of the price the fund covers."""

    CLASS_A = "甲"
    """Fully payable by the fund (after the deductible)."""
    CLASS_B = "乙"
    """Payable after the insured pays a first share."""
    CLASS_C = "丙"
    """Not payable by the fund (self-pay)."""


class DispensingClass(StrEnum):
    """处方药 / 非处方药 (OTC 甲类 red label, 乙类 green label)."""

    RX = "rx"
    OTC_A = "otc_a"
    OTC_B = "otc_b"


class DrugEntry(_Closed):
    """One row of the 医保药品目录: one product (generic name × dosage form × specification × manufacturer)."""

    kind: Literal["drug"] = "drug"
    code: str = Field(
        pattern=r"^[A-Z][A-Z0-9]{9,29}$",
        description="国家医保药品编码 (医保目录编码, e.g. 'XJ01CAA040A001010100534'): the entry's identity.",
    )
    name: _Text = Field(description="注册名称 / product name as sold, e.g. '阿莫西林胶囊'.")
    generic_name: _Text = Field(description="通用名; quantity rules and repeat-purchase checks key on it.")
    dosage_form: str = Field(min_length=1, max_length=32, description="剂型, e.g. '胶囊剂', '片剂'.")
    specification: str = Field(min_length=1, max_length=64, description="规格, e.g. '0.25g'.")
    package: str = Field(
        min_length=1, max_length=64, description="包装: units per package and the unit, e.g. '24粒/盒'."
    )
    unit: str = Field(min_length=1, max_length=8, description="Sale unit quantities are counted in, e.g. '盒'.")
    manufacturer: _Text = Field(description="生产企业.")
    approval_number: str = Field(min_length=1, max_length=32, description="批准文号, e.g. '国药准字H20003263'.")
    category: ChargeCategory = Field(description="医保目录类别 甲/乙/丙.")
    dispensing: DispensingClass = Field(description="处方药 (rx) or OTC 甲/乙.")
    price_fen: _PriceFen | None = Field(default=None, description="医保支付标准 per sale unit in fen; null if none.")
    limit_note: _OptText = Field(default="", description="限制使用范围 as published (free text), '' if none.")
    homologous_herb: bool = Field(default=False, description="药食同源 herb (F-18): never settled on its own.")


class TreatmentItem(_Closed):
    """One row of the 诊疗项目目录 (medical service price items)."""

    kind: Literal["treatment"] = "treatment"
    code: str = Field(pattern=r"^[0-9A-Z]{6,30}$", description="诊疗项目编码, e.g. '110200001'.")
    name: _Text = Field(description="项目名称, e.g. '普通门诊诊查费'.")
    unit: str = Field(min_length=1, max_length=16, description="计价单位, e.g. '次'.")
    category: ChargeCategory = Field(description="收费项目等级 甲/乙/丙.")
    price_fen: _PriceFen | None = Field(default=None, description="Price per unit in fen; null if set locally.")
    connotation: _OptText = Field(default="", description="项目内涵 (what the item includes), '' if none.")
    exclusions: _OptText = Field(default="", description="除外内容, '' if none.")


class InstitutionType(StrEnum):
    """定点医药机构 type (REQUIREMENTS E-06)."""

    HOSPITAL = "hospital"
    """定点医疗机构 (医院)."""
    PHARMACY = "pharmacy"
    """定点零售药店."""
    OUTPATIENT = "outpatient"
    """门诊部."""
    CLINIC = "clinic"
    """诊所 / 卫生室."""
    OTHER = "other"
    """中医推拿、针灸、血透室 … ."""


class InstitutionLevel(StrEnum):
    """定点医疗机构级别; pharmacies are `unrated`."""

    GRADE_3 = "3"
    GRADE_2 = "2"
    GRADE_1 = "1"
    UNRATED = "0"


class DesignatedInstitution(_Closed):
    """One designated institution (定点医药机构): hospital, clinic or retail pharmacy."""

    kind: Literal["institution"] = "institution"
    code: str = Field(
        pattern=r"^[A-Z0-9]{6,32}$",
        description="定点医药机构编号 / 定点医药机构id (C32), e.g. 'H32058300123', 'P32058300456'.",
    )
    name: _Text = Field(description="机构名称.")
    institution_type: InstitutionType
    level: InstitutionLevel = Field(description="定点医疗机构级别 (pharmacies: unrated).")
    region_code: _RegionCode
    address: _OptText = Field(description="地址 (C256).")


CatalogueEntry = Annotated[DrugEntry | TreatmentItem | DesignatedInstitution, Field(discriminator="kind")]
"""An entry of any catalogue, chosen by its `kind`."""

ENTRY_MODELS: Final[dict[CatalogueKind, type[DrugEntry] | type[TreatmentItem] | type[DesignatedInstitution]]] = {
    CatalogueKind.DRUG: DrugEntry,
    CatalogueKind.TREATMENT: TreatmentItem,
    CatalogueKind.INSTITUTION: DesignatedInstitution,
}


# ---------------------------------------------------------------------------------------------------------- the hash


def entry_digest(entry: DrugEntry | TreatmentItem | DesignatedInstitution) -> bytes:
    """SM3 of the entry's canonical JSON (every field, defaults included): 32 bytes."""
    return sm3_digest(canonical_json(entry.model_dump(mode="json")))


def content_hash_of_digests(kind: CatalogueKind, version: int, digests: Iterable[tuple[str, bytes]]) -> str:
    """The catalogue hash from `(code, entry_digest)` pairs in any order (they are sorted by code here).

    Form: SM3(purpose NUL kind NUL version NUL (code NUL digest)*), codes in ascending order. Codes match
    `[A-Z0-9]`, so NUL can never occur inside one and the framing is unambiguous."""
    parts = [HASH_PURPOSE, b"\0", kind.value.encode(), b"\0", str(version).encode(), b"\0"]
    for code, digest in sorted(digests):
        if len(digest) != 32:
            raise ValueError("an entry digest is 32 bytes")
        parts += [code.encode("ascii"), b"\0", digest]
    return sm3_digest(b"".join(parts)).hex()


def content_hash(
    kind: CatalogueKind, version: int, entries: Iterable[DrugEntry | TreatmentItem | DesignatedInstitution]
) -> str:
    """The hash that proves a holder has version `version` of `kind` with exactly these entries."""
    return content_hash_of_digests(kind, version, ((e.code, entry_digest(e)) for e in entries))


# ------------------------------------------------------------------------------------------------------ documents


def _check_entries(kind: CatalogueKind, entries: Iterable[DrugEntry | TreatmentItem | DesignatedInstitution]) -> None:
    seen: set[str] = set()
    for entry in entries:
        if entry.kind != kind.value:
            raise ValueError(f"a {kind.value} catalogue document holds an entry of kind {entry.kind} ({entry.code})")
        if entry.code in seen:
            raise ValueError(f"code {entry.code} appears twice")
        seen.add(entry.code)


class CatalogueSnapshot(_Closed):
    """Every entry of one catalogue at one version."""

    schema_version: Literal[1] = Field(default=CATALOGUE_SCHEMA_VERSION, description="Catalogue schema version.")
    type: Literal["catalogue_snapshot"] = "catalogue_snapshot"
    kind: CatalogueKind
    version: int = Field(ge=1, description="The version this snapshot is.")
    published_at: AwareDatetime = Field(description="When the regulator published this version (server clock).")
    content_hash: _Hash = Field(description="`content_hash(kind, version, entries)`.")
    entries: list[CatalogueEntry] = Field(max_length=MAX_DELTA_ENTRIES)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        _check_entries(self.kind, self.entries)
        return self

    def verify_hash(self) -> None:
        """Raise `ContractError` unless `content_hash` matches the entries (a cheap check before storing)."""
        actual = content_hash(self.kind, self.version, self.entries)
        if actual != self.content_hash:
            raise ContractError(f"{self.kind.value} snapshot v{self.version}: content hash does not match its entries")

    @classmethod
    def build(
        cls,
        kind: CatalogueKind,
        version: int,
        entries: list[DrugEntry] | list[TreatmentItem] | list[DesignatedInstitution],
        published_at: AwareDatetime,
    ) -> CatalogueSnapshot:
        """A snapshot with its hash computed (the publisher's side)."""
        return cls(
            kind=kind,
            version=version,
            published_at=published_at,
            content_hash=content_hash(kind, version, entries),
            entries=list(entries),
        )

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class CatalogueDelta(_Closed):
    """The changes from `from_version` to `to_version` of one catalogue: whole entries upserted, codes deleted."""

    schema_version: Literal[1] = Field(default=CATALOGUE_SCHEMA_VERSION, description="Catalogue schema version.")
    type: Literal["catalogue_delta"] = "catalogue_delta"
    kind: CatalogueKind
    from_version: int = Field(ge=1, description="Apply only on top of exactly this version.")
    to_version: int = Field(ge=2, description="The version held after applying.")
    published_at: AwareDatetime = Field(description="When `to_version` was published (server clock).")
    content_hash: _Hash = Field(description="`content_hash` of the whole catalogue at `to_version`.")
    upserts: list[CatalogueEntry] = Field(default_factory=list, max_length=MAX_DELTA_ENTRIES)
    deletions: list[Annotated[str, Field(pattern=r"^[A-Z0-9]{6,32}$")]] = Field(
        default_factory=list, max_length=MAX_DELTA_ENTRIES, description="Codes removed at `to_version`."
    )

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.to_version <= self.from_version:
            raise ValueError("to_version must be after from_version")
        _check_entries(self.kind, self.upserts)
        both = {e.code for e in self.upserts} & set(self.deletions)
        if both:
            raise ValueError(f"code {min(both)} is both upserted and deleted")
        if len(set(self.deletions)) != len(self.deletions):
            raise ValueError("a code is deleted twice")
        return self

    def to_bytes(self) -> bytes:
        return self.model_dump_json().encode("utf-8")


class CatalogueVersionNotice(_Closed):
    """'Version N of catalogue K is published': small enough for a downlink message or a command argument. The
    terminal answers by fetching a delta from the version it holds (or a snapshot when it holds none, or when the
    server no longer keeps that delta)."""

    schema_version: Literal[1] = Field(default=CATALOGUE_SCHEMA_VERSION, description="Catalogue schema version.")
    type: Literal["catalogue_version"] = "catalogue_version"
    kind: CatalogueKind
    version: int = Field(ge=1)
    content_hash: _Hash


class CatalogueHolding(_Closed):
    """What a terminal holds of one catalogue: reported upward (heartbeat detail, sync request) so the server can
    send the right delta and see terminals that hold stale or corrupted versions."""

    kind: CatalogueKind
    version: int = Field(ge=0, description="0 when the terminal holds none.")
    content_hash: _Hash | None = Field(description="The verified hash of what it holds; null when version is 0.")
    entries: int = Field(ge=0)


CatalogueDocument = Annotated[CatalogueSnapshot | CatalogueDelta, Field(discriminator="type")]
_DOCUMENT: Final[TypeAdapter[CatalogueSnapshot | CatalogueDelta]] = TypeAdapter(CatalogueDocument)


def decode_catalogue_document(raw: bytes) -> CatalogueSnapshot | CatalogueDelta:
    """Parse a snapshot or delta document (JSON) or raise `ContractError` saying why not."""
    if len(raw) > MAX_CATALOGUE_DOCUMENT_BYTES:
        raise ContractError(f"catalogue document of {len(raw)} bytes exceeds {MAX_CATALOGUE_DOCUMENT_BYTES}")
    try:
        return _DOCUMENT.validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid catalogue document: {summarise_validation_error(exc)}") from exc


def build_delta(
    kind: CatalogueKind,
    from_version: int,
    old_entries: Iterable[DrugEntry | TreatmentItem | DesignatedInstitution],
    to_version: int,
    new_entries: list[DrugEntry] | list[TreatmentItem] | list[DesignatedInstitution],
    published_at: AwareDatetime,
) -> CatalogueDelta:
    """The delta that turns `old_entries` (version `from_version`) into `new_entries` (`to_version`): changed or new
    entries upserted, vanished codes deleted, the hash of the new state. The publisher's side; pure."""
    old = {e.code: e for e in old_entries}
    new = {e.code: e for e in new_entries}
    return CatalogueDelta(
        kind=kind,
        from_version=from_version,
        to_version=to_version,
        published_at=published_at,
        content_hash=content_hash(kind, to_version, new_entries),
        upserts=[e for code, e in sorted(new.items()) if old.get(code) != e],
        deletions=sorted(set(old) - set(new)),
    )
