"""Number and text formatting shared by every screen, so one figure reads the same everywhere."""

from __future__ import annotations

from collections.abc import Sequence

from neonpoly.stats import HIT, MISS

DASH = "—"


def count(n: int) -> str:
    return f"{n:,}"


def plural(n: int, one: str, many: str) -> str:
    """`1 entry`, `2 entries`, `1,204 entries`: a count and its noun, agreed (no "1 entries")."""
    return f"{count(n)} {one if n == 1 else many}"


def percent(rate: float | None) -> str:
    """A hit rate in 0..1; None (nothing cacheable yet) reads as a dash, not as 0%."""
    return DASH if rate is None else f"{rate * 100:.0f}%"


def millis(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    ms = seconds * 1000
    if ms < 10:
        return f"{ms:.1f} ms"
    if ms < 10_000:
        return f"{ms:.0f} ms"
    return f"{seconds:.1f} s"


def duration(seconds: float) -> str:
    """Time saved: seconds under a minute, then minutes, then hours."""
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        minutes, secs = divmod(int(seconds), 60)
        return f"{minutes}m {secs:02d}s"
    hours, rest = divmod(int(seconds), 3600)
    return f"{hours}h {rest // 60:02d}m"


def size(n: int) -> str:
    value = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1000 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1000
    return f"{value:.1f} TB"  # pragma: no cover - loop always returns


def ttl(seconds: float | None) -> str:
    if seconds is None:
        return DASH
    return f"{seconds:.0f}s" if seconds < 600 else f"{seconds / 60:.0f}m"


def short_id(cache_id: str) -> str:
    """A UUID as the console shows it: enough to recognise, short enough for 80 columns."""
    plain = cache_id.replace("-", "")
    return cache_id if len(plain) <= 10 else f"{plain[:4]}…{plain[-4:]}"


def status_word(last_status: str, last_reason: str | None) -> str:
    """hit and miss both mean the template is cached; anything else is the taxonomy word."""
    if last_status in (HIT, MISS):
        return "cached"
    if last_reason and last_reason != last_status:
        return f"{last_status}: {last_reason}"
    return last_status or DASH


def tail(values: Sequence[int], seconds: int) -> list[float]:
    """The last `seconds` of a per-second series, as floats for the Sparkline widget."""
    return [float(v) for v in values[-seconds:]]


def ms_pair(hit_s: float | None, miss_s: float | None) -> str:
    """p50 hit vs miss in one cell, `0.2 / 4.8 ms`: the comparison is the point."""

    def one(seconds: float | None) -> str:
        if seconds is None:
            return DASH
        ms = seconds * 1000
        return f"{ms:.1f}" if ms < 100 else f"{ms:.0f}"

    return f"{one(hit_s)} / {one(miss_s)} ms"


def clip(text: str, width: int) -> str:
    """One line, at most `width` cells, with an ellipsis when cut."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(0, width - 1)] + "…"
