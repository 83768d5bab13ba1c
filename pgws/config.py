"""Settings: one frozen `Config`, read once from the environment (and an env file) and passed down.

Every problem raises `ConfigError` naming the variable, so start-up can stop with one line and
exit status 78 before a port is bound. Values that may hold secrets are never echoed back.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import difflib
import io
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import psycopg
from dotenv.parser import parse_stream
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from pgws.errors import ConfigError
from pgws.limits import MAX_CHANNEL_BYTES, NOTIFY_PAYLOAD_LIMIT

# What all sockets' unsent data may take together: 256 MiB, a few hundred stalled readers.
DEFAULT_MAX_BUFFERED_TOTAL = 256 * 1024 * 1024

# No "critical" or "off": errors are never silenced.
LOG_LEVELS = ("debug", "info", "warning", "error")
_TRUE = {"true", "1", "yes", "on"}
_FALSE = {"false", "0", "no", "off", ""}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One environment variable: its name, its default as written in the env, and what it does."""

    name: str
    default: str | None
    help: str
    required: bool = False


SETTINGS: tuple[Setting, ...] = (
    Setting("PGWS_DB_URI", None, "libpq URI or conninfo; @FILE reads it from a file", True),
    Setting(
        "PGWS_JWT_SECRET",
        None,
        "HS256 secret, or a JWK / JWKS JSON object; @FILE reads it from a file",
        True,
    ),
    Setting("PGWS_JWT_SECRET_BASE64", "false", "the secret is base64/base64url encoded"),
    Setting("PGWS_HOST", "*4", "bind address: *4 all IPv4, *6 or * all IPv6 + IPv4, or a host"),
    Setting("PGWS_PORT", "3000", "TCP port"),
    Setting("PGWS_ROOT_PATH", None, "folder served as static files over plain HTTP"),
    Setting(
        "PGWS_LISTEN_CHANNEL",
        "postgres-websockets-listener",
        "the database channel pgws LISTENs on and NOTIFYs to",
    ),
    Setting("PGWS_META_CHANNEL", None, "channel that receives ConnectionOpen/Close events"),
    Setting("PGWS_POOL_SIZE", "10", "database connections used to send NOTIFY"),
    Setting("PGWS_RETRIES", "5", "connection attempts at start-up before giving up"),
    Setting(
        "PGWS_CHECK_LISTENER_INTERVAL",
        None,
        "ms between LISTEN connection checks; set = reconnect, unset/0 = exit when it dies",
    ),
    Setting("PGWS_CERTIFICATE_FILE", None, "TLS certificate (chain) file; with PGWS_KEY_FILE"),
    Setting("PGWS_KEY_FILE", None, "TLS private key file; with PGWS_CERTIFICATE_FILE"),
    Setting(
        "PGWS_MAX_MESSAGE_SIZE",
        str(NOTIFY_PAYLOAD_LIMIT),
        "largest client frame in bytes; larger frames close the socket with 1009",
    ),
    Setting(
        "PGWS_CLIENT_MAX_BUFFER",
        str(1024 * 1024),
        "unsent bytes a socket may queue before it is closed as a slow consumer",
    ),
    Setting(
        "PGWS_MAX_BUFFERED_TOTAL",
        str(DEFAULT_MAX_BUFFERED_TOTAL),
        "unsent bytes all sockets of a process may queue; past it the largest are closed as"
        " slow consumers (0 = no bound)",
    ),
    Setting("PGWS_COMPRESSION", "false", "offer permessage-deflate (costs ~50 KiB per socket)"),
    Setting("PGWS_SHUTDOWN_TIMEOUT", "5", "seconds allowed for a clean shutdown"),
    Setting(
        "PGWS_WORKERS", "1", "processes sharing the port (SO_REUSEPORT), each with its own LISTEN"
    ),
    Setting("PGWS_UVLOOP", "false", "run on uvloop (pip install 'pgws[fast]'); measure first"),
    Setting("PGWS_MAX_CHANNELS", "100", "most channels one socket may use"),
    Setting("PGWS_MAX_CONNECTIONS", None, "most open sockets; more get HTTP 503"),
    Setting("PGWS_JWT_AUDIENCE", None, "when set, every token's `aud` must include it"),
    Setting("PGWS_JWT_ISSUER", None, "when set, every token's `iss` must equal it"),
    Setting(
        "PGWS_ALLOWED_ORIGINS",
        None,
        "comma-separated Origins browsers may connect from (e.g. https://app.example.com)",
    ),
    Setting(
        "PGWS_LOG_LEVEL",
        "info",
        "debug, info, warning or error; warning silences the per-socket lines (errors always show)",
    ),
    Setting(
        "PGWS_DEBUG",
        "false",
        "on an internal error, print its traceback (it may show the database URI or secret)",
    ),
    Setting(
        "PGWS_AUTH_TIMEOUT", "5", "seconds a pgws.v2 socket without a token has to send `auth`"
    ),
    Setting(
        "PGWS_EXPIRY_WARNING", "60", "seconds before `exp` a pgws.v2 socket is sent `expiring`"
    ),
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Every setting pgws runs with; durations are float seconds, sizes bytes."""

    db_uri: str = dataclasses.field(repr=False)  # may hold a password
    jwt_secret: bytes = dataclasses.field(repr=False)
    host: str = "*4"  # SPEC: all IPv4 interfaces
    port: int = 3000
    root_path: Path | None = None
    listen_channel: str = "postgres-websockets-listener"
    meta_channel: str | None = None
    pool_size: int = 10
    retries: int = 5
    check_listener_interval: float | None = None  # None = exit when the listener dies
    certificate_file: Path | None = None
    key_file: Path | None = None
    max_message_size: int = NOTIFY_PAYLOAD_LIMIT
    client_max_buffer: int = 1024 * 1024
    max_buffered_total: int | None = DEFAULT_MAX_BUFFERED_TOTAL  # None = no bound
    compression: bool = False
    shutdown_timeout: float = 5.0
    workers: int = 1
    uvloop: bool = False  # asyncio's own loop measured as fast or faster (bench/README.md)
    max_channels: int = 100
    max_connections: int | None = None  # None = no limit
    jwt_audience: str | None = None
    jwt_issuer: str | None = None
    allowed_origins: frozenset[str] | None = None  # None = any Origin
    log_level: str = "info"
    auth_timeout: float = 5.0  # SPEC 8: first-frame auth
    expiry_warning: float = 60.0  # SPEC 8: `expiring`

    @property
    def tls(self) -> bool:
        """Whether sockets are served as wss:// (both TLS files are set)."""
        return self.certificate_file is not None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Config:
        """Build a Config from PGWS_* variables; raise ConfigError on the first bad one."""
        certificate_file = _existing_file(env, "PGWS_CERTIFICATE_FILE")
        key_file = _existing_file(env, "PGWS_KEY_FILE")
        if (certificate_file is None) != (key_file is None):
            missing = "PGWS_KEY_FILE" if key_file is None else "PGWS_CERTIFICATE_FILE"
            raise ConfigError(missing, "must be set too: TLS needs both a certificate and a key")
        return cls(
            db_uri=_db_uri(_read_at_file(env, "PGWS_DB_URI", _required(env, "PGWS_DB_URI"))),
            jwt_secret=read_jwt_secret(env),
            host=_host(env),
            port=_int(env, "PGWS_PORT", 3000, minimum=0, maximum=65535),
            root_path=_existing_dir(env, "PGWS_ROOT_PATH"),
            listen_channel=_channel(env, "PGWS_LISTEN_CHANNEL", "postgres-websockets-listener"),
            meta_channel=_optional_channel(env, "PGWS_META_CHANNEL"),
            pool_size=_int(env, "PGWS_POOL_SIZE", 10, minimum=1, maximum=1000),
            retries=_int(env, "PGWS_RETRIES", 5, minimum=1, maximum=1000),
            check_listener_interval=_interval_ms(env, "PGWS_CHECK_LISTENER_INTERVAL"),
            certificate_file=certificate_file,
            key_file=key_file,
            max_message_size=_int(
                env, "PGWS_MAX_MESSAGE_SIZE", NOTIFY_PAYLOAD_LIMIT, minimum=1, maximum=2**24
            ),
            client_max_buffer=_int(
                env, "PGWS_CLIENT_MAX_BUFFER", 1024 * 1024, minimum=1024, maximum=2**31
            ),
            max_buffered_total=_byte_bound(
                env, "PGWS_MAX_BUFFERED_TOTAL", DEFAULT_MAX_BUFFERED_TOTAL, minimum=1024
            ),
            compression=_bool(env, "PGWS_COMPRESSION", default=False),
            shutdown_timeout=_seconds(env, "PGWS_SHUTDOWN_TIMEOUT", 5.0),
            workers=_int(env, "PGWS_WORKERS", 1, minimum=1, maximum=256),
            uvloop=_bool(env, "PGWS_UVLOOP", default=False),
            max_channels=_int(env, "PGWS_MAX_CHANNELS", 100, minimum=1, maximum=100_000),
            max_connections=_optional_int(env, "PGWS_MAX_CONNECTIONS", minimum=1),
            jwt_audience=_raw(env, "PGWS_JWT_AUDIENCE"),
            jwt_issuer=_raw(env, "PGWS_JWT_ISSUER"),
            allowed_origins=_origins(env, "PGWS_ALLOWED_ORIGINS"),
            log_level=_choice(env, "PGWS_LOG_LEVEL", LOG_LEVELS, "info"),
            auth_timeout=_seconds(env, "PGWS_AUTH_TIMEOUT", 5.0),
            expiry_warning=_seconds(env, "PGWS_EXPIRY_WARNING", 60.0),
        )


# PGWS_* names that are not settings: the --workers supervisor gives each worker its number, and
# the test suite reads PGWS_TEST_*.
_NOT_SETTINGS = frozenset({"PGWS_WORKER_ID", "PGWS_SUPERVISOR_PID", "PGWS_PARENT_PIPE"})
_NOT_SETTINGS_PREFIX = "PGWS_TEST_"
REDACTED = "[redacted]"


def unknown_settings(names: Iterable[str]) -> list[tuple[str, str | None]]:
    """PGWS_* names (in any case) that are no setting, each with the closest setting, if any.

    The original server ignores unknown names, so these are warnings, not errors: a typo such as
    PGWS_MAX_CONECTIONS would otherwise run with the default without a word.
    """
    known = [setting.name for setting in SETTINGS]
    found = []
    for name in sorted(set(names)):
        upper = name.upper()
        if not upper.startswith("PGWS_") or name in known or name in _NOT_SETTINGS:
            continue
        if upper.startswith(_NOT_SETTINGS_PREFIX):
            continue
        guesses = difflib.get_close_matches(upper, known, n=1, cutoff=0.8)
        found.append((name, guesses[0] if guesses else None))
    return found


def effective_settings(config: Config) -> dict[str, Any]:
    """Every setting as pgws runs with it, for the `settings` log line at start.

    The JWT secret is never shown and passwords in the database URI are masked; durations are
    seconds, as in Config.
    """
    shown: dict[str, Any] = {}
    for field in dataclasses.fields(config):
        value = getattr(config, field.name)
        if isinstance(value, Path):
            value = str(value)
        elif isinstance(value, frozenset):
            value = sorted(value)
        shown[field.name] = value
    shown["db_uri"] = masked_db_uri(config.db_uri)
    shown["jwt_secret"] = REDACTED
    return shown


def masked_db_uri(value: str) -> str:
    """The connection string as key=value pairs, every password replaced by [redacted]."""
    try:
        params: dict[str, Any] = conninfo_to_dict(value)
    except psycopg.ProgrammingError:
        return REDACTED
    for key in params:
        if "password" in key:  # password, sslpassword
            params[key] = REDACTED
    return make_conninfo(**params)


# The credential name the systemd unit passes the env file under (LoadCredential=env:...).
CREDENTIAL_ENV_FILE = "env"


def credentials_env_file(environ: Mapping[str, str]) -> Path | None:
    """`$CREDENTIALS_DIRECTORY/env` when systemd passed that credential, else None.

    With DynamicUser=yes the service cannot read /etc/pgws; systemd copies the file into a
    directory only the service's user can read and names it in CREDENTIALS_DIRECTORY.
    """
    directory = environ.get("CREDENTIALS_DIRECTORY", "").strip()
    if not directory:
        return None
    path = Path(directory) / CREDENTIAL_ENV_FILE
    # os.path.exists: an unreadable directory is "no env credential", not a traceback.
    return path if os.path.exists(path) else None


def parse_env_file(path: Path) -> dict[str, str]:
    """Read `KEY=value` lines (optional `export `, quotes, `#` comments), as in sample-env."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError("--env-file", f"cannot read {str(path)!r}: {reason}") from None
    values: dict[str, str] = {}
    for binding in parse_stream(io.StringIO(text)):
        # A bare `KEY` (no `=`) parses with value None: a typo, not a setting to drop silently.
        if binding.error or (binding.key is not None and binding.value is None):
            line = binding.original.line
            raise ConfigError("--env-file", f"{str(path)!r} line {line}: expected KEY=value")
        if binding.key is not None and binding.value is not None:
            values[binding.key] = binding.value
    return values


def _raw(env: Mapping[str, str], name: str) -> str | None:
    value = env.get(name)
    return None if value is None or value.strip() == "" else value.strip()


def _db_uri(value: str) -> str:
    """The connection string, if libpq can parse it; the error never repeats it (passwords)."""
    try:
        info = conninfo_to_dict(value)
    except psycopg.ProgrammingError:
        raise ConfigError(
            "PGWS_DB_URI",
            "not a valid connection string: expected postgresql://user:password@host:port/dbname"
            " or key=value pairs (the value is not shown: it may hold a password)",
        ) from None
    for port in str(info.get("port") or "5432").split(","):
        if not (port.isdigit() and 1 <= int(port) <= 65535):
            raise ConfigError("PGWS_DB_URI", f"port {port!r} is not a number from 1 to 65535")
    return value


def _required(env: Mapping[str, str], name: str) -> str:
    value = _raw(env, name)
    if value is None:
        raise ConfigError(name, "must be set")
    return value


def _read_at_file(env: Mapping[str, str], name: str, value: str) -> str:
    """Resolve the `@path` form: the value is the file's contents, trailing newline stripped."""
    if not value.startswith("@"):
        return value
    path = Path(value[1:])
    try:
        contents = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise ConfigError(name, f"cannot read {str(path)!r}: {reason}") from None
    contents = contents.rstrip("\r\n")
    if not contents.strip():
        raise ConfigError(name, f"file {str(path)!r} is empty")
    return contents


def read_jwt_secret(env: Mapping[str, str]) -> bytes:
    """PGWS_JWT_SECRET as bytes: `@file` resolved, base64 decoded when PGWS_JWT_SECRET_BASE64."""
    name = "PGWS_JWT_SECRET"
    value = _read_at_file(env, name, _required(env, name))
    if value.lstrip().startswith("{"):
        # Meant as a JWK or JWKS: a typo there must not silently become an HMAC secret.
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                name, f"starts with '{{' but is not valid JSON (a JWK or JWKS): {exc.msg}"
            ) from None
    if not _bool(env, "PGWS_JWT_SECRET_BASE64", default=False):
        return value.encode()
    compact = "".join(value.split())
    try:
        # Accept both alphabets and missing padding, as the original server does.
        standard = compact.replace("-", "+").replace("_", "/")
        decoded = base64.b64decode(standard + "=" * (-len(standard) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ConfigError(name, "is not valid base64 (PGWS_JWT_SECRET_BASE64 is true)") from None
    if not decoded:
        raise ConfigError(name, "decodes to an empty secret")
    return decoded


def _choice(env: Mapping[str, str], name: str, choices: Sequence[str], default: str) -> str:
    value = env.get(name, "").strip().lower()
    if not value:
        return default
    if value not in choices:
        raise ConfigError(name, f"expected one of {', '.join(choices)}, got {value!r}")
    return value


def _bool(env: Mapping[str, str], name: str, *, default: bool) -> bool:
    value = env.get(name)
    if value is None:
        return default
    folded = value.strip().lower()
    if folded in _TRUE:
        return True
    if folded in _FALSE:
        return False if folded else default
    raise ConfigError(name, f"expected true or false, got {value!r}")


def _int(env: Mapping[str, str], name: str, default: int, *, minimum: int, maximum: int) -> int:
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(name, f"expected an integer, got {value!r}") from None
    if not minimum <= number <= maximum:
        raise ConfigError(name, f"must be between {minimum} and {maximum}, got {number}")
    return number


def _optional_int(env: Mapping[str, str], name: str, *, minimum: int) -> int | None:
    if _raw(env, name) is None:
        return None
    return _int(env, name, minimum, minimum=minimum, maximum=10_000_000)


def _byte_bound(env: Mapping[str, str], name: str, default: int, *, minimum: int) -> int | None:
    """A size in bytes where 0 means no bound (None)."""
    value = _raw(env, name)
    if value is not None and value.isdecimal() and int(value) == 0:
        return None
    try:
        return _int(env, name, default, minimum=minimum, maximum=2**40)
    except ConfigError:
        raise ConfigError(
            name, f"expected 0 (no bound) or bytes from {minimum} to {2**40}, got {value!r}"
        ) from None


def _origins(env: Mapping[str, str], name: str) -> frozenset[str] | None:
    """Origins as browsers send them: scheme://host[:port], compared case-insensitively."""
    value = _raw(env, name)
    if value is None:
        return None
    origins = set()
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        parsed = urlsplit(item)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.path.strip("/"):
            raise ConfigError(name, f"expected origins like https://app.example.com, got {item!r}")
        origins.add(f"{parsed.scheme}://{parsed.netloc}".lower())
    if not origins:
        raise ConfigError(name, "lists no origin")
    return frozenset(origins)


def _seconds(env: Mapping[str, str], name: str, default: float) -> float:
    value = _raw(env, name)
    if value is None:
        return default
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(name, f"expected a number of seconds, got {value!r}") from None
    if not 0 < number <= 3600:
        raise ConfigError(name, f"must be more than 0 and at most 3600 seconds, got {value!r}")
    return number


def _interval_ms(env: Mapping[str, str], name: str) -> float | None:
    value = _raw(env, name)
    if value is None:
        return None
    try:
        milliseconds = int(value)
    except ValueError:
        raise ConfigError(name, f"expected milliseconds (an integer), got {value!r}") from None
    if milliseconds < 0 or milliseconds > 86_400_000:
        raise ConfigError(name, f"must be between 0 and 86400000 ms, got {milliseconds}")
    return milliseconds / 1000 if milliseconds else None


def _host(env: Mapping[str, str]) -> str:
    value = _raw(env, "PGWS_HOST")
    if value is None:
        return "*4"
    if any(char.isspace() for char in value) or "/" in value:
        raise ConfigError("PGWS_HOST", f"expected *4, *6, * or a host or address, got {value!r}")
    try:
        value.encode("idna")  # what getaddrinfo() does first: empty or over-long labels fail
    except UnicodeError:
        raise ConfigError("PGWS_HOST", f"{value!r} is not a valid host name") from None
    return value


def _channel(env: Mapping[str, str], name: str, default: str) -> str:
    return _optional_channel(env, name) or default


def _optional_channel(env: Mapping[str, str], name: str) -> str | None:
    value = _raw(env, name)
    if value is None:
        return None
    if len(value.encode()) > MAX_CHANNEL_BYTES:
        raise ConfigError(name, f"must be at most {MAX_CHANNEL_BYTES} bytes (a PostgreSQL name)")
    if any(ord(char) < 32 for char in value):
        raise ConfigError(name, "must not contain control characters")
    return value


def _existing_file(env: Mapping[str, str], name: str) -> Path | None:
    value = _raw(env, name)
    if value is None:
        return None
    path = Path(value)
    if not path.is_file():
        raise ConfigError(name, f"no such file: {value!r}")
    if not os.access(path, os.R_OK):
        raise ConfigError(name, f"cannot read {value!r}: permission denied")
    return path


def _existing_dir(env: Mapping[str, str], name: str) -> Path | None:
    value = _raw(env, name)
    if value is None:
        return None
    path = Path(value)
    if not path.is_dir():
        raise ConfigError(name, f"no such folder: {value!r}")
    return path.resolve()
