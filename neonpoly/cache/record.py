"""The on-disk record: one cache entry as bytes, checksummed, with its header readable alone.

Layout: MAGIC | version | blake2b(header + payload) | u32 header length | header | payload.
A record that does not decode (torn write, another version, another key) is no entry.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

from neonpoly.cache.entry import CacheEntry
from neonpoly.cache.invalidation import GenerationStamp

_MAGIC = b"NPC"
_FORMAT_VERSION = 1
_DIGEST_SIZE = 16
_PREFIX = struct.Struct(f">3sB{_DIGEST_SIZE}sI")


def encode_record(key: bytes, entry: CacheEntry) -> bytes:
    header = json.dumps(
        {
            "key": key.hex(),
            "db": entry.database,
            "tables": sorted(entry.tables),
            "tpl": entry.template_id,
            "stamp": entry.stamp.to_json(),
            "created": entry.created_at,
            "ttl": entry.ttl,
        },
        separators=(",", ":"),
    ).encode()
    digest = hashlib.blake2b(header, digest_size=_DIGEST_SIZE)
    digest.update(entry.payload)
    prefix = _PREFIX.pack(_MAGIC, _FORMAT_VERSION, digest.digest(), len(header))
    return b"".join((prefix, header, entry.payload))


def _entry_from_header(header: dict[str, Any], payload: bytes) -> CacheEntry:
    return CacheEntry(
        payload=payload,
        database=str(header["db"]),
        tables=frozenset(str(t) for t in header["tables"]),
        template_id=str(header["tpl"]),
        stamp=GenerationStamp.from_json(header["stamp"]),
        created_at=float(header["created"]),
        ttl=float(header["ttl"]),
    )


def decode_record(key: bytes, raw: object, *, verify: bool = True) -> CacheEntry | None:
    """The entry a record holds, or None when it is not a well-formed record for this key.

    With verify=False `raw` may be just a prefix (header scans for purges); the payload is
    then empty and the checksum is not checked."""
    if not isinstance(raw, bytes) or len(raw) < _PREFIX.size:
        return None
    try:
        magic, version, digest, header_len = _PREFIX.unpack_from(raw)
        if magic != _MAGIC or version != _FORMAT_VERSION:
            return None
        start = _PREFIX.size
        header_bytes = raw[start : start + header_len]
        payload = raw[start + header_len :] if verify else b""
        if verify:
            check = hashlib.blake2b(header_bytes, digest_size=_DIGEST_SIZE)
            check.update(payload)
            if check.digest() != digest:
                return None
        header = json.loads(header_bytes)
        if header["key"] != key.hex():
            return None
        return _entry_from_header(header, payload)
    except (ValueError, KeyError, TypeError, struct.error):
        return None


def read_prefix(value: object) -> object:
    """Enough of a stored value to parse its header without reading a large payload."""
    if hasattr(value, "read"):
        with value:  # type: ignore[attr-defined]
            head: bytes = value.read(_PREFIX.size)
            if len(head) < _PREFIX.size:
                return head
            header_len = _PREFIX.unpack_from(head)[3]
            rest: bytes = value.read(header_len)
            return head + rest
    return value
