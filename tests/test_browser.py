"""The example chat page end to end in a real headless Chromium (Debian's package, via Playwright).

No browser is downloaded: Playwright drives /usr/bin/chromium (`.ci/run` installs it when
missing). Without it this module skips locally and fails when CI is set.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import psycopg
import pytest
from jose import jwt
from playwright.async_api import Browser, Locator, Page, async_playwright, expect
from playwright.async_api import Error as PlaywrightError

from pgws.parsers import ChannelSet
from tests.conftest import (
    ISSUED_TOKENS,
    TIMEOUT,
    Running,
    StartGateway,
    channel_name,
    make_token,
    subscribed,
    until,
)

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = (ROOT / "example").resolve()
SCREENSHOT = ROOT / "test-artifacts" / "browser-chat.png"
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
MS = TIMEOUT * 1000  # Playwright counts in milliseconds


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def _unavailable(why: str) -> None:
    """No browser here: skip on a developer machine, fail in CI (which must run this test)."""
    if _in_ci():
        pytest.fail(f"CI is set but {why}: .ci/run installs Debian's chromium package")
    pytest.skip(f"{why} (apt-get install chromium to run it)")


def _require_chromium() -> None:
    """Debian's binary, or skip/fail as `_unavailable` decides."""
    if not CHROMIUM.exists():
        _unavailable(f"{CHROMIUM} is missing")


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    """Headless Chromium from Debian's package (Playwright gives it a fresh temporary profile)."""
    _require_chromium()
    async with async_playwright() as playwright:
        try:
            launched = await playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, timeout=MS
            )
        except PlaywrightError as exc:
            _unavailable(f"Chromium did not start: {exc.message.splitlines()[0]}")
        try:
            yield launched
        finally:
            await launched.close()


@dataclasses.dataclass
class Chat:
    """One chat page and the script errors it reported."""

    page: Page
    errors: list[str]


# The page's built-in demo secret (example/chat.js, sample-env): with it the page signs tokens the
# gateway accepts, so it connects by itself as it does under `make run`.
DEMO_SECRET = b"auwhfdnskjhewfi34uwehdlaehsfkuaeiskjnfduierhfsiweskjcnzeiluwhskdewishdnpwe"


# Chromium's own console line for a socket that could not connect (the server is down): expected
# while the page retries, and not an error of the page's script.
_REFUSED = re.compile(r"^WebSocket connection to '[^']*' failed: ")


def _script_error(errors: list[str], kind: str, text: str) -> None:
    if kind == "error" and not _REFUSED.match(text):
        errors.append(text)


async def open_chat(browser: Browser, running: Running, channel: str, meta: str) -> Chat:
    """A page of its own (a fresh browser context) on `channel`: it connects by itself."""
    context = await browser.new_context()
    context.set_default_timeout(MS)
    page = await context.new_page()
    chat = Chat(page, [])
    page.on("pageerror", lambda exc: chat.errors.append(str(exc)))
    page.on("console", lambda msg: _script_error(chat.errors, msg.type, msg.text))
    await page.goto(f"{running.http}/?channel={quote(channel)}&meta={quote(meta)}")
    # The page derives the socket URL from its own location, and needs no click.
    await expect(page.locator("#url")).to_have_value(running.url, timeout=MS)
    await expect(page.locator("#status")).to_have_text("connected", timeout=MS)
    await expect(page.locator("#channel")).to_have_value(channel, timeout=MS)
    return chat


async def remember_token(chat: Chat) -> None:
    """The last token the page signed, for the log audit."""
    ISSUED_TOKENS.append(await chat.page.locator("#made-token").inner_text())


def events(page: Page, event: str, text: str = "") -> Locator:
    """The lines of the events list whose event is `event` (and that contain `text`)."""
    lines = page.locator("#meta li").filter(has=page.locator(".event", has_text=event))
    return lines.filter(has_text=text) if text else lines


async def test_two_pages_chat_reconnect_and_see_gaps_in_plain_words(
    start_gateway: StartGateway, browser: Browser
) -> None:
    """Two pages connect by themselves and chat with each other and with a legacy socket; server
    events arrive on the meta channel; Disconnect shows its close code in words; when the gateway
    goes away the page says so and reconnects by itself once it is back, with the gap in words."""
    meta = channel_name()
    settings = {"root_path": EXAMPLE, "meta_channel": meta, "jwt_secret": DEMO_SECRET}
    running: Running = await start_gateway(**settings)
    channel = channel_name()
    chat_one = await open_chat(browser, running, channel, meta)
    chat_two = await open_chat(browser, running, channel, meta)
    one, two = chat_one.page, chat_two.page
    await expect(events(one, "connected", "protocol v2")).to_have_count(1, timeout=MS)

    # A legacy socket on the chat channel: the server's ConnectionOpen reaches both pages.
    legacy_token = jwt.encode({"mode": "rw", "channels": [channel]}, DEMO_SECRET.decode())
    ISSUED_TOKENS.append(legacy_token)
    async with running.connect(f"/{legacy_token}") as legacy:
        await subscribed(running, channel)
        for page in (one, two):
            await expect(
                page.locator("#meta li").filter(has_text="ConnectionOpen").filter(has_text=channel)
            ).to_have_count(1, timeout=MS)

        text = f"hello from page one {channel}"
        await one.fill("#message", text)
        await one.press("#message", "Enter")
        for page in (one, two):
            await expect(page.locator("#messages li").filter(has_text=text)).to_have_count(
                1, timeout=MS
            )
        await expect(one.locator("#message")).to_have_value("", timeout=MS)
        async with asyncio.timeout(TIMEOUT):
            heard = json.loads(await legacy.recv())
        assert (heard["channel"], heard["payload"]) == (channel, text)
        await legacy.send(f"hello from legacy {channel}")
        for page in (one, two):
            await expect(
                page.locator("#messages li").filter(has_text=f"hello from legacy {channel}")
            ).to_have_count(1, timeout=MS)

    # Disconnect: the close code in plain words.
    await two.click("#disconnect")
    await expect(two.locator("#status")).to_have_text(
        "closed: 1000 normal closure (reason: bye)", timeout=MS
    )
    await expect(two.locator("#disconnect")).to_be_disabled(timeout=MS)
    # The legacy socket's ConnectionClose is NOTIFYed after anything its frames caused, so once it
    # is in, a copy of a chat message on the meta channel would be too: the pages publish to the
    # chat channel only.
    closed = one.locator("#meta li").filter(has_text="ConnectionClose").filter(has_text=channel)
    await expect(closed).to_have_count(1, timeout=MS)
    await expect(one.locator("#meta li").filter(has_text=text)).to_have_count(0, timeout=MS)

    # The gateway going away: 1001 in words, and the page retries by itself.
    port = running.gateway.port
    await running.shutdown()
    # The status shows the latest attempt (later ones meet a closed port: 1006), so the 1001 is
    # read from the events list, which keeps the first loss.
    await expect(one.locator("#status")).to_have_text(
        re.compile(r"^reconnecting in [0-9.]+ s \(attempt \d+\) after \d{4} "), timeout=MS
    )
    await expect(one.locator("#status")).to_have_attribute("data-state", "reconnecting", timeout=MS)
    lost = events(one, "connection lost", "1001 server going away")
    await expect(lost.filter(has_text="reconnecting by itself")).to_have_count(1, timeout=MS)
    # Back on the same port: connected again, and told that messages may have been missed.
    await start_gateway(**settings, port=port)
    await expect(one.locator("#status")).to_have_text("connected", timeout=MS)
    await expect(events(one, "gap", channel)).to_have_count(1, timeout=MS)
    await expect(events(one, "gap", "messages sent meanwhile may be missing")).to_have_count(
        2,
        timeout=MS,  # the chat channel and the meta channel
    )
    after = f"after the restart {channel}"
    await one.fill("#message", after)
    await one.press("#message", "Enter")
    await expect(one.locator("#messages li").filter(has_text=after)).to_have_count(1, timeout=MS)

    SCREENSHOT.parent.mkdir(exist_ok=True)
    await one.screenshot(path=SCREENSHOT, full_page=True)
    print(f"screenshot: {SCREENSHOT}")  # noqa: T201
    for chat in (chat_one, chat_two):
        await remember_token(chat)
    assert chat_one.errors == []
    assert chat_two.errors == []


# GET /events (SPEC 9) with the browser's own EventSource

_EVENT_SOURCE = """([url]) => {
  window.got = [];
  window.opens = 0;
  const source = new EventSource(url);
  window.source = source;
  source.onopen = () => { window.opens += 1; };
  source.onmessage = (e) => window.got.push({type: 'message', data: JSON.parse(e.data),
                                             id: e.lastEventId});
  source.addEventListener('gap', (e) => window.got.push({type: 'gap', data: JSON.parse(e.data),
                                                         id: e.lastEventId}));
}"""


async def test_event_source_receives_reconnects_after_a_restart_and_is_told_of_the_gap(
    start_gateway: StartGateway, browser: Browser, dsn: str
) -> None:
    """A real EventSource: messages arrive as v2 `msg` objects; the server is stopped and started
    again on the same port; the browser reconnects by itself with Last-Event-ID and, for a
    non-durable channel (nothing kept while the server was down), gets `event: gap` first."""
    running: Running = await start_gateway()
    port, listen = running.gateway.port, running.config.listen_channel
    channel = channel_name()
    token = make_token({"mode": "r", "channels": [channel]})
    context = await browser.new_context()
    context.set_default_timeout(MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(running.http + "/health")
    await page.evaluate(_EVENT_SOURCE, [f"/events?ch={channel}&token={token}"])
    await page.wait_for_function("window.opens === 1", timeout=MS)
    await until(lambda: bool(running.gateway.registry._events.get(channel)), "the stream")
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await running.notify(db, {"channel": channel, "n": 1})
        await page.wait_for_function("window.got.length === 1", timeout=MS)
        assert await page.evaluate("window.got[0]") == {
            "type": "message",
            "data": {"op": "msg", "ch": channel, "data": {"channel": channel, "n": 1}},
            "id": "pgws",
        }
        await running.shutdown()
        again: Running = await start_gateway(port=port, listen_channel=listen)
        await page.wait_for_function("window.opens === 2", timeout=MS)  # reconnected by itself
        await page.wait_for_function("window.got.length === 2", timeout=MS)
        assert await page.evaluate("window.got[1]") == {
            "type": "gap",
            "data": {"ch": channel},
            "id": "pgws",
        }
        await until(lambda: bool(again.gateway.registry._events.get(channel)), "the new stream")
        await again.notify(db, {"channel": channel, "n": 2})
        await page.wait_for_function("window.got.length === 3", timeout=MS)
        assert (await page.evaluate("window.got[2]"))["data"]["data"]["n"] == 2
    await context.close()
    assert errors == []


async def durable_stream(running: Running, channel: str) -> None:
    """Wait until a stream reads durable `channel` and the durable reader follows it from a known
    offset (rows committed before that are not this stream's: it did not resume from them)."""
    durable = running.gateway.durable
    assert durable is not None
    await until(
        lambda: bool(running.gateway.registry._events.get(channel)) and durable.following(channel),
        "the durable stream",
    )


async def test_event_source_on_a_durable_channel_loses_and_repeats_nothing_across_a_restart(
    start_gateway: StartGateway, browser: Browser, dsn: str
) -> None:
    """SPEC 9 with SPEC 7: messages stored while the server is down reach the browser once it
    has reconnected by itself with Last-Event-ID, each exactly once, in order, and no gap."""
    durable = ChannelSet(prefixes=("dur-",))
    running: Running = await start_gateway(durable=durable)
    port, listen = running.gateway.port, running.config.listen_channel
    channel = "dur-" + channel_name()
    token = make_token({"mode": "r", "channels": [channel]})
    context = await browser.new_context()
    context.set_default_timeout(MS)
    page = await context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    await page.goto(running.http + "/health")
    await page.evaluate(_EVENT_SOURCE, [f"/events?ch={channel}&token={token}"])
    await page.wait_for_function("window.opens === 1", timeout=MS)
    await durable_stream(running, channel)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:

        async def send(n: int) -> None:
            await db.execute("SELECT pgws.send(%s, %s)", (channel, json.dumps({"n": n})))

        for n in range(3):
            await send(n)
        await page.wait_for_function("window.got.length === 3", timeout=MS)
        await running.shutdown()
        for n in range(3, 6):  # stored while no server runs
            await send(n)
        again: Running = await start_gateway(port=port, listen_channel=listen, durable=durable)
        await page.wait_for_function("window.opens === 2", timeout=MS)
        await page.wait_for_function("window.got.length === 6", timeout=MS)
        await durable_stream(again, channel)
        await send(6)
        await page.wait_for_function("window.got.length === 7", timeout=MS)
    got = await page.evaluate("window.got")
    assert [event["type"] for event in got] == ["message"] * 7  # no gap
    assert [event["data"]["data"]["n"] for event in got] == list(range(7))
    positions = [event["data"]["pos"] for event in got]
    assert [event["id"] for event in got] == [f"pgws {pos}" for pos in positions]
    await context.close()
    assert errors == []


async def test_event_source_too_far_behind_on_a_durable_channel_is_told_of_the_gap(
    start_gateway: StartGateway, browser: Browser, dsn: str
) -> None:
    """An unrecoverable position (more than PGWS_DURABLE_REPLAY_MAX behind) after a restart:
    `event: gap` for the channel, nothing replayed, then live messages."""
    durable = ChannelSet(prefixes=("dur-",))
    settings: dict[str, Any] = {"durable": durable, "durable_replay_max": 2}
    running: Running = await start_gateway(**settings)
    port, listen = running.gateway.port, running.config.listen_channel
    channel = "dur-" + channel_name()
    token = make_token({"mode": "r", "channels": [channel]})
    context = await browser.new_context()
    context.set_default_timeout(MS)
    page = await context.new_page()
    await page.goto(running.http + "/health")
    await page.evaluate(_EVENT_SOURCE, [f"/events?ch={channel}&token={token}"])
    await page.wait_for_function("window.opens === 1", timeout=MS)
    await durable_stream(running, channel)
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as db:
        await db.execute("SELECT pgws.send(%s, 'before')", (channel,))
        await page.wait_for_function("window.got.length === 1", timeout=MS)
        await running.shutdown()
        await db.execute("SELECT pgws.send_many(%s, ARRAY['a', 'b', 'c'])", (channel,))
        again: Running = await start_gateway(port=port, listen_channel=listen, **settings)
        await page.wait_for_function("window.got.length === 2", timeout=MS)
        await durable_stream(again, channel)
        await db.execute("SELECT pgws.send(%s, 'after')", (channel,))
        await page.wait_for_function("window.got.length === 3", timeout=MS)
    got = await page.evaluate("window.got")
    assert [event["type"] for event in got] == ["message", "gap", "message"]
    assert got[1]["data"] == {"ch": channel}
    assert [got[0]["data"]["data"], got[2]["data"]["data"]] == ["before", "after"]
    await context.close()


async def test_the_page_renews_short_tokens_on_the_open_connection(
    start_gateway: StartGateway, browser: Browser
) -> None:
    """Tokens of 3 s: the page says each renewal in words and stays connected past the first."""
    running: Running = await start_gateway(root_path=EXAMPLE, jwt_secret=DEMO_SECRET)
    channel = channel_name()
    chat = await open_chat(browser, running, channel, "")
    page = chat.page
    await page.fill("#ttl", "3")
    await page.click("#connect")
    await expect(events(page, "token refreshed", "renewed on the open connection")).to_have_count(
        2, timeout=MS
    )
    await expect(page.locator("#status")).to_have_text("connected", timeout=MS)
    # One connection for the 3 s tokens (the first line is the page's own, before the click).
    await expect(events(page, "connected")).to_have_count(2, timeout=MS)
    await expect(events(page, "connection lost")).to_have_count(0, timeout=MS)
    await remember_token(chat)
    assert chat.errors == []


async def test_on_a_durable_channel_the_page_catches_up_after_a_restart(
    start_gateway: StartGateway, browser: Browser, db: psycopg.AsyncConnection[Any]
) -> None:
    """The chat channel is durable: a message sent while the gateway is down is shown once the
    page is back, exactly once, and the page says it caught up (no gap)."""
    channel = channel_name()
    settings = {
        "root_path": EXAMPLE,
        "jwt_secret": DEMO_SECRET,
        "durable": ChannelSet(names=(channel,)),
    }
    running: Running = await start_gateway(**settings)
    chat = await open_chat(browser, running, channel, "")
    page = chat.page
    await page.fill("#message", "before the restart")
    await page.press("#message", "Enter")
    await expect(page.locator("#messages li").filter(has_text="before the restart")).to_have_count(
        1, timeout=MS
    )
    port = running.gateway.port
    await running.shutdown()
    await expect(page.locator("#status")).to_have_attribute(
        "data-state", "reconnecting", timeout=MS
    )
    await db.execute("SELECT pgws.send(%s, %s)", (channel, json.dumps({"payload": "while away"})))
    await start_gateway(**settings, port=port)
    await expect(events(page, "caught up", channel)).to_have_count(1, timeout=MS)
    await expect(page.locator("#messages li").filter(has_text="while away")).to_have_count(
        1, timeout=MS
    )
    await expect(events(page, "gap")).to_have_count(0, timeout=MS)
    await expect(page.locator("#messages li")).to_have_count(2, timeout=MS)
    await remember_token(chat)
    assert chat.errors == []
