"""Settings without a database: defaults, refusals, `@file`, base64, env files, keys (SPEC 1)."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import datetime
import json
import logging
import re
import ssl
import urllib.parse
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st
from jose import jwk

from pgws.claims import Verifier
from pgws.config import SETTINGS, Config
from pgws.db.connect import masked_db_uri
from pgws.envfile import parse_env_file
from pgws.errors import ConfigError
from pgws.net import tls_context
from pgws.settings_log import effective_settings, unknown_settings

pytestmark = pytest.mark.nodb

ROOT = Path(__file__).resolve().parent.parent
SECRET = "reallyreallyreallyreallyverysafe-test-secret"
PASSWORD = "hunter2-db-password"
DB_URI = f"postgresql://ann:{PASSWORD}@db.example:5432/app"
REQUIRED = {"PGWS_DB_URI": DB_URI, "PGWS_JWT_SECRET": SECRET}


def from_env(**settings: str) -> Config:
    """Config.from_env with the required settings plus `settings`."""
    return Config.from_env({**REQUIRED, **settings})


def refusal(env: dict[str, str]) -> ConfigError:
    """The ConfigError that Config.from_env raises for `env`."""
    with pytest.raises(ConfigError) as caught:
        Config.from_env(env)
    return caught.value


def rsa_private_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def public_pem(key: rsa.RSAPrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def public_jwk(key: rsa.RSAPrivateKey) -> dict[str, Any]:
    value: dict[str, Any] = jwk.construct(public_pem(key), "RS256").to_dict()
    return value


# --- defaults -------------------------------------------------------------------------------


def test_defaults_match_the_spec_table() -> None:
    """With only the two required variables set, every setting takes SPEC 1's default."""
    config = Config.from_env(REQUIRED)
    assert config.db_uri == DB_URI
    assert config.jwt_secret == SECRET.encode()
    assert config.host == "*4"
    assert config.port == 3000
    assert config.root_path is None
    assert config.listen_channel == "postgres-websockets-listener"
    assert config.meta_channel is None
    assert config.pool_size == 10
    assert config.retries == 5
    assert config.check_listener_interval is None
    assert config.certificate_file is None
    assert config.key_file is None
    assert not config.tls


def test_documented_defaults_are_the_real_defaults() -> None:
    """Writing out every default listed in SETTINGS gives the same Config as leaving them unset."""
    written = {s.name: s.default for s in SETTINGS if s.default is not None}
    assert Config.from_env({**written, **REQUIRED}) == Config.from_env(REQUIRED)


def test_dataclass_defaults_agree_with_the_environment_defaults() -> None:
    """A Config built directly (as tests do) has the defaults from_env gives."""
    assert Config(db_uri=DB_URI, jwt_secret=SECRET.encode()) == Config.from_env(REQUIRED)


def test_config_repr_hides_the_secret_and_the_database_uri() -> None:
    """repr(Config) shows neither the JWT secret nor the DB password."""
    text = repr(Config.from_env(REQUIRED))
    assert SECRET not in text
    assert PASSWORD not in text


def test_readme_settings_table_shows_every_setting_with_its_default() -> None:
    """README's settings table names every setting, each with the default SETTINGS declares."""
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| (`PGWS_[^|]*) \| ([^|]*) \|", readme, flags=re.MULTILINE)
    documented = {
        name: default.strip() for names, default in rows for name in re.findall(r"`(\w+)`", names)
    }
    declared = {
        s.name: "required" if s.required else f"`{s.default}`" if s.default else "unset"
        for s in SETTINGS
    }
    assert documented == declared


# --- invalid values -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("PGWS_PORT", "abc"),
        ("PGWS_PORT", "-1"),
        ("PGWS_PORT", "70000"),
        ("PGWS_PORT", "3000.5"),
        ("PGWS_POOL_SIZE", "0"),
        ("PGWS_POOL_SIZE", "many"),
        ("PGWS_RETRIES", "0"),
        ("PGWS_RETRIES", "-3"),
        ("PGWS_CHECK_LISTENER_INTERVAL", "x"),
        ("PGWS_CHECK_LISTENER_INTERVAL", "-5"),
        ("PGWS_CHECK_LISTENER_INTERVAL", "1.5"),
        ("PGWS_HOST", "local host"),
        ("PGWS_HOST", "http://example.com"),
        ("PGWS_JWT_SECRET_BASE64", "maybe"),
        ("PGWS_COMPRESSION", "maybe"),
        ("PGWS_MAX_MESSAGE_SIZE", "0"),
        ("PGWS_CLIENT_MAX_BUFFER", "10"),
        ("PGWS_SHUTDOWN_TIMEOUT", "0"),
        ("PGWS_SHUTDOWN_TIMEOUT", "soon"),
        ("PGWS_LISTEN_CHANNEL", "x" * 64),
        ("PGWS_LISTEN_CHANNEL", "tab\there"),
        ("PGWS_META_CHANNEL", "m" * 64),
        ("PGWS_ROOT_PATH", "/nonexistent/pgws-root"),
        ("PGWS_CERTIFICATE_FILE", "/nonexistent/cert.pem"),
        ("PGWS_KEY_FILE", "/nonexistent/key.pem"),
    ],
)
def test_invalid_value_is_a_config_error_naming_the_variable(name: str, value: str) -> None:
    """Each invalid value raises ConfigError whose message starts with the variable's name."""
    error = refusal({**REQUIRED, name: value})
    assert error.name == name
    assert str(error).startswith(f"{name}: ")
    assert error.exit_code == 78


def test_port_must_be_an_integer() -> None:
    """A non-numeric port is refused with the offending value quoted."""
    error = refusal({**REQUIRED, "PGWS_PORT": "abc"})
    assert str(error) == "PGWS_PORT: expected an integer, got 'abc'"


@pytest.mark.parametrize("port", ["0", "1", "3000", "65535"])
def test_port_accepts_the_whole_tcp_range(port: str) -> None:
    """Ports 0 (any free port) through 65535 are accepted."""
    assert from_env(PGWS_PORT=port).port == int(port)


@pytest.mark.parametrize(("value", "seconds"), [("0", None), ("1500", 1.5), ("10000", 10.0)])
def test_listener_interval_is_milliseconds_and_zero_means_off(
    value: str, seconds: float | None
) -> None:
    """PGWS_CHECK_LISTENER_INTERVAL is read as ms; 0 means no self-healing (None)."""
    assert from_env(PGWS_CHECK_LISTENER_INTERVAL=value).check_listener_interval == seconds


@pytest.mark.parametrize("name", ["PGWS_JWT_SECRET_BASE64", "PGWS_COMPRESSION"])
@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("true", True),
        ("True", True),
        ("TRUE", True),
        ("1", True),
        ("yes", True),
        ("YES", True),
        ("false", False),
        ("False", False),
        ("FALSE", False),
        ("0", False),
        ("no", False),
        ("No", False),
    ],
)
def test_booleans_accept_the_usual_spellings_in_any_case(
    name: str, value: str, expected: bool
) -> None:
    """true/false/1/0/yes/no in any case are booleans ("False" as sample-env writes it)."""
    if name == "PGWS_COMPRESSION":
        assert from_env(PGWS_COMPRESSION=value).compression is expected
    else:  # decoded when true, taken literally when false
        secret = base64.b64encode(SECRET.encode()).decode() if expected else SECRET
        assert from_env(PGWS_JWT_SECRET=secret, **{name: value}).jwt_secret == SECRET.encode()


@pytest.mark.parametrize("name", ["PGWS_DB_URI", "PGWS_JWT_SECRET"])
@pytest.mark.parametrize("value", [None, "", "   "])
def test_required_variable_must_be_set(name: str, value: str | None) -> None:
    """A missing or blank PGWS_DB_URI / PGWS_JWT_SECRET is `<NAME>: must be set`."""
    env = dict(REQUIRED)
    if value is None:
        del env[name]
    else:
        env[name] = value
    assert str(refusal(env)) == f"{name}: must be set"


def test_listen_channel_limit_is_63_bytes() -> None:
    """A 63-byte listen channel is accepted, 64 bytes (counted in UTF-8) is refused."""
    assert from_env(PGWS_LISTEN_CHANNEL="x" * 63).listen_channel == "x" * 63
    error = refusal({**REQUIRED, "PGWS_LISTEN_CHANNEL": "é" * 32})
    assert error.name == "PGWS_LISTEN_CHANNEL"
    assert "63 bytes" in error.problem


def test_root_path_must_be_a_directory(tmp_path: Path) -> None:
    """PGWS_ROOT_PATH naming a file is refused; naming a folder resolves it."""
    page = tmp_path / "index.html"
    page.write_text("<p>hi</p>")
    assert refusal({**REQUIRED, "PGWS_ROOT_PATH": str(page)}).name == "PGWS_ROOT_PATH"
    assert from_env(PGWS_ROOT_PATH=str(tmp_path)).root_path == tmp_path.resolve()


# --- @file ----------------------------------------------------------------------------------


@pytest.mark.parametrize("ending", ["\n", "\r\n", ""])
def test_at_file_reads_the_database_uri_without_its_trailing_newline(
    tmp_path: Path, ending: str
) -> None:
    """PGWS_DB_URI=@path reads the file, trailing newline stripped."""
    path = tmp_path / "db_uri"
    path.write_bytes((DB_URI + ending).encode())
    assert from_env(PGWS_DB_URI=f"@{path}").db_uri == DB_URI


def test_at_file_reads_the_jwt_secret_without_its_trailing_newline(tmp_path: Path) -> None:
    """PGWS_JWT_SECRET=@path reads the file, trailing newline stripped."""
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    assert from_env(PGWS_JWT_SECRET=f"@{path}").jwt_secret == SECRET.encode()


def test_at_file_secret_is_base64_decoded_when_asked(tmp_path: Path) -> None:
    """A base64 secret read from a file is decoded like an inline one."""
    path = tmp_path / "secret"
    path.write_text(base64.b64encode(SECRET.encode()).decode() + "\n")
    config = from_env(PGWS_JWT_SECRET=f"@{path}", PGWS_JWT_SECRET_BASE64="true")
    assert config.jwt_secret == SECRET.encode()


@pytest.mark.parametrize("name", ["PGWS_DB_URI", "PGWS_JWT_SECRET"])
def test_at_file_that_does_not_exist_names_the_variable(tmp_path: Path, name: str) -> None:
    """A missing `@file` is a ConfigError naming the variable and the path."""
    path = tmp_path / "absent"
    error = refusal({**REQUIRED, name: f"@{path}"})
    assert error.name == name
    assert str(path) in error.problem


@pytest.mark.parametrize("name", ["PGWS_DB_URI", "PGWS_JWT_SECRET"])
@pytest.mark.parametrize(
    "contents",
    [
        PASSWORD.encode() + b"\xff\xfe",  # not UTF-8
        b"\n\n",  # nothing but newlines
    ],
)
def test_at_file_refusal_never_shows_the_contents(
    tmp_path: Path, name: str, contents: bytes
) -> None:
    """An unreadable or empty `@file` is refused without echoing what the file holds."""
    path = tmp_path / "value"
    path.write_bytes(contents)
    error = refusal({**REQUIRED, name: f"@{path}"})
    assert error.name == name
    assert PASSWORD not in str(error)


def test_at_file_naming_a_directory_is_refused(tmp_path: Path) -> None:
    """`@folder` cannot be read and names the variable."""
    assert refusal({**REQUIRED, "PGWS_JWT_SECRET": f"@{tmp_path}"}).name == "PGWS_JWT_SECRET"


# --- base64 secrets -------------------------------------------------------------------------

# 20 bytes: its encoding ends in one `=` and uses the characters that differ between alphabets.
RAW_SECRET = bytes([0xFB, 0xFF, 0xBF, 0xFE, 0xEF]) + b"pgws-raw-secret"


@pytest.mark.parametrize(
    "encoded",
    [
        base64.b64encode(RAW_SECRET).decode(),
        base64.b64encode(RAW_SECRET).decode().rstrip("="),
        base64.urlsafe_b64encode(RAW_SECRET).decode(),
        base64.urlsafe_b64encode(RAW_SECRET).decode().rstrip("="),
    ],
    ids=["standard", "standard-unpadded", "url", "url-unpadded"],
)
def test_base64_secret_decodes_in_either_alphabet_with_or_without_padding(encoded: str) -> None:
    """PGWS_JWT_SECRET_BASE64=true decodes standard and URL-safe base64, padded or not."""
    assert re.search(r"[+/_-]", encoded)  # the alphabet actually matters for this value
    config = from_env(PGWS_JWT_SECRET=encoded, PGWS_JWT_SECRET_BASE64="true")
    assert config.jwt_secret == RAW_SECRET


@pytest.mark.parametrize("encoded", ["not*base64!", "abc$def", "abcde", "+/+/+"])
def test_invalid_base64_secret_is_refused(encoded: str) -> None:
    """A secret that is not base64 is refused when PGWS_JWT_SECRET_BASE64 is true."""
    error = refusal({**REQUIRED, "PGWS_JWT_SECRET": encoded, "PGWS_JWT_SECRET_BASE64": "yes"})
    assert error.name == "PGWS_JWT_SECRET"
    assert encoded not in str(error)


def test_base64_secret_is_taken_literally_when_the_flag_is_off() -> None:
    """Without PGWS_JWT_SECRET_BASE64 a base64-looking secret is used as is."""
    encoded = base64.b64encode(RAW_SECRET).decode()
    assert from_env(PGWS_JWT_SECRET=encoded).jwt_secret == encoded.encode()


# --- TLS files ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given_name", "missing_name"),
    [("PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE"), ("PGWS_KEY_FILE", "PGWS_CERTIFICATE_FILE")],
)
def test_tls_needs_both_files(tmp_path: Path, given_name: str, missing_name: str) -> None:
    """Setting only one of the certificate and key files is refused, naming the missing one."""
    path = tmp_path / "one.pem"
    path.write_text("pem")
    error = refusal({**REQUIRED, given_name: str(path)})
    assert error.name == missing_name


def test_nonexistent_certificate_file_is_refused(tmp_path: Path) -> None:
    """A certificate path that does not exist is refused even when the key exists."""
    key = tmp_path / "key.pem"
    key.write_text("pem")
    env = {**REQUIRED, "PGWS_CERTIFICATE_FILE": str(tmp_path / "no.pem"), "PGWS_KEY_FILE": str(key)}
    error = refusal(env)
    assert error.name == "PGWS_CERTIFICATE_FILE"
    assert "no such file" in error.problem


def self_signed(directory: Path, name: str, *, password: bytes | None = None) -> tuple[Path, Path]:
    """Write a fresh self-signed certificate and its key; return (certificate, key) paths."""
    key = rsa_private_key()
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(password)
        if password
        else serialization.NoEncryption()
    )
    cert_path, key_path = directory / f"{name}.crt", directory / f"{name}.key"
    cert_path.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption)
    )
    return cert_path, key_path


def test_matching_tls_files_give_a_server_context(tmp_path: Path) -> None:
    """Both TLS files set and matching: wss is on and the context loads."""
    cert, key = self_signed(tmp_path, "a")
    config = from_env(PGWS_CERTIFICATE_FILE=str(cert), PGWS_KEY_FILE=str(key))
    assert config.tls
    assert isinstance(tls_context(config), ssl.SSLContext)


def test_key_of_another_certificate_is_a_config_error(tmp_path: Path) -> None:
    """A key that does not match the certificate is a ConfigError naming PGWS_KEY_FILE."""
    cert, _ = self_signed(tmp_path, "a")
    _, other_key = self_signed(tmp_path, "b")
    config = from_env(PGWS_CERTIFICATE_FILE=str(cert), PGWS_KEY_FILE=str(other_key))
    with pytest.raises(ConfigError) as caught:
        tls_context(config)
    assert caught.value.name == "PGWS_KEY_FILE"


def test_encrypted_key_is_a_config_error(tmp_path: Path) -> None:
    """A passphrase-protected key is refused (pgws never prompts) with a ConfigError."""
    cert, key = self_signed(tmp_path, "a", password=b"passphrase")
    config = from_env(PGWS_CERTIFICATE_FILE=str(cert), PGWS_KEY_FILE=str(key))
    with pytest.raises(ConfigError) as caught:
        tls_context(config)
    assert caught.value.name == "PGWS_KEY_FILE"
    assert "encrypted" in caught.value.problem


def test_garbage_tls_files_are_a_config_error(tmp_path: Path) -> None:
    """Files that are not PEM at all are a ConfigError, not an ssl.SSLError."""
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    config = from_env(PGWS_CERTIFICATE_FILE=str(cert), PGWS_KEY_FILE=str(key))
    with pytest.raises(ConfigError):
        tls_context(config)


def test_plain_config_has_no_tls_context() -> None:
    """Without TLS files the server speaks plain ws:// (no context)."""
    assert tls_context(Config.from_env(REQUIRED)) is None


# --- secrets never in messages --------------------------------------------------------------


@pytest.mark.parametrize(
    "env",
    [
        {**REQUIRED, "PGWS_PORT": "abc"},
        {**REQUIRED, "PGWS_JWT_SECRET": f"{SECRET}!", "PGWS_JWT_SECRET_BASE64": "true"},
        {**REQUIRED, "PGWS_JWT_SECRET_BASE64": "maybe"},
        {**REQUIRED, "PGWS_LISTEN_CHANNEL": "x" * 80},
        {**REQUIRED, "PGWS_KEY_FILE": "/nonexistent/key.pem"},
        {"PGWS_DB_URI": DB_URI},
        {"PGWS_JWT_SECRET": SECRET},
    ],
    ids=["port", "base64", "bool", "channel", "tls", "no-secret", "no-db"],
)
def test_config_errors_never_contain_the_secret_or_the_db_password(env: dict[str, str]) -> None:
    """Whatever is wrong, the ConfigError message shows neither the JWT secret nor the password."""
    message = str(refusal(env))
    assert SECRET not in message  # also a prefix of the non-base64 secret
    assert PASSWORD not in message


# --- env files ------------------------------------------------------------------------------


def test_sample_env_parses_and_holds_every_exported_key() -> None:
    """The repository's sample-env parses, and every `export KEY=` line's key is in the result."""
    path = ROOT / "sample-env"
    values = parse_env_file(path)
    exported = re.findall(r"^export ([A-Z_][A-Z0-9_]*)=", path.read_text(), flags=re.MULTILINE)
    assert exported
    assert set(exported) <= set(values)
    assert values["PGWS_JWT_SECRET_BASE64"] == "False"
    assert values["PGWS_HOST"] == "*4"


def test_sample_env_is_a_valid_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    """sample-env plus a database URI is a valid Config (run from the repository root)."""
    monkeypatch.chdir(ROOT)
    values = parse_env_file(ROOT / "sample-env")
    config = Config.from_env({**values, "PGWS_DB_URI": DB_URI})
    assert config.check_listener_interval == 10.0
    assert config.meta_channel == "server-info"
    assert config.root_path is None  # an operator copying sample-env must choose an absolute path


def test_env_file_syntax(tmp_path: Path) -> None:
    """Quotes, `export `, comments and blank lines are understood as in sample-env."""
    path = tmp_path / "env"
    path.write_text(
        "# a comment\n"
        "\n"
        'export PGWS_HOST="*4"\n'
        "PGWS_PORT=3001  # trailing comment\n"
        "PGWS_META_CHANNEL='meta # not a comment'\n"
        '   PGWS_LISTEN_CHANNEL="with spaces"\n'
        "export PGWS_POOL_SIZE=4\n"
        "PGWS_ROOT_PATH=\n"
        "   \n"
        "## another comment\n"
    )
    assert parse_env_file(path) == {
        "PGWS_HOST": "*4",
        "PGWS_PORT": "3001",
        "PGWS_META_CHANNEL": "meta # not a comment",
        "PGWS_LISTEN_CHANNEL": "with spaces",
        "PGWS_POOL_SIZE": "4",
        "PGWS_ROOT_PATH": "",
    }


def test_malformed_env_file_line_is_reported_with_its_number(tmp_path: Path) -> None:
    """A line that is not KEY=value raises ConfigError naming the file and the line number."""
    path = tmp_path / "env"
    path.write_text("# settings\nPGWS_PORT=3000\nthis is not a setting\nPGWS_HOST=*4\n")
    with pytest.raises(ConfigError) as caught:
        parse_env_file(path)
    assert caught.value.name == "--env-file"
    assert "line 3" in caught.value.problem
    assert str(path) in caught.value.problem


def test_env_file_line_without_equals_is_refused(tmp_path: Path) -> None:
    """A bare `KEY` line (a forgotten `=value`) is refused with its line number, not dropped."""
    path = tmp_path / "env"
    path.write_text("PGWS_HOST=*4\nexport PGWS_PORT\n")
    with pytest.raises(ConfigError) as caught:
        parse_env_file(path)
    assert "line 2" in caught.value.problem


def test_bare_key_is_refused_even_when_a_later_line_sets_it(tmp_path: Path) -> None:
    """`KEY` then `KEY=value` is still a typo on the first line, not taken from the second."""
    path = tmp_path / "env"
    path.write_text("PGWS_HOST=*4\nPGWS_PORT\nPGWS_PORT=3001\n")
    with pytest.raises(ConfigError) as caught:
        parse_env_file(path)
    assert "line 2" in caught.value.problem


def test_a_key_alone_inside_a_quoted_value_is_part_of_the_value(tmp_path: Path) -> None:
    """A line that looks like a bare `KEY` inside a multi-line quoted value is no statement."""
    path = tmp_path / "env"
    path.write_text('PGWS_META_CHANNEL="first\nPGWS_META_CHANNEL\n"\n')
    assert parse_env_file(path) == {"PGWS_META_CHANNEL": "first\nPGWS_META_CHANNEL\n"}


def test_bad_env_file_line_is_refused_whatever_the_log_level(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """At PGWS_LOG_LEVEL=error (a SIGHUP reload) a bad line still stops, and logs nothing."""
    path = tmp_path / "env"
    path.write_text("PGWS_PORT=3000\nnot a setting\n")
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with pytest.raises(ConfigError) as caught:
            parse_env_file(path)
    finally:
        root.setLevel(level)
    assert "line 2" in caught.value.problem
    assert caplog.records == []  # python-dotenv's own warning went nowhere


def test_missing_env_file_is_a_config_error(tmp_path: Path) -> None:
    """A missing env file raises ConfigError, not OSError."""
    with pytest.raises(ConfigError) as caught:
        parse_env_file(tmp_path / "absent.env")
    assert caught.value.name == "--env-file"


def test_env_file_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    """An env file that is not UTF-8 text raises ConfigError."""
    path = tmp_path / "env"
    path.write_bytes(b"PGWS_PORT=\xff\xfe\n")
    with pytest.raises(ConfigError):
        parse_env_file(path)


KEYS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,20}", fullmatch=True)
VALUES = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\"'\\\n\r$"),
    max_size=40,
)


@given(
    values=st.dictionaries(KEYS, VALUES, max_size=8),
    export=st.booleans(),
)
def test_env_file_round_trips(
    tmp_path_factory: pytest.TempPathFactory, values: dict[str, str], export: bool
) -> None:
    """`KEY="value"` lines written for any simple dict parse back to the same dict."""
    prefix = "export " if export else ""
    path = tmp_path_factory.mktemp("env") / "env"
    path.write_text("".join(f'{prefix}{key}="{value}"\n' for key, value in values.items()))
    assert parse_env_file(path) == values


@given(content=st.text() | st.binary())
def test_env_file_parses_or_raises_config_error(
    tmp_path_factory: pytest.TempPathFactory, content: str | bytes
) -> None:
    """Arbitrary file content either parses to a dict of strings or raises ConfigError."""
    path = tmp_path_factory.mktemp("env") / "env"
    if isinstance(content, str):
        path.write_bytes(content.encode("utf-8", errors="surrogatepass"))
    else:
        path.write_bytes(content)
    with contextlib.suppress(ConfigError):
        values = parse_env_file(path)
        assert isinstance(values, dict)
        assert all(isinstance(k, str) and isinstance(v, str) for k, v in values.items())


# --- Verifier.from_secret -------------------------------------------------------------------


def test_pem_public_key_as_plain_secret_is_refused() -> None:
    """A PEM public key is never used as an HMAC secret."""
    with pytest.raises(ConfigError) as caught:
        Verifier.from_secret(public_pem(rsa_private_key()))
    assert caught.value.name == "PGWS_JWT_SECRET"


def test_bad_key_documents_are_config_errors() -> None:
    """A JWK with an unknown alg, an RSA JWK with alg HS256, an empty JWKS and other JSON fail."""
    oct_key = {"kty": "oct", "k": base64.urlsafe_b64encode(SECRET.encode()).decode()}
    rsa_as_hmac = {**public_jwk(rsa_private_key()), "alg": "HS256"}
    documents: list[Any] = [
        {**oct_key, "alg": "XS999"},
        {**oct_key, "alg": "none"},
        rsa_as_hmac,
        {"keys": []},
        {"keys": "nope"},
        {"keys": [42]},
        {"hello": "world"},
    ]
    for document in documents:
        with pytest.raises(ConfigError) as caught:
            Verifier.from_secret(json.dumps(document).encode())
        assert caught.value.name == "PGWS_JWT_SECRET", document
        assert oct_key["k"] not in str(caught.value)


def test_oct_jwk_without_alg_loads_as_hs256() -> None:
    """A JWK of kty oct with no alg is an HS256 key that can sign."""
    document = {"kty": "oct", "k": base64.urlsafe_b64encode(SECRET.encode()).decode().rstrip("=")}
    verifier = Verifier.from_secret(json.dumps(document).encode())
    assert verifier.algorithms == ("HS256",)
    assert verifier.signing_key is not None


def test_jwks_with_an_rs256_public_key_loads() -> None:
    """A JWKS holding one RS256 public key loads; it verifies but cannot sign."""
    document = {"keys": [{**public_jwk(rsa_private_key()), "kid": "k1"}]}
    verifier = Verifier.from_secret(json.dumps(document).encode())
    assert verifier.algorithms == ("RS256",)
    assert verifier.signing_key is None


def test_plain_secret_is_an_hs256_key() -> None:
    """A plain secret string becomes one HS256 key."""
    assert Verifier.from_secret(SECRET.encode()).algorithms == ("HS256",)


# --- unknown names and the `settings` line (issue 8 item 19) --------------------------------


@pytest.mark.parametrize(
    ("name", "guess"),
    [
        ("PGWS_PROT", "PGWS_PORT"),
        ("PGWS_MAX_CONECTIONS", "PGWS_MAX_CONNECTIONS"),
        ("PGWS_CHECK_LISTENER_INTERVALL", "PGWS_CHECK_LISTENER_INTERVAL"),
        ("pgws_port", "PGWS_PORT"),  # names are case-sensitive: lower case is ignored too
        ("PGWS_SOMETHING_ELSE", None),
    ],
)
def test_unknown_pgws_names_are_found_with_the_closest_setting(
    name: str, guess: str | None
) -> None:
    """A PGWS_* name that is no setting is reported with the setting it most likely meant."""
    assert unknown_settings([name, "PGWS_PORT", "HOME"]) == [(name, guess)]


def test_settings_and_internal_names_are_not_unknown() -> None:
    """Every real setting, the worker number and the test suite's PGWS_TEST_* pass silently."""
    names = [s.name for s in SETTINGS] + ["PGWS_WORKER_ID", "PGWS_TEST_DB_URI", "PATH"]
    assert unknown_settings(names) == []


@given(password=st.text(min_size=1).filter(lambda text: "\x00" not in text))
def test_masked_db_uri_never_shows_the_password(password: str) -> None:
    """Whatever the password, in a URI or in conninfo, the masked form does not contain it."""
    marked = f"PW-{password}"
    quoted = marked.replace("\\", "\\\\").replace("'", "\\'")
    for uri in (
        f"postgresql://ann:{urllib.parse.quote(marked, safe='')}@db.example:5432/app",
        f"host=db.example dbname=app password='{quoted}'",
        f"postgresql://ann@db.example/app?sslpassword={urllib.parse.quote(marked, safe='')}",
    ):
        masked = masked_db_uri(uri)
        assert marked not in masked
        assert "[redacted]" in masked


def test_effective_settings_show_every_field_but_no_secret() -> None:
    """The `settings` line has one entry per Config field; secret and password are masked."""
    config = from_env(PGWS_PORT="4000", PGWS_ALLOWED_ORIGINS="https://b.example,https://a.example")
    shown = effective_settings(config, mask_db_uri=masked_db_uri)
    assert set(shown) == {field.name for field in dataclasses.fields(Config)}
    assert shown["port"] == 4000
    assert shown["allowed_origins"] == ["https://a.example", "https://b.example"]
    assert shown["jwt_secret"] == "[redacted]"
    assert "db.example" in shown["db_uri"]
    text = json.dumps(shown)
    assert SECRET not in text
    assert PASSWORD not in text


@pytest.mark.nodb
@pytest.mark.parametrize(
    ("name", "value", "problem"),
    [
        ("PGWS_ALLOWED_ORIGINS", "app.example.com", "expected origins like"),
        ("PGWS_ALLOWED_ORIGINS", "https://a.example.com/path", "expected origins like"),
        ("PGWS_ALLOWED_ORIGINS", " , ", "lists no origin"),
        ("PGWS_MAX_CHANNELS", "0", "between"),
        ("PGWS_MAX_CONNECTIONS", "none", "expected an integer"),
    ],
)
def test_new_settings_are_validated(name: str, value: str, problem: str) -> None:
    """Each hardening setting refuses bad values with a message naming it."""
    env = {"PGWS_DB_URI": "postgresql://x", "PGWS_JWT_SECRET": "s" * 32, name: value}
    with pytest.raises(ConfigError, match=problem) as caught:
        Config.from_env(env)
    assert caught.value.name == name
