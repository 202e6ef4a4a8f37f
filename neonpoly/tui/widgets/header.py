"""The breadcrumb header every screen carries: where we are and whether the proxy runs."""

from __future__ import annotations

from textual.app import ComposeResult
from textual.containers import Horizontal
from textual.widgets import Label

from neonpoly.control.interface import HeaderInfo
from neonpoly.tui.widgets import set_text


def breadcrumbs(info: HeaderInfo, page: str) -> str:
    """`neonpoly ▸ shop (aws-us-east-2) ▸ branch main (primary) ▸ Integrations`, or local."""
    parts = ["neonpoly"]
    if info.branch is None:
        parts.append(info.project or "local")
    else:
        project = f"{info.project} ({info.region})" if info.region else info.project
        parts.append(project)
        parts.append(f"branch {info.branch} (primary)")
    parts.append(page)
    return " ▸ ".join(parts)


class ConsoleHeader(Horizontal):
    """Two labels: crumbs on the left, proxy state on the right (coloured by a class)."""

    def __init__(self, page: str) -> None:
        super().__init__(id="console-header")
        self.page = page

    def compose(self) -> ComposeResult:
        yield Label(id="crumbs")
        yield Label(id="proxy-state")

    def show(self, info: HeaderInfo) -> None:
        set_text(self.query_one("#crumbs", Label), breadcrumbs(info, self.page))
        state = self.query_one("#proxy-state", Label)
        set_text(state, f"proxy ● {info.listen}" if info.running else f"proxy ○ {info.listen}")
        state.set_class(info.running, "-running")
        state.set_class(not info.running, "-stopped")
