"""Sans-IO WebSocket (RFC 6455): the opening handshake's answer and the frame codec.

Pure functions of bytes, like ``wire``: nothing here touches a socket,
a clock or a connection's state beyond what the caller passes in, so it can
be tested and fuzzed alone.  ``parse`` never trusts a length it has not
bounded and reports every violation as ``WsError`` with the close code it
calls for; any other exception is a bug.
"""

import base64
import codecs
import enum
import hashlib
import struct

GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
CONT, TEXT, BINARY, CLOSE, PING, PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA
DATA_OPCODES = (CONT, TEXT, BINARY)
CONTROL_OPCODES = (CLOSE, PING, PONG)



class CloseCode(enum.IntEnum):
    """The close codes this server sends (RFC 6455 7.4.1; 1013 from the IANA registry)."""
    NORMAL = 1000              # the client said goodbye
    GOING_AWAY = 1001          # the server stops or reloads: reconnect
    PROTOCOL_ERROR = 1002      # a frame RFC 6455 forbids
    INVALID_DATA = 1007        # text that is not UTF-8
    POLICY_VIOLATION = 1008    # the subscription's signature expired
    TOO_BIG = 1009             # a frame or message over --max-message
    TRY_AGAIN_LATER = 1013     # the id table is full

_U16 = struct.Struct("!H")
_U64 = struct.Struct("!Q")


class WsError(Exception):
    """A violation that closes the connection with ``code``."""

    def __init__(self, code, reason):
        super().__init__(reason)
        self.code = code
        self.reason = reason


def accept_key(key):
    """Sec-WebSocket-Accept for a client's Sec-WebSocket-Key."""
    return base64.b64encode(hashlib.sha1(key + GUID).digest())


def valid_key(key):
    """A Sec-WebSocket-Key is 16 random bytes, base64: 24 characters."""
    try:
        return len(base64.b64decode(key, validate=True)) == 16
    except ValueError:
        return False


def encode(opcode, payload=b""):
    """One unmasked, final frame, as a server sends it."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + _U16.pack(n)
    else:
        head = bytes((0x80 | opcode, 127)) + _U64.pack(n)
    return head + payload


def close_frame(code, reason=""):
    return encode(CLOSE, _U16.pack(code) + reason.encode()[:120])


def parse(buf, max_payload):
    """Complete frames at the start of ``buf``: ([(fin, opcode, payload)], bytes consumed).

    Payloads come unmasked.  Raises WsError as soon as the bytes seen prove a
    violation: an unmasked frame (clients must mask), reserved bits, an
    unknown opcode, a fragmented or over-125-byte control frame (1002), or a
    payload over ``max_payload`` (1009), before that payload arrives.
    """
    frames = []
    pos = 0
    n = len(buf)
    while n - pos >= 2:
        b0, b1 = buf[pos], buf[pos + 1]
        fin, opcode = b0 & 0x80, b0 & 0x0F
        if b0 & 0x70:
            raise WsError(CloseCode.PROTOCOL_ERROR, "reserved bits set")
        if opcode not in DATA_OPCODES and opcode not in CONTROL_OPCODES:
            raise WsError(CloseCode.PROTOCOL_ERROR, "unknown opcode 0x%x" % opcode)
        if not b1 & 0x80:
            raise WsError(CloseCode.PROTOCOL_ERROR, "client frame not masked")
        length = b1 & 0x7F
        head = 2
        if opcode in CONTROL_OPCODES and (length > 125 or not fin):
            raise WsError(CloseCode.PROTOCOL_ERROR, "control frame fragmented or over 125 bytes")
        if length == 126:
            if n - pos < 4:
                break
            length = _U16.unpack_from(buf, pos + 2)[0]
            head = 4
        elif length == 127:
            if n - pos < 10:
                break
            length = _U64.unpack_from(buf, pos + 2)[0]
            if length >> 63:
                raise WsError(CloseCode.PROTOCOL_ERROR, "frame length with its top bit set")
            head = 10
        if length > max_payload:
            raise WsError(CloseCode.TOO_BIG, "frame of %d bytes over %d" % (length, max_payload))
        end = pos + head + 4 + length
        if end > n:
            break
        mask = bytes(buf[pos + head:pos + head + 4])
        frames.append((bool(fin), opcode, unmask(bytes(buf[pos + head + 4:end]), mask)))
        pos = end
    return frames, pos


def unmask(data, mask):
    """XOR data with the 4-byte mask repeated: one big-int XOR, not a loop over bytes."""
    n = len(data)
    if not n:
        return data
    key = int.from_bytes((mask * ((n + 3) // 4))[:n], "big")
    return (int.from_bytes(data, "big") ^ key).to_bytes(n, "big")


class Message:
    """What a connection remembers of a fragmented data message: its kind and size so far,
    and for text a UTF-8 decoder that proves validity chunk by chunk (the bytes are dropped:
    the server ignores what clients send but must still judge it)."""

    __slots__ = ("text", "size", "decoder")

    def __init__(self, text):
        self.text = text
        self.size = 0
        self.decoder = codecs.getincrementaldecoder("utf-8")() if text else None

    def add(self, payload, final, max_size):
        self.size += len(payload)
        if self.size > max_size:
            raise WsError(CloseCode.TOO_BIG, "message over %d bytes" % max_size)
        if self.decoder is not None:
            try:
                self.decoder.decode(payload, final)
            except UnicodeDecodeError:
                raise WsError(CloseCode.INVALID_DATA, "text message is not UTF-8") from None


def check_close_payload(payload):
    """The code a close frame carries (1005: none), or WsError if the frame is malformed."""
    if not payload:
        return 1005
    if len(payload) == 1:
        raise WsError(CloseCode.PROTOCOL_ERROR, "close frame of 1 byte")
    code = _U16.unpack_from(payload)[0]
    if code < 1000 or code in (1004, 1005, 1006, 1015) or 1016 <= code < 3000 or code >= 5000:
        raise WsError(CloseCode.PROTOCOL_ERROR, "close code %d not allowed" % code)
    try:
        payload[2:].decode("utf-8")
    except UnicodeDecodeError:
        raise WsError(CloseCode.INVALID_DATA, "close reason is not UTF-8") from None
    return code
