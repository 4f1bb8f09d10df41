"""The scoring schema of the Azure ML model-catalog cards: a request body read and checked, and the response
built. `ldm.serving.runner` runs what this reads through the pipeline.

Request (pandas' "split" orientation; `ldm serve` and `ldm batch` both take it):

    {"input_data": {"columns": ["prompt"], "index": [0, 1], "data": ["a cat", "a dog"],
                    "parameters": {"num_inference_steps": 30, "guidance_scale": 7.5, "seed": 1}}}

Columns `prompt` or `text_prompt` (SD 1.4's card), `negative_prompt` (a row's own, over the parameter), and
`image` and `mask` (or `mask_image`) for image-to-image and inpainting as base64 PNG/JPEG (line breaks
allowed, as `base64.encodebytes` writes them) or, where the caller allows it, http(s) URLs; `control_image` (one
per ControlNet unit of `parameters.controlnet`) and `ip_image` (the reference images of `parameters.ip_adapter`)
the same way; rows as strings, lists in column order, or objects keyed by column. No file is ever opened from a
request: a local path in an image cell is that row's error.

Response, one object per image in row order (the SD 2.1, SDXL and inpainting cards' form):

    [{"prompt": "a cat", "generated_image": "<base64 PNG>", "nsfw_content_detected": null, "seed": 1}, ...]

`nsfw_content_detected` is the safety checker's flag, null when the model has none. A row that cannot be run
is reported in place as {"prompt": ..., "index": ..., "error": {"field": ..., "message": ...}}; a request that
cannot be read at all raises a `RequestError`, whose `as_dict()` is the error body. The SD 1.5 and SD 1.4
cards' older forms (one object holding lists) are `form="sd15"` / `form="sd14"`.
"""

import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field, fields

from PIL import Image

from ldm.adapters.lora import MAX_WEIGHT, find_lora
from ldm.choices import FORMS
from ldm.errors import InputError, LdmError
from ldm.loading.controlnets import find_controlnet
from ldm.loading.families import weights_dir
from ldm.loading.ip_adapters import find_image_encoder, find_ip_adapter
from ldm.pipelines.images import decode_image, fit_size, image_from_bytes, is_url
from ldm.pipelines.prompts import CHUNK_TOKENS, MAX_CHUNKS, extract_extra_networks
from ldm.pipelines.request import (
    IMAGE_PLACEHOLDER,
    MAX_SEED,
    Control,
    GenerationRequest,
    ImagePrompt,
    hires_size,
    random_seed,
)
from ldm.sampling.samplers import SAMPLERS
from ldm.serving.limits import Limits

COLUMNS = {"prompt": "prompt", "text_prompt": "prompt", "negative_prompt": "negative_prompt", "image": "image",
           "mask": "mask", "mask_image": "mask", "control_image": "control_image", "ip_image": "ip_image"}
IMAGE_COLUMNS = ("image", "mask", "control_image", "ip_image")
NO_FILES = ("looks like a file path: files named in a request are never opened; send the image as base64 (or, "
            "where the server allows them, as an http(s) URL)")
# a cell that is a path rather than base64 (whose alphabet has no dot, tilde, colon or backslash): it ends in an image
# suffix, or starts as a relative, home or Windows path
PATH_LIKE = re.compile(r"(\.(png|jpe?g|webp|bmp|gif|tiff?)$)|^(~|\.{1,2}[/\\]|[A-Za-z]:[/\\])", re.IGNORECASE)
NO_URLS = "image URLs are not fetched by this server (start it with --allow-image-urls to allow them)"
IMAGE_TOO_LARGE = "{width}x{height} is larger than this server's {max_pixels} pixels per image; resize it first"
SURROGATE = re.compile("[\ud800-\udfff]")  # half of a UTF-16 pair: JSON lets "\ud800" through, UTF-8 has no such thing
MAX_LABEL = 1000  # characters of an index label's JSON (it is echoed in its row's answer)
# A prompt is refused above this many characters before it is tokenized (it was tokenized whole however long, and
# repeated in the answer and in every PNG). ldm encodes at most MAX_CHUNKS chunks of 75 tokens (2,400 tokens); CLIP's
# BPE reads English at 4-5 characters a token (so 32 full chunks are some 11,000 characters), and A1111's brackets and
# weights, which are not tokens, add less than as much again: 10 a token leaves room for both. A prompt over it would
# be over the 32 chunks (a1111) or cut at 77 tokens (plain) anyway.
MAX_PROMPT_CHARS = 10 * MAX_CHUNKS * CHUNK_TOKENS


def server_folders() -> set[str]:
    """How the server's weights folder may be written in a message: its absolute path, and $LDM_WEIGHTS as given
    where that is a path of more than one name (`.` or `w` alone would match inside any text)."""
    given = weights_dir()
    return {str(given.resolve())} | ({str(given)} if given.is_absolute() or len(given.parts) > 1 else set())


def echo(text: str, limit: int = 200) -> str:
    """User text as an answer may repeat it: a lone surrogate written out (`\ud800`, which UTF-8 cannot encode), at
    most `limit` characters, and the server's weights folder named `weights` (an answer names no folder of the
    server's: a loader's error says where it looked)."""
    text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    for folder in sorted(server_folders(), key=len, reverse=True):  # (the longest first: one may hold the other)
        text = re.sub(rf"(?<![\w./\\-]){re.escape(folder)}(?![\w.-])", "weights", text)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


class RequestError(InputError):
    """A request ldm cannot run, naming the field at fault (both as an answer may repeat them: `echo`)."""

    def __init__(self, field: str, message: str):
        field, message = echo(field), echo(message, 2000)
        super().__init__(f"{field}: {message}")
        self.field, self.message = field, message

    def as_dict(self) -> dict:
        return {"error": {"field": self.field, "message": self.message}}


@dataclass(frozen=True)
class Parameters:
    """`parameters`, with the cards' defaults (None: 50 steps, guidance 7.5, or the served model card's where its
    manifest entry names others: SD-Turbo's 1 step without guidance) and ldm's extras."""

    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    negative_prompt: str | None = None
    seed: int | None = None
    height: int | None = None
    width: int | None = None
    scheduler: str | None = None
    timestep_spacing: str | None = None  # leading, linspace or trailing (default: the model's scheduler config)
    eta: float | None = None  # DDIM's η, TCD's γ (default: the sampler's own)
    strength: float | None = None
    num_images_per_prompt: int = 1
    prompt_syntax: str | None = None  # "plain" (a request's default: diffusers reads brackets literally) or "a1111"
    clip_skip: int = 1
    loras: tuple[tuple[str, float], ...] = ()  # files of the server's LoRA folder, by name, with their weights
    refiner_start: float | None = None  # with a refiner (ldm serve --refiner): where it takes over (or denoising_end)
    # the hires fix (text-to-image; `ldm.pipelines.hires`): the size limit applies to the upscaled image
    hires_scale: float | None = None
    hires_steps: int | None = None
    hires_denoise: float | None = None
    hires_upscaler: str | None = None
    # ControlNet units: models of the server's weights/controlnet/ by name (resolved to their paths), one control
    # image each in a row's `control_image` cell; weight, start, end and mode apply to every unit
    controlnet: tuple[str, ...] = ()
    control_weight: float | None = None
    control_start: float | None = None
    control_end: float | None = None
    control_mode: str | None = None
    # an image prompt (IP-Adapter): an adapter of the server's weights/ipadapter/ by name (resolved to its path), its
    # reference images in a row's `ip_image` cell, its image encoder a name in weights/clip_vision/ (None: the first
    # there whose width the adapter reads)
    ip_adapter: str | None = None
    ip_weight: float | None = None
    ip_start: float | None = None
    ip_end: float | None = None
    ip_image_encoder: str | None = None


PARAMETER_NAMES = tuple(f.name for f in fields(Parameters))
TEXT_PARAMETERS = ("negative_prompt", "scheduler", "timestep_spacing", "prompt_syntax", "hires_upscaler",
                   "control_mode")
REAL_PARAMETERS = ("guidance_scale", "eta", "strength", "refiner_start", "hires_scale",  # the rest: integers
                   "hires_denoise", "control_weight", "control_start", "control_end", "ip_weight", "ip_start",
                   "ip_end")
IP_SETTINGS = ("ip_weight", "ip_start", "ip_end", "ip_image_encoder")  # (they need an ip_adapter)
# a GenerationRequest field → the parameter of a scoring request that sets it (for the field an error names)
PARAMETER_OF = {"steps": "num_inference_steps", "guidance": "guidance_scale", "sampler": "scheduler",
                "num_images": "num_images_per_prompt"}


@dataclass
class Row:
    position: int  # in `data`
    label: object  # its `index` label (the position when `index` is shorter, as in the SD 1.5 card)
    prompt: str | None = None
    negative_prompt: str | None = None  # its own; None: the request's `negative_prompt` parameter
    image: Image.Image | None = None
    mask: Image.Image | None = None
    control_images: list[Image.Image] = field(default_factory=list)  # one per ControlNet unit
    ip_images: list[Image.Image] = field(default_factory=list)  # the image prompt's references (averaged)
    error: RequestError | None = None


@dataclass
class Request:
    rows: list[Row]
    parameters: Parameters
    seed: int  # rows get seed, seed + 1, …: the request's `seed`, or a random one
    limits: Limits = field(default_factory=Limits)
    form: str = "rows"
    prompt_syntax: str = "plain"  # when the parameters do not say (`ldm batch`: "a1111")


# ------------------------------------------------------------------------------------- parameters


def text(value: str, field: str, max_chars: int = MAX_PROMPT_CHARS) -> str:
    """A text of the request, or the RequestError that names `field` for one that is not valid Unicode or is longer
    than `max_chars` (a prompt's bound, `MAX_PROMPT_CHARS`)."""
    if len(value) > max_chars:
        why = f" (ldm encodes {MAX_CHUNKS} chunks of {CHUNK_TOKENS} tokens)" if max_chars == MAX_PROMPT_CHARS else ""
        raise RequestError(field, f"{len(value)} characters; this server takes at most {max_chars}{why}")
    if (bad := SURROGATE.search(value)) is not None:
        raise RequestError(field, f"not valid Unicode: a lone surrogate ({echo(bad.group())}) at character "
                                  f"{bad.start()}")
    return value


def _finite(value) -> bool:
    try:
        return math.isfinite(value)
    except OverflowError:  # an integer of hundreds of digits
        return False


def _number(name: str, value, kind: type):
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and _finite(value) if kind is float \
        else isinstance(value, int) and not isinstance(value, bool)
    if not ok:
        raise RequestError(f"parameters.{name}", f"expected {'a finite number' if kind is float else 'an integer'}, "
                                                 f"got {value!r}")
    return float(value) if kind is float else value


def _parameter_values(raw) -> dict:
    """The `parameters` object's values by Parameters field, each of its field's type (null: the default)."""
    if not isinstance(raw, dict):
        raise RequestError("parameters", "expected an object")
    if "denoising_end" in raw:  # diffusers' name for the base's share, as the SDXL card's example passes it
        if "refiner_start" in raw:
            raise RequestError("parameters.denoising_end", "give refiner_start or denoising_end, not both")
        raw = {("refiner_start" if k == "denoising_end" else k): v for k, v in raw.items()}
    unknown = sorted(set(raw) - set(PARAMETER_NAMES))
    if unknown:
        raise RequestError(f"parameters.{unknown[0]}", f"unknown parameter (known: {', '.join(PARAMETER_NAMES)})")
    values = {}
    for name, value in raw.items():
        if value is None:
            continue
        if name == "loras":
            values[name] = parse_loras(value)
        elif name == "controlnet":
            values[name] = parse_controlnets(value)
        elif name == "ip_adapter":
            values[name] = parse_ip_adapter(value)
        elif name == "ip_image_encoder":
            values[name] = parse_image_encoder(value)
        elif name in TEXT_PARAMETERS:
            if not isinstance(value, str):
                raise RequestError(f"parameters.{name}", f"expected a string, got {value!r}")
            values[name] = text(value, f"parameters.{name}", MAX_PROMPT_CHARS if name == "negative_prompt" else 200)
        else:
            values[name] = _number(name, value, float if name in REAL_PARAMETERS else int)
    return values


def _check_limits(p: Parameters, limits: Limits) -> None:
    """The server's limits (steps, images, pixels), a known scheduler and the guidance range."""
    if p.num_inference_steps is not None and not 1 <= p.num_inference_steps <= limits.max_steps:
        raise RequestError("parameters.num_inference_steps", f"must be from 1 to {limits.max_steps} on this server, "
                                                             f"got {p.num_inference_steps}")
    if p.hires_steps is not None and not 1 <= p.hires_steps <= limits.max_steps:
        raise RequestError("parameters.hires_steps", f"must be from 1 to {limits.max_steps} on this server, "
                                                     f"got {p.hires_steps}")
    if not 1 <= p.num_images_per_prompt <= limits.max_images_per_prompt:
        raise RequestError("parameters.num_images_per_prompt",
                           f"must be from 1 to {limits.max_images_per_prompt}, got {p.num_images_per_prompt}")
    if p.height and p.width:
        larger = "width" if p.width >= p.height else "height"  # the one to bring down first
        if error := too_many_pixels(f"parameters.{larger}", p.width, p.height, limits):
            raise error
    if p.scheduler is not None and scheduler_name(p.scheduler) is None:
        raise RequestError("parameters.scheduler", f"unknown scheduler {p.scheduler!r} (one of: {', '.join(SAMPLERS)}, "
                                                   "or a diffusers scheduler class name)")
    if p.guidance_scale is not None and not 0 <= p.guidance_scale <= 100:
        raise RequestError("parameters.guidance_scale", f"must be between 0 and 100, got {p.guidance_scale}")


def parse_parameters(raw, limits: Limits) -> Parameters:
    """`parameters` read and checked: the server's limits first, then as every entry point checks a request."""
    if raw is None:
        return Parameters()
    p = Parameters(**_parameter_values(raw))
    _check_limits(p, limits)
    if p.ip_adapter is None and (alone := next((n for n in IP_SETTINGS if getattr(p, n) is not None), None)):
        raise RequestError(f"parameters.{alone}", "applies to an image prompt: give parameters.ip_adapter")
    try:  # the rest as every entry point checks a request (the same message as the command line's)
        generation_request(p, [""], None, IMAGE_PLACEHOLDER if p.strength is not None else None, None,
                           p.seed, p.prompt_syntax or "plain", [IMAGE_PLACEHOLDER] * len(p.controlnet),
                           [IMAGE_PLACEHOLDER]).check()
    except InputError as e:
        name = PARAMETER_OF.get(e.field, e.field)
        raise RequestError(f"parameters.{name}" if name in PARAMETER_NAMES else "parameters", str(e)) from None
    if p.height and p.width and (error := hires_too_large(p, p.width, p.height, limits)):
        raise error
    return p


def too_many_pixels(field: str, width: int, height: int, limits: Limits, advice: str = "") -> RequestError | None:
    """The error for an image of width × height over the server's pixels per image (None: it fits), blaming
    `field`; `advice` follows the message."""
    if width * height <= limits.max_pixels:
        return None
    return RequestError(field, f"{width}x{height} is more than this server's {limits.max_pixels} pixels per "
                               f"image{advice}")


def hires_too_large(p: Parameters, width: int, height: int, limits: Limits, multiple: int = 8) -> RequestError | None:
    """The error for a hires fix whose upscaled image exceeds the server's pixels per image (None: it fits)."""
    if p.hires_scale is None:
        return None
    big_w, big_h = hires_size(width, height, p.hires_scale, multiple)
    if big_w * big_h <= limits.max_pixels:
        return None
    return RequestError("parameters.hires_scale", f"{width}x{height} upscaled {p.hires_scale:g}× is {big_w}x{big_h}, "
                                                  f"more than this server's {limits.max_pixels} pixels per image")


def parse_loras(value) -> tuple[tuple[str, float], ...]:
    """`loras`: {"NAME": WEIGHT, …} or ["NAME", "NAME:WEIGHT", …], NAME a file of the server's LoRA folder
    (weights/loras): a request never names a path."""
    if isinstance(value, dict):
        pairs = list(value.items())
    elif isinstance(value, list) and all(isinstance(v, str) for v in value):
        pairs = [tuple(v.rsplit(":", 1)) if ":" in v else (v, 1.0) for v in value]
    else:
        raise RequestError("parameters.loras", 'expected {"NAME": WEIGHT} or ["NAME", "NAME:WEIGHT"]')
    out = []
    for name, weight in pairs:
        try:
            weight = float(weight) if not isinstance(weight, bool) else math.nan
        except (TypeError, ValueError, OverflowError):
            weight = math.nan
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise RequestError("parameters.loras", f"{name}: the weight must be a finite number from "
                                                   f"{-MAX_WEIGHT:g} to {MAX_WEIGHT:g}")
        try:
            find_lora(str(name), allow_paths=False, show_folder=False)
        except InputError as e:
            raise RequestError("parameters.loras", str(e)) from None
        out.append((str(name), weight))
    return tuple(out)


def parse_controlnets(value) -> tuple[str, ...]:
    """`controlnet`: "NAME" or ["NAME", …], each a model of the server's weights/controlnet/ (never a path), as the
    paths they name there."""
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise RequestError("parameters.controlnet", 'expected "NAME" or ["NAME", …]')
    try:
        return tuple(str(find_controlnet(name, allow_paths=False)) for name in names)
    except LdmError as e:
        raise RequestError("parameters.controlnet", str(e)) from None


def parse_ip_adapter(value) -> str:
    """`ip_adapter`: "NAME", an adapter of the server's weights/ipadapter/ (never a path), as the path it names
    there."""
    if not isinstance(value, str):
        raise RequestError("parameters.ip_adapter", 'expected "NAME" (an adapter of the server\'s weights/ipadapter/)')
    try:
        return str(find_ip_adapter(value, allow_paths=False))
    except LdmError as e:
        raise RequestError("parameters.ip_adapter", str(e)) from None


def parse_image_encoder(value) -> str:
    """`ip_image_encoder`: "NAME", an encoder folder of the server's weights/clip_vision/ (never a path), as its
    path. (With a name given, `find_image_encoder` does not read the adapter: whether the two fit is checked when the
    row runs, as the command line's --ip-image-encoder is.)"""
    if not isinstance(value, str):
        raise RequestError("parameters.ip_image_encoder", 'expected "NAME" (a folder of the server\'s '
                                                          'weights/clip_vision/)')
    try:
        return str(find_image_encoder(value, None, allow_paths=False))
    except LdmError as e:
        raise RequestError("parameters.ip_image_encoder", str(e)) from None


def scheduler_name(name: str) -> str | None:
    """An ldm sampler name, or the diffusers scheduler class it reproduces (the first sampler of that class)."""
    if name in SAMPLERS:
        return name
    return next((n for n, spec in SAMPLERS.items() if spec.diffusers_class == name), None)


def controls(p: Parameters, images: list) -> list[Control]:
    """The ControlNet units of the parameters, with a row's control images (as many)."""
    settings = {"weight": p.control_weight, "start": p.control_start, "end": p.control_end, "mode": p.control_mode}
    given = {k: v for k, v in settings.items() if v is not None}
    return [Control(path, image, **given) for path, image in zip(p.controlnet, images, strict=True)]


def image_prompts(p: Parameters, images: list) -> list[ImagePrompt]:
    """The image prompt of the parameters (none without `ip_adapter` or without images), with a row's reference
    images."""
    if p.ip_adapter is None or not images:
        return []
    settings = {"weight": p.ip_weight, "start": p.ip_start, "end": p.ip_end}
    given = {k: v for k, v in settings.items() if v is not None}
    return [ImagePrompt(p.ip_adapter, list(images), encoder=p.ip_image_encoder, **given)]


def generation_request(p: Parameters, prompts: list[str], negative: str | None, image, mask, seed,
                       prompt_syntax: str, control_images: list | None = None,
                       ip_images: list | None = None) -> GenerationRequest:
    """The request one pass of rows makes of the pipeline (`control_images`: the pass's row's, one per unit;
    `ip_images`: its reference images)."""
    return GenerationRequest(prompts, negative, steps=p.num_inference_steps, guidance=p.guidance_scale, seed=seed,
                             width=p.width, height=p.height,
                             sampler=None if p.scheduler is None else scheduler_name(p.scheduler),
                             timestep_spacing=p.timestep_spacing, eta=p.eta,
                             num_images=p.num_images_per_prompt, image=image, mask=mask, strength=p.strength,
                             prompt_syntax=prompt_syntax, clip_skip=p.clip_skip, loras=list(p.loras),
                             refiner_start=p.refiner_start, hires_scale=p.hires_scale, hires_steps=p.hires_steps,
                             hires_denoise=p.hires_denoise, hires_upscaler=p.hires_upscaler,
                             controls=controls(p, control_images or []),
                             image_prompts=image_prompts(p, ip_images or []))


# ------------------------------------------------------------------------------------------- rows


def _cells(value, columns: list[str], where: str) -> dict:
    """A row (a string, a list in column order, or an object keyed by column) as its cells by column."""
    if isinstance(value, str):
        if columns != ["prompt"]:
            raise RequestError(where, f"a bare string row needs the single column 'prompt', not {columns}")
        return {"prompt": value}
    if isinstance(value, list):
        if len(value) != len(columns):
            raise RequestError(where, f"has {len(value)} values for {len(columns)} columns {columns}")
        return dict(zip(columns, value, strict=True))
    if isinstance(value, dict):
        unknown = sorted(k for k in value if k not in COLUMNS)
        if unknown:
            raise RequestError(f"{where}.{unknown[0]}", f"unknown column (known: {', '.join(COLUMNS)})")
        return {COLUMNS[k]: v for k, v in value.items()}
    raise RequestError(where, f"expected a string, a list or an object, got {type(value).__name__}")


def _image_cell(name: str, value, where: str, limits: Limits, fetch: Callable[[str], bytes] | None):
    """An image or mask cell as an image (None when absent): base64, a URL (with `fetch`), or already an image
    (`ldm batch` hands over images read from files). Its size is read from its header and refused before it is
    decoded: an image or mask over the server's pixels per image at the size it runs at (as `_check_images` counts
    them), a control image (resized to the generation's size) or a reference image (resized to the image encoder's)
    over 4× as many. A local path is refused (`NO_FILES`), never opened."""
    if value is None or isinstance(value, Image.Image):
        return value
    if is_url(value) and fetch is None:
        raise RequestError(f"{where}.{name}", NO_URLS)
    if not is_url(value) and isinstance(value, str) and len(value) <= 4096 and PATH_LIKE.search(value.strip()):
        raise RequestError(f"{where}.{name}", NO_FILES)

    def refuse(width: int, height: int) -> str | None:  # (control and reference images are resized to fit)
        if name in ("control_image", "ip_image") or (width - width % 8) * (height - height % 8) <= limits.max_pixels:
            return None
        return IMAGE_TOO_LARGE.format(width=width, height=height, max_pixels=limits.max_pixels)

    try:
        if isinstance(value, InputError):
            raise value
        if is_url(value):
            return image_from_bytes(fetch(value), name, 4 * limits.max_pixels, f"{value.strip()[:200]}", refuse)
        return decode_image(value, name, 4 * limits.max_pixels, refuse)
    except InputError as e:
        raise RequestError(f"{where}.{name}", str(e).removeprefix(f"{name}: ")) from None


def _reference_images(value, where: str, limits: Limits, fetch: Callable[[str], bytes] | None) -> list[Image.Image]:
    """An `ip_image` cell (one image cell, or a list of them: their encodings are averaged) as its images."""
    cells = value if isinstance(value, list) else [value] if value else []
    if any(cell is None for cell in cells):
        raise RequestError(f"{where}.ip_image", "null in the list of reference images")
    return [_image_cell("ip_image", cell, where, limits, fetch) for cell in cells]


def _check_images(row: Row, where: str, limits: Limits) -> None:
    """A mask goes with an image of its size; the image, at the size it runs at, within the pixel limit."""
    if row.mask is not None and row.image is None:
        raise RequestError(f"{where}.mask", "a mask needs the image it applies to")
    if row.mask is not None and row.mask.size != row.image.size:
        raise RequestError(f"{where}.mask", f"is {row.mask.width}x{row.mask.height}, the image "
                                            f"{row.image.width}x{row.image.height}: they must match")
    if row.image is not None:
        try:
            width, height = fit_size(row.image)
        except InputError as e:
            raise RequestError(f"{where}.image", str(e)) from None
        if error := too_many_pixels(f"{where}.image", width, height, limits):
            raise error


def _check_lora_tags(prompt: str, field: str) -> None:
    """The <lora:NAME:WEIGHT> tags of a prompt: each a LoRA of the server's folder, at a finite weight (checked here,
    before the row is queued, as `parse_loras` checks the parameter)."""
    for name, args in extract_extra_networks(prompt)[1]:
        tag = f"<lora:{':'.join([name, *args])}>"
        try:
            weight = float(args[0]) if args else 1.0
        except ValueError:
            raise RequestError(field, f"{echo(tag, 100)}: the weight must be a number") from None
        if not math.isfinite(weight) or abs(weight) > MAX_WEIGHT:
            raise RequestError(field, f"{echo(tag, 100)}: the weight must be a finite number from {-MAX_WEIGHT:g} to "
                                      f"{MAX_WEIGHT:g}")
        try:
            find_lora(name, allow_paths=False, show_folder=False)
        except InputError as e:
            raise RequestError(field, str(e)) from None


def _row(position: int, label, value, columns: list[str], limits: Limits,
         fetch: Callable[[str], bytes] | None = None) -> Row:
    """One row of `data` read and checked; what is wrong with it is its `error`."""
    row = Row(position, label)
    where = f"data[{position}]"
    try:
        cells = _cells(value, columns, where)
        row.prompt = cells.get("prompt")
        if not isinstance(row.prompt, str):
            raise RequestError(f"{where}.prompt", "missing, or not a string")
        text(row.prompt, f"{where}.prompt")
        _check_lora_tags(row.prompt, f"{where}.prompt")
        row.negative_prompt = cells.get("negative_prompt")
        if row.negative_prompt is not None and not isinstance(row.negative_prompt, str):
            raise RequestError(f"{where}.negative_prompt", "not a string")
        if row.negative_prompt is not None:
            text(row.negative_prompt, f"{where}.negative_prompt")
        row.image = _image_cell("image", cells.get("image"), where, limits, fetch)
        row.mask = _image_cell("mask", cells.get("mask"), where, limits, fetch)
        control = cells.get("control_image")
        row.control_images = [_image_cell("control_image", cell, where, limits, fetch)
                              for cell in (control if isinstance(control, list) else [control] if control else [])]
        row.ip_images = _reference_images(cells.get("ip_image"), where, limits, fetch)
        _check_images(row, where, limits)
    except RequestError as e:
        row.error = e
    return row


# ---------------------------------------------------------------------------------------- request


def _columns(data_in: dict) -> list[str]:
    """`columns` (default: prompt alone) by the names rows use: one prompt column, no repeats."""
    columns = data_in.get("columns", ["prompt"])
    if not isinstance(columns, list) or not all(isinstance(c, str) for c in columns):
        raise RequestError("input_data.columns", "expected a list of column names")
    for name in columns:
        if name not in COLUMNS:
            raise RequestError("input_data.columns", f"unknown column {name!r} (known: {', '.join(COLUMNS)})")
    columns = [COLUMNS[c] for c in columns]
    if "prompt" not in columns or len(set(columns)) != len(columns):
        raise RequestError("input_data.columns", "needs one prompt (or text_prompt) column and no repeats")
    return columns


def parse(body, limits: Limits = Limits(), form: str = "rows", prompt_syntax: str = "plain",
          fetch: Callable[[str], bytes] | None = None) -> Request:
    """Read a request body (already JSON-decoded). Request-level problems raise a RequestError; a row that
    cannot be read carries its own error and the other rows still run. `prompt_syntax`: how prompts are read
    when the parameters do not say. `fetch`: an image URL's bytes (or an InputError), such as
    `functools.partial(ldm.pipelines.images.fetch_url, max_bytes=…)`; without it a URL is the row's error."""
    if form not in FORMS:
        raise ValueError(f"unknown response form {form!r}")
    if not isinstance(body, dict) or "input_data" not in body:
        raise RequestError("input_data", "missing: the body must be {\"input_data\": {\"columns\": [...], "
                                         "\"data\": [...], \"parameters\": {...}}}")
    unknown = sorted(set(body) - {"input_data", "parameters"})
    if unknown:
        raise RequestError(unknown[0], "unknown top-level field (expected input_data)")
    data_in = body["input_data"]
    if not isinstance(data_in, dict):
        raise RequestError("input_data", "expected an object with columns, index, data and parameters")
    unknown = sorted(set(data_in) - {"columns", "index", "data", "parameters"})
    if unknown:
        raise RequestError(f"input_data.{unknown[0]}", "unknown field (expected columns, index, data, parameters)")
    columns = _columns(data_in)
    data = data_in.get("data")
    if not isinstance(data, list) or not data:
        raise RequestError("input_data.data", "expected a non-empty list of rows")
    if len(data) > limits.max_rows:
        raise RequestError("input_data.data", f"{len(data)} rows; this server takes at most {limits.max_rows} "
                                              "per request")
    index = data_in.get("index") or []
    if not isinstance(index, list):
        raise RequestError("input_data.index", "expected a list of row labels")
    for i, label in enumerate(index[:len(data)]):  # each is repeated in its row's answer: it must be one's JSON
        try:
            echoed = json.dumps(label, allow_nan=False, ensure_ascii=False).encode()
        except ValueError as e:  # NaN or infinity (not JSON numbers), a lone surrogate
            what = "a lone surrogate" if isinstance(e, UnicodeError) else "NaN or infinity, which JSON has not"
            raise RequestError(f"input_data.index[{i}]", f"not a label an answer can hold ({what})") from None
        if len(echoed) > MAX_LABEL:
            raise RequestError(f"input_data.index[{i}]", f"{len(echoed)} bytes; a label has at most {MAX_LABEL}")
    # parameters sit inside input_data in the cards; accept them beside it too
    parameters = parse_parameters(data_in.get("parameters", body.get("parameters")), limits)
    rows = [_row(i, index[i] if i < len(index) else i, value, columns, limits, fetch) for i, value in enumerate(data)]
    for row in rows if parameters.strength is not None else []:
        if row.error is None and row.image is None:
            row.error = RequestError(f"data[{row.position}].image", "missing: with parameters.strength "
                                                                    "(image-to-image, inpainting) each row needs one")
    for row in rows:
        if row.error is None and (error := _ip_image_error(row, parameters)):
            row.error = error
    seed = parameters.seed if parameters.seed is not None else random_seed()
    return Request(rows, parameters, seed, limits, form, parameters.prompt_syntax or prompt_syntax)


def _ip_image_error(row: Row, p: Parameters) -> RequestError | None:
    """A row's reference images go with `parameters.ip_adapter`: each row has at least one, or none without it."""
    if p.ip_adapter is not None and not row.ip_images:
        return RequestError(f"data[{row.position}].ip_image", "missing: with parameters.ip_adapter (an image prompt) "
                                                              "each row needs its reference image (or a list of them)")
    if p.ip_adapter is None and row.ip_images:
        return RequestError(f"data[{row.position}].ip_image", "a reference image needs the adapter that reads it: "
                                                              "give parameters.ip_adapter")
    return None


def image_urls(body, limits: Limits) -> list[str]:
    """The URL cells of a request body's images, masks, control and reference images, for a server to fetch before
    it parses the body (`parse`'s `fetch` hands them over): at most four a row of `limits.max_rows` (the others are
    not fetched, their rows' errors), none where the body is not a request (`parse` then says why)."""
    try:
        columns, data = _columns(body["input_data"]), body["input_data"]["data"]
    except (RequestError, KeyError, TypeError):
        return []
    if not isinstance(data, list) or len(data) > limits.max_rows:
        return []
    urls = []
    for position, value in enumerate(data):
        try:
            cells = _cells(value, columns, f"data[{position}]")
        except RequestError:
            continue
        for name in IMAGE_COLUMNS:
            cell = cells.get(name)
            urls += [c for c in (cell if isinstance(cell, list) else [cell]) if is_url(c) and c not in urls]
    return urls[:4 * limits.max_rows]


def row_seed(request: Request, row: Row) -> int:
    return (request.seed + row.position) % (MAX_SEED + 1)


def negative_prompt(request: Request, row: Row) -> str | None:
    """The row's own negative prompt, else the request's."""
    return row.negative_prompt if row.negative_prompt is not None else request.parameters.negative_prompt


# --------------------------------------------------------------------------------------- response


def error_object(row: Row, error: RequestError) -> dict:
    prompt = echo(row.prompt, 1000) if isinstance(row.prompt, str) else None  # (not a string: not repeated)
    return {"prompt": prompt, "index": row.label, "error": {"field": error.field, "message": error.message}}


def respond(objects: list[dict], form: str = "rows"):
    """The response body in `form`: "rows" (a list, one object per image or failed row), or the SD 1.5 / 1.4
    cards' single object of lists (flags as the strings "True"/"False", as those cards show them)."""
    if form == "rows":
        return objects
    images = [o for o in objects if "error" not in o]
    key = "generated_images" if form == "sd14" else "generated_image"
    body = {key: [o["generated_image"] for o in images],
            "nsfw_content_detected": [None if o["nsfw_content_detected"] is None else str(o["nsfw_content_detected"])
                                      for o in images]}
    errors = [o for o in objects if "error" in o]
    return [body | ({"errors": errors} if errors else {})]
