"""JWT verification: from a token and a request path to a `Grant` (channels and mode).

Every key is bound to exactly one algorithm when the secret is loaded, and a token is only ever
checked with its key's algorithm, so `none`, HS256-with-a-public-key and similar confusions cannot
happen. Everything a client can learn from a refusal is `invalid token` or `token expired`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from collections.abc import Mapping, Sequence
from typing import Any, Literal, NoReturn, Protocol

from jose import jws
from jose.exceptions import JOSEError

from pgws.channels import channel_granted, channel_problem, is_wildcard
from pgws.errors import (
    INVALID_TOKEN,
    ConfigError,
    Forbidden,
    KeyUnknown,
    TokenExpired,
    Unauthorized,
)
from pgws.keys import Key, load_keys
from pgws.paths import parse_channel_path, parse_path
from pgws.tokens import b64url_decode, hmac_of, hmac_payload, token_json, token_shaped, utf8

Mode = Literal["r", "w", "rw"]
MODES: frozenset[str] = frozenset({"r", "w", "rw"})
DEFAULT_MAX_CHANNELS = 100


@dataclasses.dataclass(frozen=True, slots=True)
class Grant:
    """What one socket may do: its channels, its mode, the token's claims and when it expires."""

    channels: tuple[str, ...]
    mode: Mode
    claims: Mapping[str, Any]
    expires_at: float | None  # UNIX seconds, from `exp`
    # What the token names (`channel` + `channels`, wildcards kept); empty: any channel (SPEC 2
    # rule 4). Not compared: two grants for the same channels are equal whatever named them.
    allowed: tuple[str, ...] = dataclasses.field(default=(), compare=False)

    def allows(self, channel: str) -> bool:
        """Whether the token grants `channel` (SPEC 8: wildcards), whatever the mode."""
        return channel_granted(self.allowed, channel)

    @property
    def can_read(self) -> bool:
        """Whether notifications on the channels are sent to this socket."""
        return "r" in self.mode

    @property
    def can_write(self) -> bool:
        """Whether frames from this socket become NOTIFYs."""
        return "w" in self.mode


class KeySource(Protocol):
    """Keys that change while serving (pgws.jwks.JwksKeys: PGWS_JWT_JWKS_URL)."""

    keys: tuple[Key, ...]
    kids: frozenset[str]

    def unknown_kid(self) -> Any:
        """Ask for a refetch: an asyncio.Event set when it ends, or None (refuse now)."""


class Verifier:
    """Checks tokens against the configured key(s); built once at start-up from PGWS_JWT_SECRET,
    or reading a `KeySource`'s keys at each token (PGWS_JWT_JWKS_URL)."""

    def __init__(
        self,
        keys: Sequence[Key],
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
        source: KeySource | None = None,
    ) -> None:
        if not keys and source is None:
            raise ConfigError("PGWS_JWT_SECRET", "holds no usable key")
        self._static = tuple(keys)
        self._source = source
        # HMAC keys are checked with hmac directly (the secret and hash read once, here): it
        # accepts exactly the tokens jose's jws.verify accepts (tests/test_claims_fast.py), at a
        # fraction of the cost. Other keys, or one whose check disagrees with jose, use jose.
        self._hmac = {key: found for key in self._static if (found := hmac_of(key)) is not None}
        self._audience = audience
        self._issuer = issuer
        self.leeway = leeway  # seconds of clock skew allowed on `exp` and `nbf` (PGWS_JWT_LEEWAY)

    @classmethod
    def from_secret(
        cls,
        secret: bytes,
        *,
        audience: str | None = None,
        issuer: str | None = None,
        leeway: float = 0.0,
    ) -> Verifier:
        """A plain secret is an HS256 key; a JSON object is a JWK, or a JWKS with `keys`."""
        return cls(load_keys(secret), audience=audience, issuer=issuer, leeway=leeway)

    @property
    def _keys(self) -> tuple[Key, ...]:
        return self._static if self._source is None else self._source.keys

    @property
    def weakest_secret(self) -> int | None:
        """Bytes in the shortest HMAC secret (RFC 7518 wants at least 32 for HS256), if any."""
        sizes = [key.secret_size for key in self._keys if key.secret_size is not None]
        return min(sizes) if sizes else None

    @property
    def algorithms(self) -> tuple[str, ...]:
        """The algorithms tokens may use, one per key."""
        return tuple(sorted({key.algorithm for key in self._keys}))

    @property
    def signing_key(self) -> tuple[str | None, str, Any] | None:
        """(kid, algorithm, key) of the first key that can sign, for `pgws token`; None if none."""
        for key in self._keys:
            if key.can_sign:
                return key.kid, key.algorithm, key.key
        return None

    def verify(self, token: str, now: float | None = None) -> dict[str, Any]:
        """Return the token's claims; raise Unauthorized (or TokenExpired) when it does not hold."""
        if not token_shaped(token):
            raise Unauthorized(INVALID_TOKEN)
        # Read here rather than by jose, whose json.loads has no depth bound (RecursionError);
        # as UTF-8 text, as jose reads it (json.loads would guess UTF-16 from bytes).
        header = token_json(utf8(b64url_decode(token.partition(".")[0])))
        if header is None or "crit" in header:
            raise Unauthorized(INVALID_TOKEN)
        algorithm, kid = header.get("alg"), header.get("kid")
        candidates = [key for key in self._keys if key.algorithm == algorithm]
        if kid is not None and any(key.kid == kid for key in candidates):
            candidates = [key for key in candidates if key.kid == kid]
        elif kid is not None:
            candidates = [key for key in candidates if key.kid is None]
            if not candidates and self._source is not None and isinstance(kid, str):
                _refetch_for(self._source, kid)
        payload = None
        for key in candidates:
            fast = self._hmac.get(key)
            if fast is not None:
                payload = hmac_payload(token, *fast)
                if payload is not None:
                    break
                continue
            try:
                payload = jws.verify(token, key.key, algorithms=[key.algorithm])
                break
            except JOSEError:
                continue
        if payload is None:
            raise Unauthorized(INVALID_TOKEN)
        claims = token_json(payload)
        if claims is None:
            raise Unauthorized(INVALID_TOKEN)
        _check_times(claims, time.time() if now is None else now, self.leeway)
        if self._audience is not None and not _has_audience(claims, self._audience):
            raise Unauthorized(INVALID_TOKEN)
        if self._issuer is not None and claims.get("iss") != self._issuer:
            raise Unauthorized(INVALID_TOKEN)
        return claims


def _refetch_for(source: KeySource, kid: str) -> NoReturn:
    """A kid the JWKS lacks: KeyUnknown when a refetch may bring it, else a plain 401.

    A kid the keys hold under another algorithm is refused as it is (no refetch)."""
    if kid not in source.kids and (refetched := source.unknown_kid()) is not None:
        raise KeyUnknown(refetched)
    raise Unauthorized(INVALID_TOKEN)


def _has_audience(claims: Mapping[str, Any], audience: str) -> bool:
    aud = claims.get("aud")
    if isinstance(aud, str):
        return aud == audience
    return isinstance(aud, list) and audience in aud


def authorize(
    verifier: Verifier,
    path: str,
    now: float | None = None,
    *,
    header_token: str | None = None,
    max_channels: int = DEFAULT_MAX_CHANNELS,
) -> Grant:
    """Turn a request into a Grant: the path, plus a token from a header when there is one.

    Paths are `/<jwt>` or `/<channel>/<jwt>` (query ignored); with `header_token` (Authorization
    or Sec-WebSocket-Protocol) they are `/` or `/<channel>`. Raises BadRequest (400) for a
    malformed path, Unauthorized (401) for a token that does not verify and Forbidden (403) for a
    valid token that grants nothing here (SPEC 2).
    """
    if header_token is None:
        requested, token = parse_path(path)
    else:
        requested, token = parse_channel_path(path), header_token
    claims = verifier.verify(token, now)
    return grant_for(claims, requested, max_channels, leeway=verifier.leeway)


def grant_for(
    claims: Mapping[str, Any],
    requested: str | None,
    max_channels: int = DEFAULT_MAX_CHANNELS,
    *,
    leeway: float = 0.0,
) -> Grant:
    """Apply SPEC 2 rules 2-5 to verified claims and the channel named in the path, if any."""
    if "mode" not in claims:
        raise Forbidden("missing mode")
    mode = claims["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        raise Forbidden("invalid mode")
    allowed = _allowed_channels(claims)
    if requested is not None:
        if not channel_granted(allowed, requested):
            raise Forbidden(f"not allowed: {requested}")
        channels: tuple[str, ...] = (requested,)
    else:
        # A wildcard is never subscribed by itself (SPEC 8): only the names it stands for are.
        channels = tuple(name for name in allowed if not is_wildcard(name))
        if not channels:
            raise Forbidden("no channels")
        if len(channels) > max_channels:
            raise Forbidden(f"too many channels: at most {max_channels}")
    return _grant(claims, mode, channels, allowed, leeway)


def grant_for_v2(claims: Mapping[str, Any], *, leeway: float = 0.0) -> Grant:
    """A `pgws.v2` socket's grant (SPEC 8): mode and allowed channels, nothing subscribed yet.

    A token that names no channels grants any channel, as SPEC 2 rule 4 does for a path.
    """
    if "mode" not in claims:
        raise Forbidden("missing mode")
    mode = claims["mode"]
    if not isinstance(mode, str) or mode not in MODES:
        raise Forbidden("invalid mode")
    return _grant(claims, mode, (), _allowed_channels(claims), leeway)


def _grant(
    claims: Mapping[str, Any],
    mode: str,
    channels: tuple[str, ...],
    allowed: tuple[str, ...],
    leeway: float = 0.0,
) -> Grant:
    exp = claims.get("exp")  # the socket lives until exp + leeway: the 3001 timer, per frame
    return Grant(
        channels=channels,
        mode=mode,  # type: ignore[arg-type]  # checked against MODES by the callers
        claims=claims,
        expires_at=float(exp) + leeway if exp is not None else None,
        allowed=allowed,
    )


def _allowed_channels(claims: Mapping[str, Any]) -> tuple[str, ...]:
    """`channel` (legacy string) plus `channels` (list of strings), first occurrence order kept."""
    found: list[str] = []
    if "channel" in claims:
        channel = claims["channel"]
        if not isinstance(channel, str):
            raise Forbidden("invalid channel claim")
        found.append(channel)
    if "channels" in claims:
        channels = claims["channels"]
        if not isinstance(channels, list) or not all(isinstance(c, str) for c in channels):
            raise Forbidden("invalid channels claim")
        found.extend(channels)
    for name in found:
        if (problem := channel_problem(name)) is not None:
            # The name itself stays out of the reason: it may not even be encodable.
            raise Forbidden(f"invalid channel claim: {problem}")
    return tuple(dict.fromkeys(found))


def _check_times(claims: Mapping[str, Any], now: float, leeway: float = 0.0) -> None:
    for name in ("exp", "nbf", "iat"):
        if name in claims:
            value = claims[name]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise Unauthorized(INVALID_TOKEN)
            # abs() first: math.isfinite() overflows on integers too large for a float.
            if abs(value) > 1e11 or not math.isfinite(value):  # beyond year 5000: nonsense
                raise Unauthorized(INVALID_TOKEN)
    if "nbf" in claims and now + leeway < claims["nbf"]:
        raise Unauthorized(INVALID_TOKEN)
    if "exp" in claims and now - leeway >= claims["exp"]:
        raise TokenExpired("token expired")


def issue_token(
    verifier: Verifier,
    claims: Mapping[str, Any],
    *,
    ttl: float | None,
    now: float | None = None,
) -> str:
    """Sign `claims` with the first key that can sign (for `pgws token`); `ttl` sets `exp`."""
    signing = verifier.signing_key
    if signing is None:
        raise ConfigError("PGWS_JWT_SECRET", "holds only public keys, which cannot sign tokens")
    kid, algorithm, key = signing
    body = dict(claims)
    if ttl is not None:
        body["exp"] = int((time.time() if now is None else now) + ttl)
    headers = {"kid": kid} if kid is not None else None
    token: str = jws.sign(json.dumps(body).encode(), key, headers=headers, algorithm=algorithm)
    return token
