"""Benchmark of issue 28: the A1111 API's `txt2img` against the same work through `/score`, on one `ldm serve`
process (the tiny random SD 1.5 of the tests, 64×64, 2 Euler steps, one thread), under 1, 4 and 16 concurrent
clients: requests per second and p50/p95 latency of each, and their ratio (the queue and the worker are shared, so
they should match); then the page's time to first paint in headless Chromium (Playwright,
`performance.getEntriesByType('paint')`). The machine's load (/proc/loadavg) is printed beside the figures.

    .venv/bin/python tests/bench_a1111.py [--requests 48] [--paints 7]
"""

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from official import write_folder  # noqa: E402
from test_serve_hostile import LdmServe  # noqa: E402

STEPS, SIZE, SEED = 2, 64, 1
BODIES = {
    "txt2img": ("/sdapi/v1/txt2img", {"prompt": "a lighthouse", "seed": SEED, "steps": STEPS, "width": SIZE,
                                      "height": SIZE, "sampler_name": "Euler", "cfg_scale": 7.5}),
    "score": ("/score", {"input_data": {"data": ["a lighthouse"], "parameters": {
        "num_inference_steps": STEPS, "width": SIZE, "height": SIZE, "seed": SEED, "scheduler": "euler",
        "guidance_scale": 7.5}}}),
}


def load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def one_request(port: int, path: str, body: dict) -> float:
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", path, body=json.dumps(body), headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    response.read()
    conn.close()
    assert response.status == 200, response.status
    return time.perf_counter() - start


def run_clients(port: int, route: str, clients: int, total: int) -> dict:
    """`clients` threads sending `total` requests between them, each waiting for its answer before the next."""
    path, body = BODIES[route]
    latencies, lock = [], threading.Lock()
    left = [total]

    def client():
        while True:
            with lock:
                if left[0] == 0:
                    return
                left[0] -= 1
            seconds = one_request(port, path, body)
            with lock:
                latencies.append(seconds)

    start = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {"rps": total / elapsed, "p50": statistics.median(latencies),
            "p95": latencies[min(len(latencies) - 1, round(0.95 * (len(latencies) - 1)))]}


def first_paint(port: int, times: int) -> dict:
    from playwright.sync_api import sync_playwright

    paints = {"first-paint": [], "first-contentful-paint": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox"])
        for _ in range(times):
            context = browser.new_context()
            page = context.new_page()
            page.goto(f"http://127.0.0.1:{port}/")
            page.wait_for_selector("body[data-ready=true]")
            for entry in page.evaluate("performance.getEntriesByType('paint').map(e => [e.name, e.startTime])"):
                paints[entry[0]].append(entry[1])
            context.close()
        browser.close()
    return {name: statistics.median(values) for name, values in paints.items() if values}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=48, help="requests per route and concurrency")
    parser.add_argument("--paints", type=int, default=7, help="page loads for the first paint")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_folder(Path(tmp) / "tiny-sd1", "sd1")
        server = LdmServe(folder, Path(tmp) / "server.log", "--queue-size", "32", "--max-connections", "64")
        try:
            for route in BODIES:  # warm: the first run of each
                one_request(server.port, *BODIES[route])
            print(f"tiny SD 1.5, {SIZE}x{SIZE}, {STEPS} Euler steps, one ldm serve process (OMP_NUM_THREADS=1), "
                  f"{args.requests} requests per row; load before: {load()}")
            print(f"{'clients':>7} | {'route':>8} | {'req/s':>6} | {'p50 s':>6} | {'p95 s':>6} | load after")
            for clients in (1, 4, 16):
                figures = {}
                for route in BODIES:
                    figures[route] = run_clients(server.port, route, clients, args.requests)
                    f = figures[route]
                    print(f"{clients:>7} | {route:>8} | {f['rps']:6.2f} | {f['p50']:6.3f} | {f['p95']:6.3f} | "
                          f"{load()}", flush=True)
                a, s = figures["txt2img"], figures["score"]
                print(f"{clients:>7} | {'ratio':>8} | {a['rps'] / s['rps']:6.2f} | {a['p50'] / s['p50']:6.2f} | "
                      f"{a['p95'] / s['p95']:6.2f} | (txt2img / score)")
            try:
                paints = first_paint(server.port, args.paints)
                print(f"page first paint (median of {args.paints} loads): " +
                      ", ".join(f"{k} {v:.0f} ms" for k, v in paints.items()) + f"; load {load()}")
            except Exception as e:  # no Chromium or Playwright: said, the API figures stand
                print(f"page first paint not measured: {type(e).__name__}: {e}")
        finally:
            server.close()


if __name__ == "__main__":
    main()
