#!/usr/bin/env python3
"""cluster: a local MegaComet cluster in one command (Redis plus N nodes), to try it.

    python3 tools/cluster.py                     # one Redis, 2 nodes of 2 workers
    python3 tools/cluster.py --redis-cluster     # a Redis Cluster of 3 masters + 3 replicas
    python3 tools/cluster.py --nodes 3 --workers 1 --base-port 8100
    python3 tools/cluster.py --dry-run           # start Redis, print the node commands, stop
    python3 tools/cluster.py --redis-only        # Redis only, until Ctrl-C: run nodes by hand

It starts a redis-server of its own on a free loopback port (tools/redislab.py;
Debian: ``apt-get install redis-server``), or six of them made into a Redis
Cluster, then N MegaComet nodes through tools/launch.py, node i as

    megacomet.py --workers W --host 127.0.0.1 --port BASE+10*i --app-port BASE+1000+10*i
                 --redis URL [--redis URL ...]

(every cluster node's URL is given as a seed), prints the Redis URL(s), each
node's client and app URLs and a curl line to subscribe on one node and
publish on another, then waits for Ctrl-C or SIGTERM and stops everything.

It must never touch a Redis or a server it did not start (nothing on 6379, no
system service), never listen beyond loopback unless --host says so, and
never leave a process behind: the nodes and the Redis servers are stopped by
pid on any exit (the nodes get SIGTERM, the Redis servers SIGKILL, should
this tool itself be killed).  Every wait is bounded, but the one for Ctrl-C.

Standard library only (tools/redislab.py needs hiredis, as --redis does).
"""

import argparse
import os
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import launch  # noqa: E402  (how the tests and tools start a server)
import redislab  # noqa: E402  (real redis-server processes on free ports)

HOST = "127.0.0.1"
START_TIMEOUT = 30.0
APP_OFFSET = 1000      # base 8000: client ports 8000, 8010, ...; app ports 9000, 9010, ...
NODE_STEP = 10


def parse_args(argv):
    p = argparse.ArgumentParser(prog="tools/cluster.py",
                                description="Start Redis and N MegaComet nodes on this machine.")
    p.add_argument("--nodes", type=int, default=2, help="MegaComet nodes (default %(default)s)")
    p.add_argument("--workers", type=int, default=2, help="workers per node (default %(default)s)")
    p.add_argument("--redis-cluster", action="store_true",
                   help="a Redis Cluster of 3 masters + 3 replicas instead of one Redis")
    p.add_argument("--base-port", type=int, default=8000,
                   help="node i: client port BASE+10*i, app port BASE+1000+10*i (default %(default)s)")
    p.add_argument("--host", default=HOST,
                   help="client port address of the nodes (default %(default)s: this machine only)")
    p.add_argument("--dry-run", action="store_true",
                   help="start Redis, print the node commands, stop Redis and exit")
    p.add_argument("--redis-only", action="store_true",
                   help="start Redis and print the node commands, but start no node (until Ctrl-C)")
    p.add_argument("extra", nargs="*", metavar="-- FLAG",
                   help="more megacomet.py flags for every node, after -- (e.g. -- --max-queued 256)")
    args = p.parse_args(argv)
    if args.nodes < 1 or args.workers < 1:
        p.error("--nodes and --workers must be at least 1")
    last = args.base_port + APP_OFFSET + NODE_STEP * (args.nodes - 1)
    if args.base_port < 1 or last > 65535:
        p.error("the ports would run from %d to %d: pick another --base-port" % (args.base_port, last))
    return args


def node_ports(args):
    return [(args.base_port + NODE_STEP * i, args.base_port + APP_OFFSET + NODE_STEP * i)
            for i in range(args.nodes)]


def node_flags(args, client, app, redis_urls):
    flags = ["--workers", args.workers, "--host", args.host, "--port", client, "--app-port", app]
    for url in redis_urls:
        flags += ["--redis", url]
    return [str(f) for f in (*flags, *args.extra)]


def taken_ports(ports, host):
    """The ports of the plan something already holds (so we stop before starting anything)."""
    taken = []
    for port, addr in [(c, host) for c, _ in ports] + [(a, HOST) for _, a in ports]:
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)   # as the server binds
            try:
                s.bind((addr, port))
            except OSError:
                taken.append(port)
    return taken


def shown_host(host):
    return HOST if host in ("0.0.0.0", "", "::") else host


def print_redis(redis):
    if isinstance(redis, redislab.Cluster):
        masters = set(redis.masters())
        print("Redis Cluster (3 masters + 3 replicas), every node a seed:")
        for node in redis.nodes:
            print("  %s  %s  pid %d" % (node.url, "master " if node in masters else "replica",
                                        node.pid))
    else:
        print("Redis: %s  pid %d  (redis-cli -p %d)" % (redis.url, redis.pid, redis.port))


def print_nodes(args, started):
    host = shown_host(args.host)
    print()
    for i, (node, client, app) in enumerate(started):
        print("node %d: client http://%s:%d  app http://%s:%d  pid %d" % (
            i, host, client, HOST, app, node.proc.pid))
    sub_client = started[0][1]
    pub_app = started[-1][2]
    print()
    print("Try it (subscribe on node 0, publish on node %d):" % (len(started) - 1))
    print("  curl 'http://%s:%d/sub/alice?since=0'" % (host, sub_client))
    print("  curl -d 'hello from node %d' http://%s:%d/pub/alice" % (len(started) - 1, HOST, pub_app))
    print()
    print("Ctrl-C stops everything.")


def run(args):
    """Start, print, wait; returns the exit status.  Everything started is stopped here."""
    ports = node_ports(args)
    starting_nodes = not (args.dry_run or args.redis_only)
    if starting_nodes:
        taken = taken_ports(ports, args.host)
        if taken:
            print("cluster: ports in use: %s (another --base-port?)" % ", ".join(map(str, taken)),
                  file=sys.stderr)
            return 2
    if not redislab.available():
        print("cluster: redis-server is not installed (Debian: apt-get install redis-server)",
              file=sys.stderr)
        return 2
    if redislab.hiredis is None:
        print("cluster: hiredis is missing: python3 -m pip install -e '.[redis]'", file=sys.stderr)
        return 2

    redis = redislab.Cluster() if args.redis_cluster else redislab.Standalone()
    logs = tempfile.mkdtemp(prefix="megacomet-cluster-")
    started = []                      # (launch.Launched, client port, app port)
    try:
        t0 = time.monotonic()
        redis.start()
        urls = redis.urls if args.redis_cluster else [redis.url]
        print_redis(redis)
        print("  (started in %.1f s)" % (time.monotonic() - t0))
        commands = [[sys.executable, launch.MEGACOMET, *node_flags(args, c, a, urls)]
                    for c, a in ports]
        if not starting_nodes:
            print()
            print("The nodes' commands:" if args.dry_run else "Start the nodes yourself:")
            for argv in commands:
                print("  " + shlex.join(argv))
            if args.dry_run:
                return 0
            print("\nCtrl-C stops Redis.")
        for i, argv in enumerate(commands):
            # Its own session keeps a terminal's Ctrl-C for us (we stop it, by pid, in order);
            # SIGTERM when this tool dies (even by SIGKILL) stops its workers with it.
            node = launch.launch(argv, log=os.path.join(logs, "node%d.log" % i),
                                 timeout=START_TIMEOUT, start_new_session=True,
                                 preexec_fn=lambda: redislab.set_pdeathsig(signal.SIGTERM))
            started.append((node, node.client, node.app))
        if started:
            print_nodes(args, started)
        watch(started, redis, logs)
        return 0
    except KeyboardInterrupt:
        return 0
    except launch.StartError as e:
        print("cluster: %s" % e, file=sys.stderr)
        return 1
    except redislab.RedisLabError as e:
        print("cluster: Redis did not start: %s" % e, file=sys.stderr)
        return 1
    finally:
        # A second Ctrl-C must not cut the stopping short (each stop is bounded).
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if started or not args.dry_run:
            print("\nstopping ...", flush=True)
        for node, _, _ in started:            # the nodes first: Redis going away is no news
            launch.stop(node.proc, group=True)
        redis.stop()
        shutil.rmtree(logs, ignore_errors=True)


def watch(started, redis, logs):
    """Until Ctrl-C or SIGTERM: say once when a node or a Redis server exits (kill one to
    see what the others do: that is allowed, and it is no reason to stop)."""
    told = set()
    servers = redis.nodes if isinstance(redis, redislab.Cluster) else [redis]
    while True:
        time.sleep(0.5)
        for i, (node, _, _) in enumerate(started):
            if node.proc.poll() is not None and ("node", i) not in told:
                told.add(("node", i))
                print("cluster: node %d (pid %d) exited with status %s; its log: %s" % (
                    i, node.proc.pid, node.proc.returncode, os.path.join(logs, "node%d.log" % i)),
                    flush=True)
        for server in servers:
            if not server.alive() and ("redis", server.port) not in told:
                told.add(("redis", server.port))
                print("cluster: redis-server on port %d exited" % server.port, flush=True)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)

    def terminate(signum, frame):
        raise KeyboardInterrupt           # the same way out as Ctrl-C: finally stops it all

    signal.signal(signal.SIGTERM, terminate)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
