"""The neonpoly console: a Textual app over the `Control` facade (never the proxy itself)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, Protocol, runtime_checkable

from textual.app import App, SystemCommand
from textual.binding import Binding
from textual.screen import Screen
from textual.widgets import Input

from neonpoly.control.interface import Control, IntegrationView
from neonpoly.stats import TemplateStats
from neonpoly.tui import clipboard
from neonpoly.tui import format as fmt
from neonpoly.tui.screens.add_drawer import AddPolyScaleDrawer, describe_error
from neonpoly.tui.screens.cache_view import CacheViewScreen
from neonpoly.tui.screens.confirm import ConfirmModal
from neonpoly.tui.screens.help import HelpScreen
from neonpoly.tui.screens.integrations import IntegrationsScreen
from neonpoly.tui.screens.manage_drawer import ManagePolyScaleDrawer
from neonpoly.tui.screens.template_details import TemplateDetailsModal

REFRESH_SECONDS = 1.0


@runtime_checkable
class Refreshable(Protocol):
    def refresh_data(self) -> None: ...


class ConsoleApp(App[None]):
    """Owns the control's lifecycle (when asked to) and every cross-screen action."""

    TITLE = "neonpoly"
    CSS_PATH = ["app.tcss", "integrations.tcss", "drawers.tcss", "cache_view.tcss"]
    HORIZONTAL_BREAKPOINTS = [(0, "-narrow"), (100, "-wide")]
    BINDINGS = [
        Binding("question_mark", "help", "Help"),
        Binding("q", "quit", "Quit"),
        # Textual's ctrl+c only says how to quit; here it quits, as in every terminal tool,
        # from any screen (a priority binding: drawers and dialogs are modal, and a modal
        # screen hides the app's other bindings). Selected text is copied instead.
        Binding("ctrl+c", "interrupt", "Quit", show=False, priority=True),
    ]

    def __init__(
        self, control: Control, *, own_control: bool = True, refresh_seconds: float | None = REFRESH_SECONDS
    ) -> None:
        super().__init__()
        self.control = control
        # The CLI hands over a fresh control for the app to start and close; tests that
        # share one control across apps pass own_control=False.
        self.own_control = own_control
        self.refresh_seconds = refresh_seconds
        self.theme = "textual-dark"
        self._kept: dict[str, str] = {}  # installed screen name -> its cache id
        # The system clipboard tool, if this machine has one (see neonpoly.tui.clipboard).
        self.clipboard_command: Sequence[str] | None = clipboard.clipboard_command()

    def get_default_screen(self) -> Screen[None]:
        return IntegrationsScreen(self.control)

    async def on_mount(self) -> None:
        if self.own_control:
            try:
                await self.control.start()
            except Exception as error:  # a console without a proxy can still explain why
                self.notify(f"Proxy did not start: {describe_error(error)}", severity="error", timeout=30)
        if self.refresh_seconds:
            self.set_interval(self.refresh_seconds, self.refresh_views)
        self.refresh_views()

    async def on_unmount(self) -> None:
        if self.own_control:
            await self.control.close()

    def refresh_views(self) -> None:
        """Every screen on the stack re-reads the control (cheap reads, a few per second)."""
        for screen in self.screen_stack:
            if isinstance(screen, Refreshable) and screen.is_mounted:
                try:
                    screen.refresh_data()
                except Exception as error:  # one bad read must not kill the ticker
                    self.log.error(f"refresh failed: {describe_error(error)}")

    def integration(self) -> IntegrationView | None:
        views = self.control.integrations()
        return views[0] if views else None

    def _configured(self) -> IntegrationView | None:
        view = self.integration()
        if view is None:
            self.notify("PolyScale is not added yet: press a to add it.", severity="warning")
        return view

    # -- screens ---------------------------------------------------------------------------
    #
    # The Manage drawer and the cache view are composed once per cache and kept installed
    # (re-showing one costs a few ms, composing it ~80 ms). Textual removes a popped screen
    # from the DOM only if it is not installed at that moment; `uninstall_screen` merely
    # forgets the name. So a kept screen popped while installed stays mounted off the stack
    # until it is removed explicitly: `_release_kept` does that, after every pop has finished.

    async def _back_to_page(self) -> None:
        """Pop every screen above the Integrations page and wait until each pop is done."""
        while len(self.screen_stack) > 1 and not isinstance(self.screen, IntegrationsScreen):
            await self.pop_screen()

    async def _pop_to(self, screen: Screen[Any]) -> None:
        while self.screen is not screen and screen in self.screen_stack:
            await self.pop_screen()

    def _kept_screen(self, kind: str, cache_id: str, make: Callable[[], Screen[None]]) -> Screen[None]:
        name = f"{kind}-{cache_id}"
        if not self.is_screen_installed(name):
            self.install_screen(make(), name)
            self._kept[name] = cache_id
        return self.get_screen(name)

    async def _release_kept(self, *, also: str | None = None) -> None:
        """Uninstall and remove the kept screens of caches that are gone (and of `also`, a
        cache id about to be shown anew), except those still on the stack: those are
        released by a later call, once popped."""
        alive = {view.cache_id for view in self.control.integrations()} - {also}
        for name, cache_id in list(self._kept.items()):
            if cache_id in alive:
                continue
            screen = self.get_screen(name)
            if screen in self.screen_stack:
                continue
            self.uninstall_screen(name)
            del self._kept[name]
            await screen.remove()

    def _manage_drawer(self, cache_id: str) -> ManagePolyScaleDrawer:
        screen = self._kept_screen("manage", cache_id, lambda: ManagePolyScaleDrawer(self.control, cache_id))
        assert isinstance(screen, ManagePolyScaleDrawer)
        return screen

    def _cache_view(self, view: IntegrationView) -> CacheViewScreen:
        screen = self._kept_screen(
            "cache", view.cache_id, lambda: CacheViewScreen(self.control, view.cache_id, view.name)
        )
        assert isinstance(screen, CacheViewScreen)
        return screen

    # -- actions (keys on every screen, and the command palette) ------------------------

    async def action_add(self) -> None:
        if self.integration() is not None:
            self.notify("PolyScale is already added: opening Manage.")
            await self.action_manage()
            return
        if isinstance(self.screen, AddPolyScaleDrawer):
            return
        await self._back_to_page()
        await self._release_kept()
        self.push_screen(AddPolyScaleDrawer(self.control), self._added)

    async def _added(self, view: IntegrationView | None) -> None:
        if view is None:
            return
        self.refresh_views()
        self.notify(f"PolyScale added: cache {view.name} is ready.", severity="information")
        await self._back_to_page()
        await self._release_kept(also=view.cache_id)  # a new cache never shows an old screen
        await self._show_manage(view)

    async def _show_manage(self, view: IntegrationView) -> None:
        drawer = self._manage_drawer(view.cache_id)
        if drawer in self.screen_stack:  # under the cache view opened from it: back to it
            await self._pop_to(drawer)
            return
        await self._back_to_page()
        await self._release_kept()
        drawer.opened()
        self.push_screen(drawer)

    async def action_manage(self) -> None:
        view = self._configured()
        if view is None or isinstance(self.screen, ManagePolyScaleDrawer):
            return
        await self._show_manage(view)

    async def action_view_cache(self) -> None:
        view = self._configured()
        if view is None or isinstance(self.screen, CacheViewScreen):
            return
        top = self.screen
        if not (isinstance(top, ManagePolyScaleDrawer) and top.cache_id == view.cache_id):
            await self._back_to_page()
        # Opened from the Manage drawer, the view stacks over it: esc goes back to the drawer.
        await self._release_kept()
        self.push_screen(self._cache_view(view))

    def copy_to_clipboard(self, text: str) -> None:
        """Textual's copy (`app.clipboard`, and OSC 52 for a terminal that takes it), plus
        the system clipboard when there is one (text selected with the mouse, ctrl+c)."""
        super().copy_to_clipboard(text)
        if self.clipboard_command is not None:
            self.run_worker(self._system_copy(text), group="clipboard", exit_on_error=False)

    async def _system_copy(self, text: str) -> bool:
        command = self.clipboard_command
        if command is None:
            return False
        # The tool may take a moment (or hang on a dead display): never on the app's loop.
        return await asyncio.to_thread(clipboard.copy_with, command, text)

    def action_copy(self) -> None:
        view = self._configured()
        if view is None:
            return
        # The copied string carries the password: a masked one would not connect.
        text = self.control.connection_string(view.cache_id, reveal=True)
        self.run_worker(self._copy_string(view, text), group="clipboard", exit_on_error=False)

    async def _copy_string(self, view: IntegrationView, text: str) -> None:
        what = f"the connection string for {view.database} as {view.role}"
        super().copy_to_clipboard(text)  # OSC 52 in any case: over SSH it is the only way
        if await self._system_copy(text):
            assert self.clipboard_command is not None
            self.notify(f"Copied {what} to the clipboard ({clipboard.tool_name(self.clipboard_command)}).")
            return
        # Whether the terminal took the OSC 52 sequence cannot be known: say what was done.
        screen = self.screen
        if isinstance(screen, ManagePolyScaleDrawer):
            where = "select the string shown" if screen.revealed else "press s and select the string shown"
        else:
            where = "open Manage (m), press s and select the string shown"
        self.notify(
            f"Sent {what} to the terminal clipboard (OSC 52); if nothing was copied, {where}.",
            timeout=10,
        )

    def action_purge(self) -> None:
        view = self._configured()
        if view is None:
            return
        self._confirm(
            ConfirmModal(
                "Purge PolyScale cache",
                f"Purge every cached result of {view.name}? This purges all cached "
                "data globally; the next queries go to the database.",
                "Purge",
            ),
            lambda: self._purge(view),
        )

    async def _purge(self, view: IntegrationView) -> None:
        purged = await self.control.purge(view.cache_id)
        self.notify(f"Purged {fmt.plural(purged, 'entry', 'entries')}.")
        self.refresh_views()

    def _highlighted(self) -> tuple[CacheViewScreen, TemplateStats] | None:
        """The cache view on top and its highlighted template, or a note saying why not."""
        screen = self.screen
        if not isinstance(screen, CacheViewScreen):
            self.notify("Open the cache view (v) and highlight a query first.", severity="warning")
            return None
        stats = screen.highlighted()
        if stats is None:
            self.notify("No query templates yet.", severity="warning")
            return None
        return screen, stats

    def action_purge_template(self) -> None:
        found = self._highlighted()
        if found is None:
            return
        screen, stats = found
        self._confirm(
            ConfirmModal(
                "Purge query template",
                f"Purge the cached results of this query in {screen.cache_name}? Other queries "
                f"stay cached.\n\n{fmt.clip(stats.template, 160)}",
                "Purge",
            ),
            lambda: self._purge_template(screen.cache_id, stats.template_id),
        )

    async def _purge_template(self, cache_id: str, template_id: str) -> None:
        purged = await self.control.purge_template(cache_id, template_id)
        self.notify(f"Purged {fmt.plural(purged, 'entry', 'entries')} of this query.")
        self.refresh_views()

    def action_template_details(self) -> None:
        found = self._highlighted()
        if found is not None:
            self.push_screen(TemplateDetailsModal(found[1]))

    def action_remove(self) -> None:
        view = self._configured()
        if view is None:
            return
        self._confirm(
            ConfirmModal(
                "Remove integration",
                f"Remove PolyScale? This deletes the cache {view.name} and terminates "
                "all current connections using the PolyScale connection string.",
                "Remove",
            ),
            lambda: self._remove(view),
        )

    async def _remove(self, view: IntegrationView) -> None:
        ended = await self.control.remove(view.cache_id)
        await self._back_to_page()
        await self._release_kept(also=view.cache_id)
        self.refresh_views()
        self.notify(
            f"Removed PolyScale: deleted cache {view.name}, ended {fmt.plural(ended, 'connection', 'connections')}."
        )

    def _confirm(self, modal: ConfirmModal, then: Callable[[], Awaitable[None]]) -> None:
        def answered(yes: bool | None) -> None:
            if yes:
                self.run_worker(self._guarded(then), group="control", exit_on_error=False)

        self.push_screen(modal, answered)

    async def _guarded(self, then: Callable[[], Awaitable[None]]) -> None:
        try:
            await then()
        except Exception as error:  # shown as a notification, never a traceback
            self.notify(describe_error(error), severity="error", timeout=10)

    def action_interrupt(self) -> None:
        focused = self.focused
        selected = focused.selected_text if isinstance(focused, Input) else None
        selected = selected or self.screen.get_selected_text()
        if selected:
            self.copy_to_clipboard(selected)
            return
        self.exit()

    def action_help(self) -> None:
        if not isinstance(self.screen, HelpScreen):
            self.push_screen(HelpScreen())

    def get_system_commands(self, screen: Screen[object]) -> Iterable[SystemCommand]:
        yield from super().get_system_commands(screen)
        yield SystemCommand("Add PolyScale", "Add the PolyScale integration (a)", self.action_add)
        yield SystemCommand("Manage PolyScale", "Open the Manage PolyScale drawer (m)", self.action_manage)
        yield SystemCommand("View cache", "Live hit rate and per-template stats (v)", self.action_view_cache)
        yield SystemCommand("Purge cache", "Purge all cached data (p; P in the cache view)", self.action_purge)
        if isinstance(screen, CacheViewScreen):  # both act on the highlighted row
            yield SystemCommand(
                "Purge query template", "Purge the highlighted query's cached results (p)", self.action_purge_template
            )
            yield SystemCommand(
                "Query details", "Full template, latencies and status of the highlighted query (enter)",
                self.action_template_details,
            )
        yield SystemCommand("Remove integration", "Delete the cache, end its connections (r)", self.action_remove)
        yield SystemCommand("Copy connection string", "Copy the PolyScale string (c)", self.action_copy)
        yield SystemCommand("Help", "Every key of the console (?)", self.action_help)


def run_tui(control: Control) -> None:
    """Run the console in this terminal; it starts the control's proxy and closes it on exit."""
    ConsoleApp(control).run()
