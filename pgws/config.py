"""Settings: each PGWS_* variable declared once, and the frozen `Config` read from them.

A `Setting` holds everything pgws knows about one variable: its name, the parser that checks it
(with its bounds), its default as written in an env file, its help line and whether it is
secret. The server's settings are declared here; those of one concern in `settings_auth`
(tokens, Origins), `settings_durable` and `settings_ops` (logging, metrics, proxies).
`SETTINGS` collects them all: `Config.from_env`, the dataclass defaults, `pgws serve --help`,
the start-up `settings` line and the unknown-name warnings all read that one table, so they
cannot disagree.

Every problem raises `ConfigError` naming the variable, so start-up can stop with one line and
exit status 78 before a port is bound. Values that may hold secrets are never echoed back.
Standard library only: the env file is read in `envfile`, the database URI is checked by the
caller (`pgws.db.connect.check_db_uri`), so that no database driver is needed here.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pgws.errors import ConfigError
from pgws.limits import DURABLE_PAYLOAD_LIMIT, MAX_CHANNEL_BYTES, NOTIFY_PAYLOAD_LIMIT
from pgws.parsers import ByteBound, Channel, ChannelSet, Integer, boolean, interval_ms, seconds
from pgws.places import at_file, existing_dir, existing_file, host, metrics_address
from pgws.setting import Setting, optional
from pgws.settings_auth import (
    ALLOWED_ORIGINS,
    AUTH_TIMEOUT,
    EXPIRY_WARNING,
    JWT_AUDIENCE,
    JWT_ISSUER,
    JWT_JWKS_CA_FILE,
    JWT_JWKS_CACHE,
    JWT_JWKS_URL,
    JWT_LEEWAY,
    JWT_SECRET,
    JWT_SECRET_BASE64,
)
from pgws.settings_durable import DURABLE, DURABLE_MIGRATE, DURABLE_REPLAY_MAX, DURABLE_RETENTION
from pgws.settings_ops import DEBUG, LOG_LEVEL, METRICS, TRUSTED_PROXIES

# What all sockets' unsent data may take together: 256 MiB, a few hundred stalled readers.
DEFAULT_MAX_BUFFERED_TOTAL = 256 * 1024 * 1024

# --- the settings -----------------------------------------------------------------------------

DB_URI = Setting(
    name="PGWS_DB_URI",
    parse=at_file,
    help="libpq URI or conninfo; @FILE reads it from a file",
    required=True,
    secret=True,
)
HOST = Setting(
    name="PGWS_HOST",
    parse=host,
    default="*4",  # SPEC: all IPv4 interfaces
    help="bind address: *4 all IPv4, *6 or * all IPv6 + IPv4, or a host",
)
PORT = Setting(name="PGWS_PORT", parse=Integer(0, 65535), default="3000", help="TCP port")
ROOT_PATH = Setting(
    name="PGWS_ROOT_PATH",
    parse=optional(existing_dir),
    help="folder served as static files over plain HTTP",
)
LISTEN_CHANNEL = Setting(
    name="PGWS_LISTEN_CHANNEL",
    parse=Channel(MAX_CHANNEL_BYTES),
    default="postgres-websockets-listener",
    help="the database channel pgws LISTENs on and NOTIFYs to",
)
META_CHANNEL = Setting(
    name="PGWS_META_CHANNEL",
    parse=optional(Channel(MAX_CHANNEL_BYTES)),
    help="channel that receives ConnectionOpen/Close events",
)
POOL_SIZE = Setting(
    name="PGWS_POOL_SIZE",
    parse=Integer(1, 1000),
    default="10",
    help="most database connections used to send NOTIFY (opened as load needs them)",
)
RETRIES = Setting(
    name="PGWS_RETRIES",
    parse=Integer(1, 1000),
    default="5",
    help="connection attempts at start-up before giving up",
)
CHECK_LISTENER_INTERVAL = Setting(
    name="PGWS_CHECK_LISTENER_INTERVAL",
    parse=optional(interval_ms),  # None = exit when the listener dies
    help="ms between LISTEN connection checks; set = reconnect, unset/0 = exit when it dies",
)
CERTIFICATE_FILE = Setting(
    name="PGWS_CERTIFICATE_FILE",
    parse=optional(existing_file),
    help="TLS certificate (chain) file; with PGWS_KEY_FILE",
)
KEY_FILE = Setting(
    name="PGWS_KEY_FILE",
    parse=optional(existing_file),
    help="TLS private key file; with PGWS_CERTIFICATE_FILE",
)
MAX_MESSAGE_SIZE = Setting(
    name="PGWS_MAX_MESSAGE_SIZE",
    parse=Integer(1, 2**24),
    default=str(NOTIFY_PAYLOAD_LIMIT),
    help="largest client frame in bytes; larger frames close the socket with 1009",
)
CLIENT_MAX_BUFFER = Setting(
    name="PGWS_CLIENT_MAX_BUFFER",
    parse=Integer(1024, 2**31),
    default=str(1024 * 1024),
    help="unsent bytes a socket may queue before it is closed as a slow consumer",
)
MAX_BUFFERED_TOTAL = Setting(
    name="PGWS_MAX_BUFFERED_TOTAL",
    parse=ByteBound(minimum=1024),  # None = no bound
    default=str(DEFAULT_MAX_BUFFERED_TOTAL),
    help="unsent bytes all sockets of a process may queue; past it the largest are closed as"
    " slow consumers (0 = no bound)",
)
COMPRESSION = Setting(
    name="PGWS_COMPRESSION",
    parse=boolean,
    default="false",
    help="offer permessage-deflate (costs ~50 KiB per socket)",
)
SHUTDOWN_TIMEOUT = Setting(
    name="PGWS_SHUTDOWN_TIMEOUT",
    parse=seconds,
    default="5",
    help="seconds allowed for a clean shutdown",
)
# `pgws serve --workers` takes the same range.
WORKER_COUNT = Integer(1, 256)
WORKERS = Setting(
    name="PGWS_WORKERS",
    parse=WORKER_COUNT,
    default="1",
    help="processes sharing the port (SO_REUSEPORT)",
)
SHARED_LISTENER = Setting(
    name="PGWS_SHARED_LISTENER",
    parse=boolean,
    default="true",
    help="with workers: one LISTEN connection per host, relayed to the others (Linux)",
)
UVLOOP = Setting(
    name="PGWS_UVLOOP",
    parse=boolean,
    default="false",  # asyncio's own loop measured as fast or faster (bench/README.md)
    help="run on uvloop (pip install 'pgws[fast]'); measure first",
)
MAX_CHANNELS = Setting(
    name="PGWS_MAX_CHANNELS",
    parse=Integer(1, 100_000),
    default="100",
    help="most channels one socket may use",
)
MAX_CONNECTIONS = Setting(
    name="PGWS_MAX_CONNECTIONS",
    parse=optional(Integer(1, 10_000_000)),  # None = no limit
    help="most open sockets; more get HTTP 503",
)

SETTINGS: tuple[Setting[Any], ...] = (
    DB_URI,
    JWT_SECRET,
    JWT_SECRET_BASE64,
    HOST,
    PORT,
    ROOT_PATH,
    LISTEN_CHANNEL,
    META_CHANNEL,
    POOL_SIZE,
    RETRIES,
    CHECK_LISTENER_INTERVAL,
    CERTIFICATE_FILE,
    KEY_FILE,
    MAX_MESSAGE_SIZE,
    CLIENT_MAX_BUFFER,
    MAX_BUFFERED_TOTAL,
    COMPRESSION,
    SHUTDOWN_TIMEOUT,
    WORKERS,
    SHARED_LISTENER,
    UVLOOP,
    MAX_CHANNELS,
    MAX_CONNECTIONS,
    JWT_AUDIENCE,
    JWT_ISSUER,
    JWT_LEEWAY,
    JWT_JWKS_URL,
    JWT_JWKS_CACHE,
    JWT_JWKS_CA_FILE,
    ALLOWED_ORIGINS,
    LOG_LEVEL,
    DEBUG,
    AUTH_TIMEOUT,
    EXPIRY_WARNING,
    DURABLE,
    DURABLE_MIGRATE,
    DURABLE_RETENTION,
    DURABLE_REPLAY_MAX,
    TRUSTED_PROXIES,
    METRICS,
)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Config:
    """Every setting pgws runs with; durations are float seconds, sizes bytes."""

    db_uri: str = dataclasses.field(repr=False)  # may hold a password
    jwt_secret: bytes = dataclasses.field(repr=False)
    host: str = HOST.default_value
    port: int = PORT.default_value
    root_path: Path | None = ROOT_PATH.default_value
    listen_channel: str = LISTEN_CHANNEL.default_value
    meta_channel: str | None = META_CHANNEL.default_value
    pool_size: int = POOL_SIZE.default_value
    retries: int = RETRIES.default_value
    check_listener_interval: float | None = CHECK_LISTENER_INTERVAL.default_value
    certificate_file: Path | None = CERTIFICATE_FILE.default_value
    key_file: Path | None = KEY_FILE.default_value
    max_message_size: int = MAX_MESSAGE_SIZE.default_value
    client_max_buffer: int = CLIENT_MAX_BUFFER.default_value
    max_buffered_total: int | None = MAX_BUFFERED_TOTAL.default_value
    compression: bool = COMPRESSION.default_value
    shutdown_timeout: float = SHUTDOWN_TIMEOUT.default_value
    workers: int = WORKERS.default_value
    shared_listener: bool = SHARED_LISTENER.default_value
    uvloop: bool = UVLOOP.default_value
    max_channels: int = MAX_CHANNELS.default_value
    max_connections: int | None = MAX_CONNECTIONS.default_value
    jwt_audience: str | None = JWT_AUDIENCE.default_value
    jwt_issuer: str | None = JWT_ISSUER.default_value
    jwt_leeway: float = JWT_LEEWAY.default_value
    jwt_jwks_url: str | None = dataclasses.field(default=JWT_JWKS_URL.default_value, repr=False)
    jwt_jwks_cache: Path | None = JWT_JWKS_CACHE.default_value
    jwt_jwks_ca_file: Path | None = JWT_JWKS_CA_FILE.default_value
    allowed_origins: frozenset[str] | None = ALLOWED_ORIGINS.default_value
    log_level: str = LOG_LEVEL.default_value
    auth_timeout: float = AUTH_TIMEOUT.default_value  # SPEC 8: first-frame auth
    expiry_warning: float = EXPIRY_WARNING.default_value  # SPEC 8: `expiring`
    durable: ChannelSet = DURABLE.default_value  # SPEC 7; falsy = durable mode off
    durable_migrate: bool = DURABLE_MIGRATE.default_value
    durable_retention: float = DURABLE_RETENTION.default_value
    durable_replay_max: int = DURABLE_REPLAY_MAX.default_value

    def envelope_limit(self, channel: str) -> int:
        """The largest envelope a socket may send on `channel`: NOTIFY's, or a durable row's."""
        return DURABLE_PAYLOAD_LIMIT if channel in self.durable else NOTIFY_PAYLOAD_LIMIT

    trusted_proxies: tuple[str, ...] = TRUSTED_PROXIES.default_value
    metrics: str = METRICS.default_value  # "on", "off" or "host:port"

    @property
    def tls(self) -> bool:
        """Whether sockets are served as wss:// (both TLS files are set)."""
        return self.certificate_file is not None

    @classmethod
    def from_env(
        cls, env: Mapping[str, str], *, check_db_uri: Callable[[str], None] | None = None
    ) -> Config:
        """Build a Config from PGWS_* variables; raise ConfigError on the first bad one.

        `check_db_uri` (pgws.db.connect.check_db_uri) refuses a connection string the database
        driver cannot parse; it is passed in so that settings need no database driver.
        """
        certificate_file = CERTIFICATE_FILE.read(env)
        key_file = KEY_FILE.read(env)
        if (certificate_file is None) != (key_file is None):
            missing = KEY_FILE.name if key_file is None else CERTIFICATE_FILE.name
            raise ConfigError(missing, "must be set too: TLS needs both a certificate and a key")
        db_uri = DB_URI.read(env)
        if check_db_uri is not None:
            check_db_uri(db_uri)
        metrics, workers = METRICS.read(env), WORKERS.read(env)
        if (address := metrics_address(metrics)) and address[1] and address[1] + workers > 65536:
            raise ConfigError(
                METRICS.name, f"port {address[1]} + one per worker ({workers}) passes 65535"
            )
        jwks_url = JWT_JWKS_URL.read(env)
        if jwks_url is None:
            for setting in (JWT_JWKS_CACHE, JWT_JWKS_CA_FILE):
                if env.get(setting.name, "").strip():
                    raise ConfigError(setting.name, f"is set but {JWT_JWKS_URL.name} is not")
            jwt_secret = read_jwt_secret(env)
        elif env.get(JWT_SECRET.name, "").strip():
            raise ConfigError(
                JWT_JWKS_URL.name, f"and {JWT_SECRET.name} are both set: keep one of them"
            )
        else:
            jwt_secret = b""  # the keys come from the URL
        first: dict[str, Any] = {
            "db_uri": db_uri,
            "jwt_secret": jwt_secret,
            "jwt_jwks_url": jwks_url,
            "certificate_file": certificate_file,
            "key_file": key_file,
            "workers": workers,
            "metrics": metrics,
        }
        # Every other field from its setting, in the table's order: the first bad one is reported.
        fields = {field.name for field in dataclasses.fields(cls)} - first.keys()
        rest = {setting.field: setting.read(env) for setting in SETTINGS if setting.field in fields}
        return cls(**first, **rest)


def read_jwt_secret(env: Mapping[str, str]) -> bytes:
    """PGWS_JWT_SECRET as bytes: `@file` resolved, base64 decoded when PGWS_JWT_SECRET_BASE64."""
    name = JWT_SECRET.name
    value = JWT_SECRET.read(env)
    if value.lstrip().startswith("{"):
        # Meant as a JWK or JWKS: a typo there must not silently become an HMAC secret.
        try:
            json.loads(value)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                name, f"starts with '{{' but is not valid JSON (a JWK or JWKS): {exc.msg}"
            ) from None
    if not JWT_SECRET_BASE64.read(env):
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
