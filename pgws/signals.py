"""Process signals: which ones stop pgws, which are only logged, SIGHUP, and a worker's parent pipe.

SIGQUIT stops as gracefully as SIGTERM (nginx's meaning; Python's default would dump core without
closing sockets). SIGUSR1/2 mean nothing to pgws: logged and ignored, never fatal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import Callable, Iterator

import structlog

log = structlog.get_logger("pgws.signals")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGQUIT)
IGNORED_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2)


def log_ignored_signal(sig: signal.Signals) -> None:
    """The handler of SIGUSR1/SIGUSR2: one line, so a stray `kill -USR1` is visible."""
    log.info("signal_ignored", signal=sig.name)


@contextlib.contextmanager
def signals_handled(
    loop: asyncio.AbstractEventLoop,
    request_stop: Callable[[signal.Signals | None], None],
    reload: Callable[[], None],
    parent_pipe: int | None = None,
) -> Iterator[None]:
    """pgws's signal handlers (and the parent-pipe watch) on `loop` while the block runs.

    A stop signal calls `request_stop(sig)`, EOF on `parent_pipe` `request_stop(None)`.
    """
    for sig in STOP_SIGNALS:
        loop.add_signal_handler(sig, request_stop, sig)
    for sig in IGNORED_SIGNALS:
        loop.add_signal_handler(sig, log_ignored_signal, sig)
    loop.add_signal_handler(signal.SIGHUP, reload)
    if parent_pipe is not None:
        watch_parent_pipe(loop, parent_pipe, functools.partial(request_stop, None))
    try:
        yield
    finally:
        for sig in (*STOP_SIGNALS, *IGNORED_SIGNALS, signal.SIGHUP):
            loop.remove_signal_handler(sig)
        if parent_pipe is not None:
            loop.remove_reader(parent_pipe)


def watch_parent_pipe(
    loop: asyncio.AbstractEventLoop, fd: int, request_stop: Callable[[], None]
) -> None:
    """Call `request_stop` once `fd` reads EOF: the only holder of its write end has exited."""
    os.set_blocking(fd, False)

    def readable() -> None:
        try:
            if os.read(fd, 64):
                return  # nobody writes to it; ignore anything that comes
        except BlockingIOError:
            return
        except OSError:
            pass  # as good as EOF
        loop.remove_reader(fd)
        log.warning("supervisor_gone", action="stop")
        request_stop()

    loop.add_reader(fd, readable)
