"""A yes/no modal for the destructive actions (purge, remove)."""

from __future__ import annotations

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label


class ConfirmModal(ModalScreen[bool]):
    BINDINGS = [
        Binding("y", "answer(True)", "Confirm"),
        Binding("n", "answer(False)", "Cancel"),
        Binding("escape", "answer(False)", "Cancel"),
        Binding("q", "answer(False)", "Cancel", show=False),
    ]

    def __init__(self, title: str, message: str, confirm: str, *, danger: bool = True) -> None:
        super().__init__(classes="confirm-screen")
        self.title_text = title
        self.message = message
        self.confirm = confirm
        self.danger = danger

    def compose(self) -> ComposeResult:
        with Vertical(id="confirm"):
            yield Label(self.title_text, classes="title")
            yield Label(self.message, classes="message")
            with Horizontal(classes="buttons"):
                yield Button("Cancel (n)", id="no", compact=True)
                yield Button(
                    f"{self.confirm} (y)",
                    id="yes",
                    compact=True,
                    variant="error" if self.danger else "primary",
                )
        # The dialog's own keys, not the page's (dimmed) ones underneath.
        yield Footer()

    def on_mount(self) -> None:
        # Focus starts on Cancel so a stray enter never destroys anything.
        self.query_one("#no", Button).focus()

    def action_answer(self, yes: bool) -> None:
        self.dismiss(yes)

    @on(Button.Pressed)
    def _pressed(self, event: Button.Pressed) -> None:
        self.dismiss(event.button.id == "yes")
