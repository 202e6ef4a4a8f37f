"""Who a session is, as the server says: the identity that keys every cached answer.

Two sessions may share an answer only if the server would give them the same one. What the
proxy could read from the startup packet and from SET statements is not enough: role and
database defaults (ALTER ROLE … SET), settings changed by server code (a trigger calling
set_config), SET SESSION AUTHORIZATION, a role dropped and re-created under the same name,
quoting (`SET search_path = 'a, b'`), temporary tables that shadow a table's name. So the
session asks the server, in its own idle time, with one query whose every function and
operator is qualified with pg_catalog (nothing the client's session defines can change it):

* the OIDs of the session user and the current user (the database is in the key by name);
* every setting, with its current value (custom settings such as `app.tenant` included);
* the custom settings any cached query reads with current_setting() (`app.tenant` for a
  row-level-security policy: placeholders are not listed in pg_settings);
* its temporary schema, and whether anything lives in it (relations, types, functions): a
  session with temporary objects may see its own versions of any name, so it is keyed as
  itself alone (and their end, which no DDL statement says, evicts: see SessionState);
* the schemas on its search_path, so that a builtin trusted by name is checked against
  the rivals the session can actually see (see cache/relations.py).

It is asked again after anything that may have changed it (SET, RESET, DISCARD, DDL, CALL, DO,
code the classifier cannot vouch for, a write that runs triggers, a ParameterStatus that
differs); until the answer is in, the session's queries are not cached.
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Iterable
from dataclasses import dataclass

from neonpoly import pgwire

# Statement names a client cannot pick by accident or on purpose: the lookups Close and Parse
# them in the client's session, which would destroy a client statement of the same name.
_TOKEN = secrets.token_hex(8)
STATEMENT = f"neonpoly_identity_{_TOKEN}"
LOOKUP_STATEMENT = f"neonpoly_lookup_{_TOKEN}"
_EQ = "OPERATOR(pg_catalog.=)"
_NE = "OPERATOR(pg_catalog.<>)"
SQL = f"""\
SELECT pg_catalog.concat_ws(' ',
  pg_catalog.to_regrole(pg_catalog.quote_ident(SESSION_USER))::pg_catalog.oid,
  pg_catalog.to_regrole(pg_catalog.quote_ident(CURRENT_USER))::pg_catalog.oid,
  pg_catalog.pg_my_temp_schema()),
  (SELECT pg_catalog.encode(pg_catalog.sha256(pg_catalog.convert_to(pg_catalog.string_agg(
     pg_catalog.concat(s.name, '=', s.setting), pg_catalog.chr(10) ORDER BY s.name), 'UTF8')), 'hex')
   FROM pg_catalog.pg_show_all_settings() s),
  CASE WHEN pg_catalog.pg_my_temp_schema() {_NE} 0::pg_catalog.oid THEN
   (EXISTS (SELECT 1 FROM pg_catalog.pg_class c WHERE c.relnamespace {_EQ} pg_catalog.pg_my_temp_schema())
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_type t WHERE t.typnamespace {_EQ} pg_catalog.pg_my_temp_schema())
    OR EXISTS (SELECT 1 FROM pg_catalog.pg_proc p WHERE p.pronamespace {_EQ} pg_catalog.pg_my_temp_schema())
   )::pg_catalog.text ELSE 'false' END,
  (SELECT pg_catalog.string_agg(n::pg_catalog.text, pg_catalog.chr(1))
   FROM pg_catalog.unnest(pg_catalog.current_schemas(false)) n),
  (SELECT pg_catalog.string_agg(pg_catalog.concat(c, '=',
     COALESCE(pg_catalog.current_setting(c, true), pg_catalog.chr(1))), pg_catalog.chr(10) ORDER BY c)
   FROM pg_catalog.unnest($1::pg_catalog.text[]) c) /* neonpoly: session identity */"""


@dataclass(frozen=True, slots=True)
class Identity:
    key: bytes  # what cache keys hold
    schemas: frozenset[str] | None  # the search_path's schemas; None: could not tell
    settings: frozenset[str]  # the custom settings the key covers
    epoch: int = 0  # the cache's DDL epoch when asked: DDL anywhere may change the answer
    temp: bool = False  # it has temporary objects (other sessions' catalog helpers see them)


def request(settings: Iterable[str]) -> bytes:
    """The lookup as extended-protocol messages with a statement of our own (a simple Query
    would drop the client's unnamed prepared statement), ending in Sync."""
    return pgwire.extended_request(STATEMENT, SQL, [pgwire.text_array(sorted(settings))])


def parse(row: list[bytes | None], private: bytes, settings: Iterable[str], epoch: int) -> Identity:
    """The identity from the lookup's one row; `private` (unique to the session) is mixed in
    when the session has temporary objects."""
    ids, all_settings, has_temp, schemas, custom = (row + [None] * 5)[:5]
    h = hashlib.blake2b(digest_size=20)
    for part in (ids, all_settings, custom, schemas):
        h.update((part or b"") + b"\x00")
    if has_temp == b"true":
        h.update(b"temp\x00" + private)
    names = (schemas or b"").decode("utf-8", "replace")
    schema_set = frozenset(names.split("\x01")) if names else frozenset()
    if has_temp == b"true":
        # Its temporary schema is searched first for types (relations.py lists the types of
        # every temporary schema as rivals in "pg_temp"): a temporary domain named `text`
        # is what `'x'::text` makes, with that domain's checks.
        schema_set |= {"pg_temp"}
    return Identity(h.digest(), schema_set, frozenset(settings), epoch, has_temp == b"true")
