"""The protocol codec on its own: frame scanning and its limits, startup, SCRAM, errors."""

from __future__ import annotations

import random
import struct

import pytest

from neonpoly import pgwire


def _q(sql: str) -> bytes:
    return pgwire.frame(b"Q", pgwire.cstr(sql))


# --- scan_frames ----------------------------------------------------------------------------


def test_scan_frames_splits_complete_frames_and_stops_at_partial() -> None:
    a, b, c = _q("SELECT 1"), pgwire.frame(b"S"), _q("SELECT 2")
    buf = a + b + c[:7]
    frames, used = pgwire.scan_frames(buf)
    assert [(chr(t), s, e) for t, s, e in frames] == [("Q", 0, len(a)), ("S", len(a), len(a) + 5)]
    assert used == len(a) + len(b)
    # Feeding the rest completes the third frame.
    frames, used = pgwire.scan_frames(buf[used:] + c[7:])
    assert frames == [(ord("Q"), 0, len(c))] and used == len(c)


def test_scan_frames_byte_by_byte_matches_whole() -> None:
    stream = b"".join(_q(f"SELECT {i}") for i in range(20)) + pgwire.frame(b"S")
    whole, _ = pgwire.scan_frames(stream)
    seen: list[bytes] = []
    buf = bytearray()
    for byte in stream:
        buf.append(byte)
        frames, used = pgwire.scan_frames(buf)
        seen += [bytes(buf[s:e]) for _, s, e in frames]
        del buf[:used]
    assert seen == [stream[s:e] for _, s, e in whole]
    assert not buf


def test_scan_frames_honours_start_offset() -> None:
    buf = b"junk" + _q("SELECT 1")
    frames, used = pgwire.scan_frames(buf, 4)
    assert frames == [(ord("Q"), 4, len(buf))] and used == len(buf)


def test_scan_frames_header_only_is_incomplete() -> None:
    assert pgwire.scan_frames(b"Q\x00\x00") == ([], 0)
    assert pgwire.scan_frames(b"Q\x00\x00\x00\x10") == ([], 0)


@pytest.mark.parametrize("length", [0, 3, -1, -(2**31)])
def test_scan_frames_rejects_lengths_below_four(length: int) -> None:
    with pytest.raises(pgwire.ProtocolViolation, match="length"):
        pgwire.scan_frames(b"Q" + struct.pack("!i", length))


def test_scan_frames_rejects_2gb_length_before_any_payload() -> None:
    # 0x7FFFFFF0 is positive and above the 1 GB limit; no payload needs to be present.
    with pytest.raises(pgwire.ProtocolViolation, match="exceeds"):
        pgwire.scan_frames(b"Q" + struct.pack("!I", 0x7FFFFFF0))
    # 0x80000000 reads as negative: also refused.
    with pytest.raises(pgwire.ProtocolViolation):
        pgwire.scan_frames(b"Q" + struct.pack("!I", 0x80000000))


def test_scan_frames_large_limit_is_exactly_one_gigabyte() -> None:
    ok = b"Q" + struct.pack("!i", pgwire.LARGE_MESSAGE_LIMIT)
    assert pgwire.scan_frames(ok, large=pgwire.FRONTEND_LARGE_TYPES) == ([], 0)  # waits for more
    with pytest.raises(pgwire.ProtocolViolation):
        pgwire.scan_frames(b"Q" + struct.pack("!i", pgwire.LARGE_MESSAGE_LIMIT + 1))


def test_scan_frames_small_types_have_a_small_limit() -> None:
    allowed, large = pgwire.FRONTEND_TYPES, pgwire.FRONTEND_LARGE_TYPES
    at_limit = b"S" + struct.pack("!i", pgwire.SMALL_MESSAGE_LIMIT)
    assert pgwire.scan_frames(at_limit, allowed=allowed, large=large) == ([], 0)
    with pytest.raises(pgwire.ProtocolViolation, match="exceeds the limit of 10000"):
        pgwire.scan_frames(b"S" + struct.pack("!i", pgwire.SMALL_MESSAGE_LIMIT + 1), allowed=allowed, large=large)
    # A Query ('Q' is large) of 20 kB is fine.
    big = _q("SELECT '" + "x" * 20000 + "'")
    frames, used = pgwire.scan_frames(big, allowed=allowed, large=large)
    assert len(frames) == 1 and used == len(big)


def test_scan_frames_rejects_unknown_type_when_restricted() -> None:
    with pytest.raises(pgwire.ProtocolViolation, match="0x01"):
        pgwire.scan_frames(b"\x01\x00\x00\x00\x04", allowed=pgwire.FRONTEND_TYPES)
    # Unrestricted scanning (the origin side) accepts any type byte.
    assert pgwire.scan_frames(b"\x01\x00\x00\x00\x04")[1] == 5


def test_scan_frames_random_garbage_never_hangs_or_overreads() -> None:
    rng = random.Random(1)
    for _ in range(500):
        junk = rng.randbytes(rng.randrange(0, 64))
        try:
            frames, used = pgwire.scan_frames(junk, allowed=pgwire.FRONTEND_TYPES, large=pgwire.FRONTEND_LARGE_TYPES)
        except pgwire.ProtocolViolation:
            continue
        assert 0 <= used <= len(junk)
        assert all(e <= len(junk) for _, _, e in frames)


# --- startup --------------------------------------------------------------------------------


def test_parse_startup_round_trips_build_startup() -> None:
    params = {"user": "scram_user", "database": "app", "application_name": "cache-1", "options": "-c x=é"}
    raw = pgwire.build_startup(params)
    packet, used = pgwire.parse_startup(raw + b"trailing")
    assert packet is not None and used == len(raw)
    assert packet.code == pgwire.PROTOCOL_3_0
    assert dict(packet.params) == params
    assert packet.raw == raw
    assert not (packet.is_ssl or packet.is_cancel or packet.is_gssenc)


def test_parse_startup_waits_for_the_whole_packet() -> None:
    raw = pgwire.build_startup({"user": "u"})
    for cut in range(len(raw)):
        assert pgwire.parse_startup(raw[:cut]) == (None, 0)


def test_parse_startup_special_requests() -> None:
    ssl, used = pgwire.parse_startup(pgwire.ssl_request())
    assert ssl is not None and ssl.is_ssl and used == 8
    gss, _ = pgwire.parse_startup(struct.pack("!ii", 8, pgwire.GSSENC_REQUEST_CODE))
    assert gss is not None and gss.is_gssenc
    cancel, used = pgwire.parse_startup(pgwire.cancel_request(4242, b"\x01\x02\x03\x04"))
    assert cancel is not None and cancel.is_cancel and used == 16
    assert cancel.cancel_key == (4242, b"\x01\x02\x03\x04")


@pytest.mark.parametrize("length", [0, 7, pgwire.MAX_STARTUP_LENGTH + 1, 0x7FFFFFFF, -8])
def test_parse_startup_rejects_bad_lengths(length: int) -> None:
    with pytest.raises(pgwire.ProtocolViolation, match="startup packet length"):
        pgwire.parse_startup(struct.pack("!ii", length, pgwire.PROTOCOL_3_0))


def test_parse_startup_rejects_other_protocols_and_short_cancel() -> None:
    with pytest.raises(pgwire.ProtocolViolation, match=r"unsupported frontend protocol 2\.0"):
        pgwire.parse_startup(struct.pack("!ii", 8, 2 << 16))
    with pytest.raises(pgwire.ProtocolViolation, match="cancel"):
        pgwire.parse_startup(struct.pack("!iii", 12, pgwire.CANCEL_REQUEST_CODE, 1))


def test_parse_startup_missing_value_is_a_violation() -> None:
    body = struct.pack("!i", pgwire.PROTOCOL_3_0) + b"user"  # a name with no value, no NULs
    raw = struct.pack("!i", len(body) + 4) + body
    with pytest.raises(pgwire.ProtocolViolation):
        pgwire.parse_startup(raw)


# --- SCRAM channel binding ------------------------------------------------------------------


def _sasl_body(*mechanisms: bytes) -> bytes:
    return struct.pack("!i", pgwire.AUTH_SASL) + b"".join(m + b"\x00" for m in mechanisms) + b"\x00"


def test_strip_scram_plus_keeps_plain_scram() -> None:
    body = _sasl_body(b"SCRAM-SHA-256-PLUS", b"SCRAM-SHA-256")
    assert pgwire.strip_scram_plus(body) == _sasl_body(b"SCRAM-SHA-256")
    assert pgwire.auth_code(pgwire.strip_scram_plus(body)) == pgwire.AUTH_SASL


def test_strip_scram_plus_is_identity_without_plus() -> None:
    body = _sasl_body(b"SCRAM-SHA-256")
    assert pgwire.strip_scram_plus(body) == body


def test_strip_scram_plus_frame_is_well_formed() -> None:
    stripped = pgwire.frame(b"R", pgwire.strip_scram_plus(_sasl_body(b"SCRAM-SHA-256", b"SCRAM-SHA-256-PLUS")))
    frames, used = pgwire.scan_frames(stripped)
    assert len(frames) == 1 and used == len(stripped)
    assert stripped.endswith(b"SCRAM-SHA-256\x00\x00")


# --- errors and other messages --------------------------------------------------------------


def test_error_response_round_trip() -> None:
    raw = pgwire.error_response("08001", "could not connect to origin db:5432: refused", detail="d", hint="h")
    frames, used = pgwire.scan_frames(raw)
    assert frames == [(ord("E"), 0, len(raw))] and used == len(raw)
    fields = pgwire.parse_error_fields(raw[5:])
    assert fields == {
        "S": "ERROR",
        "V": "ERROR",
        "C": "08001",
        "M": "could not connect to origin db:5432: refused",
        "D": "d",
        "H": "h",
    }


def test_error_response_fatal_and_unicode() -> None:
    raw = pgwire.error_response("57P01", "arrêt: neonpoly s'arrête", severity="FATAL")
    fields = pgwire.parse_error_fields(memoryview(raw)[5:])
    assert fields["S"] == fields["V"] == "FATAL"
    assert fields["M"] == "arrêt: neonpoly s'arrête"
    assert "D" not in fields and "H" not in fields


def test_parameter_status_round_trip() -> None:
    raw = pgwire.parameter_status("TimeZone", "Europe/Paris")
    assert pgwire.parse_parameter_status(raw[5:]) == ("TimeZone", "Europe/Paris")


def test_backend_key_data_and_ready_for_query() -> None:
    raw = pgwire.backend_key_data(77, b"\xde\xad\xbe\xef")
    assert raw == b"K" + struct.pack("!ii", 12, 77) + b"\xde\xad\xbe\xef"
    assert pgwire.ready_for_query(b"T") == b"Z\x00\x00\x00\x05T"


def test_message_types_are_the_type_bytes_as_ints() -> None:
    assert tuple(b"QZ1") == (pgwire.MSG_QUERY, pgwire.MSG_READY_FOR_QUERY, pgwire.MSG_PARSE_COMPLETE)
    assert pgwire.frame(pgwire.MSG_SYNC) == pgwire.frame(b"S") == b"S\x00\x00\x00\x04"
    assert pgwire.scan_frames(pgwire.frame(pgwire.MSG_QUERY, b"x"))[0][0][0] == pgwire.MSG_QUERY
    assert pgwire.frame(pgwire.MSG_PARSE_COMPLETE) == pgwire.PARSE_COMPLETE  # the older names are whole frames
    for status in (b"I", b"T", b"E", b"?"):
        assert pgwire.ready_for_query(status) == b"Z\x00\x00\x00\x05" + status
    assert pgwire.close_statement("s1") == b"C" + struct.pack("!i", 8) + b"Ss1\x00"


def test_extended_messages_parse() -> None:
    parse = pgwire.ParseMsg("s1", "SELECT $1::int", struct.pack("!hi", 1, 23))
    raw = pgwire.build_parse(parse)
    assert pgwire.parse_parse(raw[5:]) == parse
    bind = pgwire.parse_bind(pgwire.cstr("p") + pgwire.cstr("s1") + b"\x00\x00\x00\x01")
    assert (bind.portal, bind.statement, bind.tail) == ("p", "s1", b"\x00\x00\x00\x01")
    assert pgwire.parse_execute(pgwire.cstr("p") + struct.pack("!i", 10)) == pgwire.ExecuteMsg("p", 10)
    assert pgwire.parse_target(b"S" + pgwire.cstr("s1")) == pgwire.TargetMsg(b"S", "s1")
    assert pgwire.query_text(pgwire.cstr("SELECT 1")) == "SELECT 1"


def test_extended_request_is_a_closed_named_statement_with_text_params() -> None:
    raw = pgwire.extended_request("np_x", "SELECT $1::text[]", [pgwire.text_array(["a", 'b"c'])])
    frames, used = pgwire.scan_frames(bytearray(raw))
    assert used == len(raw)
    assert bytes(raw[s] for _, s, _ in frames) == b"CPBECS"
    bind = pgwire.parse_bind(raw[frames[2][1] + 5 : frames[2][2]])
    assert bind.statement == "np_x" and bind.portal == ""
    assert b'{"a","b\\"c"}' in bind.tail
