"""One pgws process's life around its `server.Gateway`: signals, sd_notify, the watchdog.

SIGTERM/SIGINT/SIGQUIT (or the supervisor's pipe closing) stop it, SIGHUP reloads settings;
READY=1 once the gateway serves, STOPPING=1 when it stops, for whatever reason.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable

import structlog

from pgws.config import Config
from pgws.errors import ConfigError
from pgws.jwks import JwksKeys
from pgws.server import Gateway
from pgws.signals import signals_handled
from pgws.systemd import SystemdNotifier

log = structlog.get_logger("pgws.server")  # its lines kept their logger when it left server.py


async def run(
    config: Config,
    systemd: SystemdNotifier | None = None,
    *,
    reuse_port: bool = False,
    shared_listener: str | None = None,
    worker: int | None = None,
    parent_pipe: int | None = None,
    reload_config: Callable[[], Config] | None = None,
    on_ready: Callable[[], None] | None = None,
    jwks: JwksKeys | None = None,
) -> None:
    """Run pgws until SIGTERM/SIGINT/SIGQUIT (or a fatal error, which propagates).

    SIGHUP calls `reload_config` (the CLI re-reads the environment and the env file) and applies
    what can change without dropping sockets; without it, the same settings are read again,
    which still picks up new contents of the TLS files. A worker passes `parent_pipe`: EOF on it
    (its supervisor is gone) stops it as SIGTERM does.
    """
    systemd = systemd or SystemdNotifier(None)
    gateway = Gateway(
        config,
        reuse_port=reuse_port,
        shared_listener=shared_listener,
        worker=worker,
        jwks=jwks,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()

    def request_stop(sig: signal.Signals | None = None) -> None:
        if not stop.is_set():
            if sig is not None:  # else the supervisor is gone, which is logged where noticed
                log.info("signal_received", signal=sig.name)
            systemd.notify("STOPPING=1")
            stop.set()

    def reload() -> None:
        try:
            new = reload_config() if reload_config is not None else gateway.config
        except ConfigError as exc:
            log.warning("reload_failed", setting=exc.name, error=exc.problem, kept="all settings")
            return
        gateway.reload(new)

    def ready(_: Gateway) -> None:
        systemd.notify("READY=1")
        watchdog.set()
        if on_ready is not None:
            on_ready()

    watchdog = asyncio.Event()

    async def ping_once_ready() -> None:
        await watchdog.wait()
        await systemd.watchdog_forever()

    with signals_handled(loop, request_stop, reload, parent_pipe):
        async with asyncio.TaskGroup() as tasks:
            pinging = tasks.create_task(ping_once_ready(), name="watchdog")
            try:
                await gateway.run(stop, ready)
            finally:
                if not stop.is_set():  # stopped by an error rather than a signal
                    systemd.notify("STOPPING=1")
                pinging.cancel()
