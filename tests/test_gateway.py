"""End to end: real clients, a real gateway, a real PostgreSQL (SPEC 2 and 3)."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from typing import Any

import psycopg
import pytest
from jose import jwt
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from pgws.errors import ConfigError
from tests.conftest import (
    ISSUED_TOKENS,
    TIMEOUT,
    Running,
    StartGateway,
    assert_nothing_received,
    channel_name,
    http_get,
    make_token,
    recv_json,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]


async def test_sent_message_reaches_the_database_as_an_envelope(gateway: Running, db: DB) -> None:
    """A frame from a `w` socket becomes one NOTIFY on the listen channel with the SPEC envelope."""
    chat = channel_name()
    token = make_token({"mode": "w", "channels": [chat], "custom": {"a": 1}})
    await db.execute(f'LISTEN "{gateway.config.listen_channel}"')
    async with gateway.connect(f"/{chat}/{token}") as ws:
        before = time.time()
        await ws.send("hello")
        notify = await anext(db.notifies(timeout=TIMEOUT))
    envelope = json.loads(notify.payload)
    assert list(envelope) == ["event", "channel", "payload", "claims"]
    assert envelope["event"] == "WebsocketMessage"
    assert envelope["channel"] == chat
    assert envelope["payload"] == "hello"
    claims = envelope["claims"]
    assert claims["mode"] == "w"
    assert claims["channels"] == [chat]
    assert claims["custom"] == {"a": 1}
    assert isinstance(claims["message_delivered_at"], float)
    assert before - 1 <= claims["message_delivered_at"] <= time.time() + 1


async def test_rw_socket_receives_its_own_message_through_the_database(gateway: Running) -> None:
    """A `rw` socket hears its own frames back on the same channel."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as ws:
        await subscribed(gateway, chat)
        await ws.send("echo me")
        envelope = await recv_json(ws)
    assert envelope["channel"] == chat
    assert envelope["payload"] == "echo me"


async def test_one_send_reaches_every_channel_of_a_multi_channel_token(gateway: Running) -> None:
    """A writer granted two channels produces one message per channel; each reader sees its own."""
    first, second = channel_name(), channel_name()
    writer_token = make_token({"mode": "w", "channels": [first, second]})
    async with (
        gateway.connect(f"/{first}/{make_token({'mode': 'r'})}") as reader_a,
        gateway.connect(f"/{second}/{make_token({'mode': 'r'})}") as reader_b,
        gateway.connect(f"/{writer_token}") as writer,
    ):
        await subscribed(gateway, first)
        await subscribed(gateway, second)
        await writer.send("to both")
        got_a, got_b = await recv_json(reader_a), await recv_json(reader_b)
    assert (got_a["channel"], got_a["payload"]) == (first, "to both")
    assert (got_b["channel"], got_b["payload"]) == (second, "to both")


async def test_multi_channel_reader_receives_from_every_granted_channel(
    gateway: Running, db: DB
) -> None:
    """A `/<jwt>` socket reads all the token's channels at once."""
    first, second = channel_name(), channel_name()
    token = make_token({"mode": "r", "channels": [first, second]})
    async with gateway.connect(f"/{token}") as ws:
        await subscribed(gateway, first)
        await subscribed(gateway, second)
        await gateway.notify(db, {"channel": first, "payload": "one"})
        await gateway.notify(db, {"channel": second, "payload": "two"})
        received = {
            (m["channel"], m["payload"]) for m in [await recv_json(ws), await recv_json(ws)]
        }
    assert received == {(first, "one"), (second, "two")}


async def test_database_notification_is_forwarded_as_its_raw_text(gateway: Running, db: DB) -> None:
    """What a producer sends with pg_notify reaches readers byte for byte, not re-serialised."""
    chat = channel_name()
    raw = '{ "event" : "WebsocketMessage",  "channel":"' + chat + '", "payload":"hi", "x": [2.50] }'
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        await gateway.notify(db, raw)
        async with asyncio.timeout(TIMEOUT):
            assert await ws.recv() == raw


async def test_sql_json_build_object_producer_reaches_the_reader(gateway: Running, db: DB) -> None:
    """The producer SQL from the README works as written."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        await db.execute(
            "SELECT pg_notify(%s, json_build_object('event','WebsocketMessage',"
            "'channel',%s::text,'payload','hi')::text)",
            (gateway.config.listen_channel, chat),
        )
        message = await recv_json(ws)
    assert message == {"event": "WebsocketMessage", "channel": chat, "payload": "hi"}


async def test_non_json_notification_goes_to_readers_of_the_listen_channel_name(
    gateway: Running, db: DB
) -> None:
    """Payloads without a string `channel` go to sockets reading the listen channel's name."""
    listen = gateway.config.listen_channel
    other = channel_name()
    async with (
        gateway.connect(f"/{listen}/{make_token({'mode': 'r'})}") as listen_reader,
        gateway.connect(f"/{other}/{make_token({'mode': 'r'})}") as other_reader,
    ):
        await subscribed(gateway, listen)
        await subscribed(gateway, other)
        for payload in ("plain text", '{"channel": 42}', "[1, 2]"):
            await gateway.notify(db, payload)
            async with asyncio.timeout(TIMEOUT):
                assert await listen_reader.recv() == payload
        await assert_nothing_received(other_reader)


async def test_read_only_socket_frames_are_dropped(gateway: Running, db: DB) -> None:
    """Mode `r`: frames from the client are read and dropped, the socket stays open."""
    chat = channel_name()
    await db.execute(f'LISTEN "{gateway.config.listen_channel}"')
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
        await subscribed(gateway, chat)
        await ws.send("ignored")
        await gateway.notify(db, {"channel": chat, "payload": "still open"})
        assert (await recv_json(ws))["payload"] == "still open"
    # Only the producer's own notification went through the database.
    payloads = [json.loads(n.payload)["payload"] async for n in db.notifies(timeout=0.3)]
    assert payloads == ["still open"]


async def test_write_only_socket_receives_nothing(gateway: Running, db: DB) -> None:
    """Mode `w`: the socket is not a reader, even of its own channel."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'w'})}") as ws:
        await ws.send("mine")
        await gateway.notify(db, {"channel": chat, "payload": "theirs"})
        await assert_nothing_received(ws)
    assert gateway.gateway.registry.subscribers(chat) == frozenset()


async def test_meta_channel_announces_opened_and_closed_sockets(
    start_gateway: StartGateway,
) -> None:
    """ConnectionOpen (and ConnectionClose) reach readers of the meta channel with the claims."""
    meta, chat = channel_name(), channel_name()
    gateway: Running = await start_gateway(meta_channel=meta)
    async with gateway.connect(f"/{meta}/{make_token({'mode': 'r'})}") as watcher:
        own_open = await recv_json(watcher)  # its own ConnectionOpen proves it is subscribed
        assert own_open["event"] == "ConnectionOpen"
        token = make_token({"mode": "rw", "channels": [chat, "other"], "user": "ann"})
        async with gateway.connect(f"/{token}"):
            opened = await recv_json(watcher)
        closed = await recv_json(watcher)
    assert opened["event"] == "ConnectionOpen"
    assert opened["channel"] == meta
    assert opened["payload"] == f"{chat},other"
    assert opened["claims"]["user"] == "ann"
    assert isinstance(opened["claims"]["message_delivered_at"], float)
    assert closed["event"] == "ConnectionClose"
    assert closed["payload"] == f"{chat},other"


async def test_socket_is_closed_with_3001_when_the_token_expires(gateway: Running) -> None:
    """`exp` passing mid-connection closes the socket with 3001 "JWT expired"."""
    token = make_token({"mode": "r", "exp": time.time() + 1.0})
    async with gateway.connect(f"/{channel_name()}/{token}") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (3001, "JWT expired")


async def test_frame_too_big_for_notify_closes_only_that_socket_with_1009(
    gateway: Running,
) -> None:
    """An envelope over NOTIFY's limit closes its socket with 1009; other sockets carry on."""
    chat = channel_name()
    async with (
        gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as bystander,
        gateway.connect(f"/{chat}/{make_token({'mode': 'w'})}") as writer,
    ):
        await subscribed(gateway, chat)
        await writer.send("x" * 7950)  # fits in a frame, not in an envelope
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await writer.recv()
        assert closed.value.rcvd is not None
        assert closed.value.rcvd.code == 1009
        assert "too big" in closed.value.rcvd.reason
        await bystander.send("still fine")
        assert (await recv_json(bystander))["payload"] == "still fine"


async def test_frame_larger_than_max_message_size_closes_with_1009(gateway: Running) -> None:
    """websockets' own size limit answers frames that could never fit with 1009."""
    async with gateway.connect(f"/{channel_name()}/{make_token({'mode': 'w'})}") as ws:
        await ws.send("x" * 20_000)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009


async def test_utf8_binary_frames_are_sent_as_text(gateway: Running) -> None:
    """A binary frame holding UTF-8 text is treated like a text frame."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as ws:
        await subscribed(gateway, chat)
        await ws.send("héllo".encode())
        assert (await recv_json(ws))["payload"] == "héllo"


async def test_non_utf8_binary_frame_closes_with_1003(gateway: Running) -> None:
    """A binary frame that is not UTF-8 cannot become a NOTIFY: close 1003."""
    async with gateway.connect(f"/{channel_name()}/{make_token({'mode': 'w'})}") as ws:
        await ws.send(b"\xff\xfe\x00")
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await ws.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1003


@pytest.mark.parametrize(
    ("claims", "path_channel", "status", "body"),
    [
        ({"channels": ["a"]}, "a", 403, "missing mode"),
        ({"mode": "x"}, "a", 403, "invalid mode"),
        ({"mode": "rw", "channels": ["a"]}, "b", 403, "not allowed: b"),
        ({"mode": "rw"}, None, 403, "no channels"),
        ({"mode": "rw", "exp": 1000}, "a", 401, "token expired"),
        ({"mode": "rw", "nbf": 4_000_000_000}, "a", 401, "invalid token"),
    ],
)
async def test_refused_handshake_gets_an_http_error_before_the_upgrade(
    gateway: Running, claims: dict[str, Any], path_channel: str | None, status: int, body: str
) -> None:
    """SPEC 2: 401 for tokens that do not verify, 403 for valid tokens that grant nothing here."""
    token = make_token(claims)
    path = f"/{token}" if path_channel is None else f"/{path_channel}/{token}"
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect(path):
            pass
    assert refused.value.response.status_code == status
    assert refused.value.response.body.decode().strip() == body


@pytest.mark.parametrize(
    "path",
    [
        "/",
        "/not-a-token",
        "/chat/eyJhbGciOiJub25lIn0.eyJtb2RlIjoicncifQ.",  # alg none
        "/chat/" + "a" * 8100,
    ],
)
async def test_garbage_tokens_are_401_invalid_token(gateway: Running, path: str) -> None:
    """Anything that is not a verifiable token reads the same: 401 invalid token."""
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect(path):
            pass
    assert refused.value.response.status_code == 401
    assert refused.value.response.body.decode().strip() == "invalid token"


async def test_request_line_over_websockets_limit_is_414(gateway: Running) -> None:
    """A URL too long for websockets' request line is refused before pgws sees it."""
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect("/chat/" + "a" * 9000):
            pass
    assert refused.value.response.status_code == 414


async def test_token_signed_with_another_secret_is_401(gateway: Running) -> None:
    """A token with a valid shape but the wrong key does not verify."""
    token = make_token({"mode": "rw"}, secret="another-secret-another-secret-xx")
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect(f"/chat/{token}"):
            pass
    assert refused.value.response.status_code == 401


async def test_three_path_segments_are_a_bad_request(gateway: Running) -> None:
    """Only /<jwt> and /<channel>/<jwt> exist: more segments get 400."""
    token = make_token({"mode": "rw"})
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect(f"/a/b/{token}"):
            pass
    assert refused.value.response.status_code == 400


async def test_path_channel_is_percent_decoded_and_query_ignored(gateway: Running) -> None:
    """`/room%201/<jwt>?x=1` opens channel "room 1"."""
    token = make_token({"mode": "r", "channels": ["room 1"]})
    async with gateway.connect(f"/room%201/{token}?ignored=1"):
        await subscribed(gateway, "room 1")


async def test_token_without_channels_opens_any_path_channel(gateway: Running) -> None:
    """SPEC 2 rule 4: a token that allows no channels grants the path channel."""
    chat = channel_name()
    async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}"):
        await subscribed(gateway, chat)


async def test_legacy_channel_claim_and_channels_are_merged(gateway: Running) -> None:
    """`channel` and `channels` together, duplicates merged, all granted on `/<jwt>`."""
    first, second = channel_name(), channel_name()
    token = make_token({"mode": "r", "channel": first, "channels": [second, first]})
    async with gateway.connect(f"/{token}"):
        await subscribed(gateway, first)
        await subscribed(gateway, second)
    registry = gateway.gateway.registry
    await until(lambda: not registry.subscribers(first), "the socket to be forgotten")


async def test_plain_http_request_gets_a_short_200(gateway: Running) -> None:
    """Without PGWS_ROOT_PATH a non-upgrade request is answered with plain text."""
    status, _headers, body = await http_get(gateway, "/")
    assert status == 200
    assert body


async def test_static_files_are_served_from_the_root_path(
    start_gateway: StartGateway, tmp_path: Any
) -> None:
    """With PGWS_ROOT_PATH, `/` is index.html and files get their content type."""
    (tmp_path / "index.html").write_text("<h1>hi</h1>")
    (tmp_path / "app.js").write_text("let x = 1;")
    gateway: Running = await start_gateway(root_path=tmp_path.resolve())
    status, headers, body = await http_get(gateway, "/")
    assert (status, body) == (200, b"<h1>hi</h1>")
    assert headers["content-type"].startswith("text/html")
    status, headers, _ = await http_get(gateway, "/app.js")
    assert status == 200
    assert "javascript" in headers["content-type"]
    status, _, _ = await http_get(gateway, "/missing.txt")
    assert status == 404
    status, _, _ = await http_get(gateway, "/../../etc/passwd")
    assert status == 404


@pytest.mark.parametrize(
    ("host", "addresses"),
    [("*4", ["127.0.0.1"]), ("*", ["127.0.0.1", "::1"]), ("*6", ["::1"]), ("::1", ["::1"])],
)
async def test_host_setting_binds_the_documented_addresses(
    start_gateway: StartGateway, host: str, addresses: list[str]
) -> None:
    """PGWS_HOST `*4` binds IPv4, `*`/`*6` IPv6 and IPv4, a literal binds itself."""
    gateway: Running = await start_gateway(host=host)
    chat = channel_name()
    for address in addresses:
        literal = f"[{address}]" if ":" in address else address
        url = f"ws://{literal}:{gateway.gateway.port}/{chat}/{make_token({'mode': 'r'})}"
        async with connect(url, open_timeout=TIMEOUT):
            pass


async def test_jwks_secret_selects_the_key_by_kid(start_gateway: StartGateway) -> None:
    """With a JWKS, the token's kid picks the key; a token signed by another key is refused."""
    old, new = (
        "b2xkLXNlY3JldC1vbGQtc2VjcmV0LW9sZC1zZWNyZXQ",
        "bmV3LXNlY3JldC1uZXctc2VjcmV0LW5ldy1zZWNyZXQ",
    )
    keys = {
        "keys": [
            {"kty": "oct", "kid": "old", "alg": "HS256", "k": old},
            {"kty": "oct", "kid": "new", "alg": "HS256", "k": new},
        ]
    }
    gateway: Running = await start_gateway(jwt_secret=json.dumps(keys).encode())
    new_secret = "new-secret-new-secret-new-secret"
    good = jwt.encode({"mode": "r"}, new_secret, algorithm="HS256", headers={"kid": "new"})
    wrong_kid = jwt.encode({"mode": "r"}, new_secret, algorithm="HS256", headers={"kid": "old"})
    ISSUED_TOKENS.extend([good, wrong_kid])
    async with gateway.connect(f"/chat/{good}"):
        pass
    with pytest.raises(InvalidStatus) as refused:
        async with gateway.connect(f"/chat/{wrong_kid}"):
            pass
    assert refused.value.response.status_code == 401


async def test_port_in_use_is_a_one_line_config_error(start_gateway: StartGateway) -> None:
    """Binding a port someone else holds fails with a ConfigError naming PGWS_PORT."""
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        with pytest.raises(ConfigError, match=f"PGWS_PORT: port {port} is already in use"):
            await start_gateway(port=port)


async def test_readme_trigger_sends_inserted_rows_to_sockets(gateway: Running, db: DB) -> None:
    """The README's INSERT trigger (with this gateway's listen channel) reaches readers."""
    chat, table = channel_name(), f"messages_{channel_name().replace('-', '_')}"
    listen = gateway.config.listen_channel
    await db.execute(
        f"""
        CREATE TABLE {table} (id bigserial PRIMARY KEY, channel text NOT NULL, body text NOT NULL);
        CREATE FUNCTION {table}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
          PERFORM pg_notify('{listen}', json_build_object(
            'event', 'WebsocketMessage', 'channel', NEW.channel, 'payload', NEW.body)::text);
          RETURN NEW;
        END $$;
        CREATE TRIGGER {table}_notify AFTER INSERT ON {table}
          FOR EACH ROW EXECUTE FUNCTION {table}_notify();
        """
    )
    try:
        async with gateway.connect(f"/{chat}/{make_token({'mode': 'r'})}") as ws:
            await subscribed(gateway, chat)
            await db.execute(f"INSERT INTO {table} (channel, body) VALUES (%s, 'row one')", (chat,))
            assert await recv_json(ws) == {
                "event": "WebsocketMessage",
                "channel": chat,
                "payload": "row one",
            }
    finally:
        await db.execute(f"DROP TABLE {table}; DROP FUNCTION {table}_notify()")


async def test_disconnect_log_line_counts_frames_in_and_messages_out(
    gateway: Running, db: DB
) -> None:
    """client_disconnected says how many frames came in and how many messages went out."""
    chat = channel_name()
    with capture_logs() as logs:
        async with gateway.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as ws:
            await subscribed(gateway, chat)
            await ws.send("one")
            await recv_json(ws)
            for index in range(2):
                await gateway.notify(db, {"channel": chat, "payload": index})
                await recv_json(ws)
        registry = gateway.gateway.registry
        await until(lambda: not registry.subscribers(chat), "the socket to be forgotten")
    ends = [entry for entry in logs if entry["event"] == "client_disconnected"]
    assert len(ends) == 1
    assert (ends[0]["frames_in"], ends[0]["messages_out"]) == (1, 3)
    assert ends[0]["code"] == 1000


async def test_short_hmac_secret_is_warned_about_at_start(start_gateway: StartGateway) -> None:
    """An HS256 secret under 32 bytes starts, with a loud warning."""
    with capture_logs() as logs:
        await start_gateway(jwt_secret=b"short-secret")
    assert any(entry["event"] == "jwt_secret_weak" and entry["bytes"] == 12 for entry in logs)
