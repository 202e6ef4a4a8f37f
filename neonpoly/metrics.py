"""Prometheus endpoint (`--metrics-listen HOST:PORT` → GET /metrics).

A custom collector turns StatsRecorder snapshots and store usage into metric families at
scrape time, so the proxy's hot path keeps only its own counters. The HTTP side is a tiny
asyncio server on the proxy's event loop rather than prometheus-client's threaded one:
StatsRecorder is not thread-safe, and scraping on the loop reads it between queries.

Latency: the recorder keeps log-bucket histograms without a running sum, so per-template
p50/p95 are exported as gauges with a `quantile` label (a Prometheus summary needs _sum).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from neonpoly.cache.rules import bare_tables

if TYPE_CHECKING:
    from neonpoly.admin import AdminConsole
    from neonpoly.service import ProxyService

log = logging.getLogger("neonpoly.metrics")

# Per-template series are bounded: the most called templates only, to cap cardinality.
TOP_TEMPLATES = 50


class StatsCollector(Collector):
    def __init__(self, service: ProxyService, console: AdminConsole | None = None) -> None:
        self.service = service
        self.console = console

    def describe(self) -> list[Metric]:
        return []  # families are only known at scrape time; skip registration-time collect

    def collect(self) -> Iterator[Metric]:
        service = self.service
        queries = CounterMetricFamily("neonpoly_queries", "Queries seen, by cache status.", labels=["cache", "status"])
        saved = CounterMetricFamily(
            "neonpoly_time_saved_seconds", "Origin time avoided by cache hits.", labels=["cache"]
        )
        served = CounterMetricFamily("neonpoly_served_bytes", "Bytes answered from the cache.", labels=["cache"])
        entries = GaugeMetricFamily("neonpoly_cache_entries", "Entries stored.", labels=["cache"])
        size = GaugeMetricFamily("neonpoly_cache_bytes", "Bytes stored.", labels=["cache"])
        limit = GaugeMetricFamily("neonpoly_cache_max_bytes", "Cache size bound.", labels=["cache"])
        conns = GaugeMetricFamily("neonpoly_connections", "Open client connections.", labels=["cache"])
        latency = GaugeMetricFamily(
            "neonpoly_query_duration_seconds",
            f"Query latency quantiles of hits and misses (top {TOP_TEMPLATES} templates).",
            labels=["cache", "template_id", "result", "quantile"],
        )
        ttl = GaugeMetricFamily(
            "neonpoly_template_ttl_seconds",
            "Current TTL of a query template.",
            labels=["cache", "template_id"],
        )
        stats = service.stats
        caches = sorted(set(service.routes.by_id) | set(stats.snapshot().caches))
        for cid in caches:
            snap = stats.snapshot(cid)
            for status, n in snap.totals.by_status:
                queries.add_metric([cid, status], n)
            saved.add_metric([cid], snap.totals.time_saved_s)
            served.add_metric([cid], snap.totals.bytes_served)
            conns.add_metric([cid], len(service.server.connections(cid)))
            route = service.routes.by_id.get(cid)
            if route is not None and route.cache is not None:
                usage = route.cache.store.usage()
                entries.add_metric([cid], usage.entries)
                size.add_metric([cid], usage.bytes)
                limit.add_metric([cid], usage.max_bytes)
            policy = self.console.policies.get(cid) if self.console is not None else None
            for t in snap.templates[:TOP_TEMPLATES]:
                for result, q, value in (
                    ("hit", "0.5", t.hit_p50_s),
                    ("hit", "0.95", t.hit_p95_s),
                    ("miss", "0.5", t.miss_p50_s),
                    ("miss", "0.95", t.miss_p95_s),
                ):
                    if value is not None:
                        latency.add_metric([cid, t.template_id, result, q], value)
                current = policy.decide(t.template_id, bare_tables(t.tables)).ttl if policy is not None else t.ttl
                if current is not None and (t.hits or t.misses):
                    ttl.add_metric([cid, t.template_id], current)
        yield from (queries, saved, served, entries, size, limit, conns, latency, ttl)


class MetricsServer:
    """GET /metrics over HTTP/1.1 (one request per connection) on the running event loop."""

    def __init__(self, service: ProxyService, console: AdminConsole | None = None) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(StatsCollector(service, console))
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
                status, ctype, body = "200 OK", CONTENT_TYPE_LATEST, self.render()
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
