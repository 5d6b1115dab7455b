"""The sans-IO WebSocket codec alone: round trips, every split point, and fuzzing that
only WsError (with a close code) can come out of ``parse``."""

import os
import struct

from hypothesis import given, settings, strategies as st

from megacomet import wsframe
from test_websocket import client_frame

PROPS = settings(max_examples=300, deadline=None)


def test_handshake_key_from_the_rfc():
    # RFC 6455 section 1.3's example.
    assert wsframe.accept_key(b"dGhlIHNhbXBsZSBub25jZQ==") == b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
    assert wsframe.valid_key(b"dGhlIHNhbXBsZSBub25jZQ==")
    assert not wsframe.valid_key(b"c2hvcnQ=") and not wsframe.valid_key(b"not base64!!")


@PROPS
@given(st.binary(max_size=70000), st.sampled_from([wsframe.TEXT, wsframe.BINARY, wsframe.CONT]),
       st.booleans())
def test_masked_frames_round_trip_at_any_size(payload, opcode, fin):
    frames, used = wsframe.parse(client_frame(opcode, payload, fin=fin), 1 << 20)
    assert frames == [(fin, opcode, payload)]
    assert used == len(client_frame(opcode, payload, fin=fin))


@PROPS
@given(st.lists(st.binary(max_size=300), min_size=1, max_size=5), st.data())
def test_any_split_point_gives_the_same_frames(payloads, data):
    stream = b"".join(client_frame(wsframe.BINARY, p) for p in payloads)
    cut = data.draw(st.integers(0, len(stream)))
    first, used = wsframe.parse(stream[:cut], 1 << 20)
    rest, used2 = wsframe.parse(stream[used:], 1 << 20)
    assert [f[2] for f in first + rest] == payloads and used + used2 == len(stream)


@PROPS
@given(st.binary(max_size=200))
def test_random_bytes_raise_only_wserror(data):
    try:
        frames, used = wsframe.parse(data, 1000)
    except wsframe.WsError as e:
        assert e.code in (1002, 1009)
    else:
        assert 0 <= used <= len(data)


def test_oversize_is_refused_from_the_header_alone():
    head = bytes((0x82, 0xFF)) + struct.pack("!Q", 1 << 40) + os.urandom(4)
    try:
        wsframe.parse(head, 4096)
    except wsframe.WsError as e:
        assert e.code == 1009
    else:
        raise AssertionError("accepted a 1 TB frame header")


def test_server_frames_use_the_shortest_length_form():
    assert wsframe.encode(wsframe.TEXT, b"x" * 125)[:2] == b"\x81\x7d"
    assert wsframe.encode(wsframe.TEXT, b"x" * 126)[:4] == b"\x81\x7e\x00\x7e"
    assert wsframe.encode(wsframe.BINARY, b"x" * 65536)[:10] == b"\x82\x7f" + struct.pack("!Q", 65536)
    assert wsframe.close_frame(1001, "bye") == b"\x88\x05\x03\xe9bye"
