"""SM2 keys and signatures (GB/T 32918 / GM/T 0003), on the GmSSL C library through `gmssl_pyx`.

Owns key generation, the public-key encoding (uncompressed `04 || x || y`, 65 bytes) and sign/verify with SM3 over
`Z || M`, where Z is the GM/T 0009 user hash with the default user id "1234567812345678". Signatures are the fixed
64-byte `r || s` (each big-endian, 32 bytes): one length for every signature, easy to carry as hex in JSON; DER is
only spoken to the binding and converted here (`signature_to_der` / `signature_from_der` for other peers).

This module is the only place that imports `gmssl_pyx`; its errors are translated into `protocol.gm.errors` here.
It must never expose private-key bytes through `repr`/`str`, never log them, and never be called once per
telemetry message on the server's hot path (DESIGN §4: SM2 verifies cost ~0.7 ms each; use HMAC-SM3/SM4-GCM
under a session key there).
"""

from __future__ import annotations

import gmssl_pyx

from protocol.gm import _curve
from protocol.gm.errors import InvalidSignatureError, KeyFormatError
from protocol.gm.sm3 import sm3_digest

DEFAULT_USER_ID = b"1234567812345678"
"""GM/T 0009 default signer identity, used when a peer has no agreed distinguishing identifier."""

PUBLIC_KEY_SIZE = 65
PRIVATE_KEY_SIZE = 32
SIGNATURE_SIZE = 64


class SM2PublicKey:
    """A point on the SM2 curve, checked on construction."""

    __slots__ = ("_xy",)

    def __init__(self, x: int, y: int) -> None:
        if not _curve.is_on_curve(x, y):
            raise KeyFormatError("SM2 public key is not a point on the SM2 curve")
        self._xy = x.to_bytes(32, "big") + y.to_bytes(32, "big")

    @classmethod
    def from_bytes(cls, data: bytes) -> SM2PublicKey:
        """Decode the uncompressed form `04 || x || y` (65 bytes)."""
        if len(data) != PUBLIC_KEY_SIZE or data[0] != 0x04:
            raise KeyFormatError(f"SM2 public key must be 65 bytes starting with 04, got {len(data)} bytes")
        return cls(int.from_bytes(data[1:33], "big"), int.from_bytes(data[33:], "big"))

    @classmethod
    def from_hex(cls, text: str) -> SM2PublicKey:
        try:
            raw = bytes.fromhex(text)
        except ValueError as exc:
            raise KeyFormatError("SM2 public key is not hex") from exc
        return cls.from_bytes(raw)

    def to_bytes(self) -> bytes:
        """Uncompressed encoding `04 || x || y` (65 bytes)."""
        return b"\x04" + self._xy

    def hex(self) -> str:
        return self.to_bytes().hex()

    @property
    def x(self) -> int:
        return int.from_bytes(self._xy[:32], "big")

    @property
    def y(self) -> int:
        return int.from_bytes(self._xy[32:], "big")

    @property
    def raw_xy(self) -> bytes:
        """`x || y` (64 bytes), the form GmSSL takes."""
        return self._xy

    def fingerprint(self) -> str:
        """SM3 of the encoded key, first 16 hex digits: safe to log and show."""
        return sm3_digest(self.to_bytes()).hex()[:16]

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SM2PublicKey) and other._xy == self._xy

    def __hash__(self) -> int:
        return hash(self._xy)

    def __repr__(self) -> str:
        return f"SM2PublicKey({self.fingerprint()})"


class SM2PrivateKey:
    """A private scalar d in [1, n-2] with its public key. `repr` shows only the public fingerprint."""

    __slots__ = ("_d", "_public")

    def __init__(self, d: bytes, public_key: SM2PublicKey) -> None:
        self._d = d
        self._public = public_key

    @classmethod
    def generate(cls) -> SM2PrivateKey:
        try:
            public_xy, d = gmssl_pyx.sm2_key_generate()
        except gmssl_pyx.GmsslInnerError as exc:
            raise KeyFormatError("GmSSL could not generate an SM2 key") from exc
        return cls(d, SM2PublicKey(int.from_bytes(public_xy[:32], "big"), int.from_bytes(public_xy[32:], "big")))

    @classmethod
    def from_bytes(cls, d: bytes, public_key: SM2PublicKey | None = None) -> SM2PrivateKey:
        """Load the 32-byte big-endian scalar; the public key is derived, and if given must match it."""
        if len(d) != PRIVATE_KEY_SIZE:
            raise KeyFormatError(f"SM2 private key must be {PRIVATE_KEY_SIZE} bytes, got {len(d)}")
        scalar = int.from_bytes(d, "big")
        if not 1 <= scalar <= _curve.N - 2:
            raise KeyFormatError("SM2 private key out of range [1, n-2]")
        point = _curve.multiply_generator(scalar)
        if point is None:  # unreachable for d in range; kept so a broken curve module cannot pass silently
            raise KeyFormatError("SM2 private key maps to the point at infinity")
        derived = SM2PublicKey(*point)
        if public_key is not None and public_key != derived:
            raise KeyFormatError("SM2 public key does not belong to the private key")
        return cls(d, derived)

    def secret_bytes(self) -> bytes:
        """The raw scalar. Only key storage calls this; never log or send it."""
        return self._d

    @property
    def scalar(self) -> int:
        return int.from_bytes(self._d, "big")

    @property
    def public_key(self) -> SM2PublicKey:
        return self._public

    def __repr__(self) -> str:
        return f"SM2PrivateKey(public={self._public.fingerprint()})"


def user_hash(public_key: SM2PublicKey, user_id: bytes = DEFAULT_USER_ID) -> bytes:
    """Z = SM3(ENTL || ID || a || b || xG || yG || xA || yA) of GM/T 0003.2 §5.5 / GM/T 0009."""
    bits = len(user_id) * 8
    if bits > 0xFFFF:
        raise KeyFormatError("SM2 user id longer than 8191 bytes")
    parts = [bits.to_bytes(2, "big"), user_id]
    parts += [v.to_bytes(32, "big") for v in (_curve.A, _curve.B, _curve.GX, _curve.GY)]
    parts.append(public_key.raw_xy)
    return sm3_digest(b"".join(parts))


def _message_digest(public_key: SM2PublicKey, message: bytes, user_id: bytes) -> bytes:
    return sm3_digest(user_hash(public_key, user_id) + message)


def sign(private_key: SM2PrivateKey, message: bytes, *, user_id: bytes = DEFAULT_USER_ID) -> bytes:
    """SM2-with-SM3 signature of `message`: 64 bytes `r || s`."""
    digest = _message_digest(private_key.public_key, message, user_id)
    try:
        der = gmssl_pyx.sm2_sign_sm3_digest(private_key.secret_bytes(), digest)
    except gmssl_pyx.GmsslInnerError as exc:
        raise KeyFormatError("GmSSL refused to sign with this key") from exc
    return signature_from_der(der)


def verify(public_key: SM2PublicKey, message: bytes, signature: bytes, *, user_id: bytes = DEFAULT_USER_ID) -> None:
    """Return if `signature` (64 bytes `r || s`) is valid for `message`; raise `InvalidSignatureError` otherwise."""
    if len(signature) != SIGNATURE_SIZE:
        raise InvalidSignatureError(f"SM2 signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    r, s = int.from_bytes(signature[:32], "big"), int.from_bytes(signature[32:], "big")
    if not (1 <= r < _curve.N and 1 <= s < _curve.N):
        raise InvalidSignatureError("SM2 signature out of range")
    digest = _message_digest(public_key, message, user_id)
    try:
        ok = gmssl_pyx.sm2_verify_sm3_digest(public_key.raw_xy, digest, signature_to_der(signature))
    except gmssl_pyx.GmsslInnerError as exc:
        raise InvalidSignatureError("GmSSL rejected the signature") from exc
    if not ok:
        raise InvalidSignatureError("SM2 signature does not verify")


def is_valid(public_key: SM2PublicKey, message: bytes, signature: bytes, *, user_id: bytes = DEFAULT_USER_ID) -> bool:
    try:
        verify(public_key, message, signature, user_id=user_id)
    except InvalidSignatureError:
        return False
    return True


# ---------------------------------------------------------------- DER <-> r||s


def _der_integer(value: int) -> bytes:
    body = value.to_bytes((value.bit_length() + 8) // 8 or 1, "big")  # the extra bit keeps it positive
    return b"\x02" + bytes([len(body)]) + body


def signature_to_der(signature: bytes) -> bytes:
    """64-byte `r || s` → DER `SEQUENCE { INTEGER r, INTEGER s }` (as GmSSL, OpenSSL and pure gmssl's peers use)."""
    if len(signature) != SIGNATURE_SIZE:
        raise InvalidSignatureError(f"SM2 signature must be {SIGNATURE_SIZE} bytes, got {len(signature)}")
    body = _der_integer(int.from_bytes(signature[:32], "big")) + _der_integer(int.from_bytes(signature[32:], "big"))
    return b"\x30" + bytes([len(body)]) + body


def signature_from_der(der: bytes) -> bytes:
    """DER `SEQUENCE { INTEGER r, INTEGER s }` → 64-byte `r || s`; strict: no trailing or missing bytes."""
    if len(der) < 8 or der[0] != 0x30 or der[1] != len(der) - 2:
        raise InvalidSignatureError("malformed DER SM2 signature")
    values: list[int] = []
    pos = 2
    for _ in range(2):
        if pos + 2 > len(der) or der[pos] != 0x02:
            raise InvalidSignatureError("malformed DER SM2 signature")
        size = der[pos + 1]
        body = der[pos + 2 : pos + 2 + size]
        non_minimal = size > 1 and body[0] == 0 and not body[1] & 0x80
        if size == 0 or len(body) != size or body[0] & 0x80 or non_minimal:
            raise InvalidSignatureError("malformed DER SM2 signature")
        values.append(int.from_bytes(body, "big"))
        pos += 2 + size
    if pos != len(der) or not all(1 <= v < _curve.N for v in values):
        raise InvalidSignatureError("malformed DER SM2 signature")
    return values[0].to_bytes(32, "big") + values[1].to_bytes(32, "big")
