"""A real identity provider for the JWKS tests: an HTTPS server (CA made here) serving a JWKS.

It serves from a thread over loopback; tests change what it serves (`keys`, `cache_control`,
`body`) mid-run and count the requests it got, so rotation and rate limits are seen from the
provider's side.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import http.server
import ipaddress
import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from jose import jwk, jwt

from tests.conftest import ISSUED_TOKENS


@dataclasses.dataclass(frozen=True)
class SigningKey:
    """A provider's private key with its kid and algorithm; `public` is its JWKS entry."""

    kid: str
    algorithm: str
    private_pem: bytes
    public: dict[str, Any]

    def sign(self, claims: dict[str, Any], *, kid: str | None = "", alg: str | None = None) -> str:
        """A token signed with this key (header kid: this key's unless given; None: no kid)."""
        headers = {} if kid is None else {"kid": kid or self.kid}
        token: str = jwt.encode(
            claims, self.private_pem.decode(), algorithm=alg or self.algorithm, headers=headers
        )
        ISSUED_TOKENS.append(token)
        return token


def signing_key(kid: str, algorithm: str = "RS256") -> SigningKey:
    """A fresh RSA (RS*/PS*) or P-256 (ES256) key pair."""
    private: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
    if algorithm.startswith("ES"):
        private = ec.generate_private_key(ec.SECP256R1())
    else:
        private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public = jwk.construct(pem, algorithm).public_key().to_dict()
    return SigningKey(kid, algorithm, pem, {**public, "kid": kid, "alg": algorithm, "use": "sig"})


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def make_ca(folder: Path) -> tuple[Path, ssl.SSLContext]:
    """A CA file (what PGWS_JWT_JWKS_CA_FILE names) and a server context for 127.0.0.1."""
    ca_key, leaf_key = (
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP256R1()),
    )
    now = datetime.datetime.now(datetime.UTC)

    def certificate(subject: str, key: ec.EllipticCurvePrivateKey, *, ca: bool) -> x509.Certificate:
        builder = (
            x509.CertificateBuilder()
            .subject_name(_name(subject))
            .issuer_name(_name("pgws test idp ca"))
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if not ca:
            names = [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
        return builder.sign(ca_key, hashes.SHA256())

    ca_file, leaf_file, key_file = folder / "idp-ca.pem", folder / "idp.pem", folder / "idp.key"
    ca_file.write_bytes(
        certificate("pgws test idp ca", ca_key, ca=True).public_bytes(serialization.Encoding.PEM)
    )
    leaf_file.write_bytes(
        certificate("localhost", leaf_key, ca=False).public_bytes(serialization.Encoding.PEM)
    )
    key_file.write_bytes(
        leaf_key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(leaf_file, key_file)
    return ca_file, context


class Provider:
    """What the server serves and what it was asked; read and changed from the tests."""

    def __init__(self, ca_file: Path, port: int) -> None:
        self.ca_file = ca_file
        self.port = port
        self.keys: list[dict[str, Any]] = []
        self.body: bytes | None = None  # served as is instead of the keys (hostile documents)
        self.status = 200
        self.cache_control: str | None = None
        self.location: str | None = None  # with a 3xx status: where it redirects
        self.trickle: float | None = None  # seconds between single bytes of the body
        self.requests: list[str] = []  # request paths, in order
        self.auth: list[str | None] = []  # their Authorization headers
        self.lock = threading.Lock()
        self.fetched = threading.Event()  # set at each request

    @property
    def url(self) -> str:
        return f"https://127.0.0.1:{self.port}/.well-known/jwks.json"

    def serve(self, *keys: SigningKey, cache_control: str | None = None) -> None:
        """Serve exactly these public keys from now on."""
        with self.lock:
            self.keys = [key.public for key in keys]
            self.body, self.status, self.cache_control = None, 200, cache_control

    @property
    def count(self) -> int:
        with self.lock:
            return len(self.requests)

    def answer(
        self, path: str, auth: str | None
    ) -> tuple[int, bytes, str | None, str | None, float | None]:
        with self.lock:
            self.requests.append(path)
            self.auth.append(auth)
            body = self.body if self.body is not None else json.dumps({"keys": self.keys}).encode()
            answer = self.status, body, self.cache_control, self.location, self.trickle
        self.fetched.set()
        return answer


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server

    def do_GET(self) -> None:  # http.server's name
        status, body, cache_control, location, trickle = self.server.provider.answer(
            self.path, self.headers.get("Authorization")
        )
        self.send_response(status)
        if location is not None:
            self.send_header("Location", location)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if cache_control is not None:
            self.send_header("Cache-Control", cache_control)
        self.end_headers()
        if trickle is None:
            self.wfile.write(body)
            return
        for byte in body:  # a slow provider: one byte at a time
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return  # the client gave up
            time.sleep(trickle)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # quiet: the tests count requests instead


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    provider: Provider


@contextlib.contextmanager
def running_provider(folder: Path) -> Iterator[Provider]:
    """An HTTPS JWKS provider on a free loopback port, for the duration of the block."""
    ca_file, context = make_ca(folder)
    server = _Server(("127.0.0.1", 0), _Handler)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    provider = Provider(ca_file, server.server_address[1])
    server.provider = provider
    thread = threading.Thread(target=server.serve_forever, name="jwks-provider", daemon=True)
    thread.start()
    try:
        yield provider
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])
