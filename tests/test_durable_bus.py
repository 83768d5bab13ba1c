"""Durable channels wired to sockets (SPEC 7): stored writes, ordered reads, catch-up, resume.

Real gateways, real PostgreSQL, real sockets. Faults are real: backends terminated, the private
`cluster` restarted or stopped.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
from collections.abc import Sequence
from typing import Any

import psycopg
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed
from websockets.typing import Subprotocol

from dev.devdb import ThrowawayPostgres
from pgws.db import durable, durable_schema
from pgws.parsers import ChannelSet
from pgws.positions import parse_position
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    assert_nothing_received,
    channel_name,
    http_get,
    make_token,
    recv_json,
    run_pgws,
    signal_closes_1001_and_exits_0,
    subscribed,
    until,
)

DB = psycopg.AsyncConnection[Any]
V2 = [Subprotocol("pgws.v2")]


async def start_durable(start_gateway: StartGateway, *channels: str, **overrides: Any) -> Running:
    """A gateway whose durable channels are `channels` (every one when none is named)."""
    selection = ChannelSet(names=channels) if channels else ChannelSet(every=True)
    overrides.setdefault("check_listener_interval", 0.5)
    running: Running = await start_gateway(durable=selection, **overrides)
    return running


async def following(running: Running, channel: str) -> None:
    """Wait until this gateway delivers new rows of `channel` (its starting point read)."""
    bus = running.gateway.durable
    assert bus is not None
    await until(lambda: bus.following(channel), f"following {channel}")


async def reader(running: Running, channel: str, **kwargs: Any) -> ClientConnection:
    """A legacy read-only socket on `channel`, subscribed and followed."""
    ws: ClientConnection = await running.connect(
        f"/{channel}/{make_token({'mode': 'r'})}", **kwargs
    ).__aenter__()
    await subscribed(running, channel)
    await following(running, channel)
    return ws


async def send(db: DB, channel: str, payload: str) -> str:
    """pgws.send() as a SQL producer would; the position."""
    cur = await db.execute("SELECT pgws.send(%s, %s)", (channel, payload))
    row = await cur.fetchone()
    assert row is not None
    return str(row[0])


async def receive(ws: ClientConnection, count: int) -> list[str]:
    """The next `count` text frames, bounded."""
    got = []
    async with asyncio.timeout(TIMEOUT):
        for _ in range(count):
            message = await ws.recv()
            assert isinstance(message, str)
            got.append(message)
    return got


async def stored_payloads(db: DB, channel: str) -> list[str]:
    return [m.payload for m in await durable.fetch_after(db, channel, 0, 100_000)]


async def v2_socket(running: Running, claims: dict[str, Any], **kwargs: Any) -> ClientConnection:
    ws: ClientConnection = await running.connect(
        f"/{make_token(claims)}", subprotocols=V2, **kwargs
    ).__aenter__()
    return ws


async def request(ws: ClientConnection, **fields: Any) -> dict[str, Any]:
    await ws.send(json.dumps(fields))
    return await recv_json(ws)


def offsets(frames: Sequence[dict[str, Any]]) -> list[int]:
    found = []
    for frame in frames:
        parsed = parse_position(frame["pos"])
        assert parsed is not None
        found.append(parsed.offset)
    return found


# --- writes and reads --------------------------------------------------------------------------


async def test_a_socket_write_is_stored_and_readers_get_the_spec_3_bytes(
    start_gateway: StartGateway, db: DB
) -> None:
    """A legacy writer's frame on a durable channel is a row whose payload is the envelope, and a
    legacy reader gets exactly that text; the channel is not NOTIFYd."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await reader(running, chat)
    async with running.connect(f"/{chat}/{make_token({'mode': 'w', 'user': 'ann'})}") as writer:
        await writer.send("hello")
        [text] = await receive(ws, 1)
    envelope = json.loads(text)
    assert envelope["event"] == "WebsocketMessage"
    assert envelope["channel"] == chat
    assert envelope["payload"] == "hello"
    assert envelope["claims"]["user"] == "ann"
    assert await stored_payloads(db, chat) == [text]
    assert running.gateway.notifier.sent == 0  # no NOTIFY for a durable channel's message
    await ws.close()


async def test_non_durable_channels_keep_using_notify_in_durable_mode(
    start_gateway: StartGateway, db: DB
) -> None:
    """Beside a durable channel, another channel is NOTIFYd as today, and nothing is stored."""
    chat, plain = channel_name(), channel_name()
    running = await start_durable(start_gateway, chat)
    async with running.connect(f"/{plain}/{make_token({'mode': 'rw'})}") as ws:
        await subscribed(running, plain)
        await ws.send("ephemeral")
        [text] = await receive(ws, 1)
    assert json.loads(text)["payload"] == "ephemeral"
    assert running.gateway.notifier.sent == 1
    assert await stored_payloads(db, plain) == []


async def test_sql_producers_reach_legacy_and_v2_readers_with_positions(
    start_gateway: StartGateway, db: DB
) -> None:
    """pgws.send(): the legacy reader gets the payload text unchanged, a v2 reader a `msg` with
    `data` and `pos` (the position pgws.send returned)."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    legacy = await reader(running, chat)
    v2 = await v2_socket(running, {"mode": "r"})
    assert (await request(v2, op="sub", ch=chat))["op"] == "ok"
    position = await send(db, chat, '{"n":1}')
    plain = await send(db, chat, "not json")
    assert await receive(legacy, 2) == ['{"n":1}', "not json"]
    frames = await receive(v2, 2)
    assert frames[0] == f'{{"op":"msg","ch":"{chat}","data":{{"n":1}},"pos":"{position}"}}'
    assert json.loads(frames[1]) == {"op": "msg", "ch": chat, "data": "not json", "pos": plain}
    await legacy.close()
    await v2.close()


async def test_a_1_mib_frame_is_stored_and_delivered_whole(
    start_gateway: StartGateway, db: DB
) -> None:
    """With PGWS_MAX_MESSAGE_SIZE at 1 MiB, a 1 MiB frame on a durable channel goes through."""
    chat = channel_name()
    running = await start_durable(
        start_gateway, chat, max_message_size=1 << 20, client_max_buffer=8 << 20
    )
    ws = await reader(running, chat, max_size=None)
    frame = "x" * (1 << 20)
    async with running.connect(f"/{chat}/{make_token({'mode': 'w'})}") as writer:
        await writer.send(frame)
        [text] = await receive(ws, 1)
    assert json.loads(text)["payload"] == frame
    assert await stored_payloads(db, chat) == [text]
    await ws.close()


async def test_a_big_frame_on_a_non_durable_channel_is_still_1009(
    start_gateway: StartGateway,
) -> None:
    """In durable mode a channel that is not durable keeps NOTIFY's 8000-byte limit (1009)."""
    chat, plain = channel_name(), channel_name()
    running = await start_durable(start_gateway, chat, max_message_size=1 << 20)
    async with running.connect(f"/{plain}/{make_token({'mode': 'w'})}") as writer:
        await writer.send("x" * 9000)
        with pytest.raises(ConnectionClosed) as closed:
            async with asyncio.timeout(TIMEOUT):
                await writer.recv()
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1009
    assert "NOTIFY takes at most 7999" in closed.value.rcvd.reason


async def test_many_writers_are_batched_and_each_keeps_its_order(
    start_gateway: StartGateway, db: DB
) -> None:
    """20 writers x 30 frames at once: every frame delivered once, each writer's in order, in
    fewer transactions than messages (batched across sockets)."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await reader(running, chat)
    writers, each = 20, 30

    async def write(n: int) -> None:
        token = make_token({"mode": "w"})
        async with running.connect(f"/{chat}/{token}") as w:
            for i in range(each):
                await w.send(f"{n}:{i}")
            await w.send("done")  # answered once all before it were stored: then close

    async with asyncio.timeout(TIMEOUT):
        await asyncio.gather(*(write(n) for n in range(writers)))
    got = [json.loads(t)["payload"] for t in await receive(ws, writers * (each + 1))]
    frames = [g for g in got if g != "done"]
    assert len(frames) == len(set(frames)) == writers * each
    for n in range(writers):
        assert [int(f.split(":")[1]) for f in frames if f.startswith(f"{n}:")] == list(range(each))
    writer = running.gateway.durable.writer  # type: ignore[union-attr]
    assert writer.stored == writers * (each + 1)
    assert writer.batches < writer.stored
    await ws.close()


async def test_a_failed_batch_acknowledges_nobody_and_closes_the_writer_1011(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """The database gone: the frame's batch fails, its socket is closed 1011 with the reason,
    it is counted as failed, never delivered, and writes work again once the database is back."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat, db_uri=cluster.uri)
    ws = await reader(running, chat)
    async with running.connect(f"/{chat}/{make_token({'mode': 'w'})}") as w:
        await w.send("first")
        assert len(await receive(ws, 1)) == 1
        await asyncio.to_thread(cluster.stop, "fast")
        try:
            await w.send("lost")
            with pytest.raises(ConnectionClosed) as closed:
                async with asyncio.timeout(TIMEOUT):
                    await w.recv()
        finally:
            await asyncio.to_thread(cluster.start)
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 1011
    assert closed.value.rcvd.reason == "database unavailable: the message was not stored"
    bus = running.gateway.durable
    assert bus is not None
    assert bus.writer.failed == 1
    await until(bus.is_up, "listeners back")
    async with running.connect(f"/{chat}/{make_token({'mode': 'w'})}") as again:
        await again.send("after")
        [text] = await receive(ws, 1)
    assert json.loads(text)["payload"] == "after"
    await ws.close()


# --- catch-up ----------------------------------------------------------------------------------


async def test_a_lost_wake_up_is_repaired_by_the_reconcile(
    start_gateway: StartGateway, db: DB
) -> None:
    """Rows stored without any wake-up (pgws.store_many) are delivered by the reconcile."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await reader(running, chat)
    await db.execute("SELECT pgws.store_many(%s, %s)", (chat, ["a", "b", "c"]))
    assert await receive(ws, 3) == ["a", "b", "c"]
    bus = running.gateway.durable
    assert bus is not None
    assert bus.stats().repairs >= 1
    assert bus.stats().caught_up == 3
    await ws.close()


async def test_messages_sent_while_the_listen_connections_are_down_arrive_once_in_order(
    start_gateway: StartGateway, db: DB
) -> None:
    """Every pgws backend of the gateway terminated while producers keep sending: the reader
    gets every message once, in order."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await reader(running, chat)
    sent = [str(n) for n in range(60)]
    for n, payload in enumerate(sent):
        await send(db, chat, payload)
        if n in (10, 30):
            await db.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                " WHERE application_name LIKE 'pgws-%%' AND datname = current_database()"
            )
    assert await receive(ws, len(sent)) == sent
    await assert_nothing_received(ws, 0.3)
    await ws.close()


async def test_a_database_restart_loses_and_repeats_nothing(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """Fast and immediate restarts between sends: every message once, in order."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat, db_uri=cluster.uri)
    ws = await reader(running, chat)
    sent: list[str] = []
    for round_, mode in enumerate(("fast", "immediate")):
        async with await psycopg.AsyncConnection.connect(cluster.uri, autocommit=True) as db:
            await db.execute("SET synchronous_commit = on")  # an immediate stop keeps it
            for n in range(20):
                sent.append(f"{round_}:{n}")
                await send(db, chat, sent[-1])
        await asyncio.to_thread(cluster.restart, mode)  # type: ignore[arg-type]
    async with await psycopg.AsyncConnection.connect(cluster.uri, autocommit=True) as db:
        for n in range(20):
            sent.append(f"after:{n}")
            await send(db, chat, sent[-1])
    assert await receive(ws, len(sent)) == sent
    await assert_nothing_received(ws, 0.3)
    await ws.close()


async def test_after_the_database_was_down_30_s_sockets_stay_and_get_everything(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """The database stopped for 30 s: sockets stay open; what producers send as soon as it is
    back, before pgws has reconnected, reaches the reader once and in order."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat, db_uri=cluster.uri)
    ws = await reader(running, chat)
    async with await psycopg.AsyncConnection.connect(cluster.uri, autocommit=True) as db:
        await send(db, chat, "before")
    assert await receive(ws, 1) == ["before"]
    await asyncio.to_thread(cluster.stop, "fast")
    await asyncio.sleep(30)  # the outage itself (nothing to await: the database is away)
    await asyncio.to_thread(cluster.start)
    sent = [f"m{n}" for n in range(50)]
    async with await psycopg.AsyncConnection.connect(cluster.uri, autocommit=True) as db:
        for payload in sent:
            await send(db, chat, payload)
    assert await receive(ws, len(sent)) == sent
    await assert_nothing_received(ws, 0.3)
    await ws.close()


# --- v2: pub with pos, sub with from ------------------------------------------------------------


async def test_v2_pub_on_a_durable_channel_replies_ok_with_its_position(
    start_gateway: StartGateway, db: DB
) -> None:
    """`pub` replies `ok` with `pos` once committed; readers' `msg` carries the same `pos`."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    async with running.connect(f"/{make_token({'mode': 'rw'})}", subprotocols=V2) as ws:
        assert (await request(ws, op="sub", ch=chat, echo=False))["op"] == "ok"
        other = await v2_socket(running, {"mode": "r"})
        assert (await request(other, op="sub", ch=chat))["op"] == "ok"
        reply = await request(ws, op="pub", ch=chat, data={"hi": 1}, ref=7)
        assert reply["op"] == "ok"
        assert reply["ref"] == 7
        assert parse_position(reply["pos"]) is not None
        message = await recv_json(other)
        assert message["pos"] == reply["pos"]
        assert json.loads(message["data"]["payload"]) == {"hi": 1}
        await assert_nothing_received(ws, 0.3)  # echo:false holds for stored messages too
        await other.close()


async def test_sub_from_a_position_replays_exactly_what_followed_then_goes_live(
    start_gateway: StartGateway, db: DB
) -> None:
    """`sub` with `from`: ok recovered:true, every later message in order, then live ones."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    positions = [await send(db, chat, json.dumps(n)) for n in range(5)]
    ws = await v2_socket(running, {"mode": "r"})
    reply = await request(ws, op="sub", ch=chat, ref=1, **{"from": positions[1]})
    assert reply == {"op": "ok", "ref": 1, "ch": chat, "recovered": True}
    replayed = [await recv_json(ws) for _ in range(3)]
    assert [m["data"] for m in replayed] == [2, 3, 4]
    assert [m["pos"] for m in replayed] == positions[2:]
    live = await send(db, chat, json.dumps(5))
    assert await recv_json(ws) == {"op": "msg", "ch": chat, "data": 5, "pos": live}
    await ws.close()


async def test_sub_from_the_latest_position_replays_nothing(
    start_gateway: StartGateway, db: DB
) -> None:
    """Resuming from the newest position is recovered:true with nothing to replay."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    last = await send(db, chat, "0")
    ws = await v2_socket(running, {"mode": "r"})
    reply = await request(ws, op="sub", ch=chat, **{"from": last})
    assert reply["recovered"] is True
    await assert_nothing_received(ws, 0.3)
    await ws.close()


async def test_every_unrecoverable_position_is_recovered_false_with_its_reason(
    start_gateway: StartGateway, db: DB
) -> None:
    """SPEC 7's list: malformed, another channel's, unknown (never given out), older than
    retention, from before a history reset, more than PGWS_DURABLE_REPLAY_MAX behind. Each is
    recovered:false with nothing replayed, and the subscription is live."""
    chat, other = channel_name(), channel_name()
    running = await start_durable(start_gateway, durable_replay_max=3)
    positions = [await send(db, chat, str(n)) for n in range(6)]
    elsewhere = await send(db, other, "x")
    first = parse_position(positions[0])
    assert first is not None
    never = f"{first.channel_hash}:{first.epoch}:99:{first.tag}"

    async def reason(position: Any) -> str:
        ws = await v2_socket(running, {"mode": "r"})
        try:
            reply = await request(ws, op="sub", ch=chat, **{"from": position})
            assert reply["op"] == "ok"
            assert reply["recovered"] is False
            await assert_nothing_received(ws, 0.1)
            return str(reply["reason"])
        finally:
            await ws.close()

    assert await reason("garbage") == "malformed"
    assert await reason(12) == "malformed"
    assert await reason(elsewhere) == "other channel"
    assert await reason(never) == "unknown"
    assert await reason(positions[0]) == "too far behind"
    await db.execute('DELETE FROM pgws.message WHERE channel = %s AND "offset" <= 3', (chat,))
    assert await reason(positions[2]) == "older than retention"
    await db.execute("DELETE FROM pgws.channel WHERE name = %s", (chat,))
    await send(db, chat, "new history")
    assert await reason(positions[4]) == "history reset"
    # And the subscription is live after recovered:false.
    ws = await v2_socket(running, {"mode": "r"})
    reply = await request(ws, op="sub", ch=chat, **{"from": "garbage"})
    assert reply["recovered"] is False
    live = await send(db, chat, '"live"')
    assert await recv_json(ws) == {"op": "msg", "ch": chat, "data": "live", "pos": live}
    await ws.close()


async def test_sub_from_on_a_non_durable_channel_is_recovered_false(
    start_gateway: StartGateway,
) -> None:
    """In durable mode, `from` on a channel PGWS_DURABLE does not select is recovered:false."""
    chat, plain = channel_name(), channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await v2_socket(running, {"mode": "r"})
    reply = await request(ws, op="sub", ch=plain, **{"from": "a:b:1:c"})
    assert reply == {"op": "ok", "ch": plain, "recovered": False}
    await ws.close()


async def test_resume_while_messages_keep_arriving_has_no_duplicate_and_no_gap(
    start_gateway: StartGateway, db: DB, dsn: str
) -> None:
    """A producer sends 400 messages while v2 sockets resume from old positions one after the
    other: each socket sees every offset after its position exactly once, in order."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    # A live legacy reader keeps the channel followed, so resumes meet a moving cursor.
    watcher = await reader(running, chat)
    first = [await send(db, chat, str(n)) for n in range(20)]
    total = 400

    async def produce() -> None:
        async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
            for n in range(20, total):
                await send(conn, chat, str(n))
                if n % 7 == 0:
                    await asyncio.sleep(0)

    producing = asyncio.create_task(produce())
    sockets = []
    try:
        for k in range(8):
            ws = await v2_socket(running, {"mode": "r"})
            reply = await request(ws, op="sub", ch=chat, **{"from": first[k]})
            assert reply["recovered"] is True
            sockets.append((k, ws))
            await asyncio.sleep(0.01)
        await producing
    finally:
        producing.cancel()
    for k, ws in sockets:
        start = parse_position(first[k])
        assert start is not None
        frames = [await recv_json(ws) for _ in range(total - start.offset)]
        assert offsets(frames) == list(range(start.offset + 1, total + 1))
        assert [int(f["data"]) for f in frames] == list(range(start.offset, total))
        await assert_nothing_received(ws, 0.1)
        await ws.close()
    await watcher.close()


async def test_sub_from_while_the_database_is_down_is_503_retry(
    start_gateway: StartGateway, cluster: ThrowawayPostgres
) -> None:
    """A resume the database cannot answer is `err 503` with retry, and the socket stays."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat, db_uri=cluster.uri)
    async with await psycopg.AsyncConnection.connect(cluster.uri, autocommit=True) as db:
        position = await send(db, chat, "0")
    ws = await v2_socket(running, {"mode": "r"})
    await asyncio.to_thread(cluster.stop, "fast")
    try:
        reply = await request(ws, op="sub", ch=chat, ref=3, **{"from": position})
        assert reply == {
            "op": "err",
            "ref": 3,
            "code": 503,
            "reason": "database unavailable",
            "retry": True,
        }
        assert (await request(ws, op="ping"))["op"] == "pong"
    finally:
        await asyncio.to_thread(cluster.start)
    reply = await request(ws, op="sub", ch=chat, **{"from": position})
    assert reply["recovered"] is True
    await ws.close()


async def test_a_hostile_from_is_malformed_and_the_socket_stays(
    start_gateway: StartGateway,
) -> None:
    """Huge, odd or typed-wrong `from` values: recovered:false `malformed` or err 400, never a
    crash; the socket keeps working."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await v2_socket(running, {"mode": "r"})
    for n, value in enumerate(["", "x" * 5000, "0:0:0:0", "\u202e:1:2:3", 10**30, -1]):
        reply = await request(ws, op="sub", ch=chat, **{"from": value})
        assert reply["recovered"] is False
        assert reply["reason"] == "malformed", value
        assert (await request(ws, op="unsub", ch=chat, ref=n))["op"] == "ok"
    for value in [None, [], {}, True, 1.5]:
        reply = await request(ws, op="sub", ch=chat, **{"from": value})
        assert reply["code"] == 400
    assert (await request(ws, op="ping"))["op"] == "pong"
    await ws.close()


async def test_metrics_show_the_durable_counters(start_gateway: StartGateway, db: DB) -> None:
    """/metrics: stored, failed, batches, delivered, replayed and resumes by outcome."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await reader(running, chat)
    async with running.connect(f"/{chat}/{make_token({'mode': 'w'})}") as w:
        await w.send("one")
        await receive(ws, 1)
    position = await send(db, chat, "two")
    await receive(ws, 1)
    v2 = await v2_socket(running, {"mode": "r"})
    [earlier] = await durable.fetch_after(db, chat, 0, 1)  # the socket's message, offset 1
    assert earlier.offset == 1
    assert parse_position(position) is not None
    assert (await request(v2, op="sub", ch=chat, **{"from": earlier.position}))["recovered"] is True
    await recv_json(v2)
    status, _, body = await http_get(running, "/metrics")
    assert status == 200
    text = body.decode()

    def value(name: str) -> float:
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.MULTILINE)
        assert found is not None, name
        return float(found.group(1))

    assert value("pgws_durable_stored_total") == 1
    assert value("pgws_durable_failed_total") == 0
    assert value("pgws_durable_batches_total") == 1
    assert value("pgws_durable_delivered_total") == 2
    assert value("pgws_durable_replayed_total") == 1
    assert value('pgws_durable_resumes_total{result="recovered"}') == 1
    assert value('pgws_durable_resumes_total{result="not_recovered"}') == 0
    assert value("pgws_durable_channels") == 1
    assert value("pgws_durable_oldest_undelivered_seconds") >= 0
    await ws.close()
    await v2.close()


async def test_without_migrate_a_missing_schema_stops_serve_with_exit_78(fresh_uri: str) -> None:
    """PGWS_DURABLE_MIGRATE=false against a database without the schema: one line, exit 78."""
    result = await asyncio.to_thread(
        run_pgws,
        "serve",
        env={
            "PGWS_DB_URI": fresh_uri,
            "PGWS_JWT_SECRET": "s" * 32,
            "PGWS_PORT": "0",
            "PGWS_RETRIES": "1",
            "PGWS_DURABLE": "true",
            "PGWS_DURABLE_MIGRATE": "false",
        },
    )
    assert result.returncode == 78
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1
    assert "PGWS_DURABLE_MIGRATE is false and the database has no pgws schema" in errors[0]
    assert "pgws migrate" in errors[0]


async def test_meta_events_on_a_durable_meta_channel_are_stored_too(
    start_gateway: StartGateway, db: DB
) -> None:
    """A meta channel that PGWS_DURABLE selects gets ConnectionOpen/Close as durable rows."""
    meta, chat = channel_name(), channel_name()
    running = await start_durable(start_gateway, meta, meta_channel=meta)
    watcher = await reader(running, meta)

    async def next_event_of_chat() -> str:
        while True:
            [text] = await receive(watcher, 1)
            if json.loads(text)["payload"] == chat:  # the watcher's own open may come first
                return text

    async with running.connect(f"/{chat}/{make_token({'mode': 'r'})}"):
        opened = await next_event_of_chat()
    closed = await next_event_of_chat()
    assert json.loads(opened)["event"] == "ConnectionOpen"
    assert json.loads(closed)["event"] == "ConnectionClose"
    stored = await stored_payloads(db, meta)
    assert stored[-2:] == [opened, closed]
    await watcher.close()


async def test_two_gateways_on_one_database_see_each_others_socket_writes(
    start_gateway: StartGateway,
) -> None:
    """A socket's write stored through one pgws process reaches readers on another (the wake-up
    and the rows go through the database), in order."""
    chat = channel_name()
    first = await start_durable(start_gateway, chat)
    second = await start_durable(start_gateway, chat)
    ws = await reader(second, chat)
    async with first.connect(f"/{chat}/{make_token({'mode': 'w'})}") as writer:
        for n in range(10):
            await writer.send(str(n))
        got = [json.loads(text)["payload"] for text in await receive(ws, 10)]
    assert got == [str(n) for n in range(10)]
    await ws.close()


async def test_fetch_many_reads_several_channels_within_a_byte_budget(db: DB) -> None:
    """One query serves many channels' cursors; a channel stops once past the byte budget (the
    first row always comes) and says whether more may follow."""
    await durable_schema.migrate(db)
    a, b, empty = channel_name(), channel_name(), channel_name()
    for payload in ("aaa", "bbb", "ccc"):
        await send(db, a, payload)
    await send(db, b, "x" * 10)
    found = await durable.fetch_many(db, [(a, None, 0), (b, None, 0), (empty, None, 0)], 10, 5)
    assert set(found) == {a, b}
    rows, more = found[a]
    assert [row.payload for row in rows] == ["aaa", "bbb"]
    assert more is True
    first = parse_position(rows[0].position)
    assert first is not None
    epoch = first.epoch
    rows, more = found[b]
    assert [row.payload for row in rows] == ["x" * 10]  # over the budget alone: still read
    assert more is True
    rows, more = (await durable.fetch_many(db, [(a, None, 2)], 10, 1000))[a]
    assert [(row.offset, row.payload) for row in rows] == [(3, "ccc")]
    assert more is False
    rows, more = (await durable.fetch_many(db, [(a, epoch, 0)], 1, 1000))[a]
    assert [row.payload for row in rows] == ["aaa"]
    assert more is True
    assert await durable.fetch_many(db, [(a, "00000000", 0)], 10, 1000) == {}  # other history


async def test_a_reset_history_is_a_gap_for_live_v2_readers_then_the_new_messages(
    start_gateway: StartGateway, db: DB
) -> None:
    """The channel's row deleted (its history reset) under a live v2 subscription: the reader
    gets `gap` for the channel, then the new history's message (and no old one again)."""
    chat = channel_name()
    running = await start_durable(start_gateway, chat)
    ws = await v2_socket(running, {"mode": "r"})
    assert (await request(ws, op="sub", ch=chat))["op"] == "ok"
    await following(running, chat)
    await send(db, chat, '"old"')
    assert (await recv_json(ws))["data"] == "old"
    await db.execute("DELETE FROM pgws.channel WHERE name = %s", (chat,))
    position = await send(db, chat, '"new"')
    assert await recv_json(ws) == {"op": "gap", "ch": chat}
    assert await recv_json(ws) == {"op": "msg", "ch": chat, "data": "new", "pos": position}
    await assert_nothing_received(ws, 0.3)
    await ws.close()


async def test_pgws_serve_in_durable_mode_stores_delivers_and_stops_cleanly(
    serve_process: Any, db: DB
) -> None:
    """`pgws serve` with PGWS_DURABLE from the environment: a socket write is stored and read
    back, the settings line shows the selection, and SIGTERM closes 1001 and exits 0."""
    chat = channel_name()
    serving, port = await serve_process(PGWS_DURABLE=f"{chat},other:*")
    settings = await serving.wait_for_event("settings")
    assert settings["settings"]["durable"] == f"{chat},other:*"
    url = f"ws://127.0.0.1:{port}/{chat}/{make_token({'mode': 'rw'})}"
    async with connect(url, open_timeout=TIMEOUT) as ws:
        await ws.send("hello")  # heard: the server follows the channel before reading frames
        [text] = await receive(ws, 1)
        assert json.loads(text)["payload"] == "hello"
        assert (await stored_payloads(db, chat))[-1] == text
        await signal_closes_1001_and_exits_0(serving, ws, signal.SIGTERM)


async def test_a_new_socket_hears_its_own_first_message_on_a_durable_channel(
    start_gateway: StartGateway,
) -> None:
    """SPEC 3: an rw socket receives its own messages, even the first one it sends at once on a
    durable channel nobody read before; a v2 `pub` right after `sub`'s `ok` is heard too."""
    chat, other = channel_name(), channel_name()
    running = await start_durable(start_gateway, chat, other)
    async with running.connect(f"/{chat}/{make_token({'mode': 'rw'})}") as ws:
        await ws.send("first")
        [text] = await receive(ws, 1)
        assert json.loads(text)["payload"] == "first"
    async with running.connect(f"/{make_token({'mode': 'rw'})}", subprotocols=V2) as v2:
        assert (await request(v2, op="sub", ch=other))["op"] == "ok"
        await v2.send(json.dumps({"op": "pub", "ch": other, "data": "mine", "ref": 1}))
        frames = [json.loads(t) for t in await receive(v2, 2)]  # ok and msg, in either order
        assert sorted(f["op"] for f in frames) == ["msg", "ok"]
        assert next(f for f in frames if f["op"] == "msg")["data"]["payload"] == "mine"
