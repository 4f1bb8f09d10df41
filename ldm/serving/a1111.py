"""AUTOMATIC1111's web API (`/sdapi/v1`) on `ldm serve`, for the clients people already have (Open WebUI, SillyTavern,
the `webuiapi` package, scripts written for A1111): on the same worker, queue, limits and `GenerationRequest` as
`/score`.

Reproduces the routes and fields of A1111 1.10 (modules/api/api.py, modules/api/models.py; the defaults of
modules/processing.py's StableDiffusionProcessing): txt2img and img2img, options, sd-models, samplers, schedulers,
upscalers, latent-upscale-modes, sd-vae, loras, embeddings, cmd-flags, memory, png-info, progress, interrupt and
skip. A request's fields are read by pydantic models as A1111's are (a field of the wrong type is a 422 naming it);
fields ldm has no use for are accepted and listed in the response's `info` (`ignored`). An unknown sampler is a 404,
as in A1111. sd-webui-controlnet's units (`alwayson_scripts.controlnet.args`) are ControlNet units, or image prompts
where their module is one of its IP-Adapter modules (`image_prompts_of`).

A body is held to what `/score` holds its rows to before it is queued (`check_body`): the server's limits (steps,
pixels, images: batch_size × n_iter), prompts bounded before they are tokenized, strings that are valid Unicode, LoRA
tags of the server's folder (answers name no folder), images refused by their header's size before they are
decoded: each a 422 naming the field.
"""

import contextvars
import dataclasses
import json
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from pydantic import BaseModel, ConfigDict

from ldm.choices import (
    CONTROL_MODES,
    CONTROL_PREPROCESSORS,
    CONTROL_RESIZE_MODES,
    HIRES_UPSCALERS,
    KARRAS_SAMPLERS,
    SAMPLER_LABELS,
)
from ldm.errors import InputError, LdmError
from ldm.hooks.live_preview import live_preview
from ldm.loading.controlnets import find_controlnet
from ldm.loading.ip_adapters import find_image_encoder, find_ip_adapter, image_encoder_of_width
from ldm.pipelines.image_prompts import ip_adapter
from ldm.pipelines.images import MAX_INPUT_PIXELS, decode_image, encode_png
from ldm.pipelines.infotext import (
    ENCODER_WIDTHS,
    FACE_ID_MODULES,
    IP_ADAPTER_MODULES,
    image_infotext,
    parse_infotext,
)
from ldm.pipelines.request import MAX_SEED, Control, GenerationRequest, ImagePrompt, hires_size, random_seed
from ldm.pipelines.stable_diffusion import Generation
from ldm.serving.limits import Limits
from ldm.serving.runner import Cancelled
from ldm.serving.schema import (
    IMAGE_TOO_LARGE,
    MAX_PROMPT_CHARS,
    RequestError,
    _check_lora_tags,
    echo,
    text,
    too_many_pixels,
)

VERSION = "ldm (A1111 1.10 API)"
SAMPLER_OF = {label: name for name, label in SAMPLER_LABELS.items()}
UPSCALER_OF = {label: name for name, label in HIRES_UPSCALERS.items()}
SCHEDULERS = {"automatic": "Automatic", "karras": "Karras"}  # A1111's names → labels, of the ones ldm has
# fields of A1111's request that ldm reads; any other field given a value other than its default is `ignored`
USED = {"prompt", "negative_prompt", "seed", "sampler_name", "sampler_index", "scheduler", "batch_size", "n_iter",
        "steps", "cfg_scale", "width", "height", "eta", "denoising_strength", "enable_hr", "hr_scale", "hr_upscaler",
        "hr_second_pass_steps", "override_settings", "send_images", "save_images", "init_images", "mask",
        "include_init_images", "restore_faces", "tiling", "alwayson_scripts", "styles", "subseed", "subseed_strength",
        "seed_resize_from_h", "seed_resize_from_w", "do_not_save_samples", "do_not_save_grid", "s_churn", "s_tmax",
        "s_tmin", "s_noise", "override_settings_restore_afterwards", "script_args", "script_name", "firstphase_width",
        "firstphase_height", "hr_resize_x", "hr_resize_y", "hr_prompt", "hr_negative_prompt", "hr_sampler_name",
        "hr_scheduler", "hr_checkpoint_name", "resize_mode", "inpainting_fill", "mask_blur", "inpaint_full_res",
        "inpaint_full_res_padding", "inpainting_mask_invert", "initial_noise_multiplier", "image_cfg_scale"}
PROMPTS = ("prompt", "negative_prompt", "hr_prompt", "hr_negative_prompt")  # bounded as /score bounds its prompts
# a GenerationRequest field (an InputError's) → the A1111 field that sets it
FIELD_OF = {"guidance": "cfg_scale", "sampler": "sampler_name", "karras": "scheduler", "num_images": "batch_size",
            "clip_skip": "override_settings.CLIP_stop_at_last_layers", "strength": "denoising_strength",
            "hires_scale": "hr_scale", "hires_steps": "hr_second_pass_steps", "hires_denoise": "denoising_strength",
            "hires_upscaler": "hr_upscaler", "image": "init_images", "controls": "alwayson_scripts.controlnet.args",
            "image_prompts": "alwayson_scripts.controlnet.args", "ip_image": "alwayson_scripts.controlnet.args",
            "ip_weight": "alwayson_scripts.controlnet.args", "ip_start": "alwayson_scripts.controlnet.args"}
# the pixels of the images decoded while a body is checked (`check_body`; ControlNet units' images: 4 × the server's
# pixels per image, as /score takes them, since they are resized to the generation's size)
IMAGE_PIXELS: contextvars.ContextVar[int] = contextvars.ContextVar("IMAGE_PIXELS", default=MAX_INPUT_PIXELS)
PREVIEW_EVERY_S = 0.2  # a live preview is decoded at most this often, and only while a client asks for it
WATCHED_S = 3.0  # … that is, within this long of a `progress` request that asked for it


class Txt2Img(BaseModel):
    """`StableDiffusionTxt2ImgProcessingAPI`: A1111's fields and defaults (the rest accepted as they come)."""

    model_config = ConfigDict(extra="allow")
    prompt: str = ""
    negative_prompt: str = ""
    styles: list[str] = []
    seed: int = -1
    sampler_name: str | None = None
    sampler_index: str = "Euler"
    scheduler: str | None = None
    batch_size: int = 1
    n_iter: int = 1
    steps: int = 50
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    restore_faces: bool | None = None
    tiling: bool | None = None
    eta: float | None = None
    denoising_strength: float | None = None
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str | None = None
    hr_second_pass_steps: int = 0
    override_settings: dict = {}
    send_images: bool = True
    save_images: bool = False
    alwayson_scripts: dict = {}


class Img2Img(Txt2Img):
    """`StableDiffusionImg2ImgProcessingAPI`: the init images (base64), the mask, the strength."""

    init_images: list[str] = []
    mask: str | None = None
    denoising_strength: float = 0.75
    include_init_images: bool = False
    inpainting_fill: int = 0


class ApiError(Exception):
    """An answer other than 200: A1111's status and its `detail` text."""

    def __init__(self, status: int, detail: str):
        detail = echo(detail, 2000)  # (the server's folders not named)
        super().__init__(detail)
        self.status, self.detail = status, detail


def sampler_of(body: Txt2Img) -> tuple[str, bool]:
    """(ldm's sampler, Karras σ) of A1111's `sampler_name` (or `sampler_index`) and `scheduler`; A1111 before 1.9
    wrote the schedule into the name ("DPM++ 2M Karras")."""
    label = body.sampler_name or body.sampler_index
    karras = label.endswith(" Karras")
    name = SAMPLER_OF.get(label.removesuffix(" Karras"))
    if name is None:
        raise ApiError(404, f"Sampler not found: {label}")
    schedule = (body.scheduler or "automatic").lower()
    if schedule not in SCHEDULERS:
        raise ApiError(404, f"Scheduler not found: {body.scheduler} (ldm has {', '.join(SCHEDULERS.values())})")
    karras = karras or schedule == "karras"
    if karras and name not in KARRAS_SAMPLERS:
        raise ApiError(422, f"scheduler: Karras is not available for {label}")
    return name, karras


def ignored(body: Txt2Img) -> list[str]:
    """The fields of the body that ldm did not use: the extra ones, and override settings other than clip skip."""
    extra = sorted(k for k, v in (body.model_extra or {}).items() if k not in USED and v not in (None, "", 0, [], {}))
    overrides = sorted(k for k in body.override_settings if k not in ("CLIP_stop_at_last_layers",
                                                                      "sd_model_checkpoint", "sd_vae"))
    return extra + [f"override_settings.{k}" for k in overrides]


def requests_of(body: Txt2Img, image=None, mask=None) -> list[GenerationRequest]:
    """One request per iteration (`n_iter`), each of `batch_size` images with seeds seed + i, as A1111 numbers them."""
    sampler, karras = sampler_of(body)
    seed = random_seed() if body.seed == -1 else body.seed
    if not 0 <= seed <= MAX_SEED:
        raise ApiError(422, f"seed: must be -1 or from 0 to {MAX_SEED}")
    clip_skip = int(body.override_settings.get("CLIP_stop_at_last_layers", 1) or 1)
    common = dict(negative_prompt=body.negative_prompt or None, steps=body.steps, guidance=body.cfg_scale,
                  width=body.width, height=body.height, sampler=sampler, karras=karras, clip_skip=clip_skip,
                  eta=body.eta if sampler in ("ddim", "tcd") else None, num_images=body.batch_size)
    common["controls"], common["image_prompts"] = controls_of(body), image_prompts_of(body)
    if image is not None:
        common |= {"image": image, "mask": mask, "strength": body.denoising_strength}
    elif body.enable_hr:
        common |= hires_of(body)

    def seeds(k: int):  # image i of iteration k: seed + k·batch + i (inpainting: one stream from the first)
        first = seed + k * body.batch_size
        return first if mask is not None else [first + i for i in range(body.batch_size)]

    return [GenerationRequest(body.prompt, seed=seeds(k), **common) for k in range(body.n_iter)]


MODULE_OF = {label: name for name, label in CONTROL_PREPROCESSORS.items()}
RESIZE_OF = {label: name for name, label in CONTROL_RESIZE_MODES.items()}
MODE_OF = {label: name for name, label in CONTROL_MODES.items()}


def enabled_units(body: Txt2Img) -> list[tuple[int, str, dict]]:
    """(its index, its field, the unit) of each enabled unit with a model of `alwayson_scripts.controlnet.args`,
    sd-webui-controlnet's API units (the key in any case: webuiapi writes "ControlNet")."""
    scripts = {key.lower(): value for key, value in body.alwayson_scripts.items()}
    args = (scripts.get("controlnet") or {}).get("args", []) if isinstance(scripts.get("controlnet"), dict) else []
    units = []
    for n, unit in enumerate(args):
        where = f"alwayson_scripts.controlnet.args[{n}]"
        if not isinstance(unit, dict):
            raise ApiError(422, f"{where}: expected an object")
        if unit.get("enabled", True) and str(unit.get("model", "None")) not in ("None", ""):
            units.append((n, where, unit))
    return units


def is_image_prompt(unit: dict) -> bool:
    """A unit of an IP-Adapter module (sd-webui-controlnet runs IP-Adapters as ControlNet units), FaceID's too."""
    module = str(unit.get("module", "none"))
    return module in IP_ADAPTER_MODULES or module.startswith(FACE_ID_MODULES)


def controls_of(body: Txt2Img) -> list[Control]:
    """The ControlNet units of `alwayson_scripts.controlnet.args` as sd-webui-controlnet takes them (its API's unit
    fields): enabled units with a model, of the server's weights/controlnet/ by name (A1111's "name [hash]" too),
    their image base64; control modes and resize modes by label or index; `pixel_perfect` as sent; a module ldm
    lacks is a 422 naming it. (Units of an IP-Adapter module are image prompts: `image_prompts_of`.)"""
    return [dataclasses.replace(control_unit(unit, where), unit=n) for n, where, unit in enabled_units(body)
            if not is_image_prompt(unit)]


def image_prompts_of(body: Txt2Img) -> list[ImagePrompt]:
    """The units of `alwayson_scripts.controlnet.args` of an IP-Adapter module as image prompts, in order (their
    encoders are picked on the worker, where the adapters are loaded: `fit_image_prompts`)."""
    return [dataclasses.replace(image_prompt_unit(unit, where), unit=n) for n, where, unit in enabled_units(body)
            if is_image_prompt(unit)]


def unit_image(unit: dict):
    """A unit's base64 image (`image`, or older clients' `input_image`, or {"image": …, "mask": …})."""
    image = unit.get("image") or unit.get("input_image")
    return image.get("image") if isinstance(image, dict) else image


def image_prompt_unit(unit: dict, where: str) -> ImagePrompt:
    """One sd-webui-controlnet API unit of an IP-Adapter module (`IP_ADAPTER_MODULES`) as an `ImagePrompt`: the
    adapter by name in the server's weights/ipadapter/ (A1111's "name [hash]" too; never a path), its reference
    image base64 (held to the bound the ControlNet units' images are), `weight`, `guidance_start`, `guidance_end`.
    A FaceID module is a 422 naming it."""
    module = str(unit.get("module"))
    if module.startswith(FACE_ID_MODULES):
        raise ApiError(422, f"{where}.module: {module} is an IP-Adapter FaceID module; ldm does not run FaceID "
                            "adapters (they read InsightFace's face embeddings, not a CLIP image encoder's)")
    name = str(unit["model"]).split(" [")[0]
    try:
        path = find_ip_adapter(name, allow_paths=False)
    except LdmError:
        raise ApiError(422, f"{where}.model: {echo(name, 200)!r} is not an IP-Adapter of the server's "
                            "weights/ipadapter/ (give the name of one there, not a path)") from None
    image = unit_image(unit)
    if not isinstance(image, str) or not image:
        raise ApiError(422, f"{where}.image: a base64 reference image is required")
    try:
        return ImagePrompt(str(path), decode_field(f"{where}.image", image), weight=float(unit.get("weight", 1.0)),
                           start=float(unit.get("guidance_start", 0.0)), end=float(unit.get("guidance_end", 1.0)))
    except (TypeError, ValueError):
        raise ApiError(422, f"{where}: weight, guidance_start and guidance_end must be numbers") from None


def fit_image_prompts(pipe, body: Txt2Img, requests: list[GenerationRequest]) -> list[GenerationRequest]:
    """On the worker, before the run: each IP-Adapter unit's adapter loaded for the served model (and kept), and its
    image encoder picked (`fit_image_prompt`); a unit that does not fit is a 422 naming it."""
    units = [(where, unit) for _, where, unit in enabled_units(body) if is_image_prompt(unit)]
    if not units or not requests:
        return requests
    runs = getattr(pipe, "base", pipe)  # (with a refiner, the base runs the image prompts)
    prompts = [fit_image_prompt(runs, prompt, where, str(unit["module"]))
               for prompt, (where, unit) in zip(requests[0].image_prompts, units, strict=True)]
    return [request.replace(image_prompts=prompts) for request in requests]


def fit_image_prompt(pipe, prompt: ImagePrompt, where: str, module: str) -> ImagePrompt:
    """The prompt with the encoder its module runs: the weights/clip_vision/ encoder of the width the module names
    (ip-adapter_clip_h: ViT-H/14, 1280; ip-adapter_clip_g: ViT-bigG/14, 1664) that gives the width the adapter reads
    (ip-adapter-auto: the first that does)."""
    name = Path(prompt.adapter).stem
    try:
        adapter = ip_adapter(pipe, prompt.adapter).config
    except LdmError as e:  # (an SDXL adapter on SD 1.x, …: the error names the adapter file and the model)
        raise ApiError(422, f"{where}.model: {e}") from None
    kind = IP_ADAPTER_MODULES[module]
    reads = f"{'hidden states' if adapter.reads_hidden_states else 'image embeddings'} of width {adapter.embed_dim}"
    if kind is None:
        try:
            return dataclasses.replace(prompt, encoder=str(find_image_encoder(None, adapter)))
        except LdmError:
            raise ApiError(422, f"{where}.module: no image encoder in the server's weights/clip_vision/ gives the "
                                f"{reads} IP-Adapter {name} reads") from None
    folder = image_encoder_of_width(adapter, ENCODER_WIDTHS[kind])
    if folder is None:
        tower = {"h": "ViT-H/14", "g": "ViT-bigG/14"}[kind]
        raise ApiError(422, f"{where}.module: {module} runs a {tower} image encoder (width {ENCODER_WIDTHS[kind]}); "
                            f"none in the server's weights/clip_vision/ gives the {reads} IP-Adapter {name} reads")
    return dataclasses.replace(prompt, encoder=str(folder))


def control_unit(unit: dict, where: str) -> Control:
    """One sd-webui-controlnet API unit as a `Control`."""
    def label(value, labels: dict, names: list, what: str):
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(names):
            return names[value]
        if value not in labels:
            raise ApiError(422, f"{where}.{what}: {value!r} is not one of {', '.join(labels)}")
        return labels[value]

    module = str(unit.get("module", "none"))
    if module != "none" and module not in MODULE_OF:
        raise ApiError(422, f"{where}.module: {module!r} is not a preprocessor ldm has ({', '.join(MODULE_OF)}); "
                            "send a preprocessed image with module none")
    try:
        path = find_controlnet(str(unit["model"]).split(" [")[0], allow_paths=False)
    except LdmError as e:
        raise ApiError(422, f"{where}.model: {e}") from None
    image = unit_image(unit)
    if not isinstance(image, str) or not image:
        raise ApiError(422, f"{where}.image: a base64 control image is required")
    preprocess = MODULE_OF.get(module)
    # a preprocessor's parameters (A1111's −1: its default)
    params = {} if preprocess is None else {key: None if unit.get(key) in (None, -1) else unit[key]
                                            for key in ("threshold_a", "threshold_b", "processor_res")}
    if not isinstance(unit.get("pixel_perfect", False), bool):
        raise ApiError(422, f"{where}.pixel_perfect: expected true or false, got {unit['pixel_perfect']!r}")
    try:
        return Control(str(path), decode_field(f"{where}.image", image), weight=float(unit.get("weight", 1.0)),
                       start=float(unit.get("guidance_start", 0.0)), end=float(unit.get("guidance_end", 1.0)),
                       mode=label(unit.get("control_mode", "Balanced"), MODE_OF, list(CONTROL_MODES), "control_mode"),
                       resize=label(unit.get("resize_mode", "Crop and Resize"), RESIZE_OF, list(CONTROL_RESIZE_MODES),
                                    "resize_mode"), preprocess=preprocess,
                       pixel_perfect=unit.get("pixel_perfect", False), **params)
    except (TypeError, ValueError):
        raise ApiError(422, f"{where}: weight, guidance_start and guidance_end must be numbers") from None


def hires_of(body: Txt2Img) -> dict:
    """The hires fix of `enable_hr`: its scale, second-pass steps (0: the first pass's), strength (A1111's
    `denoising_strength`, 0.7 when none) and upscaler (A1111's label; one ldm lacks falls back to Latent)."""
    upscaler = UPSCALER_OF.get(body.hr_upscaler or "Latent", "latent")
    return {"hires_scale": body.hr_scale, "hires_steps": body.hr_second_pass_steps or None,
            "hires_denoise": 0.7 if body.denoising_strength is None else body.denoising_strength,
            "hires_upscaler": upscaler}


def decode_field(name: str, value: str, max_pixels: int | None = None):
    """A base64 image of the body, refused by its header's size before it is decoded: over `max_pixels` (None: the
    bound of the body being checked, `IMAGE_PIXELS`); a 422 naming `name` otherwise."""
    max_pixels = IMAGE_PIXELS.get() if max_pixels is None else max_pixels

    def refuse(width: int, height: int) -> str | None:  # (/score's words for an image over the limit)
        if width * height <= max_pixels:
            return None
        return IMAGE_TOO_LARGE.format(width=width, height=height, max_pixels=max_pixels)

    try:
        return decode_image(value, name, max_pixels, refuse)
    except InputError as e:  # (its message names the field)
        raise ApiError(422, str(e) if str(e).startswith(name) else f"{name}: {e}") from None


def check_texts(value, where: str = "") -> None:
    """Every string of a body, its keys too, valid Unicode (a lone surrogate, which JSON lets through and UTF-8
    cannot encode, was a 500 when an answer repeated it), the prompts within /score's bound: a 422 naming the
    field otherwise (`schema.text`)."""
    try:
        if isinstance(value, str):
            text(value, where or "body", MAX_PROMPT_CHARS if where in PROMPTS else sys.maxsize)
        elif isinstance(value, dict):
            for key, item in value.items():
                name = f"{where}.{key}" if where else str(key)
                text(str(key), name, sys.maxsize)
                check_texts(item, name)
        elif isinstance(value, list):
            for n, item in enumerate(value):
                check_texts(item, f"{where}[{n}]")
    except RequestError as e:
        raise ApiError(422, str(e)) from None


def check_limits(body: Txt2Img, limits: Limits) -> None:
    """The server's limits (`--max-steps`, `--max-pixels`, `--max-images`: batch_size × n_iter), as /score holds
    its parameters to them."""
    if not 1 <= body.steps <= limits.max_steps:
        raise ApiError(422, f"steps: must be from 1 to {limits.max_steps} on this server, got {body.steps}")
    if body.enable_hr and not 0 <= body.hr_second_pass_steps <= limits.max_steps:
        raise ApiError(422, f"hr_second_pass_steps: must be from 0 to {limits.max_steps} on this server, got "
                            f"{body.hr_second_pass_steps}")
    for name in ("batch_size", "n_iter"):
        if getattr(body, name) < 1:
            raise ApiError(422, f"{name}: must be at least 1, got {getattr(body, name)}")
    if body.batch_size * body.n_iter > limits.max_images_per_prompt:
        raise ApiError(422, f"batch_size: {body.batch_size} × n_iter {body.n_iter} is {body.batch_size * body.n_iter}"
                            f" images; this server makes at most {limits.max_images_per_prompt} a request")
    larger = "width" if body.width >= body.height else "height"
    if error := too_many_pixels(larger, body.width, body.height, limits):
        raise ApiError(422, str(error))
    if body.enable_hr and body.hr_scale > 0:
        big_w, big_h = hires_size(body.width, body.height, body.hr_scale)
        if big_w * big_h > limits.max_pixels:
            raise ApiError(422, f"hr_scale: {body.width}x{body.height} upscaled {body.hr_scale:g}× is {big_w}x"
                                f"{big_h}, more than this server's {limits.max_pixels} pixels per image")


def check_body(body: Txt2Img, limits: Limits) -> tuple[list[GenerationRequest], object, object]:
    """A body checked as /score checks a request, before it is queued: its strings and prompts (`check_texts`), the
    LoRA tags of its prompts (of the server's folder; the answer names no folder), the server's limits, its images
    (`init_images`, `mask`, ControlNet units') refused by their header's size before they are decoded, then each
    iteration's request as every entry point checks one. Returns (the requests, the init image, the mask); a
    mistake is an ApiError naming the field."""
    check_texts(body.model_dump())
    for name in ("prompt", "negative_prompt"):
        try:
            _check_lora_tags(getattr(body, name), name)
        except RequestError as e:
            raise ApiError(422, str(e)) from None
    check_limits(body, limits)
    image = mask = None
    if isinstance(body, Img2Img):
        if not body.init_images:
            raise ApiError(422, "init_images: give at least one image")
        image = decode_field("init_images[0]", body.init_images[0], limits.max_pixels)
        mask = decode_field("mask", body.mask, limits.max_pixels) if body.mask else None
    bound = IMAGE_PIXELS.set(4 * limits.max_pixels)
    try:
        requests = requests_of(body, image, mask)
    finally:
        IMAGE_PIXELS.reset(bound)
    for request in requests:
        try:
            request.check()
        except InputError as e:
            name = FIELD_OF.get(e.field, e.field) or "body"
            raise ApiError(422, f"{name}: {e}") from None
    return requests, image, mask


@dataclass
class Progress:
    """What `/progress` reports: the running job's step of its steps, the jobs queued or running, and the live
    preview of the running job (`ldm.hooks.live_preview`), decoded on the worker, and only while a client asks
    for it: by the TAESD of `preview_vae` (loaded on first use) or A1111's cheap approximation."""

    jobs: int = 0
    step: int = 0
    steps: int = 0
    started: float = 0.0
    interrupted: threading.Event = field(default_factory=threading.Event)
    skipped: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    preview_vae: str | None = None  # a TAESD file or folder (`ldm serve --preview-vae`)
    tiny_vae: object = None  # … loaded
    preview: object = None  # the running job's latest preview (a PIL image), and when it was decoded
    preview_at: float = 0.0
    watched_until: float = 0.0  # a client asked for the preview this recently (`WATCHED_S`)

    def report(self, current_image: bool = False) -> dict:
        """A1111's ProgressResponse: progress and eta_relative of the running job, its state, and with
        `current_image` its latest preview (base64 PNG; None until one is decoded, and while no job runs)."""
        with self.lock:
            done = self.step / self.steps if self.steps else 0.0
            elapsed = time.monotonic() - self.started if self.started else 0.0
            eta = elapsed / done - elapsed if done > 0 else 0.0
            state = {"skipped": self.skipped.is_set(), "interrupted": self.interrupted.is_set(), "job": "",
                     "job_count": self.jobs, "job_timestamp": "0", "job_no": 0, "sampling_step": self.step,
                     "sampling_steps": self.steps}
            if current_image:
                self.watched_until = time.monotonic() + WATCHED_S
            preview = self.preview if current_image and self.jobs else None
        return {"progress": done if self.jobs else 0.0, "eta_relative": eta, "state": state,
                "current_image": None if preview is None else encode_png(preview), "textinfo": None}

    def observe(self, pipe, denoised) -> None:
        """On the worker, at a step: the preview of its x0 estimate, while a client watches (`PREVIEW_EVERY_S`)."""
        now = time.monotonic()
        if now > self.watched_until or now - self.preview_at < PREVIEW_EVERY_S:
            return
        if self.preview_vae is not None and self.tiny_vae is None:
            from ldm.loading.components import load_vae

            self.tiny_vae = load_vae(self.preview_vae, pipe.vae.config, pipe.spec, pipe.device, pipe.dtype)
        preview = live_preview(pipe, denoised, self.tiny_vae)
        with self.lock:
            self.preview, self.preview_at = preview, time.monotonic()


class Stopped(Exception):
    """Interrupt or skip: the run stops at this step; its images are the current estimate, decoded."""

    def __init__(self, denoised):
        super().__init__("stopped")
        self.denoised = denoised


def run_body(pipe, body: Txt2Img, progress: Progress, requests: list[GenerationRequest],
             cancelled: Callable[[], bool] = lambda: False) -> dict:
    """Every iteration of the body (its `requests`, `check_body`'s) through `pipe`: A1111's response (images,
    parameters, info). `cancelled()`: the client went away (the run stops at its next step)."""
    images, texts, seeds = [], [], []
    for request in requests:
        if progress.interrupted.is_set():
            break
        progress.skipped.clear()
        result = run_one(pipe, request, progress, cancelled)
        images += result.images
        texts += result.infotexts or [""] * len(result.images)
        seeds += request.seed if isinstance(request.seed, list) else [request.seed] * len(result.images)
    return {"images": [encode_png(i, t) for i, t in zip(images, texts, strict=True)] if body.send_images else [],
            "parameters": body.model_dump(exclude={"init_images", "mask"}),
            "info": json.dumps(info_of(pipe, body, seeds, texts))}


def run_one(pipe, request: GenerationRequest, progress: Progress, cancelled: Callable[[], bool]):
    """One iteration, its steps reported to `progress`; interrupted or skipped, its current estimate decoded."""

    def step(event) -> None:
        if cancelled():
            raise Cancelled()
        with progress.lock:
            progress.step, progress.steps = event.i + 1, event.total
        if progress.interrupted.is_set() or progress.skipped.is_set():
            raise Stopped(event.denoised)
        progress.observe(pipe, event.denoised)

    with progress.lock:
        progress.step, progress.steps, progress.started = 0, request.steps, time.monotonic()
        progress.preview, progress.preview_at = None, 0.0
    try:
        return pipe(request, callbacks=[step])
    except Stopped as stop:
        return Generation(pipe.decode(stop.denoised), 0, [])


def info_of(pipe, body: Txt2Img, seeds: list[int], texts: list[str]) -> dict:
    """A1111's `info` (processing.py `Processed.js`): the keys its clients read."""
    prompt = body.prompt
    params = parse_infotext(texts[0])[2] if texts and texts[0] else {}
    return {"prompt": prompt, "all_prompts": [prompt] * len(seeds), "negative_prompt": body.negative_prompt,
            "all_negative_prompts": [body.negative_prompt] * len(seeds), "seed": seeds[0] if seeds else body.seed,
            "all_seeds": seeds, "subseed": -1, "all_subseeds": [-1] * len(seeds), "subseed_strength": 0,
            "width": body.width, "height": body.height, "sampler_name": body.sampler_name or body.sampler_index,
            "cfg_scale": body.cfg_scale, "steps": body.steps, "batch_size": body.batch_size, "restore_faces": False,
            "face_restoration_model": None, "sd_model_name": pipe.name, "sd_model_hash": params.get("Model hash"),
            "sd_vae_name": params.get("VAE"), "sd_vae_hash": None, "seed_resize_from_w": -1,
            "seed_resize_from_h": -1, "denoising_strength": body.denoising_strength, "extra_generation_params": {},
            "index_of_first_image": 0, "infotexts": texts, "styles": body.styles, "job_timestamp": "0",
            "clip_skip": int(body.override_settings.get("CLIP_stop_at_last_layers", 1) or 1),
            "is_using_inpainting_conditioning": pipe.inpainting, "version": VERSION, "ignored": ignored(body)}


# ------------------------------------------------------------------------------------------------- routes


def checkpoint_of(pipe, model_name: str) -> dict:
    """The served model as A1111's `sd-models` lists one (`title` "name [hash10]", the hash a single file's sha256,
    as the infotext's Model hash): its name is the one it was started with, or that file's or folder's own name
    where it was started with a path (an answer names no path)."""
    from ldm.loading.hashes import sha256

    name = Path(model_name).name if Path(model_name).exists() else model_name
    digest = sha256(pipe.model_file) if pipe is not None and getattr(pipe, "model_file", None) else None
    return {"title": f"{name} [{digest[:10]}]" if digest else name, "model_name": name,
            "hash": digest[:10] if digest else None, "sha256": digest, "filename": name, "config": None}


def checkpoint_title(value, pipe, model_name: str, where: str) -> str:
    """`sd_model_checkpoint` (of `options` or `override_settings`): the served model by any of its titles, names or
    hashes (webuiapi's `util_set_model` sends the title) as its title; any other is a 404 naming `where` and the
    model served (ldm serves one model: it is never switched, and never loaded from a path)."""
    entry = checkpoint_of(pipe, model_name)
    names = {entry["title"], entry["model_name"], model_name} | ({entry["hash"], entry["sha256"]} - {None})
    if isinstance(value, str) and (value in names or value.split(" [")[0] in names):
        return entry["title"]
    shown = echo(value, 200) if isinstance(value, str) else repr(value)[:200]
    raise ApiError(404, f"{where}: {shown!r} is not loaded here (this server runs {entry['title']})")


def listing(pipe, model_name: str) -> dict:
    """What the GET routes list: the model (A1111's `title` is "name [hash10]"), samplers, upscalers, LoRAs."""
    from ldm.adapters.lora import lora_names

    loras = lora_names()
    return {
        "sd-models": [checkpoint_of(pipe, model_name)],
        "samplers": [{"name": label, "aliases": [n], "options": {}} for n, label in SAMPLER_LABELS.items()],
        "schedulers": [{"name": n, "label": label, "aliases": None, "default_rho": -1, "need_inner_model": False}
                       for n, label in SCHEDULERS.items()],
        "upscalers": [{"name": label, "model_name": None, "model_path": None, "model_url": None, "scale": 4}
                      for n, label in HIRES_UPSCALERS.items() if not n.startswith("latent")],
        "latent-upscale-modes": [{"name": label} for n, label in HIRES_UPSCALERS.items() if n.startswith("latent")],
        "sd-vae": [], "loras": [{"name": n, "alias": n, "path": n, "metadata": {}} for n in loras],
        "embeddings": {"loaded": {n: {"step": None, "sd_checkpoint": None, "sd_checkpoint_name": None}
                                  for n in getattr(pipe, "embeddings", {})}, "skipped": {}},
        "cmd-flags": {"api": True, "nowebui": True, "listen": False},
        "memory": {"ram": {}, "cuda": {"error": "not reported by ldm"}},
    }


def add_routes(app, submit, pipe_of, model_name: str, progress: Progress, limits: Limits = Limits()) -> None:
    """The /sdapi/v1 routes on `app` (FastAPI), and the page at `/`. `submit(http, work)` queues `work(pipe,
    cancelled)` on the server's worker and returns its result (or the server's refusal, as a response);
    `pipe_of()` is the loaded pipeline or None; `limits`: the server's, which bodies are held to."""
    add_error_answers(app)
    add_generation_routes(app, submit, pipe_of, model_name, progress, limits)
    add_state_routes(app, pipe_of, model_name, progress)
    add_png_info_route(app, limits)
    add_page(app)


def printable(value, limit: int = 200):
    """An answer's value with every string as an answer may repeat it (`schema.echo`: no lone surrogate, cut)."""
    if isinstance(value, str):
        return echo(value, limit)
    if isinstance(value, dict):
        return {printable(k): printable(v, limit) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [printable(v, limit) for v in value]
    return value


def add_error_answers(app) -> None:
    """FastAPI's answers to a body of the wrong shape (422, each error's `loc` naming the field) and to an
    HTTPException, with what they repeat of the request printable: a lone surrogate in a field of the wrong type
    was a 500, a base64 image of the wrong type was repeated whole."""
    from fastapi.encoders import jsonable_encoder
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    @app.exception_handler(RequestValidationError)
    async def invalid(http, error: RequestValidationError):
        return JSONResponse({"detail": printable(jsonable_encoder(error.errors()))}, status_code=422)

    @app.exception_handler(HTTPException)
    async def refused(http, error: HTTPException):
        return JSONResponse({"detail": printable(error.detail, 2000)}, status_code=error.status_code,
                            headers=getattr(error, "headers", None))


def add_generation_routes(app, submit, pipe_of, model_name: str, progress: Progress, limits: Limits) -> None:
    """`txt2img` and `img2img`: a body checked (`check_body`, off the event loop), then queued as one job on the
    server's worker."""
    from fastapi import HTTPException
    from fastapi import Request as HttpRequest
    from starlette.concurrency import run_in_threadpool

    async def generate(http, body: Txt2Img):
        try:
            if "sd_model_checkpoint" in body.override_settings:
                checkpoint_title(body.override_settings["sd_model_checkpoint"], pipe_of(), model_name,
                                 "override_settings.sd_model_checkpoint")
            requests, _, _ = await run_in_threadpool(check_body, body, limits)
        except ApiError as e:
            raise HTTPException(e.status, e.detail) from None
        progress.interrupted.clear()

        def work(pipe, cancelled):
            try:
                return run_body(pipe, body, progress, fit_image_prompts(pipe, body, requests), cancelled)
            except ApiError as e:
                return e

        with progress.lock:
            progress.jobs += 1
        try:
            result = await submit(http, work)
        finally:
            with progress.lock:
                progress.jobs -= 1
        if isinstance(result, ApiError):
            raise HTTPException(result.status, result.detail)
        return result

    @app.post("/sdapi/v1/txt2img")
    async def txt2img(body: Txt2Img, http: HttpRequest):
        return await generate(http, body)

    @app.post("/sdapi/v1/img2img")
    async def img2img(body: Img2Img, http: HttpRequest):
        result = await generate(http, body)
        if body.include_init_images:
            result["images"] = result["images"] + list(body.init_images)
        return result


def add_state_routes(app, pipe_of, model_name: str, progress: Progress) -> None:
    """What the server holds and does: the lists, options, progress, interrupt and skip."""
    from fastapi import HTTPException

    options: dict = {"sd_model_checkpoint": checkpoint_of(None, model_name)["title"], "CLIP_stop_at_last_layers": 1,
                     "sd_vae": "Automatic"}

    def listed(key: str):
        return listing(pipe_of(), model_name)[key]

    for key in ("sd-models", "samplers", "schedulers", "upscalers", "latent-upscale-modes", "sd-vae", "loras",
                "embeddings", "cmd-flags", "memory"):
        app.get(f"/sdapi/v1/{key}")(lambda key=key: listed(key))

    @app.get("/sdapi/v1/options")
    def get_options():
        return options | {"sd_model_checkpoint": checkpoint_of(pipe_of(), model_name)["title"]}

    @app.post("/sdapi/v1/options")
    def set_options(body: dict):
        try:
            check_texts(body)
            if "sd_model_checkpoint" in body:
                body = body | {"sd_model_checkpoint": checkpoint_title(body["sd_model_checkpoint"], pipe_of(),
                                                                       model_name, "sd_model_checkpoint")}
        except ApiError as e:
            raise HTTPException(e.status, e.detail) from None
        options.update(body)
        return None

    @app.get("/sdapi/v1/progress")
    def get_progress(skip_current_image: bool = False):
        """A1111's default sends the live preview (`current_image`); `?skip_current_image=true` leaves it out."""
        return progress.report(current_image=not skip_current_image)

    @app.post("/sdapi/v1/interrupt")
    def interrupt():
        if progress.jobs:
            progress.interrupted.set()
        return None

    @app.post("/sdapi/v1/skip")
    def skip():
        progress.skipped.set()
        return None


def add_png_info_route(app, limits: Limits) -> None:
    """png-info: the parameters an image carries, read as `--from-png` reads them (its header held to the server's
    pixel limit before decoding)."""
    from fastapi import HTTPException

    @app.post("/sdapi/v1/png-info")
    def png_info(body: dict):
        image = body.get("image")
        if not isinstance(image, str):
            raise HTTPException(422, "image: a base64 image is required")
        try:
            check_texts(body)
            picture = decode_field("image", image, limits.max_pixels) if image else None
        except ApiError as e:
            raise HTTPException(e.status, e.detail) from None
        text = image_infotext(picture)[0] if picture is not None else ""  # (a PNG text chunk, or EXIF)
        if not text:
            return {"info": "", "items": {}, "parameters": {}}
        prompt, negative, params = parse_infotext(text)
        return {"info": text, "items": {"parameters": text},
                "parameters": {"Prompt": prompt, "Negative prompt": negative} | params}


def add_page(app) -> None:
    """The page at `/`."""
    from fastapi.responses import HTMLResponse

    page = resources.files("ldm.serving").joinpath("page.html").read_text(encoding="utf-8")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index():
        """The page (ldm/serving/page.html): one static file, a client of the routes above and of nothing else."""
        return HTMLResponse(page)
