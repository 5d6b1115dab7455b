"""``megacomet.py check``: can this host hold N connections, and what to change if not.

Reads the limits that decide it (fds per process and in all, accept queues,
ports, TCP memory, conntrack, free memory), compares each with what N
connections over W workers need, and prints the exact fix for each one that
falls short.  It only reads: it never changes a setting itself.
"""

import math
import os
import resource

from . import shmqueue

KERNEL_BYTES_PER_CONNECTION = 4608     # socket, inode, buffers of an idle TCP connection
SERVER_BYTES_PER_CONNECTION = 512      # worker's share, with room (about 230 B measured)
FDS_PER_WORKER_BESIDES = 64 + 32       # the app port's reserve, listeners, eventfds, pipes
# CPU of one long-poll answered at its timeout and polled again: about what a delivery costs
# (56-69 us per delivery in tools/scale.py here, at every size up to 1 000 000).
REPOLL_CPU_US = 65
REPOLL_CORE_SHARE = 0.25   # of the host's cores, at most, for re-polls of idle long-polls


def read_proc(path):
    try:
        with open(path) as f:
            return [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        return None


def mem_available():
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def checks(connections, workers, max_ids, poll_timeout):
    """(name, what it is now, what is needed, ok, fix) for each limit; ok None: advice only."""
    per_worker = math.ceil(connections / workers) + FDS_PER_WORKER_BESIDES
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    rows = [("fd limit per process (hard; the server raises the soft one to it)",
             hard, per_worker, hard >= per_worker,
             "ulimit -n %d  (systemd: LimitNOFILE=%d; /etc/security/limits.conf: nofile)"
             % (per_worker, per_worker))]

    def sysctl(name, path, need, index=0, unit=1, fix_value=None):
        values = read_proc(path)
        if values is None:
            rows.append((name, "unreadable", need, True, "-"))
            return
        have = values[index] * unit
        value = fix_value if fix_value is not None else need
        rows.append((name, have, need, have >= need,
                     "sysctl -w %s=%s  (and in /etc/sysctl.d/ to keep it)" % (name, value)))

    sysctl("fs.file-max", "/proc/sys/fs/file-max", connections * 2 + 4096)
    sysctl("fs.nr_open", "/proc/sys/fs/nr_open", per_worker)
    burst = min(4096, connections)            # connections arriving at once, as after a restart
    sysctl("net.core.somaxconn", "/proc/sys/net/core/somaxconn", burst)
    sysctl("net.ipv4.tcp_max_syn_backlog", "/proc/sys/net/ipv4/tcp_max_syn_backlog", burst)
    ports = read_proc("/proc/sys/net/ipv4/ip_local_port_range")
    if ports:
        span = ports[1] - ports[0] + 1
        # Only what connects out counts: a proxy in front, or a load generator on this host.
        rows.append(("net.ipv4.ip_local_port_range (ports per source address, for a proxy "
                     "or load generator on this host)", span, min(connections, 28232),
                     True, "sysctl -w net.ipv4.ip_local_port_range='1024 65535'"
                     if span < connections else "-"))
    values = read_proc("/proc/sys/net/ipv4/tcp_mem")
    if values:
        low, pressure, high = values
        need = connections                    # a page of buffer each while a message is in flight
        rows.append(("net.ipv4.tcp_mem (pages; high)", high, need, high >= need,
                     "sysctl -w net.ipv4.tcp_mem='%d %d %d'"
                     % (max(low, need // 2), max(pressure, need * 3 // 4), max(high, need))))
    if os.path.exists("/proc/sys/net/netfilter/nf_conntrack_max"):
        sysctl("net.netfilter.nf_conntrack_max", "/proc/sys/net/netfilter/nf_conntrack_max",
               connections + 65536)
    available = mem_available()
    need = connections * (KERNEL_BYTES_PER_CONNECTION + SERVER_BYTES_PER_CONNECTION) + (256 << 20)
    if available is not None:
        rows.append(("free memory (MemAvailable, bytes)", available, need, available >= need,
                     "more memory, or fewer connections per host"))
    # Subscribers alone may fill 3/4 of the shared id table (publishers keep the rest), so
    # that many connections each on an id of its own need a larger table than the default.
    need = shmqueue.max_ids_for(connections, workers)
    rows.append(("--max-ids (server flag; if every connection subscribes to an id of its "
                 "own: subscribers may create ids in 3/4 of the table)", max_ids, need,
                 max_ids >= need, "start the server with --max-ids %d" % need))
    # Every idle long-poll is answered at --poll-timeout and polls again: with many held,
    # that alone can keep the cores busy (1 000 000 at 30 s: 33 000 re-polls a second).
    cores = os.cpu_count() or 1
    repoll_cores = connections / poll_timeout * REPOLL_CPU_US / 1e6
    longest = math.ceil(connections * REPOLL_CPU_US / 1e6 / (cores * REPOLL_CORE_SHARE))
    rows.append(("cores kept busy by re-polls of idle long-polls at --poll-timeout %d "
                 "(connections / timeout a second, about %d us of CPU each; %d cores here)"
                 % (poll_timeout, REPOLL_CPU_US, cores),
                 round(repoll_cores, 2), "at most %g" % (cores * REPOLL_CORE_SHARE),
                 repoll_cores <= cores * REPOLL_CORE_SHARE,
                 "start the server with --poll-timeout %d or more (or more cores)" % longest))
    migrate = read_proc("/proc/sys/net/ipv4/tcp_migrate_req")
    if migrate is not None:
        rows.append(("net.ipv4.tcp_migrate_req (advice: a restarted or reloaded worker's "
                     "queued connections move to a sibling instead of being reset)", migrate[0],
                     1, None if migrate[0] != 1 else True, "sysctl -w net.ipv4.tcp_migrate_req=1"))
    return rows


def report(connections, workers, max_ids, poll_timeout, out=print):
    rows = checks(connections, workers, max_ids, poll_timeout)
    out("megacomet check: %d connections over %d workers" % (connections, workers))
    failing = 0
    for name, have, need, ok, fix in rows:
        out("%-4s %s: %s, needs %s" % ({True: "ok", False: "FIX", None: "tip"}[ok], name, have,
                                       need))
        if ok is not True:
            failing += ok is False
            out("       fix: %s" % fix)
    out("megacomet check: %s" % ("this host can hold them" if not failing else
                                 "%d setting(s) fall short" % failing))
    return 1 if failing else 0
