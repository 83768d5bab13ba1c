"""The systemd unit file is valid and carries the settings the README promises."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_systemd_recipe import with_tls_enabled

UNIT = Path(__file__).parent.parent / "systemd" / "pgws.service"
pytestmark = pytest.mark.nodb


def test_unit_declares_notify_restart_policy_and_hardening() -> None:
    """Type=notify, no restart on exit 78, a stop timeout and the sandboxing options are set."""
    lines = set(UNIT.read_text().splitlines())
    for expected in (
        "Type=notify",
        "Restart=on-failure",
        "RestartPreventExitStatus=78",
        "TimeoutStopSec=15",
        "DynamicUser=yes",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "PrivateTmp=yes",
    ):
        assert expected in lines, expected
    # DynamicUser= cannot read /etc/pgws: the env file is passed as a credential (issue 8 item 5).
    assert "LoadCredential=env:/etc/pgws/pgws.env" in lines
    assert "ExecStart=/opt/pgws/bin/pgws serve" in lines
    assert "Documentation=file:/usr/share/doc/pgws/README.md" in lines


def test_unit_tls_lines_name_the_credentials_directory() -> None:
    """The commented TLS lines load cert and key as credentials and point pgws at %d."""
    lines = set(UNIT.read_text().splitlines())
    for expected in (
        "# LoadCredential=tls.crt:/etc/pgws/cert.pem",
        "# LoadCredential=tls.key:/etc/pgws/key.pem",
        "# Environment=PGWS_CERTIFICATE_FILE=%d/tls.crt",
        "# Environment=PGWS_KEY_FILE=%d/tls.key",
    ):
        assert expected in lines, expected


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
@pytest.mark.parametrize("tls", [False, True], ids=["as shipped", "TLS lines on"])
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path, tls: bool) -> None:
    """`systemd-analyze verify` finds nothing wrong (ExecStart pointed at this venv's pgws)."""
    pgws = Path(sys.executable).parent / "pgws"
    unit = tmp_path / "pgws.service"
    text = UNIT.read_text().replace("/opt/pgws/bin/pgws", str(pgws))
    unit.write_text(with_tls_enabled(text) if tls else text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    problems = [line for line in result.stderr.splitlines() if "pgws.service" in line]
    assert result.returncode == 0, result.stderr
    assert not problems, result.stderr


def readme_user_drop_in() -> str:
    """The drop-in README's Deploying step 3 writes for a fixed system user (its printf)."""
    readme = (UNIT.parent.parent / "README.md").read_text()
    [text] = re.findall(r"^printf '([^']*)' > /etc/systemd/system/pgws\.service\.d/", readme,
                        flags=re.MULTILINE)  # fmt: skip
    return str(text).replace("\\n", "\n")


def test_readme_fixed_user_drop_in_replaces_the_dynamic_user() -> None:
    drop_in = readme_user_drop_in()
    assert drop_in.splitlines() == ["[Service]", "DynamicUser=no", "User=pgws", "Group=pgws"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit_with_the_fixed_user_drop_in(
    tmp_path: Path,
) -> None:
    """The unit with the drop-in's settings applied (appended to [Service], where a drop-in's
    assignments win) still verifies."""
    pgws = Path(sys.executable).parent / "pgws"
    settings = "\n".join(readme_user_drop_in().splitlines()[1:]) + "\n"
    text = UNIT.read_text().replace("/opt/pgws/bin/pgws", str(pgws))
    text = text.replace("\n[Install]\n", f"\n{settings}\n[Install]\n")
    unit = tmp_path / "pgws.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not [line for line in result.stderr.splitlines() if "pgws.service" in line]
