"""neonpoly's benchmark against direct PostgreSQL, PgBouncer and pgpool-II; `run.py` is the
entry point (`python benchmarks/run.py --help`). A package so that its modules import one
another as `benchmarks.<module>`, the way run.py and the type checker both see them.
"""
