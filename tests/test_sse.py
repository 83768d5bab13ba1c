"""GET /events (SPEC 9) with a plain HTTP client on loopback: streams, refusals, limits, resume."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from hypothesis import example, given
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.http11 import Request

from pgws import sse, sse_request, sse_stream
from pgws.buffers import BufferLedger
from pgws.claims import Verifier
from pgws.config import Config
from pgws.connection import SocketStats
from pgws.errors import BadRequest, HandshakeRefused
from pgws.parsers import ChannelSet
from pgws.registry import Registry
from tests.conftest import (
    SECRET,
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    http_get,
    make_token,
    now,
    until,
)

DB = psycopg.AsyncConnection[Any]


class Stream:
    """One /events response read by hand: status, headers, then the body block by block."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}

    async def head(self) -> None:
        async with asyncio.timeout(TIMEOUT):
            raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.decode().split("\r\n")
        self.status = int(lines[0].split()[1])
        self.headers = {
            k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if line)
        }

    async def block(self) -> str:
        """The next event block (up to its blank line), without the blank line."""
        async with asyncio.timeout(TIMEOUT):
            raw = await self.reader.readuntil(b"\n\n")
        return raw.decode()[:-2]

    async def event(self) -> dict[str, str]:
        """The next block that is not a comment, as {field: value}."""
        while True:
            block = await self.block()
            if not block.startswith(":"):
                return dict(line.split(": ", 1) for line in block.split("\n"))

    async def body(self) -> bytes:
        """Everything until the server closes."""
        async with asyncio.timeout(TIMEOUT):
            return await self.reader.read()

    def close(self) -> None:
        self.writer.close()


@contextlib.asynccontextmanager
async def events(
    gateway: Running,
    query: str,
    headers: dict[str, str] | None = None,
    method: str = "GET",
    *,
    stalled: bool = False,
) -> AsyncIterator[Stream]:
    """Open GET /events?<query> with `headers` (Accept: text/event-stream unless given);
    `stalled`: through a socket whose reader takes almost nothing (4 KiB window)."""
    sent = {"Host": "localhost", "Accept": "text/event-stream", **(headers or {})}
    async with asyncio.timeout(TIMEOUT):
        if stalled:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.gateway.port))
            reader, writer = await asyncio.open_connection(sock=sock, limit=4096)
        else:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.port)
    lines = "".join(f"{k}: {v}\r\n" for k, v in sent.items() if v is not None)
    writer.write(f"{method} /events?{query} HTTP/1.1\r\n{lines}\r\n".encode())
    stream = Stream(reader, writer)
    await stream.head()
    try:
        yield stream
    finally:
        stream.close()


def token_query(claims: dict[str, Any], *channels: str) -> str:
    return "&".join([*(f"ch={quote(c)}" for c in channels), f"token={make_token(claims)}"])


async def streaming(gateway: Running, channel: str, count: int = 1) -> None:
    await until(
        lambda: len(gateway.gateway.registry._events.get(channel, ())) >= count,
        f"{count} event streams on {channel}",
    )


def gap(channel: str) -> dict[str, str]:
    return {"event": "gap", "data": f'{{"ch":"{channel}"}}'}


async def refused(gateway: Running, query: str, **headers: str) -> tuple[int, str]:
    async with events(gateway, query, headers) as stream:
        body = await stream.body()
    return stream.status, body.decode()


# Streaming


async def test_a_stream_starts_with_its_id_and_carries_v2_msg_objects(
    gateway: Running, db: DB
) -> None:
    a, b = channel_name(), channel_name()
    async with events(gateway, token_query({"mode": "r"}, a, b)) as stream:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert stream.headers["cache-control"] == "no-store"
        assert "content-length" not in stream.headers
        assert await stream.event() == {"id": "pgws"}
        await streaming(gateway, b)
        raw = json.dumps({"channel": b, "payload": "hi", "n": [1, 2.5]})
        await gateway.notify(db, raw)
        assert await stream.block() == f'data: {{"op":"msg","ch":"{b}","data":{raw}}}'
        await gateway.notify(db, json.dumps({"channel": a, "x": 1}, indent=2))
        event = await stream.event()
        assert list(event) == ["data"]  # one line, even for a payload with line breaks
        assert json.loads(event["data"]) == {"op": "msg", "ch": a, "data": {"channel": a, "x": 1}}


async def test_a_bearer_header_token_and_a_wildcard_grant_open_a_stream(
    gateway: Running, db: DB
) -> None:
    room = f"room:{channel_name()}"
    token = make_token({"mode": "rw", "channels": ["room:*"]})
    headers = {"Authorization": f"Bearer {token}"}
    async with events(gateway, f"ch={quote(room)}", headers) as stream:
        assert stream.status == 200
        await stream.event()
        await streaming(gateway, room)
        await gateway.notify(db, "not json")
        await gateway.notify(db, {"channel": room, "n": 2})
        data = json.loads((await stream.event())["data"])
        assert data == {"op": "msg", "ch": room, "data": {"channel": room, "n": 2}}


async def test_a_stream_ends_with_a_comment_at_exp_and_when_the_server_stops(
    start_gateway: StartGateway,
) -> None:
    gateway: Running = await start_gateway()
    ch = channel_name()
    async with events(gateway, token_query({"mode": "r", "exp": int(now()) + 3}, ch)) as stream:
        assert (await stream.body()).endswith(b": token expired\n\n")
    async with events(gateway, token_query({"mode": "r"}, ch)) as stream:
        await stream.event()
        await gateway.shutdown()
        assert (await stream.body()).endswith(b": server going away\n\n")


async def test_keep_alive_comments_come_every_interval(
    start_gateway: StartGateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sse, "KEEPALIVE_INTERVAL", 0.05)
    gateway: Running = await start_gateway()
    async with events(gateway, token_query({"mode": "r"}, channel_name())) as stream:
        assert await stream.block() == "id: pgws"
        assert await stream.block() == ": keep-alive"
        assert await stream.block() == ": keep-alive"


# Resume


async def test_last_event_id_resume_of_non_durable_channels_is_gap_first_for_each(
    gateway: Running, db: DB
) -> None:
    a, b = channel_name(), channel_name()
    query = token_query({"mode": "r"}, a, b)
    for last_id in ("pgws", "garbage", "pgws  x", "pgws " + "p" * 2000, "\u00e9t\u00e9"):
        async with events(gateway, query, {"Last-Event-ID": last_id}) as stream:
            assert stream.status == 200, last_id
            assert await stream.event() == gap(a)
            assert await stream.event() == gap(b)
            assert await stream.event() == {"id": "pgws"}
            await streaming(gateway, a)
            await gateway.notify(db, {"channel": a})
            assert json.loads((await stream.event())["data"])["ch"] == a
    async with events(gateway, query, {"Last-Event-ID": "p" * 9000}) as stream:
        assert stream.status == 431  # over websockets' header line limit: refused before us


async def test_a_listen_outage_sends_event_gap_to_every_stream(
    start_gateway: StartGateway, db: DB
) -> None:
    gateway: Running = await start_gateway(check_listener_interval=5.0)
    ch = channel_name()
    listener = gateway.gateway.listener
    async with events(gateway, token_query({"mode": "r"}, ch)) as stream:
        await stream.event()
        await streaming(gateway, ch)
        await db.execute("SELECT pg_terminate_backend(%s)", (listener.backend_pid,))
        assert await stream.event() == gap(ch)
        await gateway.notify(db, {"channel": ch, "after": True})
        assert json.loads((await stream.event())["data"])["data"]["after"] is True


# Refusals: the SPEC 2 statuses, with a body that says why


async def test_refusals_are_http_statuses_with_a_reason(gateway: Running) -> None:
    ch = channel_name()
    expired = make_token({"mode": "r", "exp": int(now()) - 10})
    cases = [
        (f"ch={ch}", {}, 401, "missing token"),
        (f"ch={ch}&token=not.a.token", {}, 401, "invalid token"),
        (f"ch={ch}&token={expired}", {}, 401, "token expired"),
        (token_query({"mode": "r", "channels": ["other"]}, ch), {}, 403, f"not allowed: {ch}"),
        (token_query({"mode": "w"}, ch), {}, 403, "mode w cannot read"),
        (token_query({"channels": [ch]}, ch), {}, 403, "missing mode"),
        (token_query({"mode": "r"}), {}, 400, "no channels"),
        (token_query({"mode": "r"}, "bad\x01name"), {}, 400, "ch:"),
        ("ch=%ff&token=x", {}, 400, "percent-encoded"),
        (token_query({"mode": "r"}, ch) + "&token=x", {}, 400, "more than one token"),
        (
            token_query({"mode": "r"}, ch),
            {"Authorization": "Bearer x.y.z"},
            400,
            "in the query and in Authorization",
        ),
        (token_query({"mode": "r"}, ch), {"Accept": "application/json"}, 406, "not acceptable"),
        (token_query({"mode": "r"}, ch), {"Accept": "text/event-stream;q=0"}, 406, "acceptable"),
    ]
    for query, headers, status, reason in cases:
        got_status, body = await refused(gateway, query, **headers)
        assert got_status == status, (query, headers, body)
        assert reason in body, (query, headers, body)
    async with events(gateway, token_query({"mode": "r"}, ch), method="POST") as stream:
        assert stream.status == 405
    stats = gateway.gateway.socket_stats
    assert stats.open_by_mode[sse.COUNTED_AS] == 0
    assert {"not_acceptable", "method_not_allowed", "missing_token"} <= set(stats.rejected)


async def test_too_many_channels_is_403_and_the_origin_check_applies(
    start_gateway: StartGateway,
) -> None:
    gateway: Running = await start_gateway(
        max_channels=2, allowed_origins=frozenset({"https://ok.example"})
    )
    query = token_query({"mode": "r"}, "a", "b", "c")
    assert (await refused(gateway, query))[0] == 403
    two = token_query({"mode": "r"}, "a", "b")
    assert (await refused(gateway, two, Origin="https://evil.example"))[0] == 403
    async with events(gateway, two, {"Origin": "https://ok.example"}) as stream:
        assert stream.status == 200
        assert stream.headers["access-control-allow-origin"] == "https://ok.example"


# Limits shared with sockets


async def test_streams_count_in_max_connections_and_are_uncounted_when_they_go(
    start_gateway: StartGateway,
) -> None:
    gateway: Running = await start_gateway(max_connections=1)
    query = token_query({"mode": "r"}, channel_name())
    async with events(gateway, query) as stream:
        await stream.event()
        assert b"pgws_event_streams_open 1.0" in (await http_get(gateway, "/metrics"))[2]
        assert (await refused(gateway, query))[0] == 503
        with pytest.raises(Exception, match="503"):
            async with gateway.connect(f"/{make_token({'mode': 'r', 'channels': ['a']})}"):
                pass
    stats = gateway.gateway.socket_stats
    await until(lambda: stats.open_by_mode[sse.COUNTED_AS] == 0, "the stream to be uncounted")
    async with events(gateway, query) as again:
        assert again.status == 200


def small_kernel_buffer(gateway: Running, client: Stream) -> None:
    """Keep the kernel from taking megabytes for `client`'s stream, so what it misses stays in
    pgws's own buffers, as on a busy host."""
    host, port = client.writer.get_extra_info("sockname")[:2]
    (stream,) = [s for s in gateway.gateway.events.open if s.remote == f"{host}:{port}"]
    assert stream.transport is not None
    sock = stream.transport.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)


async def burst(gateway: Running, db: DB, channel: str, count: int, size: int = 7000) -> None:
    """`count` notifications of `size` bytes on `channel`, in one transaction."""
    await db.execute(
        "SELECT pg_notify(%s, json_build_object('channel', %s::text, 'payload',"
        " repeat('x', %s), 'n', n)::text) FROM generate_series(0, %s) AS n",
        (gateway.config.listen_channel, channel, size, count - 1),
    )


async def read_until_n(stream: Stream, n: int) -> None:
    """Read events until the one whose message has `n`; earlier ones must come in order."""
    expected = 0
    while expected <= n:
        event = await stream.event()
        assert json.loads(event["data"])["data"]["n"] == expected
        expected += 1


async def test_a_slow_reader_is_closed_and_the_others_get_everything(
    start_gateway: StartGateway, db: DB
) -> None:
    gateway: Running = await start_gateway(client_max_buffer=64 * 1024)
    ch = channel_name()
    query = token_query({"mode": "r"}, ch)
    async with events(gateway, query, stalled=True) as slow, events(gateway, query) as fast:
        await slow.event()
        await fast.event()
        await streaming(gateway, ch, 2)
        small_kernel_buffer(gateway, slow)
        await burst(gateway, db, ch, 100)  # ~700 KB: far past the slow one's 64 KiB
        await read_until_n(fast, 99)
        stats = gateway.gateway.socket_stats
        await until(lambda: stats.slow_consumers == 1, "the slow stream to be dropped")
        await until(lambda: len(gateway.gateway.events.open) == 1, "the slow stream to go")
        assert stats.open_by_mode[sse.COUNTED_AS] == 1


async def test_streams_count_in_the_total_buffer_bound(start_gateway: StartGateway, db: DB) -> None:
    gateway: Running = await start_gateway(
        client_max_buffer=8 * 1024 * 1024, max_buffered_total=256 * 1024
    )
    ch = channel_name()
    query = token_query({"mode": "r"}, ch)
    async with events(gateway, query, stalled=True) as slow, events(gateway, query) as fast:
        await slow.event()
        await fast.event()
        await streaming(gateway, ch, 2)
        small_kernel_buffer(gateway, slow)
        await burst(gateway, db, ch, 100)
        await read_until_n(fast, 99)
        stats = gateway.gateway.socket_stats
        await until(lambda: stats.over_total == 1, "the stalled stream to be dropped")
        assert gateway.gateway.buffers.peak <= 256 * 1024 + 8 * 1024
        await until(lambda: len(gateway.gateway.events.open) == 1, "the stalled stream to go")


async def test_a_client_that_floods_the_stream_connection_is_cut_off(gateway: Running) -> None:
    async with events(gateway, token_query({"mode": "r"}, channel_name())) as stream:
        await stream.event()
        stream.writer.write(b"x" * (sse_stream.MAX_RECEIVED + 1))
        assert await stream.body() == b""
    await until(lambda: not gateway.gateway.events.open, "the stream to go")


# Pure parts


@given(st.text(max_size=200))
def test_read_query_raises_only_bad_request(query: str) -> None:
    try:
        channels, _ = sse_request.read_query("/events?" + query)
    except BadRequest:
        return
    assert len(channels) == len(set(channels))


@given(st.text(max_size=200))
def test_read_stream_id_never_raises(value: str) -> None:
    positions = sse_request.read_stream_id(value, 10)
    assert positions is None or (value.startswith("pgws") and len(positions) <= 10)


def test_stream_ids_read_back() -> None:
    assert sse_request.read_stream_id(sse_request.stream_id(()), 5) == ()
    assert sse_request.read_stream_id(sse_request.stream_id(["a:1", "b:2"]), 5) == ("a:1", "b:2")
    assert sse_request.read_stream_id("pgws a b c", 2) is None


# Durable channels (SPEC 7): Last-Event-ID resumes them exactly


DURABLE = ChannelSet(prefixes=("dur-",))


async def durable_streaming(gateway: Running, channel: str) -> None:
    """A stream reads durable `channel` and the durable reader follows it from a known offset."""
    durable = gateway.gateway.durable
    assert durable is not None
    await streaming(gateway, channel)
    await until(lambda: durable.following(channel), f"{channel} followed")


def durable_name() -> str:
    return "dur-" + channel_name()


async def send(db: DB, channel: str, payload: str) -> str:
    """pgws.send(): store one durable message; its position."""
    cursor = await db.execute("SELECT pgws.send(%s, %s)", (channel, payload))
    row = await cursor.fetchone()
    assert row is not None
    return str(row[0])


async def test_a_durable_stream_resumes_from_last_event_id_with_nothing_lost_or_repeated(
    start_gateway: StartGateway, db: DB
) -> None:
    gateway: Running = await start_gateway(durable=DURABLE)
    d = durable_name()
    query = token_query({"mode": "r"}, d)
    async with events(gateway, query) as stream:
        assert await stream.event() == {"id": "pgws"}  # nothing read yet: no position
        # No wait here: once the head came the stream is live (nothing sent after it is missed).
        sent = [await send(db, d, json.dumps({"n": n})) for n in range(3)]
        for n in range(3):
            event = await stream.event()
            assert event["id"] == f"pgws {sent[n]}"
            assert json.loads(event["data"]) == {
                "op": "msg",
                "ch": d,
                "data": {"n": n},
                "pos": sent[n],
            }
    await until(lambda: not gateway.gateway.events.open, "the stream to go")
    missed = [await send(db, d, json.dumps({"n": n})) for n in range(3, 5)]
    async with events(gateway, query, {"Last-Event-ID": f"pgws {sent[-1]}"}) as again:
        replayed = [await again.event() for _ in range(2)]
        assert [e["id"] for e in replayed] == [f"pgws {p}" for p in missed]
        assert [json.loads(e["data"])["data"]["n"] for e in replayed] == [3, 4]
        assert await again.event() == {"id": f"pgws {missed[-1]}"}  # then live, no gap
        live = await send(db, d, json.dumps({"n": 5}))
        event = await again.event()
        assert (event["id"], json.loads(event["data"])["data"]["n"]) == (f"pgws {live}", 5)


async def test_a_mixed_stream_resumes_the_durable_channel_and_gaps_the_other(
    start_gateway: StartGateway, db: DB
) -> None:
    gateway: Running = await start_gateway(durable=DURABLE)
    d, n = durable_name(), channel_name()
    query = token_query({"mode": "r"}, n, d)
    async with events(gateway, query) as stream:
        await stream.event()
        await durable_streaming(gateway, d)
        first = await send(db, d, "one")
        assert (await stream.event())["id"] == f"pgws {first}"
    await until(lambda: not gateway.gateway.events.open, "the stream to go")
    second = await send(db, d, "two")
    async with events(gateway, query, {"Last-Event-ID": f"pgws {first}"}) as again:
        assert await again.event() == gap(n)  # gaps first: n kept nothing
        replay = await again.event()
        assert replay["id"] == f"pgws {second}"
        assert json.loads(replay["data"])["data"] == "two"
        assert await again.event() == {"id": f"pgws {second}"}


async def test_an_unrecoverable_durable_position_is_event_gap(
    start_gateway: StartGateway, db: DB
) -> None:
    gateway: Running = await start_gateway(durable=DURABLE)
    d = durable_name()
    await send(db, d, "kept")
    query = token_query({"mode": "r"}, d)
    unknown = f"{sse_stream.channel_hash(d)}:00000000:1:00000000"
    for last_id in (f"pgws {unknown}", "pgws", "pgws not-a-position", "junk"):
        async with events(gateway, query, {"Last-Event-ID": last_id}) as stream:
            assert stream.status == 200
            assert await stream.event() == gap(d), last_id
            assert (await stream.event())["id"] == "pgws"
            await durable_streaming(gateway, d)
            live = await send(db, d, "live")
            assert (await stream.event())["id"] == f"pgws {live}"
        await until(lambda: not gateway.gateway.events.open, "the stream to go")


_ENDPOINT_CONFIG = Config(db_uri="postgresql:///unused", jwt_secret=SECRET.encode(), max_channels=3)
_VERIFIER = Verifier.from_secret(SECRET.encode())
_GOOD = make_token({"mode": "r", "channels": ["a", "b*"]})
_queries = st.lists(
    st.one_of(
        st.tuples(st.sampled_from(["ch", "token", "x", "ch%00"]), st.text(max_size=20)),
        st.just(("token", _GOOD)),
        st.just(("ch", "a")),
        st.just(("ch", "b1")),
    ),
    max_size=5,
).map(lambda pairs: "&".join(f"{quote(k, safe='%')}={quote(v)}" for k, v in pairs))
# What websockets' parser lets through as a header value: Latin-1 without control characters.
_header_values = (
    st.text(st.characters(codec="latin-1", exclude_categories=["Cc"]), min_size=1, max_size=40)
    .map(str.strip)
    .filter(bool)
)


@example(
    query=f"ch=a&ch=b1&token={_GOOD}", accept=None, authorization=None, last_event_id="pgws",
    method="GET",
)  # fmt: skip
@given(
    query=st.one_of(_queries, st.text(max_size=60)),
    accept=st.one_of(st.none(), st.sampled_from(["text/event-stream", "*/*;q=0"]), _header_values),
    authorization=st.one_of(st.none(), st.just(f"Bearer {_GOOD}"), _header_values),
    last_event_id=st.one_of(st.none(), st.just("pgws"), _header_values),
    method=st.sampled_from(["GET", "HEAD", "POST"]),
)
def test_any_events_request_is_a_stream_or_a_clear_refusal(
    query: str,
    accept: str | None,
    authorization: str | None,
    last_event_id: str | None,
    method: str,
) -> None:
    """Whatever the query and headers: a StreamResponse, or a HandshakeRefused with a status and
    a reason; never another exception (no server needed: the checks are pure)."""
    registry: Registry[Any] = Registry("listen", lambda batch: 0, lambda e, c: _none())
    streams = sse.EventStreams(_ENDPOINT_CONFIG, registry, SocketStats(), BufferLedger(None))
    endpoint = sse_request.EventsEndpoint(_ENDPOINT_CONFIG, streams)
    headers = Headers()
    for name, value in (
        ("Accept", accept),
        ("Authorization", authorization),
        ("Last-Event-ID", last_event_id),
    ):
        if value is not None:
            headers[name] = value
    request = Request(f"/events?{query}", headers, method)
    refusal: HandshakeRefused | None = None
    try:
        response = endpoint.answer(request, _VERIFIER)
    except HandshakeRefused as exc:
        refusal = exc
    if refusal is not None:
        assert refusal.status in (400, 401, 403, 405, 406)
        assert str(refusal)
        return
    assert isinstance(response, sse_request.StreamResponse)
    assert response.status_code == 200


async def _none() -> None:
    return None
