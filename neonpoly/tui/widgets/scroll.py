"""A scrolling column that is a Tab stop only when there is something to scroll to.

A VerticalScroll is always focusable, and focused it looks the same (a 5% tint): a Tab stop
that shows nothing. This one takes the focus only when it overflows, so the arrow keys can
scroll it, and then its scrollbar turns the accent colour to show where the focus is.
"""

from __future__ import annotations

from textual.containers import VerticalScroll


class Scroll(VerticalScroll):
    DEFAULT_CSS = """
    Scroll:focus {
        scrollbar-color: $accent;
        scrollbar-color-hover: $accent;
        scrollbar-color-active: $accent;
    }
    """

    def allow_focus(self) -> bool:
        return super().allow_focus() and self.max_scroll_y > 0
