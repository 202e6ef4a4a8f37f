"""The `neonpoly` admin database (its wire endpoint and command grammar), the one client of
a running neonpoly's admin database, and the Prometheus endpoint. All read `service.report()`."""
