"""`pgws check`: the checks `serve` makes at start-up, without serving, as a short report.

For ExecStartPre= and deployment CI: it exits with the status `serve` would (78 for a bad
setting or an unusable JWKS, 69 for an unreachable database), or 1 when everything loads but
something would still fail clients (the database refuses LISTEN or NOTIFY, the certificate is
outside its dates), or 0. `warn` lines (unknown settings, a taken port, a certificate near its
end, too few database connections, an old durable schema) pass.
"""

from __future__ import annotations

import dataclasses
import datetime
from pathlib import Path

from cryptography import x509

from pgws.claims import Verifier
from pgws.config import Config
from pgws.db.probe import probe_database
from pgws.errors import ConfigError
from pgws.jwks import JwksKeys
from pgws.net import listen_socket, tls_context


@dataclasses.dataclass(frozen=True)
class Finding:
    """One line of the report."""

    what: str
    detail: str
    status: str = "ok"  # "warn" is reported and passes; "FAIL" makes `pgws check` exit 1

    @property
    def failed(self) -> bool:
        return self.status == "FAIL"

    def line(self) -> str:
        return f"{self.status:<4}  {self.what:<11} {self.detail}"


def static_findings(config: Config) -> list[Finding]:
    """Secret and TLS files, as the gateway would load them; raises ConfigError like `serve`."""
    findings = [_key_finding(config)]
    if tls_context(config) is None or config.certificate_file is None:
        findings.append(Finding("tls", "off: ws:// (set PGWS_CERTIFICATE_FILE and PGWS_KEY_FILE)"))
    else:
        findings.append(Finding("tls", f"{config.certificate_file} and its key load and match"))
        findings.append(certificate_dates(config.certificate_file))
    if config.root_path is not None:
        findings.append(Finding("static", f"serving {config.root_path}"))
    findings.append(port_finding(config))
    return findings


# A certificate closer than this to its end is reported (`warn`): time to renew it.
RENEW_WITHIN = datetime.timedelta(days=14)


def certificate_dates(path: Path, now: datetime.datetime | None = None) -> Finding:
    """The serving certificate's validity: FAIL outside it (clients refuse it), warn near its end.

    `tls_context` has already loaded the file, so its first PEM block is a certificate.
    """
    now = now or datetime.datetime.now(datetime.UTC)
    try:
        leaf = x509.load_pem_x509_certificates(path.read_bytes())[0]
    except (OSError, ValueError, IndexError):
        return Finding("tls", f"cannot read the dates of {path}", "warn")
    start, end = leaf.not_valid_before_utc, leaf.not_valid_after_utc
    if now < start:
        return Finding("tls", f"certificate not valid before {start:%Y-%m-%d %H:%M} UTC", "FAIL")
    if now >= end:
        return Finding("tls", f"certificate expired {end:%Y-%m-%d %H:%M} UTC", "FAIL")
    left = end - now
    status = "warn" if left < RENEW_WITHIN else "ok"
    return Finding("tls", f"certificate valid until {end:%Y-%m-%d} ({left.days} days)", status)


def port_finding(config: Config) -> Finding:
    """Whether PGWS_HOST:PGWS_PORT can be bound now (bound and released at once).

    A port in use is a warning, not serve's exit 78: a pgws already running there holds it too.
    Any other failure (an address not on this machine, a port below 1024) raises as serve does.
    """
    try:
        listen_socket(config.host, config.port).close()
    except ConfigError as exc:
        if exc.name != "PGWS_PORT":
            raise
        return Finding("port", f"{exc.problem} (fine if that is this pgws)", "warn")
    return Finding("port", f"{config.host} port {config.port} can be bound")


def _key_finding(config: Config) -> Finding:
    """PGWS_JWT_SECRET loads; or PGWS_JWT_JWKS_URL is fetched (or its cache read) as serve would."""
    if config.jwt_jwks_url is None:
        verifier = Verifier.from_secret(
            config.jwt_secret,
            audience=config.jwt_audience,
            issuer=config.jwt_issuer,
            leeway=config.jwt_leeway,
        )
        return Finding("jwt", f"keys load ({', '.join(verifier.algorithms)})")
    jwks = JwksKeys.from_config(config)
    jwks.load()  # raises ConfigError as serve would: unreachable without a cache, no usable key
    from_cache = jwks.loaded is not None and jwks.loaded["source"] == "cache"
    return Finding("jwks", jwks.describe(), "warn" if from_cache else "ok")


async def database_findings(config: Config) -> list[Finding]:
    """The database's part; raises ConfigError or DatabaseUnavailable like `serve`."""
    return [Finding(what, detail, status) for what, detail, status in await probe_database(config)]
