"""Images in and out: files → tensors for the VAE, tensors → PIL, and PNGs carrying AUTOMATIC1111's
`parameters` text chunk (the text itself: `ldm.pipelines.infotext`). Pre-processing follows diffusers'
`VaeImageProcessor`: Lanczos resize, [-1, 1] for images, grayscale binarised at 0.5 for masks."""

import base64
import binascii
import http.client
import io
import re
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin, UnidentifiedImageError
from torch import Tensor

from ldm.errors import InputError

MAX_INPUT_PIXELS = 8192 * 8192  # larger inputs are refused before they are decoded


def _decoded(source, what: str, max_pixels: int) -> Image.Image:
    with warnings.catch_warnings():  # PIL's size warning: the check below says it better
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        image = Image.open(source)  # lazy: only the header is read here
    with image:
        if image.width * image.height > max_pixels:
            raise InputError(f"{what}: {image.width}x{image.height} is larger than the {max_pixels} pixels ldm "
                             "decodes; resize it first")
        image.load()
        return image.copy()


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


def decode_image(value: str, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS) -> Image.Image:
    """A base64 PNG/JPEG (with or without a `data:image/...;base64,` prefix), fully decoded, or an InputError.
    Whitespace inside the base64 is skipped, as MIME decoders do (`base64.encodebytes` breaks lines every 76
    characters); any other character outside the alphabet is refused."""
    if not isinstance(value, str):
        raise InputError(f"{what}: expected a base64 string, got {type(value).__name__}")
    try:
        raw = base64.b64decode(WHITESPACE.sub("", DATA_URL.sub("", value.strip())), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{what}: not valid base64") from None
    return image_from_bytes(raw, what, max_pixels, "the base64 data")


def image_from_bytes(raw: bytes, what: str = "image", max_pixels: int = MAX_INPUT_PIXELS,
                     source: str = "the data") -> Image.Image:
    """Encoded image bytes (PNG, JPEG, …), fully decoded, or an InputError."""
    try:
        return _decoded(io.BytesIO(raw), what, max_pixels)
    except (UnidentifiedImageError, Image.DecompressionBombError, OSError, SyntaxError, ValueError) as e:
        raise InputError(f"{what}: {source} is not a readable image ({e})") from None


URL = re.compile(r"^[a-z][a-z0-9+.-]*://", re.IGNORECASE)
URL_SCHEMES = ("http", "https")


def is_url(value) -> bool:
    """Whether a cell holds a URL (`scheme://…`) rather than base64 (whose alphabet has no colon)."""
    return isinstance(value, str) and URL.match(value.lstrip()) is not None


class _HttpRedirectsOnly(urllib.request.HTTPRedirectHandler):
    """urllib follows redirects to ftp:// too; an image URL may only lead to http(s)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(newurl).scheme.lower() not in URL_SCHEMES:
            raise InputError(f"redirected to {newurl[:200]}: only http and https URLs are fetched")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def fetch_url(url: str, max_bytes: int, timeout_s: float = 10.0) -> bytes:
    """The body at an http(s) URL: at most `max_bytes`, all of it within `timeout_s`, or an InputError that
    says why not (for the request's row that named it)."""
    url = url.strip()
    scheme = urllib.parse.urlsplit(url).scheme.lower()
    if scheme not in URL_SCHEMES:
        raise InputError(f"{url[:200]}: only http and https URLs are fetched, not {scheme}://")
    deadline = time.monotonic() + timeout_s
    opener = urllib.request.build_opener(_HttpRedirectsOnly)
    request = urllib.request.Request(url, headers={"User-Agent": "ldm", "Accept": "image/*"})
    try:
        with opener.open(request, timeout=timeout_s) as response:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) > max_bytes:
                raise InputError(f"{url[:200]}: {declared} bytes, more than this server's {max_bytes} bytes")
            body = bytearray()
            while chunk := response.read(64 * 1024):
                body += chunk
                if len(body) > max_bytes:
                    raise InputError(f"{url[:200]}: more than this server's {max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise TimeoutError()
            return bytes(body)
    except urllib.error.HTTPError as e:
        raise InputError(f"{url[:200]}: the server answered {e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise InputError(f"{url[:200]}: could not be fetched ({e.reason})") from None
    except TimeoutError:
        raise InputError(f"{url[:200]}: not fetched within {timeout_s:g} s") from None
    except (OSError, ValueError, http.client.HTTPException) as e:  # a reset, a malformed URL or response
        raise InputError(f"{url[:200]}: could not be fetched ({type(e).__name__}: {e})") from None


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
    """(B, 3, H, W) in [-1, 1] → 8-bit RGB images, rounding as diffusers does: round((x/2+0.5)·255)."""
    x = (images / 2 + 0.5).clamp(0, 1).cpu().permute(0, 2, 3, 1).float()  # denormalised in the VAE's dtype
    x = (x * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in x]


def save_png(image: Image.Image, path: str | Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)


def numbered_paths(path: str | Path, n: int) -> list[Path]:
    """`name.png`, `name-1.png`, `name-2.png`, … for n images."""
    path = Path(path)
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n)]
