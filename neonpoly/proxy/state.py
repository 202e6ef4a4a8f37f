"""What a session knows about its own state, and the part of it that changes results."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

# Settings that change what a query returns: they are part of every cache key.
KEYED_SETTINGS = frozenset(
    {
        "search_path",
        "timezone",
        "datestyle",
        "intervalstyle",
        "client_encoding",
        "bytea_output",
        "extra_float_digits",
        "standard_conforming_strings",
        "role",
        "session_authorization",
        "lc_monetary",
        "lc_numeric",
        "lc_time",
    }
)

# Settings that cannot change a result: a session may SET them and keep its cache.
HARMLESS_SETTINGS = frozenset(
    {
        "application_name",
        "statement_timeout",
        "lock_timeout",
        "idle_in_transaction_session_timeout",
        "idle_session_timeout",
        "work_mem",
        "maintenance_work_mem",
        "client_min_messages",
        "log_statement",
        "log_min_duration_statement",
        "jit",
        "enable_seqscan",
        "enable_indexscan",
        "enable_bitmapscan",
        "enable_hashjoin",
        "enable_mergejoin",
        "enable_nestloop",
        "random_page_cost",
        "effective_cache_size",
        "max_parallel_workers_per_gather",
        "synchronous_commit",
        "tcp_keepalives_idle",
        "geqo",
        "plan_cache_mode",
        "search_path_cache",
    }
)


@dataclass(slots=True)
class SessionState:
    user: str = ""
    database: str = ""
    application_name: str = ""
    tx_status: bytes = b"I"
    bypass: bool = False  # the session changed something the key cannot describe
    settings: dict[str, str] = field(default_factory=dict)
    server_params: dict[str, str] = field(default_factory=dict)
    startup_settings: dict[str, str] = field(default_factory=dict)  # what RESET returns to
    _context: bytes | None = None

    def apply_startup(self, params: Mapping[str, str]) -> None:
        for name, value in params.items():
            lname = name.lower()
            if lname in ("user", "database", "application_name", "replication"):
                if lname == "replication":
                    self.bypass = True
                continue
            if lname == "options":
                self._apply_options(value)
            elif lname in KEYED_SETTINGS:
                self.set(lname, value)
            elif lname not in HARMLESS_SETTINGS:
                self.bypass = True
        self.startup_settings = dict(self.settings)

    def _apply_options(self, options: str) -> None:
        # libpq's `options` carries "-c name=value" pairs; Neon adds "endpoint=<id>".
        words = options.replace("--", "-c ").split()
        i = 0
        while i < len(words):
            word = words[i]
            if word == "-c" and i + 1 < len(words):
                name, _, value = words[i + 1].partition("=")
                if name.lower() in KEYED_SETTINGS:
                    self.set(name.lower().replace("-", "_"), value)
                elif name.lower() not in HARMLESS_SETTINGS:
                    self.bypass = True
                i += 2
                continue
            if not word.startswith("endpoint="):
                self.bypass = True
            i += 1

    def keyed(self, name: str) -> bool:
        return name in KEYED_SETTINGS or name in HARMLESS_SETTINGS

    def set(self, name: str, value: str | None) -> None:
        if name in HARMLESS_SETTINGS:
            return
        if value is None:
            self.settings.pop(name, None)
        else:
            self.settings[name] = value
        self._context = None

    def apply(self, name: str, value: str | None) -> None:
        """A SET or RESET (`value` None) that succeeded outside a transaction."""
        if any(reported.lower() == name for reported in self.server_params):
            # The origin reports this one: its ParameterStatus (already in) is the value,
            # complete ("SQL, DMY" after SET datestyle TO sql), and what RESET went back to.
            return
        if value is None:
            value = self.startup_settings.get(name)  # RESET goes back to the startup value
        self.set(name, value)

    def parameter(self, name: str, value: str) -> None:
        """A ParameterStatus from the origin: authoritative for the settings it reports."""
        self.server_params[name] = value
        lname = name.lower()
        if lname in KEYED_SETTINGS and self.settings.get(lname) != value:
            self.settings[lname] = value
            self._context = None

    def context(self) -> bytes:
        """The result-changing part of the session, as bytes for the cache key."""
        if self._context is None:
            parts = [self.database, self.user] + [f"{k}={v}" for k, v in sorted(self.settings.items())]
            self._context = "\x00".join(parts).encode()
        return self._context
