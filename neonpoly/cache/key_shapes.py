"""Key conjuncts of texts that differ only in their integer literals, without parsing again.

A write by primary key (`UPDATE t SET v = v + 17 WHERE id = 42`) comes with new numbers each
time, and reading its key values back from each new text by parsing it (keys.key_refs on the
parser's tree) is a third of such a write's CPU in the proxy. This module learns, once per
*shape* of text, which integer literal of the text every key value comes from, and from then
on reads the values of a text of that shape straight out of its digits.

What makes that as exact as the parser, text by text:

* A text's shape is the tuple of its segments between *digit runs* (`_RUN`: a number not
  glued to a word, `$`, `.` or `'`). Two texts of one shape are the same characters except
  inside those runs. Only texts of ASCII characters without `"` take part: any other
  character may be part of an identifier to PostgreSQL's lexer (`t€1`, `"t 1"`), where
  a regex would see a separate number.
* Every run of a text taking the shortcut is 1 to 9 ASCII digits: to the lexer such a run,
  with those neighbours, is either one whole integer token that fits an int4 (never a float,
  whatever its digits) or a part of a string or comment (where its digits change no token).
  So two such texts of one shape lex to the same tokens but for integer values and the
  contents of strings and comments, and the grammar builds the same tree for both but for
  those values. Anything else (`1.5`, `1e3`, ten digits and more) goes to the parser.
* The mapping from runs to key values is learnt from the parser, and checked by it: the
  first text of a shape is parsed (as before), and so is a *probe*, the same text with every
  run replaced by a distinct sentinel. A key value of the probe that is ± one sentinel comes
  from that run, with that sign (a minus folded into the constant); the first text's own
  key values must then be exactly what the mapping gives for its runs. Key values that do
  not follow a run (`0x10`, or any doubt) make the shape one the parser always answers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from neonpoly.cache.keys import KeyRef

# The numbers policy.classify's shapes replace, as one group so that split() also returns them.
_RUN = re.compile(r"(\d(?<![\w$.']\d)\d*(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w.]))")
# At most 9 digits: always below 2**31, so the lexer makes an int4 constant of it.
_MAX_DIGITS = 9
# Sentinels for the probe: 9 digits each, distinct, and none a value anything else spells
# in a text of at most MAX_RUNS runs (checked against the first text's values too).
_SENTINEL_BASE = 900_000_001
MAX_RUNS = 64
MAX_SHAPES = 4096
MAX_CHARS = 4096  # texts longer than this are parsed (keys of the shapes: 16 MB at worst)


@dataclass(frozen=True, slots=True)
class RefPlan:
    """One KeyRef of the shape, its literals read from runs: (run index, sign) each."""

    write: bool
    table: str
    column: str
    sources: tuple[tuple[int, int], ...]
    params: tuple[int, ...]


# A shape the parser answers each time (its key values do not all follow runs).
_UNPLANNABLE: tuple[RefPlan, ...] | None = None
_plans: dict[tuple[str, ...], tuple[RefPlan, ...] | None] = {}


def _split(sql: str) -> list[str] | None:
    """The text as segment, run, segment, …, segment, for one that may take the shortcut."""
    if len(sql) > MAX_CHARS or '"' in sql or not sql.isascii():
        return None
    parts = _RUN.split(sql)
    if len(parts) > 2 * MAX_RUNS + 1:
        return None
    for run in parts[1::2]:
        if len(run) > _MAX_DIGITS or not run.isdigit():  # ASCII only: isdigit() is [0-9]
            return None
    return parts


# Characters after which `classify`'s shape of a text (policy._shape) may differ from the
# text with every run of `_RUN` as 0: quotes and escapes (numbers inside strings are kept),
# dollar signs (dollar quotes, placeholders) and `@` (policy._NUMBER keeps a number after it);
# and those `_split` refuses (quoted names, any non-ASCII character): one scan for all.
_NOT_SHAPED_ALIKE = re.compile(r"""['\\$@"\x80-\U0010ffff]""")


def shape_of(sql: str) -> tuple[tuple[str, ...], list[str]] | None:
    """(shape, runs) of a text whose shape is also the one `policy.classify` shares its
    classification by (so texts of one shape have one classification and one plan here),
    from one regex pass; None: not such a text."""
    if _NOT_SHAPED_ALIKE.search(sql) is not None:
        return None
    parts = _split(sql)
    if parts is None:
        return None
    return tuple(parts[0::2]), parts[1::2]


def matcher(shape: tuple[str, ...]) -> re.Pattern[str]:
    """A pattern that matches a text whole exactly when `shape_of` gives it this shape (the
    runs: the match's groups, `runs_by`), from one literal comparison instead of two scans.

    Each segment must be there as it is, each run be 1 to 9 ASCII digits. Such a text differs
    from the one the shape came from only in its digit runs, and every character `_RUN` looks
    at around and inside a run is of the same class in both, a digit for a digit (a run is
    never glued to a word character, `$`, `.` or `'` before it, nor to a word character or
    `.` after it: its digits end where a segment starts). So `_RUN` splits it at the same
    places, every run passes `_split`'s checks, and the segments hold no character `shape_of`
    refuses. No segment has a digit next to a run, so the runs are read in one way only.
    Conversely every text `shape_of` gives this shape matches (its runs are 1 to 9 digits):
    for a text within MAX_CHARS, `runs_by` answers exactly as `shape_of` would."""
    return re.compile("([0-9]{1,9})".join([re.escape(segment) for segment in shape]))


def runs_by(pattern: re.Pattern[str], sql: str) -> tuple[str, ...] | None:
    """The runs of `sql` when it is of the shape `pattern` was made for (`matcher`)."""
    if len(sql) > MAX_CHARS:
        return None  # `_split` leaves it to the parser
    found = pattern.fullmatch(sql)
    return None if found is None else found.groups()


def plan_of(shape: tuple[str, ...]) -> tuple[RefPlan, ...] | None:
    """The learnt plan of a shape (None: not learnt, or one the parser always answers)."""
    return _plans.get(shape)


def known(sql: str) -> tuple[KeyRef, ...] | None:
    """The key conjuncts of `sql` from its shape's plan; None: not known, ask the parser."""
    parts = _split(sql)
    if parts is None:
        return None
    plan = _plans.get(tuple(parts[0::2]))
    if plan is None:
        return None
    runs = parts[1::2]
    return tuple(
        [
            KeyRef(p.write, p.table, p.column, tuple([sign * int(runs[i]) for i, sign in p.sources]), p.params)
            for p in plan
        ]
    )


def learn(sql: str, refs: tuple[KeyRef, ...], parse_refs: Callable[[str], tuple[KeyRef, ...] | None]) -> None:
    """After the parser found `refs` in `sql`: learn its shape's plan, checked by parsing a
    probe (`parse_refs`: the key conjuncts of a text by the parser, None when it has none
    to give, a parse error or more than one statement)."""
    parts = _split(sql)
    if parts is None or not any(r.literals for r in refs):
        return  # nothing to read from digits: the callers' own memo keeps the answer
    shape = tuple(parts[0::2])
    if shape in _plans:
        return
    values = [int(run) for run in parts[1::2]]
    sentinels = [_SENTINEL_BASE + 2 * i for i in range(len(values))]
    plan: tuple[RefPlan, ...] | None = _UNPLANNABLE
    if not any(s == v for s, v in zip(sentinels, values, strict=True)):
        probe = "".join(p if k % 2 == 0 else str(sentinels[k // 2]) for k, p in enumerate(parts))
        plan = _plan(refs, parse_refs(probe), values, {s: i for i, s in enumerate(sentinels)})
    if len(_plans) >= MAX_SHAPES:
        del _plans[next(iter(_plans))]
    _plans[shape] = plan


def _plan(
    refs: tuple[KeyRef, ...], probed: tuple[KeyRef, ...] | None, values: list[int], runs_of: dict[int, int]
) -> tuple[RefPlan, ...] | None:
    """The plan when the probe's key conjuncts are the text's with every literal swapped for
    the sentinel of one run (and so the text's own literal is that run's value)."""
    if probed is None or len(probed) != len(refs):
        return _UNPLANNABLE
    plan: list[RefPlan] = []
    for own, ref in zip(refs, probed, strict=True):
        if (own.write, own.table, own.column, own.params) != (ref.write, ref.table, ref.column, ref.params):
            return _UNPLANNABLE
        if len(own.literals) != len(ref.literals):
            return _UNPLANNABLE
        sources: list[tuple[int, int]] = []
        for mine, seen in zip(own.literals, ref.literals, strict=True):
            run = runs_of.get(abs(seen))
            sign = -1 if seen < 0 else 1
            if run is None or mine != sign * values[run]:
                return _UNPLANNABLE  # not a run's value (a constant of the shape, or a doubt)
            sources.append((run, sign))
        plan.append(RefPlan(ref.write, ref.table, ref.column, tuple(sources), ref.params))
    return tuple(plan)
