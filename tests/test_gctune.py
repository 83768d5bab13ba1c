"""The collector settings `pgws serve` starts with (pgws.gctune)."""

from __future__ import annotations

import gc

import pytest

from pgws import gctune

pytestmark = pytest.mark.nodb


def test_tune_freezes_what_start_up_left_and_raises_the_thresholds() -> None:
    before = gc.get_threshold()
    try:
        gctune.tune()
        assert gc.get_threshold() == gctune.THRESHOLDS
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
