"""Number and text formatting shared by every screen, so one figure reads the same everywhere."""

from __future__ import annotations

import re
from collections.abc import Sequence

from neonpoly.control.interface import Freshness
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
    """Time saved: ms under a second (a local hit saves ms, not "0.0 s"), seconds under a
    minute, then minutes, then hours."""
    if seconds < 1:
        ms = max(0.0, seconds) * 1000
        if ms == 0:
            return "0 ms"
        return f"{ms:.1f} ms" if ms < 10 else f"{ms:.0f} ms"
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


# The status column: what the template is, in words (at most STATUS_WIDTH cells). A hit or a
# miss says the template is cacheable, not that an entry is stored now (it may have expired or
# been purged): hence "cacheable", never "cached".
STATUS_WORDS: dict[str, str] = {
    HIT: "cacheable",
    MISS: "cacheable",
    "uncacheable": "not cacheable",
    "multiplestatements": "multi-statement",
    "notaquery": "not a query",
    "parseerror": "parse error",
    "transaction": "in transaction",
    "volatile": "volatile",
    "oversizedresult": "too large",
    "disabled": "caching off",
    "bypass": "bypassed",
}

# What a status means, for when the engine gives no reason of its own (or one that only
# repeats the status).
STATUS_EXPLANATIONS: dict[str, str] = {
    HIT: "the last call was a hit: answered from the cache",
    MISS: "the last call was a miss: answered by the database, then stored",
    "uncacheable": "this kind of statement is never cached",
    "multiplestatements": "several statements in one query string are never cached",
    "notaquery": "not a query (session or transaction control, or a utility statement)",
    "parseerror": "the proxy could not parse it, so it goes to the database as is",
    "transaction": "sent inside a transaction, where a cached result could be wrong",
    "volatile": "its result may change without any write",
    "oversizedresult": "the result is too large to store",
    "disabled": "caching is off for it (a rule says never, or the cache's mode is off)",
    "bypass": "the session was in a state the cache does not serve",
}


def status_word(last_status: str, last_reason: str | None = None) -> str:
    """The status column: `cacheable`, `not cacheable`, `volatile`, … (never the reason,
    which the details card gives in full)."""
    if not last_status:
        return DASH
    return STATUS_WORDS.get(last_status, last_status)


def _plain(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "", text.lower())


def own_reason(last_status: str, last_reason: str | None) -> str | None:
    """The engine's reason when it says more than the status does: not one that repeats it,
    whole ("uncacheable") or around a restatement ("not cacheable (uncacheable)")."""
    if not last_reason:
        return None
    words = {_plain(last_status), _plain(status_word(last_status)), "notcacheable", "uncacheable"}
    reason = last_reason.strip()
    # "… (uncacheable)" and "uncacheable: …" carry the status word around the real reason.
    reason = re.sub(r"\s*\(([^()]*)\)\s*$", lambda m: "" if _plain(m.group(1)) in words else m.group(0), reason)
    head, sep, rest = reason.partition(":")
    if sep and _plain(head) in words:
        reason = rest.strip()
    if _plain(reason) in words or not _plain(reason):
        return None
    return reason


def status_explanation(last_status: str, last_reason: str | None) -> str:
    """Why the template has its status, as a phrase: the engine's reason if it has one of
    its own, else what the status means."""
    return own_reason(last_status, last_reason) or STATUS_EXPLANATIONS.get(last_status, DASH)


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


def ago(seconds: float) -> str:
    """How long ago, coarse on purpose (a live line must not flicker every frame)."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s ago"
    if seconds < 3600:
        return f"{seconds // 60:.0f} min ago"
    return f"{seconds // 3600:.0f} h ago"


def freshness(fresh: Freshness | None, now: float) -> str:
    """What keeps the cache fresh besides the writes it relays: the origin's change feed.

    "change feed on (lag 1 ms) · 3 changes caught · last 12 s ago · slot neonpoly_…", or why it
    is off.
    """
    if fresh is None:
        return DASH
    if not fresh.feed:
        return "writes through neonpoly only"
    parts = [f"change feed {fresh.feed}"]
    if fresh.following or fresh.changes:
        parts.append(plural(fresh.changes, "change caught", "changes caught"))
    if fresh.ddl:
        parts.append(plural(fresh.ddl, "DDL", "DDL"))
    if fresh.gaps:
        parts.append(plural(fresh.gaps, "gap", "gaps"))
    if fresh.last_change is not None:
        parts.append(f"last {ago(now - fresh.last_change)}")
    if fresh.plane != "off":  # shared with other nodes or workers (`serve --redis`, `--workers`)
        parts.append(f"plane {fresh.plane}")
    if fresh.following and fresh.slot:
        # Last: the slot's name matters least, and at 80 columns the line is cut at the end.
        parts.append(f"slot {fresh.slot}")
    return " · ".join(parts)
