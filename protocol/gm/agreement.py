"""Per-device session keys: ECDH on the SM2 curve, then the GM/T 0003.3 SM3 key-derivation function.

Why not the SM2 key-exchange protocol of GM/T 0003.3 itself: neither GmSSL binding on the registry exposes it, and
an own implementation of its implicit-authentication arithmetic would be a second, untested SM2. The construction
here is what TLCP-style handshakes do instead: each side makes an EPHEMERAL SM2 key pair, signs its ephemeral
public key with its long-term SM2 identity key (`protocol.gm.sm2.sign`, low volume), checks the peer's signature,
and then both compute

    U = d_own · P_peer              (ephemeral-ephemeral ECDH; forward secrecy)
    K = KDF(xU || yU || Z_A || Z_B || info, klen)

exactly as GM/T 0003.3 §6.1 step A8/B8 forms K from (xU, yU, Z_A, Z_B); Z_A/Z_B are the GM/T 0009 user hashes of
the initiator's and the responder's IDENTITY keys, which binds the key to both identities, and `info` separates
uses (e.g. b"yibao/v1 session" + device id + epoch).

This module owns that arithmetic and nothing else: the handshake messages belong to the sync protocol. It must
never use a long-term private key for ECDH (the pure-Python multiplication is not constant-time; see _curve).
"""

from __future__ import annotations

from dataclasses import dataclass

from protocol.gm import _curve
from protocol.gm.errors import CryptoError, KeyFormatError
from protocol.gm.sm2 import DEFAULT_USER_ID, SM2PrivateKey, SM2PublicKey, user_hash
from protocol.gm.sm3 import sm3_kdf

SESSION_KEY_SIZE = 16


@dataclass(frozen=True, slots=True)
class Party:
    """One side of an agreement as the other knows it: its long-term identity key and user id."""

    identity_key: SM2PublicKey
    user_id: bytes = DEFAULT_USER_ID


def shared_point(own_ephemeral: SM2PrivateKey, peer_ephemeral: SM2PublicKey) -> bytes:
    """xU || yU (64 bytes) of U = d_own · P_peer. The peer key was validated on the curve when it was decoded."""
    point = _curve.multiply(own_ephemeral.scalar, (peer_ephemeral.x, peer_ephemeral.y))
    if point is None:
        raise KeyFormatError("key agreement produced the point at infinity (invalid peer key)")
    return point[0].to_bytes(32, "big") + point[1].to_bytes(32, "big")


def agree_session_key(
    own_ephemeral: SM2PrivateKey,
    peer_ephemeral: SM2PublicKey,
    *,
    initiator: Party,
    responder: Party,
    info: bytes,
    length: int = SESSION_KEY_SIZE,
) -> bytes:
    """The session key both sides derive; call it with the same `initiator`, `responder` and `info` on both."""
    if own_ephemeral.public_key == peer_ephemeral:
        raise CryptoError("key agreement with oneself: the peer's ephemeral key equals ours")
    z_a = user_hash(initiator.identity_key, initiator.user_id)
    z_b = user_hash(responder.identity_key, responder.user_id)
    return sm3_kdf(shared_point(own_ephemeral, peer_ephemeral) + z_a + z_b + info, length)
