"""What the change feed says to the origin, as SQL: its checks and DDL detection.

DDL is not in the logical replication stream. Two ways to see it, the user picks one:

* `install` (with the user's consent: it adds objects to their database): an event trigger on
  `ddl_command_end` that calls `pg_logical_emit_message(true, 'neonpoly.ddl', tag)`, so DDL
  arrives in the stream itself, in commit order with the rows, at the stream's latency.
  Creating event triggers needs a superuser. The trigger's function swallows its own errors:
  a lowered wal_level must never make the user's DDL fail.
* `poll` (the default; nothing installed): a catalog fingerprint read every second or so on
  a second, ordinary connection, compared with the last one. The fingerprint is, per catalog
  that decides what a cached answer means, the row count and the sum of the rows' xmin:
  any insert, update or delete of a catalog row changes it (an update writes a new row
  version with a newer xmin), VACUUM and ANALYZE do not (they update pg_class in place and
  freezing keeps xmin). Temporary objects are left out, or every session creating a temp
  table would evict the database. Shared catalogs (role memberships) are fingerprinted apart:
  a change there evicts every database, as roles and grants do through neonpoly. Measured:
  ~3 ms of the origin's time per check on a database with 200 tables (0.3% of a core at one
  check a second).
"""

from __future__ import annotations

PUBLICATION = "neonpoly"
DDL_PREFIX = "neonpoly.ddl"
DDL_SCHEMA = "neonpoly"
DDL_FUNCTION = "emit_ddl"
DDL_TRIGGER = "neonpoly_ddl"
_MARK = "created by neonpoly's change feed"  # what neonpoly created says so (and only that is dropped)


def literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def preflight_sql(publication: str) -> str:
    """wal_level, the publication's state ('' missing, 'all', or 'partial'), and whether the
    DDL event trigger is installed and enabled ALWAYS (enabled the default way, it does not
    fire in sessions with session_replication_role = replica; install fixes it).
    A publication `publish_via_partition_root` is 'partial': pgoutput would name a
    partition's rows by its root, and a read of the partition itself is not tagged with its
    parent."""
    pub = literal(publication)
    return f"""\
SELECT pg_catalog.current_setting('wal_level'),
  COALESCE((SELECT CASE WHEN p.puballtables AND p.pubinsert AND p.pubupdate AND p.pubdelete AND p.pubtruncate
                   AND NOT COALESCE((pg_catalog.to_jsonb(p) OPERATOR(pg_catalog.->>) 'pubviaroot')::pg_catalog.bool,
                                    false)
                   THEN 'all' ELSE 'partial' END
            FROM pg_catalog.pg_publication p WHERE p.pubname OPERATOR(pg_catalog.=) {pub}), ''),
  EXISTS (SELECT FROM pg_catalog.pg_event_trigger e WHERE e.evtname OPERATOR(pg_catalog.=) {literal(DDL_TRIGGER)}
          AND e.evtenabled OPERATOR(pg_catalog.=) 'A')::pg_catalog.text
/* neonpoly: change feed */"""


def install_ddl_trigger_sql() -> str:
    """One implicit transaction: a schema of neonpoly's own (refused if the user has one of
    that name), the function, the event trigger."""
    schema, fn, mark = ident(DDL_SCHEMA), ident(DDL_FUNCTION), literal(_MARK)
    return f"""\
DO $neonpoly$ BEGIN
  IF NOT EXISTS (SELECT FROM pg_catalog.pg_namespace n
                 WHERE n.nspname OPERATOR(pg_catalog.=) {literal(DDL_SCHEMA)}) THEN
    CREATE SCHEMA {schema};
    COMMENT ON SCHEMA {schema} IS {mark};
  ELSIF pg_catalog.obj_description((SELECT n.oid FROM pg_catalog.pg_namespace n
        WHERE n.nspname OPERATOR(pg_catalog.=) {literal(DDL_SCHEMA)}), 'pg_namespace') IS DISTINCT FROM {mark} THEN
    RAISE EXCEPTION 'a schema named {DDL_SCHEMA} exists and is not neonpoly''s';
  END IF;
END $neonpoly$;
CREATE OR REPLACE FUNCTION {schema}.{fn}() RETURNS event_trigger
LANGUAGE plpgsql SECURITY DEFINER SET search_path = pg_catalog AS $fn$
BEGIN
  PERFORM pg_catalog.pg_logical_emit_message(true, {literal(DDL_PREFIX)}, tg_tag);
EXCEPTION WHEN OTHERS THEN
  NULL;  -- never fail the user's DDL
END $fn$;
DROP EVENT TRIGGER IF EXISTS {ident(DDL_TRIGGER)};
CREATE EVENT TRIGGER {ident(DDL_TRIGGER)} ON ddl_command_end EXECUTE FUNCTION {schema}.{fn}();
ALTER EVENT TRIGGER {ident(DDL_TRIGGER)} ENABLE ALWAYS"""


def drop_ddl_trigger_sql() -> str:
    """Drop the event trigger, its function and schema, only where they are neonpoly's."""
    schema, fn, mark = ident(DDL_SCHEMA), ident(DDL_FUNCTION), literal(_MARK)
    return f"""\
DO $neonpoly$ BEGIN
  IF EXISTS (SELECT FROM pg_catalog.pg_event_trigger e
             JOIN pg_catalog.pg_proc p ON p.oid OPERATOR(pg_catalog.=) e.evtfoid
             JOIN pg_catalog.pg_namespace n ON n.oid OPERATOR(pg_catalog.=) p.pronamespace
             WHERE e.evtname OPERATOR(pg_catalog.=) {literal(DDL_TRIGGER)}
             AND n.nspname OPERATOR(pg_catalog.=) {literal(DDL_SCHEMA)}
             AND p.proname OPERATOR(pg_catalog.=) {literal(DDL_FUNCTION)}) THEN
    DROP EVENT TRIGGER {ident(DDL_TRIGGER)};
  END IF;
  IF pg_catalog.obj_description((SELECT n.oid FROM pg_catalog.pg_namespace n
        WHERE n.nspname OPERATOR(pg_catalog.=) {literal(DDL_SCHEMA)}), 'pg_namespace')
     OPERATOR(pg_catalog.=) {mark} THEN
    DROP FUNCTION IF EXISTS {schema}.{fn}();
    BEGIN
      DROP SCHEMA {schema};
    EXCEPTION WHEN dependent_objects_still_exist THEN
      NULL;  -- something else lives there now: it stays
    END;
  END IF;
END $neonpoly$"""


# (catalog, alias, where) — `where` keeps temporary objects out.
_NOT_TEMP_REL = "{a}.{col} NOT IN (SELECT t.oid FROM pg_catalog.pg_class t WHERE t.relpersistence = 't')"
_NOT_TEMP_NS = (
    "{a}.{col} NOT IN (SELECT n.oid FROM pg_catalog.pg_namespace n"
    " WHERE n.nspname LIKE 'pg\\_temp\\_%' OR n.nspname LIKE 'pg\\_toast\\_temp\\_%')"
)
_LOCAL_CATALOGS: tuple[tuple[str, str | None], ...] = (
    ("pg_class", _NOT_TEMP_NS.format(a="x", col="relnamespace")),
    ("pg_attribute", _NOT_TEMP_REL.format(a="x", col="attrelid")),
    ("pg_attrdef", _NOT_TEMP_REL.format(a="x", col="adrelid")),
    ("pg_constraint", _NOT_TEMP_NS.format(a="x", col="connamespace")),
    ("pg_type", _NOT_TEMP_NS.format(a="x", col="typnamespace")),
    ("pg_namespace", None),
    ("pg_proc", None),
    ("pg_operator", None),
    ("pg_cast", None),
    ("pg_rewrite", _NOT_TEMP_REL.format(a="x", col="ev_class")),
    ("pg_trigger", _NOT_TEMP_REL.format(a="x", col="tgrelid")),
    ("pg_policy", None),
    ("pg_inherits", _NOT_TEMP_REL.format(a="x", col="inhrelid")),
    ("pg_extension", None),
    ("pg_description", None),  # COMMENT ON: obj_description() and col_description() are trusted
    # What trusted builtins and casts look up by name or OID at run time: to_tsvector('cfg', …),
    # COLLATE "c", an enum's labels, operator classes (ORDER BY), aggregates, ranges.
    ("pg_collation", None),
    ("pg_enum", None),
    ("pg_ts_config", None),
    ("pg_ts_config_map", None),
    ("pg_ts_dict", None),
    ("pg_ts_parser", None),
    ("pg_ts_template", None),
    ("pg_conversion", None),
    ("pg_opclass", None),
    ("pg_opfamily", None),
    ("pg_amop", None),
    ("pg_amproc", None),
    ("pg_aggregate", None),
    ("pg_range", None),
    ("pg_language", None),
)
# A configuration reload (pg_reload_conf, SIGHUP) changes the settings of every open session
# that did not SET them itself (search_path, bytea_output, …) without telling it: sessions
# learn their identity again and every entry goes, as for a role change.
_RELOADED = "pg_catalog.pg_conf_load_time()"
_SHARED_CATALOGS: tuple[tuple[str, str | None], ...] = (
    ("pg_auth_members", None),
    ("pg_database", None),
    ("pg_shdescription", None),  # COMMENT ON DATABASE/ROLE: shobj_description() is trusted
)


def _fingerprint(catalogs: tuple[tuple[str, str | None], ...], *extra: str) -> str:
    parts = list(extra)
    for catalog, where in catalogs:
        clause = f" WHERE {where}" if where else ""
        parts.append(
            "(SELECT pg_catalog.concat(pg_catalog.count(*), ':',"
            " pg_catalog.sum(x.xmin::pg_catalog.text::pg_catalog.int8))"
            f" FROM pg_catalog.{catalog} x{clause})"
        )
    return "pg_catalog.md5(pg_catalog.concat_ws(','," + ", ".join(parts) + "))"


def fingerprint_sql() -> str:
    """(local fingerprint, shared fingerprint): see the module's docstring."""
    return (
        f"SELECT {_fingerprint(_LOCAL_CATALOGS)}, {_fingerprint(_SHARED_CATALOGS, _RELOADED)}"
        " /* neonpoly: change feed DDL check */"
    )
