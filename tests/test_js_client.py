"""`/pgws-client.js` (SPEC 10): served from the installed package, and driven in headless Chromium.

Each browser test opens a page on the gateway, imports the client as a module from the gateway
itself, and records what the client reports (states, gaps, refreshes, errors, messages) in
`window.h`; the test waits on that record with bounded waits. Tokens are signed in Python and
handed to the page's token callback through an exposed function.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import psycopg
import pytest
from playwright.async_api import Browser, Page

from pgws import assets
from tests import test_browser
from tests.conftest import (
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    make_token,
    until,
)

browser = test_browser.browser  # the headless Chromium fixture
MS = test_browser.MS
SOURCE = Path(__file__).resolve().parent.parent / "clients" / "js" / "pgws-client.js"

# The page's side: import the client from the server, record everything it reports.
HARNESS = """
async ([url, options]) => {
  const { PgwsClient, PgwsError } = await import("/pgws-client.js");
  const h = { events: [], msgs: {}, results: [] };
  window.h = h;
  window.PgwsError = PgwsError;
  window.client = new PgwsClient(url, {
    token: () => window.pgwsToken(),
    onState: (state, info) => h.events.push({ t: "state", state, ...info }),
    onGap: (ch, why, detail) => h.events.push({ t: "gap", ch, why, ...(detail ? { detail } : {}) }),
    onSubscribed: (ch, info) => h.events.push({ t: "subscribed", ch, ...info }),
    onRefresh: (info) => h.events.push({ t: "refresh", ...info }),
    onError: (e) => h.events.push({ t: "error", message: String(e.message), code: e.code }),
    ...options,
  });
  window.sub = (ch, opts) => window.client.subscribe(
    ch, (data, info) => (h.msgs[ch] ||= []).push({ data, pos: info.pos }), opts);
}
"""


def _count(kind: str, **match: Any) -> str:
    """A JS expression: how many recorded events are of `kind` and match the given fields."""
    tests = "".join(f" && e[{json.dumps(k)}] === {json.dumps(v)}" for k, v in match.items())
    return f'window.h.events.filter((e) => e.t === "{kind}"{tests}).length'


async def _wait(page: Page, condition: str) -> None:
    """Wait, bounded, until the JS expression `condition` is true in the page."""
    await page.wait_for_function(f"() => {condition}", timeout=MS)


async def _events(page: Page) -> list[dict[str, Any]]:
    events: list[dict[str, Any]] = await page.evaluate("() => window.h.events")
    return events


async def open_client(
    browser: Browser,
    http: str,
    ws: str,
    token: Callable[[], str],
    **options: Any,
) -> tuple[Page, list[str]]:
    """A fresh page on the gateway with a PgwsClient connected to `ws`; its script errors."""
    context = await browser.new_context()
    context.set_default_timeout(MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.expose_function("pgwsToken", token)
    await page.goto(http + "/health")
    await page.evaluate(HARNESS, [ws, {"backoffMin": 100, "backoffMax": 1000, **options}])
    return page, errors


async def notify(db: psycopg.AsyncConnection[Any], listen: str, channel: str, payload: str) -> None:
    envelope = json.dumps({"event": "WebsocketMessage", "channel": channel, "payload": payload})
    await db.execute("SELECT pg_notify(%s, %s)", (listen, envelope))


# ---------- served from the package ----------


async def _raw_http(running: Running, request: str) -> tuple[int, dict[str, str], bytes]:
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", running.gateway.port)
        writer.write(request.encode())
        await writer.drain()
        raw = await reader.read()
        writer.close()
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode().split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, body


async def test_the_installed_client_is_served_with_its_type_and_caching_headers(
    gateway: Running,
) -> None:
    """GET /pgws-client.js is the installed package's file (the same bytes as clients/js/), as
    JavaScript, revalidated each time by ETag, loadable from any origin; HEAD has no body."""
    installed = resources.files("pgws").joinpath("static", "pgws-client.js").read_bytes()
    assert installed == SOURCE.read_bytes()
    status, headers, body = await _raw_http(
        gateway, "GET /pgws-client.js?v=1 HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert status == 200
    assert body == installed
    assert headers["content-type"] == "text/javascript; charset=utf-8"
    assert headers["content-length"] == str(len(installed))
    assert headers["cache-control"] == "no-cache"
    assert headers["access-control-allow-origin"] == "*"
    assert headers["x-content-type-options"] == "nosniff"
    etag = headers["etag"]
    assert etag == assets.client_script()[1]

    status, again, body = await _raw_http(
        gateway, f"GET /pgws-client.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: W/{etag}\r\n\r\n"
    )
    assert (status, body, again["etag"]) == (304, b"", etag)
    assert "content-length" not in again
    status, _, body = await _raw_http(
        gateway, 'GET /pgws-client.js HTTP/1.1\r\nHost: x\r\nIf-None-Match: "other"\r\n\r\n'
    )
    assert (status, body) == (200, installed)
    status, headers, body = await _raw_http(
        gateway, "HEAD /pgws-client.js HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (status, body, headers["content-length"]) == (200, b"", str(len(installed)))
    status, headers, _ = await _raw_http(
        gateway, "POST /pgws-client.js HTTP/1.1\r\nHost: x\r\n\r\n"
    )
    assert (status, headers["allow"]) == (405, "GET, HEAD")


def test_not_modified_reads_if_none_match_lists() -> None:
    assert assets.not_modified('"a", W/"b"', '"b"')
    assert assets.not_modified("*", '"b"')
    assert not assets.not_modified(None, '"b"')
    assert not assets.not_modified('"bb"', '"b"')
    assert not assets.not_modified("", '"b"')


# ---------- in the browser ----------


async def test_subscribe_and_publish_to_one_channel_of_several(
    start_gateway: StartGateway, browser: Browser, db: psycopg.AsyncConnection[Any]
) -> None:
    """Three subscriptions on one socket; a publish reaches its channel only; a channel the token
    does not grant is refused 403 and the socket stays open."""
    running: Running = await start_gateway()
    a, b, c = channel_name(), channel_name(), channel_name()
    token = make_token({"mode": "rw", "channels": [a, b, c], "exp": int(time.time()) + 3600})
    page, errors = await open_client(browser, running.http, running.url, lambda: token)
    await _wait(page, _count("state", state="open", protocol="v2") + " === 1")
    for channel in (a, b, c):
        await page.evaluate("(ch) => window.sub(ch)", channel)
    await _wait(page, _count("subscribed") + " === 3")

    reply = await page.evaluate("(ch) => window.client.publish(ch, {text: 'hi'})", b)
    assert reply == {"op": "ok", "ref": reply["ref"], "ch": b}
    # Markers after the publish's ok, from one connection: they arrive after its message would.
    for channel in (a, c):
        await notify(db, running.config.listen_channel, channel, "marker")
    await _wait(page, f"(window.h.msgs[{json.dumps(a)}] || []).length >= 1")
    await _wait(page, f"(window.h.msgs[{json.dumps(c)}] || []).length >= 1")
    await _wait(page, f"(window.h.msgs[{json.dumps(b)}] || []).length >= 1")
    msgs = await page.evaluate("() => window.h.msgs")
    assert [m["data"]["payload"] for m in msgs[a]] == ["marker"]
    assert [m["data"]["payload"] for m in msgs[c]] == ["marker"]
    [got] = msgs[b]
    assert got["data"]["channel"] == b
    assert json.loads(got["data"]["payload"]) == {"text": "hi"}
    assert got["data"]["claims"]["mode"] == "rw"

    refused = await page.evaluate(
        """(ch) => window.client.publish(ch, 1).then(
             () => null, (e) => ({name: e.name, code: e.code, retry: e.retry}))""",
        channel_name(),
    )
    assert refused == {"name": "PgwsError", "code": 403, "retry": False}
    reply = await page.evaluate("(ch) => window.client.publish(ch, 'still open')", a)
    assert reply["ch"] == a
    events = await _events(page)
    assert [e for e in events if e["t"] in ("gap", "error", "refresh")] == []
    assert _states(events) == ["connecting", "open"]
    assert errors == []


def _states(events: list[dict[str, Any]]) -> list[str]:
    return [e["state"] for e in events if e["t"] == "state"]


async def test_token_refresh_keeps_the_socket_open_past_the_first_exp(
    start_gateway: StartGateway, browser: Browser
) -> None:
    """Tokens of 3 s: `expiring` makes the client ask its callback for a new one and send `auth`
    on the open socket; it is still the first socket, subscribed, after the first token's exp."""
    running: Running = await start_gateway()
    channel = channel_name()
    tokens: list[tuple[str, int]] = []

    def token() -> str:
        exp = int(time.time()) + 3
        signed = make_token({"mode": "rw", "channels": [channel], "exp": exp})
        tokens.append((signed, exp))
        return signed

    page, errors = await open_client(browser, running.http, running.url, token)
    await page.evaluate("(ch) => window.sub(ch)", channel)
    await _wait(page, _count("subscribed") + " === 1")
    first_exp = tokens[0][1]
    await _wait(page, f"Date.now() / 1000 > {first_exp + 1}")
    await _wait(page, _count("refresh") + " >= 1")
    reply = await page.evaluate("(ch) => window.client.publish(ch, 'after exp')", channel)
    assert reply["ch"] == channel
    await _wait(page, f"(window.h.msgs[{json.dumps(channel)}] || []).length === 1")

    events = await _events(page)
    assert _states(events) == ["connecting", "open"]  # never closed, never reconnected
    refreshes = [e for e in events if e["t"] == "refresh"]
    assert all(e["dropped"] == [] for e in refreshes)
    assert refreshes[-1]["exp"] > first_exp
    assert [e for e in events if e["t"] in ("gap", "error")] == []
    assert errors == []


async def test_a_refused_refresh_is_reported_and_the_client_reconnects_after_3001(
    start_gateway: StartGateway, browser: Browser
) -> None:
    """The callback's second token is garbage: the refresh is an `err` 401 the client reports;
    the socket ends with 3001 at the first exp, and the client reconnects with a good token."""
    running: Running = await start_gateway()
    channel = channel_name()
    calls: list[int] = []

    def token() -> str:
        calls.append(1)
        if len(calls) == 2:
            return "not.a.token"
        return make_token({"mode": "r", "channels": [channel], "exp": int(time.time()) + 3})

    page, errors = await open_client(browser, running.http, running.url, token)
    await page.evaluate("(ch) => window.sub(ch)", channel)
    await _wait(page, _count("error", code=401) + " === 1")
    await _wait(page, _count("state", state="reconnecting", code=3001) + " >= 1")
    await _wait(page, _count("state", state="open") + " >= 2")
    await _wait(page, _count("subscribed") + " >= 2")
    events = await _events(page)
    # Not resumable (not durable): the reconnect is a gap the page is told about.
    assert {"t": "gap", "ch": channel, "why": "reconnected"} in events
    assert errors == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


async def test_kill_and_restart_serve_during_traffic_reconnects_with_backoff_and_reports_a_gap(
    serve_process: Callable[..., Any], browser: Browser, db: psycopg.AsyncConnection[Any]
) -> None:
    """`pgws serve` killed (SIGKILL) while messages flow: the client retries with growing,
    jittered delays while it is down, reconnects once it is back on the same port, resubscribes,
    says the channel had a gap (nothing to resume a non-durable channel from), and receives the
    messages sent after the restart."""
    port, listen, channel = _free_port(), channel_name(), channel_name()
    env = {"PGWS_PORT": str(port), "PGWS_LISTEN_CHANNEL": listen}
    serving, _ = await serve_process(**env)
    http, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"

    def token() -> str:
        return make_token({"mode": "r", "channels": [channel], "exp": int(time.time()) + 3600})

    page, errors = await open_client(browser, http, ws, token)
    await page.evaluate("(ch) => window.sub(ch)", channel)
    await _wait(page, _count("subscribed") + " === 1")

    sent = 0
    stop = asyncio.Event()

    async def traffic() -> None:
        nonlocal sent
        while not stop.is_set():
            sent += 1
            await notify(db, listen, channel, str(sent))
            await asyncio.sleep(0.02)  # a steady trickle, not synchronisation

    flowing = asyncio.create_task(traffic(), name="traffic")
    try:
        await _wait(page, f"(window.h.msgs[{json.dumps(channel)}] || []).length >= 5")
        await serving.kill()
        # Down: at least three failed attempts, each waiting below a ceiling that doubles.
        await _wait(page, _count("state", state="reconnecting") + " >= 4")
        before_restart = sent
        await serve_process(**env)
        await _wait(page, _count("state", state="open") + " === 2")
        await _wait(page, _count("gap") + " === 1")
        await _wait(
            page,
            f"window.h.msgs[{json.dumps(channel)}].some((m) => +m.data.payload > {before_restart})",
        )
    finally:
        stop.set()
        await flowing

    events = await _events(page)
    retries = [e for e in events if e["t"] == "state" and e["state"] == "reconnecting"]
    ceilings = [e["ceiling"] for e in retries]
    assert ceilings == sorted(ceilings)
    assert ceilings[0] == 100
    assert max(ceilings) <= 1000
    assert all(0 <= e["delay"] < e["ceiling"] for e in retries)
    assert retries[0]["code"] == 1006
    assert {"t": "gap", "ch": channel, "why": "reconnected"} in events
    assert [e for e in events if e["t"] == "error"] == []
    received = [
        int(m["data"]["payload"])
        for m in await page.evaluate(f"() => window.h.msgs[{json.dumps(channel)}]")
    ]
    assert received == sorted(set(received))  # in order, nothing twice
    assert errors == []


@pytest.mark.nodb
def test_the_client_module_parses_as_an_es_module() -> None:
    """No build step: the file is what browsers load, and declares no imports."""
    text = SOURCE.read_text()
    assert "export class PgwsClient" in text
    assert "\nimport " not in text
    assert "require(" not in text


class Proxy:
    """A TCP proxy to the gateway, between it and the browser. `hide_v2`: it removes `pgws.v2`
    from every upgrade's subprotocol offers, so the real gateway behind it looks like a server
    without protocol v2. `silence()`: the connections open now stay open but carry nothing more
    either way (a half-open connection, as after a network change); new ones work."""

    def __init__(self, port: int, *, hide_v2: bool = False) -> None:
        self._port = port
        self._hide_v2 = hide_v2
        self._silent: list[asyncio.Event] = []
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    def silence(self) -> None:
        for silent in self._silent:
            silent.set()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            upstream_reader, upstream = await asyncio.open_connection("127.0.0.1", self._port)
        except (OSError, asyncio.IncompleteReadError):
            writer.close()
            return
        silent = asyncio.Event()
        self._silent.append(silent)
        upstream.write(self._rewrite(head) if self._hide_v2 else head)
        await asyncio.gather(
            _pipe(reader, upstream, silent), _pipe(upstream_reader, writer, silent)
        )

    @staticmethod
    def _rewrite(head: bytes) -> bytes:
        lines = []
        for line in head.split(b"\r\n"):
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"sec-websocket-protocol":
                offers = [
                    v.strip() for v in value.split(b",") if v.strip() not in (b"", b"pgws.v2")
                ]
                if not offers:
                    continue
                line = b"Sec-WebSocket-Protocol: " + b", ".join(offers)
            lines.append(line)
        return b"\r\n".join(lines)


async def _pipe(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, silent: asyncio.Event
) -> None:
    try:
        while data := await reader.read(65536):
            if not silent.is_set():
                writer.write(data)
                await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


async def test_against_a_server_without_v2_the_client_falls_back_to_legacy(
    start_gateway: StartGateway, browser: Browser
) -> None:
    """Behind a proxy that hides `pgws.v2`, the v2 upgrade is refused (no token in it); the server
    still answers HTTP, so the client speaks legacy: one `/<channel>/<token>` socket per channel,
    publish to one of them, and after a restart of the gateway a reconnect reported as a gap."""
    running: Running = await start_gateway()
    a, b = channel_name(), channel_name()
    token = make_token({"mode": "rw", "channels": [a, b], "exp": int(time.time()) + 3600})
    async with Proxy(running.gateway.port, hide_v2=True) as proxy:
        proxy_port = proxy.port
        http, ws = f"http://127.0.0.1:{proxy_port}", f"ws://127.0.0.1:{proxy_port}"
        page, errors = await open_client(browser, http, ws, lambda: token)
        await _wait(page, _count("state", state="open", protocol="legacy") + " === 1")
        for channel in (a, b):
            await page.evaluate("(ch) => window.sub(ch)", channel)
        await _wait(page, _count("subscribed", ch=b) + " >= 1")
        await _wait(page, "window.client.state === 'open'")
        reply = await page.evaluate("(ch) => window.client.publish(ch, 'to b only')", b)
        assert reply == {"op": "ok", "ch": b}
        await _wait(page, f"(window.h.msgs[{json.dumps(b)}] || []).length === 1")
        msgs = await page.evaluate("() => window.h.msgs")
        assert msgs[b][0]["data"]["payload"] == "to b only"
        assert a not in msgs
        # Legacy cannot publish where it does not read (its frames go to its socket's channel).
        refused = await page.evaluate(
            "(ch) => window.client.publish(ch, 'x').then(() => null, (e) => e.reason)",
            channel_name(),
        )
        assert refused == "legacy server: subscribe to a channel before publishing to it"

        port = running.gateway.port
        await running.shutdown()
        await _wait(page, _count("state", state="reconnecting", code=1001) + " >= 1")
        await start_gateway(port=port)
        await _wait(page, "window.h.events.filter((e) => e.t === 'gap').length >= 2")
        events = await _events(page)
        assert {"t": "gap", "ch": a, "why": "reconnected"} in events
        assert {"t": "gap", "ch": b, "why": "reconnected"} in events
        opens = [e for e in events if e["t"] == "state" and e["state"] == "open"]
        assert {e["protocol"] for e in opens} == {"legacy"}
        assert errors == []


async def test_a_connection_gone_silent_is_found_by_ping_and_replaced(
    start_gateway: StartGateway, browser: Browser
) -> None:
    """The socket stays open but nothing comes through any more (a half-open connection, which
    browsers cannot see): with no answer to its `ping` the client takes it for lost, reconnects
    and reports the gap; the pings of a healthy socket are answered and change nothing."""
    running: Running = await start_gateway()
    channel = channel_name()
    token = make_token({"mode": "r", "channels": [channel], "exp": int(time.time()) + 3600})
    async with Proxy(running.gateway.port) as proxy:
        http, ws = f"http://127.0.0.1:{proxy.port}", f"ws://127.0.0.1:{proxy.port}"
        page, errors = await open_client(browser, http, ws, lambda: token, pingInterval=300)
        await page.evaluate("(ch) => window.sub(ch)", channel)
        await _wait(page, _count("subscribed") + " === 1")
        frames = running.gateway.socket_stats.frames_in
        await until(lambda: running.gateway.socket_stats.frames_in >= frames + 3, "three pings")
        assert _states(await _events(page)) == ["connecting", "open"]

        proxy.silence()
        await _wait(
            page, _count("state", state="reconnecting", reason="no answer to ping") + " === 1"
        )
        await _wait(page, _count("state", state="open") + " === 2")
        await _wait(page, _count("gap", why="reconnected") + " === 1")
        assert errors == []


async def test_a_durable_channel_resumes_across_a_killed_serve_with_nothing_lost_or_repeated(
    serve_process: Callable[..., Any], browser: Browser, db: psycopg.AsyncConnection[Any]
) -> None:
    """Producers keep sending to a durable channel (pgws.send) while `pgws serve` is killed and
    restarted: the client resubscribes `from` its last position, the server replays what it
    missed, and the page has every message exactly once, in order, and no gap."""
    port, channel = _free_port(), channel_name()
    env = {"PGWS_PORT": str(port), "PGWS_LISTEN_CHANNEL": channel_name(), "PGWS_DURABLE": channel}
    serving, _ = await serve_process(**env)
    http, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"

    def token() -> str:
        return make_token({"mode": "r", "channels": [channel], "exp": int(time.time()) + 3600})

    page, errors = await open_client(browser, http, ws, token)
    await page.evaluate("(ch) => window.sub(ch)", channel)
    await _wait(page, _count("subscribed") + " === 1")

    sent = 0
    stop = asyncio.Event()

    async def traffic() -> None:
        nonlocal sent
        while not stop.is_set():
            await db.execute("SELECT pgws.send(%s, %s)", (channel, json.dumps({"n": sent + 1})))
            sent += 1
            await asyncio.sleep(0.02)  # a steady trickle, not synchronisation

    received = f"(window.h.msgs[{json.dumps(channel)}] || [])"
    flowing = asyncio.create_task(traffic(), name="durable-traffic")
    try:
        await _wait(page, f"{received}.length >= 5")
        await serving.kill()
        await _wait(page, _count("state", state="reconnecting") + " >= 3")
        await serve_process(**env)
        await _wait(page, _count("subscribed", resumed=True, recovered=True) + " === 1")
        await _wait(page, f"{received}.length >= {sent + 5}")
    finally:
        stop.set()
        await flowing
    await _wait(page, f"{received}.length >= {sent}")
    messages = await page.evaluate(f"() => {received}")
    assert [m["data"]["n"] for m in messages] == list(range(1, sent + 1))  # 0 lost, 0 twice
    assert all(isinstance(m["pos"], str) for m in messages)
    events = await _events(page)
    assert [e for e in events if e["t"] in ("gap", "error")] == []
    assert errors == []


async def test_a_durable_resume_too_far_behind_is_a_gap_with_the_servers_reason(
    serve_process: Callable[..., Any], browser: Browser, db: psycopg.AsyncConnection[Any]
) -> None:
    """More than PGWS_DURABLE_REPLAY_MAX messages sent while `pgws serve` is down: the resume is
    `recovered:false`, the client calls onGap with the server's reason and goes on live."""
    port, channel = _free_port(), channel_name()
    env = {
        "PGWS_PORT": str(port),
        "PGWS_LISTEN_CHANNEL": channel_name(),
        "PGWS_DURABLE": channel,
        "PGWS_DURABLE_REPLAY_MAX": "3",
    }
    serving, _ = await serve_process(**env)
    http, ws = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"

    def token() -> str:
        return make_token({"mode": "r", "channels": [channel], "exp": int(time.time()) + 3600})

    page, errors = await open_client(browser, http, ws, token)
    await page.evaluate("(ch) => window.sub(ch)", channel)
    await _wait(page, _count("subscribed") + " === 1")
    received = f"(window.h.msgs[{json.dumps(channel)}] || [])"
    await db.execute("SELECT pgws.send(%s, %s)", (channel, "before"))
    await _wait(page, f"{received}.length === 1")
    await serving.kill()
    await _wait(page, _count("state", state="reconnecting") + " >= 1")
    await db.execute("SELECT pgws.send_many(%s, %s)", (channel, [f"missed {i}" for i in range(10)]))
    await serve_process(**env)
    await _wait(page, _count("gap") + " === 1")
    await db.execute("SELECT pgws.send(%s, %s)", (channel, "after"))
    await _wait(page, f"{received}.length === 2")
    events = await _events(page)
    assert {"t": "gap", "ch": channel, "why": "not recovered", "detail": "too far behind"} in events
    assert [m["data"] for m in await page.evaluate(f"() => {received}")] == ["before", "after"]
    assert errors == []
