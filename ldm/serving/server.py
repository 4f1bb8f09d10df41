"""`ldm serve`: the scoring schema over HTTP (FastAPI + uvicorn, the optional `serve` extra).

One model, loaded once by one worker thread that owns the device. Every request is first held to what any
client may ask of the server (`Guard`): its Host (`check_host`) and Origin, a JSON body on POST, the body's size
and the time it takes to arrive (and, under `HeaderDeadline`, its headers'), and the memory that bodies being
read hold at once. `POST /score` then takes a place in the bounded queue — a full queue answers 503 with
`Retry-After` at once, before anything is parsed — and is parsed (JSON, schema, limits, images decoded) on a
small pool of its own, off the event loop. While a request waits or runs, the handler watches its connection: a
client that goes away cancels its job (dropped from the queue, or stopped at the next denoising step), as do the
per-request timeout and, past `--graceful-timeout`, the server's shutdown (503). `GET /health` is the liveness
and readiness probe (200 once the model is loaded). `/docs` is the OpenAPI page. Every request gets one line on
stderr. With `api_auth` (`--api-auth`, as A1111's) every route but `/health` asks for HTTP Basic credentials.
"""

import asyncio
import base64
import concurrent.futures
import contextlib
import errno
import functools
import hmac
import ipaddress
import json
import logging
import queue
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import InputError, LdmError
from ldm.pipelines.images import fetch_url
from ldm.serving.limits import Limits
from ldm.serving.runner import run
from ldm.serving.schema import Request, RequestError, image_urls, parse

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
    allow_private_urls: bool = False  # fetch from loopback, private and link-local addresses too
    fetch_threads: int = 4  # image URLs fetched at once (a pool of their own: slow hosts hold only it)
    drain_factor: int = 4  # an over-limit body up to this many times the limit is read before the 413
    # slow and many clients: connections served at once (more get 503), the request line and headers within
    # header_timeout_s, the body within read_timeout_s (408 beyond); bodies being read hold at most
    # reading_factor × max_body_bytes at once (503 beyond); scoring bodies parsed by parse_threads at once
    max_connections: int = 32
    header_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    reading_factor: int = 4
    parse_threads: int = 2
    graceful_timeout_s: float = 30.0  # on SIGTERM: what is not done by then is cancelled and answered 503
    # where requests may come from: Host names beyond IP addresses and localhost (with `check_host`), and the
    # origins of web pages allowed to call the server (CORS); "*" allows any
    allowed_hosts: tuple[str, ...] = ()
    cors_allow_origins: tuple[str, ...] = ()
    # HTTP Basic (user, password) pairs asked of every route but /health (A1111's --api-auth); none: no auth
    api_auth: tuple[tuple[str, str], ...] = ()
    preview_vae: str | None = None  # a TAESD decoding the A1111 `progress` live preview (None: A1111's cheap one)

    def fetch(self) -> Callable[[str], bytes] | None:
        """How image URLs are fetched for `parse`, or None where they are refused."""
        if not self.allow_image_urls:
            return None
        return functools.partial(fetch_url, max_bytes=self.max_body_bytes, timeout_s=self.image_url_timeout_s,
                                 allow_private=self.allow_private_urls)


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

    def reserve(self) -> bool:
        """Take a place in the queue, unless `queue_size` jobs already wait (or hold places): a request takes its
        place before it is parsed, so that a full queue refuses it at once."""
        with self.lock:
            if self.waiting >= self.queue_size:
                return False
            self.waiting += 1
            return True

    def release(self) -> None:
        """Give a place back (a request refused while parsing, or a job that left the queue)."""
        with self.lock:
            self.waiting -= 1

    def submit(self, job: Job) -> None:
        """Queue `job` in the place `reserve` took for it."""
        # cancelled while it waits, by whoever: its place is free at once (a running job cannot be cancelled)
        job.future.add_done_callback(lambda future: future.cancelled() and self.release())
        self.jobs.put(job)

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
            self.release()
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


def decode_json(raw: bytes):
    """A body's JSON, or a RequestError."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, absurd nesting, huge integers
        raise RequestError("body", f"not valid JSON ({str(e)[:200]})") from None


async def fetch_images(body, config: ServeConfig, fetching: concurrent.futures.Executor) -> Callable[[str], bytes]:
    """The image URLs of a body fetched at once on the `fetching` pool (its own, so that slow hosts hold only it),
    all within the fetch timeout from now (a fetch still waiting for the pool then is dropped): as the `fetch` that
    `parse` calls, which hands over each URL's bytes or raises its InputError."""
    loop = asyncio.get_running_loop()
    fetch = config.fetch()
    pending = {url: loop.run_in_executor(fetching, fetch, url) for url in image_urls(body, config.limits)}
    deadline = time.monotonic() + config.image_url_timeout_s + 1  # (fetch_url keeps its own; DNS is outside it)
    fetched: dict[str, bytes | InputError] = {}
    for url, future in pending.items():
        try:
            fetched[url] = await asyncio.wait_for(future, max(deadline - time.monotonic(), 0))
        except InputError as e:
            fetched[url] = e
        except asyncio.TimeoutError:
            fetched[url] = InputError(f"{url.strip()[:200]}: not fetched within {config.image_url_timeout_s:g} s")

    def handed_over(url: str) -> bytes:
        got = fetched.get(url, InputError(f"{url.strip()[:200]}: not fetched"))
        if isinstance(got, InputError):
            raise got
        return got

    return handed_over


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
    """A request answered without a result: the status, the error body, whether the answer says when to retry
    (`Retry-After`) or closes the connection, and other headers of the answer."""

    def __init__(self, status: int, body: dict, retry: bool = False, close: bool = False,
                 headers: dict | None = None):
        super().__init__(status, body)
        self.status, self.body, self.retry, self.close = status, body, retry, close
        self.headers = headers or {}


# ---------------------------------------------------------------------------------- what every request is held to


def host_name(host: str) -> str:
    """The name of a Host header, without its port (`[::1]:8080` → `::1`), in lower case."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    name, colon, port = host.rpartition(":")
    return name.rstrip(".") if colon and port.isdigit() and ":" not in name else host.rstrip(".")


def is_ip_address(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def is_loopback(host: str) -> bool:
    """Whether an address to listen on is reachable from this machine only: 127.x, ::1 or localhost (a name that
    resolves elsewhere, 0.0.0.0 or :: are not)."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def authorized(header: str | None, credentials: tuple[tuple[str, str], ...]) -> bool:
    """Whether an Authorization header gives HTTP Basic credentials among `credentials`: each pair compared in
    constant time (`hmac.compare_digest`), all of them whatever matched, so that the time says nothing of which."""
    scheme, _, token = (header or "").strip().partition(" ")
    try:
        raw = base64.b64decode(token.strip(), validate=True)
    except ValueError:
        return False
    try:  # UTF-8 (RFC 7617's charset, which the challenge names), else Latin-1 (what `requests` sends)
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError:
        decoded = raw.decode("latin-1")
    user, colon, password = decoded.partition(":")
    found = False
    for known_user, known_password in credentials:
        found |= hmac.compare_digest(user.encode(), known_user.encode()) & \
            hmac.compare_digest(password.encode(), known_password.encode())
    return found and scheme.lower() == "basic" and bool(colon)


class Guard:
    """ASGI middleware: what every route is held to before it runs, for any client that can reach the server.

    - Host (with `check_host`): an IP address, `localhost`, or a name of `config.allowed_hosts` — a web page that
      has a name of its own resolve to 127.0.0.1 (DNS rebinding) is refused (400).
    - Credentials (with `config.api_auth`): HTTP Basic on every route but `/health` (the probe) and CORS preflights
      (which browsers send without them); 401 with `WWW-Authenticate: Basic` without them or with wrong ones.
    - Origin: a browser names the page that makes a request. A request that changes something (not GET or HEAD)
      from a page of another origin than the server's own is refused (403) unless `config.cors_allow_origins` names
      it; those get CORS headers, and their preflight (OPTIONS) is answered. A page can send a POST without a
      preflight only as text/plain or a form, which the next check refuses.
    - A body (POST) must be `application/json` (415), at most `max_body_bytes` (413), all there within
      `read_timeout_s` (408), and the bodies being read at once hold at most `reading_factor × max_body_bytes`
      (503, Retry-After). The body is read here, whole, and handed to the route as one message.

    The body of a refused request is read and dropped (up to `drain_factor × max_body_bytes`) before the answer: a
    server that
    closes its socket on unread data makes the kernel reset the connection, and a client still sending (urllib,
    which sends `Connection: close`) then never reads the answer. A client that waits for `100 Continue` has sent
    nothing yet: it is answered at once, as is one whose body is too large to be worth reading."""

    def __init__(self, app, config: ServeConfig, check_host: bool = False):
        self.app, self.config, self.check_host = app, config, check_host
        self.hosts = {h.lower() for h in config.allowed_hosts}
        self.origins = {o.lower().rstrip("/") for o in config.cors_allow_origins}
        self.reading = 0  # bytes held by the bodies being read now

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        from starlette.datastructures import Headers

        headers = Headers(scope=scope)
        origin = headers.get("origin")
        try:
            refusal = self.refusal(scope, headers, origin)
            if scope["method"] in ("POST", "PUT", "PATCH", "DELETE"):
                receive = await self.read_body(headers, receive, refusal)
            elif refusal is not None:
                raise refusal
            if scope["method"] == "OPTIONS" and origin is not None and "access-control-request-method" in headers:
                return await self.answer(scope, receive, send, 204, None, self.cors_headers(origin, preflight=True))
        except Refused as e:
            extra = ({"Retry-After": str(self.config.retry_after_s)} if e.retry else {}) | e.headers
            return await self.answer(scope, receive, send, e.status, e.body,
                                     extra | ({"Connection": "close"} if e.close else {}))
        cors = self.cors_headers(origin) if origin is not None else {}

        async def sending(message):
            if message["type"] == "http.response.start" and cors:
                message = message | {"headers": list(message.get("headers", [])) +
                                     [(k.lower().encode(), v.encode()) for k, v in cors.items()]}
            await send(message)

        await self.app(scope, receive, sending)

    async def answer(self, scope, receive, send, status: int, body: dict | None, headers: dict) -> None:
        from starlette.responses import JSONResponse, Response

        response = Response(status_code=status, headers=headers) if body is None else \
            JSONResponse(body, status_code=status, headers=headers)
        await response(scope, receive, send)

    def refusal(self, scope, headers, origin: str | None) -> Refused | None:
        """The answer to a Host name nobody allowed (with `check_host`), or to a request from another origin's page
        (None: neither)."""
        host = headers.get("host")
        if self.check_host and host is not None:
            name = host_name(host)
            if not (is_ip_address(name) or name == "localhost" or name in self.hosts or "*" in self.hosts):
                return Refused(400, error_body("Host", f"{host[:100]!r} is not a name of this server: give its "
                                                       "address, or start it with --allowed-hosts NAME"), close=True)
        if self.config.api_auth and scope["method"] != "OPTIONS" and scope["path"] != "/health" and \
                not authorized(headers.get("authorization"), self.config.api_auth):
            return Refused(401, error_body("Authorization", "missing or wrong credentials: this server takes HTTP "
                                                            "Basic authentication"),
                           headers={"WWW-Authenticate": 'Basic realm="ldm", charset="UTF-8"'})
        if origin is None or scope["method"] in ("GET", "HEAD") or self.allows(origin):
            return None
        if host is not None and origin.lower().partition("://")[2] == host.strip().lower():
            return None  # the server's own page (/docs)
        return Refused(403, error_body("Origin", f"requests from the page of {origin[:100]!r} are refused: start the "
                                                 "server with --cors-allow-origins ORIGIN to allow its pages"),
                       close=True)

    def allows(self, origin: str) -> bool:
        return "*" in self.origins or origin.lower().rstrip("/") in self.origins

    def cors_headers(self, origin: str, preflight: bool = False) -> dict:
        if not self.allows(origin):
            return {}
        headers = {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}
        if preflight:
            headers |= {"Access-Control-Allow-Methods": "GET, POST",
                        "Access-Control-Allow-Headers": "Content-Type, Authorization", "Access-Control-Max-Age": "600"}
        return headers

    async def read_body(self, headers, receive, refusal: Refused | None = None):
        """The body read whole within the limits (Refused otherwise), as a `receive` that hands it over in one
        message and then passes on what the connection says (a disconnect). With a `refusal` already decided, the
        body is read and dropped, and that is raised."""
        limit = self.config.max_body_bytes
        declared, refusal = self.refusal_by_headers(headers, refusal)
        raw, received, refusal = await self.receive_body(receive, refusal)
        if refusal is not None:
            raise refusal
        if received > limit:
            raise Refused(413, error_body("body", f"{declared} bytes; this server takes at most {limit}"
                                          if declared is not None else f"more than this server's {limit} bytes"),
                          close=True)
        body = [b"".join(raw)]
        del raw

        async def replay():
            if body:
                return {"type": "http.request", "body": body.pop(), "more_body": False}
            return await receive()

        return replay

    def refusal_by_headers(self, headers, refusal: Refused | None) -> tuple[int | None, Refused | None]:
        """(the declared length, the refusal so far) from the headers alone: raised where nothing needs reading — a
        body too large to be worth draining or not sent before an answer (`Expect: 100-continue`), or no body."""
        limit, drain = self.config.max_body_bytes, self.config.drain_factor * self.config.max_body_bytes
        declared = headers.get("content-length", "")
        declared = int(declared) if declared.isdigit() else None
        waiting = "100-continue" in headers.get("expect", "").lower()  # it sends nothing before an answer
        if declared is not None and declared > limit and (declared > drain or waiting):
            raise Refused(413, error_body("body", f"{declared} bytes; this server takes at most {limit}"), close=True)
        media = headers.get("content-type", "").partition(";")[0].strip().lower()
        has_body = bool(declared) or "transfer-encoding" in headers
        if refusal is None and media != "application/json" and has_body:
            refusal = Refused(415, error_body("Content-Type", f"expected application/json, got {media[:100]!r}"
                                              if media else "missing: send the body as application/json"),
                              close=True)
        if refusal is not None and (waiting or not has_body):
            raise refusal
        return declared, refusal

    async def receive_body(self, receive, refusal: Refused | None) -> tuple[list[bytes], int, Refused | None]:
        """(the chunks kept, the bytes received, the refusal): the body's messages until the last, the deadline, or
        `drain_factor × max_body_bytes` dropped. Kept are the chunks within `max_body_bytes` while nothing refuses
        the request; they count in `self.reading` while it reads (past `reading_factor × max_body_bytes` of all the
        bodies being read, a 503: what it held is let go, the rest dropped)."""
        config = self.config
        limit, drain = config.max_body_bytes, config.drain_factor * config.max_body_bytes
        raw, received, held = [], 0, 0
        deadline = time.monotonic() + config.read_timeout_s
        try:
            while True:
                left = deadline - time.monotonic()
                try:
                    message = await asyncio.wait_for(receive(), left) if left > 0 else None
                except asyncio.TimeoutError:
                    message = None
                if message is None:  # (a refused body need not arrive whole: the refusal is the answer)
                    raise refusal or Refused(408, error_body("body", f"not received within {config.read_timeout_s:g} "
                                                                     "s"), close=True)
                if message["type"] == "http.disconnect":
                    raise Refused(499, error_body("client", "disconnected"))
                chunk = message.get("body", b"")
                received += len(chunk)
                if refusal is None and self.reading + len(chunk) > config.reading_factor * limit:
                    refusal = Refused(503, error_body("body", "the server is reading as many request bodies as it "
                                                              "holds at once; retry later"), retry=True, close=True)
                    raw, held, self.reading = [], 0, self.reading - held  # (the rest is read and dropped)
                if refusal is None and received <= limit:
                    raw.append(chunk)
                    held += len(chunk)
                    self.reading += len(chunk)
                elif received > drain:
                    break
                if not message.get("more_body", False):
                    break
        finally:
            self.reading -= held
        return raw, received, refusal


def header_deadline(timeout_s: float):
    """uvicorn's h11 protocol with a deadline for each request's line and headers, which uvicorn lacks (a client
    that sends them a byte at a time holds its connection for ever): they must be complete within `timeout_s` of
    the connection opening, or of the first byte of the next request on a kept-alive connection; then the
    connection is answered 408 and closed."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class HeaderDeadline(H11Protocol):
        deadline = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self.deadline = self.loop.call_later(timeout_s, self.expire)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # the head is in: the route's own limits take over
                self.disarm()
            elif self.deadline is None:  # the first bytes of another request
                self.deadline = self.loop.call_later(timeout_s, self.expire)

        def connection_lost(self, exc) -> None:
            self.disarm()
            super().connection_lost(exc)

        def disarm(self) -> None:
            if self.deadline is not None:
                self.deadline.cancel()
                self.deadline = None

        def expire(self) -> None:
            self.deadline = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                self.transport.close()

    return HeaderDeadline


# ----------------------------------------------------------------------------------------------- the routes


async def queue_and_wait(http, worker: Worker, job: Job, config: ServeConfig, start: float) -> asyncio.Future:
    """Queue the job in the place reserved for it and wait until it is done, watching the connection: a client
    that goes away (499) or a request not done within the timeout from `start` (504) cancels the job, as does the
    server's shutdown past its graceful timeout (503). Returns the done job's future: the response body, or what
    the run raised."""
    worker.submit(job)
    waiting = asyncio.wrap_future(job.future)
    try:
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
    except asyncio.CancelledError:  # uvicorn's shutdown, its graceful timeout over: the job is dropped or stopped
        worker.cancel(job)
        waiting.cancel()
        raise Refused(503, error_body("server", "the server is shutting down"), retry=True, close=True) from None
    return waiting


async def parse_request(http, config: ServeConfig, parsing: concurrent.futures.Executor,
                        fetching: concurrent.futures.Executor) -> Request:
    """The body (the guard read it) decoded and parsed on the `parsing` pool, off the event loop (decoding base64
    images is work), its image URLs fetched first where they are allowed (`fetch_images`). Refused with 400 for a
    body that is not a scoring request."""
    raw = b"".join([chunk async for chunk in http.stream()])  # (`http.body()` would keep it for the whole request)
    loop = asyncio.get_running_loop()
    try:
        body = await loop.run_in_executor(parsing, decode_json, raw)
        del raw
        fetch = await fetch_images(body, config, fetching) if config.allow_image_urls else None
        return await loop.run_in_executor(parsing, functools.partial(parse, body, config.limits, config.form,
                                                                     fetch=fetch))
    except RequestError as e:
        raise Refused(400, e.as_dict()) from None
    except asyncio.CancelledError:  # the server's shutdown
        raise Refused(503, error_body("server", "the server is shutting down"), close=True) from None


def take_place(worker: Worker, config: ServeConfig) -> None:
    """A place in the queue for a request about to be parsed; Refused with 503 while the model is not loaded or the
    queue is full."""
    if worker.pipe is None:
        if worker.error is not None:
            raise Refused(503, error_body("model", f"the model failed to load: {worker.error}"))
        raise Refused(503, error_body("model", "the model is still loading"), retry=True)
    if not worker.reserve():
        raise Refused(503, error_body("queue", f"the queue is full ({config.queue_size} requests waiting); "
                                               "retry later"), retry=True)


def create_app(worker: Worker, config: ServeConfig, model_name: str, check_host: bool = False):
    """The FastAPI app of the server. `check_host`: refuse Host names other than IP addresses, localhost and
    `config.allowed_hosts` (`serve` does; an app mounted behind something that routes by names of its own need not)."""
    from fastapi import FastAPI

    parsing = concurrent.futures.ThreadPoolExecutor(config.parse_threads, thread_name_prefix="ldm-parse")
    fetching = concurrent.futures.ThreadPoolExecutor(config.fetch_threads, thread_name_prefix="ldm-fetch")

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        for pool in (parsing, fetching):
            pool.shutdown(wait=False, cancel_futures=True)

    shown = Path(model_name).name if Path(model_name).exists() else model_name  # (an answer names no path)
    app = FastAPI(title="ldm", version="0.1.0", lifespan=lifespan,
                  description=f"Stable Diffusion ({shown}) behind the Azure ML model-catalog scoring schema.")
    app.add_middleware(Guard, config=config, check_host=check_host)
    app.add_middleware(RequestLog)  # (the outermost: it logs the guard's refusals too)
    add_scoring_routes(app, worker, config, shown, parsing, fetching)

    from ldm.serving.a1111 import Progress, add_routes  # (pydantic and the pipeline: with the app, not at import)

    add_routes(app, submitter(worker, config), lambda: worker.pipe, model_name,
               Progress(preview_vae=config.preview_vae), config.limits)
    return app


def add_scoring_routes(app, worker: Worker, config: ServeConfig, model_name: str, parsing, fetching) -> None:
    """`/health` and `/score`: the request parsed on the `parsing` pool (its image URLs fetched on `fetching`) after
    its place in the queue is taken, its rows run by the worker."""
    from fastapi import Request as HttpRequest
    from fastapi.responses import JSONResponse

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
            take_place(worker, config)
            try:
                request = await parse_request(http, config, parsing, fetching)
            except BaseException:
                worker.release()
                raise
            http.state.rows = len(request.rows)
            done = await queue_and_wait(http, worker, Job(request), config, start)
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


def submitter(worker: Worker, config: ServeConfig):
    """The A1111 routes' `submit(http, work)`: `work(pipe, cancelled)` queued as /score queues its rows; its result,
    or the refusal's answer (a client that goes away cancels it, as it cancels its rows)."""

    async def submit(http, work):
        from fastapi import HTTPException

        try:
            take_place(worker, config)
            done = await queue_and_wait(http, worker, Job(None, work=work), config, time.monotonic())
        except Refused as e:
            raise HTTPException(e.status, e.body["error"]["message"],
                                headers={"Retry-After": str(config.retry_after_s)} if e.retry else None) from None
        try:
            return done.result()
        except LdmError as e:  # a value this model cannot run: A1111 answers such with a 422
            raise HTTPException(422, str(e)) from None

    return submit


def check_port(host: str, port: int) -> None:
    """Whether the server can listen on `host`:`port`, bound and let go as uvicorn binds it (SO_REUSEADDR, IPv6 for
    an address with a colon), before the model loads: a port already in use is one line (an LdmError), not
    uvicorn's errno and an abort while the model is loading."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host.strip("[]"), port))
        except OSError as e:
            why = {errno.EADDRINUSE: "is already in use (another server listens on it): stop that one, or give "
                                     "--port with another port",
                   errno.EACCES: "is not open to this user (ports below 1024 need privileges): give --port 1024 or "
                                 "more",
                   errno.EADDRNOTAVAIL: "is not an address of this machine"}.get(e.errno, f"cannot be listened on "
                                                                                   f"({e.strerror})")
            where = f"address {host}" if e.errno == errno.EADDRNOTAVAIL else f"port {port} on {host}"
            raise LdmError(f"{where} {why}") from None
        except (OverflowError, UnicodeError) as e:
            raise LdmError(f"--host {host} --port {port}: cannot be listened on ({e})") from None


def serve(settings, model_name: str, host: str, port: int, config: ServeConfig, log_level: str = "info") -> None:
    """Run the endpoint until interrupted: the model of `settings` (a `ldm.pipelines.setup.RunSettings`) loads in
    the background (`prepare_pipeline`; /health says when it is ready), and is called `model_name` in /health
    and /docs. On SIGTERM or Ctrl-C the server stops taking connections and drains what it has for at most
    `config.graceful_timeout_s`; what is left then is cancelled and answered 503. A port that another server took
    since `check_port` (uvicorn then logs its errno and exits) is an LdmError."""
    import uvicorn

    from ldm.pipelines.setup import prepare_pipeline

    worker = Worker(functools.partial(prepare_pipeline, settings), config.queue_size, config.batch_size)
    worker.start()
    try:
        # uvicorn's access log would repeat each request's line (on stdout, without its rows and time)
        uvicorn.run(create_app(worker, config, model_name, check_host=True), host=host, port=port,
                    log_level=log_level, access_log=False, http=header_deadline(config.header_timeout_s),
                    limit_concurrency=config.max_connections, timeout_keep_alive=5,
                    timeout_graceful_shutdown=config.graceful_timeout_s, h11_max_incomplete_event_size=16 * 1024)
    except SystemExit:  # (uvicorn's startup failed: it could not bind) — the worker let finish loading, since a
        worker.stop()     # process that exits while torch loads in another thread aborts (SIGABRT)
        worker.join()
        raise LdmError(f"port {port} on {host} could not be listened on (taken since ldm serve checked it?)") from None
    finally:
        worker.stop()
