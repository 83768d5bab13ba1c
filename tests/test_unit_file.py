"""The systemd unit file is valid and carries the settings the README promises."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

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
    assert any(line.startswith("ExecStart=") and "serve --env-file /etc/pgws/env" in line
               for line in lines)  # fmt: skip


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_systemd_analyze_verify_accepts_the_unit(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds nothing wrong (ExecStart pointed at this venv's pgws)."""
    pgws = Path(sys.executable).parent / "pgws"
    unit = tmp_path / "pgws.service"
    unit.write_text(UNIT.read_text().replace("/opt/pgws/bin/pgws", str(pgws)))
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
