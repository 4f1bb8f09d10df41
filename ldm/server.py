"""`ldm serve`: the scoring schema over HTTP (FastAPI + uvicorn, the optional `serve` extra).

One model, loaded once by one worker thread that owns the device. `POST /score` checks the request
(size, JSON, schema, limits) on the event loop, then puts it in a bounded queue; a full queue answers 503
with `Retry-After` at once instead of letting work pile up. While a request waits or runs, the handler
watches its connection: a client that goes away cancels its job (dropped from the queue, or stopped at the
next denoising step), as does the per-request timeout. `GET /health` is the liveness and readiness probe
(200 once the model is loaded). `/docs` is the OpenAPI page.
"""

import asyncio
import concurrent.futures
import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import LdmError
from .scoring import Cancelled, Limits, Request, RequestError, parse, run

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


@dataclass
class Job:
    request: Request
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Worker(threading.Thread):
    """Loads the model, then runs queued jobs one at a time (the only thread that touches the device)."""

    def __init__(self, load: Callable[[], object], queue_size: int, batch_size: int = 1):
        super().__init__(name="ldm-worker", daemon=True)
        self.load, self.jobs, self.batch_size = load, queue.Queue(maxsize=queue_size), batch_size
        self.pipe, self.error = None, None
        self.ready = threading.Event()
        self.served = 0

    def run(self) -> None:
        try:
            self.pipe = self.load()
        except LdmError as e:
            self.error = str(e)
            log.error("loading the model failed: %s", e)
            return
        finally:
            self.ready.set()
        while (job := self.jobs.get()) is not None:
            if job.cancelled.is_set() or not job.future.set_running_or_notify_cancel():
                continue  # its client went away (or timed out) while it waited
            try:
                job.future.set_result(run(self.pipe, job.request, job.cancelled.is_set, self.batch_size))
            except Exception as e:  # delivered to the handler, which answers for it
                job.future.set_exception(e)
            self.served += 1

    def stop(self) -> None:
        self.jobs.put(None)


def error_body(field_name: str, message: str) -> dict:
    return {"error": {"field": field_name, "message": message}}


REQUEST_EXAMPLE = {"input_data": {"columns": ["prompt"], "index": [0], "data": ["a photograph of an astronaut"],
                                  "parameters": {"num_inference_steps": 30, "guidance_scale": 7.5, "seed": 1}}}


def create_app(worker: Worker, config: ServeConfig, model_name: str):
    from fastapi import FastAPI
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse

    app = FastAPI(title="ldm", version="0.1.0",
                  description=f"Stable Diffusion ({model_name}) behind the Azure ML model-catalog scoring schema.")

    def answer(status: int, body, retry: bool = False) -> JSONResponse:
        headers = {"Retry-After": str(config.retry_after_s)} if retry else None
        return JSONResponse(body, status_code=status, headers=headers)

    @app.get("/health", summary="Liveness and readiness: 200 once the model is loaded")
    def health():
        if worker.error is not None:
            return answer(503, {"status": "failed", "model": model_name, "error": worker.error})
        if worker.pipe is None:
            return answer(503, {"status": "loading", "model": model_name}, retry=True)
        return {"status": "ready", "model": model_name, "queued": worker.jobs.qsize(), "served": worker.served}

    @app.post("/score", summary="Generate images for the rows of a scoring-schema request", openapi_extra={
        "requestBody": {"required": True, "content": {"application/json": {"example": REQUEST_EXAMPLE}}}})
    async def score(http: HttpRequest):
        start = time.monotonic()
        declared = http.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > config.max_body_bytes:
            return answer(413, error_body("body", f"{declared} bytes; this server takes at most "
                                                  f"{config.max_body_bytes}"))
        raw = bytearray()
        async for chunk in http.stream():
            raw += chunk
            if len(raw) > config.max_body_bytes:
                return answer(413, error_body("body", f"more than this server's {config.max_body_bytes} bytes"))
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return answer(400, error_body("body", f"not valid JSON ({e})"))
        try:
            request = parse(body, config.limits, config.form)
        except RequestError as e:
            return answer(400, e.as_dict())
        if worker.pipe is None:
            if worker.error is not None:
                return answer(503, error_body("model", f"the model failed to load: {worker.error}"))
            return answer(503, error_body("model", "the model is still loading"), retry=True)
        job = Job(request)
        try:
            worker.jobs.put_nowait(job)
        except queue.Full:
            return answer(503, error_body("queue", f"the queue is full ({config.queue_size} requests waiting); "
                                                   "retry later"), retry=True)
        waiting = asyncio.wrap_future(job.future)
        while not waiting.done():
            await asyncio.wait({waiting}, timeout=0.2)
            if waiting.done():
                break
            if await http.is_disconnected():
                job.cancelled.set()
                job.future.cancel()
                log.info("client went away: request cancelled")
                return answer(499, error_body("client", "disconnected"))
            if time.monotonic() - start > config.timeout_s:
                job.cancelled.set()
                job.future.cancel()
                return answer(504, error_body("timeout", f"not done within {config.timeout_s:g} s"))
        try:
            return answer(200, waiting.result())
        except (Cancelled, asyncio.CancelledError):
            return answer(504, error_body("timeout", f"not done within {config.timeout_s:g} s"))
        except RequestError as e:
            return answer(400, e.as_dict())
        except LdmError as e:
            return answer(500, error_body("model", str(e)))
        except Exception as e:  # a bug: logged with its traceback, answered without one
            log.exception("scoring failed")
            return answer(500, error_body("server", f"internal error ({type(e).__name__}); see the server log"))

    return app


def serve(load: Callable[[], object], model_name: str, host: str, port: int, config: ServeConfig,
          log_level: str = "info") -> None:
    """Run the endpoint until interrupted (the model loads in the background; /health says when it is ready)."""
    import uvicorn

    worker = Worker(load, config.queue_size, config.batch_size)
    worker.start()
    try:
        uvicorn.run(create_app(worker, config, model_name), host=host, port=port, log_level=log_level)
    finally:
        worker.stop()
