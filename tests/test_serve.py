"""`ldm serve` for real: uvicorn on a loopback port, driven with real HTTP requests (16 at once), a bounded
queue answering 503 with Retry-After, limits, and a client that goes away."""

import base64
import http.client
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
import uvicorn
from PIL import Image

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.runner import score
from ldm.serving.server import ServeConfig, Worker, create_app

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}

# (conftest.py) every comparison here is within this process: the pipeline at one thread
pytestmark = pytest.mark.usefixtures("one_thread")


class Server:
    """An ldm endpoint in a thread: the worker, the FastAPI app and uvicorn on a pre-bound loopback socket."""

    def __init__(self, load, config: ServeConfig, model_name: str = "tiny-sd1"):
        self.worker = Worker(load, config.queue_size, config.batch_size)
        self.worker.start()
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(create_app(self.worker, config, model_name), log_level="warning"))
        self.thread = threading.Thread(target=self.uvicorn.run, kwargs={"sockets": [sock]}, daemon=True)
        self.thread.start()
        while not self.uvicorn.started:
            time.sleep(0.01)

    def request(self, method: str, path: str, body=None, raw: bytes | None = None, timeout: float = 120):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        content = response.read()
        conn.close()
        try:
            payload = json.loads(content)
        except json.JSONDecodeError:
            payload = content
        return response.status, {k.lower(): v for k, v in response.getheaders()}, payload

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(10)
        self.worker.stop()


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture
def server(pipe, request):
    config = getattr(request, "param", ServeConfig(queue_size=16))
    s = Server(lambda: pipe, config)
    yield s
    s.close()


def body(prompt: str, seed: int, **parameters) -> dict:
    return {"input_data": {"columns": ["prompt"], "index": [0], "data": [prompt],
                           "parameters": FAST | {"seed": seed} | parameters}}


def test_health_score_and_docs(server, pipe):
    status, _, health = server.request("GET", "/health")
    assert status == 200 and health["status"] == "ready" and health["model"] == "tiny-sd1"
    status, _, out = server.request("POST", "/score", body("a lighthouse", 3))
    assert status == 200
    assert out == score(pipe, body("a lighthouse", 3))  # exactly what the adapter gives
    assert out[0]["nsfw_content_detected"] is False and base64.b64decode(out[0]["generated_image"])[:4] == b"\x89PNG"
    status, _, spec = server.request("GET", "/openapi.json")
    assert status == 200 and "/score" in spec["paths"] and "/health" in spec["paths"]
    assert server.request("GET", "/docs")[0] == 200


def test_bad_requests_are_400_with_the_field(server):
    for raw in (b"{not json", b"[" * 100000, b"\xff\xfe", b"1" * 5000):
        status, _, out = server.request("POST", "/score", raw=raw)
        assert status == 400 and out["error"]["field"] == "body" and "not valid JSON" in out["error"]["message"]
    for side, message in ((12000, "12000x12000 is larger than"), (20000, "decompression bomb")):
        bomb = io.BytesIO()  # some KB that would decode to 144 or 400 megapixels: refused before decoding
        Image.new("1", (side, side)).save(bomb, format="PNG")
        status, _, out = server.request("POST", "/score", {"input_data": {"columns": ["prompt", "image"], "data": [
            ["a", base64.b64encode(bomb.getvalue()).decode()]], "parameters": FAST}})
        assert status == 200 and out[0]["error"]["field"] == "data[0].image" and message in out[0]["error"]["message"]
    status, _, out = server.request("POST", "/score", {"data": ["a"]})
    assert status == 400 and out["error"]["field"] == "input_data"
    status, _, out = server.request("POST", "/score", body("a", 1, num_inference_steps=1000))
    assert status == 400 and out["error"]["field"] == "parameters.num_inference_steps"
    status, _, out = server.request("POST", "/score", {"input_data": {"columns": ["prompt", "image"],
                                                                      "data": [["a", "%%%"]], "parameters": FAST}})
    assert status == 200 and out[0]["error"]["field"] == "data[0].image"  # a bad row is reported in place


@pytest.mark.parametrize("server", [ServeConfig(max_body_bytes=1000)], indirect=True)
def test_body_over_the_limit_is_413(server):
    status, _, out = server.request("POST", "/score", body("a" * 2000, 1))
    assert status == 413 and out["error"]["field"] == "body"


def test_sixteen_concurrent_requests_all_answered_in_order_of_their_seeds(server, pipe):
    requests = [body(f"prompt number {i}", 100 + i) for i in range(16)]
    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda b: server.request("POST", "/score", b), requests))
    elapsed = time.monotonic() - start
    assert [status for status, _, _ in answers] == [200] * 16
    for request, (_, _, out) in zip(requests, answers, strict=True):
        assert out[0]["prompt"] == request["input_data"]["data"][0] and out[0]["seed"] == request["input_data"][
            "parameters"]["seed"]
    # each answer is the image a lone request gets: no cross-talk between concurrent requests
    assert answers[5][2] == score(pipe, requests[5])
    print(f"16 concurrent requests: all 200 in {elapsed:.2f} s, {server.worker.served} served by one worker")


@pytest.mark.parametrize("server", [ServeConfig(queue_size=2)], indirect=True)
def test_a_full_queue_answers_503_with_retry_after(server):
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda i: server.request("POST", "/score", body("busy", i, num_inference_steps=4)),
                                range(16)))
    statuses = [status for status, _, _ in answers]
    assert set(statuses) == {200, 503} and statuses.count(200) >= 3  # one running, two waiting, at the least
    for status, headers, out in answers:
        if status == 503:
            assert headers["retry-after"] == "10" and out["error"]["field"] == "queue"
    print(f"queue of 2, 16 at once: {statuses.count(200)} answered, {statuses.count(503)} told to retry")


def test_a_client_that_disconnects_stops_its_work(server):
    conn = socket.create_connection(("127.0.0.1", server.port))
    payload = json.dumps(body("a long one", 1, num_inference_steps=150)).encode()
    conn.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(payload)).encode() + b"\r\n\r\n" + payload)
    time.sleep(1.0)  # it is running now
    conn.close()
    start = time.monotonic()
    status, _, _ = server.request("POST", "/score", body("next", 2, num_inference_steps=1))
    waited = time.monotonic() - start
    assert status == 200
    # 150 steps take far longer than this: the abandoned job stopped at its next step
    print(f"next request answered {waited:.2f} s after the disconnect")
    assert waited < 2  # 150 steps would take several seconds more


@pytest.mark.parametrize("server", [ServeConfig(timeout_s=1.0)], indirect=True)
def test_timeout_cancels_with_504(server):
    status, _, out = server.request("POST", "/score", body("slow", 1, num_inference_steps=150))
    assert status == 504 and out["error"]["field"] == "timeout"


def test_health_while_loading_and_after_a_failed_load(pipe):
    gate = threading.Event()

    def slow_load():
        gate.wait(10)
        return pipe

    s = Server(slow_load, ServeConfig())
    try:
        status, headers, out = s.request("GET", "/health")
        assert status == 503 and out["status"] == "loading" and "retry-after" in headers
        assert s.request("POST", "/score", body("a", 1))[0] == 503
        gate.set()
        s.worker.ready.wait(10)
        assert s.request("GET", "/health")[0] == 200
    finally:
        s.close()

    from ldm.errors import LoadError

    def broken():
        raise LoadError("/models/x: model_index.json is missing")

    def out_of_memory():
        raise RuntimeError("CUDA out of memory")

    for load, message in ((broken, "model_index.json is missing"), (out_of_memory, "RuntimeError: CUDA out of")):
        s = Server(load, ServeConfig())
        try:
            s.worker.ready.wait(10)
            status, _, out = s.request("GET", "/health")
            assert status == 503 and out["status"] == "failed" and message in out["error"]
        finally:
            s.close()


def test_limits_are_the_servers(pipe):
    s = Server(lambda: pipe, ServeConfig(limits=Limits(max_rows=2, max_steps=10)))
    try:
        status, _, out = s.request("POST", "/score", {"input_data": {"data": ["a", "b", "c"], "parameters": FAST}})
        assert status == 400 and "at most 2" in out["error"]["message"]
        status, _, out = s.request("POST", "/score", body("a", 1, num_inference_steps=11))
        assert status == 400 and "from 1 to 10" in out["error"]["message"]
    finally:
        s.close()


def test_a_micro_batching_server_answers_like_the_adapter(pipe):
    s = Server(lambda: pipe, ServeConfig(batch_size=4))
    try:
        request = {"input_data": {"data": ["a", "b", "c"], "parameters": FAST | {"seed": 4}}}
        status, _, out = s.request("POST", "/score", request)
        assert status == 200 and out == score(pipe, request, batch_size=4)
    finally:
        s.close()


def test_requests_cancelled_while_queued_give_their_places_back():
    """A worker stuck on a long job, two queued requests that time out: their places are free at once."""
    gate = threading.Event()

    class Stuck:  # a pipeline whose one call runs until the gate opens, ignoring cancellation
        native_size, vae_scale = 64, 8

        def __call__(self, *args, **kwargs):
            gate.wait(30)
            raise AssertionError("not reached in this test")

    s = Server(Stuck, ServeConfig(queue_size=2, timeout_s=0.5))
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(s.request, "POST", "/score", body("a", 1))
            time.sleep(0.3)
            with ThreadPoolExecutor(2) as waiting:
                assert [a[0] for a in waiting.map(lambda i: s.request("POST", "/score", body("b", i)), (2, 3))] == \
                    [504, 504]
            assert s.worker.waiting == 0 and not gate.is_set()  # the first still runs
            assert s.request("POST", "/score", body("c", 4))[0] == 504  # queued (then timed out), not refused
            assert running.result()[0] == 504
    finally:
        gate.set()
        s.close()


@pytest.mark.parametrize("server", [ServeConfig(max_body_bytes=4_000_000)], indirect=True)
def test_over_limit_bodies_are_answered_to_clients_that_close(server):
    """urllib sends `Connection: close`: a 413 answered before the body is read made the kernel reset the
    connection (the unread body still in flight, well over the socket buffers here), and the client never read
    it. The body (up to 4× the limit) is read first; one that waits for `100 Continue` is answered at once."""
    import urllib.error
    import urllib.request

    url = f"http://127.0.0.1:{server.port}/score"
    for data, message in ((b"x" * 15_000_000, "15000000 bytes; this server takes at most 4000000"),
                          (iter([b"x" * 1_000_000] * 6), "more than this server's 4000000 bytes")):  # chunked
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(urllib.request.Request(url, data=data, headers={
                "Content-Type": "application/json"}), timeout=30)
        assert info.value.code == 413 and info.value.headers["Connection"] == "close"
        assert json.loads(info.value.read()) == {"error": {"field": "body", "message": message}}
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as conn:  # no body is ever sent
        conn.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Length: 5000000\r\nExpect: 100-continue\r\n\r\n")
        assert conn.recv(65536).startswith(b"HTTP/1.1 413 ")


def test_each_request_is_logged_on_one_line(server, capsys):
    server.request("GET", "/health")
    server.request("POST", "/score", body("a lighthouse", 3, num_inference_steps=1))
    server.request("POST", "/score", {"input_data": {"data": ["a", "b"], "parameters": {"num_inference_steps": 1000}}})
    # the line is written once the answer is sent: the client may read the answer before the server writes it
    err, deadline = "", time.monotonic() + 10
    while True:
        err += capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.startswith("ldm: ")]
        if len(lines) >= 3 or time.monotonic() > deadline:
            break
        time.sleep(0.01)
    assert [line.rsplit(", ", 1)[0] for line in lines] == ["ldm: GET /health 200", "ldm: POST /score 200, 1 row",
                                                           "ldm: POST /score 400"]
    assert all(line.endswith(" s") for line in lines)


def test_image_urls_are_fetched_only_when_allowed(pipe, capsys):
    """A tiny HTTP server plays the public image host; the fetched image gives what the same image in base64
    gives, and what cannot be fetched (404, too large, a redirect off http) is that row's error."""
    import http.server

    png = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 40, 40)).save(png, format="PNG")
    png = png.getvalue()

    class Host(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/redirect":
                self.send_response(302)
                self.send_header("Location", "ftp://127.0.0.1/house.png")  # urllib would follow it
                self.end_headers()
                return
            content = {"/house.png": png, "/big.png": png + bytes(20_000)}.get(self.path)
            self.send_response(404 if content is None else 200)
            self.send_header("Content-Length", str(len(content or b"")))
            self.end_headers()
            self.wfile.write(content or b"")

        def log_message(self, *args):
            pass

    host = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Host)
    threading.Thread(target=host.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{host.server_port}"
    request = {"input_data": {"columns": ["prompt", "image"],
                              "data": [["a red house", f"{base}/house.png"], ["b", f"{base}/missing.png"],
                                       ["c", f"{base}/big.png"], ["d", f"{base}/redirect"]],
                              "parameters": FAST | {"seed": 1, "strength": 0.5}}}
    inline = {"input_data": request["input_data"] | {"data": [["a red house", base64.b64encode(png).decode()]]}}
    s = Server(lambda: pipe, ServeConfig(max_body_bytes=10_000, allow_image_urls=True, allow_private_urls=True))
    try:
        status, _, out = s.request("POST", "/score", request)
    finally:
        s.close()
        host.shutdown()
    assert status == 200 and "generated_image" in out[0]
    assert out[0] == score(pipe, inline)[0]  # the fetched image is the one sent inline
    errors = {o["index"]: o["error"] for o in out if "error" in o}
    assert set(errors) == {1, 2, 3} and all(e["field"] == f"data[{i}].image" for i, e in errors.items())
    assert "answered 404" in errors[1]["message"] and "more than this server's 10000 bytes" in errors[2]["message"]
    assert "only http and https" in errors[3]["message"]


def test_serve_refuses_a_model_it_cannot_find_or_read_before_serving(tmp_path, sd1_folder, monkeypatch, capsys):
    """A user error about --model: one line on stderr and exit 2, as `ldm generate` does, and no server."""
    import ldm.serving.server
    from ldm_cli.main import main

    started = []
    monkeypatch.setattr(ldm.serving.server, "serve", lambda *args, **kwargs: started.append(args))
    (tmp_path / "truncated.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{")
    (tmp_path / "empty").mkdir()
    for model, message in ((tmp_path / "nowhere", "no such file or folder"),
                           (tmp_path / "truncated.safetensors", "not a readable safetensors file"),
                           (tmp_path / "empty", "model_index.json")):
        assert main(["serve", "--model", str(model)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("ldm: error: ") and message in err[0], err
    assert started == []
    assert main(["serve", "--model", str(sd1_folder), "--port", "8765"]) == 0
    assert len(started) == 1 and started[0][1:4] == (str(sd1_folder), "127.0.0.1", 8765)


def served_config(monkeypatch, *flags: str) -> ServeConfig:
    """The ServeConfig `ldm serve --model … FLAGS` hands the server (the server itself is not started)."""
    import ldm.serving.server
    from ldm_cli.main import main

    started = []
    monkeypatch.setattr(ldm.serving.server, "serve", lambda *args, **kwargs: started.append(args))
    assert main(["serve", *flags]) == 0
    [(_, _, _, _, config)] = started
    return config


def test_every_serve_flag_reaches_the_server_and_takes_effect(sd1_folder, pipe, monkeypatch):
    """`ldm serve`'s flags against the ServeConfig written here from their README meaning (each flag a value of its
    own, so a swapped pair shows), then that very config served: each limit refuses what it should."""
    flags = ["--model", str(sd1_folder), "--max-rows", "2", "--max-steps", "10", "--max-pixels", "5000",
             "--max-images", "3", "--max-body-mb", "0.01", "--queue-size", "5", "--batch-size", "6",
             "--response-format", "sd14", "--timeout", "7.5", "--allow-image-urls"]
    config = served_config(monkeypatch, *flags)
    assert config == ServeConfig(limits=Limits(max_rows=2, max_steps=10, max_pixels=5000, max_images_per_prompt=3),
                                 queue_size=5, max_body_bytes=int(0.01 * 1024 * 1024), timeout_s=7.5, form="sd14",
                                 batch_size=6, allow_image_urls=True)
    # the defaults (README "Serving"), the batch size 1 on the CPU and 4 on CUDA
    assert served_config(monkeypatch, "--model", str(sd1_folder)) == ServeConfig(
        limits=Limits(max_rows=16, max_steps=150, max_pixels=1024 * 1024, max_images_per_prompt=4), queue_size=8,
        max_body_bytes=32 * 1024 * 1024, timeout_s=600, form="rows", batch_size=1, allow_image_urls=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert served_config(monkeypatch, "--model", str(sd1_folder)).batch_size == 4  # --device auto: CUDA
    assert served_config(monkeypatch, "--model", str(sd1_folder), "--device", "cpu").batch_size == 1
    monkeypatch.undo()

    s = Server(lambda: pipe, served_config(monkeypatch, *flags))
    try:
        def refused(payload, **parameters):
            status, _, out = s.request("POST", "/score", {"input_data": {"data": payload, "parameters": FAST | {
                "seed": 1} | parameters}})
            assert status == 400, (status, out)
            return out["error"]["field"], out["error"]["message"]

        assert refused(["a", "b", "c"]) == ("input_data.data", "3 rows; this server takes at most 2 per request")
        assert refused(["a"], num_inference_steps=11)[0] == "parameters.num_inference_steps"
        assert refused(["a"], width=128, height=64)[0] == "parameters.width"  # 8192 pixels > 5000
        assert refused(["a"], num_images_per_prompt=4) == (
            "parameters.num_images_per_prompt", "must be from 1 to 3, got 4")
        status, _, out = s.request("POST", "/score", body("a" * 11000, 1))  # 0.01 MB = 10485 bytes
        assert status == 413 and out["error"]["field"] == "body"
    finally:
        s.close()


def test_a_model_served_from_a_path_is_named_without_it(pipe, tmp_path):
    """/health and /docs name a model started from a folder or file by that name alone (an answer names no path)."""
    folder = tmp_path / "my-model"
    folder.mkdir()
    s = Server(lambda: pipe, ServeConfig(), model_name=str(folder))
    try:
        s.worker.ready.wait(10)
        _, _, health = s.request("GET", "/health")
        _, _, spec = s.request("GET", "/openapi.json")
        assert health["model"] == "my-model" and "my-model" in spec["info"]["description"]
        assert str(tmp_path) not in json.dumps(health) + json.dumps(spec)
    finally:
        s.close()
