"""The real `pgws` command in a subprocess: exit statuses, one-line errors, env files, tokens."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwk, jwt

from pgws import __version__
from pgws.config import SETTINGS
from tests.conftest import TIMEOUT, run_pgws

pytestmark = pytest.mark.nodb

SECRET = "reallyreallyreallyreallyverysafe-test-secret"
PASSWORD = "hunter2"
# Nothing listens on port 1: connecting is refused at once, so start-up fails fast.
UNREACHABLE = f"postgresql://u:{PASSWORD}@127.0.0.1:1/x"
# Valid except where a test breaks it; PGWS_RETRIES=1 so a config that is valid after all fails
# fast on the database (exit 69) instead of hanging.
BASE = {"PGWS_DB_URI": UNREACHABLE, "PGWS_JWT_SECRET": SECRET, "PGWS_RETRIES": "1"}
EX_CONFIG = 78
EX_UNAVAILABLE = 69
EX_SOFTWARE = 70


def config_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """Assert the run stopped on a bad setting with one clean line on stderr; return that line."""
    assert result.returncode == EX_CONFIG, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    return lines[0]


def public_key_pem() -> bytes:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"PGWS_DB_URI": None}, "Error: PGWS_DB_URI: must be set"),
        ({"PGWS_JWT_SECRET": None}, "Error: PGWS_JWT_SECRET: must be set"),
        ({"PGWS_PORT": "abc"}, "Error: PGWS_PORT: expected an integer, got 'abc'"),
        ({"PGWS_PORT": "70000"}, "Error: PGWS_PORT: "),
        ({"PGWS_POOL_SIZE": "0"}, "Error: PGWS_POOL_SIZE: "),
        ({"PGWS_RETRIES": "0"}, "Error: PGWS_RETRIES: "),
        ({"PGWS_CHECK_LISTENER_INTERVAL": "-5"}, "Error: PGWS_CHECK_LISTENER_INTERVAL: "),
        ({"PGWS_JWT_SECRET_BASE64": "maybe"}, "Error: PGWS_JWT_SECRET_BASE64: "),
        ({"PGWS_JWT_SECRET": "@/nonexistent/secret"}, "Error: PGWS_JWT_SECRET: "),
        # Issue 8 item 19: a broken JWK was taken as a 12-byte HMAC secret.
        ({"PGWS_JWT_SECRET": '{"kty": "oct",'}, "Error: PGWS_JWT_SECRET: starts with '{' but"),
        ({"PGWS_ROOT_PATH": "/nonexistent/www"}, "Error: PGWS_ROOT_PATH: "),
        # No level hides errors.
        ({"PGWS_LOG_LEVEL": "off"}, "Error: PGWS_LOG_LEVEL: expected one of debug, info, warning,"),
        ({"PGWS_LOG_LEVEL": "critical"}, "Error: PGWS_LOG_LEVEL: expected one of"),
        ({"PGWS_LISTEN_CHANNEL": "c" * 64}, "Error: PGWS_LISTEN_CHANNEL: "),
        # Issue 8 item 3: these escaped as tracebacks (UnicodeError from IDNA, AttributeError).
        ({"PGWS_HOST": "db..example.com"}, "Error: PGWS_HOST: 'db..example.com' is not a valid"),
        ({"PGWS_HOST": "a" * 64 + ".example"}, "Error: PGWS_HOST: "),
        ({"PGWS_JWT_SECRET": '{"kty": "oct", "k": 5}'}, "Error: PGWS_JWT_SECRET: the JWK is not"),
    ],
)
def test_bad_setting_exits_78_with_one_line(
    overrides: dict[str, str | None], expected: str
) -> None:
    """Each bad setting stops `pgws serve` with status 78 and one `Error: PGWS_…` line."""
    env = {**BASE, **overrides}
    line = config_error_line(run_pgws("serve", env={k: v for k, v in env.items() if v is not None}))
    assert line.startswith(expected)
    assert PASSWORD not in line
    assert SECRET not in line


def test_only_a_certificate_file_exits_78(tmp_path: Path) -> None:
    """PGWS_CERTIFICATE_FILE without PGWS_KEY_FILE is a configuration error naming the key file."""
    cert = tmp_path / "cert.pem"
    cert.write_text("pem\n")
    line = config_error_line(run_pgws("serve", env={**BASE, "PGWS_CERTIFICATE_FILE": str(cert)}))
    assert line.startswith("Error: PGWS_KEY_FILE: ")


def test_unloadable_tls_files_exit_78_before_touching_the_database(tmp_path: Path) -> None:
    """TLS files that are not a certificate and key exit 78 naming the bad file, not 69."""
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.write_text("not a certificate\n")
    key.write_text("not a key\n")
    env = {**BASE, "PGWS_CERTIFICATE_FILE": str(cert), "PGWS_KEY_FILE": str(key)}
    line = config_error_line(run_pgws("serve", env=env))
    assert line.startswith("Error: PGWS_CERTIFICATE_FILE: ")


def test_public_key_as_plain_secret_exits_78() -> None:
    """A PEM public key given as PGWS_JWT_SECRET stops start-up with status 78."""
    env = {**BASE, "PGWS_JWT_SECRET": public_key_pem().decode()}
    line = config_error_line(run_pgws("serve", env=env))
    assert line.startswith("Error: PGWS_JWT_SECRET: ")
    assert "BEGIN" not in line


def test_env_file_is_read(tmp_path: Path) -> None:
    """`--env-file` supplies settings: the required ones from the file, then its bad port."""
    env_file = tmp_path / "pgws.env"
    env_file.write_text(
        f'export PGWS_DB_URI="{UNREACHABLE}"\nPGWS_JWT_SECRET={SECRET}\nPGWS_PORT=abc\n'
    )
    line = config_error_line(run_pgws("serve", "--env-file", str(env_file)))
    assert line == "Error: PGWS_PORT: expected an integer, got 'abc'"


def test_environment_wins_over_the_env_file(tmp_path: Path) -> None:
    """A variable set in both places takes the environment's value."""
    env_file = tmp_path / "pgws.env"
    env_file.write_text("PGWS_PORT=abc\n")
    line = config_error_line(
        run_pgws("serve", "--env-file", str(env_file), env={**BASE, "PGWS_PORT": "xyz"})
    )
    assert line == "Error: PGWS_PORT: expected an integer, got 'xyz'"


def test_missing_env_file_exits_78(tmp_path: Path) -> None:
    """`--env-file` naming a file that does not exist exits 78 with one line."""
    missing = tmp_path / "absent.env"
    line = config_error_line(run_pgws("serve", "--env-file", str(missing), env=BASE))
    assert line.startswith("Error: --env-file: ")
    assert str(missing) in line


def test_malformed_env_file_exits_78_with_the_line_number(tmp_path: Path) -> None:
    """A malformed env file exits 78 and names the bad line."""
    env_file = tmp_path / "pgws.env"
    env_file.write_text("PGWS_PORT=3000\nnot a setting\n")
    line = config_error_line(run_pgws("serve", "--env-file", str(env_file), env=BASE))
    assert "line 2" in line


def test_version_prints_the_version() -> None:
    """`pgws --version` prints the package version and exits 0."""
    result = run_pgws("--version")
    assert result.returncode == 0, result.stderr
    assert __version__ in result.stdout


def test_serve_help_lists_every_setting() -> None:
    """`pgws serve --help` names every variable in pgws.config.SETTINGS."""
    result = run_pgws("serve", "--help")
    assert result.returncode == 0, result.stderr
    missing = [s.name for s in SETTINGS if s.name not in result.stdout]
    assert not missing


def test_token_prints_a_token_the_secret_verifies() -> None:
    """`pgws token` signs the requested mode, channels, extra claims and exp with the secret."""
    before = time.time()
    result = run_pgws(
        "token",
        *("--mode", "r", "--channel", "a", "--channel", "b", "--ttl", "60"),
        *("--claim", "user=ann", "--claim", "n=3"),
        env={"PGWS_JWT_SECRET": SECRET},
    )
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["mode"] == "r"
    assert claims["channels"] == ["a", "b"]
    assert claims["user"] == "ann"
    assert claims["n"] == 3
    assert before + 60 - 2 <= claims["exp"] <= time.time() + 60 + 2


def test_token_reads_the_secret_from_the_env_file(tmp_path: Path) -> None:
    """`pgws token --env-file` takes PGWS_JWT_SECRET from the file."""
    env_file = tmp_path / "pgws.env"
    env_file.write_text(f'PGWS_JWT_SECRET="{SECRET}"\n')
    result = run_pgws("token", "--env-file", str(env_file), "--ttl", "0")
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert claims == {"mode": "rw"}


def test_token_with_only_public_keys_exits_78() -> None:
    """`pgws token` cannot sign with a JWKS of public keys and says so in one line."""
    public = jwk.construct(public_key_pem(), "RS256").to_dict()
    env = {"PGWS_JWT_SECRET": json.dumps({"keys": [public]})}
    line = config_error_line(run_pgws("token", env=env))
    assert line.startswith("Error: PGWS_JWT_SECRET: ")
    assert "public key" in line


def test_token_without_a_secret_exits_78() -> None:
    """`pgws token` with no PGWS_JWT_SECRET exits 78 saying it must be set."""
    assert config_error_line(run_pgws("token")) == "Error: PGWS_JWT_SECRET: must be set"


def test_unreachable_database_exits_69_after_the_retries() -> None:
    """Without a database `pgws serve` exits 69 after PGWS_RETRIES attempts, password unshown."""
    started = time.monotonic()
    result = run_pgws("serve", env={**BASE, "PGWS_RETRIES": "2", "PGWS_PORT": "0"})
    elapsed = time.monotonic() - started
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    assert elapsed < TIMEOUT
    assert "Traceback" not in result.stderr
    lines = result.stderr.splitlines()
    assert lines[-1].startswith("Error: ")
    assert "2 attempts" in lines[-1]
    assert [line for line in lines if line.startswith("Error:")] == lines[-1:]
    assert PASSWORD not in result.stdout + result.stderr
    assert SECRET not in result.stdout + result.stderr


def log_events(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    """The JSON log lines of a `pgws serve --json-logs` run (the last line is its exit message)."""
    return [json.loads(line) for line in result.stderr.splitlines() if line.startswith("{")]


def test_unknown_pgws_names_warn_with_a_did_you_mean_and_start_anyway(tmp_path: Path) -> None:
    """Mistyped PGWS_* names, in the environment or the env file, are warned about, not fatal."""
    env_file = tmp_path / "pgws.env"
    env_file.write_text("PGWS_POOLSIZE=3\n")
    typos = {"PGWS_PROT": "4000", "PGWS_MAX_CONECTIONS": "3", "PGWS_CHECK_LISTENER_INTERVALL": "1"}
    result = run_pgws("serve", "--json-logs", "--env-file", str(env_file), env={**BASE, **typos})
    assert result.returncode == EX_UNAVAILABLE, result.stderr  # it went on to the database
    warned = [event for event in log_events(result) if event["event"] == "setting_unknown"]
    unknown = {event["name"]: event["did_you_mean"] for event in warned}
    assert unknown == {
        "PGWS_PROT": "PGWS_PORT",
        "PGWS_MAX_CONECTIONS": "PGWS_MAX_CONNECTIONS",
        "PGWS_CHECK_LISTENER_INTERVALL": "PGWS_CHECK_LISTENER_INTERVAL",
        "PGWS_POOLSIZE": "PGWS_POOL_SIZE",
    }
    assert all(event["level"] == "warning" for event in warned)


def test_effective_settings_are_logged_once_without_secret_or_password(tmp_path: Path) -> None:
    """One `settings` line at start shows what pgws runs with; the secret and password never."""
    conninfo = f"host=127.0.0.1 port=1 dbname=x user=u password={PASSWORD}"
    env = {**BASE, "PGWS_DB_URI": conninfo, "PGWS_PORT": "4321", "PGWS_POOL_SIZE": "3"}
    result = run_pgws("serve", "--json-logs", env=env)
    assert result.returncode == EX_UNAVAILABLE, result.stderr
    [settings] = [e["settings"] for e in log_events(result) if e["event"] == "settings"]
    assert isinstance(settings, dict)
    assert settings["port"] == 4321
    assert settings["pool_size"] == 3
    assert settings["jwt_secret"] == "[redacted]"
    assert "password=[redacted]" in settings["db_uri"]
    assert "host=127.0.0.1" in settings["db_uri"]
    for text in (result.stdout, result.stderr):
        assert PASSWORD not in text
        assert SECRET not in text


def long_tmpdir(tmp_path: Path) -> Path:
    """A TMPDIR too deep for the workers' AF_UNIX notify sockets (108 bytes at most)."""
    folder = tmp_path / ("d" * 110)
    folder.mkdir()
    return folder


def test_unexpected_error_at_start_up_is_one_line_and_exit_70(tmp_path: Path) -> None:
    """An error no code path expects (here the OS refusing a socket path) is one line, exit 70."""
    env = {**BASE, "TMPDIR": str(long_tmpdir(tmp_path))}
    result = run_pgws("serve", "--json-logs", "--workers", "2", env=env)
    assert result.returncode == EX_SOFTWARE, result.stderr
    assert "Traceback" not in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("pgws: internal error at start-up: OSError (run with PGWS_DEBUG=1")
    assert not [line for line in result.stderr.splitlines() if not line.startswith("{")][:-1]
    for text in (result.stdout, result.stderr):
        assert PASSWORD not in text
        assert SECRET not in text


def test_pgws_debug_shows_the_traceback_of_an_internal_error(tmp_path: Path) -> None:
    """PGWS_DEBUG=1 (here from the env file) is a setting that lets the traceback through."""
    env_file = tmp_path / "pgws.env"
    env_file.write_text("PGWS_DEBUG=1\n")
    env = {**BASE, "TMPDIR": str(long_tmpdir(tmp_path))}
    result = run_pgws(
        "serve", "--json-logs", "--env-file", str(env_file), "--workers", "2", env=env
    )
    assert result.returncode == 1
    assert "setting_unknown" not in result.stderr
    assert "Traceback" in result.stderr
    assert "AF_UNIX path too long" in result.stderr
