"""The admin console's statements: a small grammar, and what each one answers.

    SHOW STATS | QUERIES [FOR CACHE id]        SHOW CACHES | RULES | CONNECTIONS | WORKERS
    PURGE ALL | TABLE name | QUERY template_id [FOR CACHE id]
    CREATE RULE ON TABLE name | QUERY template_id  TTL seconds | NEVER  [FOR CACHE id]
    DROP RULE rule_id                          SET MODE auto|fixed|off [FOR CACHE id]

Keywords are case-insensitive and a trailing semicolon is optional. Answers are typed rows;
the protocol side (admin.py) encodes them as text or binary as the client asks.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from neonpoly.cache.rules import (
    MODES,
    Rule,
    RuleError,
    normalize_table,
)
from neonpoly.freshness.plane import PlaneStatus

if TYPE_CHECKING:
    from neonpoly.cache.query_cache import QueryCache
    from neonpoly.service import ProxyService, ServiceReport
    from neonpoly.stats import Totals

BOOL, INT8, TEXT, FLOAT8, TIMESTAMPTZ = 16, 20, 25, 701, 1184

COMMANDS_HINT = (
    "Commands: SHOW STATS | SHOW QUERIES | SHOW CACHES | SHOW RULES | SHOW CONNECTIONS | SHOW WORKERS | "
    "PURGE ALL | PURGE TABLE name | PURGE QUERY template_id | "
    "CREATE RULE ON TABLE name TTL seconds | CREATE RULE ON TABLE name NEVER | "
    "CREATE RULE ON QUERY template_id TTL seconds|NEVER | DROP RULE rule_id | "
    "SET MODE auto|fixed|off; most take an optional FOR CACHE id."
)

Value = int | float | str | bool | datetime | None


class AdminError(Exception):
    def __init__(self, sqlstate: str, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate
        self.message = message
        self.hint = hint


def syntax_error(message: str) -> AdminError:
    return AdminError("42601", message, COMMANDS_HINT)


@dataclass(frozen=True, slots=True)
class Command:
    verb: str  # "show stats", "purge table", "create rule", "set mode" …
    name: str | None = None  # table, template id, rule id or mode
    target: str | None = None  # "table" | "query" for rules
    ttl: float | None = None  # None with a rule: never
    cache_id: str | None = None


@dataclass(slots=True)
class Result:
    columns: Sequence[tuple[str, int]]
    rows: list[tuple[Value, ...]] = field(default_factory=list)
    tag: str = ""


_TOKEN = re.compile(r'\s*(?:("(?:[^"]|"")*")|([^\s"]+))')
# A template id is 16 hex digits (cache/template.py's digest). Anything else matches no
# template, so PURGE QUERY would say "0 removed" and a rule would silently never apply.
_TEMPLATE_ID = re.compile(r"[0-9a-f]{16}")


def _template_id(word: str) -> str:
    name = word.strip('"').lower()
    if not _TEMPLATE_ID.fullmatch(name):
        hint = "a template id is 16 hex digits; SHOW QUERIES lists them"
        raise AdminError("22023", f"not a template id: {word!r}", hint)
    return name


STATS_COLUMNS = (
    ("cache", TEXT),
    ("calls", INT8),
    ("hits", INT8),
    ("misses", INT8),
    ("passthrough", INT8),
    ("hit_rate", FLOAT8),
    ("time_saved_ms", FLOAT8),
    ("bytes_served", INT8),
    ("entries", INT8),
    ("bytes", INT8),
    ("connections", INT8),
    ("statuses", TEXT),
)
QUERIES_COLUMNS = (
    ("cache", TEXT),
    ("template_id", TEXT),
    ("template", TEXT),
    ("tables", TEXT),
    ("calls", INT8),
    ("hits", INT8),
    ("misses", INT8),
    ("other", INT8),
    ("statuses", TEXT),
    ("hit_rate", FLOAT8),
    ("hit_p50_ms", FLOAT8),
    ("hit_p95_ms", FLOAT8),
    ("miss_p50_ms", FLOAT8),
    ("miss_p95_ms", FLOAT8),
    ("time_saved_ms", FLOAT8),
    ("bytes_served", INT8),
    ("ttl_s", FLOAT8),
    ("ttl_source", TEXT),
    ("last_status", TEXT),
    ("last_reason", TEXT),
    ("last_seen", TIMESTAMPTZ),
)
CACHES_COLUMNS = (
    ("cache", TEXT),
    ("is_default", BOOL),
    ("mode", TEXT),
    ("origin", TEXT),
    ("ttl_s", FLOAT8),
    ("entries", INT8),
    ("bytes", INT8),
    ("max_bytes", INT8),
    ("connections", INT8),
    ("change_feed", TEXT),  # the origin's change feed: "on (lag 3 ms)", "off: <why>", …
    ("feed_changes", INT8),  # committed transactions it applied (writes through neonpoly included)
    ("feed_ddl", INT8),  # catalog changes it caught
    ("feed_gaps", INT8),  # evictions for a gap (connect, reconnect, idle close)
    ("feed_last_change", TIMESTAMPTZ),
    ("plane", TEXT),  # the invalidation plane (--redis): "up, 2 nodes, lag 1 ms", "down: <why> (passing through)"
    ("plane_nodes", INT8),  # live nodes seen on the plane, this one included
    ("plane_last_id", TEXT),  # the last stream entry of this origin applied
    ("plane_lag_ms", FLOAT8),  # XADD to applied here, last entry from another node
    ("plane_published", INT8),  # bumps this node published for this origin
    ("plane_applied", INT8),  # bumps from other nodes applied
    ("plane_gaps", INT8),  # purges for a gap (Redis restarted or lost entries, this node reconnected)
    ("plane_refused_hits", INT8),  # lookups passed through because this node was not provably caught up
    ("feed_lease", TEXT),  # the node running this origin's change feed ("me": this one)
    ("feed_slot", TEXT),  # the feed's replication slots on the origin (temporary: dropped with the feed)
    ("plane_lost", TEXT),  # nodes gone without a goodbye: this origin's hits pause until they return
    ("feed_keyed", INT8),  # of the feed's table bumps, those that came with their rows' key values
)
RULES_COLUMNS = (
    ("id", TEXT),
    ("cache", TEXT),
    ("target", TEXT),
    ("name", TEXT),
    ("action", TEXT),
    ("ttl_s", FLOAT8),
    ("created", TIMESTAMPTZ),
)
CONNECTIONS_COLUMNS = (
    ("cache", TEXT),
    ("client", TEXT),
    ("database", TEXT),
    ("role", TEXT),
    ("application_name", TEXT),
    ("phase", TEXT),
    ("tx_status", TEXT),
    ("connected_s", FLOAT8),
    ("bytes_in", INT8),
    ("bytes_out", INT8),
)
# One row per worker process of `serve --workers N` (one row without workers).
WORKERS_COLUMNS = (
    ("worker", INT8),
    ("pid", INT8),
    ("state", TEXT),  # "up" (answered now), "missing" (did not answer in time: figures from its last heartbeat)
    ("connections", INT8),
    ("hits", INT8),
    ("misses", INT8),
    ("last_seen", TIMESTAMPTZ),
    ("cpu_s", FLOAT8),  # CPU time the process used (/metrics' process_* are the answering worker's own)
    ("rss_bytes", INT8),  # its resident memory now
)
PURGE_COLUMNS = (("removed", INT8),)

_COLUMNS: dict[str, Sequence[tuple[str, int]]] = {
    "show stats": STATS_COLUMNS,
    "show queries": QUERIES_COLUMNS,
    "show caches": CACHES_COLUMNS,
    "show rules": RULES_COLUMNS,
    "show connections": CONNECTIONS_COLUMNS,
    "show workers": WORKERS_COLUMNS,
    "purge all": PURGE_COLUMNS,
    "purge table": PURGE_COLUMNS,
    "purge query": PURGE_COLUMNS,
    "create rule": RULES_COLUMNS,
    "drop rule": (),
    "set mode": (),
}


def columns_of(command: Command) -> Sequence[tuple[str, int]]:
    """Known before running, so Describe can answer without side effects."""
    return _COLUMNS[command.verb]


def _tokens(sql: str) -> list[str]:
    text = sql.strip().rstrip(";").strip()
    out: list[str] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise syntax_error(f"cannot read the admin statement near {text[pos : pos + 20]!r}")
        out.append(m.group(1) or m.group(2))
        pos = m.end()
        while pos < len(text) and text[pos].isspace():
            pos += 1
    return out


def parse(sql: str) -> Command:
    words = _tokens(sql)
    upper = [w.upper() for w in words]
    cache_id: str | None = None
    if len(words) >= 3 and upper[-3:-1] == ["FOR", "CACHE"]:
        cache_id = words[-1].strip('"')
        words, upper = words[:-3], upper[:-3]
    if not words:
        raise syntax_error("empty admin statement")
    head = " ".join(upper[:2])
    if head in ("SHOW STATS", "SHOW QUERIES") and len(words) == 2:
        return Command(head.lower(), cache_id=cache_id)
    if head in ("SHOW CACHES", "SHOW RULES", "SHOW CONNECTIONS", "SHOW WORKERS") and len(words) == 2:
        return Command(head.lower(), cache_id=cache_id)
    if head == "PURGE ALL" and len(words) == 2:
        return Command("purge all", cache_id=cache_id)
    if head in ("PURGE TABLE", "PURGE QUERY") and len(words) == 3:
        name = normalize_table(words[2]) if upper[1] == "TABLE" else _template_id(words[2])
        return Command(head.lower(), name=name, cache_id=cache_id)
    if head == "DROP RULE" and len(words) == 3:
        return Command("drop rule", name=words[2].strip('"').lower())
    if head == "SET MODE" and len(words) == 3:
        mode = words[2].strip("'\"").lower()
        if mode not in MODES:
            raise syntax_error(f"mode must be one of {', '.join(MODES)}, not {words[2]!r}")
        return Command("set mode", name=mode, cache_id=cache_id)
    if head == "CREATE RULE" and len(words) >= 6 and upper[2] == "ON" and upper[3] in ("TABLE", "QUERY"):
        target = upper[3].lower()
        name = words[4] if target == "table" else _template_id(words[4])
        rest = upper[5:]
        if rest == ["NEVER"]:
            return Command("create rule", name=name, target=target, ttl=None, cache_id=cache_id)
        if len(rest) == 2 and rest[0] == "TTL":
            try:
                ttl = float(rest[1])
            except ValueError:
                raise syntax_error(f"TTL must be a number of seconds, not {words[6]!r}") from None
            return Command("create rule", name=name, target=target, ttl=ttl, cache_id=cache_id)
    raise syntax_error(f"unknown admin statement: {' '.join(words)[:80]}")


class Executor:
    """Runs parsed commands against a live ProxyService, its rule book and TTL policies."""

    def __init__(self, service: ProxyService) -> None:
        self.service = service
        self.book = service.rules

    def run(self, command: Command, report: ServiceReport | None = None) -> Result:
        """Answer `command`; the SHOW commands read `report` when given (every worker's
        figures merged, `serve --workers`), else this process's `service.report()`."""
        cols = columns_of(command)
        verb = command.verb
        if command.cache_id is not None and verb != "drop rule":
            self._cache(command.cache_id)  # unknown cache → 42704 before anything happens
        if verb == "show stats":
            return Result(cols, self._stats(command.cache_id, report), "SHOW")
        if verb == "show queries":
            return Result(cols, self._queries(command.cache_id, report), "SHOW")
        if verb == "show caches":
            return Result(cols, self._caches(command.cache_id, report), "SHOW")
        if verb == "show rules":
            rules = [r for r in self.book.rules() if command.cache_id is None or r.applies_to(command.cache_id)]
            return Result(cols, [_rule_row(r) for r in rules], "SHOW")
        if verb == "show connections":
            return Result(cols, self._connections(command.cache_id), "SHOW")
        if verb == "show workers":
            return Result(cols, [self.worker_row(0)], "SHOW")
        if verb.startswith("purge"):
            removed = self._purge(verb, command.name, command.cache_id)
            return Result(cols, [(removed,)], f"PURGE {removed}")
        try:
            if verb == "create rule":
                assert command.name is not None
                rule = self.book.add(
                    "table" if command.target == "table" else "query",
                    command.name,
                    command.ttl,
                    command.cache_id,
                )
                # Entries stored under an older, longer TTL would outlive the rule: drop them.
                self._purge(
                    "purge table" if rule.target == "table" else "purge query",
                    rule.name,
                    rule.cache_id,
                )
                return Result(cols, [_rule_row(rule)], "CREATE RULE")
            if verb == "drop rule":
                assert command.name is not None
                self.book.drop(command.name)
                return Result(cols, [], "DROP RULE")
            if verb == "set mode":
                assert command.name is not None
                self.book.set_mode(command.name, command.cache_id)
                return Result(cols, [], "SET MODE")
        except RuleError as exc:
            state = "42704" if "no rule" in str(exc) else "22023"
            raise AdminError(state, str(exc)) from exc
        raise syntax_error(f"unknown admin statement {verb}")  # pragma: no cover - parse guards

    # --- helpers -------------------------------------------------------------------------

    def _cache(self, cache_id: str) -> QueryCache | None:
        route = self.service.routes.by_id.get(cache_id)
        if route is None:
            raise AdminError("42704", f'no cache "{cache_id}"', "SHOW CACHES lists them")
        return route.cache

    def _caches_of(self, cache_id: str | None) -> list[tuple[str, QueryCache | None]]:
        return [
            (cid, route.cache)
            for cid, route in sorted(self.service.routes.by_id.items())
            if cache_id is None or cid == cache_id
        ]

    def _purge(self, verb: str, name: str | None, cache_id: str | None) -> int:
        removed = 0
        for _, cache in self._caches_of(cache_id):
            if cache is None:
                continue
            if verb == "purge all":
                removed += cache.purge()
            elif verb == "purge table":
                removed += cache.store.purge_tables([name or ""])
            else:
                removed += cache.store.purge_template(name or "")
        return removed

    def worker_row(self, index: int) -> tuple[Value, ...]:
        """This process as one row of SHOW WORKERS."""
        totals = self.service.stats.snapshot().totals
        connections = len(self.service.server.connections())
        return (index, os.getpid(), "up", connections, totals.hits, totals.misses, _ts(time.time()),
                round(time.process_time(), 3), _rss())  # fmt: skip

    def _report(self, cache_id: str | None, report: ServiceReport | None) -> ServiceReport:
        if report is None:
            return self.service.report(cache_id)
        if cache_id is None:
            return report
        return dataclasses.replace(
            report,
            caches=tuple(c for c in report.caches if c.cache_id == cache_id),
            templates=tuple(t for t in report.templates if t.stats.cache_id == cache_id),
        )

    def _stats(self, cache_id: str | None, given: ServiceReport | None = None) -> list[tuple[Value, ...]]:
        report = self._report(cache_id, given)
        rows = [_stats_row(c.cache_id, c.totals, c.entries, c.bytes, c.connections) for c in report.caches]
        if cache_id is None:
            rows.append(
                _stats_row(
                    "(all)",
                    report.totals,
                    sum(c.entries for c in report.caches),
                    sum(c.bytes for c in report.caches),
                    sum(c.connections for c in report.caches),
                )
            )
        return rows

    def _queries(self, cache_id: str | None, given: ServiceReport | None = None) -> list[tuple[Value, ...]]:
        rows: list[tuple[Value, ...]] = []
        for r in self._report(cache_id, given).templates:
            t = r.stats
            rows.append(
                (
                    t.cache_id,
                    t.template_id,
                    t.template,
                    ", ".join(t.tables),
                    t.calls,
                    t.hits,
                    t.misses,
                    t.calls - t.hits - t.misses,
                    _statuses(t.by_status),
                    t.hit_rate,
                    _ms(t.hit_p50_s),
                    _ms(t.hit_p95_s),
                    _ms(t.miss_p50_s),
                    _ms(t.miss_p95_s),
                    t.time_saved_s * 1000,
                    t.bytes_served,
                    r.ttl,
                    r.ttl_source,
                    t.last_status,
                    t.last_reason or "",
                    _ts(t.last_seen) if t.last_seen else None,
                )
            )
        return rows

    def _caches(self, cache_id: str | None, given: ServiceReport | None = None) -> list[tuple[Value, ...]]:
        served = self.service.routes.by_id
        rows: list[tuple[Value, ...]] = []
        report = self._report(cache_id, given)
        plane = report.plane
        for c in report.caches:
            # Served here, or (every worker's report merged) by another worker still: a cache
            # removed from the state dir leaves each worker within a second of the others.
            if c.cache_id not in served and (given is None or not c.origin):
                continue
            last = max((f.last_change for f in c.feeds if f.last_change is not None), default=None)
            rows.append(
                (
                    c.cache_id, c.is_default, c.mode, c.origin, c.ttl, c.entries, c.bytes, c.max_bytes, c.connections,
                    c.change_feed,
                    sum(f.changes for f in c.feeds),
                    sum(f.ddl for f in c.feeds),
                    sum(f.gaps for f in c.feeds),
                    _ts(last) if last is not None else None,
                    c.plane,
                    *_plane_columns(plane, c.origin),  # the origin's label
                    ", ".join(sorted({f.slot for f in c.feeds if f.slot and f.state == "live"})) or None,
                    _lost(plane, c.origin),
                    sum(f.keyed for f in c.feeds),
                )
            )
        return rows

    def _connections(self, cache_id: str | None) -> list[tuple[Value, ...]]:
        now = time.monotonic()
        rows: list[tuple[Value, ...]] = []
        for s in sorted(self.service.server.connections(cache_id), key=lambda s: s.opened):
            rows.append(
                (
                    s.route.cache_id if s.route else None,
                    s.peer,
                    s.state.database,
                    s.state.user,
                    s.state.application_name,
                    s.phase,
                    s.state.tx_status.decode("ascii", "replace"),
                    now - s.opened,
                    s.bytes_in,
                    s.bytes_out,
                )
            )
        return rows


def _stats_row(name: str, t: Totals, entries: int, size: int, connections: int) -> tuple[Value, ...]:
    return (
        name,
        t.calls,
        t.hits,
        t.misses,
        t.passthrough,
        t.hit_rate,
        t.time_saved_s * 1000,
        t.bytes_served,
        entries,
        size,
        connections,
        _statuses(t.by_status),
    )


def _statuses(by_status: Sequence[tuple[str, int]]) -> str:
    return ",".join(f"{k}={v}" for k, v in by_status)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def _ts(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


def _rss() -> int | None:
    """Resident memory now (Linux's /proc; None elsewhere)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _lost(plane: PlaneStatus | None, origin_key: str) -> str | None:
    o = plane.origin(origin_key) if plane is not None else None
    return ", ".join(o.lost) if o is not None and o.lost else None


def _plane_columns(plane: PlaneStatus | None, origin_key: str) -> tuple[Value, ...]:
    """SHOW CACHES' plane figures for one origin (NULLs without --redis)."""
    o = plane.origin(origin_key) if plane is not None else None
    if plane is None or o is None:
        return (len(plane.nodes) if plane is not None else None, None, None, None, None, None, None, None)
    return (len(plane.nodes), o.last_id or None, o.lag_ms, o.published, o.applied, o.gaps, o.refused_hits,
            o.feed_lease or None)


def _rule_row(rule: Rule) -> tuple[Value, ...]:
    return (
        rule.id,
        rule.cache_id,
        rule.target,
        rule.name,
        rule.action,
        rule.ttl,
        _ts(rule.created_at),
    )

