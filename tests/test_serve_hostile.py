"""`ldm serve` under hostile input and slow clients (issue 26), against a real `ldm serve` process on a loopback port
with the tiny model: slow clients on raw sockets, bounded in time by the short timeouts the server is started with
here; memory read from the server process's own VmRSS."""

import base64
import http.client
import http.server
import io
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from PIL import Image

FAST = {"num_inference_steps": 2, "height": 64, "width": 64, "seed": 1}
MAX_BODY = 1024 * 1024  # --max-body-mb 1: the bodies being read may hold 4 MiB at once
# the server of this module: one place in the queue, short timeouts for the slow clients, a name and an origin allowed
FLAGS = ("--queue-size", "1", "--max-steps", "1000", "--max-body-mb", "1", "--header-timeout", "1",
         "--read-timeout", "2", "--allowed-hosts", "ldm.example", "--cors-allow-origins", "http://page.example",
         "--allow-image-urls")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LdmServe:
    """`ldm serve --model FOLDER FLAGS` as a process of its own (the console script, one thread), on a free port."""

    def __init__(self, folder: Path, log: Path, *flags: str, weights: Path | None = None):
        self.port = free_port()
        self.log = log
        command = [str(Path(sys.executable).with_name("ldm")), "serve", "--model", str(folder), "--device", "cpu",
                   "--port", str(self.port), *flags]
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"} | (
            {"LDM_WEIGHTS": str(weights)} if weights is not None else {})
        with open(log, "wb") as err:
            self.process = subprocess.Popen(command, stdout=err, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 90
        while True:
            assert self.process.poll() is None, self.log.read_text()
            try:
                if self.request("GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "ldm serve did not get ready"
            time.sleep(0.1)

    def request(self, method: str, path: str, body=None, headers: dict | None = None, timeout: float = 60):
        """(status, headers, JSON or bytes) of one request; `body`: an object (sent as JSON), or bytes."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"} | (headers or {}))
        response = conn.getresponse()
        content = response.read()
        conn.close()
        try:
            content = json.loads(content)
        except ValueError:
            pass
        return response.status, {k.lower(): v for k, v in response.getheaders()}, content

    def raw(self, data: bytes, timeout: float = 10) -> socket.socket:
        """A raw connection that has sent `data` (and may send more, slowly, or nothing)."""
        conn = socket.create_connection(("127.0.0.1", self.port), timeout=timeout)
        conn.sendall(data)
        return conn

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]) / 1024

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


@pytest.fixture(scope="module")
def server(sd1_folder, tmp_path_factory):
    """The module's `ldm serve`, its weights/loras holding one LoRA for the tiny SD 1.5 (`ink`)."""
    from lora_files import ATTENTION, draw, modules, save_kohya

    from ldm.pipelines.stable_diffusion import StableDiffusion

    weights = tmp_path_factory.mktemp("weights")
    (weights / "loras").mkdir()
    unet = StableDiffusion.from_pretrained(sd1_folder).unet
    save_kohya(weights / "loras" / "ink.safetensors", draw({"unet": modules(unet, ATTENTION)}, std=0.3), xl=False)
    s = LdmServe(sd1_folder, tmp_path_factory.mktemp("serve") / "server.log", *FLAGS, weights=weights)
    yield s
    s.close()


def head(path: str, length: int) -> bytes:
    """A JSON POST's request line and headers, for a raw client."""
    return (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            f"Content-Length: {length}\r\n\r\n").encode()


def answer_of(conn: socket.socket) -> bytes:
    """What the server sends until it closes the connection (or the socket's timeout)."""
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data


def png(image: Image.Image, fmt: str = "PNG") -> str:
    """The image as base64, in `fmt`."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return base64.b64encode(buffer.getvalue()).decode()


def rows_body(cells: list, **parameters) -> dict:
    return {"input_data": {"columns": ["prompt", "image", "mask"], "data": cells, "parameters": FAST | parameters}}


def busy(server: LdmServe) -> list[socket.socket]:
    """The worker running a long job and the queue's one place taken by another, each held by a raw client (closing
    it cancels its job)."""
    payload = json.dumps({"input_data": {"data": ["long"], "parameters": FAST | {"num_inference_steps": 1000,
                                                                             "scheduler": "euler"}}})
    clients = [server.raw(head("/score", len(payload)) + payload.encode())]
    time.sleep(1)  # (parsed in milliseconds, then taken by the worker: its place given back)
    clients.append(server.raw(head("/score", len(payload)) + payload.encode()))
    deadline = time.monotonic() + 10
    while server.request("GET", "/health")[2]["queued"] != 1:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    return clients


# ------------------------------------------------------------------------------------------------ 1. parsing


def test_images_over_the_limit_are_refused_by_their_header_before_decoding(server):
    """Item 1: 16 rows each holding a 2048² RGBA PNG as image and mask (0.3 MB of body that decodes to 512 MB) are
    refused by the size their headers give, before a pixel is decoded: each row's error, the server's memory as it
    was (growth under 40 MB over three such requests; it was +530 MB a request when they were decoded first)."""
    y = Image.linear_gradient("L").resize((2048, 2048))
    big = png(Image.merge("RGBA", (y, y.transpose(Image.Transpose.ROTATE_90), y, y)))
    body = rows_body([[f"row {i}", big, big] for i in range(16)])
    before = server.rss_mb()
    start = time.monotonic()
    answers = [server.request("POST", "/score", body) for _ in range(3)]
    each = (time.monotonic() - start) / 3
    grown = server.rss_mb() - before
    print(f"16 rows of 2048² RGBA image + mask ({len(json.dumps(body)) / 1e6:.1f} MB): {each:.2f} s a request, "
          f"server RSS {before:.0f} MB → +{grown:.0f} MB after three")
    assert grown < 40
    for status, _, out in answers:
        assert status == 200 and len(out) == 16
        assert all(o["error"] == {"field": f"data[{i}].image", "message": "2048x2048 is larger than this server's "
                                  "1048576 pixels per image; resize it first"} for i, o in enumerate(out))


def test_a_full_queue_refuses_before_parsing(server):
    """Item 1: with the worker busy and the queue's place taken, a request is answered 503 before its body is parsed:
    one whose parameters are over the limits gets the queue's 503, not their 400, and 16 rows of images get it as
    fast as an empty request does."""
    picture = png(Image.linear_gradient("L").resize((1024, 1024)).convert("RGB"))  # within the limits: decoded
    clients = busy(server)
    try:
        status, headers, out = server.request("POST", "/score", {"input_data": {"data": ["a"], "parameters": {
            "num_inference_steps": 5000}}})
        assert (status, out["error"]["field"], headers.get("retry-after")) == (503, "queue", "10"), out
        start = time.monotonic()
        status, _, out = server.request("POST", "/score", rows_body([[f"row {i}", picture, None] for i in range(16)]))
        elapsed = time.monotonic() - start
        assert (status, out["error"]["field"]) == (503, "queue")
        print(f"full queue: 16 rows of 1024² images answered 503 in {elapsed:.2f} s")
    finally:
        for client in clients:
            client.close()


def test_slow_headers_are_cut_off(server):
    """Item 1: a client that sends its headers a byte at a time (slowloris) is answered 408 and closed once
    --header-timeout (1 s here) is over; it held its connection for ever."""
    conn = server.raw(b"POST /score HTTP/1.1\r\nHost: 127.0.0.1\r\n", timeout=0.25)
    start, answer = time.monotonic(), b""
    with conn:
        while not answer and time.monotonic() - start < 6:
            try:
                conn.sendall(b"X")  # a byte of a header every 0.25 s
                answer = conn.recv(1024) or b"(closed)"
            except TimeoutError:
                continue
            except OSError as e:
                answer = f"({e})".encode()
    elapsed = time.monotonic() - start
    print(f"slow headers: answered {answer[:12]!r} and closed after {elapsed:.1f} s")
    assert answer.startswith(b"HTTP/1.1 408 ") and elapsed < 3


def test_connections_are_limited_and_idle_ones_closed(server):
    """Item 1: --max-connections (32) bounds what the server serves at once — a 33rd client is answered 503 while 32
    connections sit open sending nothing — and those are closed at --header-timeout (1 s here), after which the
    server answers again."""
    idle = [server.raw(b"") for _ in range(32)]
    try:
        time.sleep(0.2)
        assert server.request("GET", "/health")[0] == 503
        time.sleep(1.5)
        assert server.request("GET", "/health")[0] == 200
        assert all(answer_of(conn).startswith(b"HTTP/1.1 408 ") for conn in idle)
    finally:
        for conn in idle:
            conn.close()


def test_slow_bodies_are_timed_out_and_their_memory_bounded(server):
    """Item 1: bodies that never arrive whole (their last byte missing) are answered 408 after --read-timeout (2 s
    here) instead of being held for ever, and while they are read they may hold 4 × --max-body-mb at once: a fifth
    body, sent whole, is refused with 503 at once."""
    size = MAX_BODY - 1000
    before = server.rss_mb()
    held = [server.raw(head("/score", size) + b"x" * (size - 1)) for _ in range(4)]
    time.sleep(0.5)  # (read by the server)
    start = time.monotonic()
    fifth = server.raw(head("/score", size) + b"x" * size, timeout=5)  # whole, but one too many
    refused = answer_of(fifth)
    fifth_s = time.monotonic() - start
    for conn in held:
        conn.settimeout(5)
    answers = [answer_of(conn) for conn in held]
    elapsed = time.monotonic() - start + 0.5
    print(f"4 bodies held: 408 after {elapsed:.1f} s (server RSS +{server.rss_mb() - before:.0f} MB), the fifth 503 "
          f"in {fifth_s:.2f} s")
    assert refused.startswith(b"HTTP/1.1 503 ") and b"retry-after: 10" in refused.lower() and fifth_s < 1.5
    assert all(a.startswith(b"HTTP/1.1 408 ") for a in answers) and elapsed < 5


# ------------------------------------------------------------------------------------ 3. requests from web pages

SMALL = {"input_data": {"data": ["a lighthouse"], "parameters": FAST}}


def test_host_names_nobody_allowed_are_refused(server):
    """Item 3: DNS rebinding — a page's own name made to resolve to 127.0.0.1 reaches the server with that name as
    Host, and the browser then lets the page read the answers. Such a Host is refused (400 naming it) on every
    route, before anything runs; IP addresses, localhost and the names of --allowed-hosts are answered."""
    for method, path, body in (("POST", "/score", SMALL), ("GET", "/health", None)):
        status, _, out = server.request(method, path, body, headers={"Host": f"evil.example:{server.port}"})
        assert status == 400 and out["error"]["field"] == "Host" and "--allowed-hosts" in out["error"]["message"]
    for host in ("127.0.0.1", f"localhost:{server.port}", "LDM.example", f"[::1]:{server.port}"):
        assert server.request("GET", "/health", headers={"Host": host})[0] == 200, host
    status, _, out = server.request("POST", "/score", SMALL, headers={"Host": f"ldm.example:{server.port}"})
    assert status == 200 and "generated_image" in out[0]


def test_pages_of_other_origins_are_refused(server):
    """Item 3: a page may POST to any address without a preflight if it sends text/plain; the browser names the page
    in Origin. Another origin's request is refused (403) unless --cors-allow-origins names it: those get CORS headers
    and their preflight answered. The server's own page (/docs) is of its own origin; GETs read nothing a page could
    use without CORS and are answered."""
    status, _, out = server.request("POST", "/score", json.dumps(SMALL).encode(),
                                    headers={"Origin": "http://evil.example", "Content-Type": "text/plain"})
    assert status == 403 and out["error"]["field"] == "Origin"
    status, _, out = server.request("POST", "/sdapi/v1/txt2img", {"prompt": "a", "steps": 1, "width": 64,
                                                                  "height": 64}, headers={"Origin": "null"})
    assert status == 403 and out["error"]["field"] == "Origin"  # (a sandboxed page, or one that hides its name)
    status, headers, _ = server.request("OPTIONS", "/score", headers={
        "Origin": "http://evil.example", "Access-Control-Request-Method": "POST"})
    assert status == 403 and "access-control-allow-origin" not in headers
    status, headers, _ = server.request("OPTIONS", "/score", headers={
        "Origin": "http://page.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert status == 204 and headers["access-control-allow-origin"] == "http://page.example"
    assert "POST" in headers["access-control-allow-methods"]
    assert "Content-Type" in headers["access-control-allow-headers"]
    status, headers, out = server.request("POST", "/score", SMALL, headers={"Origin": "http://page.example"})
    assert status == 200 and headers["access-control-allow-origin"] == "http://page.example" and len(out) == 1
    status, headers, _ = server.request("POST", "/score", SMALL, headers={"Origin": f"http://127.0.0.1:{server.port}"})
    assert status == 200 and "access-control-allow-origin" not in headers
    assert server.request("GET", "/health", headers={"Origin": "http://evil.example"})[0] == 200


def test_post_bodies_must_be_json(server):
    """Item 3: a body other than application/json is refused (415 naming Content-Type) on every POST route: a form or
    text/plain is what a page sends without a preflight. A POST without a body (A1111's /interrupt) needs none."""
    for path in ("/score", "/sdapi/v1/txt2img"):
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            status, _, out = server.request("POST", path, json.dumps(SMALL).encode(),
                                            headers={"Content-Type": content_type})
            assert status == 415 and out["error"]["field"] == "Content-Type", (path, content_type, out)
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10)
    conn.request("POST", "/sdapi/v1/interrupt")  # as webuiapi sends it: no body, no Content-Type
    assert conn.getresponse().status == 200
    conn.close()
    status, _, out = server.request("POST", "/score", SMALL,
                                    headers={"Content-Type": "application/json; charset=utf-8"})
    assert status == 200 and len(out) == 1


# ----------------------------------------------------------------------------------------------------- 4. no 500s

GOOD = "a good row"


def send(server: LdmServe, text: str):
    """A body given as JSON text (JSON may say "\\ud800" and NaN, which Python's own objects would not carry)."""
    return server.request("POST", "/score", text.encode())


def request_text(data: list, index: list | None = None, parameters: dict | None = None, **top) -> str:
    inner = {"data": data, "parameters": FAST | (parameters or {})} | ({"index": index} if index else {})
    return json.dumps({"input_data": inner} | top)  # (ensure_ascii: a lone surrogate as the escape \ud800)


LONG = "a" * 5000
# (request, the field of the 400) for requests that cannot be read at all
REFUSED = [
    (request_text([GOOD], parameters={"negative_prompt": "\ud800"}), "parameters.negative_prompt"),
    (request_text([GOOD], parameters={"\ud800": 1}), "parameters.\\ud800"),
    (request_text([GOOD], **{"\ud800": 1}), "\\ud800"),
    (request_text([GOOD, GOOD], index=[0, float("nan")]), "input_data.index[1]"),
    (request_text([GOOD], index=["\ud800"]), "input_data.index[0]"),
    (request_text([GOOD], parameters={"loras": {LONG: 1}}), "parameters.loras"),
    (request_text([GOOD], parameters={"loras": {"ink": 1e300}}), "parameters.loras"),
    (request_text([GOOD], parameters={"guidance_scale": float("inf")}), "parameters.guidance_scale"),
]
# (row 1, the field of its error, words of its message): row 0 is good and must still get its image
ROW_ERRORS = [
    ("\ud800", "data[1].prompt", "lone surrogate"),
    ({"prompt": "x", "negative_prompt": "a \ud800"}, "data[1].negative_prompt", "lone surrogate"),
    ({"prompt": "x", "\ud800": "y"}, "data[1].\\ud800", "unknown column"),
    (f"x <lora:{LONG}:1>", "data[1].prompt", "longer than a file name can be"),
    ("x <lora:ink:1e300>", "data[1].prompt", "<lora:ink:1e300>: the weight must be a finite number from -100 to 100"),
    ("x <lora:ink:nan>", "data[1].prompt", "<lora:ink:nan>: the weight must be a finite number"),
]


@pytest.mark.parametrize("text, field", REFUSED, ids=range(len(REFUSED)))
def test_requests_that_cannot_be_read_are_400_naming_the_field(server, text, field):
    """Item 4: a lone surrogate in a parameter, a parameter's name or a top-level key; NaN or a surrogate as an
    index label; a LoRA name longer than a file name, or at a weight of 1e300: each was a 500 ("Internal Server
    Error"); it is a 400 that names the field, in a body that is valid UTF-8 JSON."""
    status, headers, out = send(server, text)
    assert status == 400 and headers["content-type"] == "application/json", out
    assert out["error"]["field"] == field, out


@pytest.mark.parametrize("row, field, words", ROW_ERRORS, ids=range(len(ROW_ERRORS)))
def test_a_row_that_cannot_run_is_its_error_and_the_good_row_is_answered(server, row, field, words):
    """Item 4: a lone surrogate in a prompt, a negative prompt or a row's key; a <lora:…> tag longer than a file name,
    or at a weight of 1e300 (which overflowed) or NaN: each was a 500 that lost the good row's image; each is that
    row's error, and the good row's image is the one it gets alone."""
    status, _, out = send(server, request_text([GOOD, row], parameters={"prompt_syntax": "a1111"}))
    assert status == 200 and len(out) == 2, out
    assert out[1]["error"]["field"] == field and words in out[1]["error"]["message"], out[1]
    _, _, alone = send(server, request_text([GOOD], parameters={"prompt_syntax": "a1111"}))
    assert out[0] == alone[0]


# -------------------------------------------------------------------------------------------- 8. what answers say


def test_answers_name_no_folder_no_address_and_no_command_line_flag(server):
    """Item 8: a LoRA that is not there was answered with the LoRA folder's absolute path and its listing; bytes that
    are no image with a heap address (`<_io.BytesIO object at 0x…>`); `strength` without an image with the command
    line's `--strength` and `--image`. Each answer now says what is wrong in the request's own terms."""
    for parameters, field in (({"loras": {"missing": 1}}, None), ({"prompt_syntax": "a1111"}, "data[0].prompt")):
        prompt = "a <lora:missing:0.5>" if field else "a"
        status, _, out = server.request("POST", "/score", {"input_data": {"data": [prompt],
                                                                          "parameters": FAST | parameters}})
        error = out["error"] if field is None else out[0]["error"]
        assert error == {"field": field or "parameters.loras",
                         "message": "LoRA 'missing': not in the LoRA folder"}, error
    status, _, out = server.request("POST", "/score", {"input_data": {"columns": ["prompt", "image"], "data": [
        ["a", base64.b64encode(b"not an image at all").decode()], ["b", png(Image.effect_noise((64, 64), 9))[:300]],
        ["c", None]], "parameters": FAST | {"strength": 0.5}}})
    assert status == 200
    messages = [o["error"]["message"] for o in out]
    assert messages[0] == "the base64 data is not a readable image (ldm reads PNG, JPEG, WebP, BMP, GIF or TIFF)"
    assert messages[1].startswith("the base64 data is not a readable image (") and "0x" not in messages[1]
    assert out[2]["error"] == {"field": "data[2].image", "message": "missing: with parameters.strength "
                                                                    "(image-to-image, inpainting) each row needs one"}
    assert not any("--" in m or "object at" in m for m in messages)


def test_images_are_taken_in_the_formats_people_send(server):
    """Item 8: PNG, JPEG, WebP, BMP, GIF (its first frame) and TIFF are taken; Pillow's other formats (ICO, PCX, TGA,
    PPM…) are refused by name before they are decoded."""
    picture = Image.linear_gradient("L").resize((64, 64)).convert("RGB")
    taken, refused = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF"), ("ICO", "PCX", "TGA", "PPM")
    data = [[fmt, png(picture, fmt)] for fmt in taken + refused]
    status, _, out = server.request("POST", "/score", {"input_data": {"columns": ["prompt", "image"], "data": data,
                                                                      "parameters": FAST | {"strength": 0.5}}})
    assert status == 200 and [o["prompt"] for o in out] == list(taken + refused)
    assert all("generated_image" in o for o in out[:len(taken)]), out[:len(taken)]
    for o in out[len(taken):]:
        assert o["error"] == {"field": f"data[{o['index']}].image", "message": f"the base64 data is in the "
                              f"{o['prompt']} format; ldm reads PNG, JPEG, WebP, BMP, GIF or TIFF"}


# ------------------------------------------------------------------------------------------------ 6. amplification


def test_prompts_are_bounded_before_they_are_tokenized(server):
    """Item 6: two 1 MB prompts × 4 images made a 26.8 MB answer and 14 s of work: each prompt was tokenized whole and
    repeated in the JSON and in every PNG. A prompt over 24,000 characters (10 a token of the 32 chunks of 75 tokens
    ldm encodes) is its row's error before it is tokenized, its echo in the error cut to 1,000 characters; one at the
    bound runs, the note that it was cut at 77 tokens cut to 500 characters."""
    big = "a painting of a lighthouse " * 15_000  # 405,000 characters (the server's --max-body-mb is 1)
    start = time.monotonic()
    status, _, out = server.request("POST", "/score", {"input_data": {"data": [big, big], "parameters": FAST | {
        "num_images_per_prompt": 4}}})
    elapsed, size = time.monotonic() - start, len(json.dumps(out))
    print(f"two prompts of {len(big)} characters × 4 images: a {size}-byte answer in {elapsed:.2f} s")
    assert status == 200 and [o["error"]["field"] for o in out] == ["data[0].prompt", "data[1].prompt"]
    assert out[0]["error"]["message"] == ("405000 characters; this server takes at most 24000 (ldm encodes 32 chunks "
                                          "of 75 tokens)")
    assert size < 5000
    at_bound = "x " * 12_000
    status, _, out = server.request("POST", "/score", {"input_data": {"data": [at_bound], "parameters": FAST}})
    assert status == 200 and "generated_image" in out[0] and out[0]["prompt"] == at_bound
    assert [len(note) < 530 for note in out[0]["notes"]] == [True]  # (cut at 77 tokens: what was dropped, cut short)



def test_the_module_server_logged_no_traceback_and_answered_no_500(server):
    """Items 1-8 on the module's server: whatever the tests above sent it, its log holds no traceback and no 500."""
    log = server.log.read_text()
    assert "Traceback" not in log and " 500," not in log and " 500 " not in log, log[-3000:]

# ---------------------------------------------------------------------------------------------------- 7. shutdown


def test_sigterm_drains_for_the_graceful_timeout_then_answers_503(sd1_folder, tmp_path):
    """Item 7: on SIGTERM the server drained every running and queued job, however long (up to queue × --timeout).
    It now finishes what it can within --graceful-timeout (4 s here: two short jobs, answered 200), then cancels the
    rest (a job of 1,000 steps, running or queued) and answers them 503; the process is gone soon after."""
    s = LdmServe(sd1_folder, tmp_path / "server.log", "--queue-size", "4", "--max-steps", "1000",
                 "--graceful-timeout", "4")
    try:
        def job(steps: int) -> socket.socket:
            payload = json.dumps({"input_data": {"data": [f"{steps} steps"], "parameters": FAST | {
                "num_inference_steps": steps, "scheduler": "euler"}}})
            return s.raw(head("/score", len(payload)) + payload.encode(), timeout=20)

        clients = [job(5), job(5), job(1000), job(1000)]
        deadline = time.monotonic() + 10
        while s.request("GET", "/health")[2]["queued"] < 3:  # the first running, the others queued
            assert time.monotonic() < deadline
            time.sleep(0.05)
        start = time.monotonic()
        s.process.send_signal(signal.SIGTERM)
        answers = [answer_of(conn) for conn in clients]
        s.process.wait(15)
        gone = time.monotonic() - start
    finally:
        s.close()
    statuses = [a[:12] for a in answers]
    print(f"SIGTERM: answered {statuses}, the process gone after {gone:.1f} s")
    assert statuses == [b"HTTP/1.1 200"] * 2 + [b"HTTP/1.1 503"] * 2
    assert all(b'"the server is shutting down"' in a for a in answers[2:]) and gone < 10


# ---------------------------------------------------------------------------------------------- 2. image URLs


def test_image_urls_to_private_addresses_are_not_fetched(server):
    """Item 2: a server with --allow-image-urls followed URLs (and redirects) to its own loopback and network, and its
    errors told a closed port from an open one: a port scanner for its clients. Loopback, private and link-local
    addresses are refused after resolution, before anything is sent, with one message for all (the server's own
    open port and a closed one alike); --allow-private-urls allows them."""
    urls = [f"http://127.0.0.1:{server.port}/health", "http://127.0.0.1:1/x", f"http://localhost:{server.port}/",
            "http://10.1.2.3/x.png", "http://169.254.169.254/latest/meta-data/", f"http://[::1]:{server.port}/"]
    start = time.monotonic()
    status, _, out = server.request("POST", "/score", {"input_data": {"columns": ["prompt", "image"], "data": [
        ["a", url] for url in urls], "parameters": FAST | {"strength": 0.5}}})
    assert status == 200 and time.monotonic() - start < 3
    hosts = ["127.0.0.1", "127.0.0.1", "localhost", "10.1.2.3", "169.254.169.254", "::1"]
    for o, host in zip(out, hosts, strict=True):
        assert o["error"]["message"] == (f"{host} is not a public address (loopback, private, link-local…): this "
                                         "server fetches from public addresses only (ldm serve --allow-private-urls "
                                         "allows the others)"), o


class ImageHost(http.server.BaseHTTPRequestHandler):
    """A public image host as a test plays it: /ok.png, and hosts that send a byte every 0.2 s (/drip: the body;
    /slow-headers: the headers) for a minute."""

    png = base64.b64decode(png(Image.linear_gradient("L").resize((64, 64)).convert("RGB")))
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        try:
            if self.path == "/slow-headers":
                self.wfile.write(b"HTTP/1.1 200 OK\r\n")
                for _ in range(300):
                    self.wfile.write(b"X")
                    self.wfile.flush()
                    time.sleep(0.2)
                return
            body = self.png if self.path == "/ok.png" else b"x" * 300
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.path == "/ok.png":
                self.wfile.write(body)
                return
            for byte in body:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
                time.sleep(0.2)
        except OSError:
            pass

    def log_message(self, *args):
        pass


def test_slow_image_hosts_are_cut_at_the_deadline_and_hold_only_their_pool(sd1_folder, tmp_path):
    """Item 2: a host that drips a byte every 0.2 s held its fetch for as long as it dripped (a read of 64 KiB waits
    for all of it; 25 s were seen against a 10 s limit), and six of them filled the threads every request shared,
    stalling the others into 504s. The whole fetch — headers and body — now ends at --image-url-timeout (2 s here),
    that row's error, and fetches run on a pool of their own: with six slow requests in flight, a request without
    URLs is answered at once; once they are answered, one with a good URL gets its image (the pool is free again)."""
    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ImageHost)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{host.server_port}"
    s = LdmServe(sd1_folder, tmp_path / "server.log", "--queue-size", "16", "--allow-image-urls",
                 "--allow-private-urls", "--image-url-timeout", "2")

    def slow(path: str):
        start = time.monotonic()
        status, _, out = s.request("POST", "/score", {"input_data": {"columns": ["prompt", "image"], "data": [
            ["a", f"{base}{path}"]], "parameters": FAST | {"strength": 0.5}}}, timeout=30)
        return status, out[0].get("error"), time.monotonic() - start

    try:
        with ThreadPoolExecutor(6) as pool:
            slow_ones = [pool.submit(slow, path) for path in ["/drip"] * 3 + ["/slow-headers"] * 3]
            time.sleep(0.5)  # (the six fetching)
            start = time.monotonic()
            status, _, plain = s.request("POST", "/score", SMALL)
            plain_s = time.monotonic() - start
            answers = [f.result() for f in slow_ones]
        status_ok, _, ok = s.request("POST", "/score", {"input_data": {"columns": ["prompt", "image"], "data": [
            ["a", f"{base}/ok.png"]], "parameters": FAST | {"strength": 0.5}}})  # (the fetches over: the pool free)
    finally:
        s.close()
        host.shutdown()
    print(f"six slow image hosts: answered in {max(a[2] for a in answers):.1f} s at the most; a plain request "
          f"meanwhile in {plain_s:.2f} s")
    assert status == 200 and "generated_image" in plain[0] and plain_s < 1.5
    assert status_ok == 200 and "generated_image" in ok[0], ok
    for status, error, seconds in answers:
        assert status == 200 and error["message"].endswith(": not fetched within 2 s") and seconds < 5, error
