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


def _jwk_key(entry: object, index: int | None, setting: str = "PGWS_JWT_SECRET") -> Key:
    where = "the JWK" if index is None else f"JWKS key {index}"
    if not isinstance(entry, dict):
        raise ConfigError(setting, f"{where} is not a JSON object")
    kty, kid = entry.get("kty"), entry.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise ConfigError(setting, f"{where} has a non-string kid")
    algorithm = entry.get("alg", "HS256" if kty == "oct" else None)
    if algorithm is None:
        raise ConfigError(setting, f"{where} has no alg, and only oct keys default one")
    if algorithm not in _SYMMETRIC + _ASYMMETRIC:
        raise ConfigError(setting, f"{where} has unsupported alg {algorithm!r}")
    if (kty == "oct") != (algorithm in _SYMMETRIC):
        raise ConfigError(setting, f"{where}: alg {algorithm} does not fit kty {kty!r}")
    try:
        key = jwk.construct(entry, algorithm)
    except (JOSEError, ValueError, TypeError, KeyError, AttributeError):  # jose: `"k": 5`
        raise ConfigError(setting, f"{where} is not a valid {algorithm} key") from None
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


# --- keys published at PGWS_JWT_JWKS_URL ----------------------------------------------------

# Bounds on what a provider's document may make pgws do: real ones hold a handful of keys.
MAX_REMOTE_KEYS = 64
_RSA_BITS = (2048, 8192)  # shorter is breakable; longer only makes each verification slow
# The only curve each ES algorithm is defined on (jose would build a P-256 key for ES384).
_CURVES = {"ES256": "P-256", "ES384": "P-384", "ES512": "P-521"}
_DEFAULT_EC_ALG = {curve: alg for alg, curve in _CURVES.items()}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


@dataclasses.dataclass(frozen=True)
class RemoteKeys:
    """The usable keys of a fetched JWKS, and why each other entry was skipped."""

    keys: tuple[Key, ...]
    skipped: tuple[str, ...]  # "key 2: use 'enc'", one per entry left out


def load_remote_jwks(document: bytes, setting: str) -> RemoteKeys:
    """A provider's JWKS → its public signature keys, each bound to one algorithm.

    Entries pgws cannot or must not use are skipped, not fatal (providers publish encryption
    keys beside signing ones): `use` other than `sig`, symmetric or private keys (a key on a URL
    is public), unknown algorithms, curves that do not fit the algorithm. A key without `alg` is
    RS256 for RSA and the curve's own algorithm for EC. Raises ConfigError naming `setting` when
    the document is not a JWKS or no entry is usable.
    """
    value = _json_object(document)
    if value is None:
        raise ConfigError(setting, "the document is not a JSON object")
    entries = value.get("keys")
    if not isinstance(entries, list):
        raise ConfigError(setting, "the document has no `keys` list (not a JWKS)")
    if len(entries) > MAX_REMOTE_KEYS:
        raise ConfigError(setting, f"the JWKS has {len(entries)} keys, more than {MAX_REMOTE_KEYS}")
    keys: list[Key] = []
    skipped: list[str] = []
    for index, entry in enumerate(entries):
        problem = _remote_problem(entry)
        if problem is None and isinstance(entry, dict):  # _remote_problem checked it is
            public = {name: value for name, value in entry.items() if name != "alg"}
            public["alg"] = _remote_algorithm(entry)
            try:
                key = _jwk_key(public, index, setting)
            except ConfigError as exc:
                problem = exc.problem.removeprefix(f"JWKS key {index}").lstrip(": ")
            else:
                problem = _rsa_size_problem(key)
                if problem is None:
                    keys.append(dataclasses.replace(key, can_sign=False))
                    continue
        skipped.append(f"key {index}: {problem}")
    if not keys:
        why = "; ".join(skipped) if skipped else "the list is empty"
        raise ConfigError(setting, f"the JWKS has no usable signature key ({why})")
    return RemoteKeys(tuple(keys), tuple(skipped))


def _remote_problem(entry: object) -> str | None:
    """Why a published JWKS entry is not one pgws verifies with, or None."""
    if not isinstance(entry, dict):
        return "not a JSON object"
    kty, use, alg = entry.get("kty"), entry.get("use", "sig"), entry.get("alg")
    if kty not in ("RSA", "EC"):
        # `oct` too: a symmetric key served on a URL is a secret anyone can read.
        return "kty is not RSA or EC" if kty != "oct" else "a symmetric (oct) key is never public"
    if use != "sig":
        return "not a signature key (use is not sig)"
    ops = entry.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        return "key_ops does not include verify"
    if any(name in entry for name in _PRIVATE_MEMBERS):
        return "holds private key members"
    if alg is not None and (not isinstance(alg, str) or alg not in _ASYMMETRIC):
        return "unsupported alg"
    algorithm = _remote_algorithm(entry)
    if algorithm is None:
        return "no alg, and no curve that names one"
    if kty == "RSA" and not algorithm.startswith(("RS", "PS")):
        return f"alg {algorithm} does not fit kty RSA"
    if kty == "EC" and _CURVES.get(algorithm) != entry.get("crv"):
        return f"alg {algorithm} needs curve {_CURVES.get(algorithm, 'none')}"
    return None


def _remote_algorithm(entry: dict[str, Any]) -> str | None:
    alg = entry.get("alg")
    if isinstance(alg, str):
        return alg
    if entry.get("kty") == "RSA":
        return "RS256"
    crv = entry.get("crv")
    return _DEFAULT_EC_ALG.get(crv) if isinstance(crv, str) else None


def _rsa_size_problem(key: Key) -> str | None:
    bits = getattr(getattr(key.key, "prepared_key", None), "key_size", None)
    if key.algorithm.startswith(("RS", "PS")) and isinstance(bits, int):
        low, high = _RSA_BITS
        if not low <= bits <= high:
            return f"RSA key of {bits} bits (pgws takes {low} to {high})"
    return None
