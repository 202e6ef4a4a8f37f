"""The connection string as the Manage drawer shows it: broken only between its parts.

A URL has no spaces, so a plain label folds it wherever the width ends ("applicati" / "on_name");
selecting such a string in the terminal gives pieces cut mid-word. Here a line ends only after
the `@`, or before the path, `?` or `&`, so every line is a whole part of the string, and a
selection made with the console's own mouse selection is copied without the line breaks.
"""

from __future__ import annotations

from textual.content import Content
from textual.geometry import Size
from textual.selection import Selection
from textual.widgets import Label


def url_parts(text: str) -> list[str]:
    """`postgres://user:pw@` · `host:port` · `/db` · `?a=1` · `&b=2`: the pieces a line may
    end between. Joined, they are `text` again."""
    scheme_end = text.find("://")
    authority_start = scheme_end + 3 if scheme_end >= 0 else 0
    breaks: set[int] = set()
    at = text.rfind("@", authority_start, _path_start(text, authority_start))
    if at >= 0:
        breaks.add(at + 1)
    path = _path_start(text, authority_start)
    if path < len(text):
        breaks.add(path)
    for index in range(path, len(text)):
        if text[index] in "?&":
            breaks.add(index)
    parts: list[str] = []
    start = 0
    for cut in sorted(breaks):
        if 0 < cut < len(text) and cut > start:
            parts.append(text[start:cut])
            start = cut
    parts.append(text[start:])
    return [part for part in parts if part]


def _path_start(text: str, authority_start: int) -> int:
    ends = [i for i in (text.find(c, authority_start) for c in "/?") if i >= 0]
    return min(ends) if ends else len(text)


def wrap_parts(text: str, width: int) -> list[str]:
    """Lines of at most `width` cells, broken between parts; a part longer than a line is
    folded (nothing else fits)."""
    if width <= 0:
        return [text]
    lines: list[str] = []
    line = ""
    for part in url_parts(text):
        if len(line) + len(part) <= width:
            line += part
            continue
        if line:
            lines.append(line)
        while len(part) > width:
            lines.append(part[:width])
            part = part[width:]
        line = part
    if line or not lines:
        lines.append(line)
    return lines


class ConnectionString(Label):
    """A Label whose `content` is the whole string; it renders wrapped between parts."""

    def _lines(self, width: int) -> list[str]:
        return wrap_parts(str(self.content), width)

    def get_content_height(self, container: Size, viewport: Size, width: int) -> int:
        return len(self._lines(width))

    def render(self) -> Content:
        return Content("\n".join(self._lines(self.content_region.width)))

    def get_selection(self, selection: Selection) -> tuple[str, str] | None:
        text = "\n".join(self._lines(self.content_region.width))
        return selection.extract(text).replace("\n", ""), "\n"
