"""PGWS_JWT_LEEWAY on a real gateway (issue 13 item 2): a clock a little behind is forgiven."""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from websockets.exceptions import InvalidStatus

from pgws.connection import Connection
from tests.conftest import (
    Running,
    StartGateway,
    channel_name,
    make_token,
    now,
    recv_json,
    subscribed,
)


async def test_a_token_expired_within_the_leeway_opens_and_reads(
    start_gateway: StartGateway, db: psycopg.AsyncConnection[Any]
) -> None:
    gateway: Running = await start_gateway(jwt_leeway=30.0)
    chat = channel_name()
    exp = int(now()) - 5
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r', 'exp': exp})}") as ws:
        await subscribed(gateway, chat)
        await gateway.notify(db, {"channel": chat, "payload": "still here"})
        assert (await recv_json(ws))["payload"] == "still here"
        (conn,) = gateway.gateway.registry.subscribers(chat)
        assert isinstance(conn, Connection)
        assert conn.grant.expires_at == exp + 30.0  # 3001 comes only after exp + leeway


async def test_without_leeway_the_same_token_is_refused(gateway: Running) -> None:
    token = make_token({"mode": "r", "exp": int(now()) - 5})
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect(f"/{channel_name()}/{token}"):
            pass
    assert refused.value.response.status_code == 401
