"""neonpoly: a caching PostgreSQL proxy and the console that manages it."""

__version__ = "0.1.0"
