"""One LISTEN connection per host for `--workers N` (issue 14): the workers elect a leader.

Before PostgreSQL 19 every LISTEN backend costs the database work on every NOTIFY (README,
"Scaling out"), so N workers listening on their own would cost N times what one does. Instead the
worker that binds the host's abstract Unix socket name (given by the supervisor) leads: it holds
the LISTEN connection, feeds its own readers and relays every batch, as it came off the LISTEN
socket, to the other workers connected to that name. The kernel drops an abstract name with the
process that bound it, so when the leader dies (even by SIGKILL) the name is free at once: the
followers see their link end, one of them binds the name and LISTENs, the others follow it. The
hand-over takes one LISTEN connection's set-up; notifications sent in between are lost as in any
LISTEN outage (`on_gap` is called once the feed is whole again, so that v2 sockets and event
streams hear `gap`), and durable
channels catch up from their table.

The relay is a byte stream of frames: one type byte, a 4-byte big-endian length, the body.
`N` carries a batch (each notification as a 4-byte length and its UTF-8 text); `U` and `D` say
whether the leader's LISTEN connection is up. A follower that falls more than RELAY_BUFFER_LIMIT
behind is dropped (it reconnects and reports a gap) rather than let it hold the leader's memory.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Awaitable, Callable

import structlog

log = structlog.get_logger("pgws.shared_listener")

RELAY_BUFFER_LIMIT = 64 * 1024 * 1024  # per follower: far above any burst one read brings
FOLLOW_RETRY = 0.05  # between attempts to lead or follow while the leader changes
_HEADER = struct.Struct(">cI")
_LENGTH = struct.Struct(">I")
BATCH, UP, DOWN = b"N", b"U", b"D"

Feed = Callable[[list[str]], object]


def encode_batch(batch: list[str]) -> bytes:
    """One `N` frame carrying `batch`."""
    parts = []
    for text in batch:
        data = text.encode()
        parts.append(_LENGTH.pack(len(data)))
        parts.append(data)
    body = b"".join(parts)
    return _HEADER.pack(BATCH, len(body)) + body


def decode_batch(body: bytes) -> list[str]:
    """The notifications of an `N` frame's body; ValueError if it is not one."""
    batch, offset = [], 0
    while offset < len(body):
        if offset + _LENGTH.size > len(body):
            raise ValueError("truncated length")
        (length,) = _LENGTH.unpack_from(body, offset)
        offset += _LENGTH.size
        if offset + length > len(body):
            raise ValueError("truncated notification")
        batch.append(body[offset : offset + length].decode())
        offset += length
    return batch


def status_frame(up: bool) -> bytes:
    return _HEADER.pack(UP if up else DOWN, 0)


def bind_name(name: str) -> socket.socket | None:
    """The listening socket for the abstract `name`, or None when another process holds it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind("\0" + name)
    except OSError:
        sock.close()
        return None
    sock.listen(64)
    sock.setblocking(False)
    return sock


async def _connect_name(name: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    # Connected by hand: uvloop refuses an abstract name as a path (EINVAL), not as a socket.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(sock, "\0" + name)
    except BaseException:
        sock.close()
        raise
    return await asyncio.open_unix_connection(sock=sock)


class SharedListener:
    """Lead (LISTEN and relay) or follow (read the leader's relay), whichever this worker can.

    `connect()` opens this worker's LISTEN connection (with the start-up retries), `listen()`
    runs it (it hands its batches to `relay`) until it is lost for good, `listener_up()` says
    whether it is up right now. `feed` is this worker's registry: it gets every batch, led or
    followed. `start()` returns once this worker's readers are fed (it leads and LISTENs, or it
    follows a leader whose LISTEN is up), so that readiness means what it means without workers.
    """

    def __init__(
        self,
        name: str,
        feed: Feed,
        connect: Callable[[], Awaitable[None]],
        listen: Callable[[], Awaitable[None]],
        listener_up: Callable[[], bool],
        on_gap: Callable[[], object] = lambda: None,
    ) -> None:
        self._name = name
        self._feed = feed
        self._connect = connect
        self._listen = listen
        self._fed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._listener_up = listener_up
        self._on_gap = on_gap
        # Notifications may have been missed since the feed was last whole: told once it is again.
        self._gap_pending = False
        self._followers: set[asyncio.StreamWriter] = set()
        self.leading = False
        self.leader_up = False  # as a follower: the leader's LISTEN connection, last we heard
        self.linked = False  # as a follower: connected to a leader
        self.relayed = 0  # notifications relayed to followers (counted once per follower)
        self.hand_overs = 0  # times this worker became leader after following

    def is_up(self) -> bool:
        """Whether this worker's readers are being fed (for /ready)."""
        if self.leading:
            return self._listener_up()
        return self.linked and self.leader_up

    async def start(self) -> None:
        """Elect, and return once this worker's readers are fed; raise what stopped that (the
        LISTEN connection's start-up retries running out, in a leader)."""
        self._task = asyncio.create_task(self._elect_forever(), name="shared-listener")
        fed = asyncio.create_task(self._fed.wait())
        try:
            await asyncio.wait({self._task, fed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fed.cancel()
        if self._task.done():
            self._task.result()

    async def run(self) -> None:
        """Lead or follow until cancelled; a leader whose LISTEN is lost for good raises."""
        if self._task is None:
            raise RuntimeError("start() first")
        await self._task

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def _elect_forever(self) -> None:
        followed = False
        while True:
            sock = bind_name(self._name)
            if sock is not None:
                if followed:
                    self.hand_overs += 1
                    log.info("shared_listener_taken_over")
                await self._lead(sock)
                return
            try:
                reader, writer = await _connect_name(self._name)
            except OSError:
                await asyncio.sleep(FOLLOW_RETRY)  # the leader is between dying and binding
                continue
            followed = True
            await self._follow(reader, writer)
            self._gap_pending = True  # whatever came while we are between leaders is gone

    async def _lead(self, sock: socket.socket) -> None:
        self.leading = True
        try:
            await self._connect()
        except BaseException:
            sock.close()
            self.leading = False
            raise
        self._fed.set()
        self._whole_again()
        server = await asyncio.start_unix_server(self._accept, sock=sock)
        watching = asyncio.create_task(self._report_status(), name="shared-listener-status")
        try:
            async with server:
                await self._listen()
        finally:
            watching.cancel()
            for writer in list(self._followers):
                writer.close()
            self.leading = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(status_frame(self._listener_up()))
        self._followers.add(writer)
        try:
            await reader.read()  # followers send nothing: this returns when one goes away
        finally:
            self._followers.discard(writer)
            writer.close()

    def relay(self, batch: list[str]) -> None:
        """The leader's LISTEN connection's batches: to this worker's readers, then to every
        follower's."""
        self._feed(batch)
        if not self._followers:
            return
        frame = encode_batch(batch)
        for writer in list(self._followers):
            if writer.transport.get_write_buffer_size() > RELAY_BUFFER_LIMIT:
                log.warning("shared_listener_follower_dropped", reason="too far behind")
                self._followers.discard(writer)
                writer.transport.abort()
                continue
            writer.write(frame)
            self.relayed += len(batch)

    def _whole_again(self) -> None:
        if self._gap_pending:
            self._gap_pending = False
            self._on_gap()

    async def _report_status(self) -> None:
        # Followers mirror the leader's LISTEN state for /ready; a change is rare, so a short
        # poll costs nothing and needs no hook inside the listener.
        reported = self._listener_up()
        while True:
            await asyncio.sleep(0.2)
            now = self._listener_up()
            if now != reported:
                reported = now
                for writer in list(self._followers):
                    writer.write(status_frame(now))

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.linked = True
        log.info("shared_listener_following")
        try:
            while True:
                kind, length = _HEADER.unpack(await reader.readexactly(_HEADER.size))
                body = await reader.readexactly(length) if length else b""
                if kind == BATCH:
                    self._feed(decode_batch(body))
                elif kind in (UP, DOWN):
                    self.leader_up = kind == UP
                    if self.leader_up:
                        self._fed.set()
                        self._whole_again()
                    else:
                        self._gap_pending = True
        except (asyncio.IncompleteReadError, ConnectionError, ValueError) as exc:
            log.warning("shared_listener_leader_lost", error=type(exc).__name__)
        finally:
            self.linked = self.leader_up = False
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()
