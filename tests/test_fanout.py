"""Shared frames (pgws.fanout): the bytes websockets would send, on real sockets, in order, with
the buffer limit holding within one message, and the websockets internals they rely on."""

from __future__ import annotations

import asyncio
import json
import socket

import pytest
from hypothesis import given
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode

from pgws.fanout import fan_out, text_frame
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    drain_until_closed,
    make_token,
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
