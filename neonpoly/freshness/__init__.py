"""Freshness beyond what this process sees: the origin's change feed (logical replication).

`pgoutput` decodes the stream (no I/O), `libpq` drives a libpq connection on the event loop,
`origin_sql` holds what is said to the origin, `changefeed` is one feed of one database and
`feeds` decides which feeds run. The service owns a `FeedManager` and its sinks.
"""
