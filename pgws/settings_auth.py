"""Settings of who may connect: the token's keys, what a token must say, Origins, v2 timers.

Declared here, collected with the others in `config.SETTINGS`. The keys come from
PGWS_JWT_SECRET (read by `config.read_jwt_secret`) or from PGWS_JWT_JWKS_URL (`jwks`), never
both.
"""

from __future__ import annotations

from pgws.parsers import boolean, seconds, skew_seconds, text
from pgws.places import at_file, existing_file, https_url, origins, writable_file
from pgws.setting import Setting, optional

JWT_SECRET = Setting(
    name="PGWS_JWT_SECRET",
    parse=at_file,
    help="HS256 secret, or a JWK / JWKS JSON object; @FILE reads it from a file"
    " (not with PGWS_JWT_JWKS_URL)",
    required=True,
    secret=True,
)
JWT_SECRET_BASE64 = Setting(
    name="PGWS_JWT_SECRET_BASE64",
    parse=boolean,
    default="false",
    help="the secret is base64/base64url encoded",
)
JWT_AUDIENCE = Setting(
    name="PGWS_JWT_AUDIENCE",
    parse=optional(text),
    help="when set, every token's `aud` must include it",
)
JWT_ISSUER = Setting(
    name="PGWS_JWT_ISSUER",
    parse=optional(text),
    help="when set, every token's `iss` must equal it",
)
JWT_LEEWAY = Setting(
    name="PGWS_JWT_LEEWAY",
    parse=skew_seconds,
    default="0",
    help="seconds of clock skew allowed on a token's exp and nbf (and the 3001 timer)",
)
# JWKS from an identity provider (issue 13 item 1): instead of PGWS_JWT_SECRET, never with it.
JWT_JWKS_URL = Setting(
    name="PGWS_JWT_JWKS_URL",
    parse=optional(https_url),
    help="https:// URL of the identity provider's JWKS (RS*/PS*/ES* keys), fetched at start-up"
    " and refetched on an unknown kid and as its Cache-Control says; instead of PGWS_JWT_SECRET",
    secret=True,  # a query string may hold an API key; logs show url_shown() of it
)
JWT_JWKS_CACHE = Setting(
    name="PGWS_JWT_JWKS_CACHE",
    parse=optional(writable_file),
    help="file pgws writes the JWKS to after each good fetch, and starts from when the"
    " provider is unreachable at start-up",
)
JWT_JWKS_CA_FILE = Setting(
    name="PGWS_JWT_JWKS_CA_FILE",
    parse=optional(existing_file),
    help="CA certificates (PEM) the JWKS URL's certificate must chain to, instead of the system's",
)
ALLOWED_ORIGINS = Setting(
    name="PGWS_ALLOWED_ORIGINS",
    parse=optional(origins),  # None = any Origin
    help="comma-separated Origins browsers may connect from (e.g. https://app.example.com)",
)
AUTH_TIMEOUT = Setting(
    name="PGWS_AUTH_TIMEOUT",
    parse=seconds,
    default="5",
    help="seconds a pgws.v2 socket without a token has to send `auth`",
)
EXPIRY_WARNING = Setting(
    name="PGWS_EXPIRY_WARNING",
    parse=seconds,
    default="60",
    help="seconds before `exp` a pgws.v2 socket is sent `expiring`",
)
