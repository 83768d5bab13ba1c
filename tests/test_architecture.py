"""The package's shape (issue 9): no import cycle, psycopg only under pgws/db/."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.nodb
ROOT = Path(__file__).resolve().parent.parent


def test_no_import_cycle_and_psycopg_only_under_db() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "dev.imports", "--check"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "pgws.server" in result.stdout  # it did read the package
