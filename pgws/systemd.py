"""The systemd notification protocol (sd_notify): READY=1, STOPPING=1 and watchdog pings.

A few lines over a unix datagram socket, so no dependency: systemd sets NOTIFY_SOCKET (and
WATCHDOG_USEC when the unit has WatchdogSec=) for services of Type=notify.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Mapping

import structlog

log = structlog.get_logger("pgws.systemd")


class SystemdNotifier:
    """Sends state changes to systemd; does nothing when not started by systemd."""

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        # A leading "@" names a socket in the abstract namespace.
        self._address = "\0" + address[1:] if address and address.startswith("@") else address
        self.watchdog_interval = watchdog_usec / 2_000_000 if watchdog_usec else None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SystemdNotifier:
        """Read NOTIFY_SOCKET and WATCHDOG_USEC (an invalid WATCHDOG_USEC disables the watchdog)."""
        raw = env.get("WATCHDOG_USEC", "")
        watchdog = int(raw) if raw.isdigit() and int(raw) > 0 else None
        return cls(env.get("NOTIFY_SOCKET") or None, watchdog)

    def notify(self, state: str) -> bool:
        """Send one state line (e.g. "READY=1"); False when there is no socket or it failed."""
        if not self._address:
            return False
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
                sock.connect(self._address)
                sock.sendall(state.encode())
        except OSError as exc:
            log.warning("sd_notify_failed", state=state, error=str(exc))
            return False
        return True

    async def watchdog_forever(self) -> None:
        """Ping the watchdog at half its interval while the event loop runs; no-op without one."""
        if self.watchdog_interval is None or not self._address:
            return
        while True:
            self.notify("WATCHDOG=1")
            await asyncio.sleep(self.watchdog_interval)
