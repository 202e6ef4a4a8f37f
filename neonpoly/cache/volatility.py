"""Which function calls make a query's result unsafe to reuse.

The lists are kept as PostgreSQL function names.  sqlglot turns many calls into typed
expressions (``lower`` → ``exp.Lower``, ``date_trunc`` → ``exp.TimestampTrunc``), and that mapping
changes between sqlglot releases, so the typed classes are *derived* by parsing sample calls
of the listed names instead of being hard-coded.  A call that is neither allowed nor known
volatile is treated as volatile: a stale answer is worse than a miss.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import sqlglot
from sqlglot import exp

# Reading the wall clock: results change from one statement to the next.
TIME_DEPENDENT: frozenset[str] = frozenset(
    {
        "now", "current_timestamp", "current_date", "current_time", "localtime",
        "localtimestamp", "transaction_timestamp", "statement_timestamp", "clock_timestamp",
        "timeofday",
    }
)

# Side effects or per-call results.  Prefixes cover families (pg_advisory_lock_shared …).
VOLATILE_NAMES: frozenset[str] = frozenset(
    {
        "random", "random_normal", "setseed", "nextval", "currval", "lastval", "setval",
        "gen_random_uuid", "uuidv4", "uuidv7", "set_config", "pg_notify",
        "pg_backend_pid", "pg_cancel_backend", "pg_terminate_backend", "pg_reload_conf",
        "pg_rotate_logfile", "pg_switch_wal", "pg_stat_reset", "pg_postmaster_start_time",
        "pg_conf_load_time", "pg_is_in_recovery", "pg_last_wal_replay_lsn",
        "pg_current_wal_lsn", "pg_current_snapshot", "pg_trigger_depth", "pg_blocking_pids",
        "inet_client_addr", "inet_client_port", "inet_server_addr", "inet_server_port",
        "pg_stat_get_activity", "pg_read_file", "pg_read_binary_file", "pg_ls_dir",
        "pg_stat_file", "pg_logical_emit_message", "pg_relation_size", "pg_table_size",
        "pg_total_relation_size", "pg_indexes_size", "pg_database_size", "pg_tablespace_size",
        "pg_column_size",
    }
)
VOLATILE_PREFIXES: tuple[str, ...] = (
    "uuid_generate_", "pg_sleep", "pg_advisory", "pg_try_advisory", "txid_",
    "pg_current_xact_id", "dblink", "lo_", "pg_create_", "pg_drop_", "pg_replication_",
    "pg_logical_slot_", "pg_stat_reset", "pg_import_system_collations",
)
# Depends on settings the cache key does not carry.
SESSION_DEPENDENT: frozenset[str] = frozenset({"current_setting", "pg_my_temp_schema"})

# Session-dependent but safe: the cache key already holds database, role and search_path.
SESSION_KEYED: frozenset[str] = frozenset(
    {
        "current_user", "session_user", "user", "current_role", "current_database",
        "current_catalog", "current_schema", "current_schemas",
    }
)

# Immutable or stable builtins (pg_proc provolatile 'i' or 's', not time-dependent).
SAFE_NAMES: frozenset[str] = frozenset(
    {
        # aggregates
        "count", "sum", "avg", "min", "max", "array_agg", "string_agg", "json_agg",
        "jsonb_agg", "json_object_agg", "jsonb_object_agg", "bool_and", "bool_or", "every",
        "bit_and", "bit_or", "stddev", "stddev_pop", "stddev_samp", "variance", "var_pop",
        "var_samp", "corr", "covar_pop", "covar_samp", "percentile_cont", "percentile_disc",
        "mode", "any_value", "xmlagg",
        # window
        "row_number", "rank", "dense_rank", "percent_rank", "cume_dist", "ntile", "lag",
        "lead", "first_value", "last_value", "nth_value",
        # strings
        "lower", "upper", "initcap", "length", "char_length", "character_length",
        "octet_length", "bit_length", "substring", "substr", "concat", "concat_ws", "trim",
        "btrim", "ltrim", "rtrim", "replace", "split_part", "left", "right", "lpad", "rpad",
        "position", "strpos", "md5", "sha224", "sha256", "sha384", "sha512", "format",
        "repeat", "reverse", "translate", "ascii", "chr", "quote_ident", "quote_literal",
        "quote_nullable", "regexp_replace", "regexp_match", "regexp_matches",
        "regexp_split_to_array", "regexp_split_to_table", "regexp_like", "regexp_count",
        "regexp_substr", "regexp_instr", "starts_with", "string_to_array", "string_to_table",
        "to_hex", "encode", "decode", "convert_from", "convert_to", "overlay", "unaccent",
        "normalize", "to_ascii", "similarity", "word_similarity", "levenshtein",
        # math
        "abs", "round", "ceil", "ceiling", "floor", "trunc", "mod", "power", "pow", "sqrt",
        "cbrt", "exp", "ln", "log", "log10", "sign", "div", "pi", "degrees", "radians", "sin",
        "cos", "tan", "asin", "acos", "atan", "atan2", "greatest", "least", "coalesce",
        "nullif", "width_bucket", "gcd", "lcm", "scale", "factorial",
        # dates (stable given TimeZone/DateStyle, which are in the key)
        "date_trunc", "date_bin", "extract", "date_part", "age", "to_char", "to_date",
        "to_timestamp", "to_number", "make_date", "make_time", "make_timestamp",
        "make_timestamptz", "make_interval", "justify_days", "justify_hours",
        "justify_interval", "isfinite", "timezone",
        # json / jsonb
        "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_build_object",
        "jsonb_build_object", "json_build_array", "jsonb_build_array", "json_object",
        "jsonb_object", "json_array_length", "jsonb_array_length", "json_extract_path",
        "jsonb_extract_path", "json_extract_path_text", "jsonb_extract_path_text",
        "json_array_elements", "jsonb_array_elements", "json_array_elements_text",
        "jsonb_array_elements_text", "json_each", "jsonb_each", "json_each_text",
        "jsonb_each_text", "json_object_keys", "jsonb_object_keys", "json_typeof",
        "jsonb_typeof", "jsonb_set", "jsonb_insert", "jsonb_strip_nulls", "json_strip_nulls",
        "jsonb_pretty", "jsonb_path_query", "jsonb_path_exists", "jsonb_path_match",
        "jsonb_path_query_array", "jsonb_path_query_first", "json_populate_record",
        "jsonb_populate_record", "json_to_record", "jsonb_to_record", "json_to_recordset",
        "jsonb_to_recordset", "jsonb_contains",
        # arrays and sets
        "array_length", "array_to_string", "array_append", "array_prepend", "array_cat",
        "array_remove", "array_replace", "array_position", "array_positions", "array_dims",
        "array_lower", "array_upper", "array_ndims", "cardinality", "unnest",
        "generate_series", "generate_subscripts", "array_fill", "trim_array",
        # conversion, misc
        "num_nonnulls", "num_nulls", "to_regclass", "to_regtype", "format_type",
        "pg_typeof", "row", "int4range", "int8range", "numrange", "tsrange", "tstzrange",
        "daterange", "lower_inc", "upper_inc", "isempty", "range_merge", "host", "masklen",
        "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery",
        "websearch_to_tsquery", "ts_rank", "ts_rank_cd", "ts_headline", "setweight",
        # catalog helpers that drivers and psql use for introspection
        "pg_get_expr", "pg_get_userbyid", "pg_table_is_visible", "pg_type_is_visible",
        "pg_function_is_visible", "pg_get_indexdef", "pg_get_constraintdef",
        "pg_get_viewdef", "pg_get_triggerdef", "pg_get_functiondef",
        "pg_get_function_arguments", "pg_get_function_result", "pg_encoding_to_char",
        "obj_description", "col_description", "shobj_description", "has_table_privilege",
        "has_schema_privilege", "has_column_privilege", "has_database_privilege",
        "pg_has_role", "array_in", "textlen",
    }
) | SESSION_KEYED

# Expressions sqlglot models as functions although they are operators or syntax.  Each one
# is parsed once to learn the classes sqlglot uses for it.
_SAFE_SYNTAX = (
    "CAST(a AS INT)", "a::text", "CASE WHEN a THEN 1 ELSE 2 END", "CASE a WHEN 1 THEN 2 END",
    "ARRAY[1, 2]", "ARRAY(SELECT 1)", "EXISTS(SELECT 1)", "a = ANY(b)", "a = ALL(b)",
    "a = SOME(b)", "a ~ b", "a ~* b", "a !~ b", "a !~* b", "a LIKE b", "a ILIKE b",
    "a NOT LIKE b", "a SIMILAR TO b", "a IS DISTINCT FROM b", "a IS NOT DISTINCT FROM b",
    "a BETWEEN b AND c", "a || b", "a -> 'k'", "a ->> 'k'", "a #> b", "a #>> b", "a @> b",
    "a <@ b", "a && b", "a ? 'k'", "a ?| b", "a ?& b", "a AT TIME ZONE 'UTC'",
    "(a, b) OVERLAPS (c, d)", "a[1]", "a[1:2]", "a AND b", "a OR b", "NOT a",
    "a IN (1, 2)", "a IS NULL", "INTERVAL '1 day'", "a COLLATE \"C\"", "a % b", "a ^ b",
    "|/ a", "@ a", "a & b", "a | b", "a # b", "~a", "a << b", "a >> b", "a @@ b",
    "substring(a from 1 for 2)", "position('a' in b)", "trim(both 'x' from a)",
    "extract(year from a)", "overlay(a placing 'b' from 1)", "count(*) FILTER (WHERE a)",
    "string_agg(a, ',' ORDER BY a)", "a IS TRUE", "(SELECT 1)", "TRY_CAST(a AS INT)",
    "greatest(1, 2)", "current_user", "session_user", "current_schema",
    "current_catalog", "current_schemas(true)", "current_database()",
    # set-returning builtins in FROM take other classes than in a select list
    "* FROM unnest(a)", "* FROM unnest(a, b) WITH ORDINALITY", "* FROM generate_series(1, 2)",
    "* FROM ROWS FROM (generate_series(1, 2))", "* FROM jsonb_each(a)", "* FROM json_each(a)",
    "* FROM jsonb_array_elements(a)", "* FROM regexp_split_to_table(a, b)",
)


@dataclass(frozen=True, slots=True)
class _Known:
    safe: frozenset[type[exp.Expr]]
    volatile: dict[type[exp.Expr], str]


def _typed_classes(snippet: str) -> set[type[exp.Expr]] | None:
    """The typed function classes sqlglot builds for a snippet, None if it does not parse."""
    try:
        tree = sqlglot.parse_one(f"SELECT {snippet}", read="postgres")
    except sqlglot.errors.SqlglotError:
        return None
    funcs = (n for n in tree.walk() if isinstance(n, exp.Func))
    return {type(n) for n in funcs if not isinstance(n, exp.Anonymous)}


def _classes_of_name(name: str) -> set[type[exp.Expr]]:
    # sqlglot validates arity for typed functions: try common arities until one parses.
    for call in (f"{name}(a)", f"{name}(a, b)", f"{name}(a, b, c)", f"{name}()"):
        found = _typed_classes(call)
        if found is not None:
            return found
    return set()


@functools.cache
def _known() -> _Known:
    safe: set[type[exp.Expr]] = set()
    for snippet in _SAFE_SYNTAX:
        safe |= _typed_classes(snippet) or set()
    for name in SAFE_NAMES:
        safe |= _classes_of_name(name)
    volatile: dict[type[exp.Expr], str] = {}
    time_syntax = ["now()", "current_timestamp", "current_date", "current_time", "localtime",
                   "localtimestamp"]
    for snippet in time_syntax:
        volatile.update(dict.fromkeys(_typed_classes(snippet) or (), "time-dependent"))
    for name in TIME_DEPENDENT:
        volatile.update(dict.fromkeys(_classes_of_name(name), "time-dependent"))
    for name in VOLATILE_NAMES:
        for cls in _classes_of_name(name):
            volatile.setdefault(cls, "volatile")
    # A volatile meaning wins if sqlglot folds a safe and a volatile name into one class.
    return _Known(frozenset(safe - volatile.keys()), volatile)


UNKNOWN_VOLATILITY = "whose volatility is unknown"


def _display(node: exp.Func) -> str:
    if isinstance(node, exp.Anonymous):
        return str(node.name).lower()
    text = node.sql(dialect="postgres")
    return text.split("(", 1)[0].strip().lower() or node.sql_name().lower()


def _qualifier(node: exp.Func) -> str | None:
    parent = node.parent
    if isinstance(parent, exp.Dot) and parent.expression is node:
        return str(parent.this.name).lower() if parent.this is not None else ""
    return None


def _by_name(name: str, node: exp.Func) -> str | None:
    if name in TIME_DEPENDENT:
        return f"calls time-dependent function {name}()"
    if name in SESSION_DEPENDENT:
        return f"calls session-dependent function {name}()"
    if name in VOLATILE_NAMES or name.startswith(VOLATILE_PREFIXES):
        return f"calls volatile function {name}()"
    if name == "age" and len(node.expressions) < 2:
        return "calls time-dependent function age() with one argument"
    if name in SAFE_NAMES:
        return None
    return f"calls function {name}() whose volatility is unknown"


def volatility_reason(node: exp.Func) -> str | None:
    """Why this call makes the query uncacheable, or None when it is safe."""
    known = _known()
    if isinstance(node, exp.Anonymous):
        qualifier = _qualifier(node)
        name = _display(node)
        if qualifier not in (None, "pg_catalog"):
            return f"calls function {qualifier}.{name}() whose volatility is unknown"
        return _by_name(name, node)
    kind = known.volatile.get(type(node))
    if kind is not None:
        return f"calls {kind} function {_display(node)}()"
    if type(node) in known.safe:
        return _time_literal_reason(node)
    return f"calls function {_display(node)}() whose volatility is unknown"


_TIME_WORDS = frozenset({"now", "today", "tomorrow", "yesterday"})


def _time_literal_reason(node: exp.Func) -> str | None:
    # 'now'::timestamptz and date 'today' read the clock when the value is converted.
    value = node.this if isinstance(node, exp.Cast) else None
    if isinstance(value, exp.Literal) and value.is_string:
        word = str(value.this).strip().lower()
        if word in _TIME_WORDS:
            return f"casts the time-dependent literal '{word}'"
    return None
