"""One generation request: every parameter of a run, checked in one place.

    request = GenerationRequest("a cat", steps=30, seed=1).check()   # the checks that need no model
    result = pipe(request)                                           # the rest, against the loaded model

The command line, the scoring adapter (`ldm serve`) and `ldm batch` all build one, so the same mistake gets
the same message from each. `check()` knows nothing of the model and runs before gigabytes of weights load;
the pipeline then checks what depends on the model (sizes against its VAE, inpainting against its UNet,
SDXL micro-conditioning against its kind, clip skip against its towers' depth) when it runs the request.
An error names the field at fault (`InputError.field`).
"""

import dataclasses
import math
import secrets
from dataclasses import dataclass, field

import torch
from PIL import Image
from torch import Tensor

from ldm.choices import (
    CONTROL_MAX_WEIGHT,
    CONTROL_MODES,
    CONTROL_RESIZE_MODES,
    EMPHASES,
    HIRES_MAX_SCALE,
    HIRES_UPSCALERS,
    SYNTAXES,
    TIMESTEP_SPACINGS,
)
from ldm.errors import InputError
from ldm.pipelines.preprocess import PREPROCESSORS, RESOLUTION, opencv_missing
from ldm.sampling.samplers import SAMPLERS

MAX_SEED = 2**64 - 1
MAX_CLIP_SKIP = 12  # A1111's range; a model with fewer text layers refuses what it cannot skip
# stands for an image or mask not read yet (a file, a request's rows) while a request is checked
IMAGE_PLACEHOLDER = Image.new("RGB", (8, 8))


@dataclass(frozen=True)
class Control:
    """One ControlNet unit: a ControlNet (a diffusers ControlNet folder, or its name in weights/controlnet/) and its
    control image (an edge map, a depth map, a pose…, or a picture its `preprocess` makes one of), fitted to the
    output's size by `resize`. `weight` scales its residuals (diffusers' `controlnet_conditioning_scale`); it acts
    from `start` to `end`, fractions of the steps (diffusers' `control_guidance_start/end`); `mode` is A1111's
    control mode (`ldm.choices.CONTROL_MODES`); `guess_mode` is diffusers' (residuals × logspace(−1, 0), the
    conditional half of guidance only). `resize` is sd-webui-controlnet's resize mode (`CONTROL_RESIZE_MODES`:
    just-resize stretches it, as diffusers does); `preprocess` one of its preprocessors that need no model
    (`CONTROL_PREPROCESSORS`; None: the image is the control image), with its parameters `threshold_a` and
    `threshold_b` (A1111's; `CONTROL_PREPROCESSOR_PARAMS`: canny's low and high thresholds, …; None: their
    defaults, and ignored by a preprocessor without them) and `processor_res` (the short side canny, threshold and
    blur work at; None: 512), or instead sd-webui-controlnet's `pixel_perfect`: that resolution computed from the
    image's size, the output's and the resize mode (`ldm.pipelines.preprocess.pixel_perfect_resolution`). See
    `ldm.pipelines.preprocess`."""

    model: "str | object"  # a path or name, or a loaded `ldm.networks.controlnet.ControlNet`
    image: Image.Image
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    mode: str = "balanced"
    guess_mode: bool = False
    resize: str = "just-resize"
    preprocess: str | None = None
    threshold_a: float | None = None
    threshold_b: float | None = None
    processor_res: int | None = None
    pixel_perfect: bool = False
    unit: int | None = None  # its index among the request's sd-webui-controlnet units (A1111 API): their order

    def check(self, bad, where: str) -> None:
        if not isinstance(self.image, Image.Image):
            bad("control_image", f"{where}: the control image must be an image")
        if not isinstance(self.pixel_perfect, bool):
            bad("control_pixel_perfect", f"{where}: pixel perfect is true or false, got {self.pixel_perfect!r}")
        if not _number(self.weight) or not 0 <= self.weight <= CONTROL_MAX_WEIGHT:
            bad("control_weight", f"{where}: the weight must be from 0 to {CONTROL_MAX_WEIGHT:g}, got {self.weight!r}")
        if not (_number(self.start) and _number(self.end) and 0 <= self.start < self.end <= 1):
            bad("control_start", f"{where}: start and end must be fractions of the steps with 0 ≤ start < end ≤ 1, "
                                 f"got {self.start!r} and {self.end!r}")
        if self.mode not in CONTROL_MODES:
            bad("control_mode", f"{where}: unknown control mode {self.mode!r} (use {', '.join(CONTROL_MODES)})")
        if self.resize not in CONTROL_RESIZE_MODES:
            bad("control_resize", f"{where}: unknown resize mode {self.resize!r} (use "
                                  f"{', '.join(CONTROL_RESIZE_MODES)})")
        if self.preprocess is not None:
            self._check_preprocess(bad, where)
        if self.resize != "just-resize" and (missing := opencv_missing(f"the resize mode {self.resize}")):
            bad("control_resize", f"{where}: {missing}")
        _check_unit(self.unit, bad, "control_unit", where)

    def _check_preprocess(self, bad, where: str) -> None:
        """The preprocessor, the parameters it has (those it has not are not read) and OpenCV, which it needs."""
        if self.preprocess not in PREPROCESSORS:
            bad("control_preprocess", f"{where}: unknown preprocessor {self.preprocess!r} (use "
                                      f"{', '.join(PREPROCESSORS)}, or none)")
        p = PREPROCESSORS[self.preprocess]
        for field_name, which, value, param in (("threshold_a", "threshold A", self.threshold_a, p.param(0)),
                                                ("threshold_b", "threshold B", self.threshold_b, p.param(1)),
                                                ("processor_res", "processor resolution", self.processor_res,
                                                 RESOLUTION if p.resolution else None)):
            if value is not None and param is not None and not param.accepts(value):
                what = f" ({param.what})" if param is not RESOLUTION else ""
                bad(f"control_{field_name}", f"{where}: {self.preprocess}'s {which}{what} must be {param.rule}, "
                                             f"got {value!r}")
        if missing := opencv_missing(self.preprocess):
            bad("control_preprocess", f"{where}: {missing}")


@dataclass(frozen=True)
class ImagePrompt:
    """An image prompt (IP-Adapter): an adapter file (a path, or its name in weights/ipadapter/) and its reference
    images (one, or several: their encodings averaged). `weight` scales its image attention (diffusers'
    `set_ip_adapter_scale`; 0 to 2, sd-webui-controlnet's slider); it acts from `start` to `end`, fractions of the
    steps (ControlNet's rule); `encoder` is the CLIP image encoder (a CLIPVisionModelWithProjection folder, or its
    name in weights/clip_vision/; None: the first there whose width the adapter reads). See
    `ldm.pipelines.image_prompts`."""

    adapter: "str | object"  # a path or name, or a loaded `ldm.networks.ip_adapter.IPAdapter`
    images: "Image.Image | list[Image.Image]"
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    encoder: "str | object | None" = None
    unit: int | None = None  # its index among the request's sd-webui-controlnet units (A1111 API): their order

    @property
    def references(self) -> list[Image.Image]:
        return list(self.images) if isinstance(self.images, (list, tuple)) else [self.images]

    def check(self, bad, where: str) -> None:
        references = self.references
        if not references or not all(isinstance(image, Image.Image) for image in references):
            bad("ip_image", f"{where}: the reference images must be images (one, or a list)")
        if not _number(self.weight) or not 0 <= self.weight <= CONTROL_MAX_WEIGHT:
            bad("ip_weight", f"{where}: the weight must be from 0 to {CONTROL_MAX_WEIGHT:g}, got {self.weight!r}")
        if not (_number(self.start) and _number(self.end) and 0 <= self.start < self.end <= 1):
            bad("ip_start", f"{where}: start and end must be fractions of the steps with 0 ≤ start < end ≤ 1, "
                            f"got {self.start!r} and {self.end!r}")
        _check_unit(self.unit, bad, "ip_unit", where)


def _check_unit(unit, bad, field_name: str, where: str) -> None:
    if unit is not None and not (isinstance(unit, int) and not isinstance(unit, bool) and unit >= 0):
        bad(field_name, f"{where}: unit is its index among sd-webui-controlnet's units, a whole number ≥ 0, got "
                        f"{unit!r}")


@dataclass
class GenerationRequest:
    """What to generate. Defaults: the model's native size (an image's own, rounded down to a multiple of 8,
    when there is one), the model folder's sampler, 50 steps, guidance 7.5, strength 0.8 (0.3 for SDXL, 1.0
    with a mask), a random seed; a model whose card says otherwise (`StableDiffusion.defaults`: SD-Turbo's 1 step
    without guidance, say) has the card's steps, guidance and size. See `StableDiffusion.__call__` for each
    parameter's meaning."""

    prompt: str | list[str]
    negative_prompt: str | list[str] | None = None
    steps: int | None = None  # None: the model card's, else 50
    guidance: float | None = None  # None: the card's, else 7.5; classifier-free guidance is on above 1 (diffusers')
    guidance_rescale: float = 0.0
    seed: int | list[int] | None = None  # a list: one per prompt or per image (not inpainting)
    width: int | None = None
    height: int | None = None
    sampler: str | None = None
    karras: bool = False
    timestep_spacing: str | None = None  # `ldm.choices.TIMESTEP_SPACINGS`; None: the model's scheduler config's
    eta: float | None = None  # DDIM's η, TCD's γ; None: the sampler's own (DDIM 0, TCD 0.3)
    num_images: int = 1  # per prompt
    # image-to-image: an image (for every image of the batch), one image per image of the batch, or the VAE
    # latents (scaled, as diffusers' img2img takes a 4-channel tensor) of one or of each; with `mask` (and one
    # image), inpainting (white = repaint)
    image: Image.Image | list[Image.Image] | Tensor | None = None
    mask: Image.Image | None = None
    strength: float | None = None
    # SDXL micro-conditioning, (height, width) and (top, left) pairs; the refiner's aesthetic scores
    original_size: tuple[int, int] | None = None
    crop_coords: tuple[int, int] | None = None
    target_size: tuple[int, int] | None = None
    aesthetic_score: float | None = None
    negative_aesthetic_score: float | None = None
    # the base → refiner hand-off: stop after a fraction of the schedule; resume σ-space latents from there
    denoising_end: float | None = None
    denoising_start: float | None = None
    latents: Tensor | None = None
    refiner_start: float | None = None  # for `BaseWithRefiner` (an SDXL base with its refiner): the hand-off point
    prompt_syntax: str = "a1111"
    emphasis: str = "original"
    clip_skip: int = 1
    loras: list[tuple[str, float]] = field(default_factory=list)  # names in weights/loras, merged for this call
    prompt_loras: bool = True  # False: <lora:…> tags in the prompt are not merged (a refiner finishing a base's run)
    # A1111's hires fix (text-to-image): generate, upscale by `hires_scale` (`ldm.pipelines.hires`), then
    # image-to-image at the larger size with `hires_steps` (default: `steps`) at strength `hires_denoise` (default:
    # 0.7, A1111's)
    hires_scale: float | None = None
    hires_steps: int | None = None
    hires_denoise: float | None = None
    hires_upscaler: str | None = None  # `ldm.choices.HIRES_UPSCALERS` (default: latent, A1111's)
    output_type: str = "pil"  # "latent": the result's `latents` (VAE-scaled), undecoded, as in diffusers
    controls: list[Control] = field(default_factory=list)  # ControlNet units, their residuals summed
    image_prompts: list[ImagePrompt] = field(default_factory=list)  # IP-Adapter image prompts, their attention added
    # set by `checked`/`derived` only: the training timesteps this request passed `check` against (None: not yet);
    # `replace` starts it afresh
    checked_steps: int | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    @property
    def negatives(self) -> list[str] | None:
        """One negative prompt per prompt, or None when none was given."""
        if self.negative_prompt is None:
            return None
        if isinstance(self.negative_prompt, str):
            return [self.negative_prompt] * len(self.prompts)
        return list(self.negative_prompt)

    @property
    def batch(self) -> int:
        return len(self.prompts) * self.num_images

    def replace(self, **changes) -> "GenerationRequest":
        return dataclasses.replace(self, **changes)

    def check(self, max_steps: int = 1000) -> "GenerationRequest":
        """Reject what no model could run, with a message that says what to pass instead; returns self.
        `max_steps`: the model's training timesteps, where it is known. The first problem found is the error."""

        def bad(name: str, message: str):
            raise InputError(message, field=name)

        self._check_prompts(bad)
        if self.mask is not None and self.image is None:
            bad("mask", "--mask needs the image it applies to (--image)")
        self._check_image(bad)
        if self.strength is not None and self.image is None:
            bad("strength", "--strength applies to image-to-image and inpainting: give an --image")
        self._check_sampling(bad, max_steps)
        self._check_seeds(bad)
        self._check_fractions(bad)
        if self.output_type not in ("pil", "latent"):
            bad("output_type", f"output type must be pil or latent, got {self.output_type!r}")
        self._check_hires(bad, max_steps)
        for n, control in enumerate(self.controls):
            if not isinstance(control, Control):
                bad("controls", "each control must be a Control(model, image, …)")
            control.check(bad, f"ControlNet unit {n}")
        for n, prompt in enumerate(self.image_prompts):
            if not isinstance(prompt, ImagePrompt):
                bad("image_prompts", "each image prompt must be an ImagePrompt(adapter, images, …)")
            prompt.check(bad, f"image prompt {n}")
        return self

    def _check_prompts(self, bad) -> None:
        """Prompts and negative prompts (as many), how they are read, and the clip skip."""
        prompts = self.prompts
        if not prompts or not all(isinstance(p, str) for p in prompts):
            bad("prompt", "the prompt must be a text or a list of texts")
        negatives = self.negatives
        if negatives is not None and (len(negatives) != len(prompts) or not all(isinstance(n, str) for n in negatives)):
            bad("negative_prompt", f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if self.prompt_syntax not in SYNTAXES:
            bad("prompt_syntax", f"unknown prompt syntax {self.prompt_syntax!r} (use {' or '.join(SYNTAXES)})")
        if self.emphasis not in EMPHASES:
            bad("emphasis", f"unknown emphasis {self.emphasis!r} (use {', '.join(EMPHASES)})")
        if not _whole(self.clip_skip) or not 1 <= self.clip_skip <= MAX_CLIP_SKIP:
            bad("clip_skip", f"clip skip must be a whole number from 1 (the last layer) to {MAX_CLIP_SKIP}, "
                             f"got {self.clip_skip!r}")

    def _check_sampling(self, bad, max_steps: int) -> None:
        """The sampler (and --karras for it), the steps, the size, the guidance and the number of images."""
        if self.sampler is not None and self.sampler not in SAMPLERS:
            bad("sampler", f"unknown sampler {self.sampler!r}; choose one of: {', '.join(SAMPLERS)}")
        if self.karras and self.sampler is not None and not SAMPLERS[self.sampler].karras:
            bad("karras", f"--karras applies to {', '.join(n for n, s in SAMPLERS.items() if s.karras)}, "
                          f"not to {self.sampler}")
        if self.timestep_spacing is not None and self.timestep_spacing not in TIMESTEP_SPACINGS:
            bad("timestep_spacing", f"unknown timestep spacing {self.timestep_spacing!r} (use "
                                    f"{', '.join(TIMESTEP_SPACINGS)})")
        if self.timestep_spacing is not None and self.sampler is not None and not SAMPLERS[self.sampler].spacing:
            bad("timestep_spacing", f"--timestep-spacing applies to "
                                    f"{', '.join(n for n, s in SAMPLERS.items() if s.spacing)}, not to {self.sampler} "
                                    f"(its steps come from its distillation grid)")
        if self.steps is not None and (not _whole(self.steps) or not 1 <= self.steps <= max_steps):
            bad("steps", f"steps must be a whole number from 1 to {max_steps} (the training timesteps), "
                         f"got {self.steps!r}")
        for name in ("width", "height"):
            value = getattr(self, name)
            if value is not None and (not _whole(value) or value < 8 or value % 8):
                nearest = f"; the nearest are {value // 8 * 8} and {value // 8 * 8 + 8}" if _whole(value) and \
                    value > 8 else ""
                bad(name, f"{name} must be a positive multiple of 8, got {value!r}{nearest}")
        if self.guidance is not None and (not _number(self.guidance) or not math.isfinite(self.guidance)
                                          or self.guidance < 0):
            bad("guidance", f"guidance must be a number ≥ 0, got {self.guidance}")
        if not _whole(self.num_images) or self.num_images < 1:
            bad("num_images", f"the number of images must be ≥ 1, got {self.num_images!r}")

    def _check_seeds(self, bad) -> None:
        """A seed, or a list of them: one per prompt or one per image."""
        seeds = self.seed if isinstance(self.seed, list) else [self.seed]
        for seed in seeds:
            if seed is not None and (not _whole(seed) or not 0 <= seed <= MAX_SEED):
                bad("seed", f"seed must be between 0 and {MAX_SEED}, got {seed}")
        if isinstance(self.seed, list) and (len(seeds) not in (len(self.prompts), self.batch) or self.mask is not None):
            bad("seed", "a list of seeds is one per prompt or one per image (inpainting takes one seed)")

    def _check_fractions(self, bad) -> None:
        """The values between 0 and 1 (eta, guidance rescale, strength, the base → refiner hand-off), and
        denoising_start with the latents it resumes."""
        if self.eta is not None and (not _number(self.eta) or not 0 <= self.eta <= 1):
            bad("eta", f"eta must be between 0 and 1, got {self.eta}")
        if not _number(self.guidance_rescale) or not 0 <= self.guidance_rescale <= 1:
            bad("guidance_rescale", f"guidance rescale must be between 0 and 1, got {self.guidance_rescale}")
        if self.strength is not None and (not _number(self.strength) or not 0 < self.strength <= 1):
            bad("strength", f"strength must be in (0, 1], got {self.strength}")
        for name in ("denoising_start", "denoising_end", "refiner_start"):
            value = getattr(self, name)
            if value is not None and (not _number(value) or not 0 < value < 1):
                bad(name, f"{name.replace('_', ' ')} must be strictly between 0 and 1, got {value}")
        if (self.latents is None) != (self.denoising_start is None) or (
                self.latents is not None and self.image is not None):
            bad("denoising_start", "denoising_start goes with latents (from a run with denoising_end), "
                                   "without an image")

    def _check_image(self, bad) -> None:
        image = self.image
        if image is None or isinstance(image, Image.Image):
            return
        if isinstance(image, Tensor):
            if image.ndim != 4 or image.shape[0] not in (1, self.batch):
                bad("image", f"latents given as the image must be (1 or {self.batch}, channels, height, width), "
                             f"got {tuple(image.shape)}")
        elif not isinstance(image, list) or not image or not all(isinstance(i, Image.Image) for i in image):
            bad("image", "the image must be an image, a list of images or a latents tensor")
        elif len(image) not in (1, self.batch):
            bad("image", f"{len(image)} images for a batch of {self.batch}: give one, or one per image")
        if self.mask is not None:
            bad("mask", "inpainting takes one image (a PIL image), not a list or latents")

    def _check_hires(self, bad, max_steps: int) -> None:
        """The hires fix's own checks; the final size against a server's limits is `hires_size`'s."""
        if self.hires_scale is None:
            for name in ("hires_steps", "hires_denoise", "hires_upscaler"):
                if getattr(self, name) is not None:
                    bad(name, f"{name.replace('_', ' ')} goes with a hires scale (--hires-scale)")
            return
        if not _number(self.hires_scale) or not 1 <= self.hires_scale <= HIRES_MAX_SCALE:
            bad("hires_scale", f"hires scale must be from 1 to {HIRES_MAX_SCALE:g} (the factor the first image is "
                               f"upscaled by), got {self.hires_scale}")
        if self.hires_steps is not None and (not _whole(self.hires_steps) or not 1 <= self.hires_steps <= max_steps):
            bad("hires_steps", f"hires steps must be a whole number from 1 to {max_steps}, got {self.hires_steps!r}")
        if self.hires_denoise is not None and (not _number(self.hires_denoise) or not 0 < self.hires_denoise <= 1):
            bad("hires_denoise", f"hires denoising strength must be in (0, 1], got {self.hires_denoise}")
        if self.hires_upscaler is not None and self.hires_upscaler not in HIRES_UPSCALERS:
            bad("hires_upscaler", f"unknown hires upscaler {self.hires_upscaler!r}; choose one of: "
                                  f"{', '.join(HIRES_UPSCALERS)}")
        for name in ("image", "latents", "denoising_end"):
            if getattr(self, name) is not None:
                bad("hires_scale", f"the hires fix is a second pass of text-to-image; it does not combine with "
                                   f"{name}")

    def generators(self) -> torch.Generator | list[torch.Generator]:
        """The CPU generator(s) the run draws from (design decision 4): one seeded with `seed`, or one per seed of
        a list. A base and its refiner share them, as in diffusers. The seed must be set."""
        if isinstance(self.seed, list):
            return [torch.Generator("cpu").manual_seed(s) for s in self.seed]
        return torch.Generator("cpu").manual_seed(self.seed)


def _whole(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def hires_size(width: int, height: int, scale: float, multiple: int = 8) -> tuple[int, int]:
    """The hires pass's size for a first pass of width × height: A1111's int(size × scale), rounded down to the
    VAE's multiple."""
    return tuple(int(v * scale) // multiple * multiple for v in (width, height))


def random_seed() -> int:
    """The seed of a run whose request names none: 32 random bits (any seed up to `MAX_SEED` is accepted)."""
    return secrets.randbits(32)


def checked(request: GenerationRequest, max_steps: int = 1000) -> GenerationRequest:
    """`request` checked once: `request.check(max_steps)`, unless this very request passed it already against as
    many training timesteps or fewer (the command line checks before the model loads, the pipeline's plan then
    takes it as it is). `replace` makes a new request, checked where it runs; the parts of a run that a pipeline
    makes of a checked request are `derived`. (A field set in place on a checked request is not checked: change a
    request with `replace`.)"""
    if request.checked_steps is None or request.checked_steps > max_steps:
        request.check(max_steps)
        request.checked_steps = max_steps
    return request


def derived(request: GenerationRequest, **changes) -> GenerationRequest:
    """`request.replace(**changes)` for a part of a run that a pipeline makes of a checked request (a hires fix's
    two passes, a base's and a refiner's halves, the seed drawn for them): valid by construction, so checked as
    `request` was and not again."""
    part = request.replace(**changes)
    part.checked_steps = request.checked_steps
    return part
