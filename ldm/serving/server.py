"""`ldm serve`: the scoring schema over HTTP (FastAPI + uvicorn, the optional `serve` extra).

One model, loaded once by one worker thread that owns the device. `POST /score` checks the request
(size, JSON, schema, limits) on the event loop, then puts it in a bounded queue; a full queue answers 503
with `Retry-After` at once instead of letting work pile up. While a request waits or runs, the handler
watches its connection: a client that goes away cancels its job (dropped from the queue, or stopped at the
next denoising step), as does the per-request timeout. `GET /health` is the liveness and readiness probe
(200 once the model is loaded). `/docs` is the OpenAPI page. Every request gets one line on stderr.
"""

import asyncio
import concurrent.futures
import functools
import json
import logging
import queue
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from ldm.errors import LdmError
from ldm.pipelines.images import fetch_url
from ldm.serving.limits import Limits
from ldm.serving.runner import run
from ldm.serving.schema import Request, RequestError, parse

log = logging.getLogger("ldm.serve")


@dataclass(frozen=True)
class ServeConfig:
    limits: Limits = field(default_factory=Limits)
    queue_size: int = 8  # requests waiting for the worker; one more is being run
    max_body_bytes: int = 32 * 1024 * 1024
    timeout_s: float = 600.0  # from arrival to response
    retry_after_s: int = 10
    form: str = "rows"
    batch_size: int = 1  # text-to-image rows of one request run through the networks together
    allow_image_urls: bool = False  # fetch http(s) image cells (at most max_body_bytes each, within the timeout)
    image_url_timeout_s: float = 10.0
    drain_factor: int = 4  # an over-limit body up to this many times the limit is read before the 413

    def fetch(self) -> Callable[[str], bytes] | None:
        """How image URLs are fetched for `parse`, or None where they are refused."""
        if not self.allow_image_urls:
            return None
        return functools.partial(fetch_url, max_bytes=self.max_body_bytes, timeout_s=self.image_url_timeout_s)


def report(line: str) -> None:
    """One line on stderr, where `ldm serve` writes its start line."""
    print(f"ldm: {line}", file=sys.stderr, flush=True)


@dataclass
class Job:
    request: Request | None  # a scoring request; None for other work
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # `work(pipe, cancelled)` in place of the scoring run (the A1111 routes); it stops when `cancelled()` says so
    work: Callable[[object, Callable[[], bool]], object] | None = None


class Worker(threading.Thread):
    """Loads the model, then runs queued jobs one at a time (the only thread that touches the device).

    The queue is bounded by the jobs still waiting: a job cancelled while it waits (its client went away,
    or it timed out) gives its place back at once, not when the worker reaches it."""

    def __init__(self, load: Callable[[], object], queue_size: int, batch_size: int = 1):
        super().__init__(name="ldm-worker", daemon=True)
        self.load, self.queue_size, self.batch_size = load, queue_size, batch_size
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.lock, self.waiting = threading.Lock(), 0
        self.pipe, self.error = None, None
        self.ready = threading.Event()
        self.served = 0

    def submit(self, job: Job) -> bool:
        """Queue `job` unless `queue_size` jobs already wait."""
        with self.lock:
            if self.waiting >= self.queue_size:
                return False
            self.waiting += 1
        # cancelled while it waits, by whoever: its place is free at once (a running job cannot be cancelled)
        job.future.add_done_callback(lambda future: future.cancelled() and self._release())
        self.jobs.put(job)
        return True

    def _release(self) -> None:
        with self.lock:
            self.waiting -= 1

    def cancel(self, job: Job) -> None:
        """Stop `job`: dropped if it still waits, stopped at its next denoising step if it runs."""
        job.cancelled.set()
        job.future.cancel()

    def run(self) -> None:
        try:
            self.pipe = self.load()
        except Exception as e:  # LdmError: a message for the user; anything else (out of memory, a bug) too
            self.error = str(e) if isinstance(e, LdmError) else f"{type(e).__name__}: {e}"
            if isinstance(e, LdmError):
                report(f"loading the model failed: {self.error}")
            else:  # a traceback is worth having
                log.exception("loading the model failed")
            return
        finally:
            self.ready.set()
        while (job := self.jobs.get()) is not None:
            if not job.future.set_running_or_notify_cancel():
                continue  # cancelled while it waited: its place was given back then
            self._release()
            try:
                job.future.set_result(job.work(self.pipe, job.cancelled.is_set) if job.work is not None else
                                      run(self.pipe, job.request, job.cancelled.is_set, self.batch_size))
            except Exception as e:  # delivered to the handler, which answers for it
                job.future.set_exception(e)
            self.served += 1

    def stop(self) -> None:
        self.jobs.put(None)


def error_body(field_name: str, message: str) -> dict:
    return {"error": {"field": field_name, "message": message}}


REQUEST_EXAMPLE = {"input_data": {"columns": ["prompt"], "index": [0], "data": ["a photograph of an astronaut"],
                                  "parameters": {"num_inference_steps": 30, "guidance_scale": 7.5, "seed": 1}}}


def read_request(raw: bytes, config: ServeConfig) -> Request:
    """A body as a parsed request, or a RequestError for anything that is not one."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting, huge integers
        raise RequestError("body", f"not valid JSON ({str(e)[:200]})") from None
    return parse(body, config.limits, config.form, fetch=config.fetch())


class RequestLog:
    """ASGI middleware: one line per request on stderr — method, path, status, rows (a scoring request's, which
    the handler leaves in the request's state), seconds."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status = time.monotonic(), 500  # 500: an exception escaped, and the server answers that

        async def sending(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            rows = scope.get("state", {}).get("rows")
            rows = "" if rows is None else f", {rows} row" + "s" * (rows != 1)
            report(f"{scope['method']} {scope['path']} {status}{rows}, {time.monotonic() - start:.2f} s")


class Refused(Exception):
    """A request answered without a result: the status, the error body, and whether the answer says when to retry
    (`Retry-After`) or closes the connection."""

    def __init__(self, status: int, body: dict, retry: bool = False, close: bool = False):
        super().__init__(status, body)
        self.status, self.body, self.retry, self.close = status, body, retry, close


async def read_body(http, config: ServeConfig) -> bytes:
    """A request's body, at most `config.max_body_bytes`: Refused with 413 for a larger one, 499 when the client
    goes away while sending it.

    An over-limit body is read and dropped (up to `drain` bytes) before the 413: a server that closes its socket on
    unread data makes the kernel reset the connection, and a client still sending (urllib, which sends
    `Connection: close`) then never reads the answer. A client that waits for `100 Continue` has sent nothing yet:
    it is answered at once, as is one whose body is too large to be worth reading."""
    from starlette.requests import ClientDisconnect

    limit, drain = config.max_body_bytes, config.drain_factor * config.max_body_bytes
    declared = http.headers.get("content-length", "")
    declared = int(declared) if declared.isdigit() else None
    if declared is not None and declared > limit and (
            declared > drain or "100-continue" in http.headers.get("expect", "").lower()):
        raise Refused(413, error_body("body", f"{declared} bytes; this server takes at most {limit}"), close=True)
    raw, received = bytearray(), 0
    try:
        async for chunk in http.stream():
            received += len(chunk)
            if received <= limit:
                raw += chunk
            elif received > drain:
                break
    except ClientDisconnect:
        raise Refused(499, error_body("client", "disconnected")) from None
    if received > limit:
        raise Refused(413, error_body("body", f"{declared} bytes; this server takes at most {limit}"
                                      if declared is not None else f"more than this server's {limit} bytes"),
                      close=True)
    return bytes(raw)


async def receive_request(http, config: ServeConfig) -> Request:
    """A request's body read (`read_body`) and parsed; Refused with 400 for one that is not a scoring request."""
    raw = await read_body(http, config)
    try:  # decoding base64 images (and fetching image URLs, where allowed) is work: off the event loop
        return await asyncio.to_thread(read_request, raw, config)
    except RequestError as e:
        raise Refused(400, e.as_dict()) from None


async def queue_and_wait(http, worker: Worker, request: Request | None, config: ServeConfig, start: float,
                         work: Callable | None = None) -> asyncio.Future:
    """Queue the request's job and wait until it is done, watching the connection: a client that goes away (499) or
    a request not done within the timeout from `start` (504) cancels the job. Refused with these, or with 503 while
    the model is not loaded or the queue is full. Returns the done job's future: the response body, or what the
    run raised."""
    if worker.pipe is None:
        if worker.error is not None:
            raise Refused(503, error_body("model", f"the model failed to load: {worker.error}"))
        raise Refused(503, error_body("model", "the model is still loading"), retry=True)
    job = Job(request, work=work)
    if not worker.submit(job):
        raise Refused(503, error_body("queue", f"the queue is full ({config.queue_size} requests waiting); "
                                               "retry later"), retry=True)
    waiting = asyncio.wrap_future(job.future)
    while not waiting.done():
        await asyncio.wait({waiting}, timeout=0.2)
        if waiting.done():
            break
        gone = await http.is_disconnected()
        if gone or time.monotonic() - start > config.timeout_s:
            worker.cancel(job)
            waiting.cancel()  # the worker's Cancelled, if it comes, is then nobody's to report
            if gone:
                log.info("client went away: request cancelled")
                raise Refused(499, error_body("client", "disconnected"))
            raise Refused(504, error_body("timeout", f"not done within {config.timeout_s:g} s"))
    return waiting


def create_app(worker: Worker, config: ServeConfig, model_name: str):
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse

    app = FastAPI(title="ldm", version="0.1.0",
                  description=f"Stable Diffusion ({model_name}) behind the Azure ML model-catalog scoring schema.")
    app.add_middleware(RequestLog)

    def answer(status: int, body, retry: bool = False, close: bool = False) -> JSONResponse:
        headers = ({"Retry-After": str(config.retry_after_s)} if retry else {}) | ({"Connection": "close"} if close
                                                                                     else {})
        return JSONResponse(body, status_code=status, headers=headers or None)

    @app.get("/health", summary="Liveness and readiness: 200 once the model is loaded")
    def health():
        if worker.error is not None:
            return answer(503, {"status": "failed", "model": model_name, "error": worker.error})
        if worker.pipe is None:
            return answer(503, {"status": "loading", "model": model_name}, retry=True)
        return {"status": "ready", "model": model_name, "queued": worker.waiting, "served": worker.served}

    @app.post("/score", summary="Generate images for the rows of a scoring-schema request", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"example": REQUEST_EXAMPLE}}}})
    async def score(http: HttpRequest):
        start = time.monotonic()
        try:
            request = await receive_request(http, config)
            http.state.rows = len(request.rows)
            done = await queue_and_wait(http, worker, request, config, start)
        except Refused as e:
            return answer(e.status, e.body, retry=e.retry, close=e.close)
        try:
            return answer(200, done.result())
        except RequestError as e:
            return answer(400, e.as_dict())
        except LdmError as e:
            return answer(500, error_body("model", str(e)))
        except Exception as e:  # a bug: logged with its traceback, answered without one
            log.exception("scoring failed")
            return answer(500, error_body("server", f"internal error ({type(e).__name__}); see the server log"))

    async def submit(http: HttpRequest, work):
        """Queue `work(pipe, cancelled)` for an A1111 route, as /score queues its rows: its result, or the refusal's
        answer (a client that goes away cancels it, as it cancels its rows)."""
        from fastapi import HTTPException

        try:
            done = await queue_and_wait(http, worker, None, config, time.monotonic(), work)
        except Refused as e:
            raise HTTPException(e.status, e.body["error"]["message"],
                                headers={"Retry-After": str(config.retry_after_s)} if e.retry else None) from None
        try:
            return done.result()
        except LdmError as e:  # a value this model cannot run: A1111 answers such with a 422
            raise HTTPException(422, str(e)) from None

    from ldm.serving.a1111 import Progress, add_routes  # (pydantic and the pipeline: with the app, not at import)

    add_routes(app, submit, lambda: worker.pipe, model_name, Progress())
    return app


def serve(settings, model_name: str, host: str, port: int, config: ServeConfig, log_level: str = "info") -> None:
    """Run the endpoint until interrupted: the model of `settings` (a `ldm.pipelines.setup.RunSettings`) loads in
    the background (`prepare_pipeline`; /health says when it is ready), and is called `model_name` in /health
    and /docs."""
    import uvicorn

    from ldm.pipelines.setup import prepare_pipeline

    worker = Worker(functools.partial(prepare_pipeline, settings), config.queue_size, config.batch_size)
    worker.start()
    try:
        # uvicorn's access log would repeat each request's line (on stdout, without its rows and time)
        uvicorn.run(create_app(worker, config, model_name), host=host, port=port, log_level=log_level,
                    access_log=False)
    finally:
        worker.stop()
