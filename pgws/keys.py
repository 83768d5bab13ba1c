"""Key loading: PGWS_JWT_SECRET (a plain secret, a JWK or a JWKS) → keys bound to one algorithm.

Binding each key to its algorithm here, once, is what lets `claims` check a token only with its
key's algorithm: `none`, HS256-with-a-public-key and similar confusions cannot happen.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from jose import jwk
from jose.exceptions import JOSEError

from pgws.errors import ConfigError

_SYMMETRIC = ("HS256", "HS384", "HS512")
_ASYMMETRIC = (
    "RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512",
)  # fmt: skip


@dataclasses.dataclass(frozen=True, slots=True)
class Key:
    """One verification key, bound to exactly one algorithm when it is loaded."""

    kid: str | None
    algorithm: str
    key: Any  # a jose Key, prepared once
    can_sign: bool
    secret_size: int | None = None  # bytes of an HMAC secret


def load_keys(secret: bytes) -> list[Key]:
    """A plain secret is an HS256 key; a JSON object is a JWK, or a JWKS with `keys`."""
    document = _json_object(secret)
    if document is None:
        return [_hmac_key(secret, None, "HS256")]
    if "keys" in document:
        entries = document["keys"]
        if not isinstance(entries, list) or not entries:
            raise ConfigError("PGWS_JWT_SECRET", "a JWKS needs a non-empty list of keys")
        return [_jwk_key(entry, index) for index, entry in enumerate(entries)]
    return [_jwk_key(document, None)]


def _json_object(data: bytes | str) -> dict[str, Any] | None:
    try:
        value = json.loads(data)
    except (ValueError, RecursionError):
        return None
    return value if isinstance(value, dict) else None


def _hmac_key(secret: bytes, kid: str | None, algorithm: str) -> Key:
    if _looks_like_public_key(secret):
        raise ConfigError("PGWS_JWT_SECRET", "is a public key or certificate, not an HMAC secret")
    try:
        key = jwk.construct(secret, algorithm)
    except JOSEError:
        raise ConfigError("PGWS_JWT_SECRET", "is not a usable HMAC secret") from None
    return Key(kid=kid, algorithm=algorithm, key=key, can_sign=True, secret_size=len(secret))


def _jwk_key(entry: object, index: int | None) -> Key:
    where = "the JWK" if index is None else f"JWKS key {index}"
    if not isinstance(entry, dict):
        raise ConfigError("PGWS_JWT_SECRET", f"{where} is not a JSON object")
    kty, kid = entry.get("kty"), entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError("PGWS_JWT_SECRET", f"{where} has a non-string kid")
    algorithm = entry.get("alg", "HS256" if kty == "oct" else None)
    if algorithm is None:
        raise ConfigError("PGWS_JWT_SECRET", f"{where} has no alg, and only oct keys default one")
    if algorithm not in _SYMMETRIC + _ASYMMETRIC:
        raise ConfigError("PGWS_JWT_SECRET", f"{where} has unsupported alg {algorithm!r}")
    if (kty == "oct") != (algorithm in _SYMMETRIC):
        raise ConfigError("PGWS_JWT_SECRET", f"{where}: alg {algorithm} does not fit kty {kty!r}")
    try:
        key = jwk.construct(entry, algorithm)
    except (JOSEError, ValueError, TypeError, KeyError, AttributeError):  # jose: `"k": 5`
        raise ConfigError("PGWS_JWT_SECRET", f"{where} is not a valid {algorithm} key") from None
    can_sign = kty == "oct" or "d" in entry
    size = len(getattr(key, "prepared_key", b"")) if kty == "oct" else None  # HMACKey's secret
    return Key(kid=kid, algorithm=algorithm, key=key, can_sign=can_sign, secret_size=size)


def _looks_like_public_key(secret: bytes) -> bool:
    """PEM or DER public keys and certificates must never become HMAC secrets."""
    stripped = secret.strip()
    if stripped.startswith(b"-----BEGIN") or stripped.startswith(b"ssh-"):
        return True
    if stripped[:1] == b"\x30":  # an ASN.1 SEQUENCE: try it as DER
        from cryptography.hazmat.primitives.serialization import load_der_public_key
        from cryptography.x509 import load_der_x509_certificate

        for loader in (load_der_public_key, load_der_x509_certificate):
            try:
                loader(stripped)
            except ValueError:
                continue
            return True
    return False
