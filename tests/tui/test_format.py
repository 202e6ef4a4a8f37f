"""The console's wording of figures and statuses (neonpoly.tui.format) and of the string."""

from __future__ import annotations

import pytest

from neonpoly.stats import HIT, MISS
from neonpoly.tui import format as fmt
from neonpoly.tui.widgets.conn_string import url_parts, wrap_parts

URL = "postgres://neondb_owner:npg_s3cr3tPassw0rd@127.0.0.1:6543/neondb?application_name=5f0c&x=1"


@pytest.mark.parametrize(
    ("seconds", "shown"),
    [(0.0, "0 ms"), (0.0004, "0.4 ms"), (0.0012, "1.2 ms"), (0.35, "350 ms"), (1.5, "1.5 s"),
     (75, "1m 15s"), (7300, "2h 01m")],
)
def test_time_saved_reads_in_ms_under_a_second(seconds: float, shown: str) -> None:
    assert fmt.duration(seconds) == shown


def test_hit_and_miss_read_cacheable_never_cached() -> None:
    # A hit or miss says the template can be cached, not that an entry is stored now.
    assert fmt.status_word(HIT) == fmt.status_word(MISS) == "cacheable"
    assert fmt.status_word("uncacheable") == "not cacheable"
    assert fmt.status_word("") == fmt.DASH
    assert fmt.status_word("newstatus") == "newstatus"  # an unknown word is shown as is
    assert all(len(word) <= 15 for word in fmt.STATUS_WORDS.values())  # the column's width


@pytest.mark.parametrize(
    ("status", "reason", "explained"),
    [
        ("uncacheable", "not cacheable (uncacheable)", fmt.STATUS_EXPLANATIONS["uncacheable"]),
        ("uncacheable", "uncacheable", fmt.STATUS_EXPLANATIONS["uncacheable"]),
        ("volatile", "volatile", fmt.STATUS_EXPLANATIONS["volatile"]),
        ("uncacheable", "uncacheable: COPY", "COPY"),
        ("uncacheable", "writes table products", "writes table products"),
        ("volatile", "calls time-dependent function now()", "calls time-dependent function now()"),
        ("notaquery", "transaction control (AND CHAIN opens the next transaction)",
         "transaction control (AND CHAIN opens the next transaction)"),
        (HIT, None, fmt.STATUS_EXPLANATIONS[HIT]),
        (MISS, "", fmt.STATUS_EXPLANATIONS[MISS]),
    ],
)
def test_a_reason_never_repeats_the_status(status: str, reason: str | None, explained: str) -> None:
    assert fmt.status_explanation(status, reason) == explained


def test_every_status_has_a_word_and_an_explanation() -> None:
    from neonpoly.cache.classification import Status

    for status in Status:
        assert status.value in fmt.STATUS_WORDS and status.value in fmt.STATUS_EXPLANATIONS


def test_url_parts_join_back_and_split_between_parts() -> None:
    parts = url_parts(URL)
    assert "".join(parts) == URL
    assert parts == ["postgres://neondb_owner:npg_s3cr3tPassw0rd@", "127.0.0.1:6543", "/neondb",
                     "?application_name=5f0c", "&x=1"]
    assert url_parts("not a url") == ["not a url"]


@pytest.mark.parametrize("width", [10, 20, 43, 56, 80, 200])
def test_wrap_parts_fits_the_width(width: int) -> None:
    lines = wrap_parts(URL, width)
    assert "".join(lines) == URL and all(len(line) <= width for line in lines)
    if width >= 43:  # the longest part fits: no line ends inside a part
        ends = {sum(len(p) for p in url_parts(URL)[: i + 1]) for i in range(len(url_parts(URL)))}
        assert {sum(len(line) for line in lines[: i + 1]) for i in range(len(lines))} <= ends


def test_freshness_line_says_what_follows_the_origin_and_why_not() -> None:
    from neonpoly.control.interface import Freshness

    live = Freshness(feed="on (lag 2 ms)", following=True, changes=1, ddl=0, gaps=2, last_change=1000.0)
    assert fmt.freshness(live, now=1012.4) == "change feed on (lag 2 ms) · 1 change caught · 2 gaps · last 12 s ago"
    off = Freshness(feed="off: wal_level is replica", following=False, changes=0, ddl=0, gaps=0, last_change=None)
    assert fmt.freshness(off, now=0) == "change feed off: wal_level is replica"
    assert fmt.freshness(None, now=0) == fmt.DASH
    assert fmt.ago(7200) == "2 h ago" and fmt.ago(90) == "1 min ago"
    shared = Freshness(feed="standby: node b runs it", following=False, changes=0, ddl=0, gaps=0, last_change=None,
                       plane="up, 2 nodes, lag 1 ms")
    assert fmt.freshness(shared, now=0) == "change feed standby: node b runs it · plane up, 2 nodes, lag 1 ms"
    slotted = Freshness(feed="on (lag 2 ms)", following=True, changes=0, ddl=0, gaps=0, last_change=None,
                        slot="neonpoly_1a2b3c4d5e6f")
    # The slot goes last: at 80 columns the line is cut at its end, and the counts matter more.
    assert fmt.freshness(slotted, now=0) == "change feed on (lag 2 ms) · 0 changes caught · slot neonpoly_1a2b3c4d5e6f"
