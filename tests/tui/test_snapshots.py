"""Every screen and drawer state at 80x24 and 120x40, against the accepted SVGs.

Update after an intended change:  .venv/bin/pytest tests/tui/test_snapshots.py --snapshot-update
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

from tests.tui.scenes import SCENES, SIZES, Scene


@pytest.mark.parametrize("size", SIZES, ids=[f"{w}x{h}" for w, h in SIZES])
@pytest.mark.parametrize("scene", SCENES, ids=[s.name for s in SCENES])
def test_screen(scene: Scene, size: tuple[int, int], snap_compare: Callable[..., bool]) -> None:
    assert snap_compare(scene.app(), terminal_size=size, run_before=scene.run)
