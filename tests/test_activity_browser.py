"""
The activity page in a real headless browser (Debian's chromium driven by Playwright): the
browser logs in with HTTP Basic (the token as the password), a live session appears, its byte
counts grow while you watch, and the kill button ends it; the page may not be framed and sends
no Referer.  With
WINGATEMAP_UPDATE_SCREENSHOT=1 the screenshot goes to docs/activity.png (that is how the one in
the docs was made).
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest

from .helpers import free_port
from .test_end_to_end import ROOT
from .test_operations import TOKEN, EchoServer, api, connect, start

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


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


def test_activity_page_live_and_kill(tmp_path):
    """
    A browser without credentials gets 401; logged in with HTTP Basic (the token as the
    password) the page groups a live session under its client and user, shows its bytes
    growing, and its kill button ends the session (reason killed).  Its answer forbids framing
    and Referer: its API calls carry no Referer and no token in a URL, and a page that frames
    it shows nothing of it.
    """
    sync_playwright = browser_or_skip()
    echo = EchoServer()
    port, admin = free_port(), free_port()
    proc, config = start(
        tmp_path,
        f'[service]\ndrain_timeout = 1\n[admin]\nlisten = "tcp:{admin}:interface=127.0.0.1"\ntoken = "{TOKEN}"\n'
        f'[users.alice]\nlocations = ["127.0.0.41"]\n'
        f'[mappings.desktop]\nport = {port}\nbind = "127.0.0.1"\ndefault = {{ host = "127.0.0.1", port = {echo.port} }}\n',
    )
    try:
        proc.wait_line(r"admin API listening")
        client = connect(port, "127.0.0.41")
        client.sendall(b"a" * 2048)
        client.recv(4096)
        other = connect(port, "127.0.0.42")
        other.sendall(b"b" * 10)
        other.recv(100)
        [session] = [s for s in api(admin, "GET", "/sessions")[1] if s["client_ip"] == "127.0.0.41"]
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
                context = browser.new_context(viewport={"width": 1100, "height": 520}, http_credentials={"username": "operator", "password": TOKEN})
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
                client.sendall(b"c" * 100000)
                received = 0
                while received < 100000:
                    received += len(client.recv(65536))
                page.wait_for_function(
                    "id => { const c = document.querySelector(`tr[data-session='${id}'] td.in`); return c && c.textContent.startsWith('99.') }",
                    arg=session["session"],
                    timeout=20000,
                )
                # docs/activity.png is refreshed on request only, so a test run leaves the tree clean.
                shot = os.path.join(ROOT, "docs", "activity.png") if os.environ.get("WINGATEMAP_UPDATE_SCREENSHOT") else str(tmp_path / "activity.png")
                page.screenshot(path=shot)
                assert os.path.getsize(shot) > 10_000
                row.locator("button.kill").click()
                row.wait_for(state="detached", timeout=20000)
                # The page's own API calls: no token in any URL, no Referer.
                calls = [r for r in requests if "/sessions" in r.url]
                assert calls and any(r.method == "DELETE" for r in calls)
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
        assert [s["client_ip"] for s in api(admin, "GET", "/sessions")[1]] == ["127.0.0.42"]
        other.close()
    finally:
        proc.stop()
        echo.close()
