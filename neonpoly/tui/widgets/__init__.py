"""Widgets of the console: header, integration cards, step rows."""

from textual.widgets import Label


def set_text(label: Label, text: str) -> None:
    """Update only when the text changed: the 1 s ticker must not repaint (and re-layout)
    labels whose figures did not move."""
    if str(label.content) != text:
        label.update(text)
