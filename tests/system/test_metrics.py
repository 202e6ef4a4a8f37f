"""`/metrics` as Prometheus scrapes it from a serve of the state dir: integration names as
`cache_name`, the build and the process, and a page at `/` that links to it."""

from __future__ import annotations

from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from neonpoly import __version__
from neonpoly.control.serving import start_serving
from neonpoly.service import ProxyService, ProxySettings
from tests.pgharness import PgServer
from tests.system.conftest import DATABASE, ROLE, psql, run_cli


async def test_metrics_name_caches_and_describe_the_build(pg: PgServer, state_root: Path) -> None:
    await run_cli("integrations", "add", "--upstream", pg.url(ROLE, DATABASE, "require"), "--name", "shop")
    service = ProxyService(ProxySettings(listen=("127.0.0.1", 0), cache_dir=state_root / "cache"))
    running = await start_serving(service, state_root, follow=False, metrics_listen=("127.0.0.1", 0))
    try:
        [served] = running.served
        host, port = running.address
        await psql(served.connection_string(host, port), "SELECT 1")
        assert running.metrics is not None
        mhost, mport = running.metrics.address
        async with httpx.AsyncClient(base_url=f"http://{mhost}:{mport}") as http:
            page = await http.get("/")
            metrics = await http.get("/metrics")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert 'href="/metrics"' in page.text
        families = {f.name: f for f in text_string_to_metric_families(metrics.text)}

        [build] = families["neonpoly_build_info"].samples
        assert (build.name, build.labels, build.value) == ("neonpoly_build_info", {"version": __version__}, 1.0)
        assert families["process_cpu_seconds"].samples[0].value >= 0
        assert families["process_resident_memory_bytes"].samples[0].value > 0

        cache_id = served.integration.cache_id
        calls = [s for s in families["neonpoly_queries"].samples if s.name == "neonpoly_queries_total"]
        assert calls and all(s.labels["cache_name"] == "shop" and s.labels["cache"] == cache_id for s in calls)
        [conns] = families["neonpoly_connections"].samples
        assert conns.labels == {"cache": cache_id, "cache_name": "shop"}
    finally:
        await running.close(grace=0.5)
