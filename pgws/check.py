"""`pgws check`: the checks `serve` makes at start-up, without serving, as a short report.

For ExecStartPre= and deployment CI: it exits with the status `serve` would (78 for a bad
setting, 69 for an unreachable database), or 1 when everything loads but the database refuses
LISTEN or NOTIFY, or 0.
"""

from __future__ import annotations

import dataclasses

from pgws.claims import Verifier
from pgws.config import Config
from pgws.db.probe import probe_database
from pgws.jwks import JwksKeys
from pgws.net import tls_context


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
        return f"{self.status:<4}  {self.what:<9} {self.detail}"


def static_findings(config: Config) -> list[Finding]:
    """Secret and TLS files, as the gateway would load them; raises ConfigError like `serve`."""
    findings = [_key_finding(config)]
    if tls_context(config) is None:
        findings.append(Finding("tls", "off: ws:// (set PGWS_CERTIFICATE_FILE and PGWS_KEY_FILE)"))
    else:
        findings.append(Finding("tls", f"{config.certificate_file} and its key load and match"))
    if config.root_path is not None:
        findings.append(Finding("static", f"serving {config.root_path}"))
    return findings


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
    return [
        Finding(what, detail, "ok" if ok else "FAIL")
        for what, detail, ok in await probe_database(config)
    ]
