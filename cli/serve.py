"""`ldm serve`: the scoring schema over HTTP (`ldm.serving.server`), one model loaded once."""

import argparse
import sys

from ldm.errors import LdmError
from ldm_cli.options import add_limit_options, add_model_options, run_settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `serve` on the `ldm` command's subparsers."""
    srv = subparsers.add_parser(
        "serve", help="serve the scoring schema over HTTP (POST /score, GET /health, /docs)",
        description="A real-time endpoint speaking the Azure ML model-catalog scoring schema (README: 'Serving'). "
                    "One model, loaded once; requests wait in a bounded queue for the one worker that owns the "
                    "device; a full queue answers 503 with Retry-After. Needs the serve extra "
                    "(pip install -e '.[serve]').")
    add_model_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8080, help="TCP port to listen on (default: %(default)s)")
    add_limit_options(srv)
    srv.add_argument("--queue-size", type=int, default=8,
                     help="requests that may wait for the worker; more get 503 (default: %(default)s)")
    srv.add_argument("--batch-size", type=int, default=None,
                     help="images of a request's text-to-image rows that run through the networks together "
                          "(default: 4 on CUDA, where batching raises throughput; 1 on the CPU, where it does not)")
    srv.add_argument("--max-body-mb", type=float, default=32, help="largest request body (default: %(default)s)")
    srv.add_argument("--allow-image-urls", action="store_true",
                     help="fetch image and mask cells given as http(s) URLs (each at most --max-body-mb, within "
                          "--image-url-timeout, from public addresses only); without it such a row is refused")
    srv.add_argument("--image-url-timeout", type=float, default=10,
                     help="seconds to fetch an image URL, redirects included (default: %(default)s)")
    srv.add_argument("--allow-private-urls", action="store_true",
                     help="with --allow-image-urls: fetch from loopback, private and link-local addresses too (the "
                          "server's own network: only where every client may reach it)")
    srv.add_argument("--timeout", type=float, default=600,
                     help="seconds a request may wait and run before it is cancelled with 504 (default: %(default)s)")
    guard = srv.add_argument_group("where others can reach it", "README: 'Running it where others can reach it'")
    guard.add_argument("--allowed-hosts", nargs="+", default=(), metavar="NAME",
                       help="Host names the server answers besides its IP addresses and localhost (the name a proxy "
                            "or your network gives it; * for any); others are refused, as DNS rebinding uses them")
    guard.add_argument("--cors-allow-origins", nargs="+", default=(), metavar="ORIGIN",
                       help="origins (https://app.example) of web pages that may call the server (* for any); "
                            "requests from the pages of others are refused")
    guard.add_argument("--api-auth", default=None, metavar="USER:PASS[,USER:PASS]",
                       help="HTTP Basic credentials asked of every route but /health (A1111's --api-auth): the page, "
                            "/score and /sdapi/v1; needed to listen on an address other machines reach")
    guard.add_argument("--insecure-no-auth", action="store_true",
                       help="listen on an address other machines reach (--host 0.0.0.0) without --api-auth: anyone "
                            "who reaches it can use it")
    srv.add_argument("--preview-vae", default=None, metavar="TAESD",
                     help="decode the live preview of /sdapi/v1/progress with this TAESD (an AutoencoderTiny folder, "
                          "or taesd_decoder.safetensors; taesdxl for SDXL); default: A1111's cheap approximation")
    guard.add_argument("--max-connections", type=int, default=32,
                       help="connections served at once; requests beyond them get 503 (default: %(default)s)")
    guard.add_argument("--header-timeout", type=float, default=10,
                       help="seconds a client has to send a request's line and headers (default: %(default)s)")
    guard.add_argument("--read-timeout", type=float, default=60,
                       help="seconds a client has to send a request's body; 408 beyond (default: %(default)s)")
    guard.add_argument("--graceful-timeout", type=float, default=30,
                       help="on SIGTERM or Ctrl-C, seconds to finish running and queued requests; the rest are "
                            "cancelled and answered 503 (default: %(default)s)")
    return srv


def run(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LdmError("ldm serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    from ldm.pipelines.setup import check_models
    from ldm.serving import server

    credentials = api_credentials(args.api_auth)
    if not server.is_loopback(args.host) and not credentials and not args.insecure_no_auth:
        raise LdmError(f"--host {args.host} is reachable from other machines: give --api-auth USER:PASS (HTTP Basic "
                       "on every route), or --insecure-no-auth to serve it to anyone who reaches it")
    config = serve_config(args, credentials)
    server.check_port(args.host, args.port)  # a port in use is said now, before the model loads (exit 2)
    settings = run_settings(args)
    check_models(settings)  # a model that cannot be found or read is the user's error, said now (exit 2)
    print(f"ldm: serving {args.model} on http://{args.host}:{args.port} (POST /score, /sdapi/v1, the page at /, GET "
          f"/health, /docs){'' if not credentials else ', HTTP Basic asked'}; loading the model…", file=sys.stderr)
    server.serve(settings, args.model, args.host, args.port, config)


def api_credentials(value: str | None) -> tuple[tuple[str, str], ...]:
    """`--api-auth USER:PASS[,USER:PASS]` as (user, password) pairs (a password may hold colons: the user name ends
    at the first); a malformed value is an LdmError that repeats no password."""
    if value is None:
        return ()
    pairs = []
    for n, entry in enumerate(value.split(","), 1):
        user, colon, password = entry.partition(":")
        if not colon or not user.strip() or not password:
            raise LdmError(f"--api-auth: credential {n} is not USER:PASSWORD (expected USER:PASS[,USER2:PASS2], "
                           "each with a user name and a password)")
        pairs.append((user.strip(), password))
    return tuple(pairs)


def serve_config(args: argparse.Namespace, credentials: tuple[tuple[str, str], ...] = ()):
    """The server's limits, queue, batch size, body size and timeout, checked (`credentials`: `--api-auth`'s)."""
    from ldm.serving.limits import Limits
    from ldm.serving.server import ServeConfig

    for name in ("max_rows", "max_steps", "max_pixels", "max_images", "queue_size", "port"):
        if getattr(args, name) < 1:
            raise LdmError(f"--{name.replace('_', '-')} must be at least 1")
    import torch

    batch_size = args.batch_size
    if batch_size is None:
        batch_size = 4 if args.device != "cpu" and torch.cuda.is_available() else 1
    if batch_size < 1 or args.timeout <= 0 or args.max_body_mb <= 0:
        raise LdmError("--batch-size must be at least 1, --timeout and --max-body-mb above 0")
    if args.max_connections < 1 or min(args.header_timeout, args.read_timeout, args.image_url_timeout) <= 0 or \
            args.graceful_timeout < 0:
        raise LdmError("--max-connections must be at least 1, --header-timeout, --read-timeout and "
                       "--image-url-timeout above 0, --graceful-timeout 0 or more")
    if args.preview_vae is not None:
        check_preview_vae(args.preview_vae)
    return ServeConfig(Limits(args.max_rows, args.max_steps, args.max_pixels, args.max_images), args.queue_size,
                       int(args.max_body_mb * 1024 * 1024), args.timeout, form=args.response_format,
                       batch_size=batch_size, allow_image_urls=args.allow_image_urls,
                       image_url_timeout_s=args.image_url_timeout, allow_private_urls=args.allow_private_urls,
                       max_connections=args.max_connections, header_timeout_s=args.header_timeout,
                       read_timeout_s=args.read_timeout, graceful_timeout_s=args.graceful_timeout,
                       allowed_hosts=tuple(args.allowed_hosts), cors_allow_origins=tuple(args.cors_allow_origins),
                       api_auth=credentials, preview_vae=args.preview_vae)


def check_preview_vae(source: str) -> None:
    """`--preview-vae`: a TAESD that is there (it loads with the first preview asked for, on the worker)."""
    from pathlib import Path

    from ldm.loading.tiny_vae import is_tiny_vae

    if not Path(source).exists():
        raise LdmError(f"--preview-vae {source}: no such file or folder")
    if not is_tiny_vae(Path(source)):
        raise LdmError(f"--preview-vae {source}: not a TAESD (an AutoencoderTiny folder, or taesd_decoder.safetensors)")
