"""The help screen: every key, by screen, plus what the console recreates."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Label

KEYS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("Everywhere", (
        ("?", "this help"),
        ("ctrl+p", "command palette: every action by name"),
        ("q ctrl+c", "quit (the proxy stops with the console)"),
        ("q esc", "in a drawer or dialog: close it"),
    )),
    ("Integrations page", (
        ("a", "add PolyScale (opens the Add drawer)"),
        ("m", "manage PolyScale (opens the Manage drawer)"),
        ("v", "view cache (observability)"),
        ("p r c", "purge cache, remove integration, copy the string"),
    )),
    ("Manage drawer", (
        ("c", "copy the connection string, password included"),
        ("s", "show or hide the password"),
        ("v p r", "view cache, purge cache, remove integration"),
        ("esc q", "close: back to the page"),
    )),
    ("Cache view", (
        ("/", "filter templates (esc clears)"),
        ("s", "sort: calls, hit %, time saved, p50 miss, template"),
        ("enter", "details of the highlighted query (esc closes)"),
        ("p", "purge the highlighted query's cached results"),
        ("P", "purge the whole cache (shift+p)"),
        ("esc", "back (to the Manage drawer, if opened from it)"),
    )),
)

ABOUT = (
    "neonpoly recreates Neon's PolyScale integration: a caching proxy between your app and "
    "the primary branch's read-write endpoint. Use the PolyScale connection string; writes "
    "through it invalidate the cache, writes around it do not."
)


# On the card's bottom border while keys remain below.
MORE = "↓ more below: ↓ pgdn or scroll"


class HelpScreen(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "dismiss", "Close"),
        Binding("question_mark,q", "dismiss", "Close", show=False),
    ]

    def compose(self) -> ComposeResult:
        with VerticalScroll(id="help"):
            yield Label("neonpoly console — keys", classes="title")
            for section, keys in KEYS:
                yield Label(section, classes="subtitle")
                for key, what in keys:
                    yield Label(f"  [b]{key:<10}[/b] {what}", classes="key-row")
            yield Label(ABOUT, classes="muted about")
            yield Label("esc close", classes="hint")
        yield Footer()

    def on_mount(self) -> None:
        box = self.query_one("#help", VerticalScroll)
        box.focus()  # so ↓ and pgdn scroll it, as the cue says
        # At 80x24 the card holds about half the keys, and nothing said that more follow.
        self.watch(box, "scroll_y", self._cue, init=False)
        self.watch(box, "virtual_size", self._cue, init=False)
        self.call_after_refresh(self._cue)

    def on_resize(self) -> None:
        self.call_after_refresh(self._cue)

    def _cue(self, *_: object) -> None:
        box = self.query_one("#help", VerticalScroll)
        box.border_subtitle = MORE if box.scroll_y < box.max_scroll_y else ""
