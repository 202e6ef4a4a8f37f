"""Prometheus endpoint (`--metrics-listen HOST:PORT` → GET /metrics).

`GET /` is a page linking to /metrics. A custom collector turns StatsRecorder snapshots and
store usage into metric families at scrape time, so the proxy's hot path keeps only its own counters. The HTTP side
is a tiny asyncio server on the proxy's event loop rather than prometheus-client's threaded one:
StatsRecorder is not thread-safe, and scraping on the loop reads it between queries.

Latency: the recorder keeps log-bucket histograms without a running sum, so per-template
p50/p95 are exported as gauges with a `quantile` label (a Prometheus summary needs _sum).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from neonpoly import __version__

if TYPE_CHECKING:
    from neonpoly.service import ProxyService, ServiceReport

log = logging.getLogger("neonpoly.metrics")

# Per-template series are bounded: the most called templates only, to cap cardinality.
TOP_TEMPLATES = 50


class StatsCollector(Collector):
    """Metric families from `service.report()`, the read model the admin console also shows."""

    def __init__(self, service: ProxyService) -> None:
        self.service = service
        self.given: ServiceReport | None = None  # every worker's figures, gathered before a scrape

    def describe(self) -> list[Metric]:
        return []  # families are only known at scrape time; skip registration-time collect

    def collect(self) -> Iterator[Metric]:
        service = self.service
        cache = ["cache", "cache_name"]  # the id clients send, and the integration's name
        build = InfoMetricFamily("neonpoly_build", "neonpoly's version.", value={"version": __version__})
        queries = CounterMetricFamily("neonpoly_queries", "Queries seen, by cache status.", labels=[*cache, "status"])
        saved = CounterMetricFamily("neonpoly_time_saved_seconds", "Origin time avoided by cache hits.", labels=cache)
        served = CounterMetricFamily("neonpoly_served_bytes", "Bytes answered from the cache.", labels=cache)
        entries = GaugeMetricFamily("neonpoly_cache_entries", "Entries stored.", labels=cache)
        size = GaugeMetricFamily("neonpoly_cache_bytes", "Bytes stored.", labels=cache)
        limit = GaugeMetricFamily("neonpoly_cache_max_bytes", "Cache size bound.", labels=cache)
        conns = GaugeMetricFamily("neonpoly_connections", "Open client connections.", labels=cache)
        latency = GaugeMetricFamily(
            "neonpoly_query_duration_seconds",
            f"Query latency quantiles of hits and misses (top {TOP_TEMPLATES} templates).",
            labels=[*cache, "template_id", "result", "quantile"],
        )
        ttl = GaugeMetricFamily(
            "neonpoly_template_ttl_seconds",
            "Current TTL of a query template.",
            labels=[*cache, "template_id"],
        )
        feed_live = GaugeMetricFamily(
            "neonpoly_change_feed_live", "1 while the origin's change feed of a database is live.",
            labels=["cache", "cache_name", "database"],
        )
        feed_lag = GaugeMetricFamily(
            "neonpoly_change_feed_lag_seconds", "Commit on the origin to applied here, last change.",
            labels=["cache", "cache_name", "database"],
        )
        feed_changes = CounterMetricFamily(
            "neonpoly_change_feed_changes", "Committed transactions the change feed applied.",
            labels=["cache", "cache_name", "database"],
        )
        feed_events = CounterMetricFamily(
            "neonpoly_change_feed_evictions", "Databases evicted by the change feed, by why (ddl, gap).",
            labels=["cache", "cache_name", "database", "why"],
        )
        plane_up = GaugeMetricFamily(
            "neonpoly_plane_up", "1 while the invalidation plane (Redis) is up; 0 while passing through.",
        )
        plane_nodes = GaugeMetricFamily("neonpoly_plane_nodes", "Live nodes seen on the invalidation plane.")
        plane_caught_up = GaugeMetricFamily(
            "neonpoly_plane_caught_up", "1 while provably caught up with an origin's stream (hits served).",
            labels=["origin"],
        )
        plane_lag = GaugeMetricFamily(
            "neonpoly_plane_lag_seconds", "Published on another node to applied here, last bump.", labels=["origin"],
        )
        plane_bumps = CounterMetricFamily(
            "neonpoly_plane_bumps", "Generation bumps on the invalidation plane, by direction.",
            labels=["origin", "direction"],
        )
        plane_gaps = CounterMetricFamily(
            "neonpoly_plane_gaps", "Purges for a gap in the invalidation plane.", labels=["origin"],
        )
        plane_refused = CounterMetricFamily(
            "neonpoly_plane_refused_hits", "Lookups passed through while not provably caught up.", labels=["origin"],
        )
        plane_holds = CounterMetricFamily(
            "neonpoly_plane_holds", "Published batches whose write replies waited, by how they ended.",
            labels=["ended"],
        )
        names = service.names

        def label(cache_id: str) -> list[str]:
            return [cache_id, names.get(cache_id, cache_id)]

        report = self.given if self.given is not None else service.report()
        for c in report.caches:
            for f in c.feeds:
                labels = [*label(c.cache_id), f.database]
                feed_live.add_metric(labels, 1.0 if f.state == "live" else 0.0)
                if f.lag_ms is not None:
                    feed_lag.add_metric(labels, f.lag_ms / 1000)
                feed_changes.add_metric(labels, f.changes)
                feed_events.add_metric([*labels, "ddl"], f.ddl)
                feed_events.add_metric([*labels, "gap"], f.gaps)
            cid = label(c.cache_id)
            for status, n in c.totals.by_status:
                queries.add_metric([*cid, status], n)
            saved.add_metric(cid, c.totals.time_saved_s)
            served.add_metric(cid, c.totals.bytes_served)
            conns.add_metric(cid, c.connections)
            if c.mode != "disabled":
                entries.add_metric(cid, c.entries)
                size.add_metric(cid, c.bytes)
                limit.add_metric(cid, c.max_bytes)
        shown: dict[str, int] = {}
        for r in report.templates:  # most called first
            t = r.stats
            if shown.get(t.cache_id, 0) >= TOP_TEMPLATES:
                continue
            shown[t.cache_id] = shown.get(t.cache_id, 0) + 1
            for result, q, value in (
                ("hit", "0.5", t.hit_p50_s),
                ("hit", "0.95", t.hit_p95_s),
                ("miss", "0.5", t.miss_p50_s),
                ("miss", "0.95", t.miss_p95_s),
            ):
                if value is not None:
                    latency.add_metric([*label(t.cache_id), t.template_id, result, q], value)
            if r.ttl is not None and (t.hits or t.misses):
                ttl.add_metric([*label(t.cache_id), t.template_id], r.ttl)
        yield from (build, queries, saved, served, entries, size, limit, conns, latency, ttl)
        yield from (feed_live, feed_lag, feed_changes, feed_events)
        plane = report.plane
        if plane is not None:
            plane_up.add_metric([], 1.0 if plane.state == "up" else 0.0)
            plane_nodes.add_metric([], len(plane.nodes))
            for o in plane.origins:
                plane_caught_up.add_metric([o.origin], 1.0 if o.caught_up else 0.0)
                if o.lag_ms is not None:
                    plane_lag.add_metric([o.origin], o.lag_ms / 1000)
                plane_bumps.add_metric([o.origin, "published"], o.published)
                plane_bumps.add_metric([o.origin, "applied"], o.applied)
                plane_gaps.add_metric([o.origin], o.gaps)
                plane_refused.add_metric([o.origin], o.refused_hits)
            plane_holds.add_metric(["acknowledged"], plane.holds - plane.hold_timeouts)
            plane_holds.add_metric(["timeout"], plane.hold_timeouts)
            yield from (plane_up, plane_nodes, plane_caught_up, plane_lag, plane_bumps, plane_gaps, plane_refused,
                        plane_holds)


INDEX = (
    b"<!doctype html><html><head><title>neonpoly metrics</title></head><body>"
    b"<h1>neonpoly</h1><p><a href=\"/metrics\">/metrics</a>: Prometheus metrics of this proxy.</p>"
    b"</body></html>\n"
)


class MetricsServer:
    """GET /metrics over HTTP/1.1 (one request per connection) on the running event loop."""

    def __init__(self, service: ProxyService) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.collector = StatsCollector(service)
        self.registry.register(self.collector)
        # Set by a worker of `serve --workers N`: every worker's report, merged.
        self.gather: Callable[[], Awaitable[ServiceReport]] | None = None
        ProcessCollector(registry=self.registry)  # process_cpu_seconds_total, resident memory, fds …
        self._server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> tuple[str, int]:
        self._server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        sock = self._server.sockets[0].getsockname()
        log.info("metrics on http://%s:%d/metrics", sock[0], sock[1])
        return sock[0], sock[1]

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None
        sock = self._server.sockets[0].getsockname()
        return sock[0], sock[1]

    def render(self) -> bytes:
        return generate_latest(self.registry)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            parts = head.split(b"\r\n", 1)[0].split()
            method, path = (parts[0], parts[1]) if len(parts) >= 2 else (b"", b"")
            if method not in (b"GET", b"HEAD"):
                status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
            elif path.split(b"?")[0] == b"/metrics":
                if self.gather is not None:
                    self.collector.given = await self.gather()
                try:
                    status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
                finally:
                    self.collector.given = None
            elif path.split(b"?")[0] == b"/":
                status, ctype, body = "200 OK", "text/html; charset=utf-8", INDEX
            else:
                status, ctype, body = "404 Not Found", "text/plain", b"see /metrics\n"
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
            )
            if method != b"HEAD":
                writer.write(body)
            await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, OSError):
            pass
        finally:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(1.0):
                    await self._server.wait_closed()
            self._server = None
