"""`ldm serve --api-auth` (A1111's flag: HTTP Basic, compared in constant time) and what `ldm serve` refuses to start
with (issue 28 item 2, issue 27 item 1): a non-loopback address without credentials or --insecure-no-auth, a
malformed --api-auth, a port already in use — each one line and exit 2, before the model loads.

Credentials are asked of every route but /health (the liveness probe, which a load balancer calls without them):
the A1111 routes (as A1111 asks them of its API), /score (the same worker: leaving it open would leave the server
open), and the page and /docs (the page's own calls then carry the credentials the browser asked for once). The
real `webuiapi` client's own auth (`username=`/`password=`, `set_auth`) is used against a loopback server, and the
console script as a process for the refusals."""

import base64
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import webuiapi
from test_serve import Server

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.server import ServeConfig, authorized

USERS = (("ada", "pass:with:colons"), ("bob", "ünïcode"))
ROUTES = [("GET", "/sdapi/v1/options"), ("GET", "/sdapi/v1/progress"), ("POST", "/sdapi/v1/png-info"),
          ("POST", "/score"), ("GET", "/"), ("GET", "/docs"), ("GET", "/openapi.json")]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def server(pipe):
    s = Server(lambda: pipe, ServeConfig(queue_size=4, api_auth=USERS, cors_allow_origins=("http://page.example",)))
    deadline = time.monotonic() + 30
    while s.request("GET", "/health")[0] != 200 and time.monotonic() < deadline:
        time.sleep(0.02)
    yield s
    s.close()


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def call(server, method: str, path: str, authorization: str | None = None, headers: dict | None = None):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps({"image": ""} if path.endswith("png-info") else {"input_data": {"data": ["x"]}}).encode() \
        if method == "POST" else None
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"} | (
        {"Authorization": authorization} if authorization else {}) | (headers or {}))
    response = conn.getresponse()
    response.read()
    conn.close()
    return response.status, {k.lower(): v for k, v in response.getheaders()}


@pytest.mark.parametrize("method, path", ROUTES)
def test_every_route_but_health_asks_for_credentials(server, method, path):
    """401 with `WWW-Authenticate: Basic` without credentials, with a wrong password, an unknown user, another
    scheme, or a header that is not base64; the route's own answer with either user's."""
    for authorization in (None, basic("ada", "wrong"), basic("eve", "pass:with:colons"), basic("ada", ""),
                          "Bearer " + base64.b64encode(b"ada:pass:with:colons").decode(), "Basic %%%"):
        status, headers = call(server, method, path, authorization)
        assert status == 401, (authorization, status)
        assert headers["www-authenticate"].startswith("Basic ")
    for user, password in USERS:
        status, _ = call(server, method, path, basic(user, password))
        assert status not in (401, 403) and status < 500, (user, status)
    assert call(server, "GET", "/health")[0] == 200  # the probe: no credentials


def test_cors_preflight_needs_no_credentials(server):
    """A browser's preflight carries no credentials: it is answered, and allows the Authorization header."""
    status, headers = call(server, "OPTIONS", "/sdapi/v1/txt2img", headers={
        "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization, content-type"})
    assert status == 204 and "Authorization" in headers["access-control-allow-headers"]


def test_the_webuiapi_clients_own_auth(server, pipe):
    """webuiapi's `username=`/`password=` and `set_auth`: txt2img answers the pipeline's image; without them the
    client sees the 401. (`requests` sends a non-ASCII password in Latin-1, browsers in UTF-8: both are taken.)"""
    api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, username="ada", password="pass:with:colons")
    result = api.txt2img(prompt="a lighthouse", seed=3, steps=2, width=64, height=64, sampler_name="Euler")
    expected = pipe("a lighthouse", seed=3, steps=2, guidance=7.0, width=64, height=64, sampler="euler").images[0]
    difference = np.abs(np.asarray(result.images[0].convert("RGB"), np.int16) - np.asarray(expected, np.int16))
    assert difference.max() <= 2 and result.info["all_seeds"] == [3]
    assert api.util_get_model_names() == ["tiny-sd1"]
    anonymous = webuiapi.WebUIApi(host="127.0.0.1", port=server.port)
    with pytest.raises(RuntimeError, match="401"):
        anonymous.txt2img(prompt="x", steps=1, width=64, height=64)
    anonymous.set_auth("bob", "ünïcode")
    assert anonymous.get_progress()["state"]["job_count"] == 0


def test_credentials_are_compared_whole():
    """`authorized`: the user and the password each compared whole (no prefix, no case folding)."""
    assert authorized(basic("ada", "pass:with:colons"), USERS)
    for user, password in (("ada", "pass:with"), ("ada", "pass:with:colonsX"), ("Ada", "pass:with:colons"),
                           ("ad", "a:pass:with:colons"), ("", "")):
        assert not authorized(basic(user, password), USERS), (user, password)
    assert not authorized(None, USERS) and not authorized("Basic", USERS)
    latin1 = "Basic " + base64.b64encode("bob:ünïcode".encode("latin-1")).decode()
    assert authorized(latin1, USERS) and authorized(basic("bob", "ünïcode"), USERS)


# ------------------------------------------------------------------------------------------- refusals to start


def ldm_serve(*flags: str, timeout: float = 120) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).with_name("ldm")), "serve", "--device", "cpu", *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("host", ["0.0.0.0", "myhost.example"])
def test_a_reachable_address_without_auth_refuses_to_start(host):
    """Before the model is looked at (a model that is not there is not the error said)."""
    done = ldm_serve("--model", "/nonexistent/model", "--host", host)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and f"--host {host} is reachable from other machines" in lines[0], done.stderr
    assert "--api-auth" in lines[0] and "--insecure-no-auth" in lines[0]


@pytest.mark.parametrize("value", ["ada", ":pw", "ada:pw,bob"])
def test_a_malformed_api_auth_is_one_line(value):
    """One line, exit 2, that repeats no password."""
    done = ldm_serve("--model", "/nonexistent/model", "--api-auth", value)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ldm: error: --api-auth: credential "), done.stderr
    assert "pw" not in lines[0]


def test_a_reachable_address_with_auth_serves_and_asks_for_it(sd1_folder, tmp_path):
    """`--host 0.0.0.0 --api-auth …`: the console script serves, /health open, the A1111 routes behind Basic."""
    from test_serve_hostile import LdmServe

    s = LdmServe(sd1_folder, tmp_path / "server.log", "--host", "0.0.0.0", "--api-auth", "ada:pw1,bob:pw2")
    try:
        assert s.request("GET", "/sdapi/v1/sd-models")[0] == 401
        status, _, models = s.request("GET", "/sdapi/v1/sd-models", headers={"Authorization": basic("bob", "pw2")})
        assert status == 200 and [m["title"] for m in models] == ["tiny-sd1"]  # (the folder's name, not its path)
    finally:
        s.close()
    assert "HTTP Basic asked" in s.log.read_text()


def test_a_port_in_use_is_one_line_before_the_model_loads(sd1_folder):
    """Issue 27 item 1: uvicorn's `[Errno 98]`, then `terminate called without an active exception` and SIGABRT
    (exit 134) while the model loaded; now one line naming the port, exit 2, and no model loaded."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        start = time.monotonic()
        done = ldm_serve("--model", str(sd1_folder), "--port", str(port))
        elapsed = time.monotonic() - start
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0] == (f"ldm: error: port {port} on 127.0.0.1 is already in use (another server listens on it): "
                        "stop that one, or give --port with another port")
    print(f"refused in {elapsed:.1f} s")


def test_which_addresses_are_loopback():
    from ldm.serving.server import is_loopback

    assert all(is_loopback(h) for h in ("127.0.0.1", "127.8.9.10", "::1", "[::1]", "localhost", "LOCALHOST"))
    assert not any(is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "192.168.1.20", "myhost", "127.0.0.1.nip.io"))
