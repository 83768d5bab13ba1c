"""Shared frames (pgws.fanout): the bytes websockets would send, on real sockets, in order, with
the buffer limit holding within one message, and the websockets internals they rely on; for
legacy raw text and pgws.v2 `msg` frames alike."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.typing import Subprotocol

from pgws.envelope import SENDER
from pgws.fanout import fan_out, text_frame
from pgws.protocols import v2
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    assert_nothing_received,
    channel_name,
    drain_until_closed,
    make_token,
    recv_json,
    subscribed,
    until,
)


@pytest.mark.nodb
@given(st.binary(max_size=70_000))
def test_a_text_frame_is_what_websockets_serialises(data: bytes) -> None:
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])


@pytest.mark.nodb
@pytest.mark.parametrize("size", [0, 125, 126, 65_535, 65_536, 1 << 20])
def test_a_text_frame_at_each_length_boundary(size: int) -> None:
    data = b"x" * size
    assert text_frame(data) == Frame(Opcode.TEXT, data).serialize(mask=False, extensions=[])


def readers_of(gateway: Running, channel: str) -> list[ServerConnection]:
    return sorted(gateway.gateway.registry.subscribers(channel), key=id)


async def test_a_batch_reaches_every_socket_whole_and_in_order(start_gateway: StartGateway) -> None:
    """Plain sockets get one joined write; a compressed one goes through websockets itself."""
    gateway = await start_gateway(compression=True)
    chat = channel_name()
    path = f"/{chat}/{make_token({'mode': 'r'})}"
    async with (
        gateway.connect(path, compression=None) as plain,
        gateway.connect(path, compression=None) as other,
        gateway.connect(path) as deflated,  # offers permessage-deflate, which the server takes
    ):
        await subscribed(gateway, chat, 3)
        assert deflated.protocol.extensions
        texts = [json.dumps({"channel": chat, "payload": "é" * n, "n": n}) for n in range(50)]
        readers = readers_of(gateway, chat)
        handed = fan_out([(readers, text) for text in texts], buffer_limit=1 << 20)
        assert handed == 150
        for ws in (plain, other, deflated):
            async with asyncio.timeout(TIMEOUT):
                assert [await ws.recv() for _ in texts] == texts


async def test_internals_fan_out_relies_on_are_still_there(gateway: Running) -> None:
    """If a websockets release renames these, this fails before users' sockets do."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}"):
        await subscribed(gateway, chat)
        (conn,) = readers_of(gateway, chat)
        assert isinstance(conn.protocol.writes, list)
        assert conn.protocol.expect_continuation_frame is False
        assert conn.send_in_progress is None
        assert conn.protocol.extensions == []
        assert conn.transport.get_write_buffer_size() == 0


async def test_a_stalled_reader_goes_past_its_limit_by_one_frame_at_most(
    start_gateway: StartGateway,
) -> None:
    limit = 64 * 1024
    gateway = await start_gateway(client_max_buffer=limit)
    chat = channel_name()
    stalled_sock = socket.socket()
    stalled_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled_sock.connect(("127.0.0.1", gateway.gateway.port))
    async with gateway.connect(
        f"/{chat}/{make_token({'mode': 'r'})}", max_queue=1, sock=stalled_sock
    ) as stalled:
        await subscribed(gateway, chat)
        (conn,) = readers_of(gateway, chat)
        conn.transport.get_extra_info("socket").setsockopt(
            socket.SOL_SOCKET, socket.SO_SNDBUF, 4096
        )
        text = json.dumps({"channel": chat, "payload": "x" * 7000})
        peak = 0
        for _ in range(40):  # batches of 20: 140 kB each, past the limit within the first few
            fan_out([([conn], text)] * 20, buffer_limit=limit)
            peak = max(peak, conn.transport.get_write_buffer_size())
            await asyncio.sleep(0)
        assert peak <= limit + len(text_frame(text.encode())), peak
        await until(lambda: not gateway.gateway.registry.subscribers(chat), "the 1008 drop")
        with pytest.raises(ConnectionClosed):
            await drain_until_closed(stalled)


# pgws.v2 sockets (SPEC 8): their `msg` frames go through the same fan-out as legacy raw text.

V2 = [Subprotocol("pgws.v2")]


async def v2_reader(gateway: Running, chat: str, **sub: Any) -> ClientConnection:
    """A pgws.v2 socket authenticated read-only and subscribed to `chat` (its `ok`s read)."""
    ws = await gateway.connect("/", subprotocols=V2, max_queue=None).__aenter__()
    await ws.send(json.dumps({"op": "auth", "token": make_token({"mode": "r"})}))
    assert (await recv_json(ws))["op"] == "ok"
    await ws.send(json.dumps({"op": "sub", "ch": chat, **sub}))
    assert (await recv_json(ws))["op"] == "ok"
    return ws


def v2_readers_of(gateway: Running, chat: str) -> list[ServerConnection]:
    return sorted(gateway.gateway.registry.v2_readers(chat), key=id)


def recording(
    conn: ServerConnection, writes: list[tuple[ServerConnection, bytes]]
) -> Callable[[bytes], None]:
    """`conn`'s transport.write, recording what each call wrote (the real socket still gets it)."""
    original = conn.transport.write

    def write(data: bytes) -> None:
        writes.append((conn, bytes(data)))
        original(data)

    return write


async def test_a_v2_batch_is_one_write_per_socket_whole_and_in_order(gateway: Running) -> None:
    """Each `msg` frame built once; a batch's frames joined, one write per v2 socket, in order."""
    chat = channel_name()
    a, b = await v2_reader(gateway, chat), await v2_reader(gateway, chat)
    try:
        conns = v2_readers_of(gateway, chat)
        assert len(conns) == 2
        writes: list[tuple[ServerConnection, bytes]] = []
        for conn in conns:
            conn.transport.write = recording(conn, writes)  # type: ignore[method-assign, assignment]
        raws = [json.dumps({"channel": chat, "payload": "é" * n, "n": n}) for n in range(30)]
        raws.insert(7, f"plain text to {chat}")  # not JSON: it goes to the listen channel's readers
        handed = gateway.gateway.registry.publish_batch(raws)
        assert handed == 60
        assert sorted(id(conn) for conn, _ in writes) == sorted(id(c) for c in conns)  # one each
        expected = [m for m in raws if m.startswith("{")]
        for ws in (a, b):
            async with asyncio.timeout(TIMEOUT):
                got = [json.loads(await ws.recv()) for _ in expected]
            assert [g["data"] for g in got] == [json.loads(m) for m in expected]
            assert {g["op"] for g in got} == {"msg"}
            assert {g["ch"] for g in got} == {chat}
        (first_write,) = {data for _, data in writes}  # the same bytes went to both sockets
        assert first_write.startswith(text_frame(v2.msg(chat, expected[0], True).encode()))
    finally:
        await a.close()
        await b.close()


async def test_echo_false_skips_exactly_the_senders_socket_inside_a_batch(
    gateway: Running,
) -> None:
    chat = channel_name()
    quiet = await v2_reader(gateway, chat, echo=False)
    loud = await v2_reader(gateway, chat)
    try:
        conns = {c.v2_sender: c for c in v2_readers_of(gateway, chat)}  # type: ignore[attr-defined]
        quiet_name = next(n for n, c in conns.items() if c.v2_no_echo)  # type: ignore[attr-defined]
        loud_name = next(n for n in conns if n != quiet_name)
        raws = [
            json.dumps({"channel": chat, "payload": "from quiet", SENDER: quiet_name}),
            json.dumps({"channel": chat, "payload": "from loud", SENDER: loud_name}),
            json.dumps({"channel": chat, "payload": "from sql"}),
        ]
        assert gateway.gateway.registry.publish_batch(raws) == 5
        async with asyncio.timeout(TIMEOUT):
            heard_by_quiet = [json.loads(await quiet.recv())["data"]["payload"] for _ in range(2)]
            heard_by_loud = [json.loads(await loud.recv())["data"]["payload"] for _ in range(3)]
        assert heard_by_quiet == ["from loud", "from sql"]
        assert heard_by_loud == ["from quiet", "from loud", "from sql"]
        await assert_nothing_received(quiet)
    finally:
        await quiet.close()
        await loud.close()


async def whole_msgs_until_closed(ws: ClientConnection, expected: Any) -> None:
    async with asyncio.timeout(TIMEOUT):
        while True:
            assert json.loads(await ws.recv()) == expected


async def test_a_stalled_v2_reader_is_dropped_1008_one_frame_past_its_limit_at_most(
    start_gateway: StartGateway,
) -> None:
    """As legacy: past PGWS_CLIENT_MAX_BUFFER it gets nothing more, whole frames only, then 1008;
    a v2 reader that keeps up gets every frame."""
    limit = 64 * 1024
    gateway = await start_gateway(client_max_buffer=limit)
    chat = channel_name()
    stalled_sock = socket.socket()
    stalled_sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled_sock.connect(("127.0.0.1", gateway.gateway.port))
    stalled = await gateway.connect(
        "/", subprotocols=V2, max_queue=1, sock=stalled_sock
    ).__aenter__()
    await stalled.send(json.dumps({"op": "auth", "token": make_token({"mode": "r"})}))
    assert (await recv_json(stalled))["op"] == "ok"
    await stalled.send(json.dumps({"op": "sub", "ch": chat}))
    assert (await recv_json(stalled))["op"] == "ok"
    (conn,) = v2_readers_of(gateway, chat)
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    raw = json.dumps({"channel": chat, "payload": "x" * 7000})
    frame = text_frame(v2.msg(chat, raw, True).encode())
    peak = 0
    for _ in range(40):  # batches of 20 frames: 140 kB each, past the limit within the first
        gateway.gateway.registry.publish_batch([raw] * 20)
        peak = max(peak, conn.transport.get_write_buffer_size())
        await asyncio.sleep(0)
    assert peak <= limit + len(frame), peak
    await until(lambda: conn.stats.slow_consumers == 1, "the 1008 drop")  # type: ignore[attr-defined]
    # What did arrive is whole `msg` frames until the close (or the abort DROP_GRACE later):
    # websockets' parser would fail the connection with 1002 on a partial or garbled frame.
    with pytest.raises(ConnectionClosed) as closed:
        await whole_msgs_until_closed(stalled, json.loads(v2.msg(chat, raw, True)))
    assert closed.value.rcvd is None or closed.value.rcvd.code == 1008
    assert closed.value.sent is None or closed.value.sent.code != 1002
    await until(lambda: not gateway.gateway.registry.v2_readers(chat), "the reader gone")
