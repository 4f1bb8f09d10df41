"""README 'Serving' promises held over `ldm serve` itself: the command line's flags through `serve()` into a real
uvicorn on a loopback port (`--max-images`, `--response-format sd15` / `sd14`, `--batch-size`'s default), and a
request cancelled while it waits in the queue, which must never reach the pipeline."""

import base64
import contextlib
import io
import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import uvicorn
from PIL import Image
from test_serve import FAST, Server, body

import ldm.pipelines.setup
import ldm.serving.runner
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.server import ServeConfig
from ldm_cli.main import main

# (conftest.py) every comparison here is within this process: the pipeline at one thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


class Served:
    """`ldm serve --model FOLDER FLAGS` in a thread, as the command runs it (`serve()`: its worker, its app), with
    uvicorn on a pre-bound loopback socket so that the test knows the port and can stop it."""

    def __init__(self, monkeypatch, folder, pipe, *flags: str):
        self.started = threading.Event()
        self.uvicorn = None
        monkeypatch.setattr(ldm.pipelines.setup, "prepare_pipeline", lambda settings: pipe)  # loaded once, here
        monkeypatch.setattr(uvicorn, "run", self.run)
        self.thread = threading.Thread(target=main, args=(["serve", "--model", str(folder), *flags],), daemon=True)
        self.thread.start()
        while not self.started.wait(0.05):
            assert self.thread.is_alive(), "ldm serve ended before it listened"
        while self.request("GET", "/health")[0] != 200:
            time.sleep(0.01)

    def run(self, app, host, port, **kwargs):  # uvicorn.run, as serve() calls it
        sock = socket.socket()
        sock.bind((host, 0))
        self.port = sock.getsockname()[1]
        self.uvicorn = uvicorn.Server(uvicorn.Config(app, **kwargs | {"log_level": "warning"}))
        threading.Thread(target=self.announce, daemon=True).start()
        self.uvicorn.run(sockets=[sock])

    def announce(self):
        while not self.uvicorn.started:
            time.sleep(0.01)
        self.started.set()

    request = Server.request

    def close(self):
        self.uvicorn.should_exit = True
        self.thread.join(10)  # serve() stops its worker on the way out
        assert not self.thread.is_alive()


@contextlib.contextmanager
def served(monkeypatch, folder, pipe, *flags: str):
    server = Served(monkeypatch, folder, pipe, *flags)
    try:
        yield server
    finally:
        server.close()


def pixels(b64png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB"))


def alone(pipe, prompt: str, seed: int, **options) -> list[np.ndarray]:
    """The images the pipeline makes of one prompt with FAST's settings, read as a request reads it (plainly)."""
    result = pipe(prompt, steps=2, width=64, height=64, seed=seed, prompt_syntax="plain", **options)
    return [np.asarray(image) for image in result.images]


def test_max_images_refuses_a_request_over_it_and_serves_one_at_it(monkeypatch, sd1_folder, pipe):
    """`--max-images 2`: three images per prompt is a 400 naming `parameters.num_images_per_prompt`, and the server
    goes on answering; two are served, each the image the pipeline makes of that prompt and seed."""
    with served(monkeypatch, sd1_folder, pipe, "--max-images", "2") as server:
        status, _, out = server.request("POST", "/score", body("a bell", 5, num_images_per_prompt=3))
        assert (status, out) == (400, {"error": {"field": "parameters.num_images_per_prompt",
                                                 "message": "must be from 1 to 2, got 3"}})
        status, _, out = server.request("POST", "/score", body("a bell", 5, num_images_per_prompt=2))
        assert status == 200 and [(o["prompt"], o["seed"]) for o in out] == [("a bell", 5)] * 2
        for o, expected in zip(out, alone(pipe, "a bell", 5, num_images=2), strict=True):
            assert np.array_equal(pixels(o["generated_image"]), expected)
        status, _, out = server.request("POST", "/score", body("a horn", 6))
        assert status == 200 and len(out) == 1


CARD_ROWS = {"input_data": {"columns": ["prompt", "image"], "data": [["a cat", None], ["a dog", None], ["x", "%%%"]],
                            "parameters": FAST | {"seed": 20}}}


@pytest.mark.parametrize("form, key", [("sd15", "generated_image"), ("sd14", "generated_images")])
def test_older_card_response_forms_are_the_cards_schema(monkeypatch, sd1_folder, pipe, form, key):
    """`--response-format sd15` / `sd14` (README 'Serving'; the SD 1.5 / 1.4 cards, shared/reference/azure-schema.md):
    a list holding one object of lists — the base64 PNGs under `generated_image` (SD 1.5) or `generated_images`
    (SD 1.4), the flags as the strings "True"/"False" — and a failed row under `errors`. Each PNG is the image its row
    gets from the pipeline alone. The default form is another: one object per row, with its prompt and seed."""
    with served(monkeypatch, sd1_folder, pipe, "--response-format", form) as server:
        status, _, out = server.request("POST", "/score", CARD_ROWS)
    assert status == 200 and isinstance(out, list) and len(out) == 1
    (answer,) = out
    assert set(answer) == {key, "nsfw_content_detected", "errors"}
    assert answer["nsfw_content_detected"] == ["False", "False"]  # the tiny SD 1.5 folder's checker finds nothing
    assert [e["index"] for e in answer["errors"]] == [2] and answer["errors"][0]["error"]["field"] == "data[2].image"
    assert len(answer[key]) == 2
    for b64png, (prompt, seed) in zip(answer[key], (("a cat", 20), ("a dog", 21)), strict=True):
        assert np.array_equal(pixels(b64png), alone(pipe, prompt, seed)[0])

    with served(monkeypatch, sd1_folder, pipe) as server:
        status, _, default = server.request("POST", "/score", CARD_ROWS)
    assert status == 200 and len(default) == 3 and [o.get("seed") for o in default] == [20, 21, None]
    assert [o["generated_image"] for o in default[:2]] == answer[key]  # the same images, in the other form
    assert all(isinstance(o["nsfw_content_detected"], bool) for o in default[:2])


def recorded_passes(monkeypatch) -> list[int]:
    """How many rows each pass through the pipeline carries, for the requests of this test."""
    passes, run_rows = [], ldm.serving.runner.run_rows

    def recording(pipe, request, rows, cancelled=None):
        passes.append(len(rows))
        return run_rows(pipe, request, rows, cancelled)

    monkeypatch.setattr(ldm.serving.runner, "run_rows", recording)
    return passes


def test_batch_size_defaults_to_one_on_the_cpu_and_four_on_cuda(monkeypatch, sd1_folder, pipe):
    """README 'Serving': a request's text-to-image rows go through the networks together, up to `--batch-size` images
    a pass, by default 4 on CUDA and 1 on the CPU. Five rows, counted per pass: one a pass where no CUDA is found, four
    then one where it is (`--device auto`; the tiny pipeline runs where it was loaded either way), each image the row's
    own (≤ 2/255, README)."""
    request = {"input_data": {"data": ["a", "b", "c", "d", "e"], "parameters": FAST | {"seed": 30}}}
    passes = recorded_passes(monkeypatch)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with served(monkeypatch, sd1_folder, pipe) as server:
        status, _, one_a_pass = server.request("POST", "/score", request)
    assert status == 200 and passes == [1] * 5
    passes.clear()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    with served(monkeypatch, sd1_folder, pipe) as server:
        status, _, four_a_pass = server.request("POST", "/score", request)
    assert status == 200 and passes == [4, 1]
    for single, batched in zip(one_a_pass, four_a_pass, strict=True):
        difference = pixels(single["generated_image"]).astype(int) - pixels(batched["generated_image"])
        assert np.abs(difference).max() <= 2


class Recorded:
    """The pipeline, its calls recorded (their prompts); a call for `hold` waits for `gate` before it runs."""

    def __init__(self, pipe, hold: str, gate: threading.Event):
        self.pipe, self.hold, self.gate, self.prompts = pipe, hold, gate, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, request, **kwargs):
        self.prompts += request.prompts
        if self.hold in request.prompts:
            assert self.gate.wait(30)
        return self.pipe(request, **kwargs)


def send_and_leave_open(port: int, payload: dict) -> socket.socket:
    """A POST /score whose client waits for its answer on a raw socket (closing it is a client going away)."""
    conn = socket.create_connection(("127.0.0.1", port))
    data = json.dumps(payload).encode()
    conn.sendall(b"POST /score HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: " + str(len(data)).encode() + b"\r\n\r\n" + data)
    return conn


def wait_until(condition, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_a_request_whose_client_leaves_while_it_is_queued_never_runs(pipe):
    """README 'Serving': a client that disconnects cancels its request, whether queued or running. A one-place queue
    behind a running request; a second client's request waits in it, and the client goes away: its place is free at
    once, the pipeline never sees its prompt, the first request is still answered, and so is a third one after it."""
    gate = threading.Event()
    recorded = Recorded(pipe, "the long one", gate)
    server = Server(lambda: recorded, ServeConfig(queue_size=1, timeout_s=10))
    try:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(server.request, "POST", "/score", body("the long one", 1))
            assert wait_until(lambda: recorded.prompts == ["the long one"])  # running, held at the gate
            leaving = send_and_leave_open(server.port, body("the one that leaves", 2))
            assert wait_until(lambda: server.worker.waiting == 1)  # queued behind it
            leaving.close()
            assert wait_until(lambda: server.worker.waiting == 0)  # its place given back before the worker got to it
            gate.set()
            status, _, out = first.result(30)
        assert status == 200 and np.array_equal(pixels(out[0]["generated_image"]), alone(pipe, "the long one", 1)[0])
        status, _, out = server.request("POST", "/score", body("the third", 3))
        assert recorded.prompts == ["the long one", "the third"]
        assert status == 200 and out[0]["prompt"] == "the third"
        assert wait_until(lambda: server.worker.served == 2)  # (counted once the answer is handed over)
    finally:
        gate.set()
        server.close()
