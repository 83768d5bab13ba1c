"""Keys from PGWS_JWT_JWKS_URL: fetched at start-up, kept in memory, refetched in the background.

Refetches happen in one task (`refresh_forever`), never in a handshake: on the schedule the
provider's Cache-Control asks for (within bounds), on SIGHUP, and when a token names a `kid` the
keys do not hold. Unknown kids ask for a refetch at most once per UNKNOWN_KID_INTERVAL however
many arrive; their handshakes wait for it (at most KeyUnknown.wait_limit) and are checked again.
A kid still unknown after it, or arriving while that budget is spent, is refused. A refetch
that fails or returns an unusable document is logged and the keys in memory are kept. The fetch
itself (urllib's, in a thread) is `jwks_fetch`.
"""

from __future__ import annotations

import asyncio
import datetime
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog

from pgws.config import Config
from pgws.errors import ConfigError
from pgws.jwks_fetch import fetch_jwks
from pgws.keys import Key, RemoteKeys, load_remote_jwks
from pgws.places import url_shown
from pgws.settings_auth import JWT_JWKS_CACHE, JWT_JWKS_URL

log = structlog.get_logger("pgws.jwks")

# Refetch schedule: the provider's max-age, within these bounds; the default without one.
REFRESH_MIN = 60.0
REFRESH_MAX = 86400.0
REFRESH_DEFAULT = 300.0
# At most one refetch per this many seconds is caused by unknown kids.
UNKNOWN_KID_INTERVAL = 30.0

_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)
_NO_CACHE = re.compile(r"(?:^|,)\s*(?:no-cache|no-store)\s*(?:,|$)", re.IGNORECASE)


def refresh_delay(
    cache_control: str | None,
    *,
    minimum: float = REFRESH_MIN,
    maximum: float = REFRESH_MAX,
    default: float = REFRESH_DEFAULT,
) -> float:
    """Seconds until the next scheduled refetch: Cache-Control's max-age, kept within bounds.

    `no-cache`/`no-store` mean as soon as the lower bound allows; no max-age, the default.
    """
    if cache_control is None:
        return default
    if _NO_CACHE.search(cache_control):
        return minimum
    found = _MAX_AGE.search(cache_control)
    if found is None:
        return min(max(default, minimum), maximum)
    return min(max(float(found.group(1)), minimum), maximum)


class JwksKeys:
    """The keys of one JWKS URL as they are right now; what `Verifier` reads on each token."""

    def __init__(
        self,
        url: str,
        *,
        cache_file: Path | None = None,
        ca_file: Path | None = None,
        refresh_min: float = REFRESH_MIN,
        refresh_max: float = REFRESH_MAX,
        unknown_kid_interval: float = UNKNOWN_KID_INTERVAL,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.url, self.shown = url, url_shown(url)
        self.cache_file, self.ca_file = cache_file, ca_file
        self.refresh_min, self.refresh_max = refresh_min, refresh_max
        self.unknown_kid_interval = unknown_kid_interval
        self.clock = clock
        self.keys: tuple[Key, ...] = ()
        self.kids: frozenset[str] = frozenset()
        self._skipped: tuple[str, ...] = ()
        self.loaded: dict[str, Any] | None = None  # what the start-up load found, for its log line
        self.refresh_in = REFRESH_DEFAULT  # seconds from the last fetch to the next scheduled one
        self._wanted = asyncio.Event()  # a refetch is asked for (unknown kid, SIGHUP)
        self._ended = asyncio.Event()  # set (and replaced) each time a refetch ends
        self._fetching = False
        self._last_kid_fetch: float | None = None

    @classmethod
    def from_config(cls, config: Config) -> JwksKeys:
        """The JWKS source PGWS_JWT_JWKS_URL and its cache and CA settings describe."""
        if config.jwt_jwks_url is None:
            raise ValueError("PGWS_JWT_JWKS_URL is not set")
        return cls(
            config.jwt_jwks_url, cache_file=config.jwt_jwks_cache, ca_file=config.jwt_jwks_ca_file
        )

    # --- start-up ------------------------------------------------------------------------------

    def load(self) -> None:
        """Fetch the keys before serving (blocking); the cached copy if the provider fails.

        Raises ConfigError (exit 78) when neither gives a usable key, or when the cache file
        cannot be written: an unwritable cache would only be found out during an outage.
        """
        try:
            fetched = fetch_jwks(self.url, self.ca_file)
        except ConfigError as exc:
            if exc.name != JWT_JWKS_URL.name or self.cache_file is None:
                raise
            self._load_cache(self.cache_file, exc.problem)
            return
        self._write_cache(fetched.document, at_start=True)
        self._install(fetched.keys)
        self.refresh_in = self._delay(fetched.cache_control)
        self.loaded = {"source": "url", "refresh_in": self.refresh_in}

    def _load_cache(self, cache_file: Path, problem: str) -> None:
        name = JWT_JWKS_CACHE.name
        try:
            document = cache_file.read_bytes()
            age = time.time() - cache_file.stat().st_mtime
        except FileNotFoundError:
            raise ConfigError(
                JWT_JWKS_URL.name, f"{problem}; and no cached copy yet at {str(cache_file)!r}"
            ) from None
        except OSError as exc:
            raise ConfigError(name, f"cannot read {str(cache_file)!r}: {exc.strerror}") from None
        try:
            keys = load_remote_jwks(document, name)
        except ConfigError as exc:
            raise ConfigError(
                JWT_JWKS_URL.name, f"{problem}; and the cached copy is unusable: {exc.problem}"
            ) from None
        self._install(keys)
        self.refresh_in = self.refresh_min  # the provider is down: try again soon
        self.loaded = {
            "source": "cache",
            "cache_file": str(cache_file),
            "cache_age_s": round(age),
            "fetch_error": problem,
            "refresh_in": self.refresh_in,
        }

    async def start(self) -> None:
        """Load in a thread unless already loaded (the CLI loads before logging), then log."""
        if self.loaded is None:
            await asyncio.to_thread(self.load)
        loaded = self.loaded or {}
        if loaded.get("source") == "cache":
            log.warning("jwks_loaded_from_cache", url=self.shown, **self._summary(), **loaded)
        else:
            log.info("jwks_loaded", url=self.shown, **self._summary(), **loaded)

    # --- in memory -----------------------------------------------------------------------------

    def _install(self, remote: RemoteKeys) -> None:
        self.keys = remote.keys
        self.kids = frozenset(key.kid for key in remote.keys if key.kid is not None)
        self._skipped = remote.skipped

    def _summary(self) -> dict[str, Any]:
        return {
            "keys": len(self.keys),
            "kids": sorted(self.kids),
            "algorithms": sorted({key.algorithm for key in self.keys}),
            "skipped": list(self._skipped),
        }

    def unknown_kid(self) -> asyncio.Event | None:
        """A token named a kid the keys lack: the event a refetch sets when it ends, or None
        when refetches for unknown kids are spent for now (the token is refused at once).

        Called from the handshake, in the event loop thread; it never fetches by itself.
        """
        if self._fetching or self._wanted.is_set():
            return self._ended  # one refetch is coming anyway: wait for that one
        now = self.clock()
        last = self._last_kid_fetch
        if last is not None and now - last < self.unknown_kid_interval:
            return None
        self._last_kid_fetch = now
        self._wanted.set()
        return self._ended

    def request_refresh(self) -> None:
        """Refetch soon whatever the schedule (SIGHUP)."""
        self._wanted.set()

    async def refresh_forever(self) -> None:
        """Refetch on the schedule and when asked, until cancelled; failures keep the old keys."""
        while True:
            try:
                async with asyncio.timeout(self.refresh_in):
                    await self._wanted.wait()
            except TimeoutError:
                pass
            self._wanted.clear()
            self._fetching = True
            try:
                await self.refresh()
            finally:
                self._fetching = False
                ended, self._ended = self._ended, asyncio.Event()
                ended.set()

    async def refresh(self) -> None:
        """One refetch: new keys in memory and in the cache file, or a warning and the old keys."""
        try:
            fetched = await asyncio.to_thread(fetch_jwks, self.url, self.ca_file)
        except ConfigError as exc:
            self.refresh_in = self.refresh_min
            log.warning(
                "jwks_refresh_failed",
                url=self.shown,
                error=exc.problem,
                kept=f"{len(self.keys)} keys",
                retry_in=self.refresh_in,
            )
            return
        before = self.kids, {(key.kid, key.algorithm) for key in self.keys}
        self._install(fetched.keys)
        self.refresh_in = self._delay(fetched.cache_control)
        after = self.kids, {(key.kid, key.algorithm) for key in self.keys}
        if before != after:
            log.info(
                "jwks_refreshed",
                url=self.shown,
                added=sorted(after[0] - before[0]),
                removed=sorted(before[0] - after[0]),
                **self._summary(),
                refresh_in=self.refresh_in,
            )
        if self.cache_file is not None:
            await asyncio.to_thread(self._write_cache, fetched.document)

    def _delay(self, cache_control: str | None) -> float:
        return refresh_delay(
            cache_control,
            minimum=self.refresh_min,
            maximum=self.refresh_max,
            default=min(max(REFRESH_DEFAULT, self.refresh_min), self.refresh_max),
        )

    def _write_cache(self, document: bytes, *, at_start: bool = False) -> None:
        """Replace the cache file atomically (a crash mid-write leaves the old copy)."""
        if self.cache_file is None:
            return
        partial = self.cache_file.with_name(f".{self.cache_file.name}.{os.getpid()}.tmp")
        try:
            partial.write_bytes(document)
            os.replace(partial, self.cache_file)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            problem = f"cannot write {str(self.cache_file)!r}: {exc.strerror}"
            if at_start:
                raise ConfigError(JWT_JWKS_CACHE.name, problem) from None
            log.warning("jwks_cache_write_failed", error=problem)

    def describe(self) -> str:
        """One line for `pgws check`: where the keys came from and what they are."""
        algorithms = ", ".join(sorted({key.algorithm for key in self.keys}))
        kids = ", ".join(sorted(self.kids)) or "none"
        count = f"{len(self.keys)} usable key{'s' if len(self.keys) != 1 else ''}"
        text = f"{self.shown}: {count} ({algorithms}; kids {kids})"
        if self._skipped:
            text += f", {len(self._skipped)} skipped ({'; '.join(self._skipped)})"
        if self.loaded is not None and self.loaded["source"] == "cache":
            stamp = datetime.datetime.now(datetime.UTC) - datetime.timedelta(
                seconds=self.loaded["cache_age_s"]
            )
            text = (
                f"{self.shown} unreachable ({self.loaded['fetch_error']}); serving would start"
                f" from the copy cached {stamp:%Y-%m-%d %H:%M} UTC: {count}"
            )
        return text
