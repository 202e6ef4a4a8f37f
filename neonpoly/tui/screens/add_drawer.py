"""The Add PolyScale drawer: How to add → 1 Sign in → 2 Workspace → 3 Authorize Access."""

from __future__ import annotations

import asyncio

from textual import on
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal
from textual.reactive import reactive
from textual.screen import ModalScreen
from textual.widgets import Button, Footer, Input, Label, Select

from neonpoly.control.interface import Control, ControlError, IntegrationView, SignInResult
from neonpoly.tui.widgets.scroll import Scroll

INTRO = "PolyScale caches your data globally for low-latency reads. No code changes: swap the connection string."
# What gets cached depends on the origin, known once signed in.
NOTES = {
    None: "With Neon, it caches the read-write compute endpoint of the primary branch; "
    "without a key, your local PostgreSQL.",
    "neon": "It caches the read-write compute endpoint of the primary branch.",
    "local": "It caches your local PostgreSQL: no Neon account is involved.",
}
ACCOUNTS = {"neon": "Signed in as {account}", "local": "Local origin: no sign-in needed"}

STEPS = {1: "Sign in", 2: "Choose workspace", 3: "Authorize access"}
HINTS = {
    None: {1: "  (Neon API key / local)", 2: "", 3: ""},
    "neon": {1: "  (Neon API key)", 2: "", 3: ""},
    "local": {1: "  (local origin)", 2: "", 3: ""},
}
NO_WORKSPACE = ""  # the Select's value until a workspace can be chosen (never a blank)


def describe_error(error: BaseException) -> str:
    """ControlError is already worded for users; anything else gets its type for a bug report."""
    if isinstance(error, ControlError):
        return str(error)
    return f"{type(error).__name__}: {error}"


class AddPolyScaleDrawer(ModalScreen[IntegrationView | None]):
    """Docked right over the Integrations page; dismisses with the new integration."""

    # enter is a priority binding so the footer can name what it does (Sign in, then
    # Authorize): the focused Input's and Button's own enter bindings are hidden ones, and the
    # footer shows the first binding of a key along the focus chain. `check_action` turns it
    # off where enter means something else (the Workspace Select and its menu).
    BINDINGS = [
        Binding("escape", "close", "Close"),
        # q closes the drawer as on every screen; typed into the key box it is a letter.
        Binding("q", "close", "Close", show=False),
        # A modal screen hides the app's bindings: help is wanted here too.
        Binding("question_mark", "app.help", "Help", show=False),
        Binding("enter", "sign_in", "Sign in", key_display="enter", priority=True),
        Binding("enter", "authorize", "Authorize", key_display="enter", priority=True),
        Binding("tab", "app.focus_next", "Next"),
    ]

    # A step running dims enter in the footer (see check_action), so the footer must re-ask.
    busy: reactive[bool] = reactive(False, bindings=True)

    def __init__(self, control: Control) -> None:
        super().__init__(classes="drawer-screen")
        self.control = control
        self.step = 1
        self.signed_in: SignInResult | None = None
        self._progress_lines: list[str] = []

    def compose(self) -> ComposeResult:
        with Scroll(id="drawer", classes="drawer"):
            with Horizontal(classes="drawer-title"):
                yield Label("Add PolyScale", classes="title")
                yield Label("esc Close", classes="hint")
            yield Label(INTRO, classes="intro")
            yield Label("How to add", classes="subtitle")
            yield Label(id="step-1", classes="step")
            yield Input(
                placeholder="Neon API key (empty: $NEON_API_KEY, or local)",
                password=True,
                id="api-key",
                compact=True,
            )
            yield Label(id="account", classes="muted")
            yield Label(id="step-2", classes="step")
            # Never blank: a blank choice made Authorize a silent no-op. Until signed in, the
            # one option says what to do first.
            yield Select[str](
                [("sign in first", NO_WORKSPACE)],
                id="workspace",
                compact=True,
                allow_blank=False,
                disabled=True,
            )
            yield Label(id="step-3", classes="step")
            yield Label(id="progress", classes="progress")
            yield Label(id="error", classes="error")
            yield Label(NOTES[None], id="note", classes="muted note")
            with Horizontal(classes="buttons"):
                yield Button("Sign in", id="sign-in", compact=True, variant="primary")
                yield Button("Authorize Access", id="authorize", compact=True, disabled=True)
        # A drawer is modal: without its own footer the page's keys (a Add, m Manage) show.
        yield Footer()

    def on_mount(self) -> None:
        self._show_steps()
        # Typing the key is the first thing to do; enter on an empty box still signs in.
        self.query_one("#api-key", Input).focus()

    def _show_steps(self) -> None:
        mode = self.signed_in.mode if self.signed_in else None
        hints = HINTS[mode]
        if self._upstream(mode):
            hints = {**hints, 1: "  (--upstream URL)"}
        for number, title in STEPS.items():
            label = self.query_one(f"#step-{number}", Label)
            marker = "✓" if number < self.step else ("●" if number == self.step else "○")
            label.update(f" {number} {marker} {title}{hints[number]}")
            label.set_class(number < self.step, "-done")
            label.set_class(number == self.step, "-active")
        self.query_one("#note", Label).update(self._note(mode))
        # The primary style marks the next thing to do: Sign in, then Authorize (or Retry).
        self.query_one("#sign-in", Button).variant = "primary" if self.step == 1 else "default"
        self.query_one("#authorize", Button).variant = "primary" if self.step > 1 else "default"

    def _set_error(self, message: str) -> None:
        error = self.query_one("#error", Label)
        error.update(message)
        error.display = bool(message)

    def check_action(self, action: str, parameters: tuple[object, ...]) -> bool | None:
        if action not in ("sign_in", "authorize"):
            return True
        focused = self.focused.id if self.focused is not None else None
        wanted = ("api-key", "sign-in") if action == "sign_in" else ("authorize",)
        if focused not in wanted:
            return False  # not shown, and enter goes to the focused widget as usual
        return None if self.busy else True  # shown dimmed while a step runs

    def action_sign_in(self) -> None:
        if self.focused is not None and self.focused.id == "sign-in":
            # Through the Button, so enter looks like a press and is ignored mid-press as a
            # click would be.
            self.query_one("#sign-in", Button).action_press()
        else:
            self._sign_in_pressed()

    def action_authorize(self) -> None:
        self.query_one("#authorize", Button).action_press()

    def action_close(self) -> None:
        if self.busy:
            # Leaving mid-authorize would orphan a half-made cache; finish or fail first.
            self.notify("Authorizing… wait for it to finish.", severity="warning")
            return
        self.dismiss(None)

    # -- 1 sign in -----------------------------------------------------------------------

    @on(Input.Submitted, "#api-key")
    @on(Button.Pressed, "#sign-in")
    def _sign_in_pressed(self) -> None:
        if self.busy:
            return
        key = self.query_one("#api-key", Input).value.strip() or None
        self.run_worker(self._sign_in(key), group="add-drawer", exclusive=True, exit_on_error=False)

    def _upstream(self, mode: str | None) -> bool:
        """Signed in to a `--upstream URL` origin (its host:port is the account)."""
        return mode == "local" and self.signed_in is not None and self.signed_in.account != "local"

    def _note(self, mode: str | None) -> str:
        if self._upstream(mode) and self.signed_in is not None:
            # `--upstream URL`: any PostgreSQL, maybe on another machine, not "your local" one.
            return f"It caches the PostgreSQL at {self.signed_in.account} (--upstream): no Neon account is involved."
        return NOTES[mode]

    async def _sign_in(self, key: str | None) -> None:
        self.busy = True
        self._set_error("")
        self.query_one("#account", Label).update("Signing in…")
        try:
            result = await self.control.sign_in(key)
        except Exception as error:  # any failure is shown inline, never as a traceback
            self.query_one("#account", Label).update("")
            self._set_error(f"Sign in failed: {describe_error(error)}")
            # Back in the key box: the usual fix is a corrected key, and enter retries.
            self.query_one("#api-key", Input).focus()
            return
        finally:
            self.busy = False
        self.signed_in = result
        account = ACCOUNTS[result.mode].format(account=result.account)
        if result.mode == "local" and result.account != "local":
            account = f"Origin {result.account} (--upstream): no sign-in needed"
        self.query_one("#account", Label).update(account)
        select = self.query_one("#workspace", Select)
        authorize = self.query_one("#authorize", Button)
        self.step = 2
        self._show_steps()
        if not result.workspaces:
            select.set_options([("no workspace", NO_WORKSPACE)])
            select.disabled = authorize.disabled = True
            self._set_error("This account has no workspace to add PolyScale to.")
            return
        # The first workspace is chosen for the user: Authorize works straight away.
        select.set_options([(name, name) for name in result.workspaces])
        select.disabled = authorize.disabled = False
        authorize.focus()

    # -- 3 authorize ----------------------------------------------------------------------

    @on(Button.Pressed, "#authorize")
    def _authorize_pressed(self) -> None:
        if self.busy:
            return
        workspace = self.query_one("#workspace", Select).value
        if not isinstance(workspace, str) or workspace == NO_WORKSPACE:
            # Say what is missing rather than do nothing.
            self._set_error("Choose a workspace first (step 2).")
            return
        self.run_worker(self._authorize(workspace), group="add-drawer", exclusive=True, exit_on_error=False)

    def _progress(self, line: str) -> None:
        # The facade may report from a thread; widgets must only be touched on the app's loop.
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.app.call_from_thread(self._append_progress, line)
        else:
            self._append_progress(line)

    def _append_progress(self, line: str) -> None:
        self._progress_lines.append(line)
        # Only the last few lines fit at 80x24; older ones have been done already.
        shown = self._progress_lines[-3:]
        text = "\n".join(f"   ✓ {done}" for done in shown[:-1])
        text = f"{text}\n   … {shown[-1]}" if text else f"   … {shown[-1]}"
        self.query_one("#progress", Label).update(text)

    async def _authorize(self, workspace: str) -> None:
        self.busy = True
        self._progress_lines = []
        self._set_error("")
        self.step = 3
        self._show_steps()
        buttons = (self.query_one("#sign-in", Button), self.query_one("#authorize", Button))
        for button in buttons:
            button.disabled = True
        try:
            view = await self.control.add(workspace, self._progress)
        except Exception as error:  # inline, with the button relabelled for a retry
            self._set_error(f"{describe_error(error)} — press Retry to try again.")
            authorize = self.query_one("#authorize", Button)
            authorize.label = "Retry"
            for button in buttons:
                button.disabled = False
            authorize.focus()
            # At 80x24 the error and Retry sit below the fold; bring them into view.
            self.query_one("#drawer").scroll_end(animate=False)
            return
        finally:
            self.busy = False
        self.dismiss(view)
