"""Static files from PGWS_ROOT_PATH: GET/HEAD only, fixed content types, nothing from outside."""

from __future__ import annotations

import asyncio
import dataclasses
import fcntl
import logging
import os
import socket
import struct
import termios
from http import HTTPStatus
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.datastructures import Headers
from websockets.http11 import Request

from pgws.web import FileResponse, content_type, resolve_static, serve_plain
from tests.conftest import TIMEOUT, Running, StartGateway, until

SECRET_TEXT = b"TOP SECRET: outside the root"
SECURITY_HEADERS = {"x-content-type-options": "nosniff", "referrer-policy": "no-referrer"}

# name -> (bytes, expected Content-Type)
FILES: dict[str, tuple[bytes, str]] = {
    "index.html": (b"<h1>pgws</h1>", "text/html; charset=utf-8"),
    "app.js": (b"console.log(1);", "text/javascript; charset=utf-8"),
    "style.css": (b"body { color: red }", "text/css; charset=utf-8"),
    "data.json": (b'{"a": 1}', "application/json"),
    "logo.svg": (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "image/svg+xml"),
    "logo.png": (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "image/png"),
    "notes.txt": (b"plain notes", "text/plain; charset=utf-8"),
    "module.wasm": (b"\x00asm\x01\x00\x00\x00", "application/wasm"),
    "blob.unknownext": (b"\x00\x01\x02", "application/octet-stream"),
    "sp ace.txt": (b"a space in the name", "text/plain; charset=utf-8"),
    "café.txt": (b"utf-8 name", "text/plain; charset=utf-8"),
}


@dataclasses.dataclass(frozen=True)
class Site:
    """A root folder with files, subfolders and symlinks, next to a secret it must not serve."""

    root: Path
    inside: frozenset[bytes]  # every file body really under the root: what a 200 may contain


def build_site(base: Path) -> Site:
    """Lay out the test tree under `base` (see each line)."""
    root = base / "www"
    root.mkdir()
    for name, (data, _) in FILES.items():
        (root / name).write_bytes(data)
    (base / "secret.txt").write_bytes(SECRET_TEXT)  # next to the root
    (base / "www-evil").mkdir()  # shares the root's name as a prefix
    (base / "www-evil" / "x.txt").write_bytes(SECRET_TEXT)
    (root / "sub").mkdir()
    (root / "sub" / "index.html").write_bytes(b"<h1>sub</h1>")
    (root / "sub" / "page.html").write_bytes(b"<p>page</p>")
    (root / "empty-dir").mkdir()  # a folder without index.html
    (root / ".hidden").write_bytes(b"dotfile")
    (root / "link-in").symlink_to("notes.txt")  # inside -> inside: fine
    (root / "link-dir-in").symlink_to("sub")
    (root / "link-out").symlink_to("../secret.txt")  # inside -> outside
    (root / "link-abs-out").symlink_to(base / "secret.txt")
    (root / "link-dir-out").symlink_to("..")
    (root / "link-prefix").symlink_to("../www-evil/x.txt")
    (root / "link-loop").symlink_to("link-loop")
    (root / "link-dangling").symlink_to("nonexistent")
    root = root.resolve()
    inside = frozenset(
        path.read_bytes()
        for path in root.rglob("*")
        if path.is_file() and Path(os.path.realpath(path)).is_relative_to(root)
    )
    assert SECRET_TEXT not in inside
    return Site(root, inside)


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Site:
    """One test tree per module (Hypothesis runs many examples against the same files)."""
    return build_site(tmp_path_factory.mktemp("site"))


@pytest.fixture
async def served(start_gateway: StartGateway, site: Site) -> Running:
    """A gateway serving the test tree."""
    running: Running = await start_gateway(root_path=site.root)
    return running


@dataclasses.dataclass
class Answer:
    """A raw HTTP answer; status None when the server closed without responding."""

    status: int | None
    headers: dict[str, str]
    body: bytes


async def request(
    gateway: Running, method: str, target: str, *, extra: bytes = b"", body: bytes = b""
) -> Answer:
    """Send the request line exactly as given (no normalization); read until the server closes."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.gateway.port)
        head = f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n".encode("latin-1")
        writer.write(head + extra + b"\r\n" + body)
        await writer.drain()
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    if not raw:
        return Answer(None, {}, b"")
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return Answer(int(lines[0].split()[1]), headers, payload)


def assert_security_headers(answer: Answer) -> None:
    for name, value in SECURITY_HEADERS.items():
        assert answer.headers.get(name) == value, (name, answer.headers)


# --- over real HTTP -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", FILES)
async def test_each_file_is_served_with_its_content_type(served: Running, name: str) -> None:
    """A file in the root comes back byte for byte with its fixed Content-Type and both headers."""
    data, expected_type = FILES[name]
    target = "/" + "".join(
        char if char.isascii() and char != " " else "".join(f"%{b:02X}" for b in char.encode())
        for char in name
    )
    answer = await request(served, "GET", target)
    assert (answer.status, answer.body) == (200, data)
    assert answer.headers["content-type"] == expected_type
    assert answer.headers["content-length"] == str(len(data))
    assert_security_headers(answer)


@pytest.mark.parametrize(
    ("target", "body"),
    [
        ("/", b"<h1>pgws</h1>"),
        ("/?v=2", b"<h1>pgws</h1>"),
        ("/sub/", b"<h1>sub</h1>"),
        ("/sub/page.html", b"<p>page</p>"),
        ("/link-in", b"plain notes"),
        ("/link-dir-in/page.html", b"<p>page</p>"),
        ("/%6Eotes.txt", b"plain notes"),
    ],
)
async def test_paths_inside_the_root_are_served(served: Running, target: str, body: bytes) -> None:
    """`/` and `/dir/` are index.html, symlinks staying inside the root and plain escapes work."""
    answer = await request(served, "GET", target)
    assert (answer.status, answer.body) == (200, body)
    assert_security_headers(answer)


BAD_TARGETS = [
    "/../secret.txt",
    "/sub/../../secret.txt",
    "/%2e%2e/secret.txt",
    "/%2E%2E/secret.txt",
    "/%2E%2E%2Fsecret.txt",
    "/sub/..%2f..%2fsecret.txt",
    "/.%2e/secret.txt",
    "/sub%2fpage.html",  # exists as sub/page.html: %2f must not join segments
    "/sub%2Fpage.html",
    "/..\\secret.txt",
    "/sub\\page.html",
    "/%5c..%5csecret.txt",
    "/sub%5cpage.html",
    "/sub%5Cpage.html",
    "/notes.txt%00",
    "/notes.txt%00.html",
    "/%00",
    "/notes.txt\x00.html",  # a raw NUL byte in the request line
    "/%c0%ae%c0%ae/secret.txt",  # overlong UTF-8 for ".."
    "/%c0%afsecret.txt",  # overlong UTF-8 for "/"
    "/%e0%80%ae%e0%80%ae/secret.txt",
    "/%ff",
    "/notes%ff.txt",
    "//etc/passwd",
    "///etc/passwd",
    "//secret.txt",
    "/link-out",
    "/link-abs-out",
    "/link-dir-out/secret.txt",
    "/link-prefix",
    "/link-loop",
    "/link-dangling",
    "/.hidden",
    "/%2ehidden",
    "/empty-dir/",
    "/empty-dir",
    "/missing.txt",
    "http://localhost/../secret.txt",
    "*",
]


@pytest.mark.parametrize("target", BAD_TARGETS)
async def test_requests_for_anything_outside_the_root_are_4xx(served: Running, target: str) -> None:
    """Traversal, encoded separators, NUL, bad UTF-8 and escaping symlinks get 404, never data."""
    answer = await request(served, "GET", target)
    assert answer.status in (400, 404), answer
    assert SECRET_TEXT not in answer.body
    assert answer.body == b"not found\n"
    assert_security_headers(answer)


async def test_head_has_the_headers_of_get_and_no_body(served: Running) -> None:
    """HEAD answers with exactly GET's status and headers, Content-Length included, and no body."""
    for target in ("/", "/logo.png", "/missing.txt"):
        get = await request(served, "GET", target)
        head = await request(served, "HEAD", target)
        assert head.status == get.status
        assert head.headers == get.headers
        assert int(head.headers["content-length"]) == len(get.body) > 0
        assert head.body == b""


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "get"])
async def test_methods_other_than_get_and_head_are_405(served: Running, method: str) -> None:
    """Other methods without a body reach pgws and get 405 with `Allow: GET, HEAD`."""
    answer = await request(served, method, "/index.html")
    assert answer.status == 405
    assert answer.headers["allow"] == "GET, HEAD"
    assert answer.body == b"method not allowed\n"
    assert_security_headers(answer)


async def test_request_with_a_body_is_dropped_by_websockets_unanswered(served: Running) -> None:
    """websockets refuses any request body before pgws sees it: the connection closes silently."""
    answer = await request(
        served, "POST", "/index.html", extra=b"Content-Length: 5\r\n", body=b"hello"
    )
    assert answer.status is None


async def test_security_headers_are_on_plain_answers_without_a_root(gateway: Running) -> None:
    """Without PGWS_ROOT_PATH the short 200, its HEAD and a 405 carry both headers as well."""
    for method, status in (("GET", 200), ("HEAD", 200), ("POST", 405)):
        answer = await request(gateway, method, "/anything")
        assert answer.status == status
        assert_security_headers(answer)


# --- big files: streamed as the client reads, never held in memory -------------------------------

MIB = 1024 * 1024
STALLED_CLIENTS = 12


@pytest.fixture(scope="module")
def big_root(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, bytes]:
    """A root holding big.bin, 20 MiB of random bytes (far more than any socket buffer), and
    mid.bin, its first 15 MiB (small enough for the 16 MiB cap pgws once had)."""
    root = tmp_path_factory.mktemp("big")
    data = os.urandom(20 * MIB)
    (root / "big.bin").write_bytes(data)
    (root / "mid.bin").write_bytes(data[: 15 * MIB])
    return root, data


async def fetch(port: int, target: str, *, method: str = "GET") -> Answer:
    """`request`, by port: for a `pgws serve` subprocess."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(f"{method} {target} HTTP/1.1\r\nHost: localhost\r\n\r\n".encode())
        raw = await reader.read()
        writer.close()
    head_bytes, _, payload = raw.partition(b"\r\n\r\n")
    lines = head_bytes.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return Answer(int(lines[0].split()[1]), headers, payload)


def proc_memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (the peak so far) of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{pid}/status")


def unread_bytes(sock: socket.socket) -> int:
    """What the kernel holds for this socket that nobody has read (FIONREAD)."""
    raw = fcntl.ioctl(sock.fileno(), termios.FIONREAD, struct.pack("i", 0))
    count: int = struct.unpack("i", raw)[0]
    return count


async def test_a_file_of_many_mib_arrives_whole_and_head_gives_its_length(
    start_gateway: StartGateway, big_root: tuple[Path, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """A 20 MiB file comes byte for byte with its exact Content-Length; HEAD has GET's headers.
    Nothing is logged above INFO: websockets, finding the socket closed, sends nothing more."""
    root, data = big_root
    served: Running = await start_gateway(root_path=root)
    caplog.set_level(logging.DEBUG)
    get = await request(served, "GET", "/big.bin")
    assert get.status == 200
    assert int(get.headers["content-length"]) == len(data)
    assert get.body == data
    assert_security_headers(get)
    head = await request(served, "HEAD", "/big.bin")
    assert (head.status, head.headers, head.body) == (200, get.headers, b"")
    assert not loud_records(caplog)


def loud_records(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Messages logged at WARNING or above, except asyncio debug mode's slow-callback reports
    ("Executing <...> took 0.31 seconds"): those say the machine is loaded, not what pgws did."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.WARNING
        and not (r.name == "asyncio" and r.getMessage().startswith("Executing "))
    ]


async def test_a_client_gone_mid_file_is_dropped_quietly_and_others_are_served(
    start_gateway: StartGateway, big_root: tuple[Path, bytes], caplog: pytest.LogCaptureFixture
) -> None:
    """A reset halfway through a download logs no error; the next download is whole."""
    root, data = big_root
    served: Running = await start_gateway(root_path=root)
    caplog.set_level(logging.DEBUG)
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", served.gateway.port)
        writer.write(b"GET /big.bin HTTP/1.1\r\nHost: localhost\r\n\r\n")
        await reader.readexactly(MIB)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.close()  # SO_LINGER 0: an RST, not a FIN
    assert (await request(served, "GET", "/big.bin")).body == data
    # (asyncio's debug mode reports the reset at DEBUG with a traceback: that is not pgws's.)
    loud = loud_records(caplog)
    traced = [r.getMessage() for r in caplog.records if r.levelno > logging.DEBUG and r.exc_info]
    assert not loud
    assert not traced


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status")
async def test_clients_stalled_on_a_big_file_cost_their_write_limit_not_the_file(
    serve_process: Any, big_root: tuple[Path, bytes]
) -> None:
    """12 clients that ask for a 15 MiB file and never read hold about PGWS_CLIENT_MAX_BUFFER
    (1 MiB) each in the server, not a copy of the file (or two) each: the peak RSS grows by less
    than 2 MiB a client plus 32 MiB of slack, where a whole body each would be 180 MiB or more."""
    root, data = big_root
    serving, port = await serve_process(PGWS_ROOT_PATH=str(root))
    before = proc_memory(serving.process.pid, "VmRSS")
    loop = asyncio.get_running_loop()
    stalled: list[socket.socket] = []
    try:
        for _ in range(STALLED_CLIENTS):
            sock = socket.socket()
            stalled.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a small window
            sock.setblocking(False)
            async with asyncio.timeout(TIMEOUT):
                await loop.sock_connect(sock, ("127.0.0.1", port))
                await loop.sock_sendall(sock, b"GET /mid.bin HTTP/1.1\r\nHost: x\r\n\r\n")
        await until(lambda: all(unread_bytes(s) > 0 for s in stalled), "every client answered")
        assert all(s.recv(15, socket.MSG_PEEK) == b"HTTP/1.1 200 OK" for s in stalled)
        # Served meanwhile, and long enough for the server to fill every stalled socket's buffer.
        assert (await fetch(port, "/mid.bin")).body == data[: 15 * MIB]
        growth = proc_memory(serving.process.pid, "VmHWM") - before
    finally:
        for sock in stalled:
            sock.close()
    limit = STALLED_CLIENTS * 2 * MIB + 32 * MIB
    assert growth < limit, f"peak RSS grew by {growth / MIB:.0f} MiB (limit {limit / MIB:.0f})"


# --- resolve_static and serve_plain directly ------------------------------------------------------


@pytest.mark.nodb
@pytest.mark.parametrize("target", BAD_TARGETS)
def test_resolve_static_refuses_every_bad_target(site: Site, target: str) -> None:
    """resolve_static returns None for each path the HTTP test refuses."""
    assert resolve_static(site.root, target) is None


@pytest.mark.nodb
def test_resolve_static_accepts_a_root_given_unresolved(site: Site) -> None:
    """A root reached through `..` or a symlink still serves its files and nothing else."""
    alias = site.root.parent / "alias"
    if not alias.exists():
        alias.symlink_to(site.root)
    for root in (alias, site.root / "sub" / ".."):
        assert resolve_static(root, "/notes.txt") == site.root / "notes.txt"
        assert resolve_static(root, "/link-out") is None


@pytest.mark.nodb
@pytest.mark.parametrize(("name", "expected"), [(n, t) for n, (_, t) in FILES.items()])
def test_content_type_is_fixed_per_extension(name: str, expected: str) -> None:
    """Content types come from pgws's own table, not from the machine's /etc/mime.types."""
    assert content_type(name) == expected
    assert content_type(name.upper()) == expected


@pytest.mark.nodb
def test_compressed_files_are_served_as_opaque_bytes() -> None:
    """A `.tar.gz` or `.svgz` is not labelled as its uncompressed type."""
    assert content_type("backup.tar.gz") == "application/octet-stream"
    assert content_type("logo.svgz") == "application/octet-stream"


PIECES = st.sampled_from(
    [
        "", ".", "..", "...", "%2e", "%2E", "%2e%2e", "%2E%2E", "%2f", "%2F", "%5c", "%5C", "\\",
        "%00", "\x00", "%c0%ae", "%c0%af", "%e0%80%ae", "%ff", "%", "%2", "%zz", "index.html",
        "sub", "page.html", "notes.txt", "link-in", "link-out", "link-abs-out", "link-dir-out",
        "link-dir-in", "link-prefix", "link-loop", "secret.txt", "www", "www-evil", "x.txt",
        "empty-dir", ".hidden", "etc", "passwd", "?", "#", "%3f", "%23", ";", "~", "/", "//",
        "%20", "caf%C3%A9.txt", "sp%20ace.txt",
    ]
)  # fmt: skip
SEGMENTS = st.lists(PIECES | st.text(max_size=4), max_size=4).map("".join)
PATHS = st.lists(SEGMENTS, max_size=6).map(lambda parts: "/" + "/".join(parts)) | st.text()


@pytest.mark.nodb
@settings(max_examples=400, deadline=None)
@given(PATHS)
def test_resolve_static_only_ever_returns_files_inside_the_root(site: Site, raw: str) -> None:
    """Any path resolves to None or to a regular file whose real path is inside the root."""
    found = resolve_static(site.root, raw)
    if found is not None:
        real = Path(os.path.realpath(found))
        assert real.is_relative_to(site.root)
        assert real.is_file()
        assert SECRET_TEXT not in real.read_bytes()


@pytest.mark.nodb
@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["GET", "HEAD", "POST", "OPTIONS", "PROPFIND"]), PATHS)
def test_serve_plain_answers_any_request_with_200_404_or_405(
    site: Site, method: str, raw: str
) -> None:
    """Any method and path gets 200 with a file from inside the root, 404 or 405; never a 5xx."""
    response = serve_plain(site.root, Request(raw, Headers(), method))
    assert response.status_code in (HTTPStatus.OK, HTTPStatus.NOT_FOUND, 405)
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    assert response.headers["Referrer-Policy"] == "no-referrer"
    assert SECRET_TEXT not in response.body
    if response.status_code == HTTPStatus.OK and method == "GET":
        assert isinstance(response, FileResponse)  # the body is streamed from this file
        assert response.body == b""
        assert response.path.read_bytes() in site.inside
        assert int(response.headers["Content-Length"]) == response.size
    if method == "HEAD":
        assert response.body == b""
