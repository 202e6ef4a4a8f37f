"""What a session hands its cache about one request once the response is complete.

A `Capture` is a miss whose response may be stored (`QueryCache.store_capture`); a
`StatTicket` what the statistics count for it (`QueryCache.record`). The session fills
them in (proxy/), the cache consumes them: they live here so that the cache never
reaches up into the proxy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from neonpoly.cache.invalidation import GenerationStamp
from neonpoly.stats import HitTally


@dataclass(slots=True)
class Capture:
    """A miss whose response may be stored once it completes cleanly."""

    key: bytes
    database: str
    tables: frozenset[str]
    template_id: str
    stamp: GenerationStamp
    frames: list[bytes] = field(default_factory=list)
    size: int = 0
    failed: bool = False  # an ErrorResponse/COPY/suspended portal: never store


# Not frozen: one is made for every request, and a frozen dataclass's __init__ (one
# object.__setattr__ per field) costs four times a plain one's. Nothing changes it once made.
@dataclass(slots=True)
class StatTicket:
    """What the stats need to know about a request once its response is complete."""

    template_id: str
    template: str
    tables: tuple[str, ...]
    status: str
    reason: str = ""  # why it is not a hit or miss, in words
    # A plain miss's tally (QueryCache.miss_ticket: one ticket per template, shared by every
    # request of it, never changed): counted there in a few int operations. None: recorded in full.
    tally: HitTally | None = None
