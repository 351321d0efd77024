"""
The activity page in a real headless browser (Debian's chromium driven by Playwright): the
browser logs in with HTTP Basic (the token as the password); live sessions appear grouped by
client and user, with per-mapping totals, refusals and throughput; the filters, the sort and the
pages work; a kill asks first (dismissed: the session lives on; accepted: it ends); client text
is shown as text, never as HTML; the page may not be framed and sends no Referer.  With
WINGATEMAP_UPDATE_SCREENSHOT=1 the screenshot goes to docs/activity.png (that is how the one in
the docs was made).
"""

from __future__ import annotations

import json
import os
import shutil

import pytest

from .helpers import free_port
from .test_end_to_end import ROOT
from .test_operations import TOKEN, EchoServer, api, connect, start

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# A user name that would run script if the page ever put it into HTML.
HOSTILE_USER = "<img/src=x/onerror=window.pwned=1>"


def browser_or_skip():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    if CHROMIUM is None or sync_playwright is None:
        why = "Debian's chromium and the playwright package are needed (.ci/run installs both)"
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)
    return sync_playwright


def cell(page, selector: str) -> str:
    """
    The text of the first element matching C{selector}.
    """
    return page.locator(selector).first.inner_text()


def test_activity_page_live_and_kill(tmp_path):
    """
    A browser without credentials gets 401.  Logged in with HTTP Basic (the token as the
    password) the page shows each mapping's totals (live, accepted, refused by reason) and a
    throughput while bytes flow; it groups a live session under its client and user and shows
    its bytes growing.  The client filter shows only matching sessions; sorted by client with
    two sessions per page, the second page shows the third session.  Kill asks first: dismissed,
    the session lives on; accepted, it ends (reason killed).  A user name made of HTML is shown
    as text and runs nothing.  Destination health stays hidden while the service has none to
    show.  The page forbids framing and Referer: its API calls carry no Referer and no token in
    a URL, and a page that frames it shows nothing of it.
    """
    sync_playwright = browser_or_skip()
    echo = EchoServer()
    port, admin = free_port(), free_port()
    proc, config = start(
        tmp_path,
        f'[service]\ndrain_timeout = 1\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
        f'[users.alice]\nlocations = ["127.0.0.41"]\n[users.bob]\nlocations = ["127.0.0.42"]\n[users.carol]\nlocations = ["127.0.0.43"]\n'
        f'[users."{HOSTILE_USER}"]\nlocations = ["127.0.0.44"]\n'
        f'[mappings.desktop]\nport = {port}\nbind = "127.0.0.1"\nmax_connections_per_client = 1\n'
        f'default = {{ host = "127.0.0.1", port = {echo.port} }}\n',
    )
    clients = []
    try:
        proc.wait_line(r"admin API listening")
        client = connect(port, "127.0.0.41")
        client.sendall(b"a" * 2048)
        client.recv(4096)
        for source in ("127.0.0.42", "127.0.0.43"):
            other = connect(port, source)
            other.sendall(b"b" * 10)
            other.recv(100)
            clients.append(other)
        refused = connect(port, "127.0.0.43")  # over max_connections_per_client: refused (limit)
        clients.append(refused)
        proc.wait_line(r"ClientDisconnect .* client=127\.0\.0\.43:.* reason=limit")
        live = api(admin, "GET", "/sessions")[1]
        [session] = [s for s in live if s["client_ip"] == "127.0.0.41"]
        by_client = {s["client_ip"]: s["session"] for s in live}
        with sync_playwright() as p:
            browser = p.chromium.launch(
                executable_path=CHROMIUM,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                      "--disable-component-update", "--disable-sync"],
            )
            try:
                url = f"http://127.0.0.1:{admin}/"
                # Without credentials the browser is challenged (and gets nothing).
                anonymous = browser.new_context().new_page()
                statuses = []
                anonymous.on("response", lambda response: statuses.append(response.status))
                try:
                    anonymous.goto(url)
                except Exception as e:  # Chromium cancels the login prompt: ERR_INVALID_AUTH_CREDENTIALS
                    assert "AUTH" in str(e)
                assert statuses == [401]
                anonymous.context.close()
                # Logged in with HTTP Basic, the token as the password (any user name).
                context = browser.new_context(viewport={"width": 1100, "height": 760}, http_credentials={"username": "operator", "password": TOKEN})
                page = context.new_page()
                requests = []
                page.on("request", lambda request: requests.append(request))
                response = page.goto(url)
                assert response.status == 200
                headers = response.headers
                assert headers["x-frame-options"] == "DENY"
                assert "frame-ancestors 'none'" in headers["content-security-policy"]
                assert headers["referrer-policy"] == "no-referrer"
                row = page.locator(f'tr[data-session="{session["session"]}"]')
                row.wait_for(timeout=20000)
                box = page.locator('section[data-client="127.0.0.41"]')
                assert "User alice (assumed)" in box.inner_text()
                assert row.locator("td.in").inner_text() == "2.0 KiB"
                # The mapping's totals: three live, four accepted, one refused (limit).
                totals = 'tr[data-mapping="desktop"]'
                page.wait_for_function("() => document.querySelector(`tr[data-mapping='desktop'] td.live`)?.textContent === '3'", timeout=20000)
                assert cell(page, f"{totals} td.accepted") == "4"
                assert cell(page, f"{totals} td.refused") == "1 (limit 1)"
                # Throughput: every rate the totals show is recorded while 100 kB flow.
                page.evaluate(
                    "() => { window.rates = []; new MutationObserver(() => window.rates.push("
                    "document.querySelector(`tr[data-mapping='desktop'] td.rate-in`).textContent))"
                    ".observe(document.getElementById('totals'), { childList: true, subtree: true }); }"
                )
                client.sendall(b"c" * 100000)
                received = 0
                while received < 100000:
                    received += len(client.recv(65536))
                page.wait_for_function(
                    "id => { const c = document.querySelector(`tr[data-session='${id}'] td.in`); return c && c.textContent.startsWith('99.') }",
                    arg=session["session"],
                    timeout=20000,
                )
                rates = page.evaluate("() => window.rates")
                assert any(r.endswith("KiB/s") for r in rates), rates
                assert cell(page, f"{totals} td.in").startswith("99.")
                # docs/activity.png is refreshed on request only, so a test run leaves the tree clean.
                shot = os.path.join(ROOT, "docs", "activity.png") if os.environ.get("WINGATEMAP_UPDATE_SCREENSHOT") else str(tmp_path / "activity.png")
                page.screenshot(path=shot, full_page=True)
                assert os.path.getsize(shot) > 10_000
                # Filter by client: only 127.0.0.42's session is listed.
                page.fill("#f-client", "127.0.0.42")
                page.locator("section[data-client='127.0.0.41']").wait_for(state="detached", timeout=20000)
                assert page.locator("tr[data-session]").count() == 1
                assert page.locator(f'tr[data-session="{by_client["127.0.0.42"]}"]').count() == 1
                assert cell(page, "#range") == "sessions 1\u20131 of 1"
                page.fill("#f-client", "")
                page.locator("section[data-client='127.0.0.41']").wait_for(timeout=20000)
                # Sorted by client, two per page: the second page shows the third session.
                page.select_option("#sort", "client")
                page.fill("#limit", "2")
                page.dispatch_event("#limit", "change")
                page.wait_for_function("() => document.querySelectorAll('tr[data-session]').length === 2", timeout=20000)
                assert [page.locator("section.client").nth(i).get_attribute("data-client") for i in range(2)] == ["127.0.0.41", "127.0.0.42"]
                assert cell(page, "#range") == "sessions 1\u20132 of 3"
                page.click("#next")
                page.locator(f'tr[data-session="{by_client["127.0.0.43"]}"]').wait_for(timeout=20000)
                page.wait_for_function("() => document.querySelectorAll('tr[data-session]').length === 1", timeout=20000)
                assert cell(page, "#range") == "sessions 3\u20133 of 3"
                assert page.is_disabled("#next") and not page.is_disabled("#prev")
                page.click("#prev")
                row.wait_for(timeout=20000)
                page.fill("#limit", "50")
                page.dispatch_event("#limit", "change")
                page.wait_for_function("() => document.querySelectorAll('tr[data-session]').length === 3", timeout=20000)
                # Kill asks first.  Dismissed: the session lives on.
                questions = []
                page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.dismiss()))
                row.locator("button.kill").click()
                assert len(questions) == 1 and session["session"] in questions[0] and "alice" in questions[0]
                assert any(s["session"] == session["session"] for s in api(admin, "GET", "/sessions")[1])
                client.sendall(b"d")
                assert client.recv(10) == b"d"
                # Accepted: it ends.
                page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))
                row.locator("button.kill").click()
                row.wait_for(state="detached", timeout=20000)
                assert len(questions) == 2
                assert "killed" in cell(page, "#notice")
                # A user name made of HTML is text on the page, and runs nothing.
                hostile = connect(port, "127.0.0.44")
                clients.append(hostile)
                hostile.sendall(b"e")
                hostile.recv(10)
                page.locator("section[data-client='127.0.0.44']").wait_for(timeout=20000)
                assert f"User {HOSTILE_USER} (assumed)" in page.locator("section[data-client='127.0.0.44']").inner_text()
                assert page.locator("#sessions img").count() == 0
                assert page.evaluate("() => window.pwned") is None
                # The service's own GET /destinations: the desktop mapping's destination, up.
                page.locator("#destinations-part").wait_for(state="visible", timeout=20000)
                health = page.locator(f"#destinations tbody tr[data-destination='desktop 127.0.0.1:{echo.port}']").inner_text()
                assert "default" in health and "up" in health
                # The page's own API calls: no token in any URL, no Referer.
                calls = [r for r in requests if "/sessions" in r.url]
                assert calls and any(r.method == "DELETE" for r in calls)
                assert any("/activity.json?" in r.url for r in requests)
                for request in requests:
                    assert TOKEN not in request.url and "referer" not in request.all_headers()
                # No page can frame it (frame-ancestors 'none' / X-Frame-Options: DENY), not even
                # its own origin, where the browser would send the credentials.
                page.evaluate(
                    "url => new Promise(done => { const f = document.createElement('iframe'); f.id = 'framed';"
                    " f.onload = () => done(); f.src = url; document.body.append(f); })",
                    url,
                )
                assert page.frame_locator("#framed").locator("#sessions").count() == 0
            finally:
                browser.close()
        try:
            assert client.recv(10) == b""
        except ConnectionResetError:
            pass
        proc.wait_line(r"ClientDisconnect .* client=127\.0\.0\.41:.* reason=killed")
        assert sorted(s["client_ip"] for s in api(admin, "GET", "/sessions")[1]) == ["127.0.0.42", "127.0.0.43", "127.0.0.44"]
    finally:
        for other in clients:
            other.close()
        proc.stop()
        echo.close()


def test_activity_page_shows_destination_health(tmp_path):
    """
    Once the service answers C{GET /destinations} (SPEC §4's format), the page shows each
    destination's state next to its mapping, every field as text; here the browser itself
    answers that path, to give it an error holding HTML.
    """
    sync_playwright = browser_or_skip()
    admin = free_port()
    proc, config = start(
        tmp_path,
        f'[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
        f'[mappings.desktop]\nport = {free_port()}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = 9 }}\n',
    )
    answer = {
        "destinations": [
            {"mapping": "desktop", "rule": "default", "destination": "127.0.0.1:9", "state": "down", "since": "2026-11-29T10:00:00.000Z",
             "live": 0, "total": 3, "last_error": "<b>Connection refused</b>"},
        ]
    }
    try:
        proc.wait_line(r"admin API listening")
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
            try:
                context = browser.new_context(http_credentials={"username": "operator", "password": TOKEN})
                context.route("**/destinations", lambda route: route.fulfill(status=200, content_type="application/json", body=json.dumps(answer)))
                page = context.new_page()
                page.goto(f"http://127.0.0.1:{admin}/")
                page.locator("#destinations-part").wait_for(state="visible", timeout=20000)
                row = page.locator("#destinations tbody tr")
                assert row.count() == 1
                text = row.inner_text()
                assert "127.0.0.1:9" in text and "down" in text and "<b>Connection refused</b>" in text
                assert page.locator("#destinations b").count() == 0
            finally:
                browser.close()
    finally:
        proc.stop()
