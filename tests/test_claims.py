"""Token verification and SPEC 2 rules: from a request path to a Grant, or a refusal."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import math
import urllib.parse
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st
from jose import jwk, jws, jwt

from pgws.claims import (
    MODES,
    Grant,
    Verifier,
    authorize,
    grant_for,
    issue_token,
)
from pgws.envelope import EnvelopeWriter
from pgws.errors import (
    BadRequest,
    ConfigError,
    Forbidden,
    HandshakeRefused,
    TokenExpired,
    Unauthorized,
)
from pgws.limits import MAX_CHANNEL_BYTES
from pgws.paths import parse_path
from tests.conftest import SECRET, make_token

pytestmark = pytest.mark.nodb

NOW = 1_700_000_000.0
VERIFIER = Verifier.from_secret(SECRET.encode())
KEY_A = b"key-a-key-a-key-a-key-a-key-a-key-a"
KEY_B = b"key-b-key-b-key-b-key-b-key-b-key-b"


def b64url(data: bytes) -> str:
    """Unpadded base64url, as in a JWS."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def segment(value: Any) -> str:
    """One JSON segment of a hand-built token."""
    return b64url(json.dumps(value).encode())


def hand_signed(header: dict[str, Any], claims: dict[str, Any], key: bytes | None) -> str:
    """A token built without jose: HMAC-SHA256 over it with `key`, or no signature at all."""
    signing_input = f"{segment(header)}.{segment(claims)}"
    if key is None:
        return signing_input + "."
    mac = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64url(mac)}"


def oct_jwk(key: bytes, **extra: Any) -> dict[str, Any]:
    """A symmetric JWK holding `key`."""
    return {"kty": "oct", "k": b64url(key), **extra}


def refusal(verifier: Verifier, path: str) -> HandshakeRefused:
    """The refusal `authorize` raises for `path` at NOW (fails the test if it grants)."""
    with pytest.raises(HandshakeRefused) as caught:
        authorize(verifier, path, now=NOW)
    return caught.value


def assert_invalid(verifier: Verifier, path: str) -> None:
    """`path` is refused with the one undifferentiated 401."""
    refused = refusal(verifier, path)
    assert type(refused) is Unauthorized
    assert refused.status == 401
    assert str(refused) == "invalid token"


@pytest.fixture(scope="module")
def rsa_private_pem() -> bytes:
    """A fresh RSA private key, PEM (PKCS#8)."""
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return private.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


@pytest.fixture(scope="module")
def rsa_public_pem(rsa_private_pem: bytes) -> bytes:
    """The public half of `rsa_private_pem`, PEM (SubjectPublicKeyInfo)."""
    private = serialization.load_pem_private_key(rsa_private_pem, password=None)
    return private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.fixture(scope="module")
def rsa_verifier(rsa_public_pem: bytes) -> Verifier:
    """A verifier whose only key is the RSA public key, as a JWKS entry with kid `rsa-1`."""
    public = jwk.construct(rsa_public_pem, "RS256").to_dict()
    document = {"keys": [{**public, "kid": "rsa-1", "alg": "RS256"}]}
    return Verifier.from_secret(json.dumps(document).encode())


# --- signatures and algorithms ---------------------------------------------------------------


def test_hs256_with_plain_secret_is_accepted() -> None:
    """An HS256 token signed with the plain secret yields the channels, mode and claims it names."""
    claims = {"mode": "rw", "channels": ["a", "b"], "sub": "u1"}
    grant = authorize(VERIFIER, "/" + make_token(claims), now=NOW)
    assert grant == Grant(channels=("a", "b"), mode="rw", claims=claims, expires_at=None)
    assert grant.can_read
    assert grant.can_write


@pytest.mark.parametrize("algorithm", ["HS384", "HS512"])
def test_other_hmac_algorithms_are_refused_with_plain_secret(algorithm: str) -> None:
    """A plain secret is bound to HS256, so the same secret under HS384/HS512 gives 401."""
    token = make_token({"mode": "r", "channel": "a"}, algorithm=algorithm)
    assert_invalid(VERIFIER, "/" + token)


@pytest.mark.parametrize("algorithm", ["none", "None", "NONE"])
def test_unsigned_tokens_are_refused(algorithm: str) -> None:
    """A token whose header says `alg: none` (any case) never verifies."""
    token = hand_signed({"alg": algorithm, "typ": "JWT"}, {"mode": "r", "channel": "a"}, None)
    assert_invalid(VERIFIER, "/" + token)


def test_wrong_signature_is_refused() -> None:
    """An HS256 token signed with another secret gives the same 401 as any other failure."""
    token = make_token({"mode": "r", "channel": "a"}, secret="another-secret-another-secret")
    assert_invalid(VERIFIER, "/" + token)


def test_crit_header_is_refused() -> None:
    """A token with a `crit` header (extensions we do not understand) is refused."""
    token = jwt.encode({"mode": "r", "channel": "a"}, SECRET, headers={"crit": ["exp"]})
    assert_invalid(VERIFIER, "/" + token)


def test_garbage_token_is_refused() -> None:
    """Something that is not a JWS at all reads `invalid token`, like every decoding failure."""
    assert_invalid(VERIFIER, "/not-a-token")
    assert_invalid(VERIFIER, "/a.b.c")


# --- time claims ------------------------------------------------------------------------------


def test_expired_token_is_refused_as_expired() -> None:
    """A token whose `exp` has passed gives TokenExpired, 401, `token expired`."""
    token = make_token({"mode": "r", "channel": "a", "exp": NOW - 10})
    refused = refusal(VERIFIER, "/" + token)
    assert type(refused) is TokenExpired
    assert refused.status == 401
    assert str(refused) == "token expired"


def test_token_is_expired_at_exactly_exp() -> None:
    """At `now == exp` the token is already expired."""
    token = make_token({"mode": "r", "channel": "a", "exp": NOW})
    assert isinstance(refusal(VERIFIER, "/" + token), TokenExpired)


def test_future_exp_is_accepted_and_sets_expires_at() -> None:
    """A token that expires later is accepted and its Grant expires at `exp`."""
    token = make_token({"mode": "r", "channel": "a", "exp": NOW + 1})
    grant = authorize(VERIFIER, "/" + token, now=NOW)
    assert grant.expires_at == NOW + 1
    assert isinstance(grant.expires_at, float)


def test_future_nbf_is_refused() -> None:
    """A token not valid before a future time gives 401 `invalid token` (not `token expired`)."""
    token = make_token({"mode": "r", "channel": "a", "nbf": NOW + 60})
    assert_invalid(VERIFIER, "/" + token)


def test_nbf_now_is_accepted() -> None:
    """A token becomes valid exactly at `nbf`."""
    token = make_token({"mode": "r", "channel": "a", "nbf": NOW, "iat": NOW})
    assert authorize(VERIFIER, "/" + token, now=NOW).channels == ("a",)


@pytest.mark.parametrize("name", ["exp", "nbf", "iat"])
@pytest.mark.parametrize(
    "value",
    [
        str(int(NOW + 60)),
        True,
        False,
        [NOW + 60],
        {"at": NOW + 60},
        None,
        1e300,
        -1e300,
        10**400,
        float("nan"),
        float("inf"),
        float("-inf"),
    ],
    ids=lambda value: repr(value)[:16],
)
def test_mistyped_time_claims_are_refused(name: str, value: Any) -> None:
    """A time claim that is not a plausible number gives 401 `invalid token`, never a crash."""
    token = make_token({"mode": "r", "channel": "a", name: value})
    assert_invalid(VERIFIER, "/" + token)


# --- JWK and JWKS -----------------------------------------------------------------------------


@pytest.mark.parametrize("extra", [{"alg": "HS256"}, {}], ids=["with-alg", "without-alg"])
def test_oct_jwk_verifies_hs256(extra: dict[str, Any]) -> None:
    """An `oct` JWK (with `alg: HS256`, or without `alg`) verifies HS256 tokens of its key."""
    verifier = Verifier.from_secret(json.dumps(oct_jwk(KEY_A, **extra)).encode())
    token = make_token({"mode": "w", "channel": "a"}, secret=KEY_A.decode())
    assert authorize(verifier, "/" + token, now=NOW).mode == "w"
    assert verifier.algorithms == ("HS256",)


def test_jwk_alg_binds_the_algorithm() -> None:
    """An `oct` JWK with `alg: HS512` accepts HS512 tokens and refuses HS256 ones with its key."""
    verifier = Verifier.from_secret(json.dumps(oct_jwk(KEY_A, alg="HS512")).encode())
    claims = {"mode": "r", "channel": "a"}
    good = make_token(claims, secret=KEY_A.decode(), algorithm="HS512")
    assert authorize(verifier, "/" + good, now=NOW).channels == ("a",)
    assert_invalid(verifier, "/" + make_token(claims, secret=KEY_A.decode()))


def test_jwks_kid_selects_the_key() -> None:
    """In a JWKS, the token's `kid` picks the key: right key and kid verify, right key with a
    wrong kid does not."""
    document = {"keys": [oct_jwk(KEY_A, kid="A"), oct_jwk(KEY_B, kid="B")]}
    verifier = Verifier.from_secret(json.dumps(document).encode())
    claims = {"mode": "r", "channel": "a"}
    signed_b_kid_b = jwt.encode(claims, KEY_B.decode(), headers={"kid": "B"})
    signed_b_kid_a = jwt.encode(claims, KEY_B.decode(), headers={"kid": "A"})
    signed_b_kid_z = jwt.encode(claims, KEY_B.decode(), headers={"kid": "Z"})
    assert authorize(verifier, "/" + signed_b_kid_b, now=NOW).channels == ("a",)
    assert_invalid(verifier, "/" + signed_b_kid_a)
    assert_invalid(verifier, "/" + signed_b_kid_z)


def test_jwks_rs256_public_key_verifies(rsa_verifier: Verifier, rsa_private_pem: bytes) -> None:
    """A JWKS with an RS256 public key verifies RS256 tokens signed by its private key."""
    token = jwt.encode(
        {"mode": "r", "channels": ["a"]},
        rsa_private_pem.decode(),
        algorithm="RS256",
        headers={"kid": "rsa-1"},
    )
    assert authorize(rsa_verifier, "/" + token, now=NOW).channels == ("a",)


def test_rs256_token_from_another_key_is_refused(rsa_verifier: Verifier) -> None:
    """An RS256 token signed by a different private key is refused."""
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = other.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    token = jwt.encode({"mode": "r"}, pem.decode(), algorithm="RS256", headers={"kid": "rsa-1"})
    assert_invalid(rsa_verifier, "/a/" + token)


@pytest.mark.parametrize("kid", ["rsa-1", None])
def test_algorithm_confusion_is_refused(
    rsa_verifier: Verifier, rsa_public_pem: bytes, kid: str | None
) -> None:
    """An HS256 token whose HMAC key is the RSA public key's PEM is refused (no alg confusion)."""
    header: dict[str, Any] = {"alg": "HS256", "typ": "JWT"}
    if kid is not None:
        header["kid"] = kid
    token = hand_signed(header, {"mode": "rw", "channels": ["a"]}, rsa_public_pem)
    assert_invalid(rsa_verifier, "/" + token)


def test_public_key_is_not_accepted_as_plain_secret(rsa_public_pem: bytes) -> None:
    """A PEM public key given as the plain secret is a configuration error, not an HMAC key."""
    with pytest.raises(ConfigError) as caught:
        Verifier.from_secret(rsa_public_pem)
    assert caught.value.name == "PGWS_JWT_SECRET"


# --- SPEC 2 rules 2-5 -------------------------------------------------------------------------


def forbidden(claims: dict[str, Any], requested: str | None) -> Forbidden:
    """The Forbidden that `grant_for` raises (fails the test if it grants)."""
    with pytest.raises(Forbidden) as caught:
        grant_for(claims, requested)
    assert caught.value.status == 403
    return caught.value


@pytest.mark.parametrize("requested", [None, "a"])
def test_missing_mode_is_forbidden(requested: str | None) -> None:
    """A token without `mode` gets 403 `missing mode`."""
    assert str(forbidden({"channels": ["a"]}, requested)) == "missing mode"


@pytest.mark.parametrize("mode", ["x", 1, "R", "", None, ["r"], "wr"], ids=repr)
def test_invalid_mode_is_forbidden(mode: Any) -> None:
    """A `mode` other than r, w or rw gets 403."""
    forbidden({"mode": mode, "channels": ["a"]}, None)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_each_valid_mode_is_granted(mode: str) -> None:
    """Modes r, w and rw are granted as they are."""
    grant = grant_for({"mode": mode, "channel": "a"}, None)
    assert grant.mode == mode
    assert grant.can_read == ("r" in mode)
    assert grant.can_write == ("w" in mode)


def test_channel_and_channels_are_merged_in_order_without_duplicates() -> None:
    """`channel` comes first, then `channels`, each name once, in first-seen order."""
    claims = {"mode": "r", "channel": "b", "channels": ["a", "b", "c", "a"]}
    assert grant_for(claims, None).channels == ("b", "a", "c")


def test_path_channel_must_be_allowed() -> None:
    """A path channel outside the token's channels gets 403 `not allowed: <channel>`."""
    refused = forbidden({"mode": "r", "channels": ["a", "b"]}, "room 1")
    assert str(refused) == "not allowed: room 1"


def test_allowed_path_channel_is_the_only_one_granted() -> None:
    """With an allowed channel in the path, the Grant holds just that channel."""
    assert grant_for({"mode": "r", "channel": "x", "channels": ["a", "b"]}, "b").channels == ("b",)


@pytest.mark.parametrize("claims", [{"mode": "r"}, {"mode": "r", "channels": []}])
def test_token_without_channels_opens_the_path_channel(claims: dict[str, Any]) -> None:
    """A token that names no channels is granted whatever channel the path names."""
    assert grant_for(claims, "anything").channels == ("anything",)


@pytest.mark.parametrize("claims", [{"mode": "r"}, {"mode": "r", "channels": []}])
def test_no_channels_anywhere_is_forbidden(claims: dict[str, Any]) -> None:
    """`/<jwt>` with a token naming no channels gets 403 `no channels`."""
    assert str(forbidden(claims, None)) == "no channels"
    token = make_token(claims)
    refused = refusal(VERIFIER, "/" + token)
    assert isinstance(refused, Forbidden)
    assert str(refused) == "no channels"


@pytest.mark.parametrize("requested", [None, "a"])
@pytest.mark.parametrize(
    "bad",
    [
        {"channels": "a"},
        {"channels": ["a", 1]},
        {"channels": {"a": 1}},
        {"channels": None},
        {"channels": [["a"]]},
        {"channel": 1},
        {"channel": ["a"]},
        {"channel": None},
    ],
    ids=repr,
)
def test_mistyped_channel_claims_are_forbidden(bad: dict[str, Any], requested: str | None) -> None:
    """A mistyped `channel`/`channels` claim gets 403; it is never read as "no claim" (which would
    open any path channel)."""
    forbidden({"mode": "rw", **bad}, requested)


def test_authorize_refuses_path_channel_not_allowed() -> None:
    """Through `authorize`, a verified token and a foreign path channel give 403."""
    token = make_token({"mode": "r", "channels": ["a"]})
    refused = refusal(VERIFIER, "/b/" + token)
    assert isinstance(refused, Forbidden)
    assert str(refused) == "not allowed: b"


# --- paths ----------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["/", "/?token=x"])
def test_missing_token_is_unauthorized(path: str) -> None:
    """A path with no token at all is refused like any token that does not verify."""
    assert_invalid(VERIFIER, path)


def test_malformed_path_is_refused_before_the_token() -> None:
    """A bad channel segment gives 400 even with a valid token."""
    token = make_token({"mode": "r", "channels": ["a"]})
    refused = refusal(VERIFIER, "/%ff/" + token)
    assert type(refused) is BadRequest


# --- issue_token ------------------------------------------------------------------------------


def test_issue_token_round_trip() -> None:
    """A token from `issue_token` verifies, keeps its claims and expires `ttl` seconds later."""
    claims = {"mode": "rw", "channels": ["a", "b"]}
    token = issue_token(VERIFIER, claims, ttl=600, now=NOW)
    grant = authorize(VERIFIER, "/" + token, now=NOW)
    assert grant.channels == ("a", "b")
    assert grant.expires_at is not None
    assert abs(grant.expires_at - (NOW + 600)) <= 1
    with pytest.raises(TokenExpired):
        authorize(VERIFIER, "/" + token, now=NOW + 601)


def test_issue_token_without_ttl_has_no_exp() -> None:
    """With `ttl=None` the token carries no `exp`."""
    token = issue_token(VERIFIER, {"mode": "r", "channel": "a"}, ttl=None)
    grant = authorize(VERIFIER, "/" + token, now=NOW)
    assert grant.expires_at is None
    assert "exp" not in grant.claims


def test_issue_token_uses_the_kid_of_a_jwks_key() -> None:
    """With a JWKS, the issued token names its key's kid and verifies against the set."""
    document = {"keys": [oct_jwk(KEY_A, kid="A"), oct_jwk(KEY_B, kid="B")]}
    verifier = Verifier.from_secret(json.dumps(document).encode())
    token = issue_token(verifier, {"mode": "r", "channel": "a"}, ttl=60, now=NOW)
    assert jwt.get_unverified_header(token)["kid"] == "A"
    assert authorize(verifier, "/" + token, now=NOW).channels == ("a",)


def test_issue_token_signs_with_a_private_jwk(
    rsa_private_pem: bytes, rsa_verifier: Verifier
) -> None:
    """A private RSA JWK signs RS256 tokens that the matching public JWKS verifies."""
    private = {**jwk.construct(rsa_private_pem, "RS256").to_dict(), "kid": "rsa-1"}
    signer = Verifier.from_secret(json.dumps(private).encode())
    token = issue_token(signer, {"mode": "r", "channel": "a"}, ttl=60, now=NOW)
    assert authorize(rsa_verifier, "/" + token, now=NOW).channels == ("a",)


def test_issue_token_needs_a_signing_key(rsa_verifier: Verifier) -> None:
    """A JWKS of public keys only cannot issue tokens: ConfigError."""
    with pytest.raises(ConfigError) as caught:
        issue_token(rsa_verifier, {"mode": "r"}, ttl=60)
    assert caught.value.name == "PGWS_JWT_SECRET"


# --- properties -------------------------------------------------------------------------------


def outcome_of(path: str) -> Grant | HandshakeRefused:
    """What `authorize` makes of `path` at NOW: a Grant, or the refusal it raised."""
    try:
        return authorize(VERIFIER, path, now=NOW)
    except HandshakeRefused as refused:
        return refused


VALID_TOKEN = jwt.encode({"mode": "rw", "channels": ["a", "b"]}, SECRET)
OPEN_TOKEN = jwt.encode({"mode": "r"}, SECRET)


@given(
    st.text()
    | st.builds("/{}".format, st.text())
    | st.builds(lambda a, b: f"/{a}/{b}", st.text(), st.text())
    | st.builds(lambda a, b: f"/{a}/{VALID_TOKEN}{b}", st.text(), st.text())
    | st.builds(lambda a, b: f"/{a}/{OPEN_TOKEN}{b}", st.text(), st.text())
)
def test_any_path_grants_or_refuses_cleanly(path: str) -> None:
    """Any path gives a Grant or a HandshakeRefused with status 400, 401 or 403; nothing else."""
    outcome = outcome_of(path)
    if isinstance(outcome, HandshakeRefused):
        assert outcome.status in {400, 401, 403}
    else:
        assert outcome.channels


json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**500), max_value=10**500)
    | st.floats()
    | st.text()
    | st.sampled_from(sorted(MODES))
    | st.floats(min_value=NOW - 100, max_value=NOW + 100)
)
json_values = st.recursive(
    json_scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=5), children, max_size=4)
    ),
    max_leaves=12,
)
claim_keys = st.sampled_from(["mode", "channel", "channels", "exp", "nbf", "iat"]) | st.text(
    max_size=8
)
claim_values = json_values | st.lists(st.text(max_size=5), max_size=4)


@settings(max_examples=300)
@given(
    claims=st.dictionaries(claim_keys, claim_values, max_size=8),
    requested=st.none() | st.sampled_from(["a", "room 1"]),
)
def test_any_signed_claims_grant_or_refuse_cleanly(
    claims: dict[str, Any], requested: str | None
) -> None:
    """Any JSON claims, correctly signed, give a sane Grant or a 401/403; nothing else escapes."""
    token = jwt.encode(claims, SECRET, algorithm="HS256")
    path = f"/{urllib.parse.quote(requested, safe='')}/{token}" if requested else f"/{token}"
    grant = outcome_of(path)
    if isinstance(grant, HandshakeRefused):
        assert grant.status in {401, 403}
    else:
        assert grant.mode in MODES
        assert grant.channels
        assert all(isinstance(channel, str) for channel in grant.channels)
        assert grant.expires_at is None or (
            math.isfinite(grant.expires_at) and grant.expires_at > NOW
        )


BIDI_CONTROLS = ["\u061c", "\u200e", "\u200f", *map(chr, range(0x202A, 0x202F))]
BIDI_CONTROLS += [*map(chr, range(0x2066, 0x206A))]
channel_names = st.text(
    st.characters(codec="utf-8", exclude_categories=["Cc"], exclude_characters=BIDI_CONTROLS),
    min_size=1,
    max_size=MAX_CHANNEL_BYTES,
).filter(lambda name: len(name.encode()) <= MAX_CHANNEL_BYTES)


@settings(max_examples=300)
@given(
    name=st.text(st.characters(exclude_categories=()), max_size=70)  # lone surrogates too
    | st.sampled_from(["", "a\x00b", "a" * 1000, "chat\u202egnp.exe", "a\ud800b", "a\x85b"]),
    key=st.sampled_from(["channel", "channels"]),
)
def test_any_claimed_channel_is_granted_only_if_the_path_would_accept_it(
    name: str, key: str
) -> None:
    """A claimed channel name is granted exactly when it could be named in the path; otherwise
    the token is refused with 403 and a reason that does not repeat the name (issue 8, item 15)."""
    claims: dict[str, Any] = {"mode": "r", key: name if key == "channel" else [name]}
    quoted = urllib.parse.quote(name, safe="", errors="surrogatepass")
    try:
        path_accepts = parse_path(f"/{quoted}/t") == (name, "t")
    except BadRequest:
        path_accepts = False
    if not path_accepts:
        with pytest.raises(Forbidden) as refused:
            grant_for(claims, None)
        assert str(refused.value).startswith("invalid channel claim: ")
        assert name not in str(refused.value) or not name
        return
    if name.endswith("*"):  # a wildcard grant (SPEC 8): it allows channels, names none itself
        with pytest.raises(Forbidden, match="no channels"):
            grant_for(claims, None)
        return
    assert grant_for(claims, None).channels == (name,)
    EnvelopeWriter(claims).build("WebsocketMessage", name, "hi", NOW).encode()


def deep(depth: int) -> str:
    """A JSON list nested `depth` levels deep."""
    return "[" * depth + "]" * depth


MAX_JSON_DEPTH = 32  # pgws.tokens.MAX_JSON_DEPTH, spelled out so this runs on older code too


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 990, 100_000])
def test_a_token_header_nested_too_deep_is_invalid(depth: int) -> None:
    """Before: RecursionError from jose's header parsing escaped `authorize` (issue 8, item 8)."""
    header = b64url(('{"alg":"HS256","x":' + deep(depth) + "}").encode())
    token = f"{header}.{segment({'mode': 'r'})}.{b64url(b'x' * 32)}"
    assert_invalid(VERIFIER, "/" + token)


@pytest.mark.parametrize("depth", [MAX_JSON_DEPTH, 500, 2000])
def test_signed_claims_nested_too_deep_are_invalid(depth: int) -> None:
    """Claims deeper than MAX_JSON_DEPTH are refused before anything walks or re-serialises them."""
    payload = '{"mode":"r","channel":"a","x":' + deep(depth) + "}"
    assert_invalid(VERIFIER, "/" + jws.sign(payload.encode(), SECRET, algorithm="HS256"))


def test_claims_nested_to_the_limit_are_accepted() -> None:
    """MAX_JSON_DEPTH levels in all (the claims object counts as one) still verify."""
    payload = '{"mode":"r","channel":"a","x":' + deep(MAX_JSON_DEPTH - 1) + "}"
    grant = authorize(VERIFIER, "/" + jws.sign(payload.encode(), SECRET, algorithm="HS256"))
    assert grant.channels == ("a",)


@pytest.mark.parametrize("number", ["1e400", "-1e400", "NaN", "Infinity", "-Infinity"])
def test_signed_claims_with_numbers_no_envelope_can_carry_are_invalid(number: str) -> None:
    """Python reads these as inf/nan, which JSON cannot carry: the token is refused (item 9)."""
    payload = f'{{"mode":"r","channel":"a","n":{number}}}'
    assert_invalid(VERIFIER, "/" + jws.sign(payload.encode(), SECRET, algorithm="HS256"))


def test_signed_claims_with_integers_beyond_64_bits_are_carried() -> None:
    """Big integers are valid JSON and the envelope writer carries them (stdlib fallback)."""
    payload = '{"mode":"r","channel":"a","n":18446744073709551616}'
    grant = authorize(VERIFIER, "/" + jws.sign(payload.encode(), SECRET, algorithm="HS256"))
    envelope = EnvelopeWriter(grant.claims).build("WebsocketMessage", "a", "hi", NOW)
    assert json.loads(envelope)["claims"]["n"] == 2**64


@pytest.mark.nodb
def test_der_public_key_or_certificate_is_never_an_hmac_secret() -> None:
    """A DER-encoded public key as PGWS_JWT_SECRET is refused: it must never verify HS256."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from pgws.claims import Verifier

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    der = key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    with pytest.raises(ConfigError, match="public key or certificate") as caught:
        Verifier.from_secret(der)
    assert caught.value.name == "PGWS_JWT_SECRET"


# PGWS_JWT_LEEWAY (issue 13 item 2): clock skew allowed on exp and nbf; 0 keeps the drop-in rules.

AT = 1_800_000_000.0


@pytest.mark.parametrize(
    ("claims", "leeway", "outcome"),
    [
        ({"exp": AT - 5}, 0.0, TokenExpired),
        ({"exp": AT - 5}, 10.0, None),
        ({"exp": AT - 10}, 10.0, TokenExpired),  # exp + leeway reached: expired, as at exp
        ({"nbf": AT + 5}, 0.0, Unauthorized),
        ({"nbf": AT + 5}, 10.0, None),
        ({"nbf": AT + 11}, 10.0, Unauthorized),
    ],
)
def test_leeway_widens_exp_and_nbf_by_that_many_seconds(
    claims: dict[str, Any], leeway: float, outcome: type[Exception] | None
) -> None:
    verifier = Verifier.from_secret(SECRET.encode(), leeway=leeway)
    token = make_token({"mode": "r", **claims})
    if outcome is None:
        assert verifier.verify(token, AT)["mode"] == "r"
    else:
        with pytest.raises(outcome):
            verifier.verify(token, AT)


def test_a_grant_under_leeway_expires_that_much_later() -> None:
    """The 3001 timer and the per-frame check read expires_at: both move with the leeway."""
    verifier = Verifier.from_secret(SECRET.encode(), leeway=30.0)
    token = make_token({"mode": "r", "exp": AT + 60})
    grant = authorize(verifier, f"/chat/{token}", AT)
    assert grant.expires_at == AT + 90
    assert grant.claims["exp"] == AT + 60  # the claims readers see are the token's own
    assert authorize(VERIFIER, f"/chat/{token}", AT).expires_at == AT + 60
