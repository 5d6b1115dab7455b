"""TLS on the client port (``--tls-cert``, ``--tls-key``): https, wss and EventSource over
https, served by the worker's own loop.

The standard library's ``ssl`` is driven sans-IO: each TLS connection has an
``SSLObject`` over two memory BIOs (``Connection``), and the worker moves the
bytes itself.  Its loop reads the socket as for any connection and hands the
bytes to ``Connection.receive``, which feeds them to the incoming BIO, moves
the handshake on (writing what it answers), and appends what they decrypt to
to ``inbuf[fd]``; ``Worker.write`` seals what a protocol writes
(``Connection.seal``) and sends or queues the records, so ``outbuf`` holds
ciphertext and OUT_LIMIT counts what the socket has not taken.  The
protocols above never know.

Only TLS connections have a ``Connection``: the worker keeps them in its dict
``tls`` (fd -> Connection), and a plain connection costs one ``fd in
w.tls`` on its reads and writes, nothing else.  A closed connection drops its
Connection (the SSL object is freed with it).  A graceful close sends
close_notify first (``close_notify``: one small write to a socket that has
taken all the output, or nothing).

A handshake is bounded by the connection's first deadline (``--header-timeout``,
set at accept); one that fails costs one log line (through the worker's
rate-limited log) and the connection.

This module is imported only when TLS is on (a plain server never loads
``ssl``), by the supervisor once to check the files at start, and by each
worker to build its ``SSLContext`` from the files when it starts: a reload
(SIGHUP) starts new workers, which read a renewed certificate.
"""

import os
import ssl

ALPN = ["http/1.1"]
READ_SIZE = 65536                # plaintext taken from the SSL object at once
# Output is sealed in records of at most this much plaintext, each taken out of the outgoing
# BIO before the next: the BIO keeps the room its largest write needed for the connection's
# life, so a 64 KiB message sealed at once would leave every stream that got it holding
# 64 KiB more, idle (measured: 64 KiB a connection, 5.5 KiB with this).
SEAL_CHUNK = 4096


def server_context(cert_file, key_file):
    """The context a worker's TLS connections share, from the files as they are now.

    TLS 1.2 at least, the server's cipher order (the standard library's modern
    list), no renegotiation, no compression, ALPN ``http/1.1``.  Raises
    ``ssl.SSLError``, ``OSError`` or ``ValueError`` if the files do not load.
    """
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.options |= (ssl.OP_CIPHER_SERVER_PREFERENCE | ssl.OP_NO_COMPRESSION |
                    ssl.OP_NO_RENEGOTIATION | ssl.OP_SINGLE_ECDH_USE)
    ctx.set_alpn_protocols(ALPN)
    ctx.load_cert_chain(cert_file, key_file, password=_no_password)
    return ctx


def _no_password():
    # Without this, OpenSSL would ask for the pass phrase on the terminal (and block there).
    raise ValueError("the key is encrypted: give a key file without a pass phrase")


def check(cert_file, key_file):
    """None if the certificate and key load together, else what is wrong, in one sentence."""
    try:
        Acceptor(cert_file, key_file)
    except LoadError as e:
        return str(e)
    return None


def describe(e):
    """An ssl error in a few words (its OpenSSL reason when it has one)."""
    if isinstance(e, ssl.SSLError) and e.reason:
        return e.reason
    if isinstance(e, OSError) and e.strerror:
        return "%s: %s" % (e.strerror, e.filename) if e.filename else e.strerror
    return str(e) or type(e).__name__


class LoadError(Exception):
    """The certificate and key do not load (any more): what is wrong, in one sentence."""


class Acceptor:
    """One per worker with TLS on: its context, and a new Connection for each accepted fd.
    LoadError if the files do not load."""

    def __init__(self, cert_file, key_file):
        try:
            self.context = server_context(cert_file, key_file)
        except (ssl.SSLError, OSError, ValueError) as e:
            raise LoadError("cannot use --tls-cert %s with --tls-key %s: %s"
                            % (cert_file, key_file, describe(e))) from None

    def __call__(self):
        return Connection(self.context)


class Connection:
    """One TLS connection's state: its SSL object, the BIOs it reads from and writes to,
    and whether its handshake is done."""

    __slots__ = ("obj", "incoming", "outgoing", "ready")

    def __init__(self, context):
        self.incoming = ssl.MemoryBIO()
        self.outgoing = ssl.MemoryBIO()
        self.obj = context.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.ready = False

    def receive(self, w, fd, raw):
        """``raw`` came from fd's socket: on with the handshake, and append what it decrypts
        to to inbuf[fd].  True if new plaintext is there; False if not yet, or if the
        connection ended (closed: the peer's close_notify, a failed handshake, a bad record)."""
        self.incoming.write(raw)
        obj = self.obj
        if not self.ready:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                self._send(w, fd)                 # our flight, if the client's is complete
                return False
            except (ssl.SSLError, ValueError) as e:
                self._fail(w, fd, "handshake failed", e)
                return False
            self.ready = True
        buf = w.read_buffer                       # the raw bytes are in the BIO: reuse it
        got = False
        while True:
            try:
                n = obj.read(READ_SIZE, buf)
            except ssl.SSLWantReadError:
                break
            except ssl.SSLZeroReturnError:
                n = 0
            except (ssl.SSLError, ValueError) as e:
                self._fail(w, fd, "bad record", e)
                return False
            if not n:                             # close_notify: the peer is done
                if not got:
                    w.close(fd)
                    return False
                break                             # (its EOF follows: then it closes)
            got = True
            inbuf = w.inbuf
            have = inbuf.get(fd)
            if have is None:
                inbuf[fd] = w.read_view[:n].tobytes()
            else:
                if type(have) is bytes:
                    have = inbuf[fd] = bytearray(have)
                have += w.read_view[:n]
        if self.outgoing.pending:                 # session tickets, alerts, key updates
            self._send(w, fd)
            if not w.state[fd]:
                return False
        return got

    def seal(self, w, fd, data):
        """What a protocol writes, as TLS records; None if that failed (fd is closed)."""
        if not data:
            return b""
        obj, outgoing = self.obj, self.outgoing
        try:
            if len(data) <= SEAL_CHUNK:
                obj.write(data)
                return outgoing.read()
            view = memoryview(data)
            sealed = []
            for start in range(0, len(view), SEAL_CHUNK):
                obj.write(view[start:start + SEAL_CHUNK])
                sealed.append(outgoing.read())
            return b"".join(sealed)
        except (ssl.SSLError, ValueError) as e:   # before the handshake's end, or after a failure
            self._fail(w, fd, "cannot send", e)
            return None

    def close_notify(self, fd):
        """Tell the peer we are done (close_notify), if its socket takes it at once: called
        when all output is written, so it does; nothing is queued for it."""
        if not self.ready:
            return
        try:
            self.obj.unwrap()
        except (ssl.SSLError, ValueError):        # wants the peer's close_notify: not waited for
            pass
        data = self.outgoing.read()
        if data:
            try:
                os.write(fd, data)
            except OSError:
                pass

    def _send(self, w, fd):
        data = self.outgoing.read()
        if data:
            w.write(fd, data, sealed=True)

    def _fail(self, w, fd, what, e):
        w.log("tls: %s: %s; closed" % (what, describe(e)), "info", fd=fd)   # names the client
        self._send(w, fd)                         # the alert, if OpenSSL made one
        w.close(fd)
