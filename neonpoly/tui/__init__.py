"""The Textual console. Import `run_tui` lazily: the CLI must not pay for Textual on `serve`."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from neonpoly.control.interface import Control


def run_tui(control: Control) -> None:
    from neonpoly.tui.app import run_tui as run

    run(control)
