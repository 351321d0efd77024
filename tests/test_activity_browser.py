"""
The activity page in a real headless browser (Debian's chromium driven by Playwright): a live
session appears, its byte counts grow while you watch, and the kill button ends it.  With
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
    The page groups a live session under its client and user, shows its bytes growing, and
    its kill button ends the session (reason killed).
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
                page = browser.new_page(viewport={"width": 1100, "height": 520})
                page.goto(f"http://127.0.0.1:{admin}/?token={TOKEN}")
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
