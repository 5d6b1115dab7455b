"""The demo page (/demo) tells the truth about the server it is served by.

The page shows the command that publishes to its id: with the app port the
server really listens on (as the application reaches it: 127.0.0.1 for
0.0.0.0), and with ``-H "Authorization: Bearer $TOKEN"`` when the app port
wants a token (the page never learns the token: only that there is one).
With ``--secret`` it says how to sign the subscription and takes the
signature in a field; and when the browser client can only say "retrying",
the page asks the server once itself and shows why it refused (403 and the
reason).  The server tells the page these facts in a header of the page's own
response, ``X-MegaComet-Demo`` (the page's bytes stay the package's).

The header is checked over plain HTTP; the page itself in headless Chromium
(Playwright, as tests/test_browser.py), skipped where either is missing.
"""

import json
import time
import uuid

import pytest

from conftest import PAGE_WAIT_MS
from megacomet import signing

TOKEN = "demo-token-" + "t" * 24
SECRET = "demo-secret-" + "s" * 24


def uid(prefix):
    return "%s-%s" % (prefix, uuid.uuid4().hex[:12])


def secret_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text + "\n")
    path.chmod(0o600)
    return str(path)


def told(server, path="/demo"):
    """The demo page's header, as a dict."""
    status, headers, body = server.request("GET", path, port=server.client, timeout=5)
    assert status == 200 and b'<script src="/megacomet.js"></script>' in body
    said = headers["X-MegaComet-Demo"]
    return dict(part.strip().split("=", 1) for part in said.split(";"))


# -- what the server tells the page ----------------------------------------------------------

def test_the_page_is_told_the_real_app_port_and_no_token_or_signature(server_factory):
    server = server_factory(workers=1)
    for path in ("/demo", "/"):
        assert told(server, path) == {"app": "127.0.0.1:%d" % server.app, "token": "0",
                                      "signed": "0"}


def test_the_page_is_told_a_token_is_needed_but_never_the_token(server_factory, tmp_path):
    server = server_factory("--app-host", "0.0.0.0", "--app-token-file",
                            secret_file(tmp_path, "token", TOKEN),
                            "--secret-file", secret_file(tmp_path, "secret", SECRET), workers=1)
    # 0.0.0.0 is reached at 127.0.0.1 by an application on the same host.
    assert told(server) == {"app": "127.0.0.1:%d" % server.app, "token": "1", "signed": "1"}
    status, headers, body = server.request("GET", "/demo", port=server.client, timeout=5)
    everything = (body + json.dumps(headers).encode())
    assert TOKEN.encode() not in everything and SECRET.encode() not in everything


# -- the page, in a browser ------------------------------------------------------------------


def open_demo(page, server, ident, transport="auto", query=None):
    url = "http://127.0.0.1:%d/demo?ids=%s&transport=%s" % (server.client, ident, transport)
    if query:
        url += "&query=" + query.replace("&", "%26")
    page.goto(url)


def wait_text(page, selector, text):
    """Wait until the element's text contains ``text``; then return its text."""
    page.wait_for_function("([s, t]) => document.querySelector(s).textContent.includes(t)",
                           arg=[selector, text], timeout=PAGE_WAIT_MS)
    return page.text_content(selector)


def wait_line(page, data):
    page.wait_for_function("t => [...document.querySelectorAll('#log div')]"
                           ".some(row => row.textContent.endsWith(': ' + t))",
                           arg=data, timeout=PAGE_WAIT_MS)


def test_the_page_shows_the_real_app_port(page, server_factory):
    server = server_factory(workers=1)
    ident = uid("port")
    open_demo(page, server, ident)
    command = wait_text(page, "#curl", ":%d/" % server.app)
    assert command == ("curl -X POST --data-binary 'hello' http://127.0.0.1:%d/pub/%s"
                       % (server.app, ident))
    assert page.is_hidden("#token") and page.is_hidden("#signing")
    wait_text(page, "#status", "open")
    server.pub(ident, "hello")                       # the command's request, as it says
    wait_line(page, "hello")


def test_the_page_shows_the_token_header_when_a_token_is_set(page, server_factory, tmp_path):
    server = server_factory("--app-token-file", secret_file(tmp_path, "token", TOKEN), workers=1)
    ident = uid("token")
    open_demo(page, server, ident)
    command = wait_text(page, "#curl", "Authorization")
    assert command == ('curl -X POST -H "Authorization: Bearer $TOKEN" --data-binary \'hello\' '
                       'http://127.0.0.1:%d/pub/%s' % (server.app, ident))
    assert page.is_visible("#token") and "TOKEN" in page.text_content("#token")
    assert TOKEN not in page.content()
    wait_text(page, "#status", "open")
    server.pub(ident, "with the token", headers={"Authorization": "Bearer " + TOKEN})
    wait_line(page, "with the token")


@pytest.mark.parametrize("transport", ["auto", "websocket"])
def test_a_refused_subscription_shows_the_servers_reason(page, server_factory, tmp_path,
                                                         transport):
    server = server_factory("--secret-file", secret_file(tmp_path, "secret", SECRET), workers=1)
    ident = uid("unsigned")
    open_demo(page, server, ident, transport)
    why = wait_text(page, "#why", "403")
    assert why.startswith("refused: 403 signed subscription required (exp and sig)"), why
    assert page.text_content("#status").startswith("retrying")
    assert page.is_visible("#signing")
    assert page.text_content("#sign") == "python3 megacomet.py sign " + ident


def test_a_wrong_signature_is_explained_and_a_pasted_one_subscribes(page, server_factory,
                                                                    tmp_path):
    server = server_factory("--secret-file", secret_file(tmp_path, "secret", SECRET), workers=1)
    ident = uid("signed")
    wrong = signing.query(b"not the secret", [ident], 3600, time.time())
    open_demo(page, server, ident, query=wrong)
    why = wait_text(page, "#why", "403")
    assert why.startswith("refused: 403 bad subscription signature"), why
    assert page.input_value("#query") == wrong
    # What `python3 megacomet.py sign <id>` prints, pasted into the field: subscribed.
    page.fill("#query", signing.query(SECRET.encode(), [ident], 3600, time.time()))
    page.click("#go")
    wait_text(page, "#status", "open")
    assert page.text_content("#why") == ""
    server.pub(ident, "signed and delivered")
    wait_line(page, "signed and delivered")
