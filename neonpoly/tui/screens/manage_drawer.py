"""The Manage PolyScale drawer: cache facts, the connection string, Database/Role, actions."""

from __future__ import annotations

import time

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Label, Select

from neonpoly.control.interface import Control, ControlError, IntegrationView
from neonpoly.tui import format as fmt
from neonpoly.tui.widgets import set_text
from neonpoly.tui.widgets.conn_string import ConnectionString
from neonpoly.tui.widgets.scroll import Scroll

# With the origin's change feed live, direct writes evict too: the warning becomes a reassurance.
FOLLOWED_NOTES = {
    "neon": "✓ Writes made directly on the database (a Neon connection string or the SQL "
    "Editor) evict what they change too: the change feed follows the origin.",
    "local": "✓ Writes made directly on the database (any connection that bypasses it) evict "
    "what they change too: the change feed follows the origin.",
}
WRITES_NOTES = {
    "neon": "⚠ Always use this connection string: modifying the database directly (a Neon "
    "connection string or the SQL Editor) can leave the cache outdated.",
    # A local or URL origin has no Neon string or SQL Editor to name.
    "local": "⚠ Always use this connection string: modifying the database directly (any "
    "connection that bypasses it) can leave the cache outdated.",
}


def writes_note(view: IntegrationView | None, following: bool = False) -> str:
    notes = FOLLOWED_NOTES if following else WRITES_NOTES
    return notes["neon" if view is None or view.kind == "neon" else "local"]


def origin_line(view: IntegrationView, live_state: str | None = None) -> str:
    where = view.endpoint_id or view.origin_label
    endpoint_state = live_state or view.endpoint_state
    state = f" ({endpoint_state})" if endpoint_state else ""
    branch = f" · {view.branch}" if view.branch else ""
    return f"Origin   {where}{state}{branch}"


class ManagePolyScaleDrawer(ModalScreen[None]):
    BINDINGS = [
        Binding("escape", "close", "Close"),
        Binding("q", "close", "Close", show=False),
        # A modal screen hides the app's bindings: help is wanted here too.
        Binding("question_mark", "app.help", "Help", show=False),
        Binding("c", "app.copy", "Copy"),
        Binding("s", "reveal", "Show/hide"),
        Binding("v", "app.view_cache", "View cache"),
        Binding("p", "app.purge", "Purge"),
        Binding("r", "app.remove", "Remove"),
    ]

    def __init__(self, control: Control, cache_id: str) -> None:
        # No fixed id: a kept screen of a removed cache may still be mounted while the
        # next one is built (it is removed once off the stack).
        super().__init__(classes="drawer-screen")
        self.control = control
        self.cache_id = cache_id
        self.revealed = False
        self._fresh = True
        self._choices_error: str | None = None
        self._listed: dict[str, tuple[str, ...]] = {}

    def compose(self) -> ComposeResult:
        view = self._view()
        databases = view.databases if view else ("—",)
        roles = view.roles if view else ("—",)
        self._listed = {"database": tuple(databases), "role": tuple(roles)}
        with Scroll(id="drawer", classes="drawer"):
            with Horizontal(classes="drawer-title"):
                yield Label("Manage PolyScale", classes="title")
                yield Label("esc Close", classes="hint")
            yield Label(id="cache-line")
            yield Label(id="origin-line")
            yield Label(id="entries-line")
            yield Label(id="fresh-line")
            with Horizontal(classes="selects"):
                yield Label("Database", classes="select-label")
                yield Select[str](
                    [(name, name) for name in databases],
                    id="database",
                    compact=True,
                    allow_blank=False,
                    value=view.database if view else databases[0],
                )
                yield Label("Role", classes="select-label")
                yield Select[str](
                    [(name, name) for name in roles],
                    id="role",
                    compact=True,
                    allow_blank=False,
                    value=view.role if view else roles[0],
                )
            yield Label(id="choices-note", classes="choices-note", markup=False)
            yield ConnectionString(id="conn-string", classes="conn", markup=False)
            with Horizontal(classes="buttons"):
                yield Button("c Copy", id="copy", compact=True)
                yield Button("s Show", id="reveal", compact=True)
            yield Label(writes_note(view), id="writes-note", classes="warning")
            with Horizontal(classes="buttons actions"):
                yield Button("v View cache", id="view", compact=True, variant="primary")
                yield Button("p Purge cache", id="purge", compact=True, variant="warning")
                yield Button("r Remove integration", id="remove", compact=True, variant="error")
        yield Footer()

    def _view(self) -> IntegrationView | None:
        return next((v for v in self.control.integrations() if v.cache_id == self.cache_id), None)

    def on_mount(self) -> None:
        view = self._view()
        if view is None:
            self.dismiss(None)
            return
        self.query_one("#cache-line", Label).update(f"Cache    {view.name} · {fmt.short_id(view.cache_id)}")
        self.refresh_data()
        self.query_one("#copy", Button).focus()

    def opened(self) -> None:
        """The drawer is about to be shown anew (it is kept installed between showings), not
        uncovered by a screen above it closing: the password starts hidden again."""
        self._fresh = True

    def _ask_origin(self) -> None:
        """List the origin's databases and roles again, off the UI (one login to the origin)."""
        self._choices_error = None
        self.run_worker(self._refresh_choices(), group="choices", exclusive=True, exit_on_error=False)

    async def _refresh_choices(self) -> None:
        try:
            view = await self.control.refresh_choices(self.cache_id)
        except ControlError as error:
            self._choices_error = f"Could not list the origin's databases and roles: {error}"
            self._show_note()
            return
        for key, names, value in (("database", view.databases, view.database), ("role", view.roles, view.role)):
            listed = names if value in names else (value, *names)
            if listed != self._listed.get(key):
                self._listed[key] = listed
                select = self.query_one(f"#{key}", Select)
                with select.prevent(Select.Changed):
                    select.set_options([(name, name) for name in listed])
                    select.value = value
        self._show_note()

    def on_screen_resume(self) -> None:
        if self._fresh:
            self._fresh = False
            self.revealed = False
            for button in self.query("#copy").results(Button):
                button.focus()
            self._ask_origin()
        self.refresh_data()

    def refresh_data(self) -> None:
        view = self._view()
        if view is None:  # removed elsewhere (CLI, another console): nothing left to manage
            if self.is_current:
                self.dismiss(None)
            return
        # Another console or the CLI may have changed the choice. Shown silently: were this
        # sync to post a Changed, a tick landing between a user's pick and its handler would
        # queue the old value behind the new one and so undo the pick.
        for select_id, value in (("#database", view.database), ("#role", view.role)):
            select = self.query_one(select_id, Select)
            if select.value != value:
                with select.prevent(Select.Changed):
                    select.value = value
        status = self.control.status(self.cache_id)
        set_text(self.query_one("#origin-line", Label), origin_line(view, status.endpoint_state))
        set_text(
            self.query_one("#entries-line", Label),
            f"Entries  {fmt.count(status.entries)} · {fmt.size(status.bytes)} · "
            f"hit rate {fmt.percent(status.hit_rate)} · "
            f"{fmt.plural(status.connections, 'connection', 'connections')}",
        )
        set_text(self.query_one("#fresh-line", Label), f"Fresh    {fmt.freshness(status.freshness, time.time())}")
        following = status.freshness is not None and status.freshness.following
        note = self.query_one("#writes-note", Label)
        set_text(note, writes_note(view, following))
        note.set_class(following, "followed")
        self._show_string()

    def _show_note(self) -> None:
        """Below the selects: why the lists may be stale, or that the string has no password."""
        view = self._view()
        if self._choices_error:
            text = self._choices_error
        elif view is not None and not view.password_known:
            text = f"neonpoly has no password for role {view.role}: the string carries none, so psql asks for it."
        else:
            text = ""
        note = self.query_one("#choices-note", Label)
        set_text(note, text)
        note.display = bool(text)

    def _show_string(self) -> None:
        self._show_note()
        text = self.control.connection_string(self.cache_id, reveal=self.revealed)
        set_text(self.query_one("#conn-string", Label), text)
        self.query_one("#reveal", Button).label = "s Hide" if self.revealed else "s Show"

    def action_close(self) -> None:
        self.dismiss(None)

    def action_reveal(self) -> None:
        self.revealed = not self.revealed
        self._show_string()

    @on(Select.Changed, "#database")
    @on(Select.Changed, "#role")
    def _choice_changed(self, event: Select.Changed) -> None:
        view = self._view()
        value = event.value
        if view is None or not isinstance(value, str):
            return
        is_database = event.select.id == "database"
        if value == (view.database if is_database else view.role):
            return  # the initial value being set, not a user's choice
        try:
            if is_database:
                self.control.select(self.cache_id, database=value)
            else:
                self.control.select(self.cache_id, role=value)
        except ControlError as error:
            self.notify(str(error), severity="error")
        self.refresh_data()  # the selects too: a tick may have shown the old choice meanwhile

    @on(Button.Pressed, "#reveal")
    def _reveal_pressed(self) -> None:
        self.action_reveal()

    @on(Button.Pressed, "#copy, #view, #purge, #remove")
    async def _action_pressed(self, event: Button.Pressed) -> None:
        action = {"copy": "copy", "view": "view_cache", "purge": "purge", "remove": "remove"}
        await self.app.run_action(action[event.button.id or ""])
