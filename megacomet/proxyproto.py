"""Sans-IO parsing of the PROXY protocol header (haproxy's spec, versions 1 and 2).

A load balancer in front (haproxy ``send-proxy`` / ``send-proxy-v2``, a cloud
L4 balancer) opens each connection with one header that names the client it
stands for, before anything else the client sends (a TLS handshake included).
``parse(buf)`` reads it from the first bytes of a connection:

- ``None``: not complete yet, read more (bounded: a v1 line is at most 107
  bytes, a v2 header at most ``MAX_V2`` bytes);
- ``(source, consumed)``: the header is the first ``consumed`` bytes of
  ``buf``; ``source`` is the client's ``(ip, port)``, with the ip in its
  canonical text (IPv4-mapped IPv6 addresses as plain IPv4), or ``None`` when
  the header names no address (v1 ``UNKNOWN``, v2 ``LOCAL`` such as a
  balancer's health check, or a family other than IPv4 and IPv6): then the
  connection's own peer address stands;
- ``ProxyError`` for anything else, as soon as the bytes seen prove it (a
  plain HTTP request fails on its first byte).

It keeps nothing between calls: the caller keeps the bytes until a header is
complete.  v2 TLVs are skipped unread.
"""

import ipaddress
import re

V1_PREFIX = b"PROXY "
V1_MAX = 107                      # the whole v1 line, CRLF included, at most
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16                     # signature, version/command, family/protocol, length
MAX_V2 = V2_FIXED + 4096          # addresses and TLVs: the spec allows 64 KiB, nobody sends it
LOCAL, PROXY = 0x0, 0x1           # v2 commands
UNSPEC, INET, INET6, UNIX = 0x0, 0x1, 0x2, 0x3      # v2 address families
V2_ADDRESS_BYTES = {UNSPEC: 0, INET: 12, INET6: 36, UNIX: 216}

_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")


class ProxyError(ValueError):
    """Not a valid PROXY protocol header: the connection is to be closed."""


def parse(buf):
    """The PROXY header at the start of ``buf`` (bytes-like): None (need more),
    ((ip, port) or None, bytes consumed), or ProxyError."""
    if not buf:
        return None
    if buf[0] == 0x50:                            # "P"
        return _parse_v1(bytes(buf[:V1_MAX]))
    if buf[0] == 0x0D:                            # "\r"
        return _parse_v2(buf)
    raise ProxyError("no PROXY protocol header (first byte 0x%02x)" % buf[0])


def _parse_v1(head):
    if not head.startswith(V1_PREFIX[:len(head)]):
        raise ProxyError("not a PROXY protocol v1 line")
    end = head.find(b"\r\n")
    if end < 0:
        if len(head) >= V1_MAX or b"\n" in head or b"\r" in head[:-1]:
            raise ProxyError("PROXY v1 line without CRLF in %d bytes" % V1_MAX)
        return None
    fields = head[len(V1_PREFIX):end].split(b" ")     # (a CRLF comes after "PROXY ")
    family = fields[0]
    if family == b"UNKNOWN":                      # the rest of the line is ignored
        return None, end + 2
    if family not in (b"TCP4", b"TCP6"):
        raise ProxyError("PROXY v1: unknown protocol %r" % family[:8])
    if len(fields) != 5:
        raise ProxyError("PROXY v1: %d fields, not 5" % len(fields))
    _proto, src, dst, sport, dport = fields
    version = 4 if family == b"TCP4" else 6
    source = _v1_address(src, version)
    _v1_address(dst, version)
    port = _v1_port(sport)
    _v1_port(dport)
    return (source, port), end + 2


def _v1_address(text, version):
    if b"%" in text:                              # no scope ids: an address, nothing more
        raise ProxyError("PROXY v1: invalid address")
    try:
        ip = ipaddress.ip_address(text.decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ProxyError("PROXY v1: invalid address") from None
    if ip.version != version:
        raise ProxyError("PROXY v1: not an IPv%d address" % version)
    return canonical(ip)


def _v1_port(text):
    if not _PORT.match(text) or int(text) > 65535:
        raise ProxyError("PROXY v1: invalid port")
    return int(text)


def _parse_v2(buf):
    n = len(buf)
    if bytes(buf[:12]) != V2_SIGNATURE[:min(n, 12)]:
        raise ProxyError("not a PROXY protocol v2 signature")
    if n < V2_FIXED:
        return None
    version_command, family_protocol = buf[12], buf[13]
    if version_command >> 4 != 2:
        raise ProxyError("PROXY v2: version %d" % (version_command >> 4))
    command = version_command & 0x0F
    if command not in (LOCAL, PROXY):
        raise ProxyError("PROXY v2: unknown command %d" % command)
    family, protocol = family_protocol >> 4, family_protocol & 0x0F
    if family not in V2_ADDRESS_BYTES or protocol > 2:
        raise ProxyError("PROXY v2: unknown family/protocol 0x%02x" % family_protocol)
    length = buf[14] << 8 | buf[15]
    total = V2_FIXED + length
    if total > MAX_V2:
        raise ProxyError("PROXY v2: header of %d bytes (at most %d)" % (total, MAX_V2))
    if command == PROXY and length < V2_ADDRESS_BYTES[family]:
        raise ProxyError("PROXY v2: %d bytes too short for its addresses" % length)
    if n < total:
        return None
    if command == LOCAL or family not in (INET, INET6):
        return None, total                        # the connection's own endpoints stand
    if family == INET:
        ip = ipaddress.IPv4Address(bytes(buf[16:20]))
        port = buf[24] << 8 | buf[25]
    else:
        ip = ipaddress.IPv6Address(bytes(buf[16:32]))
        port = buf[48] << 8 | buf[49]
    return (canonical(ip), port), total


def canonical(ip):
    """An ipaddress object as the text every count and log line uses for it: IPv4-mapped
    IPv6 addresses as IPv4 (a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d)."""
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip)


def canonical_text(host):
    """``canonical`` for an address as accept() gives it (text)."""
    if host.startswith("::ffff:") and "." in host:
        return host[7:]
    return host


# -- building headers (for tests and tools) -------------------------------------------------

def v1_header(source, destination):
    """A v1 line for ((ip, port), (ip, port)) of one family."""
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    family = b"TCP4" if src.version == 4 else b"TCP6"
    return b"PROXY %s %s %s %d %d\r\n" % (family, str(src).encode(), str(dst).encode(),
                                          source[1], destination[1])


def v2_header(source=None, destination=None, tlvs=b""):
    """A v2 header: PROXY for ((ip, port), (ip, port)) of one family, LOCAL without them."""
    if source is None:
        return V2_SIGNATURE + bytes((0x20, 0x00)) + len(tlvs).to_bytes(2, "big") + tlvs
    src = ipaddress.ip_address(source[0])
    dst = ipaddress.ip_address(destination[0])
    family = INET if src.version == 4 else INET6
    body = (src.packed + dst.packed + source[1].to_bytes(2, "big")
            + destination[1].to_bytes(2, "big") + tlvs)
    return (V2_SIGNATURE + bytes((0x20 | PROXY, family << 4 | 0x1))
            + len(body).to_bytes(2, "big") + body)
