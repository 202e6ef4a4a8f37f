"""A write through one cache evicts in every other cache the service serves (service.py):
the caches it names are the ones served at the time of the write, however they changed."""

from __future__ import annotations

from neonpoly.proxy.origin import Origin
from neonpoly.service import ProxyService, ProxySettings


def test_a_caches_siblings_follow_the_caches_added_and_removed() -> None:
    service = ProxyService(ProxySettings(listen=("127.0.0.1", 0)))
    origin = Origin.from_url("postgresql://u:p@127.0.0.1:5432/app")
    a = service.add_cache("a", origin).cache
    b = service.add_cache("b", origin).cache
    assert a is not None and b is not None
    assert list(a.siblings()) == [b] and list(b.siblings()) == [a]
    c = service.add_cache("c", origin).cache
    assert c is not None
    assert list(a.siblings()) == [b, c] and list(c.siblings()) == [a, b]
    service.remove_cache("b")
    assert list(a.siblings()) == [c] and list(c.siblings()) == [a]
    d = service.add_cache("b", origin).cache  # a new cache under a removed one's id
    assert d is not None
    assert list(a.siblings()) == [c, d] and list(d.siblings()) == [a, c]
