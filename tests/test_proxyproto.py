"""The PROXY protocol parser (megacomet/proxyproto.py), sans-IO: examples from haproxy's
spec, what must be refused, and hypothesis: random bytes never raise anything but
ProxyError, valid headers round-trip however TCP cuts them."""

import ipaddress

import pytest
from hypothesis import given, settings, strategies as st

from megacomet import proxyproto
from megacomet.proxyproto import ProxyError, parse, v1_header, v2_header

REQUEST = b"GET /sub/alice HTTP/1.1\r\nHost: x\r\n\r\n"


# -- v1 -------------------------------------------------------------------------------------

def test_v1_tcp4_gives_the_source_and_what_it_consumed():
    line = b"PROXY TCP4 192.0.2.1 198.51.100.2 56324 443\r\n"
    assert parse(line + REQUEST) == (("192.0.2.1", 56324), len(line))


def test_v1_tcp6_is_canonical_and_mapped_ipv4_is_ipv4():
    line = b"PROXY TCP6 2001:DB8:0:0::1 2001:db8::2 65535 8000\r\n"
    assert parse(line) == (("2001:db8::1", 65535), len(line))
    line = b"PROXY TCP6 ::ffff:192.0.2.7 ::1 1 2\r\n"
    assert parse(line) == (("192.0.2.7", 1), len(line))


def test_v1_unknown_names_no_address():
    assert parse(b"PROXY UNKNOWN\r\n") == (None, 15)
    line = b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n"
    assert parse(line + b"rest") == (None, len(line))


def test_v1_longest_line_is_107_bytes():
    longest = (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff "
               b"ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n")
    assert len(longest) == 104
    assert parse(longest)[1] == 104
    padded = b"PROXY UNKNOWN " + b"x" * (107 - 16) + b"\r\n"
    assert len(padded) == 107 and parse(padded) == (None, 107)
    with pytest.raises(ProxyError):
        parse(b"PROXY UNKNOWN " + b"x" * (108 - 16) + b"\r\n")


@pytest.mark.parametrize("partial", [b"P", b"PROXY", b"PROXY ", b"PROXY TCP4 1.2.3.4",
                                     b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r"])
def test_v1_incomplete_needs_more(partial):
    assert parse(partial) is None


@pytest.mark.parametrize("bad", [
    b"GET / HTTP/1.1\r\n\r\n",                           # no header: refused on the first byte
    b"PROX\r\n",
    b"proxy TCP4 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n",
    b"PROXY TCP4  1.2.3.4 5.6.7.8 1 2\r\n",              # two spaces
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n",                  # LF alone
    b"PROXY TCP4 1.2.3.256 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP4 ::1 ::1 1 2\r\n",                        # family mismatch
    b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n",
    b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n",               # scope id
    b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 +2\r\n",
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2" + b" " * 100,       # no CRLF in 107 bytes
])
def test_v1_malformed_is_refused(bad):
    with pytest.raises(ProxyError):
        parse(bad)


# -- v2 -------------------------------------------------------------------------------------

def test_v2_ipv4_and_ipv6():
    header = v2_header(("192.0.2.1", 40000), ("198.51.100.2", 443))
    assert len(header) == 16 + 12
    assert parse(header + REQUEST) == (("192.0.2.1", 40000), 28)
    header = v2_header(("2001:db8::1", 1), ("2001:db8::2", 2))
    assert len(header) == 16 + 36
    assert parse(header) == (("2001:db8::1", 1), 52)


def test_v2_tlvs_are_skipped():
    tlvs = b"\x01\x00\x08http/1.1" + b"\x04\x00\x00"   # ALPN, NOOP
    header = v2_header(("192.0.2.1", 5), ("192.0.2.2", 6), tlvs)
    assert parse(header + b"x") == (("192.0.2.1", 5), len(header))


def test_v2_local_names_no_address_and_skips_its_bytes():
    assert parse(v2_header()) == (None, 16)
    assert parse(v2_header(tlvs=b"\x04\x00\x01z") + b"GET") == (None, 20)


def test_v2_unspec_and_unix_families_name_no_address():
    sig = proxyproto.V2_SIGNATURE
    assert parse(sig + b"\x21\x00\x00\x00") == (None, 16)
    assert parse(sig + b"\x21\x31\x00\xd8" + bytes(216)) == (None, 232)


@pytest.mark.parametrize("bad", [
    proxyproto.V2_SIGNATURE[:11] + b"X",
    proxyproto.V2_SIGNATURE + b"\x11\x11\x00\x0c" + bytes(12),      # version 1
    proxyproto.V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12),      # command 2
    proxyproto.V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12),      # family 4
    proxyproto.V2_SIGNATURE + b"\x21\x13\x00\x0c" + bytes(12),      # protocol 3
    proxyproto.V2_SIGNATURE + b"\x21\x11\x00\x0b" + bytes(11),      # too short for INET
    proxyproto.V2_SIGNATURE + b"\x21\x21\x00\x0c" + bytes(12),      # too short for INET6
    proxyproto.V2_SIGNATURE + b"\x21\x11\xff\xff",                  # over MAX_V2
    b"\r\n\r\nGET",
])
def test_v2_malformed_is_refused(bad):
    with pytest.raises(ProxyError):
        parse(bad)


def test_v2_incomplete_needs_more():
    header = v2_header(("192.0.2.1", 1), ("192.0.2.2", 2))
    for cut in range(1, len(header)):
        assert parse(header[:cut]) is None, cut
    assert parse(b"") is None


# -- hypothesis -----------------------------------------------------------------------------

ipv4 = st.integers(0, 2 ** 32 - 1).map(lambda n: str(ipaddress.IPv4Address(n)))
ipv6 = st.integers(0, 2 ** 128 - 1).map(lambda n: str(ipaddress.IPv6Address(n)))
port = st.integers(0, 65535)
pair = st.one_of(st.tuples(st.tuples(ipv4, port), st.tuples(ipv4, port)),
                 st.tuples(st.tuples(ipv6, port), st.tuples(ipv6, port)))
tlv = st.tuples(st.integers(0, 255), st.binary(max_size=40)).map(
    lambda t: bytes([t[0]]) + len(t[1]).to_bytes(2, "big") + t[1])


def expected(source):
    return (proxyproto.canonical(ipaddress.ip_address(source[0])), source[1])


def parse_fed(data, cuts):
    """What a connection's preamble step does: keep the bytes until parse() decides."""
    buf = b""
    pieces = []
    last = 0
    for cut in sorted(cuts) + [len(data)]:
        pieces.append(data[last:cut])
        last = cut
    for piece in pieces:
        buf += piece
        found = parse(buf)
        if found is not None:
            return found, buf
    return None, buf


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_random_bytes_never_raise_anything_else(data):
    try:
        found = parse(data)
    except ProxyError:
        return
    if found is not None:
        source, used = found
        assert 0 < used <= len(data)
        assert source is None or (isinstance(source[0], str) and 0 <= source[1] <= 65535)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from([b"PROXY ", proxyproto.V2_SIGNATURE + b"\x21\x11",
                        proxyproto.V2_SIGNATURE + b"\x21\x21", proxyproto.V2_SIGNATURE + b"\x20"]),
       st.binary(max_size=120))
def test_random_bytes_after_a_valid_start_never_raise_anything_else(start, data):
    try:
        parse(start + data)
    except ProxyError:
        pass


@settings(max_examples=300, deadline=None)
@given(pair, st.binary(max_size=50), st.lists(st.integers(0, 200), max_size=6))
def test_v1_round_trips_however_it_is_cut(addresses, rest, cuts):
    source, destination = addresses
    header = v1_header(source, destination)
    data = header + rest
    found, _ = parse_fed(data, [c for c in cuts if c < len(data)])
    assert found == (expected(source), len(header))


@settings(max_examples=300, deadline=None)
@given(pair, st.lists(tlv, max_size=4), st.binary(max_size=50),
       st.lists(st.integers(0, 400), max_size=6))
def test_v2_round_trips_however_it_is_cut(addresses, tlvs, rest, cuts):
    source, destination = addresses
    header = v2_header(source, destination, b"".join(tlvs))
    data = header + rest
    found, _ = parse_fed(data, [c for c in cuts if c < len(data)])
    assert found == (expected(source), len(header))


@settings(max_examples=200, deadline=None)
@given(pair, st.sampled_from(["v1", "v2"]), st.integers(0, 200), st.integers(0, 255))
def test_a_changed_byte_is_refused_or_parses_to_something_valid(addresses, version, at, value):
    header = v1_header(*addresses) if version == "v1" else v2_header(*addresses)
    at %= len(header)
    data = header[:at] + bytes([value]) + header[at + 1:]
    try:
        found = parse(data)
    except ProxyError:
        return
    if found is not None:
        assert found[1] <= len(data)
