"""Real signals to a real `pgws serve`: SIGHUP reloads, SIGQUIT stops, SIGUSR1/2 are ignored."""

from __future__ import annotations

import asyncio
import signal
import ssl
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from tests.conftest import (
    SECRET,
    TIMEOUT,
    channel_name,
    make_token,
    recv_json,
    signal_closes_1001_and_exits_0,
)
from tests.test_tls import _certificate, _key_pem, _pem

NEW_SECRET = "a-brand-new-secret-for-the-rotation-test-0123456789"


async def echo(ws: ClientConnection, text: str) -> None:
    """An rw socket hears its own message back through the database: it is open and served."""
    await ws.send(text)
    while (await recv_json(ws))["payload"] != text:
        pass


async def refused_status(url: str, **kwargs: Any) -> int:
    """The HTTP status a handshake is refused with (fails if it is accepted)."""
    with pytest.raises(InvalidStatus) as refused:
        async with connect(url, open_timeout=TIMEOUT, **kwargs):
            pass
    return refused.value.response.status_code


async def hang_up(serving: Any, event: str = "reloaded", sig: int = signal.SIGHUP) -> Any:
    """Send `sig` and return the first `event` logged after it."""
    mark = len(serving.events)
    serving.process.send_signal(sig)
    return await serving.wait_for_event(event, after=mark)


def leaked(serving: Any, *secrets: str) -> list[str]:
    text = "".join(serving.output)
    return [secret for secret in secrets if secret in text]


async def test_sighup_swaps_the_jwt_secret_and_keeps_open_sockets(
    serve_process: Any, tmp_path: Path
) -> None:
    """SIGHUP re-reads --env-file: open sockets stay, new tokens need the new secret."""
    env_file = tmp_path / "env"
    env_file.write_text(f"PGWS_JWT_SECRET={SECRET}\n")
    serving, port = await serve_process("--env-file", str(env_file), PGWS_JWT_SECRET=None)
    chat = channel_name()
    old_token = make_token({"mode": "rw"})
    new_token = make_token({"mode": "rw"}, secret=NEW_SECRET)
    async with connect(f"ws://127.0.0.1:{port}/{chat}/{old_token}", open_timeout=TIMEOUT) as ws:
        await echo(ws, "before")
        env_file.write_text(f"PGWS_JWT_SECRET={NEW_SECRET}\nPGWS_POOL_SIZE=3\n")
        restart = await hang_up(serving, "reload_needs_restart")
        assert restart["settings"] == ["PGWS_POOL_SIZE"]
        reloaded = await serving.wait_for_event("reloaded")
        assert reloaded["changed"] == ["PGWS_JWT_SECRET"]
        await echo(ws, "after")  # the socket opened with the old secret is still served
        async with connect(f"ws://127.0.0.1:{port}/{chat}/{new_token}", open_timeout=TIMEOUT):
            pass
        assert await refused_status(f"ws://127.0.0.1:{port}/{chat}/{old_token}") == 401
    assert serving.process.returncode is None
    assert not leaked(serving, SECRET, NEW_SECRET, old_token, new_token)


async def test_sighup_rereads_an_at_file_secret(serve_process: Any, tmp_path: Path) -> None:
    """PGWS_JWT_SECRET=@FILE in the environment: SIGHUP reads the file again."""
    secret_file = tmp_path / "jwt-secret"
    secret_file.write_text(SECRET + "\n")
    serving, port = await serve_process(PGWS_JWT_SECRET=f"@{secret_file}")
    secret_file.write_text(NEW_SECRET + "\n")
    assert (await hang_up(serving))["changed"] == ["PGWS_JWT_SECRET"]
    token = make_token({"mode": "r"}, secret=NEW_SECRET)
    async with connect(f"ws://127.0.0.1:{port}/{channel_name()}/{token}", open_timeout=TIMEOUT):
        pass


@pytest.mark.parametrize(
    ("bad", "event"),
    [
        ('{"kty": "oct",', "reload_failed"),  # not JSON: refused while reading the settings
        ('{"kty": "RSA", "alg": "RS256"}', "reload_rejected"),  # JSON, but no usable key
    ],
    ids=["broken-json", "unusable-jwk"],
)
async def test_sighup_with_a_bad_secret_keeps_the_old_one(
    serve_process: Any, tmp_path: Path, bad: str, event: str
) -> None:
    """A new secret that does not load is refused with a warning; the old one keeps working."""
    env_file = tmp_path / "env"
    env_file.write_text(f"PGWS_JWT_SECRET={SECRET}\n")
    serving, port = await serve_process("--env-file", str(env_file), PGWS_JWT_SECRET=None)
    env_file.write_text(f"PGWS_JWT_SECRET='{bad}'\n")
    warning = await hang_up(serving, event)
    assert warning["level"] == "warning"
    assert warning["setting"] == "PGWS_JWT_SECRET"
    token = make_token({"mode": "r"})
    async with connect(f"ws://127.0.0.1:{port}/{channel_name()}/{token}", open_timeout=TIMEOUT):
        pass
    assert serving.process.returncode is None


def write_leaf(folder: Path, name: str, ca: tuple[x509.Certificate, Any]) -> tuple[Path, Path]:
    """A leaf certificate for 127.0.0.1 signed by `ca`, and its key, as PEM files."""
    key = ec.generate_private_key(ec.SECP256R1())
    leaf = _certificate(name, key, "pgws signals root", ca[1], ca=False)
    certificate, key_file = folder / f"{name}.pem", folder / f"{name}.key"
    certificate.write_bytes(_pem(leaf))
    key_file.write_bytes(_key_pem(key))
    return certificate, key_file


async def served_certificate(port: int, ca_file: Path, token: str) -> bytes:
    """The DER certificate a new wss:// client is shown."""
    client = ssl.create_default_context(cafile=ca_file)
    async with connect(f"wss://127.0.0.1:{port}/c/{token}", ssl=client, open_timeout=TIMEOUT) as ws:
        ssl_object = ws.transport.get_extra_info("ssl_object")
        der: bytes = ssl_object.getpeercert(binary_form=True)
        return der


def der(path: Path) -> bytes:
    return x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )


async def test_sighup_rotates_the_tls_certificate(serve_process: Any, tmp_path: Path) -> None:
    """After SIGHUP new TLS clients get the new certificate; a bad pair keeps the last good one."""
    root_key = ec.generate_private_key(ec.SECP256R1())
    root = _certificate("pgws signals root", root_key, "pgws signals root", root_key, ca=True)
    ca_file = tmp_path / "ca.pem"
    ca_file.write_bytes(_pem(root))
    first_cert, first_key = write_leaf(tmp_path, "first", (root, root_key))
    second_cert, second_key = write_leaf(tmp_path, "second", (root, root_key))
    live_cert, live_key = tmp_path / "cert.pem", tmp_path / "key.pem"
    live_cert.write_bytes(first_cert.read_bytes())
    live_key.write_bytes(first_key.read_bytes())
    serving, port = await serve_process(
        PGWS_CERTIFICATE_FILE=str(live_cert), PGWS_KEY_FILE=str(live_key)
    )
    token = make_token({"mode": "rw"})
    assert await served_certificate(port, ca_file, token) == der(first_cert)
    client = ssl.create_default_context(cafile=ca_file)
    chat = channel_name()
    async with connect(
        f"wss://127.0.0.1:{port}/{chat}/{token}", ssl=client, open_timeout=TIMEOUT
    ) as ws:
        live_cert.write_bytes(second_cert.read_bytes())
        live_key.write_bytes(second_key.read_bytes())
        reloaded = await hang_up(serving)
        assert reloaded["changed"] == ["PGWS_CERTIFICATE_FILE", "PGWS_KEY_FILE"]
        assert await served_certificate(port, ca_file, token) == der(second_cert)
        await echo(ws, "still here")  # the TLS socket opened before the rotation

        live_key.write_bytes(first_key.read_bytes())  # no longer matches the certificate
        rejected = await hang_up(serving, "reload_rejected")
        assert rejected["setting"] == "PGWS_KEY_FILE"
        assert await served_certificate(port, ca_file, token) == der(second_cert)


async def test_sigusr1_and_sigusr2_are_logged_and_ignored(serve_process: Any) -> None:
    """SIGUSR1 and SIGUSR2 leave one `signal_ignored` line each and change nothing."""
    serving, port = await serve_process()
    token = make_token({"mode": "rw"})
    async with connect(f"ws://127.0.0.1:{port}/{channel_name()}/{token}") as ws:
        for sig in (signal.SIGUSR1, signal.SIGUSR2):
            ignored = await hang_up(serving, "signal_ignored", sig)
            assert ignored["signal"] == signal.Signals(sig).name
        await echo(ws, "unharmed")
    assert serving.process.returncode is None


async def test_sigquit_stops_as_cleanly_as_sigterm(serve_process: Any) -> None:
    """SIGQUIT closes sockets with 1001 and exits 0, like SIGTERM (no core dump, no 1006)."""
    serving, port = await serve_process()
    token = make_token({"mode": "r"})
    async with connect(f"ws://127.0.0.1:{port}/{channel_name()}/{token}") as ws:
        await signal_closes_1001_and_exits_0(serving, ws, signal.SIGQUIT)
    assert any(e.get("signal") == "SIGQUIT" for e in serving.events)


async def test_supervisor_forwards_sighup_to_every_worker(
    serve_process: Any, tmp_path: Path
) -> None:
    """With --workers 2, SIGHUP to the supervisor reloads both workers from the env file."""
    env_file = tmp_path / "env"
    env_file.write_text(f"PGWS_JWT_SECRET={SECRET}\n")
    serving, port = await serve_process(
        "--env-file", str(env_file), PGWS_JWT_SECRET=None, PGWS_WORKERS="2"
    )
    await serving.wait_for_event("workers_ready")
    env_file.write_text(f"PGWS_JWT_SECRET={NEW_SECRET}\n")
    mark = len(serving.events)
    serving.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(TIMEOUT):
        while True:
            reloads = [e for e in serving.events[mark:] if e.get("event") == "reloaded"]
            if len(reloads) == 2:
                break
            await serving.wait_for_event("reloaded", after=len(serving.events))
    assert {e["worker"] for e in reloads} == {0, 1}
    assert all(e["changed"] == ["PGWS_JWT_SECRET"] for e in reloads)
    old_token, new_token = make_token({"mode": "r"}), make_token({"mode": "r"}, secret=NEW_SECRET)
    for _ in range(8):  # the kernel spreads these over both workers
        async with connect(f"ws://127.0.0.1:{port}/c/{new_token}", open_timeout=TIMEOUT):
            pass
        assert await refused_status(f"ws://127.0.0.1:{port}/c/{old_token}") == 401
    serving.process.send_signal(signal.SIGTERM)
    assert await serving.wait_exit() == 0


async def test_sighup_changes_the_trusted_proxies(serve_process: Any, tmp_path: Path) -> None:
    """PGWS_TRUSTED_PROXIES in --env-file: after SIGHUP new sockets' X-Forwarded-For is read."""
    env_file = tmp_path / "env"
    env_file.write_text("PGWS_TRUSTED_PROXIES=10.0.0.0/8\n")
    serving, port = await serve_process("--env-file", str(env_file))
    url = f"ws://127.0.0.1:{port}/{channel_name()}/{make_token({'mode': 'r'})}"
    forwarded = {"X-Forwarded-For": "203.0.113.7"}
    mark = len(serving.events)
    async with connect(url, open_timeout=TIMEOUT, additional_headers=forwarded):
        before = await serving.wait_for_event("client_connected", after=mark)
    assert before["remote"].startswith("127.0.0.1:")  # not trusted yet
    env_file.write_text("PGWS_TRUSTED_PROXIES=127.0.0.1,::1\n")
    assert (await hang_up(serving))["changed"] == ["PGWS_TRUSTED_PROXIES"]
    mark = len(serving.events)
    async with connect(url, open_timeout=TIMEOUT, additional_headers=forwarded):
        after = await serving.wait_for_event("client_connected", after=mark)
    assert after["remote"] == "203.0.113.7"
