"""PGWS_JWT_JWKS_URL against a real local HTTPS provider that rotates its keys (issue 13 item 1)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.exceptions import InvalidStatus

from pgws.claims import Verifier
from pgws.config import Config
from pgws.errors import ConfigError, KeyUnknown, Unauthorized
from pgws.jwks import REFRESH_MAX, REFRESH_MIN, JwksKeys, refresh_delay
from pgws.jwks_fetch import fetch_jwks
from pgws.keys import load_remote_jwks
from pgws.places import https_url, url_shown
from tests.conftest import SECRET, TIMEOUT, StartGateway, recv_json, run_pgws, until
from tests.jwks_provider import Provider, SigningKey, closed_port, running_provider, signing_key

NAME = "PGWS_JWT_JWKS_URL"
EX_CONFIG = 78


@pytest.fixture(scope="module")
def key_a() -> SigningKey:
    return signing_key("key-a")


@pytest.fixture(scope="module")
def key_b() -> SigningKey:
    return signing_key("key-b")


@pytest.fixture(scope="module")
def key_ec() -> SigningKey:
    return signing_key("key-ec", "ES256")


@pytest.fixture(scope="module")
def jwks_source(key_a: SigningKey, key_ec: SigningKey) -> JwksKeys:
    """A JwksKeys holding key-a and key-ec, installed without a fetch (no provider needed)."""
    source = JwksKeys("https://idp.invalid/jwks", unknown_kid_interval=0.0)
    source._install(load_remote_jwks(_document(key_a.public, key_ec.public), NAME))
    return source


@pytest.fixture
def provider(tmp_path: Path) -> Iterator[Provider]:
    with running_provider(tmp_path) as running:
        yield running


def claims(**extra: Any) -> dict[str, Any]:
    return {"mode": "rw", "channels": ["jwks-room"], **extra}


def jwks_for(provider: Provider, **options: Any) -> JwksKeys:
    """A JwksKeys for the provider, trusting its CA, loaded as at start-up."""
    source = JwksKeys(provider.url, ca_file=provider.ca_file, **options)
    source.load()
    return source


async def jwks_gateway(start_gateway: StartGateway, provider: Provider, **extra: Any) -> Any:
    return await start_gateway(
        jwt_secret=b"",
        jwt_jwks_url=provider.url,
        jwt_jwks_ca_file=provider.ca_file,
        **extra,
    )


async def refused_with(running: Any, token: str) -> int:
    """The HTTP status a handshake with `token` is refused with (fails if it is accepted)."""
    with pytest.raises(InvalidStatus) as refused:
        async with running.connect(f"/{token}"):
            pass
    return refused.value.response.status_code


# --- the URL setting ------------------------------------------------------------------------


@pytest.mark.nodb
@pytest.mark.parametrize(
    "url",
    [
        "https://idp.example.com/.well-known/jwks.json",
        "http://127.0.0.1:8080/jwks",
        "http://127.9.9.9/jwks",
        "http://localhost/jwks",
        "http://[::1]:9000/jwks",
    ],
)
def test_https_anywhere_and_http_only_on_loopback_are_taken(url: str) -> None:
    assert https_url(NAME, url) == url


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("http://idp.example.com/jwks", "must be https:// (http:// only for a loopback host)"),
        ("http://10.0.0.1/jwks", "must be https:// (http:// only for a loopback host)"),
        ("http://localhost.example.com/jwks", "must be https://"),
        ("ftp://idp.example.com/jwks", "expected an https:// URL"),
        ("idp.example.com/jwks", "expected an https:// URL"),
        ("https:///jwks", "expected an https:// URL"),
        ("https://idp.example.com:99999/jwks", "is not a valid URL"),
        ("https://idp.example.com/a b", "is not a valid URL"),
    ],
)
def test_other_urls_are_a_one_line_config_error(url: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        https_url(NAME, url)
    assert error.value.name == NAME
    assert problem in error.value.problem
    assert "\n" not in str(error.value)


@pytest.mark.nodb
def test_the_url_is_shown_without_credentials_query_or_fragment() -> None:
    url = "https://client:s3cret@idp.example.com:8443/jwks.json?api_key=k3y#frag"
    assert url_shown(url) == "https://idp.example.com:8443/jwks.json"
    with pytest.raises(ConfigError) as error:
        https_url(NAME, url.replace("https", "http"))
    assert "s3cret" not in str(error.value)
    assert "k3y" not in str(error.value)


@pytest.mark.nodb
def test_url_and_secret_together_are_refused() -> None:
    env = {"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET, NAME: "https://a/b"}
    with pytest.raises(ConfigError) as error:
        Config.from_env(env)
    assert str(error.value) == (
        "PGWS_JWT_JWKS_URL: and PGWS_JWT_SECRET are both set: keep one of them"
    )


@pytest.mark.nodb
@pytest.mark.parametrize("name", ["PGWS_JWT_JWKS_CACHE", "PGWS_JWT_JWKS_CA_FILE"])
def test_cache_and_ca_file_need_the_url(name: str, tmp_path: Path) -> None:
    env = {"PGWS_DB_URI": "postgresql://x/y", "PGWS_JWT_SECRET": SECRET, name: str(tmp_path / "f")}
    with pytest.raises(ConfigError) as error:
        Config.from_env(env)
    assert error.value.name == name


@pytest.mark.nodb
def test_a_url_alone_needs_no_secret(tmp_path: Path) -> None:
    env = {
        "PGWS_DB_URI": "postgresql://x/y",
        NAME: "https://idp.example.com/jwks",
        "PGWS_JWT_JWKS_CACHE": str(tmp_path / "jwks.json"),
    }
    config = Config.from_env(env)
    assert config.jwt_jwks_url == "https://idp.example.com/jwks"
    assert config.jwt_jwks_cache == tmp_path / "jwks.json"
    assert config.jwt_secret == b""
    assert "idp.example.com" not in repr(config)  # a query could hold a key


# --- Cache-Control --------------------------------------------------------------------------


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("header", "delay"),
    [
        (None, 300.0),
        ("public, max-age=600", 600.0),
        ('max-age="900", must-revalidate', 900.0),
        ("MAX-AGE=120", 120.0),
        ("max-age=5", REFRESH_MIN),
        ("max-age=0", REFRESH_MIN),
        ("no-cache", REFRESH_MIN),
        ("no-store, max-age=600", REFRESH_MIN),
        (f"max-age={10**12}", REFRESH_MAX),
        ("s-maxage=600", 300.0),
        ("max-age=abc", 300.0),
        ("", 300.0),
    ],
)
def test_the_schedule_follows_max_age_within_bounds(header: str | None, delay: float) -> None:
    assert refresh_delay(header) == delay


# --- what a provider's document may hold ----------------------------------------------------


def _document(*entries: Any) -> bytes:
    return json.dumps({"keys": list(entries)}).encode()


@pytest.mark.nodb
def test_keys_without_alg_take_rs256_or_their_curves_algorithm(
    key_a: SigningKey, key_ec: SigningKey
) -> None:
    bare_rsa = {k: v for k, v in key_a.public.items() if k != "alg"}
    bare_ec = {k: v for k, v in key_ec.public.items() if k != "alg"}
    remote = load_remote_jwks(_document(bare_rsa, bare_ec), NAME)
    assert [(key.kid, key.algorithm) for key in remote.keys] == [
        ("key-a", "RS256"),
        ("key-ec", "ES256"),
    ]
    assert not any(key.can_sign for key in remote.keys)


@pytest.mark.nodb
def test_entries_pgws_must_not_use_are_skipped_with_a_reason(
    key_a: SigningKey, key_ec: SigningKey
) -> None:
    remote = load_remote_jwks(
        _document(
            {**key_a.public, "use": "enc"},
            {"kty": "oct", "k": "c2VjcmV0", "kid": "shared"},
            {**key_a.public, "d": "AQAB"},
            {**key_ec.public, "alg": "ES384"},
            {**key_a.public, "alg": "HS256"},
            {**key_a.public, "key_ops": ["encrypt"]},
            {"kty": "RSA", "kid": "x5c-only", "x5c": ["MIIB"]},
            "not an object",
            key_ec.public,
        ),
        NAME,
    )
    assert [key.kid for key in remote.keys] == ["key-ec"]
    assert remote.skipped == (
        "key 0: not a signature key (use is not sig)",
        "key 1: a symmetric (oct) key is never public",
        "key 2: holds private key members",
        "key 3: alg ES384 needs curve P-384",
        "key 4: unsupported alg",
        "key 5: key_ops does not include verify",
        "key 6: is not a valid RS256 key",
        "key 7: not a JSON object",
    )


@pytest.mark.nodb
def test_a_short_rsa_key_is_skipped() -> None:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa
    from jose import jwk

    small = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505  # the point
    pem = small.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    public = jwk.construct(pem, "RS256").to_dict()
    with pytest.raises(ConfigError) as error:
        load_remote_jwks(_document({**public, "kid": "small"}), NAME)
    assert "RSA key of 1024 bits (pgws takes 2048 to 8192)" in error.value.problem


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("document", "problem"),
    [
        (b"<html>login</html>", "the document is not a JSON object"),
        (b"[]", "the document is not a JSON object"),
        (b'{"keys": {}}', "the document has no `keys` list (not a JWKS)"),
        (b'{"keys": []}', "the JWKS has no usable signature key (the list is empty)"),
        (b"[" * 100_000, "the document is not a JSON object"),
        (json.dumps({"keys": [1] * 65}).encode(), "the JWKS has 65 keys, more than 64"),
    ],
)
def test_a_document_that_is_no_usable_jwks_is_one_config_error(
    document: bytes, problem: str
) -> None:
    with pytest.raises(ConfigError) as error:
        load_remote_jwks(document, NAME)
    assert error.value.problem == problem


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
_FIELDS = st.sampled_from(["kty", "alg", "kid", "use", "crv", "x", "y", "n", "e", "key_ops", "d"])
_ENTRY = st.dictionaries(
    _FIELDS,
    _JSON | st.sampled_from(["RSA", "EC", "oct", "RS256", "ES256", "P-256", "sig", "AQAB", "AA"]),
    max_size=8,
)
HOSTILE = (
    st.binary(max_size=200)
    | _JSON.map(lambda value: json.dumps(value).encode())
    | st.lists(_ENTRY | _JSON, max_size=5).map(lambda keys: json.dumps({"keys": keys}).encode())
)


@pytest.mark.nodb
@settings(max_examples=300, deadline=None)
@given(HOSTILE)
def test_any_document_gives_keys_or_one_config_error(document: bytes) -> None:
    """A hostile JWKS never escapes as anything but ConfigError naming the setting, one line."""
    problem: ConfigError | None = None
    try:
        remote = load_remote_jwks(document, NAME)
    except ConfigError as error:
        problem = error
    if problem is not None:
        assert problem.name == NAME
        assert "\n" not in str(problem)
    else:
        assert remote.keys
        assert all(
            not key.can_sign and key.algorithm[:2] in ("RS", "PS", "ES") for key in remote.keys
        )


@pytest.mark.nodb
@settings(
    max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(HOSTILE)
def test_a_hostile_document_at_refetch_is_logged_and_the_old_keys_kept(
    provider: Provider, key_a: SigningKey, document: bytes
) -> None:
    """Served for real over HTTPS: the refetch keeps the keys it had, whatever came back."""
    provider.serve(key_a)
    source = jwks_for(provider)
    provider.body = document
    asyncio.run(source.refresh())
    if source.kids != {"key-a"}:
        # Only a document with a usable key may replace the keys.
        remote = load_remote_jwks(document, NAME)
        assert source.keys == remote.keys


# --- fetching -------------------------------------------------------------------------------


@pytest.mark.nodb
def test_start_up_fetch_loads_the_keys_and_honours_max_age(
    provider: Provider, key_a: SigningKey, key_ec: SigningKey
) -> None:
    provider.serve(key_a, key_ec, cache_control="public, max-age=3600")
    source = jwks_for(provider)
    assert source.kids == {"key-a", "key-ec"}
    assert source.refresh_in == 3600.0
    assert provider.requests == ["/.well-known/jwks.json"]


@pytest.mark.nodb
def test_credentials_in_the_url_become_basic_auth_and_stay_out_of_errors(
    provider: Provider, key_a: SigningKey
) -> None:
    provider.serve(key_a)
    url = provider.url.replace("https://", "https://client:p%40ss@") + "?api_key=k3y"
    fetch_jwks(url, provider.ca_file)
    assert provider.auth == ["Basic Y2xpZW50OnBAc3M="]  # client:p@ss
    assert provider.requests == ["/.well-known/jwks.json?api_key=k3y"]
    provider.status = 500
    with pytest.raises(ConfigError) as error:
        fetch_jwks(url, provider.ca_file)
    assert str(error.value) == f"{NAME}: {url_shown(provider.url)} answered HTTP 500"


@pytest.mark.nodb
def test_a_redirect_is_followed_only_to_a_url_the_setting_would_take(
    provider: Provider, key_a: SigningKey
) -> None:
    provider.serve(key_a)
    provider.status, provider.location = 302, "/moved/jwks.json"
    with pytest.raises(ConfigError):  # followed: the same server answers 302 again, then gives up
        fetch_jwks(provider.url, provider.ca_file)
    assert provider.requests[:2] == ["/.well-known/jwks.json", "/moved/jwks.json"]
    provider.location = "http://idp.example.com/jwks.json?k=s3cret"
    with pytest.raises(ConfigError) as error:
        fetch_jwks(provider.url, provider.ca_file)
    assert str(error.value) == (
        f"{NAME}: must be https:// (http:// only for a loopback host),"
        " got http://idp.example.com/jwks.json"
    )


@pytest.mark.nodb
@settings(max_examples=300, deadline=None)
@given(
    header=st.dictionaries(
        st.sampled_from(["alg", "kid", "typ", "crit", "jwk"]),
        st.none() | st.integers() | st.text(max_size=12) | st.lists(st.text(max_size=4)),
    ),
    body=st.binary(max_size=40),
    signature=st.binary(max_size=40),
)
def test_any_token_against_jwks_keys_is_claims_or_a_401(
    jwks_source: JwksKeys, header: dict[str, Any], body: bytes, signature: bytes
) -> None:
    """Whatever the header says (kid of any type, any alg), a JWKS verifier only refuses with
    Unauthorized (KeyUnknown being one)."""
    import base64

    def part(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    token = ".".join([part(json.dumps(header).encode()), part(body), part(signature)])
    verifier = Verifier((), source=jwks_source)
    with contextlib.suppress(Unauthorized):
        verifier.verify(token)


@pytest.mark.nodb
def test_a_provider_trickling_its_answer_is_cut_off_at_the_timeout(
    provider: Provider, key_a: SigningKey
) -> None:
    """Each byte comes within the socket timeout, but the whole body may not take longer."""
    provider.serve(key_a)
    provider.trickle = 0.05  # the ~1 KB document would take about a minute
    with pytest.raises(ConfigError) as error:
        fetch_jwks(provider.url, provider.ca_file, timeout=0.5)
    assert error.value.problem == f"cannot fetch {provider.url}: too slow (timed out)"


@pytest.mark.nodb
def test_a_certificate_not_from_the_ca_is_refused(provider: Provider, key_a: SigningKey) -> None:
    """Without PGWS_JWT_JWKS_CA_FILE the system's CAs are used, which never signed this one."""
    provider.serve(key_a)
    with pytest.raises(ConfigError) as error:
        fetch_jwks(provider.url)
    assert "TLS certificate not trusted" in error.value.problem


@pytest.mark.nodb
def test_start_up_with_the_provider_down_is_a_config_error(tmp_path: Path) -> None:
    url = f"https://127.0.0.1:{closed_port()}/jwks"
    with pytest.raises(ConfigError) as error:
        JwksKeys(url).load()
    assert str(error.value) == f"{NAME}: cannot fetch {url}: Connection refused"
    with pytest.raises(ConfigError) as error:
        JwksKeys(url, cache_file=tmp_path / "jwks.json").load()
    assert str(error.value).endswith(f"; and no cached copy yet at {str(tmp_path / 'jwks.json')!r}")


@pytest.mark.nodb
def test_the_cache_written_at_a_good_fetch_serves_a_start_with_the_provider_down(
    tmp_path: Path, key_a: SigningKey
) -> None:
    cache = tmp_path / "jwks.json"
    with running_provider(tmp_path) as provider:
        provider.serve(key_a)
        jwks_for(provider, cache_file=cache)
        url, ca_file = provider.url, provider.ca_file
    assert json.loads(cache.read_text())["keys"][0]["kid"] == "key-a"
    later = JwksKeys(url, cache_file=cache, ca_file=ca_file)
    later.load()  # the provider is gone now
    assert later.kids == {"key-a"}
    assert later.loaded is not None
    assert later.loaded["source"] == "cache"
    assert later.refresh_in == REFRESH_MIN  # try the provider again soon
    assert "Connection refused" in later.loaded["fetch_error"]


@pytest.mark.nodb
def test_an_unwritable_cache_is_a_start_up_error(provider: Provider, key_a: SigningKey) -> None:
    provider.serve(key_a)
    with pytest.raises(ConfigError) as error:
        jwks_for(provider, cache_file=Path("/proc/pgws-jwks.json"))
    assert error.value.name == "PGWS_JWT_JWKS_CACHE"


# --- refetching, on the verifier -------------------------------------------------------------


@pytest.mark.nodb
async def test_unknown_kids_cause_one_refetch_per_interval_however_many(
    provider: Provider, key_a: SigningKey
) -> None:
    """Random kids: the first asks for a refetch, the others wait on it or are refused at once."""
    provider.serve(key_a)
    now = [1000.0]
    source = jwks_for(provider, clock=lambda: now[0])
    verifier = Verifier((), source=source)
    unknown = [key_a.sign(claims(), kid=uuid.uuid4().hex) for _ in range(50)]
    async with asyncio.TaskGroup() as tasks:
        refreshing = tasks.create_task(source.refresh_forever())
        waits = []
        for token in unknown:
            try:
                verifier.verify(token)
            except KeyUnknown as exc:
                waits.append(exc)
            except Unauthorized:
                pass
        assert len(waits) == 50  # all wait for the one refetch already asked for
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(wait.refetched() for wait in waits))
        for token in unknown:  # the same kids again, within the interval: refused at once
            with pytest.raises(Unauthorized) as refused:
                verifier.verify(token)
            assert type(refused.value) is Unauthorized
        assert provider.count == 2  # start-up, and one refetch
        now[0] += 31.0
        with pytest.raises(KeyUnknown):
            verifier.verify(unknown[0])  # a new interval: one more refetch may happen
        refreshing.cancel()


@pytest.mark.nodb
async def test_a_kid_bound_to_another_algorithm_is_refused_without_refetch(
    provider: Provider, key_a: SigningKey, key_ec: SigningKey
) -> None:
    provider.serve(key_a, key_ec)
    source = jwks_for(provider)
    verifier = Verifier((), source=source)
    assert verifier.verify(key_ec.sign(claims()))["mode"] == "rw"
    forged = key_a.sign(claims(), kid="key-ec")  # RS256 under the ES256 key's kid
    with pytest.raises(Unauthorized) as refused:
        verifier.verify(forged)
    assert type(refused.value) is Unauthorized
    hs = SigningKey("key-a", "HS256", SECRET.encode(), {})
    with pytest.raises(Unauthorized):
        verifier.verify(hs.sign(claims()))  # HS256 under an RSA key's kid
    assert provider.count == 1


@pytest.mark.nodb
async def test_the_schedule_refetches_without_any_token(
    provider: Provider, key_a: SigningKey, key_b: SigningKey
) -> None:
    """max-age=0 with a 0.05 s lower bound: the task refetches by itself and takes new keys."""
    provider.serve(key_a, cache_control="max-age=0")
    source = jwks_for(provider, refresh_min=0.05)
    assert source.refresh_in == 0.05
    provider.serve(key_b, cache_control="max-age=3600")
    async with asyncio.TaskGroup() as tasks:
        refreshing = tasks.create_task(source.refresh_forever())
        await until(lambda: source.kids == {"key-b"}, "the scheduled refetch")
        refreshing.cancel()
    assert source.refresh_in == 3600.0  # bounded by refresh_max (a day) only


@pytest.mark.nodb
async def test_a_failed_refetch_keeps_the_keys_and_retries_at_the_lower_bound(
    provider: Provider, key_a: SigningKey
) -> None:
    provider.serve(key_a, cache_control="max-age=3600")
    source = jwks_for(provider)
    provider.status = 503
    await source.refresh()
    assert source.kids == {"key-a"}
    assert source.refresh_in == REFRESH_MIN


# --- a gateway serving sockets ------------------------------------------------------------------


async def test_rotation_mid_run_new_key_accepted_removed_key_refused(
    start_gateway: StartGateway, provider: Provider, key_a: SigningKey, key_b: SigningKey
) -> None:
    """The provider swaps key-a for key-b: no restart; key-b tokens get in, key-a ones do not."""
    provider.serve(key_a, cache_control="max-age=3600")
    running = await jwks_gateway(start_gateway, provider)
    old_token = key_a.sign(claims())
    async with running.connect(f"/{old_token}") as ws:
        await ws.send("before rotation")
        assert (await recv_json(ws))["payload"] == "before rotation"
    provider.serve(key_b, cache_control="max-age=3600")
    async with running.connect(f"/{key_b.sign(claims())}") as ws:  # waits for the refetch
        await ws.send("after rotation")
        assert (await recv_json(ws))["payload"] == "after rotation"
    assert await refused_with(running, old_token) == 401
    assert provider.count == 2


async def test_random_kids_at_the_gateway_do_not_hammer_the_provider(
    start_gateway: StartGateway, provider: Provider, key_a: SigningKey
) -> None:
    provider.serve(key_a)
    running = await jwks_gateway(start_gateway, provider)
    tokens = [key_a.sign(claims(), kid=uuid.uuid4().hex) for _ in range(20)]
    statuses = await asyncio.gather(*(refused_with(running, token) for token in tokens))
    assert statuses == [401] * 20
    assert provider.count == 2  # start-up, and one refetch for all twenty
    async with running.connect(f"/{key_a.sign(claims())}"):
        pass  # the known key still works


async def test_a_v2_auth_frame_with_a_new_kid_waits_for_the_refetch(
    start_gateway: StartGateway, provider: Provider, key_a: SigningKey, key_b: SigningKey
) -> None:
    provider.serve(key_a)
    running = await jwks_gateway(start_gateway, provider)
    provider.serve(key_a, key_b)
    async with running.connect("/", subprotocols=["pgws.v2"]) as ws:
        await ws.send(json.dumps({"op": "auth", "ref": 1, "token": key_b.sign(claims())}))
        reply = await recv_json(ws)
    assert reply["op"] == "ok", reply
    assert provider.count == 2


async def test_sighup_reload_refetches_and_keeps_audience_checks(
    start_gateway: StartGateway, provider: Provider, key_a: SigningKey, key_b: SigningKey
) -> None:
    provider.serve(key_a)
    running = await jwks_gateway(start_gateway, provider, jwt_audience="app")
    provider.serve(key_b)
    changed = running.gateway.reload(running.config)
    assert changed == []
    await until(lambda: running.gateway.jwks.kids == {"key-b"}, "the SIGHUP refetch")
    async with running.connect(f"/{key_b.sign(claims(aud='app'))}"):
        pass
    assert await refused_with(running, key_b.sign(claims(aud="other"))) == 401


# --- pgws serve -----------------------------------------------------------------------------


def serve_env(url: str, **extra: str) -> dict[str, str]:
    return {"PGWS_DB_URI": "postgresql://u:pw@127.0.0.1:1/x", NAME: url, **extra}


@pytest.mark.nodb
def test_serve_with_the_provider_down_exits_78_with_one_line_without_secrets() -> None:
    url = f"https://client:s3cret@127.0.0.1:{closed_port()}/jwks?api_key=k3y"
    result = run_pgws("serve", env=serve_env(url))
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr == f"Error: {NAME}: cannot fetch {url_shown(url)}: Connection refused\n"
    assert result.stdout == ""


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("env", "line"),
    [
        (
            serve_env("http://idp.example.com/jwks?k=s3cret"),
            f"Error: {NAME}: must be https:// (http:// only for a loopback host),"
            " got http://idp.example.com/jwks",
        ),
        (
            serve_env("https://idp.example.com/jwks", PGWS_JWT_SECRET=SECRET),
            f"Error: {NAME}: and PGWS_JWT_SECRET are both set: keep one of them",
        ),
    ],
)
def test_serve_refuses_bad_jwks_settings_in_one_line(env: dict[str, str], line: str) -> None:
    result = run_pgws("serve", env=env)
    assert result.returncode == EX_CONFIG
    assert result.stderr == line + "\n"


async def test_serve_fetches_at_start_up_and_accepts_the_providers_tokens(
    serve_process: Any, provider: Provider, key_a: SigningKey, tmp_path: Path
) -> None:
    from websockets.asyncio.client import connect

    provider.serve(key_a)
    cache = tmp_path / "jwks.json"
    serving, port = await serve_process(
        PGWS_JWT_SECRET=None,
        PGWS_JWT_JWKS_URL=provider.url,
        PGWS_JWT_JWKS_CA_FILE=str(provider.ca_file),
        PGWS_JWT_JWKS_CACHE=str(cache),
    )
    loaded = await serving.wait_for_event("jwks_loaded")
    assert loaded["kids"] == ["key-a"]
    assert loaded["url"] == provider.url
    assert provider.count == 1  # the CLI fetched once; the gateway reused it
    assert cache.exists()
    async with connect(f"ws://127.0.0.1:{port}/{key_a.sign(claims())}", open_timeout=TIMEOUT) as ws:
        await ws.send("hi")
        assert (await recv_json(ws))["payload"] == "hi"
    with contextlib.suppress(Exception):
        await serving.kill()


@pytest.mark.nodb
def test_pgws_token_says_a_providers_keys_cannot_sign() -> None:
    result = run_pgws("token", env=serve_env("https://idp.example.com/jwks"))
    assert result.returncode == EX_CONFIG
    assert result.stderr == (
        f"Error: {NAME}: holds the provider's public keys, which cannot sign tokens\n"
    )


async def test_each_worker_loads_the_keys_and_takes_a_rotation_by_itself(
    serve_process: Any, provider: Provider, key_a: SigningKey, key_b: SigningKey
) -> None:
    """--workers 2: the supervisor checks the URL once, each worker fetches its own keys, and a
    new kid is refetched by whichever worker sees it."""
    from websockets.asyncio.client import connect

    provider.serve(key_a)
    serving, port = await serve_process(
        PGWS_WORKERS="2",
        PGWS_JWT_SECRET=None,
        PGWS_JWT_JWKS_URL=provider.url,
        PGWS_JWT_JWKS_CA_FILE=str(provider.ca_file),
    )
    await serving.wait_for_event("workers_ready")
    loaded = [e for e in serving.events if e.get("event") == "jwks_loaded"]
    assert sorted(e["worker"] for e in loaded) == [0, 1]
    assert provider.count == 3
    provider.serve(key_b)
    for _ in range(6):  # whichever worker the kernel picks, key-b gets in
        async with connect(
            f"ws://127.0.0.1:{port}/{key_b.sign(claims())}", open_timeout=TIMEOUT
        ) as ws:
            await ws.send("hi")
            assert (await recv_json(ws))["payload"] == "hi"
    assert 4 <= provider.count <= 5  # at most one refetch per worker


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("body", "problem"),
    [
        (b"<html>sign in</html>", "the document is not a JSON object"),
        (b"[" * 50_000, "the document is not a JSON object"),
        (
            b'{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}',
            "the JWKS has no usable signature key (key 0: a symmetric (oct) key is never public)",
        ),
    ],
)
def test_serve_with_a_hostile_document_at_start_up_exits_78_with_one_line(
    provider: Provider, body: bytes, problem: str
) -> None:
    provider.body = body
    env = serve_env(provider.url, PGWS_JWT_JWKS_CA_FILE=str(provider.ca_file))
    result = run_pgws("serve", env=env)
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stderr == f"Error: {NAME}: {provider.url}: {problem}\n"
