"""wss:// with PGWS_CERTIFICATE_FILE / PGWS_KEY_FILE, on certificates made here (SPEC 1)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import ipaddress
import json
import logging
import os
import ssl
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidMessage

from pgws.config import Config
from pgws.errors import ConfigError
from pgws.net import tls_context
from tests.conftest import (
    SECRET,
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    make_token,
    recv_json,
    subscribed,
    until,
)

PASSPHRASE = b"correct horse battery staple"
EX_CONFIG = 78


@dataclasses.dataclass(frozen=True)
class Pki:
    """Files of a test PKI: a root CA, an intermediate, and leaves for 127.0.0.1 and localhost."""

    ca: Path  # the root the clients trust
    leaf: Path  # signed by the root directly
    leaf_key: Path
    chain: Path  # a leaf signed by the intermediate, then the intermediate
    chain_key: Path
    bare_leaf: Path  # the same leaf as `chain`, without its intermediate
    other_key: Path  # a valid key that belongs to no certificate here
    encrypted_key: Path  # `leaf_key`, PKCS#8 encrypted with a passphrase
    encrypted_legacy_key: Path  # `leaf_key`, encrypted the traditional way (Proc-Type header)
    der_certificate: Path  # `leaf` in DER: a real certificate, but not PEM
    not_pem: Path  # a text file that is no PEM at all
    empty: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _certificate(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(_name(issuer))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        usage = x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        )  # fmt: skip
        builder = builder.add_extension(usage, critical=True)
    else:
        names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def _pem(certificate: x509.Certificate) -> bytes:
    return certificate.public_bytes(serialization.Encoding.PEM)


def _key_pem(
    key: ec.EllipticCurvePrivateKey,
    encryption: serialization.KeySerializationEncryption | None = None,
    key_format: serialization.PrivateFormat = serialization.PrivateFormat.PKCS8,
) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, key_format, encryption or serialization.NoEncryption()
    )


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """A fresh root CA, intermediate and leaves, written to files once per run."""
    folder = tmp_path_factory.mktemp("pki")
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(5)]
    root_key, intermediate_key, leaf_key, chain_key, other_key = keys
    root = _certificate("pgws test root", root_key, "pgws test root", root_key, ca=True)
    intermediate = _certificate(
        "pgws test intermediate", intermediate_key, "pgws test root", root_key, ca=True
    )
    leaf = _certificate("localhost", leaf_key, "pgws test root", root_key, ca=False)
    chained = _certificate(
        "localhost", chain_key, "pgws test intermediate", intermediate_key, ca=False
    )
    encrypt = serialization.BestAvailableEncryption(PASSPHRASE)
    contents = {
        "ca": _pem(root),
        "leaf": _pem(leaf),
        "leaf_key": _key_pem(leaf_key),
        "chain": _pem(chained) + _pem(intermediate),
        "chain_key": _key_pem(chain_key),
        "bare_leaf": _pem(chained),
        "other_key": _key_pem(other_key),
        "encrypted_key": _key_pem(leaf_key, encrypt),
        "encrypted_legacy_key": _key_pem(
            leaf_key, encrypt, serialization.PrivateFormat.TraditionalOpenSSL
        ),
        "der_certificate": leaf.public_bytes(serialization.Encoding.DER),
        "not_pem": b"this is not a certificate\n",
        "empty": b"",
    }
    paths = {}
    for field, data in contents.items():
        path = folder / f"{field}.pem"
        path.write_bytes(data)
        paths[field] = path
    return Pki(**paths)


def client_context(pki: Pki) -> ssl.SSLContext:
    """What a browser does: trust the root CA, verify the chain and the host name."""
    return ssl.create_default_context(cafile=pki.ca)


def wss_url(gateway: Running, path: str) -> str:
    return f"wss://127.0.0.1:{gateway.gateway.port}{path}"


async def round_trip(gateway: Running, pki: Pki) -> None:
    """An rw socket over wss:// receives its own message back through the database."""
    chat = channel_name()
    url = wss_url(gateway, f"/{chat}/{make_token({'mode': 'rw'})}")
    async with connect(url, ssl=client_context(pki), open_timeout=TIMEOUT) as ws:
        await subscribed(gateway, chat)
        await ws.send("over tls")
        envelope = await recv_json(ws)
    assert envelope["channel"] == chat
    assert envelope["payload"] == "over tls"


async def test_wss_socket_round_trips_a_message_through_the_database(
    start_gateway: StartGateway, pki: Pki
) -> None:
    """With a certificate and key, sockets are wss:// and messages still go through PostgreSQL."""
    gateway: Running = await start_gateway(certificate_file=pki.leaf, key_file=pki.leaf_key)
    await round_trip(gateway, pki)


async def test_certificate_file_with_a_chain_serves_the_intermediate(
    start_gateway: StartGateway, pki: Pki
) -> None:
    """A leaf + intermediate file verifies for a client that trusts only the root."""
    gateway: Running = await start_gateway(certificate_file=pki.chain, key_file=pki.chain_key)
    await round_trip(gateway, pki)


async def test_leaf_without_its_intermediate_does_not_verify(
    start_gateway: StartGateway, pki: Pki
) -> None:
    """The same leaf alone fails verification: the chain test really depends on the chain."""
    gateway: Running = await start_gateway(certificate_file=pki.bare_leaf, key_file=pki.chain_key)
    url = wss_url(gateway, f"/{channel_name()}/{make_token({'mode': 'r'})}")
    with pytest.raises(ssl.SSLCertVerificationError):
        async with connect(url, ssl=client_context(pki), open_timeout=TIMEOUT):
            pass


@pytest.mark.parametrize(
    "debug",
    [
        False,
        True,
    ],
    ids=["normal", "asyncio-debug"],
)
async def test_plain_clients_on_the_tls_port_fail_quietly_and_the_server_keeps_serving(
    start_gateway: StartGateway, pki: Pki, caplog: pytest.LogCaptureFixture, debug: bool
) -> None:
    """ws:// and plain HTTP on the TLS port fail on the client side, log no error, harm nothing."""
    gateway: Running = await start_gateway(certificate_file=pki.leaf, key_file=pki.leaf_key)
    loop = asyncio.get_running_loop()
    was_debug = loop.get_debug()
    loop.set_debug(debug)
    caplog.set_level(logging.DEBUG)
    caplog.clear()
    try:
        plain = f"ws://127.0.0.1:{gateway.gateway.port}/{channel_name()}/"
        with pytest.raises(InvalidMessage):
            async with connect(plain + make_token({"mode": "r"}), open_timeout=TIMEOUT):
                pass
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.port)
            writer.write(b"GET / HTTP/1.1\r\nHost: localhost\r\n\r\n")
            await writer.drain()
            with contextlib.suppress(ConnectionResetError):
                answer = await reader.read()
                assert not answer.startswith(b"HTTP/"), answer
            writer.close()
        await round_trip(gateway, pki)
    finally:
        loop.set_debug(was_debug)
    loud = [r for r in caplog.records if r.levelno >= logging.ERROR]
    traced = [r for r in caplog.records if r.levelno > logging.DEBUG and r.exc_info]
    assert not loud, [r.getMessage() for r in loud]
    assert not traced, [r.getMessage() for r in traced]


async def test_a_big_static_file_arrives_whole_over_tls(
    start_gateway: StartGateway, pki: Pki, tmp_path: Path
) -> None:
    """Static files are streamed on a wss:// port too: 20 MiB arrive intact, then the close."""
    data = os.urandom(20 * 1024 * 1024)
    (tmp_path / "big.bin").write_bytes(data)
    gateway: Running = await start_gateway(
        root_path=tmp_path, certificate_file=pki.leaf, key_file=pki.leaf_key
    )
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gateway.gateway.port, ssl=client_context(pki)
        )
        writer.write(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        raw = await reader.read()
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
    assert f"Content-Length: {len(data)}".encode() in head.split(b"\r\n")
    assert body == data


# --- start-up failures: one ConfigError naming the variable ------------------------------------


def tls_env(certificate: Path | None, key: Path | None) -> dict[str, str]:
    env = {"PGWS_DB_URI": "postgresql://127.0.0.1:1/x", "PGWS_JWT_SECRET": SECRET}
    if certificate is not None:
        env["PGWS_CERTIFICATE_FILE"] = str(certificate)
    if key is not None:
        env["PGWS_KEY_FILE"] = str(key)
    return env


def startup_error(env: dict[str, str]) -> ConfigError:
    """The ConfigError start-up stops with: settings first, then the TLS files themselves."""
    with pytest.raises(ConfigError) as caught:
        tls_context(Config.from_env(env))
    return caught.value


BAD_TLS = {
    # case: (certificate field, key field, variable named, words in the message)
    "key-of-another-certificate": ("leaf", "other_key", "PGWS_KEY_FILE", "does not match"),
    "encrypted-pkcs8-key": ("leaf", "encrypted_key", "PGWS_KEY_FILE", "is encrypted"),
    "encrypted-legacy-key": ("leaf", "encrypted_legacy_key", "PGWS_KEY_FILE", "is encrypted"),
    "certificate-not-pem": ("not_pem", "leaf_key", "PGWS_CERTIFICATE_FILE", "no PEM certificate"),
    "certificate-in-der": (
        "der_certificate",
        "leaf_key",
        "PGWS_CERTIFICATE_FILE",
        "no PEM certificate",
    ),
    "certificate-empty": ("empty", "leaf_key", "PGWS_CERTIFICATE_FILE", "no PEM certificate"),
    "key-is-a-certificate": ("leaf", "leaf", "PGWS_KEY_FILE", "no PEM private key"),
    "key-not-pem": ("leaf", "not_pem", "PGWS_KEY_FILE", "no PEM private key"),
    "key-empty": ("leaf", "empty", "PGWS_KEY_FILE", "no PEM private key"),
    "both-not-pem": ("not_pem", "not_pem", "PGWS_CERTIFICATE_FILE", "no PEM certificate"),
}


@pytest.mark.nodb
@pytest.mark.parametrize(("certificate", "key", "variable", "words"), BAD_TLS.values(), ids=BAD_TLS)
def test_unusable_tls_files_are_a_config_error_naming_the_variable(
    pki: Pki, certificate: str, key: str, variable: str, words: str
) -> None:
    """Each unusable certificate or key stops start-up with one line naming the right variable."""
    certificate_path, key_path = getattr(pki, certificate), getattr(pki, key)
    error = startup_error(tls_env(certificate_path, key_path))
    assert error.name == variable
    assert words in error.problem
    assert "\n" not in str(error)
    assert PASSPHRASE.decode() not in str(error)


@pytest.mark.nodb
@pytest.mark.parametrize("missing", ["PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE"])
def test_a_missing_tls_file_is_a_config_error(pki: Pki, tmp_path: Path, missing: str) -> None:
    """A certificate or key path that does not exist is refused, naming its variable."""
    env = tls_env(pki.leaf, pki.leaf_key)
    env[missing] = str(tmp_path / "nonexistent.pem")
    error = startup_error(env)
    assert (error.name, error.problem) == (missing, f"no such file: {env[missing]!r}")


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("only", "missing"),
    [("PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE"), ("PGWS_KEY_FILE", "PGWS_CERTIFICATE_FILE")],
)
def test_only_one_tls_file_is_a_config_error_naming_the_other(
    pki: Pki, only: str, missing: str
) -> None:
    """Setting one of the two TLS variables without the other names the one that is missing."""
    env = tls_env(pki.leaf, pki.leaf_key)
    del env[missing]
    error = startup_error(env)
    assert error.name == missing
    assert "must be set too" in error.problem


@pytest.mark.nodb
def test_tls_file_gone_after_validation_is_a_config_error(pki: Pki, tmp_path: Path) -> None:
    """A key that vanished between reading the settings and loading it still names its variable."""
    key = tmp_path / "key.pem"
    key.write_bytes(pki.leaf_key.read_bytes())
    config = Config.from_env(tls_env(pki.leaf, key))
    key.unlink()
    with pytest.raises(ConfigError) as caught:
        tls_context(config)
    assert caught.value.name == "PGWS_KEY_FILE"
    assert "cannot read" in caught.value.problem


@pytest.mark.nodb
def test_good_tls_files_make_a_server_context(pki: Pki) -> None:
    """A matching certificate chain and key give a TLS 1.2+ server context; no files, no TLS."""
    context = tls_context(Config.from_env(tls_env(pki.chain, pki.chain_key)))
    assert context is not None
    assert context.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert tls_context(Config.from_env(tls_env(None, None))) is None


CLI_CASES = ["encrypted-pkcs8-key", "key-of-another-certificate", "certificate-not-pem"]


@pytest.mark.nodb
@pytest.mark.parametrize("case", CLI_CASES)
def test_pgws_serve_exits_78_with_one_line_on_unusable_tls_files(pki: Pki, case: str) -> None:
    """`pgws serve` with stdin closed neither prompts nor hangs: status 78, one `Error:` line."""
    certificate, key, variable, words = BAD_TLS[case]
    env = {
        "PATH": os.environ.get("PATH", ""),
        "PGWS_RETRIES": "1",
        **tls_env(getattr(pki, certificate), getattr(pki, key)),
    }
    result = subprocess.run(
        [sys.executable, "-m", "pgws", "serve"],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
        start_new_session=True,  # no controlling terminal: a prompt could not reach anyone
    )
    assert result.returncode == EX_CONFIG, result.stderr
    assert result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"Error: {variable}: ")
    assert words in lines[0]


async def test_an_event_stream_works_over_tls(start_gateway: StartGateway, pki: Pki) -> None:
    """GET /events on a TLS port: the stream takes over the TLS transport and carries messages."""
    gateway: Running = await start_gateway(certificate_file=pki.leaf, key_file=pki.leaf_key)
    chat = channel_name()
    token = make_token({"mode": "r"})
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", gateway.gateway.port, ssl=client_context(pki)
        )
        writer.write(f"GET /events?ch={chat}&token={token} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK\r\n"), head
        assert await reader.readuntil(b"\n\n") == b"id: pgws\n\n"
        await until(lambda: bool(gateway.gateway.registry._events.get(chat)), "the stream")
        async with await psycopg.AsyncConnection.connect(
            gateway.config.db_uri, autocommit=True
        ) as db:
            await gateway.notify(db, {"channel": chat, "n": 1})
        event = await reader.readuntil(b"\n\n")
        writer.close()
    assert json.loads(event.removeprefix(b"data: "))["data"] == {"channel": chat, "n": 1}
