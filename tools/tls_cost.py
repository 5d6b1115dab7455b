#!/usr/bin/env python3
"""What TLS costs a server: memory per idle connection and CPU per handshake.

For MegaComet (plain, then --tls-cert/--tls-key) and, where nginx with the
Nchan module is installed, nginx+Nchan (plain, then ``listen ... ssl``), each
with the same number of workers, on free loopback ports:

  PSS per idle connection   N long-polls held on one id (``/sub/<id>?timeout=120``,
                            Nchan's ``/sub/<id>``), each on its own connection
                            (TLS: a full handshake each); the workers' PSS from
                            /proc/<pid>/smaps_rollup, before and while held,
                            divided by N.
  CPU per connection        H connections one after another, each connected,
                            handshaken (TLS) and closed; the workers' CPU time
                            (utime + stime, /proc/<pid>/stat) before and after,
                            divided by H.  A TLS handshake costs the TLS figure
                            minus the plain one.

The certificates are a test CA's (the openssl command, in a temporary dir),
P-256 ECDSA keys by default (--rsa: RSA 2048).  The client is this process
(blocking sockets, no session resumption: every handshake is a full one).

    python3 tools/tls_cost.py --conns 5000 --handshakes 2000 --workers 2
"""

import argparse
import json
import os
import resource
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

import launch  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")
NCHAN_MODULES = ("/usr/lib/nginx/modules/ngx_nchan_module.so",
                 "/usr/share/nginx/modules/ngx_nchan_module.so")


def run(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_pki(d, rsa):
    key = ["-newkey", "rsa:2048"] if rsa else ["-newkey", "ec", "-pkeyopt",
                                               "ec_paramgen_curve:prime256v1"]
    run("req", "-x509", *key, "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
        "-subj", "/CN=tls_cost CA", "-addext", "basicConstraints=critical,CA:TRUE", cwd=d)
    with open(os.path.join(d, "ext.cnf"), "w") as f:
        f.write("subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n")
    run("req", *key, "-nodes", "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=127.0.0.1", cwd=d)
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
        "-CAcreateserial", "-days", "2", "-extfile", "ext.cnf", "-out", "server.pem", cwd=d)
    return [os.path.join(d, n) for n in ("ca.pem", "server.pem", "server.key")]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pss(pids):
    total = 0
    for pid in pids:
        with open("/proc/%d/smaps_rollup" % pid) as f:
            for line in f:
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
    return total


def cpu(pids):
    total = 0
    for pid in pids:
        with open("/proc/%d/stat" % pid) as f:
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])
    return total / CLK_TCK


class MegaComet:
    name = "megacomet"

    def __init__(self, workers, tls, workdir):
        flags = ["--workers", workers, "--host", "127.0.0.1", "--port", 0, "--app-port", 0,
                 "--poll-timeout", 120, "--header-timeout", 60]
        if tls:
            flags += ["--tls-cert", tls[1], "--tls-key", tls[2]]
        self.started = launch.launch([sys.executable, launch.MEGACOMET], flags,
                                     log=os.path.join(workdir, "megacomet.log"))
        self.port, self.app = self.started.client, self.started.app
        with urllib.request.urlopen("http://127.0.0.1:%d/stats" % self.started.app) as r:
            self.pids = [w["pid"] for w in json.load(r)["workers"]]
        self.path = "/sub/idle?timeout=120"

    def stop(self):
        launch.stop(self.started.proc)


class Nchan:
    name = "nginx+nchan"

    def __init__(self, workers, tls, workdir):
        d = tempfile.mkdtemp(prefix="nchan-", dir=workdir)
        module = next((m for m in NCHAN_MODULES if os.path.exists(m)), None)
        self.port = free_port()
        self.app = app = free_port()
        ssl_conf = ""
        if tls:
            ssl_conf = ("ssl_certificate %s; ssl_certificate_key %s; ssl_protocols TLSv1.2 "
                        "TLSv1.3; ssl_prefer_server_ciphers on;" % (tls[1], tls[2]))
        conf = os.path.join(d, "nginx.conf")
        with open(conf, "w") as f:
            f.write("""%s
daemon off; master_process on; worker_processes %d; worker_rlimit_nofile 40000;
pid %s/nginx.pid; error_log %s/error.log warn;
events { worker_connections 38000; }
http {
  access_log off; client_body_temp_path %s; proxy_temp_path %s; fastcgi_temp_path %s;
  uwsgi_temp_path %s; scgi_temp_path %s;
  server {
    listen 127.0.0.1:%d %s reuseport backlog=4096; %s
    location ~ ^/sub/([A-Za-z0-9_~:@-]+)$ {
      nchan_subscriber longpoll eventsource websocket; nchan_channel_id $1;
      nchan_subscriber_timeout 120s;
    }
  }
  server { listen 127.0.0.1:%d; location ~ ^/pub/(.+)$ { nchan_publisher; nchan_channel_id $1; } }
}
""" % ("load_module %s;" % module if module else "", workers, d, d, d, d, d, d, d,
                self.port, "ssl" if tls else "", ssl_conf, app))
        self.proc = subprocess.Popen(["nginx", "-p", d, "-c", conf], stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 20
        while len(launch.children_of(self.proc.pid)) < workers or not launch.accepts(self.port):
            if time.monotonic() > deadline or self.proc.poll() is not None:
                self.stop()
                raise RuntimeError("nginx did not start (see %s/error.log)" % d)
            time.sleep(0.1)
        self.pids = launch.children_of(self.proc.pid)
        self.path = "/sub/idle"

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


def connect(port, ctx):
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return ctx.wrap_socket(sock, server_hostname="127.0.0.1") if ctx else sock


def measure(kind, workers, tls, ctx, conns, handshakes, workdir):
    server = kind(workers, tls, workdir)
    try:
        pids = server.pids
        request = b"GET %s HTTP/1.1\r\nHost: x\r\n\r\n" % server.path.encode()
        for _ in range(50):                          # warm-up: what a first connection loads
            with connect(server.port, ctx):
                pass
        time.sleep(1.0)
        cpu0 = cpu(pids)
        t0 = time.monotonic()
        for _ in range(handshakes):
            connect(server.port, ctx).close()
        took = time.monotonic() - t0
        time.sleep(0.5)
        cpu_per = (cpu(pids) - cpu0) / handshakes
        time.sleep(1.0)
        before = pss(pids)
        held = []
        for _ in range(conns):
            s = connect(server.port, ctx)
            s.sendall(request)
            held.append(s)
        time.sleep(3.0)                              # every request read and held
        after = pss(pids)
        cpu0 = cpu(pids)                             # one message to every held poll
        urllib.request.urlopen(urllib.request.Request(
            "http://127.0.0.1:%d/pub/idle" % server.app, data=b"hello", method="POST")).read()
        answered = 0
        for s in held:
            if b"hello" in s.recv(65536):
                answered += 1
            s.close()
        time.sleep(0.5)
        delivery = (cpu(pids) - cpu0) / conns
        return {"server": server.name, "tls": bool(tls), "workers": workers,
                "cpu_us_per_connection": round(cpu_per * 1e6, 1),
                "client_side_connections_per_s": round(handshakes / took),
                "pss_before_bytes": before, "pss_held_bytes": after,
                "pss_bytes_per_idle_connection": round((after - before) / conns),
                "cpu_us_per_delivery_and_close": round(delivery * 1e6, 1),
                "answered": answered}
    finally:
        server.stop()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--conns", type=int, default=5000, help="idle connections held")
    ap.add_argument("--handshakes", type=int, default=2000, help="connections for CPU")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--servers", default="megacomet,nchan")
    ap.add_argument("--rsa", action="store_true", help="RSA 2048 keys instead of P-256")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args(argv)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    workdir = tempfile.mkdtemp(prefix="tls-cost-")
    try:
        pki = make_pki(workdir, args.rsa)
        ctx = ssl.create_default_context(cafile=pki[0])
        kinds = {"megacomet": MegaComet, "nchan": Nchan}
        results = []
        for name in args.servers.split(","):
            if name == "nchan" and not shutil.which("nginx"):
                print("skipping nchan: nginx is not installed")
                continue
            for tls in (None, pki):
                r = measure(kinds[name], args.workers, tls, ctx if tls else None, args.conns,
                            args.handshakes, workdir)
                results.append(r)
                print("%-12s %-5s  PSS %6d B per idle connection  CPU %7.1f us per connection, "
                      "%5.1f us per delivery (and close; %d answered)"
                      % (r["server"], "TLS" if tls else "plain", r["pss_bytes_per_idle_connection"],
                         r["cpu_us_per_connection"], r["cpu_us_per_delivery_and_close"],
                         r["answered"]),
                      flush=True)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"key": "rsa2048" if args.rsa else "p256", "conns": args.conns,
                           "handshakes": args.handshakes, "results": results}, f, indent=1)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
