"""Which function calls make a query's result unsafe to reuse, by PostgreSQL's own names.

The parser (see `queries.py`) reports every call as the server will see it: a name and the
schema it was qualified with, if any (syntax such as ``EXTRACT(...)`` or ``AT TIME ZONE`` is
reported as the ``pg_catalog`` function it becomes). A name is trusted only if it is a
``pg_catalog`` builtin on the allowlist below *and*, in the database the query runs in, no
function of that name exists outside ``pg_catalog`` (see `relations.py`: the catalog says which
names are shadowed; a user's ``public.lower(int)`` could otherwise be picked by overload
resolution). Anything else is treated as code that may write or change the session: a stale
answer is worse than a miss.
"""

from __future__ import annotations

# Reading the wall clock: results change from one statement to the next.
TIME_DEPENDENT: frozenset[str] = frozenset(
    {
        "now", "current_timestamp", "current_date", "current_time", "localtime",
        "localtimestamp", "transaction_timestamp", "statement_timestamp", "clock_timestamp",
        "timeofday",
    }
)

# Side effects, per-call results, or facts about this backend rather than about the data.
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
        "pg_column_size", "pg_my_temp_schema", "pg_listening_channels", "pg_jit_available",
        "pg_notification_queue_usage", "pg_safe_snapshot_blocking_pids", "pg_is_other_temp_schema",
    }
)
VOLATILE_PREFIXES: tuple[str, ...] = (
    "pg_sleep", "pg_advisory", "pg_try_advisory", "txid_",
    "pg_current_xact_id", "pg_xact_", "lo_", "pg_create_", "pg_drop_",
    "pg_replication_", "pg_logical_slot_", "pg_stat_", "pg_import_system_collations",
    "pg_ls_", "pg_read_", "pg_backup_", "pg_walfile_", "pg_wal_",
)

# Immutable or stable pg_catalog builtins that read nothing but their arguments, the session's
# settings, role and search_path (all part of the server-derived session identity in the key)
# or the catalogs (changed only by DDL, which evicts).
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
        "octet_length", "bit_length", "substring", "substr", "concat", "concat_ws", "btrim",
        "ltrim", "rtrim", "replace", "split_part", "left", "right", "lpad", "rpad",
        "position", "strpos", "md5", "sha224", "sha256", "sha384", "sha512", "format",
        "repeat", "reverse", "translate", "ascii", "chr", "quote_ident", "quote_literal",
        "quote_nullable", "regexp_replace", "regexp_match", "regexp_matches",
        "regexp_split_to_array", "regexp_split_to_table", "regexp_like", "regexp_count",
        "regexp_substr", "regexp_instr", "starts_with", "string_to_array", "string_to_table",
        "to_hex", "encode", "decode", "convert_from", "convert_to", "overlay", "normalize",
        "is_normalized", "to_ascii", "textlen", "like_escape", "similar_to_escape",
        "similar_escape",
        # math
        "abs", "round", "ceil", "ceiling", "floor", "trunc", "mod", "power", "pow", "sqrt",
        "cbrt", "exp", "ln", "log", "log10", "sign", "div", "pi", "degrees", "radians", "sin",
        "cos", "tan", "asin", "acos", "atan", "atan2", "width_bucket", "gcd", "lcm", "scale",
        "factorial", "numeric", "int4", "int8", "float8", "text",
        # dates (stable given TimeZone/DateStyle, which the session identity carries)
        "date_trunc", "date_bin", "extract", "date_part", "age", "to_char", "to_date",
        "to_timestamp", "to_number", "make_date", "make_time", "make_timestamp",
        "make_timestamptz", "make_interval", "justify_days", "justify_hours",
        "justify_interval", "isfinite", "timezone", "overlaps",
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
        "jsonb_path_query_array", "jsonb_path_query_first", "jsonb_contains",
        # arrays and sets
        "array_length", "array_to_string", "array_append", "array_prepend", "array_cat",
        "array_remove", "array_replace", "array_position", "array_positions", "array_dims",
        "array_lower", "array_upper", "array_ndims", "cardinality", "unnest",
        "generate_series", "generate_subscripts", "array_fill", "trim_array",
        # conversion, misc
        "num_nonnulls", "num_nulls", "to_regclass", "to_regtype", "format_type",
        "pg_typeof", "int4range", "int8range", "numrange", "tsrange", "tstzrange",
        "daterange", "lower_inc", "upper_inc", "isempty", "range_merge", "host", "masklen",
        "to_tsvector", "to_tsquery", "plainto_tsquery", "phraseto_tsquery",
        "websearch_to_tsquery", "ts_rank", "ts_rank_cd", "ts_headline", "setweight",
        "pg_collation_for", "xmlexists",
        # catalog helpers that drivers and psql use for introspection (catalogs change by DDL)
        "pg_get_expr", "pg_get_userbyid", "pg_table_is_visible", "pg_type_is_visible",
        "pg_function_is_visible", "pg_get_indexdef", "pg_get_constraintdef",
        "pg_get_viewdef", "pg_get_triggerdef", "pg_get_functiondef",
        "pg_get_function_arguments", "pg_get_function_result", "pg_encoding_to_char",
        "obj_description", "col_description", "shobj_description", "has_table_privilege",
        "has_schema_privilege", "has_column_privilege", "has_database_privilege",
        "has_function_privilege", "has_sequence_privilege", "pg_has_role", "array_in",
        # session facts that the session identity in every key already carries
        "current_user", "session_user", "user", "current_role", "current_database",
        "current_catalog", "current_schema", "current_schemas", "current_setting",
        "system_user",
    }
)

# Builtins that turn text from the data into typed values with the types' input functions,
# which read the clock for 'now' (a JSON field "now" read as a timestamptz column).
TEXT_TO_TYPED: frozenset[str] = frozenset(
    {
        "json_populate_record", "jsonb_populate_record", "json_populate_recordset",
        "jsonb_populate_recordset", "json_to_record", "jsonb_to_record", "json_to_recordset",
        "jsonb_to_recordset", "record_in", "xmltable",
    }
)

# Builtins that make values of a type they are given as a value, not named in the text (an
# OID, `'name'::regtype`, their first argument's type: a table's row): its input functions
# and its domains' CHECKs run, and a CHECK may call code of the user's that writes or SETs.
# Judged as code of the user's (the type named by a cast or a column list is judged by name).
MAKES_GIVEN_TYPE: frozenset[str] = frozenset(
    {
        "array_in", "record_in", "json_populate_record", "jsonb_populate_record",
        "json_populate_recordset", "jsonb_populate_recordset", "jsonb_populate_record_valid",
        "pg_input_is_valid", "pg_input_error_info",
    }
)

# Builtins that turn values into json with a type's own cast to json when the type is not a
# builtin and has one (json.c, `json_categorize_type`), even an explicit-only cast: a read
# calling one trusts that no cast to json runs code of the user's (relations.py, "cast json").
JSON_BUILDERS: frozenset[str] = frozenset(
    {
        "to_json", "to_jsonb", "row_to_json", "array_to_json", "json_agg", "jsonb_agg",
        "json_agg_strict", "jsonb_agg_strict", "json_object_agg", "jsonb_object_agg",
        "json_object_agg_strict", "jsonb_object_agg_strict", "json_object_agg_unique",
        "jsonb_object_agg_unique", "json_object_agg_unique_strict", "jsonb_object_agg_unique_strict",
        "json_build_object", "jsonb_build_object", "json_build_array", "jsonb_build_array",
    }
)

UNKNOWN_VOLATILITY = "whose volatility is unknown"

# Builtins that change other sessions' settings: a configuration reload makes every open
# backend read the configuration again (ALTER SYSTEM's values), with no SET in any of them
# and no ParameterStatus for most settings. Treated like code of the user's: everything is
# evicted and every session learns its identity again (see queries.py).
RELOADS_SETTINGS: frozenset[str] = frozenset({"pg_reload_conf"})


def call_reason(schema: str | None, name: str, args: int) -> str | None:
    """Why a call of ``[schema.]name`` with `args` arguments makes a query uncacheable, or
    None when it is a trusted builtin (still subject to the database's shadow check)."""
    if schema not in (None, "pg_catalog"):
        return f"calls function {schema}.{name}() {UNKNOWN_VOLATILITY}"
    if name in TIME_DEPENDENT:
        return f"calls time-dependent function {name}()"
    if name in RELOADS_SETTINGS:
        return f"calls {name}(), which changes the settings of every open session"
    if name in MAKES_GIVEN_TYPE:
        return f"calls {name}(), which runs the checks of a type it is given as a value: {UNKNOWN_VOLATILITY}"
    if name in TEXT_TO_TYPED:
        return f"calls {name}(), which converts text from the data (it could be 'now')"
    if name in VOLATILE_NAMES or name.startswith(VOLATILE_PREFIXES):
        return f"calls {name}(), which may answer differently each time (a volatile function)"
    if name == "age" and args < 2:
        return "calls time-dependent function age() with one argument"
    if name in SAFE_NAMES:
        return None
    return f"calls function {name}() {UNKNOWN_VOLATILITY}"
