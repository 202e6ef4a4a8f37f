"""Cache rules and modes (PolyScale's), persisted as TOML, and the TTL policy built on them.

A cache runs in one of three modes:

* ``auto``  - every cacheable query is cached; its TTL is learned (`AdaptiveTTL`), bounded
  above by the cache's configured TTL, or by the change feed's longer one while the origin's
  change feed follows every table the query reads (`RulePolicy.feed_ttl`; adaptive.py says why);
* ``fixed`` - every cacheable query is cached with the cache's configured TTL;
* ``off``   - nothing is cached except what a TTL rule names (PolyScale's "manual" mode).

Rules name a table or a query template and say "TTL n seconds" or "never". For one query:

1. a "never" rule on its template or on any of its tables wins over everything;
2. else a TTL rule on its template decides;
3. else every table contributes a TTL (its rule's, or the mode's automatic TTL) and the
   lowest wins — in ``off`` mode a table without a rule makes the query uncached.

`RulePolicy` is the `TTLPolicy` a `QueryCache` consults for every cacheable query, so a rule
change applies to running sessions at the next query. It only does dict lookups.
"""

from __future__ import annotations

import os
import time
import tomllib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Protocol

import tomli_w

Mode = Literal["auto", "fixed", "off"]
MODES: tuple[Mode, ...] = ("auto", "fixed", "off")
Target = Literal["table", "query"]
RULES_FILE = "rules.toml"


def normalize_table(name: str) -> str:
    """A table name as the policy reports it: no schema, unquoted names lower-cased.

    The classifier's `tables_read` are bare names ('items' for `public.Items`, 'MyTab' for
    `"MyTab"`), and entries are tagged with them, so rules must use the same spelling.
    """
    parts: list[str] = []
    current: list[str] = []
    quoted = False
    for ch in name.strip():
        if ch == '"':
            quoted = not quoted
            current.append(ch)
        elif ch == "." and not quoted:
            parts.append("".join(current))
            current = []
        else:
            current.append(ch)
    parts.append("".join(current))
    last = parts[-1].strip()
    if len(last) >= 2 and last.startswith('"') and last.endswith('"'):
        return last[1:-1].replace('""', '"')
    return last.lower()


def bare_tables(qualified: Iterable[str]) -> list[str]:
    """Stats keep tables as written ('other.items', 'MyTab'); rules and entries use the bare
    name with the classifier's casing, so only the schema is dropped here."""
    return [name.rpartition(".")[2] for name in qualified]


@dataclass(frozen=True, slots=True)
class Rule:
    id: str
    target: Target
    name: str  # normalized table name, or a template id
    ttl: float | None  # None: never cache
    cache_id: str | None = None  # None: every cache
    created_at: float = 0.0

    @property
    def action(self) -> str:
        return "never" if self.ttl is None else "ttl"

    def applies_to(self, cache_id: str) -> bool:
        return self.cache_id is None or self.cache_id == cache_id


class RuleError(ValueError):
    """A rule or mode the user asked for that cannot be (bad TTL, unknown id)."""


class RuleBook:
    """Rules and modes of every cache, saved to `<state dir>/rules.toml` on each change."""

    def __init__(self, path: Path | None = None, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.default_mode: Mode = "auto"
        self.modes: dict[str, Mode] = {}
        self._rules: dict[str, Rule] = {}
        self._next_id = 1
        self.version = 0  # bumped on every change: memoised decisions compare it
        # Indexes the policy reads per query: (target, name) -> rules for any cache.
        self._index: dict[tuple[Target, str], list[Rule]] = {}
        self.listeners: list[Callable[[], None]] = []
        if path is not None and path.exists():
            self._load(path)

    @classmethod
    def in_dir(cls, root: Path) -> RuleBook:
        return cls(root / RULES_FILE)

    # --- reading -------------------------------------------------------------------------

    def rules(self) -> list[Rule]:
        return sorted(self._rules.values(), key=lambda r: int(r.id[1:]) if r.id[1:].isdigit() else 0)

    def get(self, rule_id: str) -> Rule | None:
        return self._rules.get(rule_id.lower())

    def mode(self, cache_id: str) -> Mode:
        return self.modes.get(cache_id, self.default_mode)

    def matching(self, target: Target, name: str, cache_id: str) -> Rule | None:
        """The rule for one table/template in one cache; a cache-specific rule beats a global
        one, and among equals "never" beats the lowest TTL."""
        found = self._index.get((target, name))
        if not found:
            return None
        best: Rule | None = None
        for rule in found:
            if not rule.applies_to(cache_id):
                continue
            if best is None or _stronger(rule, best):
                best = rule
        return best

    # --- changing ------------------------------------------------------------------------

    def add(self, target: Target, name: str, ttl: float | None, cache_id: str | None = None) -> Rule:
        if ttl is not None and not (ttl > 0 and ttl < 10 * 365 * 86400):
            raise RuleError(f"TTL must be a positive number of seconds, not {ttl:g}")
        key = normalize_table(name) if target == "table" else name.strip().lower()
        if not key:
            raise RuleError("a rule needs a table name or a template id")
        rule = Rule(f"r{self._next_id}", target, key, ttl, cache_id, self.clock())
        self._next_id += 1
        self._rules[rule.id] = rule
        self._reindex()
        self._changed()
        return rule

    def drop(self, rule_id: str) -> Rule:
        rule = self._rules.pop(rule_id.strip().lower(), None)
        if rule is None:
            raise RuleError(f'no rule "{rule_id}" (SHOW RULES lists them)')
        self._reindex()
        self._changed()
        return rule

    def set_mode(self, mode: str, cache_id: str | None = None) -> None:
        m = mode.strip().lower()
        if m not in MODES:
            raise RuleError(f"mode must be one of {', '.join(MODES)}, not {mode!r}")
        if cache_id is None:
            self.default_mode = _mode(m)
            self.modes.clear()  # "SET MODE x" for every cache overrides per-cache choices
        else:
            self.modes[cache_id] = _mode(m)
        self._changed()

    def reload(self) -> None:
        """Read rules.toml again: another process sharing it (a worker of `serve --workers`)
        changed it. Decisions memoised under the old rules are dropped (the version moves)."""
        if self.path is None or not self.path.exists():
            return
        self._rules.clear()
        self._load(self.path)
        self.version += 1
        for listener in list(self.listeners):
            listener()

    def _reindex(self) -> None:
        index: dict[tuple[Target, str], list[Rule]] = {}
        for rule in self._rules.values():
            index.setdefault((rule.target, rule.name), []).append(rule)
        self._index = index

    def _changed(self) -> None:
        self.version += 1
        self.save()
        for listener in list(self.listeners):
            listener()

    # --- persistence ---------------------------------------------------------------------

    def save(self) -> None:
        if self.path is None:
            return
        doc: dict[str, object] = {
            "next_id": self._next_id,
            "modes": {"default": self.default_mode, "caches": dict(self.modes)},
            "rules": [_rule_doc(r) for r in self.rules()],
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".toml.tmp")
        tmp.write_text(tomli_w.dumps(doc))
        os.replace(tmp, self.path)  # atomic: a crash never leaves half a rules file

    def _load(self, path: Path) -> None:
        try:
            doc = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise RuleError(f"cannot read {path}: {exc}") from exc
        modes = doc.get("modes", {})
        default = modes.get("default", "auto")
        self.default_mode = _mode(default) if default in MODES else "auto"
        self.modes = {k: _mode(v) for k, v in modes.get("caches", {}).items() if v in MODES}
        for item in doc.get("rules", []):
            ttl = item.get("ttl")
            rule = Rule(
                id=str(item["id"]),
                target="query" if item.get("target") == "query" else "table",
                name=str(item["name"]),
                ttl=None if item.get("action") == "never" or ttl is None else float(ttl),
                cache_id=item.get("cache"),
                created_at=float(item.get("created", 0.0)),
            )
            self._rules[rule.id] = rule
        numbers = [int(r.id[1:]) for r in self._rules.values() if r.id[1:].isdigit()]
        self._next_id = max([int(doc.get("next_id", 1)), *(n + 1 for n in numbers)])
        self._reindex()


def _mode(text: str) -> Mode:
    for mode in MODES:
        if mode == text:
            return mode
    raise RuleError(f"mode must be one of {', '.join(MODES)}, not {text!r}")


def _stronger(a: Rule, b: Rule) -> bool:
    if (a.cache_id is not None) != (b.cache_id is not None):
        return a.cache_id is not None
    if a.ttl is None or b.ttl is None:
        return a.ttl is None and b.ttl is not None
    return a.ttl < b.ttl


def _rule_doc(rule: Rule) -> dict[str, object]:
    doc: dict[str, object] = {
        "id": rule.id,
        "target": rule.target,
        "name": rule.name,
        "action": rule.action,
        "created": rule.created_at,
    }
    if rule.ttl is not None:
        doc["ttl"] = rule.ttl
    if rule.cache_id is not None:
        doc["cache"] = rule.cache_id
    return doc


class AutoTTL(Protocol):
    """What `auto` mode asks for a template's learned TTL (see cache/adaptive.py)."""

    def ttl(self, tables: Iterable[str], max_ttl: float, template_id: str | None = None) -> float: ...

    def explain(self, template_id: str) -> str: ...


@dataclass(frozen=True, slots=True)
class TTLDecision:
    ttl: float | None  # None: not cached
    source: str  # why, for SHOW QUERIES: "rule r3", "never (rule r2)", "auto", "off" …


class RulePolicy:
    """The TTLPolicy of one cache: rules, then the mode's TTL.

    `max_ttl` is read through a callable so a changed cache TTL is seen at once.
    """

    def __init__(
        self,
        book: RuleBook,
        cache_id: str,
        max_ttl: Callable[[], float],
        auto: AutoTTL | None = None,
        on_decision: Callable[[str, float | None], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        feed_ttl: Callable[[frozenset[str]], float | None] | None = None,
    ) -> None:
        self.book = book
        # The TTL cap while the change feed follows these tables now (None: it does not).
        self.feed_ttl = feed_ttl
        self.cache_id = cache_id
        self.max_ttl = max_ttl
        self.auto = auto
        self.on_decision = on_decision
        self.clock = clock
        self._memo: dict[tuple[str, frozenset[str], float | None], tuple[float | None, int, float]] = {}
        self._allowed: dict[tuple[str, frozenset[str]], tuple[int, bool]] = {}  # see allows

    @property
    def refusals_version(self) -> int:
        """Moves whenever some template's TTL may turn to "never" (None) or back: only the rule
        book decides that (its rules and modes); learned TTLs and the change feed move the
        number alone (see `decide`)."""
        return self.book.version

    def __call__(self, template_id: str, tables: frozenset[str]) -> float | None:
        # Asked for every query: remember a decision for a second. A rule change applies at
        # once (the book's version is part of the check); learned TTLs move slowly anyway.
        # The feed's state is asked every time: a TTL chosen while it was live must not be
        # handed out a moment after it went down.
        now = self.clock()
        feed = self.feed_ttl(tables) if self.feed_ttl is not None else None
        memo = self._memo.get((template_id, tables, feed))
        if memo is not None and memo[1] == self.book.version and memo[2] > now:
            return memo[0]
        ttl = self.decide(template_id, tables, feed).ttl
        if len(self._memo) > 10_000:
            self._memo.clear()
        self._memo[(template_id, tables, feed)] = (ttl, self.book.version, now + 1.0)
        if self.on_decision is not None:
            self.on_decision(template_id, ttl)
        return ttl

    def allows(self, template_id: str, tables: frozenset[str]) -> bool:
        """Is such a query cached at all (a TTL, not None)? Asked for every miss. Only the
        rules and the mode can say never (`decide`: neither the change feed nor a learned
        TTL ever does), so the answer holds until the book changes (its version moves):
        no clock, no feed. The TTL itself is asked (and reported) when an answer is stored."""
        found = self._allowed.get((template_id, tables))
        version = self.book.version
        if found is not None and found[0] == version:
            return found[1]
        allowed = self(template_id, tables) is not None
        if len(self._allowed) > 10_000:
            self._allowed.clear()
        self._allowed[(template_id, tables)] = (version, allowed)
        return allowed

    def decide(self, template_id: str, tables: Iterable[str], feed_ttl: float | None = None) -> TTLDecision:
        """`tables` as the classifier's `tables_read` spells them (see `bare_tables`);
        `feed_ttl`: the cap while the change feed follows them (auto mode only)."""
        book, cid = self.book, self.cache_id
        names = list(tables)
        by_template = book.matching("query", template_id, cid)
        if by_template is not None and by_template.ttl is None:
            return TTLDecision(None, f"never (rule {by_template.id})")
        table_rules = [book.matching("table", n, cid) for n in names]
        for rule in table_rules:
            if rule is not None and rule.ttl is None:
                return TTLDecision(None, f"never (rule {rule.id})")
        if by_template is not None:
            return TTLDecision(by_template.ttl, f"rule {by_template.id}")
        mode = book.mode(cid)
        ruled = [r for r in table_rules if r is not None]
        if mode == "off" and (not names or len(ruled) < len(names)):
            return TTLDecision(None, "off")
        best: float | None = None
        source: str = mode
        for rule in ruled:
            assert rule.ttl is not None
            if best is None or rule.ttl < best:
                best, source = rule.ttl, f"rule {rule.id}"
        unruled = [n for n, r in zip(names, table_rules, strict=True) if r is None]
        if unruled or not names:
            cap = self.max_ttl()
            learned = mode == "auto" and self.auto is not None
            following = learned and feed_ttl is not None and feed_ttl > cap
            if following and feed_ttl is not None:
                cap = feed_ttl
            auto = self.auto.ttl(unruled, cap, template_id) if learned and self.auto is not None else cap
            if best is None or auto < best:
                best = auto
                source = self.auto.explain(template_id) if learned and self.auto is not None else mode
                if following:
                    source += f" (change feed live: up to {cap:g} s)"
        return TTLDecision(best, source)
