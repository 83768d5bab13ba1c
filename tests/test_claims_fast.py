"""The HMAC fast path of token verification answers exactly as python-jose does.

`Verifier` checks HMAC-signed tokens with `hmac` directly (pgws.tokens.hmac_payload) instead of
jose's `jws.verify`. Whatever the token, the fast path must accept it iff jose accepts it, and
give the same claims: these tests compare it with jose on tokens built to be almost right
(signed with the wrong secret or algorithm, one character changed, cut, padded, headers jose
cannot read) as well as right.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jose import jws
from jose.exceptions import JOSEError

from pgws.claims import Verifier
from pgws.errors import Unauthorized
from pgws.tokens import hmac_payload, token_shaped

SECRET = b"fast-path-secret-that-is-long-enough-0123"
OTHER = b"another-secret-that-is-also-long-enough-99"
HASHES = {"HS256": hashlib.sha256, "HS384": hashlib.sha384, "HS512": hashlib.sha512}
ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
NOW = 1_800_000_000


def b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def signed(header: bytes, payload: bytes, secret: bytes, algorithm: str) -> str:
    signing_input = f"{b64(header)}.{b64(payload)}"
    signature = hmac.new(secret, signing_input.encode(), HASHES[algorithm]).digest()
    return f"{signing_input}.{b64(signature)}"


headers = st.one_of(
    st.builds(
        lambda alg, extra: json.dumps({"alg": alg, **extra}).encode(),
        st.sampled_from(["HS256", "HS384", "HS512", "none", "RS256", "", "hs256"]),
        st.dictionaries(st.sampled_from(["typ", "kid", "cty", "crit"]), st.text(max_size=4)),
    ),
    st.sampled_from(
        [
            '{"alg":"HS256"}'.encode("utf-16-le"),  # json.loads(bytes) reads it; jose does not
            b'\xef\xbb\xbf{"alg":"HS256"}',  # a UTF-8 byte order mark
            b'{"alg":"HS256"',
            b'["HS256"]',
            b'{"alg":"HS256","alg":"HS384"}',
            b'{"alg":"HS256", "x": NaN}',
        ]
    ),
    st.binary(max_size=24),
)
payloads = st.one_of(
    st.builds(
        lambda claims: json.dumps(claims).encode(),
        st.fixed_dictionaries(
            {"mode": st.sampled_from(["r", "w", "rw"])},
            optional={
                "exp": st.integers(NOW - 10, NOW + 10),
                "nbf": st.integers(NOW - 10, NOW + 10),
                "channels": st.lists(st.text(max_size=5), max_size=2),
            },
        ),
    ),
    st.binary(max_size=24),
)


@st.composite
def tokens(draw: st.DrawFn) -> str:
    """A token signed right or almost right, then perhaps damaged a little."""
    header, payload = draw(headers), draw(payloads)
    algorithm = draw(st.sampled_from(sorted(HASHES)))
    secret = draw(st.sampled_from([SECRET, SECRET, OTHER, SECRET + b"x", b""]))
    token = signed(header, payload, secret, algorithm)
    damage = draw(st.sampled_from(["none", "none", "swap", "cut", "extend", "drop", "segments"]))
    if damage == "none" or not token:
        return token
    at = draw(st.integers(0, len(token) - 1))
    char = draw(st.sampled_from(ALPHABET + "."))
    if damage == "swap":
        return token[:at] + char + token[at + 1 :]
    if damage == "cut":
        return token[:at]
    if damage == "extend":
        return token + draw(st.text(ALPHABET, min_size=1, max_size=4))
    if damage == "drop":
        return token[:at] + token[at + 1 :]
    head, body, signature = token.split(".")
    return ".".join(draw(st.permutations([head, body, signature])))


def jose_payload(token: str, secret: bytes, algorithm: str) -> bytes | None:
    try:
        payload: bytes = jws.verify(token, secret, algorithms=[algorithm])
    except JOSEError:
        return None
    return payload


@settings(max_examples=600, deadline=None)
@given(tokens(), st.sampled_from(sorted(HASHES)))
def test_the_fast_path_accepts_exactly_what_jose_accepts(token: str, algorithm: str) -> None:
    """For a token-shaped token whose header names the key's algorithm (the only ones the
    verifier hands it), hmac_payload returns jose's payload, or None when jose refuses."""
    if not token_shaped(token):
        return
    try:
        header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "==").decode())
    except ValueError:
        header = None
    fast = hmac_payload(token, SECRET, HASHES[algorithm])
    slow = jose_payload(token, SECRET, algorithm)
    if isinstance(header, dict) and header.get("alg") == algorithm:
        assert fast == slow
    else:
        assert slow is None  # the verifier never asks the fast path about these


def verdict(verifier: Verifier, token: str) -> tuple[str, Any]:
    try:
        return "ok", verifier.verify(token, NOW)
    except Unauthorized as exc:
        return type(exc).__name__, str(exc)


@settings(max_examples=600, deadline=None)
@given(tokens())
def test_a_verifier_answers_every_token_as_it_does_through_jose(token: str) -> None:
    """The whole verify(): same claims or the same refusal with and without the fast path, for
    a plain secret, a JWKS of HMAC keys and leeway on exp/nbf."""
    keys = json.dumps(
        {
            "keys": [
                {"kty": "oct", "alg": "HS384", "k": b64(OTHER)},
                {"kty": "oct", "alg": "HS256", "k": b64(SECRET)},
                {"kty": "oct", "alg": "HS512", "k": b64(SECRET)},
            ]
        }
    ).encode()
    for secret, leeway in ((SECRET, 0.0), (keys, 5.0)):
        fast = Verifier.from_secret(secret, leeway=leeway)
        slow = Verifier.from_secret(secret, leeway=leeway)
        slow._hmac.clear()  # the same verifier, every token through jose
        assert fast._hmac, "the fast path is in use"
        assert verdict(fast, token) == verdict(slow, token)


def test_a_valid_token_passes_and_the_usual_refusals_hold() -> None:
    """The fast path keeps the checks: alg pinned to the key, exp and nbf, a bad signature."""
    verifier = Verifier.from_secret(SECRET)
    header = b'{"alg":"HS256","typ":"JWT"}'
    good = signed(header, b'{"mode":"r","exp":1800000010}', SECRET, "HS256")
    assert verifier.verify(good, NOW)["mode"] == "r"
    refused = [
        signed(header, b'{"mode":"r"}', OTHER, "HS256"),  # wrong secret
        signed(b'{"alg":"HS512"}', b'{"mode":"r"}', SECRET, "HS512"),  # not this key's alg
        signed(b'{"alg":"none"}', b'{"mode":"r"}', SECRET, "HS256"),
        signed(header, b'{"mode":"r","nbf":1800000001}', SECRET, "HS256"),
        good[:-1] + ("A" if good[-1] != "A" else "B"),
    ]
    for token in refused:
        with pytest.raises(Unauthorized, match="invalid token"):
            verifier.verify(token, NOW)
    expired = signed(header, b'{"mode":"r","exp":1800000000}', SECRET, "HS256")
    with pytest.raises(Unauthorized, match="token expired"):
        verifier.verify(expired, NOW)
