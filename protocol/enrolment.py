"""Device identity on the wire: enrolment with a one-time claim token, identity-key rotation, and the server-signed
config bundle the terminal runs on.

Owns the request/response shapes shared by the provisioning CLI, the terminal and the server, and exactly which
bytes each SM2 signature covers (always `canonical_json` of a dict with a distinct "purpose", never the signature
itself). What the server stores and how it decides belong to `sync_server`; where the device keeps its files belongs
to `terminal.identity`. The flow is drawn in docs/identity.md.
"""

from __future__ import annotations

import base64
import hashlib
import json
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from protocol.envelope import ContractError, DeviceId, summarise_validation_error
from protocol.gm.errors import InvalidSignatureError
from protocol.gm.records import sign_record, verify_record
from protocol.gm.sm2 import SM2PrivateKey, SM2PublicKey
from protocol.secure import PublicKeyHex, SignatureHex

ENROL_PURPOSE = "yibao-enrol-v1"
ROTATE_PURPOSE = "yibao-rotate-v1"
BUNDLE_PURPOSE = "yibao-config-bundle-v1"
ENROL_CODE_PREFIX = "YB1:"

ClaimToken = Annotated[str, Field(min_length=20, max_length=128, pattern=r"^[A-Za-z0-9_-]+$")]
HardwareId = Annotated[
    str, Field(min_length=4, max_length=128, pattern=r"^[A-Za-z0-9._:-]+$", description="e.g. a board serial.")
]
Fingerprint = Annotated[str, Field(pattern=r"^[0-9a-f]{16}$", description="`SM2PublicKey.fingerprint()`.")]


class _Msg(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def claim_token_digest(token: str) -> str:
    """What a signature covers and what the server stores instead of the token itself (SHA-256, hex)."""
    return hashlib.sha256(token.encode("ascii")).hexdigest()


# ---------------------------------------------------------------------------------------------------- enrolment


class EnrolRequest(_Msg):
    """Sent once by the device: its new public key, proven by a signature with the matching private key."""

    device_id: DeviceId
    claim_token: ClaimToken
    hardware_id: HardwareId
    public_key: PublicKeyHex
    requested_at: AwareDatetime
    proof: SignatureHex = Field(description="SM2 signature by the new key over `enrol_signed_form`.")

    def signed_form(self) -> dict[str, Any]:
        return {
            "purpose": ENROL_PURPOSE,
            "device_id": self.device_id,
            "claim_token_sha256": claim_token_digest(self.claim_token),
            "hardware_id": self.hardware_id,
            "public_key": self.public_key,
            "requested_at": self.model_dump(mode="json")["requested_at"],
        }


def make_enrol_request(
    key: SM2PrivateKey, *, device_id: str, claim_token: str, hardware_id: str, now: datetime
) -> EnrolRequest:
    draft = EnrolRequest(
        device_id=device_id,
        claim_token=claim_token,
        hardware_id=hardware_id,
        public_key=key.public_key.to_bytes().hex(),
        requested_at=now,
        proof="0" * 128,
    )
    return draft.model_copy(update={"proof": sign_record(key, draft.signed_form())})


def check_enrol_proof(request: EnrolRequest) -> SM2PublicKey:
    """The request's public key, once its proof of possession verifies (`InvalidSignatureError` otherwise)."""
    key = SM2PublicKey.from_hex(request.public_key)
    verify_record(key, request.signed_form(), request.proof)
    return key


class RotateRequest(_Msg):
    """A new identity key for an enrolled device: signed by the current key (authority) and the new one (possession)."""

    device_id: DeviceId
    key_epoch: int = Field(ge=1, description="The CURRENT epoch; the new key gets key_epoch + 1.")
    new_public_key: PublicKeyHex
    requested_at: AwareDatetime
    signature_current: SignatureHex
    signature_new: SignatureHex

    def signed_form(self) -> dict[str, Any]:
        return {
            "purpose": ROTATE_PURPOSE,
            "device_id": self.device_id,
            "key_epoch": self.key_epoch,
            "new_public_key": self.new_public_key,
            "requested_at": self.model_dump(mode="json")["requested_at"],
        }


def make_rotate_request(
    current: SM2PrivateKey, new: SM2PrivateKey, *, device_id: str, key_epoch: int, now: datetime
) -> RotateRequest:
    draft = RotateRequest(
        device_id=device_id,
        key_epoch=key_epoch,
        new_public_key=new.public_key.to_bytes().hex(),
        requested_at=now,
        signature_current="0" * 128,
        signature_new="0" * 128,
    )
    form = draft.signed_form()
    return draft.model_copy(
        update={"signature_current": sign_record(current, form), "signature_new": sign_record(new, form)}
    )


def check_rotate_request(request: RotateRequest, current_key: SM2PublicKey) -> SM2PublicKey:
    """The new public key once both signatures verify (`InvalidSignatureError` naming which one failed)."""
    new_key = SM2PublicKey.from_hex(request.new_public_key)
    form = request.signed_form()
    try:
        verify_record(current_key, form, request.signature_current)
    except InvalidSignatureError as exc:
        raise InvalidSignatureError("rotation is not signed by the device's current key") from exc
    try:
        verify_record(new_key, form, request.signature_new)
    except InvalidSignatureError as exc:
        raise InvalidSignatureError("rotation does not prove possession of the new key") from exc
    return new_key


# ---------------------------------------------------------------------------------------------------- config bundle


class BundleMqtt(_Msg):
    host: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    username: str = Field(min_length=1, max_length=128, description="Broker user name; the password is not here.")
    topic_prefix: str = Field(default="yibao/v1", min_length=1, max_length=64)
    tls: bool = False


class BundleSession(_Msg):
    lifetime_s: int = Field(ge=60, description="How long a session key the server grants is valid.")
    rotate_after_s: int = Field(ge=30, description="The terminal asks for a new session key after this.")


class ConfigBundle(_Msg):
    """What the server decides about a device: its identity, where to connect, how to secure traffic."""

    format: Literal["yibao-config-bundle"] = "yibao-config-bundle"
    version: Literal[1] = 1
    device_id: DeviceId
    key_epoch: int = Field(ge=1, description="The identity key this bundle was issued for.")
    device_public_key: PublicKeyHex
    issued_at: AwareDatetime
    config_version: str = Field(min_length=1, max_length=64)
    server_url: str = Field(min_length=1, max_length=512, description="Base URL of the server's HTTPS API.")
    server_public_key: PublicKeyHex
    mqtt: BundleMqtt
    session: BundleSession
    institution_id: str | None = Field(default=None, max_length=64)
    seq_floor: int = Field(
        default=0,
        ge=0,
        description="The highest record seq the server had stored for this device id when the bundle was issued: a "
        "re-enrolled terminal (new or wiped outbox) numbers its records above it, so they cannot collide with, and "
        "be mistaken for, records the server already holds.",
    )


class SignedBundle(_Msg):
    bundle: ConfigBundle
    signature: SignatureHex

    def to_bytes(self) -> bytes:
        return self.model_dump_json(indent=2).encode("utf-8")


def _bundle_form(bundle: ConfigBundle) -> dict[str, Any]:
    form = bundle.model_dump(mode="json")
    form["purpose"] = BUNDLE_PURPOSE
    return form


def sign_bundle(server_key: SM2PrivateKey, bundle: ConfigBundle) -> SignedBundle:
    if bundle.server_public_key != server_key.public_key.to_bytes().hex():
        raise ValueError("a bundle must name the key that signs it")
    return SignedBundle(bundle=bundle, signature=sign_record(server_key, _bundle_form(bundle)))


def verify_bundle(raw: bytes, *, pinned_server_key: SM2PublicKey, device_id: str | None = None) -> ConfigBundle:
    """Parse and check a signed bundle; `ContractError` for a malformed one, `InvalidSignatureError` when the pinned
    server key did not sign exactly these contents (or the bundle names another server key or device)."""
    try:
        signed = SignedBundle.model_validate_json(raw)
    except ValidationError as exc:
        raise ContractError(f"invalid config bundle: {summarise_validation_error(exc)}") from exc
    if signed.bundle.server_public_key != pinned_server_key.to_bytes().hex():
        raise InvalidSignatureError("config bundle names a server key other than the pinned one")
    verify_record(pinned_server_key, _bundle_form(signed.bundle), signed.signature)
    if device_id is not None and signed.bundle.device_id != device_id:
        raise InvalidSignatureError(f"config bundle is for device {signed.bundle.device_id}, not {device_id}")
    return signed.bundle


class EnrolResponse(_Msg):
    """The server's answer to a successful enrolment (and to a rotation): the signed bundle and broker password."""

    bundle: SignedBundle
    broker_password: str = Field(min_length=16, max_length=256, description="Secret: keep it only sealed.")


# ---------------------------------------------------------------------------------------------------- enrol code


class EnrolCode(_Msg):
    """What `yibao provision register` prints for the device admin to carry to the device (one paste)."""

    server_url: str = Field(min_length=1, max_length=512)
    device_id: DeviceId
    claim_token: ClaimToken
    server_fingerprint: Fingerprint

    def encode(self) -> str:
        raw = json.dumps(self.model_dump(mode="json"), separators=(",", ":")).encode()
        return ENROL_CODE_PREFIX + base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str) -> EnrolCode:
        text = text.strip()
        if not text.startswith(ENROL_CODE_PREFIX):
            raise ContractError(f"an enrolment code starts with {ENROL_CODE_PREFIX!r}")
        body = text[len(ENROL_CODE_PREFIX) :]
        try:
            raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
            return cls.model_validate_json(raw)
        except (ValueError, ValidationError) as exc:
            detail = summarise_validation_error(exc) if isinstance(exc, ValidationError) else "not base64 JSON"
            raise ContractError(f"invalid enrolment code: {detail}") from exc
