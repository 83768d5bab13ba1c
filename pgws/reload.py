"""SIGHUP: what a running gateway applies from new settings (token key, TLS files, proxies).

`Reloading` is the part of `server.Gateway` that swaps the verifier, the certificate and the
trusted proxies in place; every other changed setting is named as needing a restart.
"""

from __future__ import annotations

import dataclasses

import structlog

from pgws.claims import Verifier
from pgws.config import Config
from pgws.errors import ConfigError
from pgws.handshake import Handshake
from pgws.jwks import JwksKeys
from pgws.net import ReloadableTls

log = structlog.get_logger("pgws.server")  # its lines kept their logger when it left server.py

# Config fields SIGHUP applies to a running gateway; every other change needs a restart.
_RELOADABLE = frozenset(
    {
        "jwt_secret",
        "jwt_audience",
        "jwt_issuer",
        "jwt_leeway",
        "certificate_file",
        "key_file",
        "trusted_proxies",
    }
)


def _variable(field: str) -> str:
    """The PGWS_* variable behind a Config field (STYLE: PGWS_X is Config.x)."""
    return f"PGWS_{field.upper()}"


def warn_if_weak(verifier: Verifier) -> None:
    """Warn at start-up and on reload when an HMAC secret is shorter than 32 bytes."""
    weakest = verifier.weakest_secret
    if weakest is not None and weakest < 32:
        log.warning("jwt_secret_weak", bytes=weakest, advice="use at least 32 random bytes")


class Reloading:
    """The SIGHUP half of `server.Gateway`: the settings it swaps while sockets stay open."""

    config: Config
    verifier: Verifier
    tls: ReloadableTls
    jwks: JwksKeys | None
    handshake: Handshake

    def reload(self, new: Config) -> list[str]:
        """SIGHUP: apply a new token key and TLS certificate; return the variables that changed.

        Sockets stay open: the verifier only checks new handshakes, the certificate only serves
        new TLS connections. A new value that does not load keeps the old one (a warning says
        why); settings that need a restart are named in a warning and otherwise ignored.
        """
        changed = [
            *self._reload_verifier(new),
            *self._reload_certificate(new),
            *self._reload_proxies(new),
        ]
        if self.jwks is not None:
            self.jwks.request_refresh()  # SIGHUP also refetches PGWS_JWT_JWKS_URL
        needs_restart = [
            _variable(field.name)
            for field in dataclasses.fields(Config)
            if field.name not in _RELOADABLE
            and getattr(self.config, field.name) != getattr(new, field.name)
        ]
        if self.config.tls != new.tls:
            needs_restart += ["PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE"]
        if needs_restart:
            log.warning("reload_needs_restart", settings=needs_restart)
        log.info("reloaded", changed=changed)
        return changed

    def _reload_verifier(self, new: Config) -> list[str]:
        old = self.config
        fields = ("jwt_secret", "jwt_audience", "jwt_issuer", "jwt_leeway")
        changed = [_variable(f) for f in fields if getattr(old, f) != getattr(new, f)]
        if not changed:
            return []
        try:
            verifier = self._new_verifier(new)
        except ConfigError as exc:
            log.warning("reload_rejected", setting=exc.name, error=exc.problem, kept="old value")
            return []
        self.verifier = self.handshake.verifier = verifier
        self.config = dataclasses.replace(
            self.config, **{field: getattr(new, field) for field in fields}
        )
        warn_if_weak(verifier)
        return changed

    def _new_verifier(self, config: Config) -> Verifier:
        if self.jwks is not None:
            return Verifier(
                (),
                source=self.jwks,
                audience=config.jwt_audience,
                issuer=config.jwt_issuer,
                leeway=config.jwt_leeway,
            )
        return Verifier.from_secret(
            config.jwt_secret,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway=config.jwt_leeway,
        )

    def _reload_certificate(self, new: Config) -> list[str]:
        if self.tls.context is None or not new.tls:
            return []  # turning TLS on or off needs a restart
        try:
            changed = self.tls.reload(new)
        except ConfigError as exc:
            log.warning("reload_rejected", setting=exc.name, error=exc.problem, kept="old value")
            return []
        self.config = dataclasses.replace(
            self.config, certificate_file=new.certificate_file, key_file=new.key_file
        )
        return changed

    def _reload_proxies(self, new: Config) -> list[str]:
        """PGWS_TRUSTED_PROXIES for the handshakes from now on (open sockets keep their address)."""
        if new.trusted_proxies == self.config.trusted_proxies:
            return []
        self.handshake.trust(new.trusted_proxies)
        self.config = dataclasses.replace(self.config, trusted_proxies=new.trusted_proxies)
        return ["PGWS_TRUSTED_PROXIES"]
