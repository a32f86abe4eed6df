"""Arithmetic on the SM2 recommended curve (GB/T 32918.5 / GM/T 0003.5), in plain Python integers.

Owns the curve constants, public-point validation and the one scalar multiplication the C binding does not offer
(ECDH for key agreement, and d·G to check that a stored key pair belongs together). Speed: a few milliseconds per
multiplication, which is fine for session set-up and key loading; it must never be used per message, and it is
not constant-time, so it must only ever multiply secrets that are ephemeral or used a bounded number of times
(see docs/crypto.md).
"""

from __future__ import annotations

P = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFF
A = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF00000000FFFFFFFFFFFFFFFC
B = 0x28E9FA9E9D9F5E344D5A9E4BCF6509A7F39789F515AB8F92DDBCBD414D940E93
N = 0xFFFFFFFEFFFFFFFFFFFFFFFFFFFFFFFF7203DF6B21C6052B53BBF40939D54123
GX = 0x32C4AE2C1F1981195F9904466A39C9948FE30BBFF2660BE1715A4589334C74C7
GY = 0xBC3736A2F4F6779C59BDCEE36B692153D0A9877CC62A474002DF32E52139F0A0

Point = tuple[int, int]
_Jacobian = tuple[int, int, int]
_INFINITY: _Jacobian = (1, 1, 0)


def is_on_curve(x: int, y: int) -> bool:
    return 0 <= x < P and 0 <= y < P and (y * y - (x * x * x + A * x + B)) % P == 0


def _double(p: _Jacobian) -> _Jacobian:
    x1, y1, z1 = p
    if z1 == 0 or y1 == 0:
        return _INFINITY
    # a = -3 on this curve: M = 3(X - Z^2)(X + Z^2)
    zz = z1 * z1 % P
    m = 3 * (x1 - zz) * (x1 + zz) % P
    yy = y1 * y1 % P
    s = 4 * x1 * yy % P
    x3 = (m * m - 2 * s) % P
    y3 = (m * (s - x3) - 8 * yy * yy) % P
    z3 = 2 * y1 * z1 % P
    return x3, y3, z3


def _add(p: _Jacobian, q: _Jacobian) -> _Jacobian:
    if p[2] == 0:
        return q
    if q[2] == 0:
        return p
    x1, y1, z1 = p
    x2, y2, z2 = q
    z1z1 = z1 * z1 % P
    z2z2 = z2 * z2 % P
    u1 = x1 * z2z2 % P
    u2 = x2 * z1z1 % P
    s1 = y1 * z2 * z2z2 % P
    s2 = y2 * z1 * z1z1 % P
    if u1 == u2:
        return _double(p) if s1 == s2 else _INFINITY
    h = (u2 - u1) % P
    r = (s2 - s1) % P
    hh = h * h % P
    hhh = h * hh % P
    v = u1 * hh % P
    x3 = (r * r - hhh - 2 * v) % P
    y3 = (r * (v - x3) - s1 * hhh) % P
    z3 = h * z1 * z2 % P
    return x3, y3, z3


def multiply(k: int, point: Point) -> Point | None:
    """k·point in affine coordinates; None for the point at infinity."""
    result = _INFINITY
    addend: _Jacobian = (point[0], point[1], 1)
    for bit in bin(k % N)[2:]:
        result = _double(result)
        if bit == "1":
            result = _add(result, addend)
    x, y, z = result
    if z == 0:
        return None
    zinv = pow(z, -1, P)
    zinv2 = zinv * zinv % P
    return x * zinv2 % P, y * zinv2 * zinv % P


def multiply_generator(k: int) -> Point | None:
    return multiply(k, (GX, GY))
