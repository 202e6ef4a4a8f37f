"""Cacheability score: a template whose entries die unread stops being captured.

Storing a miss costs the proxy its frames (copied as they pass), a key and a store write. It
pays off only if the entry is read before it goes: a template whose entries a write keeps
evicting first (90% reads + 10% UPDATEs of the same keys, with table-wide invalidation) only
burns CPU. PolyScale calls the fix a cacheability score; ours is per (cache, template):

* every stored entry is *unread* until it is served (`read`) or found gone on a lookup that
  misses (`wasted`: evicted, expired or pushed out before anyone read it);
* every `WINDOW` outcomes the template is judged: when fewer than `MIN_USEFUL` of its entries
  were read, it is not captured for `backoff` seconds (a miss with a reason, and no frames
  copied), then captured again to probe; each failed probe doubles the backoff up to
  `MAX_BACKOFF`, a good window resets it. So a template recovers when the write rate drops.

Bounds: at most `MAX_UNREAD` unread keys (a constructor parameter, so a test can prove the
bound without 65k keys) and `MAX_TEMPLATES` scores per cache (oldest forgotten first;
forgetting only loses evidence, never correctness).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable

WINDOW = 16
MIN_USEFUL = 0.25
FIRST_BACKOFF = 0.25
MAX_BACKOFF = 2.0
MAX_UNREAD = 65_536
MAX_TEMPLATES = 4096


class _Score:
    __slots__ = ("backoff", "read", "suppressed", "until", "wasted")

    def __init__(self) -> None:
        self.read = 0
        self.wasted = 0
        self.until = 0.0  # not captured before this time
        self.backoff = FIRST_BACKOFF
        self.suppressed = 0  # windows judged useless in a row


class Cacheability:
    """Per-template record of whether stored entries get read before they are evicted."""

    def __init__(self, clock: Callable[[], float], max_unread: int = MAX_UNREAD) -> None:
        self.clock = clock
        self.max_unread = max_unread
        # key -> template id of entries stored and not read yet (QueryCache.serves asks it first)
        self.unread: OrderedDict[bytes, str] = OrderedDict()
        self._scores: OrderedDict[str, _Score] = OrderedDict()
        # template id -> until (only those in backoff); read by QueryCache's per-miss questions
        self.suppressed: dict[str, float] = {}

    @property
    def suppressing(self) -> bool:
        return bool(self.suppressed)

    def capturing(self, template_id: str) -> bool:
        """May a miss of this template be captured now? (The hot question: one dict lookup.)"""
        until = self.suppressed.get(template_id)
        if until is None:
            return True
        if self.clock() >= until:
            del self.suppressed[template_id]  # probe again
            return True
        return False

    def stored(self, key: bytes, template_id: str) -> None:
        if key in self.unread:
            # Stored again while never read: the previous entry is gone unread.
            self._outcome(self.unread.pop(key), False)
        self.unread[key] = template_id
        if len(self.unread) > self.max_unread:
            self.unread.popitem(last=False)

    def served(self, key: bytes) -> None:
        template_id = self.unread.pop(key, None)
        if template_id is not None:
            self._outcome(template_id, True)

    def missed(self, key: bytes) -> None:
        """A lookup found nothing: an entry stored for this key and never read is gone."""
        template_id = self.unread.pop(key, None)
        if template_id is not None:
            self._outcome(template_id, False)

    def _outcome(self, template_id: str, read: bool) -> None:
        score = self._scores.get(template_id)
        if score is None:
            score = self._scores[template_id] = _Score()
            if len(self._scores) > MAX_TEMPLATES:
                old, _ = self._scores.popitem(last=False)
                self.suppressed.pop(old, None)
        else:
            self._scores.move_to_end(template_id)
        if read:
            score.read += 1
        else:
            score.wasted += 1
        if score.read + score.wasted < WINDOW:
            return
        if score.read < MIN_USEFUL * (score.read + score.wasted):
            score.until = self.clock() + score.backoff
            self.suppressed[template_id] = score.until
            score.backoff = min(score.backoff * 2, MAX_BACKOFF)
            score.suppressed += 1
        else:
            score.backoff = FIRST_BACKOFF
            score.suppressed = 0
        score.read = score.wasted = 0

    def explain(self, template_id: str) -> str | None:
        """Why misses of this template are not stored, or None when they are."""
        until = self.suppressed.get(template_id)
        if until is None:
            return None
        score = self._scores.get(template_id)
        left = max(0.0, until - self.clock())
        times = f" ({score.suppressed} windows in a row)" if score is not None and score.suppressed > 1 else ""
        return (
            f"not stored: its entries were evicted before anyone read them{times}; "
            f"probing again in {left:.0f}s"
        )

    def forget(self) -> None:
        self.unread.clear()
        self._scores.clear()
        self.suppressed.clear()

    def sizes(self) -> dict[str, int]:
        return {"unread": len(self.unread), "scores": len(self._scores), "suppressed": len(self.suppressed)}
