"""The viewer's access token in a real browser: Debian's Chromium driven by Playwright.

A server that needs a token (as ``featuremaps serve --host 0.0.0.0`` makes one; here it
listens on 127.0.0.1 only) is opened with ``?token=...``; the cookie then carries the
token, the page drops it from the address bar, and a page of another local server (same
host, other port: the same *site* for cookies, so the cookie goes along) cannot post.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

pytest.importorskip("fastapi")

from featuremaps.serve import Guard, create_app

pytestmark = pytest.mark.browser

TIMEOUT_MS = 60_000


def _serve(guard_for: Any) -> Iterator[tuple[str, Any, Guard]]:
    import uvicorn

    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    guard = guard_for(port)
    app = create_app(guard=guard)
    srv = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started, "uvicorn did not start within 10 s"
    try:
        yield f"http://127.0.0.1:{port}", app, guard
    finally:
        srv.should_exit = True
        thread.join(timeout=15)
        sock.close()


@pytest.fixture(scope="module")
def guarded() -> Iterator[tuple[str, Any, Guard]]:
    """A server that requires a token (the guard of a 0.0.0.0 bind)."""
    yield from _serve(lambda port: Guard.for_bind("0.0.0.0", port))


@pytest.fixture(scope="module")
def other() -> Iterator[str]:
    """A plain page (no CSP) of another local server: same host, another port."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Page(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            body = b"<!doctype html><title>another local page</title>"
            self.send_response(200)
            self.send_header("content-type", "text/html")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args: Any) -> None:
            pass

    srv = ThreadingHTTPServer(("127.0.0.1", 0), Page)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{srv.server_address[1]}"
    finally:
        srv.shutdown()
        srv.server_close()


def test_token_url_opens_the_viewer_and_the_cookie_keeps_it_open(
    browser: Any, guarded: tuple[str, Any, Guard]
) -> None:
    base, _, guard = guarded
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    try:
        page.goto(f"{base}/?token={guard.token}")
        page.wait_for_selector("body[data-ready='1']")
        assert "token" not in page.url  # dropped from the address bar
        cookies = {c["name"]: c for c in context.cookies()}
        c = cookies[guard.cookie]
        assert c["httpOnly"] is True and c["sameSite"] == "Strict" and c["value"] == guard.token
        page.reload()
        page.wait_for_selector("body[data-ready='1']")
        assert page.evaluate("fetch('/api/config').then(r => r.status)") == 200
        assert errors == []
    finally:
        context.close()
    fresh = browser.new_context()
    try:
        p = fresh.new_page()
        r = p.goto(base + "/")
        assert r is not None and r.status == 403
        assert "?token=" in p.inner_text("body")
    finally:
        fresh.close()


def test_a_page_on_another_local_port_cannot_post_with_the_cookie(
    browser: Any, guarded: tuple[str, Any, Guard], other: str
) -> None:
    base, app, guard = guarded
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(f"{base}/?token={guard.token}")  # the cookie is set for 127.0.0.1
        page.wait_for_selector("body[data-ready='1']")
        images = app.state.engine.images
        before = len(images)
        page.goto(other + "/")
        # 127.0.0.1:other and 127.0.0.1:guarded are the same site: the Strict cookie goes
        # along; the Origin check (scheme, host and port) and the fetch-site check stop it
        sent = page.evaluate(
            "url => fetch(url, {method: 'POST', mode: 'no-cors', credentials: 'include'})"
            ".then(() => 'sent', e => String(e))",
            base + "/api/samples/cat",
        )
        assert sent == "sent"  # the browser did send it (an opaque answer)
        time.sleep(0.5)
        assert len(images) == before
        # the same post from the viewer's own page goes through
        page.goto(base + "/")
        page.wait_for_selector("body[data-ready='1']")
        status = page.evaluate("fetch('/api/samples/cat', {method: 'POST'}).then(r => r.status)")
        assert status == 200 and len(images) == before + 1
    finally:
        context.close()
