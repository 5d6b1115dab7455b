"""The live dashboard: ``GET /dashboard`` on the app port, a page that reads ``/stats``.

- The page is one self-contained file: HTML with its own inline style and script, nothing
  loaded from anywhere (no ``src``, ``href``, ``url(``, no other host named), served with a
  Content-Security-Policy that lets it run only that script and fetch from its own origin;
  the single-file ``.pyz`` serves it too.
- With an app token, the page itself is public (it holds no data: it is the file in the
  package) and its data is not: ``/stats`` without the token is 401, as before.
- The browser check lets through only a browser's GET of ``/dashboard`` or ``/stats`` that
  the browser says its user asked for (``Sec-Fetch-Site: none``) or a page of the same origin
  did (``same-origin``), without an Origin or with the port's own; everything else a browser
  sends is refused as before (403), and a rebound host name still gets 421.
- In headless Chromium (skipped where it or Playwright is missing): the page opened with the
  token in its URL fragment, while publishes and long-polls run, shows the numbers and the
  charts moving, and never sends the token in a URL.  Its screenshot is written to a temporary
  file; with ``MEGACOMET_UPDATE_SCREENSHOT=1`` also to ``docs/dashboard.png`` (the README's).
"""

import base64
import hashlib
import http.client
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time

from conftest import ROOT
from megacomet import front, wire

TOKEN = "dashboard-test-token-0123456789"
SCREENSHOT = os.path.join(ROOT, "docs", "dashboard.png")
SAME_ORIGIN = {"Sec-Fetch-Site": "same-origin", "Sec-Fetch-Mode": "cors", "Sec-Fetch-Dest": "empty"}
TYPED_IN = {"Sec-Fetch-Site": "none", "Sec-Fetch-Mode": "navigate", "Sec-Fetch-Dest": "document",
            "Sec-Fetch-User": "?1"}


def bearer(token=TOKEN):
    return {"Authorization": "Bearer " + token}


# -- the page --------------------------------------------------------------------------------


def test_dashboard_is_one_self_contained_page(server):
    status, headers, body = server.request("GET", "/dashboard")
    assert status == 200, body
    assert headers["Content-Type"] == "text/html; charset=utf-8"
    assert headers["Cache-Control"] == "no-store"
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert body == front.static_file("dashboard.html")
    page = body.decode()
    assert page.startswith("<!doctype html>")
    # Nothing loaded from anywhere: no other host named, nothing that loads a resource.
    lower = page.lower()
    assert "http:" not in lower and "https:" not in lower
    for loads in ("src=", "href=", "url(", "@import", "<link", "<iframe", "<img", "<object",
                  "<embed", "import(", "importscripts", "xmlhttprequest", "websocket(",
                  "eventsource("):
        assert loads not in lower, loads
    assert not re.search(r"""["'`]//""", page), "a protocol-relative URL"
    # One inline style, one inline script, and the script reads stats beside the page only.
    assert lower.count("<script") == lower.count("</script>") == 1
    assert lower.count("<style") == lower.count("</style>") == 1
    assert re.findall(r"fetch\(([^,)]*)", page) == ['"stats"']
    # The policy lets exactly that script and style run, and connect to this origin only.
    policy = dict(part.strip().split(" ", 1)
                  for part in headers["Content-Security-Policy"].split(";"))
    script = re.search(r"<script>(.*?)</script>", page, re.S)[1]
    style = re.search(r"<style>(.*?)</style>", page, re.S)[1]
    assert policy["default-src"] == "'none'"
    assert policy["script-src"] == "'sha256-%s'" % sha256(script)
    assert policy["style-src"] == "'sha256-%s'" % sha256(style)
    assert policy["connect-src"] == "'self'"
    assert policy["frame-ancestors"] == "'none'"
    # HEAD: the same head, no body.
    status, headers, body = server.request("HEAD", "/dashboard")
    assert status == 200 and body == b""
    assert int(headers["Content-Length"]) == len(front.static_file("dashboard.html"))
    # Only GET and HEAD.
    status, _, _ = server.request("POST", "/dashboard", b"x")
    assert status == 405


def test_the_pyz_serves_the_dashboard(server_factory, tmp_path):
    """The single-file server has the page too (package data, read through its loader)."""
    pyz = tmp_path / "megacomet.pyz"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "build_pyz.py"),
                           "-o", str(pyz)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    server = server_factory(workers=1, command=[sys.executable, "-I", str(pyz)],
                            cwd=str(tmp_path), env={"PATH": os.environ["PATH"]})
    status, headers, body = server.request("GET", "/dashboard")
    assert status == 200 and body == front.static_file("dashboard.html")
    assert "sha256-" in headers["Content-Security-Policy"]


def sha256(text):
    return base64.b64encode(hashlib.sha256(text.encode()).digest()).decode()


def test_with_an_app_token_the_page_is_public_and_its_data_is_not(server_factory):
    server = server_factory("--app-token", TOKEN)
    status, _, body = server.request("GET", "/dashboard")
    assert status == 200 and body == front.static_file("dashboard.html")
    status, _, body = server.request("GET", "/dashboard", headers=TYPED_IN)
    assert status == 200 and body == front.static_file("dashboard.html")
    # Its data: 401 without the token or with another, from a page as from anything else.
    for headers in ({}, SAME_ORIGIN, bearer("wrong"), {**SAME_ORIGIN, **bearer("wrong")}):
        status, _, body = server.request("GET", "/stats", headers=headers)
        assert status == 401, (headers, status, body)
    for headers in (bearer(), {**SAME_ORIGIN, **bearer()}):
        status, _, body = server.request("GET", "/stats", headers=headers)
        assert status == 200, (headers, status, body)
        assert json.loads(body)["totals"]["connections"] >= 1
    # Nothing else became public.
    for method, path in (("GET", "/metrics"), ("GET", "/nothing"), ("POST", "/pub/x")):
        status, _, _ = server.request(method, path, b"x" if method == "POST" else None)
        assert status == 401, (method, path, status)


# -- the browser check ---------------------------------------------------------------------------


def test_the_browser_check_lets_through_the_dashboard_and_its_reads_only(server):
    own = "http://127.0.0.1:%d" % server.app
    allowed = [
        ("GET", "/dashboard", TYPED_IN),                       # typed in, a bookmark
        ("GET", "/dashboard", {**SAME_ORIGIN, "Sec-Fetch-Mode": "navigate"}),   # reloaded
        ("HEAD", "/dashboard", TYPED_IN),
        ("GET", "/stats", SAME_ORIGIN),                        # the page's own fetch
        ("GET", "/stats", {**SAME_ORIGIN, "Origin": own}),     # ... with its own Origin
        ("GET", "/stats", TYPED_IN),                           # /stats typed in
    ]
    for method, path, headers in allowed:
        status, _, body = server.request(method, path, headers=headers)
        assert status == 200, (method, path, headers, status, body)
    refused = [
        ("GET", "/stats", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "cors"}),
        ("GET", "/stats", {"Sec-Fetch-Site": "same-site", "Sec-Fetch-Mode": "cors"}),  # :8000
        ("GET", "/stats", {"Sec-Fetch-Mode": "no-cors"}),      # no word of who asks
        ("GET", "/stats", {"Origin": own}),                    # an older browser: nothing tells
        ("GET", "/stats", {**SAME_ORIGIN, "Origin": "http://evil.example"}),
        ("GET", "/stats", {**SAME_ORIGIN, "Origin": "null"}),
        ("GET", "/dashboard", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}),
        ("GET", "/dashboard", {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Dest": "iframe"}),
        ("GET", "/metrics", SAME_ORIGIN),                      # only the dashboard's two paths
        ("GET", "/health", SAME_ORIGIN),
        ("GET", "/nothing", SAME_ORIGIN),
        ("POST", "/pub/dash", SAME_ORIGIN),                    # never a publish
        ("POST", "/pub", {**SAME_ORIGIN, "Origin": own}),
        ("POST", "/stats", SAME_ORIGIN),
    ]
    for method, path, headers in refused:
        status, _, body = server.request(method, path, b"x" if method == "POST" else None,
                                         headers=headers)
        assert status == 403, (method, path, headers, status, body)
    # Sec-Fetch-Site twice, differing: neither is believed.
    status, _ = raw_get(server, "/stats", b"Sec-Fetch-Site: same-origin\r\n"
                                          b"Sec-Fetch-Site: cross-site\r\n")
    assert status == 403
    # A page on a name rebound to this address is same-origin to itself: the Host check
    # refuses it before the browser check is asked.
    status, _ = raw_get(server, "/stats", b"Sec-Fetch-Site: same-origin\r\n",
                        host=b"evil.example:%d" % server.app)
    assert status == 421


def test_wire_reads_origin_and_sec_fetch_site():
    def head(*lines):
        return wire.parse_head(b"GET /stats HTTP/1.1\r\nHost: a:9\r\n%s\r\n"
                               % b"".join(line + b"\r\n" for line in lines))
    req = head(b"Origin: HTTP://A:9", b"Sec-Fetch-Site: Same-Origin ")
    assert (req.browser, req.origin, req.fetch_site) == (True, b"http://a:9", b"same-origin")
    req = head()
    assert (req.browser, req.origin, req.fetch_site) == (False, None, None)
    req = head(b"Sec-Fetch-Mode: cors")
    assert (req.browser, req.origin, req.fetch_site) == (True, None, None)
    # Twice, differing: neither is believed (the same twice is the same).
    req = head(b"Sec-Fetch-Site: same-origin", b"Sec-Fetch-Site: cross-site",
               b"Origin: http://a:9", b"Origin: http://b")
    assert (req.origin, req.fetch_site) == (b"", b"")
    req = head(b"Sec-Fetch-Site: none", b"sec-fetch-site: none")
    assert req.fetch_site == b"none"


def raw_get(server, path, extra, host=None):
    conn = http.client.HTTPConnection("127.0.0.1", server.app, timeout=10)
    try:
        conn.putrequest("GET", path, skip_host=True)
        conn.putheader("Host", host or b"127.0.0.1:%d" % server.app)
        for line in extra.decode().strip().split("\r\n"):
            name, _, value = line.partition(": ")
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- in Chromium -----------------------------------------------------------------------------------


class Load:
    """Long-polls on a few ids and a few hundred publishes to them, from threads."""

    def __init__(self, server, ids=("dash-a", "dash-b", "dash-c", "dash-d"), polls_per_id=4,
                 publishes=400, rate=30.0):
        self.server = server
        self.ids = ids
        self.polls_per_id = polls_per_id
        self.publishes = publishes
        self.rate = rate
        self.stop = threading.Event()
        self.published = 0
        self.received = 0
        self.errors = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.poll, args=(ident,), daemon=True)
                        for ident in ids for _ in range(polls_per_id)]
        self.threads.append(threading.Thread(target=self.publish, daemon=True))

    def __enter__(self):
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=15)
        assert not any(thread.is_alive() for thread in self.threads)

    def poll(self, ident):
        since = 0
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = http.client.HTTPConnection("127.0.0.1", self.server.client, timeout=10)
                conn.request("GET", "/sub/%s?since=%d&timeout=2" % (ident, since))
                resp = conn.getresponse()
                answer = json.loads(resp.read())
                with self.lock:
                    self.received += len(answer["messages"])
                since = answer["last"]
            except (OSError, http.client.HTTPException, ValueError) as e:
                self.errors.append(repr(e))
                conn = None
                time.sleep(0.1)

    def publish(self):
        conn = http.client.HTTPConnection("127.0.0.1", self.server.app, timeout=10)
        started = time.monotonic()
        try:
            for n in range(self.publishes):
                if self.stop.is_set():
                    return
                delay = started + n / self.rate - time.monotonic()
                if delay > 0:
                    time.sleep(delay)
                ident = self.ids[n % len(self.ids)]
                conn.request("POST", "/pub/" + ident, b"message %d" % n, headers=bearer())
                resp = conn.getresponse()
                resp.read()
                if resp.status != 202:
                    self.errors.append("publish: %d" % resp.status)
                self.published += 1
        finally:
            conn.close()


def wait_js(page, expression, arg=None, timeout=20.0):
    """Poll an expression (or a function of ``arg``) in the page until it is true, with
    page.evaluate: page.wait_for_function evaluates a string in the page, which the
    dashboard's Content-Security-Policy rightly forbids (no 'unsafe-eval')."""
    deadline = time.monotonic() + timeout
    while True:
        value = page.evaluate(expression) if arg is None else page.evaluate(expression, arg)
        if value:
            return value
        assert time.monotonic() < deadline, "timed out after %.0f s waiting for %s" % (
            timeout, expression)
        time.sleep(0.1)


def number(page, selector):
    value = page.get_attribute(selector, "data-value")
    return None if value in (None, "") else float(value)


def path_points(page, chart, series):
    return int(page.get_attribute('#%s path[data-series="%s"]' % (chart, series), "data-n"))


def test_dashboard_in_chromium_moves_while_a_load_runs(browser, server_factory, tmp_path):
    server = server_factory("--app-token", TOKEN, workers=2)
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    try:
        page = context.new_page()
        page.set_default_timeout(20000)
        problems = []
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" and
                not m.location.get("url", "").endswith("/favicon.ico") else None)
        page.on("pageerror", lambda e: problems.append(repr(e)))
        requests = []
        page.on("request", lambda r: requests.append((r.url, r.headers.get("authorization"))))

        page.goto("http://127.0.0.1:%d/dashboard#token=%s" % (server.app, TOKEN))
        wait_js(page, "document.getElementById('total-delivered').dataset.value")
        assert page.evaluate("location.href") == "http://127.0.0.1:%d/dashboard" % server.app
        assert page.text_content("#status") == "live"
        assert page.is_hidden("#tokenform")
        assert len(page.query_selector_all("#workers tr")) == 2
        delivered_before = number(page, "#total-delivered")
        points_before = path_points(page, "chart-rates", "out (delivered)")

        with Load(server) as load:
            # The rates and the gauges move while it runs...
            wait_js(page, "+document.getElementById('rate-delivered').dataset.value > 5")
            wait_js(page, "+document.getElementById('total-subscribers').dataset.value >= 8")
            wait_js(page, "+document.getElementById('total-connections').dataset.value >= 8")
            wait_js(page, "+document.querySelector('#chart-subscribers path[data-series=total]')"
                          ".dataset.last >= 8")
            wait_js(page, "+document.querySelector('#chart-rates path[data-series=\"out "
                          "(delivered)\"]').dataset.last > 5")
            # ... every worker's row and sparkline included.
            wait_js(page, "[...document.querySelectorAll('#workers [data-field=delivered_rate]')]"
                          ".every(td => +td.dataset.value > 0)")
            # Run it long enough for the charts to show a shape, then photograph it running.
            deadline = time.monotonic() + 30
            while load.published < 300 and time.monotonic() < deadline:
                time.sleep(0.2)
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            while load.published < load.publishes and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)                             # the last messages reach the polls
        assert not load.errors, load.errors[:5]
        assert load.published == load.publishes
        assert load.received >= load.published      # 4 polls per id: each got most of them

        # Everything delivered shows in the total, and the charts grew a point a second.
        wait_js(page, "n => +document.getElementById('total-delivered').dataset.value >= n",
                arg=delivered_before + load.received)
        per_worker = page.eval_on_selector_all(
            "#workers [data-field=delivered]", "tds => tds.map(td => +td.dataset.value)")
        assert sum(per_worker) == number(page, "#total-delivered")
        assert path_points(page, "chart-rates", "out (delivered)") >= points_before + 8
        assert path_points(page, "chart-connections", "total") >= points_before + 8
        assert path_points(page, "chart-rss", "w1") >= points_before + 8
        assert number(page, "#total-rss") > 1_000_000
        assert number(page, "#total-restarts") == 0
        assert number(page, "#shm-bytes") > 0

        # The token went in a header on every read, never in a URL.
        stats = [(url, auth) for url, auth in requests if url.endswith("/stats")]
        assert len(stats) >= 10
        assert all(auth == "Bearer " + TOKEN for _, auth in stats)
        assert not [url for url, _ in requests if TOKEN in url.split("#")[0]]
        assert not problems, problems
        with open(shot, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
        if os.environ.get("MEGACOMET_UPDATE_SCREENSHOT") == "1":
            shutil.copyfile(shot, SCREENSHOT)
    finally:
        context.close()


def test_dashboard_in_chromium_asks_for_the_token(browser, server_factory):
    """Opened without the token, the page says so and takes it in its form."""
    server = server_factory("--app-token", TOKEN, workers=1)
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(20000)
        page.goto("http://127.0.0.1:%d/dashboard" % server.app)
        page.wait_for_selector("#tokenform", state="visible")
        assert "token" in page.text_content("#status")
        page.fill("#token", TOKEN)
        page.press("#token", "Enter")
        wait_js(page, "document.getElementById('status').textContent === 'live'")
        wait_js(page, "document.getElementById('total-connections').dataset.value")
        assert page.is_hidden("#tokenform")
        assert page.input_value("#token") == ""
    finally:
        context.close()
