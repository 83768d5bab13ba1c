"""PGWS_TRUSTED_PROXIES: the client's real address when a trusted reverse proxy forwards it.

Only a peer inside one of the trusted networks may name the client, in `X-Forwarded-For` or in
RFC 7239 `Forwarded: for=`; a header from anyone else is never read. The hops a header lists are
walked from the right (the hop the trusted proxy itself appended) and the first one that is not a
trusted proxy is the client, so whatever a client writes to the left of its own address changes
nothing. A hop that is not an address (garbage, `unknown`, an obfuscated name) where the walk
needs one, or two headers naming different clients, leave the peer's own address in place: a
header that cannot be read is never guessed at. Pure: the standard library only.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence

from pgws.errors import ConfigError

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


def proxy_networks(name: str, value: str) -> tuple[str, ...]:
    """Comma-separated addresses and CIDRs, IPv4 or IPv6, as normalized network strings.

    Blank is the default: trust nobody. `10.0.0.1/8` (host bits set) is refused rather than
    widened silently.
    """
    found: list[str] = []
    for item in (part.strip() for part in value.split(",")):
        if not item:
            continue
        try:
            network = ipaddress.ip_network(item, strict=True)
        except ValueError as exc:
            if "has host bits set" in str(exc):
                wider = ipaddress.ip_network(item, strict=False)
                raise ConfigError(
                    name, f"{item!r} has host bits set: write {str(wider)!r} or the address alone"
                ) from None
            raise ConfigError(
                name, f"expected addresses or CIDRs such as 127.0.0.1 or 10.0.0.0/8, got {item!r}"
            ) from None
        found.append(str(network))
    if value.strip() and not found:
        raise ConfigError(name, "lists no address")
    return tuple(dict.fromkeys(found))


def _unmapped(address: IPAddress) -> IPAddress:
    """`::ffff:192.0.2.1` (IPv4 on a dual-stack socket) as the IPv4 address it is."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _is_port(text: str) -> bool:
    return 0 < len(text) <= 5 and text.isascii() and text.isdigit()


def parse_node(text: str) -> IPAddress | None:
    """One hop as a proxy writes it: `192.0.2.1`, `192.0.2.1:80`, `2001:db8::1`, `[2001:db8::1]`,
    `[2001:db8::1]:80`; None for anything else (`unknown`, `_hidden`, garbage)."""
    text = text.strip()
    host = text
    if text.startswith("["):
        end = text.find("]")
        rest = text[end + 1 :] if end > 0 else "x"
        if rest and not (rest.startswith(":") and _is_port(rest[1:])):
            return None
        host = text[1:end]
    elif text.count(":") == 1:  # IPv4 with a port
        host, _, port = text.partition(":")
        if not _is_port(port):
            return None
    if not host or not host.isascii() or "%" in host:
        return None
    try:
        return _unmapped(ipaddress.ip_address(host))
    except ValueError:
        return None


def _split_outside_quotes(text: str, separator: str) -> list[str]:
    """`text` cut at each `separator` that is not inside a quoted-string (RFC 9110 5.6.4)."""
    parts: list[str] = []
    current: list[str] = []
    quoted = escaped = False
    for char in text:
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            parts.append("".join(current))
            current = []
            continue
        current.append(char)
    parts.append("".join(current))
    return parts


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out: list[str] = []
        escaped = False
        for char in value[1:-1]:
            if escaped or char != "\\":
                out.append(char)
                escaped = False
            else:
                escaped = True
        return "".join(out)
    return value


def forwarded_hops(values: Iterable[str]) -> list[IPAddress | None]:
    """The `for=` of each element of RFC 7239 `Forwarded` headers, left to right (None: no
    usable address in that element)."""
    hops: list[IPAddress | None] = []
    for value in values:
        for element in _split_outside_quotes(value, ","):
            if not element.strip():
                continue
            node: IPAddress | None = None
            for pair in _split_outside_quotes(element, ";"):
                key, equals, raw = pair.partition("=")
                if equals and key.strip().lower() == "for":
                    node = parse_node(_unquote(raw))
                    break
            hops.append(node)
    return hops


def x_forwarded_for_hops(values: Iterable[str]) -> list[IPAddress | None]:
    """The hops of `X-Forwarded-For` headers, left to right (None: not an address)."""
    return [parse_node(item) for value in values for item in value.split(",") if item.strip()]


class TrustedProxies:
    """The networks whose peers may say who the client is."""

    def __init__(self, networks: Iterable[str]) -> None:
        self._networks: tuple[IPNetwork, ...] = tuple(
            ipaddress.ip_network(network) for network in networks
        )

    def __bool__(self) -> bool:
        return bool(self._networks)

    def trusts(self, address: IPAddress) -> bool:
        """Whether `address` is one of the trusted proxies."""
        address = _unmapped(address)
        return any(address in network for network in self._networks)

    def client(
        self, peer: str, forwarded: Sequence[str], x_forwarded_for: Sequence[str]
    ) -> str | None:
        """The client address the trusted peer forwards, or None: use the peer's own address.

        `peer` is the socket's remote host; `forwarded` and `x_forwarded_for` are the values of
        each header line, in order.
        """
        if not self._networks or not (forwarded or x_forwarded_for):
            return None
        address = parse_node(peer)
        if address is None or not self.trusts(address):
            return None
        answers = [
            self._walk(hops)
            for hops in (forwarded_hops(forwarded), x_forwarded_for_hops(x_forwarded_for))
            if hops
        ]
        if not answers or answers[0] is None or any(other != answers[0] for other in answers):
            return None
        return str(answers[0])

    def _walk(self, hops: list[IPAddress | None]) -> IPAddress | None:
        """Right to left, the first hop that is not a trusted proxy (the left-most if all are)."""
        for hop in reversed(hops):
            if hop is None:
                return None
            if not self.trusts(hop):
                return hop
        return hops[0]
