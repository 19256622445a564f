"""The viewer's network guard on every bind, and its bounded upload decoding.

One test per failure of issue 9 (item 1 and the decoding part of item 5): binding beyond
loopback used to drop the Host and Origin checks, the Origin check ignored the port,
``::1`` and ``127.0.0.2`` were refused, and uploads were decoded without a bound.
"""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient

from featuremaps.errors import FeatureMapsError
from featuremaps.serve import Guard, create_app, is_loopback
from featuremaps.serve import upload as upload_module
from featuremaps.serve.guard import split_host

PORT = 8000


def client(guard: Guard, host: str = "127.0.0.1", **kwargs: Any) -> TestClient:
    """A client that addresses the app as ``http://host:PORT`` (so Host is ``host:PORT``)."""
    name = f"[{host}]" if ":" in host else host
    app = create_app(guard=guard, **kwargs)
    return TestClient(app, base_url=f"http://{name}:{PORT}", follow_redirects=False)


def png_bytes(size: tuple[int, int] = (32, 24)) -> bytes:
    arr = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def loopback() -> Iterator[TestClient]:
    with client(Guard.for_bind("127.0.0.1", PORT)) as c:
        yield c


@pytest.fixture(scope="module")
def exposed() -> Iterator[TestClient]:
    """A server bound to 0.0.0.0 without --allow-host: token required."""
    guard = Guard.for_bind("0.0.0.0", PORT)
    with client(guard) as c:
        c.guard = guard  # type: ignore[attr-defined]
        yield c


# -- Host ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "host", ["127.0.0.1:8000", "localhost:8000", "LOCALHOST", "127.0.0.2:8000", "[::1]:8000"]
)
def test_loopback_hosts_ipv6_and_127_0_0_2_are_accepted(loopback: TestClient, host: str) -> None:
    r = loopback.get("/api/config", headers={"host": host})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize(
    "host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::1", "::1", ""]
)
def test_foreign_or_malformed_host_is_400(loopback: TestClient, host: str) -> None:
    r = loopback.get("/api/config", headers={"host": host})
    assert r.status_code == 400 and "host" in r.json()["detail"].lower()


@pytest.mark.parametrize("bind", ["::1", "[::1]", "127.0.0.2", "localhost"])
def test_bind_to_ipv6_loopback_or_127_0_0_2_needs_no_token(bind: str) -> None:
    guard = Guard.for_bind(bind, PORT)
    assert guard.token is None
    host = bind.strip("[]")
    with client(guard, host) as c:
        assert c.get("/api/config").status_code == 200
        assert c.get("/api/config", headers={"host": "evil.example"}).status_code == 400


def test_wildcard_bind_keeps_the_host_check(exposed: TestClient) -> None:
    token = exposed.guard.token  # type: ignore[attr-defined]
    r = exposed.get("/api/config", params={"token": token}, headers={"host": "evil.example"})
    assert r.status_code == 400
    r = exposed.get(
        "/api/config", headers={"host": "evil.example", "authorization": f"Bearer {token}"}
    )
    assert r.status_code == 400


# -- token -----------------------------------------------------------------------------------


def test_wildcard_bind_without_allow_host_requires_a_token(exposed: TestClient) -> None:
    exposed.cookies.clear()
    for path in ("/", "/api/config", "/static/viewer.js"):
        r = exposed.get(path)
        assert r.status_code == 403, path
        assert "?token=" in r.text and "printed in its terminal" in r.text
    assert exposed.post("/api/samples/cat").status_code == 403
    r = exposed.get("/api/config", params={"token": "wrong"})
    assert r.status_code == 403 and "wrong access token" in r.json()["detail"]


def test_token_url_sets_an_httponly_strict_cookie_that_admits_later_requests(
    exposed: TestClient,
) -> None:
    exposed.cookies.clear()
    token = exposed.guard.token  # type: ignore[attr-defined]
    assert len(token) >= 24
    r = exposed.get("/", params={"token": token})
    assert r.status_code == 200 and "featuremaps viewer" in r.text
    cookie = r.headers["set-cookie"]
    assert f"featuremaps-token-{PORT}={token}" in cookie
    assert "httponly" in cookie.lower() and "samesite=strict" in cookie.lower()
    assert exposed.get("/").status_code == 200  # the cookie now
    assert exposed.get("/api/config").status_code == 200
    assert exposed.post("/api/samples/cat").status_code == 200
    exposed.cookies.clear()
    assert exposed.get("/api/config").status_code == 403


def test_token_in_an_api_query_or_bearer_header_is_accepted(exposed: TestClient) -> None:
    exposed.cookies.clear()
    token = exposed.guard.token  # type: ignore[attr-defined]
    r = exposed.get("/api/config", params={"token": token})
    assert r.status_code == 200 and "httponly" in r.headers["set-cookie"].lower()
    exposed.cookies.clear()
    ok = exposed.get("/api/config", headers={"authorization": f"Bearer {token}"})
    assert ok.status_code == 200
    bad = exposed.get("/api/config", headers={"authorization": "Bearer nope"})
    assert bad.status_code == 403


def test_wildcard_bind_with_allow_host_admits_that_name_only() -> None:
    guard = Guard.for_bind("0.0.0.0", PORT, ["Viewer.LAN"])
    assert guard.token is None
    with client(guard, "viewer.lan") as c:
        assert c.get("/api/config").status_code == 200
        assert c.get("/api/config", headers={"host": "other.lan:8000"}).status_code == 400
        ok = c.post("/api/samples/cat", headers={"origin": "http://viewer.lan:8000"})
        assert ok.status_code == 200
        bad = c.post("/api/samples/cat", headers={"origin": "http://viewer.lan:9999"})
        assert bad.status_code == 403


def test_wildcard_allow_host_still_requires_a_token() -> None:
    guard = Guard.for_bind("0.0.0.0", PORT, ["*"])
    assert guard.token is not None
    with client(guard, "anything.example") as c:
        assert c.get("/api/config").status_code == 403
        r = c.get("/api/config", headers={"authorization": f"Bearer {guard.token}"})
        assert r.status_code == 200


def test_specific_lan_address_bind_requires_a_token_and_accepts_its_address() -> None:
    guard = Guard.for_bind("192.168.7.9", PORT)
    assert guard.token is not None
    assert guard.urls() == [f"http://192.168.7.9:{PORT}/?token={guard.token}"]
    with client(guard, "192.168.7.9") as c:
        assert c.get("/api/config").status_code == 403
        assert c.get("/api/config", params={"token": guard.token}).status_code == 200
        assert c.get("/api/config", headers={"host": "192.168.7.10:8000"}).status_code == 400


# -- Origin ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "origin",
    [
        "http://localhost:9999",  # another local server's page
        "http://127.0.0.1:9999",
        "http://127.0.0.1",  # port 80
        "https://127.0.0.1:8000",  # scheme
        "http://evil.example:8000",
        "null",
        "http://127.0.0.1:8000/path",
    ],
)
def test_origin_with_wrong_port_scheme_or_host_is_refused(
    loopback: TestClient, origin: str
) -> None:
    r = loopback.post("/api/samples/cat", headers={"origin": origin})
    assert r.status_code == 403 and "cross-origin" in r.json()["detail"]
    assert loopback.get("/api/config", headers={"origin": origin}).status_code == 403


@pytest.mark.parametrize("origin", ["http://127.0.0.1:8000", "http://localhost:8000"])
def test_same_origin_requests_pass(loopback: TestClient, origin: str) -> None:
    assert loopback.post("/api/samples/cat", headers={"origin": origin}).status_code == 200


def test_origin_check_holds_on_a_wildcard_bind_with_a_valid_cookie(exposed: TestClient) -> None:
    token = exposed.guard.token  # type: ignore[attr-defined]
    auth = {"authorization": f"Bearer {token}"}
    bad = exposed.post("/api/samples/cat", headers={**auth, "origin": "http://localhost:9999"})
    assert bad.status_code == 403
    ok = exposed.post("/api/samples/cat", headers={**auth, "origin": "http://127.0.0.1:8000"})
    assert ok.status_code == 200


def test_cross_site_fetches_of_the_api_are_refused(loopback: TestClient) -> None:
    r = loopback.get("/api/config", headers={"sec-fetch-site": "cross-site"})
    assert r.status_code == 403
    assert loopback.get("/api/config", headers={"sec-fetch-site": "same-origin"}).status_code == 200


@pytest.mark.parametrize("name", ["viewer.lan:8000", "http://viewer.lan", "a/b", ""])
def test_allow_host_with_a_port_scheme_or_path_is_a_clear_error(name: str) -> None:
    with pytest.raises(FeatureMapsError, match="--allow-host"):
        Guard.for_bind("0.0.0.0", PORT, [name])


def test_host_parsing_and_loopback_names() -> None:
    assert split_host("[::1]:8000") == ("::1", 8000)
    assert split_host("127.0.0.2") == ("127.0.0.2", None)
    assert split_host("a:b") is None and split_host("[::1]x") is None
    assert all(is_loopback(h) for h in ("127.0.0.1", "127.255.0.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "localhost.evil"))


# -- decoding --------------------------------------------------------------------------------


def test_concurrent_decodes_over_the_limit_get_503_with_retry_after(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    entered, release = threading.Event(), threading.Event()
    real = upload_module.decode_image

    def slow_decode(*args: Any, **kwargs: Any) -> Image.Image:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(upload_module, "decode_image", slow_decode)
    with client(Guard(), max_decodes=1) as c:
        first: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: first.update(r=c.post("/api/images", content=png_bytes((33, 24))))
        )
        t.start()
        try:
            assert entered.wait(30), "the first upload never reached the decoder"
            r = c.post("/api/images", content=png_bytes((34, 24)))
            assert r.status_code == 503
            assert r.headers["retry-after"].isdigit() and "try again" in r.json()["detail"]
        finally:
            release.set()
            t.join(30)
        assert first["r"].status_code == 201  # the slot is given back
        assert c.post("/api/images", content=png_bytes((35, 24))).status_code == 201


def test_decodes_in_flight_count_against_the_image_memory(monkeypatch: pytest.MonkeyPatch) -> None:
    entered, release = threading.Event(), threading.Event()
    real = upload_module.decode_image

    def slow_decode(*args: Any, **kwargs: Any) -> Image.Image:
        entered.set()
        release.wait(30)
        return real(*args, **kwargs)

    monkeypatch.setattr(upload_module, "decode_image", slow_decode)
    one = 100 * 100 * 4  # decoded RGB bytes of a 100x100 picture
    with client(Guard(), max_decodes=4, image_bytes=one + one // 2) as c:
        first: dict[str, Any] = {}
        t = threading.Thread(
            target=lambda: first.update(r=c.post("/api/images", content=png_bytes((100, 100))))
        )
        t.start()
        try:
            assert entered.wait(30), "the first upload never reached the decoder"
            r = c.post("/api/images", content=png_bytes((100, 99)))
            assert r.status_code == 503 and "decoding other large images" in r.json()["detail"]
            assert r.headers["retry-after"].isdigit()
        finally:
            release.set()
            t.join(30)
        assert first["r"].status_code == 201
        second = c.post("/api/images", content=png_bytes((100, 99)))
        assert second.status_code == 201  # the first image made room: one fits at a time
        images = c.app.state.engine.images  # type: ignore[attr-defined]
        assert len(images) == 1
        old = c.get(f"/api/images/{first['r'].json()['image_id']}/thumb.jpg")
        assert old.status_code == 404


def test_decoded_size_over_the_image_memory_is_413_before_decoding() -> None:
    # a PNG header that claims 3000x3000 RGB, then nothing: decoding it would fail (415),
    # so a 413 shows the size was checked on the header alone
    buf = io.BytesIO()
    Image.new("RGB", (3000, 3000)).save(buf, format="PNG")
    header_only = buf.getvalue()[:100]
    with client(Guard(), image_bytes=20 << 20) as c:
        r = c.post("/api/images", content=header_only)
        assert r.status_code == 413 and "MiB" in r.json()["detail"]
        small = c.post("/api/images", content=png_bytes())
        assert small.status_code == 201


# -- a real server on 0.0.0.0 in a network namespace with only loopback ---------------------

_NETNS_CLIENT = textwrap.dedent(
    """
    import json, subprocess, sys, time
    import httpx

    results = {}
    procs = {}
    logs = {}
    binds = {"wild": ("0.0.0.0", 8100), "v6": ("::1", 8101), "lo2": ("127.0.0.2", 8102)}
    for key, (host, port) in binds.items():
        logs[key] = open(f"{sys.argv[1]}/{key}.log", "w+")
        procs[key] = subprocess.Popen(
            [sys.executable, "-m", "featuremaps", "serve", "--host", host, "--port", str(port)],
            stdout=logs[key], stderr=subprocess.STDOUT, text=True,
        )

    def up(url, headers=None):
        for _ in range(240):  # about a minute at most
            try:
                return httpx.get(url, headers=headers, timeout=2)
            except httpx.HTTPError:
                time.sleep(0.25)
        return None

    try:
        r = up("http://127.0.0.1:8100/api/config")
        results["wild_no_token"] = [r.status_code, r.json()["detail"]] if r else None
        logs["wild"].seek(0)
        printed = logs["wild"].read()
        token = printed.split("?token=")[1].split()[0] if "?token=" in printed else None
        results["token_printed"] = token is not None
        with httpx.Client(base_url="http://127.0.0.1:8100", timeout=10) as c:
            r = c.get("/", params={"token": token})
            results["wild_token_visit"] = [r.status_code, r.headers.get("set-cookie", "")]
            r = c.get("/api/config")
            results["wild_cookie"] = r.status_code
            r = c.get("/api/config", headers={"host": "evil.example:8100"})
            results["wild_evil_host"] = r.status_code
            r = c.post("/api/samples/cat", headers={"origin": "http://localhost:9999"})
            results["wild_wrong_origin_port"] = r.status_code
            r = c.post("/api/samples/cat", headers={"origin": "http://127.0.0.1:8100"})
            results["wild_same_origin"] = r.status_code
        r = up("http://[::1]:8101/api/config")
        results["v6"] = r.status_code if r else None
        r = up("http://127.0.0.2:8102/api/config")
        results["lo2"] = r.status_code if r else None
    finally:
        for p in procs.values():
            p.terminate()
        for p in procs.values():
            try:
                p.wait(20)
            except subprocess.TimeoutExpired:
                p.kill()
    print("RESULTS " + json.dumps(results))
    """
)


@pytest.mark.slow
def test_real_server_on_0_0_0_0_in_a_loopback_only_namespace_keeps_its_guard(
    tmp_path: Path,
) -> None:
    if shutil.which("unshare") is None or shutil.which("ip") is None:
        pytest.skip("needs unshare and ip (util-linux, iproute2) to make a network namespace")
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, timeout=30
    )
    if probe.returncode != 0:
        pytest.skip(
            "unshare -n is not permitted here (needs root or unprivileged user namespaces): "
            + probe.stderr.decode(errors="replace").strip()
        )
    script = tmp_path / "client.py"
    script.write_text(_NETNS_CLIENT)
    inner = f"ip link set lo up && exec {sys.executable} {script} {tmp_path}"
    done = subprocess.run(
        ["unshare", "-n", "sh", "-c", inner], capture_output=True, text=True, timeout=240
    )
    line = [x for x in done.stdout.splitlines() if x.startswith("RESULTS ")]
    assert line, done.stdout + done.stderr
    res = json.loads(line[0][len("RESULTS ") :])
    assert res["wild_no_token"][0] == 403 and "?token=" in res["wild_no_token"][1]
    assert res["token_printed"] is True
    status, cookie = res["wild_token_visit"]
    assert status == 200 and "httponly" in cookie.lower()
    assert res["wild_cookie"] == 200
    assert res["wild_evil_host"] == 400
    assert res["wild_wrong_origin_port"] == 403
    assert res["wild_same_origin"] == 200
    assert res["v6"] == 200 and res["lo2"] == 200
