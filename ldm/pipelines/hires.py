"""AUTOMATIC1111's hires fix: draw the picture at the model's size, then redraw it larger.

    result = pipe("a castle", seed=1, width=512, height=512, hires_scale=2)   # a 1024×1024 image

The first pass is text-to-image at the size asked for. Its result is upscaled by `hires_scale` (A1111's
int(size × scale), rounded down to the VAE's multiple): the latents themselves (`latent`: bilinear, and the
other `latent-*` interpolations A1111 offers), or the decoded images (`lanczos`, `nearest`, with PIL). The
second pass is image-to-image of the upscaled result at the larger size: `hires_steps` steps (default: the
first pass's), strength `hires_denoise` (default 0.7, A1111's), the same prompts and seeds. It is exactly
`pipe(…, image=upscaled, strength=…, width=…, height=…)`, an explicit image-to-image, so everything
image-to-image does (its schedule cut, its random draws, diffusers' image-for-image rule) holds for it: the
second pass draws from generators seeded again from the seeds, as A1111 draws its hires noise.

The infotext is the first pass's (its Steps, Size and Seed) with A1111's `Denoising strength`, `Hires upscale`,
`Hires steps` (only when given) and `Hires upscaler`: pasted back into A1111, or `ldm generate --from-png`, it
redoes the same two passes.
"""

import dataclasses
from collections.abc import Sequence

import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.choices import HIRES_UPSCALERS
from ldm.pipelines.request import GenerationRequest, checked, derived, hires_size, random_seed

DEFAULT_DENOISE = 0.7  # A1111's default denoising strength of the hires pass
DEFAULT_UPSCALER = "latent"
# the latent upscalers: torch's interpolation mode and antialias, as A1111's `latent_upscale_modes`
LATENT_MODES = {"latent": ("bilinear", False), "latent-antialiased": ("bilinear", True),
                "latent-bicubic": ("bicubic", False), "latent-bicubic-antialiased": ("bicubic", True),
                "latent-nearest": ("nearest", False), "latent-nearest-exact": ("nearest-exact", False)}
IMAGE_FILTERS = {"lanczos": Image.Resampling.LANCZOS, "nearest": Image.Resampling.NEAREST}


def upscale_latents(latents: Tensor, size: tuple[int, int], upscaler: str = DEFAULT_UPSCALER) -> Tensor:
    """Latents (B, C, h, w) interpolated to `size` = (height, width) in latent pixels."""
    mode, antialias = LATENT_MODES[upscaler]
    return F.interpolate(latents, size=size, mode=mode, antialias=antialias)


def upscale_images(images: list[Image.Image], size: tuple[int, int], upscaler: str) -> list[Image.Image]:
    """Images resized to `size` = (width, height) with the upscaler's PIL filter."""
    return [image.resize(size, IMAGE_FILTERS[upscaler]) for image in images]


def hires_fix(pipe, request: GenerationRequest, callbacks: Sequence = (), generator=None, describe: dict | None = None):
    """Run `request` (with a `hires_scale`) as the two passes of the hires fix on `pipe`; returns the second
    pass's `Generation`, its infotexts describing the whole run. `generator` (default: seeded from the seed) is
    the first pass's; callbacks see both passes (each begins with `begin(total)`)."""
    r = checked(request, pipe.scheduler.num_train_timesteps)
    if r.seed is None:
        r = derived(r, seed=random_seed())  # one seed for both passes
    native = pipe.native_size
    width, height = r.width or pipe.defaults.get("width", native), r.height or pipe.defaults.get("height", native)
    big_w, big_h = hires_size(width, height, r.hires_scale, pipe.vae_scale)
    upscaler = r.hires_upscaler or DEFAULT_UPSCALER
    denoise = DEFAULT_DENOISE if r.hires_denoise is None else r.hires_denoise
    plain = dict(hires_scale=None, hires_steps=None, hires_denoise=None, hires_upscaler=None)

    first = pipe.generate(derived(r, width=width, height=height, output_type="latent", **plain), callbacks,
                          generator)
    if upscaler in LATENT_MODES:
        image = upscale_latents(first.latents, (big_h // pipe.vae_scale, big_w // pipe.vae_scale), upscaler)
    else:
        images = upscale_images(pipe.decode(first.latents), (big_w, big_h), upscaler)
        image = images[0] if len(images) == 1 else images
    first.latents = None  # (not kept while the second pass runs)

    # ControlNet units act in the second pass too, weighted softly as sd-webui-controlnet does there
    # ("is_in_high_res_fix": residual i × 0.825^(12 − i), which it finds "can significantly reduce artifacts")
    controls = [dataclasses.replace(c, mode="prompt") if c.mode == "balanced" else c for c in r.controls]
    second = derived(r, image=image, width=big_w, height=big_h, steps=r.hires_steps or r.steps, strength=denoise,
                     controls=controls, **plain)
    described = {"Denoising strength": denoise, "Hires upscale": r.hires_scale, "Hires steps": r.hires_steps,
                 "Hires upscaler": HIRES_UPSCALERS[upscaler]} | (describe or {})
    # the infotext keeps the first pass's Steps and Size (its Seed is the second's too)
    return first.then(lambda params: pipe.generate(second, callbacks, None, params), ("Steps", "Size"), described)
