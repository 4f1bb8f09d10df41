"""Images in and out: files → tensors for the VAE, tensors → PIL, and PNGs carrying AUTOMATIC1111's
`parameters` text chunk (the text itself: `ldm.pipelines.infotext`). Pre-processing follows diffusers'
`VaeImageProcessor`: Lanczos resize, [-1, 1] for images, grayscale binarised at 0.5 for masks."""

import base64
import binascii
import http.client
import io
import ipaddress
import re
import socket
import threading
import time
import urllib.parse
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from ldm.errors import InputError

MAX_INPUT_PIXELS = 8192 * 8192  # larger inputs are refused before they are decoded
# the formats an image sent as bytes (base64, a URL) may have: what people send (GIF and TIFF: the first frame). Pillow
# reads dozens more (ICO, PCX, TGA, PSD…), each a decoder of its own that a request could reach; files given by path
# on the command line are the user's own and open in any of them
FORMATS = ("PNG", "JPEG", "WEBP", "BMP", "GIF", "TIFF")
FORMAT_NAMES = "PNG, JPEG, WebP, BMP, GIF or TIFF"
ADDRESS = re.compile(r"<[\w.]+ object at 0x[0-9a-fA-F]+>")  # Pillow's messages name the stream by its heap address

SizeCheck = Callable[[int, int], str | None]


def _decoded(source, what: str, max_pixels: int, formats: tuple[str, ...] | None = None,
             refuse: SizeCheck | None = None) -> Image.Image:
    """The image at `source` (of one of `formats`; None: any Pillow reads), refused by its header's size before it is
    decoded: for the reason `refuse(width, height)` gives (None: none), or over `max_pixels`."""
    with warnings.catch_warnings():  # PIL's size warning: the check below says it better
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(source, formats=formats)  # lazy: only the header is read here
    with image:
        if refuse is not None and (reason := refuse(image.width, image.height)):
            raise InputError(f"{what}: {reason}")
        if image.width * image.height > max_pixels:
            raise InputError(f"{what}: {image.width}x{image.height} is larger than the {max_pixels} pixels ldm "
                             "decodes; resize it first")
        image.load()  # (of a GIF or a TIFF: its first frame)
        return image.copy()


def _format_of(raw: bytes) -> str | None:
    """The format Pillow takes `raw` for (its header read, nothing decoded), or None."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(raw)) as image:
                return image.format
    except Exception:  # (whatever the plugin raised: not an image it reads either)
        return None


def load_image(path: str | Path, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """Open an image file, fully decoded, or raise an InputError that says what is wrong with it."""
    try:
        return _decoded(path, f"{what} {path}", max_pixels)
    except FileNotFoundError:
        raise InputError(f"{what} {path}: no such file") from None
    except IsADirectoryError:
        raise InputError(f"{what} {path}: is a folder, not an image file") from None
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what} {path}: not a readable image ({e})") from None


DATA_URL = re.compile(r"^data:image/[\w.+-]+;base64,", re.IGNORECASE)
WHITESPACE = re.compile(r"\s+")


def decode_image(value: str, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS,
                 refuse: SizeCheck | None = None) -> Image.Image:
    """A base64 image of one of `FORMATS` (with or without a `data:image/...;base64,` prefix), fully decoded, or an
    InputError; its size is checked before it is decoded (`image_from_bytes`).
    Whitespace inside the base64 is skipped, as MIME decoders do (`base64.encodebytes` breaks lines every 76
    characters); any other character outside the alphabet is refused."""
    if not isinstance(value, str):
        raise InputError(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(WHITESPACE.sub("", DATA_URL.sub("", value.strip())), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not valid base64") from None
    return image_from_bytes(raw, what, max_pixels, "the base64 data", refuse)


def image_from_bytes(raw: bytes, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS,
                     source: str = "the data", refuse: SizeCheck | None = None) -> Image.Image:
    """Encoded image bytes of one of `FORMATS`, fully decoded, or an InputError. The size is checked from the
    header before anything is decoded: `refuse(width, height)` (a reason to refuse, or None), and `max_pixels`."""
    try:
        return _decoded(io.BytesIO(raw), what, max_pixels, FORMATS, refuse)
    except UnidentifiedImageError:
        known = _format_of(raw)
        kind = f"not a readable image (ldm reads {FORMAT_NAMES})" if known is None else \
            f"in the {known} format; ldm reads {FORMAT_NAMES}"
        raise InputError(f"{what}: {source} is {kind}") from None
    except (Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what}: {source} is not a readable image ({ADDRESS.sub('the data', str(e))})") from None


URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
URL_SCHEMES = ("http", "https")


def is_url(value) -> bool:
    """Whether a cell holds a URL (`scheme://…`) rather than base64 (whose alphabet has no colon)."""
    return isinstance(value, str) and URL.match(value.lstrip()) is not None


MAX_REDIRECTS = 5
REDIRECTS = (301, 302, 303, 307, 308)


def _address(host: str, port: int, allow_private: bool) -> str:
    """The address to connect to for `host`: resolved, and a public one unless `allow_private` — a loopback, private,
    link-local or otherwise non-global address is refused (an InputError that says so before anything is sent to it,
    so that answers do not tell a closed port from an open one). The connection goes to the address checked here,
    not to a second resolution a DNS server could answer otherwise."""
    try:
        found = [info[4][0] for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except (OSError, UnicodeError) as e:
        raise InputError(f"{host[:100]}: no such host ({e})") from None
    for address in found:
        ip = ipaddress.ip_address(address.partition("%")[0])
        ip = ip.ipv4_mapped or ip if isinstance(ip, ipaddress.IPv6Address) else ip
        if allow_private or (ip.is_global and not ip.is_multicast):
            return address
    raise InputError(f"{host[:100]} is not a public address (loopback, private, link-local…): this server fetches "
                     "from public addresses only (ldm serve --allow-private-urls allows the others)")


def _connection(scheme: str, host: str, port: int, address: str, timeout_s: float) -> http.client.HTTPConnection:
    """An HTTP(S) connection to `host` that connects to `address` (TLS still checks `host`'s certificate)."""

    class Pinned(http.client.HTTPSConnection if scheme == "https" else http.client.HTTPConnection):
        def connect(self):
            self.sock = socket.create_connection((address, self.port), self.timeout)
            if scheme == "https":
                self.sock = self._context.wrap_socket(self.sock, server_hostname=self.host)

    return Pinned(host, port, timeout=timeout_s)


def _cut(conn: http.client.HTTPConnection) -> None:
    """End a connection's exchange from another thread: what blocks on its socket returns at once."""
    try:
        if conn.sock is not None:
            conn.sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def fetch_url(url: str, max_bytes: int, timeout_s: float = 10.0, allow_private: bool = False) -> bytes:
    """The body at an http(s) URL: at most `max_bytes`, all of it — DNS aside, each redirect (at most 5, to http(s)
    only) and a server that sends a byte at a time included — within `timeout_s`, or an InputError that says why
    not (for the request's row that named it). Loopback, private and link-local addresses are refused, after
    resolution and at every redirect, unless `allow_private`."""
    start, given = time.monotonic(), url.strip()[:200]
    url = url.strip()
    for _ in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in URL_SCHEMES:
            where = f"redirected to {url[:200]}" if url.strip()[:200] != given else given
            raise InputError(f"{where}: only http and https URLs are fetched, not {scheme}://")
        try:
            host, port = parts.hostname or "", parts.port or (443 if scheme == "https" else 80)
            address = _address(host, port, allow_private)
            left = timeout_s - (time.monotonic() - start)
            conn = _connection(scheme, host, port, address, max(left, 0.01))
            # a watchdog for the whole exchange: socket timeouts bound each read, not a server that drips
            watchdog = threading.Timer(max(left, 0.0), _cut, (conn,))
            watchdog.start()
            try:
                conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path or "/", parts.query, "")),
                             headers={"User-Agent": "ldm", "Accept": "image/*"})
                response = conn.getresponse()
                if response.status in REDIRECTS and response.getheader("Location"):
                    url = urllib.parse.urljoin(url, response.getheader("Location"))
                    continue
                if response.status != 200:
                    raise InputError(f"{given}: the server answered {response.status} {response.reason[:100]}")
                declared = response.getheader("Content-Length")
                if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                    raise InputError(f"{given}: {declared} bytes, more than this server's {max_bytes} bytes")
                body = bytearray()
                while chunk := response.read1(64 * 1024):
                    body += chunk
                    if len(body) > max_bytes:
                        raise InputError(f"{given}: more than this server's {max_bytes} bytes")
                if time.monotonic() - start > timeout_s:
                    raise TimeoutError()
                return bytes(body)
            finally:
                watchdog.cancel()
                conn.close()
        except InputError:
            raise
        except (OSError, ValueError, http.client.HTTPException) as e:  # a reset, a malformed URL or response
            if time.monotonic() - start >= timeout_s:
                raise InputError(f"{given}: not fetched within {timeout_s:g} s") from None
            raise InputError(f"{given}: could not be fetched ({type(e).__name__}: {str(e)[:200]})") from None
    raise InputError(f"{given}: more than {MAX_REDIRECTS} redirects")


def encode_png(image: Image.Image, parameters: str | None = None) -> str:
    """Base64 of the image as PNG (with AUTOMATIC1111's `parameters` text when given)."""
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    image.save(buffer, format="PNG", pnginfo=info)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def fit_size(image: Image.Image, multiple: int = 8) -> tuple[int, int]:
    """The image's (width, height) rounded down to a multiple of `multiple`, as diffusers does."""
    width, height = (v - v % multiple for v in image.size)
    if width < multiple or height < multiple:
        raise InputError(f"image of {image.width}x{image.height} is smaller than {multiple}x{multiple} pixels")
    return width, height


def _resized(image: Image.Image, width: int, height: int) -> Image.Image:
    return image if image.size == (width, height) else image.resize((width, height), Image.Resampling.LANCZOS)


def image_to_tensor(image: Image.Image, width: int, height: int) -> Tensor:
    """(1, 3, height, width) in [-1, 1]."""
    x = np.asarray(_resized(image, width, height).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(x).permute(2, 0, 1)[None] * 2.0 - 1.0


def mask_to_tensor(mask: Image.Image, width: int, height: int) -> Tensor:
    """(1, 1, height, width) of 0 (keep) and 1 (repaint): resized, grayscale, binarised at 0.5."""
    x = np.asarray(_resized(mask, width, height).convert("L"), dtype=np.float32) / 255.0
    return (torch.from_numpy(x)[None, None] >= 0.5).float()


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → 8-bit RGB images, rounding as diffusers does: round((x/2+0.5)·255). Denormalised
    in the VAE's dtype, then scaled in fp32 and made 8-bit where the images are, so that a GPU copies a quarter of
    the bytes (the same IEEE operations on either device: the same pixels)."""
    x = (images / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).float()
    x = (x * 255).round().to(torch.uint8).cpu().numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in x]


def save_png(image: Image.Image, path: str | Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)


def numbered_paths(path: str | Path, n: int) -> list[Path]:
    """`name.png`, `name-1.png`, `name-2.png`, … for n images."""
    path = Path(path)
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n)]
