"""Redis, spoken from a worker's own loop: non-blocking connections, replies parsed by hiredis.

Cluster mode only (``--redis``); imported only then, so a one-box server needs nothing beyond
the standard library.  ``hiredis`` is the Redis project's sans-IO parser (``Reader.feed`` /
``gets``, ``pack_command``); the sockets are ours, on the worker's epoll, beside its clients.

* ``Link``: one connection to one Redis server.  Commands are queued as packed bytes with a
  callback each and written once per loop turn (``flush``): whatever a turn asked of one
  server goes in one write, so a batch of publishes costs one round trip.  A link that
  breaks, or whose oldest command waits longer than the timeout, is closed: every callback
  still waiting gets ``UNAVAILABLE`` at once, and it connects again after a backoff with
  jitter.  A subscriber link hands pub/sub pushes to its owner instead.
* ``Redis``: the links of one worker.  A single server, or a Redis Cluster (recognised by
  ``CLUSTER SLOTS``, at the first connection): then each command goes to the master of its
  key's slot, ``MOVED`` refreshes the slot map and retries, ``ASK`` retries once with
  ``ASKING``; sharded pub/sub (``SSUBSCRIBE``) goes to the slot's master too.

It never blocks, never starts a thread, and never decides what a reply means for a
subscription: ``cluster`` does.
"""

import binascii
import collections
import errno
import random
import socket
import ssl
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

IN, OUT = 0x001, 0x004                    # select.EPOLLIN, EPOLLOUT
SLOTS = 16384
MAX_REDIRECTS = 5
READ_BYTES = 262144                       # what one read of a link takes at most
PING_EVERY = 1.0                          # seconds between pings of an idle link
BACKOFF_MIN, BACKOFF_MAX = 0.05, 2.0      # seconds before connecting again, doubled per failure
LOG_FAILING_EVERY = 30.0                  # seconds between log lines of a link that keeps failing
PUSH_KINDS = frozenset((b"message", b"smessage", b"subscribe", b"ssubscribe", b"unsubscribe",
                        b"sunsubscribe", b"pong"))


class Unavailable(Exception):
    """What a callback gets when its command cannot be answered: the link broke or timed out
    (the command may or may not have run), or no server is reachable (it did not run)."""


UNAVAILABLE = Unavailable("redis unavailable")
# An argument that is "1" on a Redis Cluster and "0" on a single server, for a call made
# before the first CLUSTER SLOTS answered (sharded pub/sub or not): resolved when it is sent.
SHARDED = object()


class Target:
    """Where one URL points: redis://[user:password@]host:port[/db], rediss:// for TLS (its
    query may name the CA file that signed the server's certificate, ``ssl_ca_certs=F``, or
    skip the check, ``ssl_cert_reqs=none``)."""

    __slots__ = ("host", "port", "user", "password", "db", "tls", "verify", "ca_file")

    def __init__(self, url):
        parts = urlsplit(url)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError("a Redis URL starts with redis:// or rediss://: %r" % url)
        if not parts.hostname:
            raise ValueError("no host in Redis URL %r" % url)
        self.host = parts.hostname
        self.port = parts.port or 6379
        self.user = unquote(parts.username) if parts.username else None
        self.password = unquote(parts.password) if parts.password is not None else None
        path = parts.path.strip("/")
        if path and not path.isdigit():
            raise ValueError("the path of a Redis URL is a database number: %r" % url)
        self.db = int(path or 0)
        self.tls = parts.scheme == "rediss"
        query = dict(parse_qsl(parts.query or ""))
        self.verify = query.get("ssl_cert_reqs", "required").lower() != "none"
        self.ca_file = query.get("ssl_ca_certs")

    def tls_context(self):
        context = ssl.create_default_context(cafile=self.ca_file)
        if not self.verify:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        return context

    def hello(self):
        """The commands that open a connection: AUTH, then SELECT."""
        commands = []
        if self.password is not None:
            commands.append(("AUTH", self.user, self.password) if self.user
                            else ("AUTH", self.password))
        if self.db:
            commands.append(("SELECT", self.db))
        return commands


def key_slot(tag: bytes) -> int:
    """The cluster slot of a key whose hash tag is ``tag`` (Redis's CRC16, XMODEM)."""
    return binascii.crc_hqx(tag, 0) % SLOTS


class Link:
    """One connection to one Redis server, driven by the loop (``on_event``, ``tick``)."""

    DOWN, CONNECTING, UP = 0, 1, 2

    def __init__(self, redis, target, addr, subscriber=False):
        self.redis = redis
        self.target = target
        self.addr = addr                  # (host, port)
        self.subscriber = subscriber
        self.state = self.DOWN
        self.sock = None
        self.reader = None
        self.out = []                     # packed commands not yet written
        self.unsent = b""                 # what the kernel did not take of the last write
        self.callbacks = collections.deque()
        self.waiting_since = 0.0          # when the oldest unanswered command was written
        self.heard_at = 0.0
        self.backoff = 0.0
        self.retry_at = 0.0
        self.handshaking = False          # TLS handshake in progress
        self.failing_since = 0.0          # when it last failed without an answer since (0: fine)
        self.answered = False             # any answer since it connected
        self.logged_at = 0.0              # when its failure was last logged
        self.channels = set()             # subscriber link: channels subscribed or asked for
        self.leaving = collections.Counter()   # channels we asked to leave, not yet confirmed

    # -- commands ------------------------------------------------------------------------------

    def call(self, callback, *args):
        """Queue one command; callback(reply) when it is answered, or with UNAVAILABLE (never
        from within this call: its caller may not be ready for an answer yet)."""
        if self.state == self.DOWN:
            if callback is not None:
                self.redis.fail_soon(callback)
            return
        self.out.append(hiredis.pack_command(args))
        self.callbacks.append(callback)
        self.redis.dirty.add(self)

    def send(self, *args):
        """A command whose answer comes as a push (a subscriber link's SSUBSCRIBE)."""
        if self.state != self.DOWN:
            self.out.append(hiredis.pack_command(args))
            self.redis.dirty.add(self)

    def flush(self):
        if self.state != self.UP or self.handshaking:
            return
        if self.out:
            data = self.unsent + b"".join(self.out)
            self.redis.count("commands", len(self.out))
            self.out.clear()
        elif self.unsent:
            data = self.unsent
        else:
            return
        self.redis.count("round_trips", 1)
        if not self.waiting_since:
            self.waiting_since = self.redis.now
        try:
            sent = self.sock.send(data)
        except (BlockingIOError, ssl.SSLWantWriteError, ssl.SSLWantReadError):
            sent = 0
        except OSError as e:
            self.lost("write failed: %s" % e)
            return
        self.unsent = data[sent:]
        self.redis.watch(self, IN | OUT if self.unsent else IN)

    # -- the connection ----------------------------------------------------------------------

    def connect(self):
        host, port = self.addr
        try:
            info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
            sock = socket.socket(info[0], socket.SOCK_STREAM | socket.SOCK_NONBLOCK)
        except OSError as e:
            self.lost("cannot connect: %s" % e)
            return
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = sock.connect_ex(info[4])
        if err not in (0, errno.EINPROGRESS):
            sock.close()
            self.lost("cannot connect: %s" % errno.errorcode.get(err, err))
            return
        self.sock = sock
        self.state = self.CONNECTING
        self.reader = hiredis.Reader()
        self.waiting_since = self.redis.now       # connecting counts against the timeout
        self.redis.watch(self, OUT, new=True)

    def _connected(self):
        if self.target.tls:
            self.sock = self.target.tls_context().wrap_socket(self.sock, server_hostname=self.addr[0],
                                            do_handshake_on_connect=False)
            self.handshaking = True
        self.state = self.UP
        self.heard_at = self.redis.now
        self.waiting_since = 0.0
        # Hello first: whatever was queued while connecting follows it in the same write.
        queued, self.out = self.out, []
        queued_callbacks, self.callbacks = self.callbacks, collections.deque()
        for command in self.target.hello():
            self.call(self._hello_answered, *command)
        if not self.subscriber:
            for command in self.redis.preload:    # (scripts: an EVALSHA after finds them)
                self.call(None, *command)
        self.out += queued
        self.callbacks += queued_callbacks
        self.redis.dirty.add(self)
        self.redis.link_up(self)

    def _hello_answered(self, reply):
        if isinstance(reply, Exception) and reply is not UNAVAILABLE:
            self.lost("refused the connection: %s" % reply)

    def on_event(self, events):
        if self.state == self.CONNECTING:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self.lost("cannot connect: %s" % errno.errorcode.get(err, err))
                return
            self._connected()
            if not self.handshaking:
                self.flush()
                return
        if self.handshaking:
            try:
                self.sock.do_handshake()
            except ssl.SSLWantReadError:
                self.redis.watch(self, IN)
                return
            except ssl.SSLWantWriteError:
                self.redis.watch(self, IN | OUT)
                return
            except (ssl.SSLError, OSError) as e:
                self.lost("TLS handshake failed: %s" % e)
                return
            self.handshaking = False
            self.flush()
            return
        if events & OUT and self.unsent:
            self.flush()
        if events & ~OUT:
            self._read()

    def _read(self):
        # Into the worker's one buffer: recv(262144) made a fresh 256 KiB object per read,
        # which malloc serves by mmap, mremap and munmap: three more syscalls per reply.
        buffer = self.redis.read_buffer
        while self.state == self.UP:
            try:
                n = self.sock.recv_into(buffer)
            except (BlockingIOError, ssl.SSLWantReadError):
                return
            except OSError as e:
                self.lost("read failed: %s" % e)
                return
            if not n:
                self.lost("closed by the server")
                return
            self.heard_at = self.redis.now
            reader = self.reader
            reader.feed(buffer, 0, n)
            try:
                while True:
                    reply = reader.gets()
                    if reply is False:
                        break
                    self._dispatch(reply)
                    if self.state != self.UP:
                        return
            except hiredis.ProtocolError as e:
                self.lost("protocol error: %s" % e)
                return
            if n < len(buffer) and not (self.target.tls and self.sock.pending()):
                return

    def _dispatch(self, reply):
        if (self.subscriber and type(reply) is list and reply and type(reply[0]) is bytes
                and reply[0] in PUSH_KINDS):
            self.redis.push(self, reply)
            return
        if not self.callbacks:
            if self.subscriber and reply == b"PONG":   # PING on a link not subscribed yet
                self.pong()
                return
            self.lost("an answer nobody asked for")
            return
        callback = self.callbacks.popleft()
        self.waiting_since = self.redis.now if self.callbacks else 0.0
        if (not self.answered or self.failing_since) and not isinstance(reply, Exception):
            self.pong()
        if callback is not None:
            callback(reply)

    def tick(self, now, timeout):
        if self.state == self.DOWN:
            if now >= self.retry_at:
                self.connect()
            return
        if self.waiting_since and now - self.waiting_since > timeout:  # (connecting too)
            self.lost("no answer for %.1f s" % (now - self.waiting_since))
        elif self.state == self.UP and now - self.heard_at > PING_EVERY and not self.callbacks:
            if self.subscriber:
                self.send("PING")                 # answered by a push: see Redis.push
                if not self.waiting_since:
                    self.waiting_since = now
            else:
                self.call(None, "PING")

    def lost(self, reason):
        """Close, fail every command waiting, and connect again after a backoff."""
        was = self.state
        if self.sock is not None:
            self.redis.unwatch(self)
            self.sock.close()
            self.sock = None
        self.state = self.DOWN
        self.answered = False
        self.handshaking = False
        self.out.clear()
        self.unsent = b""
        self.waiting_since = 0.0
        callbacks, self.callbacks = self.callbacks, collections.deque()
        self.leaving.clear()
        self.backoff = min(BACKOFF_MAX, max(BACKOFF_MIN, self.backoff * 2))
        self.retry_at = self.redis.now + self.backoff * random.uniform(0.5, 1.5)
        self.redis.link_down(self, reason, was)
        for callback in callbacks:
            if callback is not None:
                callback(UNAVAILABLE)

    def pong(self):
        if not self.answered:
            self.answered = True
            self.redis.on_health()
        self.waiting_since = 0.0
        self.backoff = 0.0                         # healthy: the next failure starts small
        self.failing_since = 0.0


class Redis:
    """One worker's links: one per server for commands and one for pub/sub, slot-routed."""

    def __init__(self, urls, loop, on_push, on_subscriber_lost, log, count, timeout, now,
                 on_health, preload=()):
        self.targets = [Target(url) for url in urls]
        self.loop = loop                  # register(fd, handler, events) / modify / unregister
        self.on_push = on_push            # (kind, channel, data) of a pub/sub push
        self.on_subscriber_lost = on_subscriber_lost   # (channels) a subscriber link dropped
        self.log = log
        self.count = count                # count(name, n)
        self.timeout = timeout
        self.now = now
        self.on_health = on_health        # () called when a link or the mode may have changed
        self.preload = preload            # commands each command link sends first (SCRIPT LOAD)
        self.failing = []                 # callbacks owed UNAVAILABLE, at the next flush
        self.links = {}                   # (host, port) -> command Link
        self.read_buffer = bytearray(READ_BYTES)   # every link reads into it (hiredis copies)
        self.subscribers = {}             # (host, port) -> subscriber Link
        self.dirty = set()
        self.cluster = len(self.targets) > 1 or None   # None: not known before CLUSTER SLOTS
        self.slots = None                 # cluster: slot -> (host, port) of its master
        self.refreshing = False
        self.refresh_after = 0.0
        self.seed = 0
        self.auth = self.targets[0]       # every server of one cluster takes the same AUTH
        self.deferred = []                # calls made before the first CLUSTER SLOTS answered
        self.discover()

    # -- loop glue ---------------------------------------------------------------------------

    def watch(self, link, events, new=False):
        if new:
            self.loop.register(link.sock.fileno(), link.on_event, events)
        else:
            self.loop.modify(link.sock.fileno(), events)

    def unwatch(self, link):
        self.loop.unregister(link.sock.fileno())

    def flush(self):
        """Once per loop turn: the failures owed, then everything asked of each server in one
        write.  True if answering the failures asked for more that fails (the loop turns
        again at once)."""
        if self.failing:
            failing, self.failing = self.failing, []
            for callback in failing:
                callback(UNAVAILABLE)
        dirty, self.dirty = self.dirty, set()
        for link in dirty:
            link.flush()
        return bool(self.failing)

    def fail_soon(self, callback):
        self.failing.append(callback)

    def tick(self, now):
        self.now = now
        for link in list(self.links.values()) + list(self.subscribers.values()):
            link.tick(now, self.timeout)
        if not self.refreshing and now >= self.refresh_after:
            if self.cluster is None:
                self.discover()
            elif self.cluster:
                self.refresh_slots()

    def healthy(self):
        """The mode is known and every server this worker calls answers: each link that
        serves slots (every link, on one server) is up and has answered since it connected
        (a stopped server's kernel still completes connections).  A failed master that no
        longer serves slots does not count, even when it is a seed."""
        if self.cluster is None:
            return False
        serving = set(self.slots) if self.cluster and self.slots else None
        return all(link.state == Link.UP and link.answered for addr, link in self.links.items()
                   if serving is None or addr in serving)

    # -- which server --------------------------------------------------------------------------

    def link(self, addr, subscriber=False):
        links = self.subscribers if subscriber else self.links
        link = links.get(addr)
        if link is None:
            link = links[addr] = Link(self, self.auth, addr, subscriber)
            link.connect()
        return link

    def link_for(self, slot, subscriber=False):
        if self.cluster:
            addr = self.slots[slot] if self.slots else None
            if addr is None:
                return None
        else:
            addr = (self.targets[0].host, self.targets[0].port)
        return self.link(addr, subscriber)

    def discover(self):
        """Ask a seed what it is: a Redis Cluster answers CLUSTER SLOTS with its slot map."""
        self.refreshing = True
        self.next_seed().call(self._discovered, "CLUSTER", "SLOTS")

    def refresh_slots(self):
        """Ask for the slot map again (after MOVED, a lost master, and now and then): of a
        server that answers now, else of the next seed."""
        if self.refreshing:
            return
        self.refreshing = True
        links = [link for link in self.links.values() if link.state == Link.UP]
        link = random.choice(links) if links else self.next_seed()
        link.call(self._discovered, "CLUSTER", "SLOTS")

    def next_seed(self):
        target = self.targets[self.seed % len(self.targets)]
        self.seed += 1
        return self.link((target.host, target.port))

    def _discovered(self, reply):
        self.refreshing = False
        if reply is UNAVAILABLE:
            self.refresh_after = self.now + BACKOFF_MIN * random.uniform(1, 4)
            if self.cluster is None:              # try the next seed, soon
                self.cluster_unknown()
            return
        if isinstance(reply, Exception):
            if self.cluster:                      # a master that lost its slots for now
                self.refresh_after = self.now + 0.2
                return
            self.cluster = False                  # "cluster support disabled": one server
            self.log("redis: %s:%d is a single server" % (self.targets[0].host,
                                                         self.targets[0].port), "info")
        else:
            slots = [None] * SLOTS
            for start, end, master, *_replicas in reply:
                addr = (master[0].decode() or self.targets[0].host, master[1])
                slots[start:end + 1] = [addr] * (end - start + 1)
            moved = self.slots is not None and slots != self.slots
            first = self.cluster is not True or self.slots is None
            self.slots = slots
            self.cluster = True
            # A master we cannot reach still holds slots: a failover may be on its way, so
            # look again soon (else every 30 s: MOVED and lost links also make us look).
            down = any(addr in self.links and self.links[addr].state == Link.DOWN
                       for addr in set(slots))
            self.refresh_after = self.now + (1.0 if down else 30.0)
            if first:
                self.log("redis: a cluster of %d masters" % len(set(filter(None, slots))),
                         "info")
            if moved:
                self.resubscribe_moved()
            self.forget_gone(set(slots))
        sharded = b"1" if self.cluster else b"0"
        deferred, self.deferred = self.deferred, []
        for slot, callback, *args in deferred:
            self.call(slot, callback, *(sharded if arg is SHARDED else arg for arg in args))
        self.on_health()

    def forget_gone(self, masters):
        """Stop calling servers that hold no slot any more (a failed master), once down."""
        seeds = {(target.host, target.port) for target in self.targets}
        for links in (self.links, self.subscribers):
            for addr in [addr for addr, link in links.items()
                         if addr not in masters and addr not in seeds
                         and link.state == Link.DOWN and not link.channels]:
                del links[addr]

    def cluster_unknown(self):
        """No seed answered yet: calls made meanwhile fail now, the next seed is tried."""
        deferred, self.deferred = self.deferred, []
        for _slot, callback, *_args in deferred:
            if callback is not None:
                self.fail_soon(callback)
        self.refresh_after = self.now + BACKOFF_MIN

    # -- commands --------------------------------------------------------------------------

    def call(self, slot, callback, *args, redirects=0):
        """Send one command about the key of ``slot`` to the server that holds it."""
        if self.cluster is None:
            if self.refreshing:
                self.deferred.append((slot, callback) + args)
            else:
                self.fail_soon(callback)
            return
        link = self.link_for(slot)
        if link is None:
            self.fail_soon(callback)
            self.refresh_slots()
            return
        if not self.cluster:
            link.call(callback, *args)
            return
        link.call(lambda reply: self._answered(slot, callback, args, redirects, reply), *args)

    def _answered(self, slot, callback, args, redirects, reply):
        if type(reply) is hiredis.ReplyError and redirects < MAX_REDIRECTS:
            text = str(reply)
            if text.startswith(("MOVED ", "ASK ")):
                kind, _slot, where = text.split(" ", 2)
                host, _, port = where.rpartition(":")
                addr = (host or self.targets[0].host, int(port))
                if kind == "MOVED":
                    if self.slots is not None:
                        self.slots[slot] = addr
                    self.refresh_after = 0.0      # the next tick refreshes the whole map
                    self.call(slot, callback, *args, redirects=redirects + 1)
                else:
                    link = self.link(addr)
                    link.call(None, "ASKING")
                    link.call(lambda again: self._answered(slot, callback, args, redirects + 1,
                                                           again), *args)
                return
            if text.startswith(("TRYAGAIN", "CLUSTERDOWN")):
                self.refresh_after = 0.0
        callback(reply)

    # -- pub/sub ---------------------------------------------------------------------------

    def subscribe(self, slot, channel):
        """Ask for a channel's messages; the answer comes as a push.  False: no server."""
        link = self.link_for(slot, subscriber=True)
        if link is None or link.state == Link.DOWN:
            return False
        link.channels.add(channel)
        link.send("SSUBSCRIBE" if self.cluster else "SUBSCRIBE", channel)
        return True

    def unsubscribe(self, slot, channel):
        for link in self.subscribers.values():
            if channel in link.channels:
                link.channels.discard(channel)
                if link.state != Link.DOWN:
                    link.leaving[channel] += 1
                    link.send("SUNSUBSCRIBE" if self.cluster else "UNSUBSCRIBE", channel)

    def push(self, link, reply):
        kind = reply[0]
        if kind == b"pong":
            link.pong()
            return
        link.pong()                               # any push shows the link alive
        channel = reply[1]
        if kind in (b"sunsubscribe", b"unsubscribe"):
            if link.leaving[channel]:             # the answer to our own UNSUBSCRIBE
                link.leaving[channel] -= 1
                if not link.leaving[channel]:
                    del link.leaving[channel]
            elif channel in link.channels:        # not asked for: the slot moved away
                link.channels.discard(channel)
                self.refresh_after = 0.0
                self.on_subscriber_lost([channel])
            return
        self.on_push(kind, channel, reply[2])

    def resubscribe_moved(self):
        """The slot map changed: channels subscribed where their slot no longer is go again."""
        for link in self.subscribers.values():
            gone = [channel for channel in link.channels
                    if self.slots[key_slot(channel_tag(channel))] != link.addr]
            for channel in gone:
                link.channels.discard(channel)
                if link.state != Link.DOWN:
                    link.leaving[channel] += 1
                    link.send("SUNSUBSCRIBE", channel)
            if gone:
                self.on_subscriber_lost(gone)

    def link_up(self, link):
        self.on_health()

    def link_down(self, link, reason, was):
        """Logged when a link that worked fails, then every LOG_FAILING_EVERY while it keeps
        failing (each retry would be a line otherwise)."""
        now = self.now
        if not link.failing_since or now - link.logged_at >= LOG_FAILING_EVERY:
            self.log("redis: %s:%d %s (%s)%s" % (
                link.addr[0], link.addr[1],
                "subscriber link lost" if link.subscriber else "link lost", reason,
                "; failing for %.0f s" % (now - link.failing_since) if link.failing_since
                else ""))
            link.logged_at = now
        if not link.failing_since:
            link.failing_since = now
        self.on_health()
        if was == Link.UP:
            self.count("reconnects", 1)
        if link.subscriber and link.channels:
            channels = list(link.channels)
            link.channels.clear()
            self.on_subscriber_lost(channels)
        if self.cluster:
            self.refresh_after = 0.0              # a master may have failed over
        elif self.cluster is None and not self.refreshing:
            self.refresh_after = 0.0


def channel_tag(channel):
    """The hash tag of a channel (or key) named ``...{tag}...``."""
    start = channel.index(b"{") + 1
    return channel[start:channel.index(b"}", start)]


def ask(url, commands, timeout=3.0):
    """Blocking, for ``megacomet.py check --redis`` only (never in a worker): the replies to
    ``commands`` on one connection to ``url``, errors as ReplyError values.  Raises OSError
    (or hiredis.ProtocolError) when the server cannot be reached or spoken to."""
    target = Target(url)
    sock = socket.create_connection((target.host, target.port), timeout=timeout)
    try:
        if target.tls:
            sock = target.tls_context().wrap_socket(sock, server_hostname=target.host)
        hello = target.hello()
        sock.sendall(b"".join(hiredis.pack_command(tuple(c)) for c in hello + list(commands)))
        reader = hiredis.Reader()
        replies = []
        while len(replies) < len(hello) + len(commands):
            reply = reader.gets()
            if reply is False:
                data = sock.recv(65536)
                if not data:
                    raise OSError("connection closed by the server")
                reader.feed(data)
            else:
                replies.append(reply)
        for reply in replies[:len(hello)]:
            if isinstance(reply, hiredis.ReplyError):
                raise OSError("refused: %s" % reply)
        return replies[len(hello):]
    finally:
        sock.close()


def check(urls, out=print):
    """``megacomet.py check --redis URL...``: can the nodes use this Redis?  Exit status."""
    problems = 0
    for url in urls:
        shown = Target(url)
        name = "%s:%d" % (shown.host, shown.port)
        try:
            info, policy, cluster = ask(url, [("INFO", "server"),
                                              ("CONFIG", "GET", "maxmemory-policy"),
                                              ("CLUSTER", "INFO")])
        except (OSError, hiredis.ProtocolError, ValueError) as e:
            out("FIX  redis %s: not reachable (%s)" % (name, e))
            problems += 1
            continue
        fields = dict(line.split(":", 1) for line in info.decode().splitlines()
                      if ":" in line)
        version = fields.get("redis_version", "?")
        in_cluster = not isinstance(cluster, hiredis.ReplyError)
        major_minor = tuple(int(part) for part in version.split(".")[:2] if part.isdigit())
        need = (7, 0) if in_cluster else (6, 2)
        ok = len(major_minor) == 2 and major_minor >= need
        out("%-4s redis %s: version %s (%s needs %d.%d or later)"
            % ("ok" if ok else "FIX", name, version,
               "a cluster node" if in_cluster else "a single server", *need))
        problems += not ok
        if isinstance(policy, hiredis.ReplyError) or len(policy) != 2:
            out("tip  redis %s: maxmemory-policy cannot be read (%s): it must be noeviction"
                % (name, policy))
            continue
        value = policy[1].decode()
        ok = value == "noeviction"
        out("%-4s redis %s: maxmemory-policy %s, needs noeviction" % ("ok" if ok else "FIX",
                                                                      name, value))
        if not ok:
            out("       fix: redis-cli -h %s -p %d CONFIG SET maxmemory-policy noeviction (and in "
                "redis.conf): an evicted stream loses messages" % (shown.host, shown.port))
            problems += 1
    out("megacomet check: %s" % ("Redis is ready" if not problems else
                                 "%d Redis problem(s)" % problems))
    return 1 if problems else 0
