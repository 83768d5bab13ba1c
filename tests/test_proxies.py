"""PGWS_TRUSTED_PROXIES (issue 13 item 4): the client address behind a proxy, from trusted peers.

Over real sockets: a trusted peer's X-Forwarded-For / Forwarded name the client in the log lines;
an untrusted peer's are never read. Hypothesis over hostile header values: never a crash, garbage
is the peer's own address, and nothing a client writes to the left of the hop its proxy appended
can choose the address.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from structlog.testing import capture_logs
from websockets.exceptions import InvalidStatus

from pgws.config import Config
from pgws.errors import ConfigError
from pgws.places import metrics_place
from pgws.proxies import TrustedProxies, parse_node, proxy_networks
from tests.conftest import (
    SECRET,
    TIMEOUT,
    StartGateway,
    channel_name,
    make_token,
    run_pgws,
    subscribed,
    until,
)

LOOPBACK = ("127.0.0.1/32", "::1/128")
EX_CONFIG = 78
EXPECTED = "expected addresses or CIDRs such as 127.0.0.1 or 10.0.0.0/8"


async def connected_remote(
    start_gateway: StartGateway, headers: dict[str, str], **overrides: Any
) -> str:
    """Open a socket through `headers` on a gateway started with `overrides`; its logged remote."""
    running = await start_gateway(**overrides)
    chat = channel_name()
    with capture_logs() as logs:
        async with running.connect(
            f"/{chat}/{make_token({'mode': 'r'})}", additional_headers=headers
        ):
            await subscribed(running, chat)
    [line] = [entry for entry in logs if entry["event"] == "client_connected"]
    return str(line["remote"])


async def test_a_trusted_proxy_names_the_client_with_x_forwarded_for(
    start_gateway: StartGateway,
) -> None:
    """Right-most untrusted hop: what the client wrote before its own address changes nothing."""
    remote = await connected_remote(
        start_gateway,
        {"X-Forwarded-For": "6.6.6.6, 203.0.113.7"},
        trusted_proxies=LOOPBACK,
    )
    assert remote == "203.0.113.7"


async def test_a_trusted_proxy_names_the_client_with_forwarded(
    start_gateway: StartGateway,
) -> None:
    """RFC 7239: `for=` of the right-most element, a quoted IPv6 address with its port."""
    remote = await connected_remote(
        start_gateway,
        {"Forwarded": 'for=192.0.2.60;proto=http, for="[2001:db8:cafe::17]:4711";proto=https'},
        trusted_proxies=LOOPBACK,
    )
    assert remote == "2001:db8:cafe::17"


async def test_chains_of_trusted_proxies_are_walked_past(start_gateway: StartGateway) -> None:
    """Hops inside PGWS_TRUSTED_PROXIES (a CIDR here) are skipped from the right."""
    remote = await connected_remote(
        start_gateway,
        {"X-Forwarded-For": "198.51.100.9, 10.1.2.3, 10.4.5.6"},
        trusted_proxies=(*LOOPBACK, "10.0.0.0/8"),
    )
    assert remote == "198.51.100.9"


async def test_an_untrusted_peer_is_never_believed(start_gateway: StartGateway) -> None:
    """The peer (127.0.0.1) is not a trusted proxy: its headers are not read."""
    remote = await connected_remote(
        start_gateway,
        {"X-Forwarded-For": "203.0.113.7", "Forwarded": "for=203.0.113.8"},
        trusted_proxies=("10.0.0.0/8",),
    )
    assert remote.startswith("127.0.0.1:")


async def test_nobody_is_trusted_by_default(start_gateway: StartGateway) -> None:
    remote = await connected_remote(start_gateway, {"X-Forwarded-For": "203.0.113.7"})
    assert remote.startswith("127.0.0.1:")


@pytest.mark.parametrize(
    "headers",
    [
        {"X-Forwarded-For": "not-an-address"},
        {"X-Forwarded-For": "203.0.113.7, unknown"},
        {"Forwarded": "for=unknown"},
        {"Forwarded": 'for=_hidden, for="[::1'},
        {"Forwarded": "proto=https"},
        # Two headers naming different clients: one of them was written by the client.
        {"X-Forwarded-For": "203.0.113.7", "Forwarded": "for=198.51.100.1"},
    ],
    ids=["garbage", "garbage last", "unknown", "obfuscated", "no for", "disagree"],
)
async def test_a_trusted_peers_unreadable_headers_leave_the_peer_address(
    start_gateway: StartGateway, headers: dict[str, str]
) -> None:
    remote = await connected_remote(start_gateway, headers, trusted_proxies=LOOPBACK)
    assert remote.startswith("127.0.0.1:")


async def test_a_refused_handshake_logs_the_forwarded_client(start_gateway: StartGateway) -> None:
    """client_rejected carries the same address as client_connected would."""
    running = await start_gateway(trusted_proxies=LOOPBACK)
    with capture_logs() as logs, pytest.raises(InvalidStatus):
        async with running.connect(
            "/chat/not-a-token", additional_headers={"X-Forwarded-For": "203.0.113.7"}
        ):
            pass
    await until(lambda: any(e["event"] == "client_rejected" for e in logs), "client_rejected")
    [line] = [entry for entry in logs if entry["event"] == "client_rejected"]
    assert line["remote"] == "203.0.113.7"
    assert line["status"] == 401


async def test_a_v2_socket_logs_the_forwarded_client(start_gateway: StartGateway) -> None:
    running = await start_gateway(trusted_proxies=LOOPBACK)
    with capture_logs() as logs:
        async with running.connect(
            "/",
            subprotocols=["pgws.v2"],
            additional_headers={"X-Forwarded-For": "2001:db8::5"},
        ):
            await until(lambda: any(e["event"] == "client_connected" for e in logs), "v2 socket")
    [line] = [entry for entry in logs if entry["event"] == "client_connected"]
    assert line["remote"] == "2001:db8::5"


# --- the setting ---------------------------------------------------------------------------------


def test_setting_takes_addresses_and_cidrs_of_both_families() -> None:
    env = {
        "PGWS_DB_URI": "postgresql://localhost/x",
        "PGWS_JWT_SECRET": SECRET,
        "PGWS_TRUSTED_PROXIES": " 127.0.0.1, ::1 ,10.0.0.0/8,fd00::/8,",
    }
    config = Config.from_env(env)
    assert config.trusted_proxies == ("127.0.0.1/32", "::1/128", "10.0.0.0/8", "fd00::/8")
    assert Config.from_env({**env, "PGWS_TRUSTED_PROXIES": ""}).trusted_proxies == ()


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("localhost", f"{EXPECTED}, got 'localhost'"),
        ("10.0.0.1/8", "'10.0.0.1/8' has host bits set: write '10.0.0.0/8' or the address alone"),
        ("10.0.0.0/33", f"{EXPECTED}, got '10.0.0.0/33'"),
        (" , ", "lists no address"),
    ],
)
def test_bad_proxy_lists_are_one_line_errors(value: str, problem: str) -> None:
    with pytest.raises(ConfigError) as error:
        proxy_networks("PGWS_TRUSTED_PROXIES", value)
    assert str(error.value) == f"PGWS_TRUSTED_PROXIES: {problem}"


@pytest.mark.nodb
def test_serve_refuses_a_bad_proxy_list_with_one_line_and_78() -> None:
    result = run_pgws(
        "serve",
        env={
            "PGWS_DB_URI": "postgresql://127.0.0.1:1/x",
            "PGWS_JWT_SECRET": SECRET,
            "PGWS_TRUSTED_PROXIES": "nginx",
        },
    )
    assert result.returncode == EX_CONFIG
    assert result.stderr == (
        "Error: PGWS_TRUSTED_PROXIES: expected addresses or CIDRs such as 127.0.0.1 or"
        " 10.0.0.0/8, got 'nginx'\n"
    )


# --- hostile header values -----------------------------------------------------------------------

TRUSTED = TrustedProxies(["127.0.0.1/32", "10.0.0.0/8", "2001:db8:ffff::/48"])
header_text = st.text(st.characters(codec="latin-1"), max_size=200)


def _usable_client(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    mapped = isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None
    return not mapped and not TRUSTED.trusts(address)


clients = st.ip_addresses().filter(_usable_client)


@given(st.lists(header_text, max_size=3), st.lists(header_text, max_size=3))
def test_any_headers_from_a_trusted_peer_give_an_address_or_the_peer(
    forwarded: list[str], x_forwarded_for: list[str]
) -> None:
    client = TRUSTED.client("127.0.0.1", forwarded, x_forwarded_for)
    if client is not None:
        ipaddress.ip_address(client)  # an address, never the header's text


@given(st.lists(header_text, max_size=3), st.lists(header_text, max_size=3), st.ip_addresses())
def test_an_untrusted_peers_headers_are_never_read(
    forwarded: list[str], x_forwarded_for: list[str], peer: Any
) -> None:
    if TRUSTED.trusts(peer):
        return
    assert TRUSTED.client(str(peer), forwarded, x_forwarded_for) is None


@given(header_text, clients)
def test_what_a_client_prepends_to_x_forwarded_for_cannot_choose_its_address(
    prefix: str, client: Any
) -> None:
    """nginx's $proxy_add_x_forwarded_for appends the real peer to what the client sent."""
    assert TRUSTED.client("127.0.0.1", [], [f"{prefix}, {client}"]) == str(client)


@given(header_text, clients)
def test_a_hostile_forwarded_header_is_the_real_client_or_the_peer(sent: str, client: Any) -> None:
    """The proxy appends its element; an unbalanced quote before it can make the header
    unreadable (the peer address then), never name another client."""
    node = f'"[{client}]"' if client.version == 6 else str(client)
    for forwarded in ([f"{sent}, for={node}"], [sent, f"for={node}"]):
        assert TRUSTED.client("127.0.0.1", forwarded, []) in (str(client), None)
    # And a Forwarded the client wrote next to the proxy's X-Forwarded-For:
    assert TRUSTED.client("127.0.0.1", [sent], [str(client)]) in (str(client), None)


@given(header_text)
def test_parse_node_never_raises(text: str) -> None:
    address = parse_node(text)
    assert address is None or isinstance(address, ipaddress.IPv4Address | ipaddress.IPv6Address)


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("192.0.2.1", "192.0.2.1"),
        ("192.0.2.1:8080", "192.0.2.1"),
        ("2001:db8::1", "2001:db8::1"),
        ("[2001:db8::1]", "2001:db8::1"),
        ("[2001:db8::1]:443", "2001:db8::1"),
        ("::ffff:192.0.2.1", "192.0.2.1"),
        ("unknown", None),
        ("_hidden", None),
        ("192.0.2.1:", None),
        ("192.0.2.1:²", None),
        ("[2001:db8::1", None),
        ("fe80::1%eth0", None),
        ("", None),
    ],
)
def test_parse_node(text: str, address: str | None) -> None:
    parsed = parse_node(text)
    assert (None if parsed is None else str(parsed)) == address


async def test_a_malformed_upgrade_is_logged_with_the_forwarded_client(
    start_gateway: StartGateway,
) -> None:
    """Refused before the token is read (two Upgrade headers, 400): the forwarded address still."""
    running = await start_gateway(trusted_proxies=LOOPBACK)
    port = running.gateway.port
    with capture_logs() as logs:
        async with asyncio.timeout(TIMEOUT):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(
                b"GET /chat/x HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\n"
                b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                b"X-Forwarded-For: 203.0.113.9\r\n\r\n"
            )
            status = await reader.readline()
            writer.close()
    assert status.startswith(b"HTTP/1.1 400 ")
    [line] = [entry for entry in logs if entry["event"] == "client_rejected"]
    assert line["remote"] == "203.0.113.9"


def test_an_ipv4_peer_on_a_dual_stack_socket_is_matched_as_ipv4() -> None:
    """PGWS_HOST=*6 reports IPv4 peers as ::ffff:a.b.c.d; 127.0.0.1/32 still trusts them."""
    assert TRUSTED.client("::ffff:127.0.0.1", [], ["203.0.113.7"]) == "203.0.113.7"
    assert TRUSTED.client("::ffff:127.0.0.1", [], ["::ffff:10.9.9.9, 203.0.113.7"]) == (
        "203.0.113.7"
    )


def _refusal(parse: Any, name: str, value: str) -> str | None:
    try:
        parse(name, value)
    except ConfigError as exc:
        return str(exc)
    return None


@given(st.text(max_size=80))
def test_the_setting_parsers_answer_any_text_with_a_value_or_one_line(value: str) -> None:
    for name, parse in (("PGWS_TRUSTED_PROXIES", proxy_networks), ("PGWS_METRICS", metrics_place)):
        refusal = _refusal(parse, name, value)
        if refusal is not None:
            assert refusal.startswith(f"{name}: ")
            assert "\n" not in refusal
