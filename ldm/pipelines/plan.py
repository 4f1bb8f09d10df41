"""A request resolved against a model (`Plan`): the first stage of a generation (`StableDiffusion.plan`).

`make_plan` is a function of the model's family spec (`ldm.loading.families.ModelSpec`, a pipeline's `pipe.spec`:
its native size, latent and UNet input channels, image-to-image strength), the request, and two facts of the
loaded networks that the spec does not hold: the scheduler config (the sampler's grid, the default sampler) and
the VAE's scale (pixels per latent). Nothing in it reads a weight: a seed drawn where the request has none is
its one random choice.
"""

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.errors import InputError
from ldm.loading.families import ModelSpec
from ldm.pipelines.images import fit_size
from ldm.pipelines.request import GenerationRequest, checked, random_seed
from ldm.sampling.samplers import SAMPLERS, SamplerSpec, sampler_for
from ldm.sampling.schedules import Schedule, SchedulerConfig

Generators = torch.Generator | list[torch.Generator]
DEFAULT_STEPS, DEFAULT_GUIDANCE = 50, 7.5  # diffusers' pipelines' defaults, for a model whose card names none


@dataclass
class Plan:
    """A request resolved against a model: its defaults filled in (sampler, seed, strength, size), the σ grid to
    walk, the random generators and the latents' shape."""

    request: GenerationRequest
    spec: SamplerSpec
    karras: bool
    schedule: Schedule
    generator: "Generators"
    shape: tuple[int, int, int, int]

    @property
    def unet_calls(self) -> int:
        """The UNet calls this run makes, each one of diffusers' loop iterations: one per timestep of the schedule
        (PNDM's list holds its second one twice); Heun two per step but one into σ = 0."""
        n = len(self.schedule.timesteps)
        if self.spec.two_calls_per_step:
            return 2 * n - (1 if self.schedule.sigmas[-1] == 0 else 0)
        return n

    @property
    def seed(self) -> int:
        """The run's seed (the first, with one per prompt or image)."""
        seed = self.request.seed
        return seed[0] if isinstance(seed, list) else seed


def make_plan(spec: ModelSpec, request: GenerationRequest, scheduler: SchedulerConfig, vae_scale: int,
              name: str = "model", generator: Generators | None = None, card: dict | None = None) -> Plan:
    """Check the request against the model, fill in its defaults, and lay out the schedule and the random
    generators. `name`: the model, in messages; `generator` replaces the one(s) seeded from the request's seed;
    `card`: the model card's defaults (steps, guidance, width, height) where they differ from ldm's."""
    r = checked(request, scheduler.num_train_timesteps)
    sampler = pick_sampler(r, scheduler, name)
    check_against_model(spec, r, vae_scale, name)
    sampling = SAMPLERS[sampler]
    cut_or_pasted = r.denoising_start or r.denoising_end or (r.mask is not None and not spec.inpainting)
    if sampling.two_calls_per_step and cut_or_pasted:
        raise InputError(f"{sampler}: diffusers cuts the schedule (refiner hand-off) or pastes the known region "
                         "(inpainting with a 4-channel model) between the two halves of its steps, which ldm "
                         "does not imitate; pick another sampler for this", field="sampler")
    r = with_defaults(spec, r, sampler, vae_scale, card or {})
    karras = r.karras or (scheduler.use_karras_sigmas and sampling.karras)
    schedule = lay_out_schedule(r, sampling, scheduler, karras)
    generator = generator or r.generators()
    if isinstance(generator, list) and (r.batch % len(generator) or r.mask is not None):
        raise InputError(f"a list of generators is one per image ({r.batch}) or one per prompt; inpainting "
                         "takes one")
    shape = (r.batch, spec.latent_channels, r.height // vae_scale, r.width // vae_scale)
    return Plan(r, sampling, karras, schedule, generator, shape)


def pick_sampler(r: GenerationRequest, scheduler: SchedulerConfig, name: str) -> str:
    """The request's sampler, else the one the model's scheduler config runs (`sampler_for`)."""
    sampler = r.sampler or sampler_for(scheduler)
    if sampler is None:
        raise InputError(f"{name}'s scheduler ({scheduler.class_name}) is not one ldm implements; "
                         f"pick a sampler: {', '.join(SAMPLERS)}", field="sampler")
    if (r.karras or r.timestep_spacing) and r.sampler is None:  # the folder's sampler: check() saw none asked for
        r.replace(sampler=sampler).check()
    if scheduler.prediction_type not in SAMPLERS[sampler].predictions:
        raise InputError(f"{sampler}: {SAMPLERS[sampler].diffusers_class} does not take {name}'s prediction type "
                         f"{scheduler.prediction_type!r}; pick another sampler", field="sampler")
    return sampler


def check_against_model(spec: ModelSpec, r: GenerationRequest, vae_scale: int, name: str) -> None:
    """What the request asks that this model cannot do: a size its VAE does not divide, a refiner hand-off
    without a refiner, an inpainting UNet without a mask, latents of another shape."""
    for side in ("width", "height"):
        value = getattr(r, side)
        if value is not None and value % vae_scale:
            raise InputError(f"{side} must be a positive multiple of {vae_scale}, got {value!r}", field=side)
    if r.refiner_start is not None:
        raise InputError(f"refiner_start: {name} runs without a refiner (ldm serve/batch/generate "
                         "--refiner MODEL)", field="refiner_start")
    if spec.inpainting and r.mask is None:
        raise InputError(f"{name} is an inpainting model ({spec.unet_in_channels}-channel UNet): give it an image "
                         "and a mask", field="mask")
    latents, channels = r.latents, spec.latent_channels
    if latents is not None and latents.shape[:2] != (r.batch, channels):
        raise InputError(f"latents of shape {tuple(latents.shape)} do not fit {r.batch} images "
                         f"of {channels} latent channels", field="latents")
    if isinstance(r.image, Tensor) and r.image.shape[1] != channels:
        raise InputError(f"latents given as the image have {r.image.shape[1]} channels; {name}'s VAE has "
                         f"{channels}", field="image")


def with_defaults(spec: ModelSpec, r: GenerationRequest, sampler: str, vae_scale: int,
                  card: dict) -> GenerationRequest:
    """The request with its defaults: the sampler, a random seed, the steps and guidance (the model card's, else
    50 and 7.5), the strength (1.0 with a mask, else the family's image-to-image default), the size: the latents'
    or the image's (rounded down to a multiple of the VAE's scale), else the card's, else the model's native
    size."""
    if r.latents is not None:
        native_w, native_h = r.latents.shape[-1] * vae_scale, r.latents.shape[-2] * vae_scale
    elif isinstance(r.image, Tensor):
        native_w, native_h = r.image.shape[-1] * vae_scale, r.image.shape[-2] * vae_scale
    elif r.image is not None:
        native_w, native_h = fit_size(r.image[0] if isinstance(r.image, list) else r.image, vae_scale)
    else:
        native_w = card.get("width", spec.sample_size * vae_scale)
        native_h = card.get("height", spec.sample_size * vae_scale)
    seed = r.seed if r.seed is not None else random_seed()
    strength = r.strength if r.strength is not None else 1.0 if r.mask is not None else spec.default_strength
    steps = r.steps if r.steps is not None else card.get("steps", DEFAULT_STEPS)
    guidance = r.guidance if r.guidance is not None else card.get("guidance", DEFAULT_GUIDANCE)
    return r.replace(sampler=sampler, seed=seed, strength=strength, width=r.width or native_w,
                     height=r.height or native_h, steps=steps, guidance=guidance)


def lay_out_schedule(r: GenerationRequest, sampling: SamplerSpec, scheduler: SchedulerConfig,
                     karras: bool) -> Schedule:
    """The σ grid of `r.steps` steps (spaced as the request says, else as the scheduler config), then the part of it
    this run walks: image-to-image's tail (its strength),
    a refiner's tail after `denoising_start`, a base's head before `denoising_end`."""
    if r.timestep_spacing is not None:
        scheduler = dataclasses.replace(scheduler, timestep_spacing=r.timestep_spacing)
    schedule = sampling.schedule(scheduler, r.steps, karras)
    T = scheduler.num_train_timesteps
    if r.image is not None:
        schedule = schedule.from_strength(r.strength)
    if r.denoising_start is not None:
        schedule = schedule.since(r.denoising_start, T)
    if r.denoising_end is not None:
        schedule = schedule.until(r.denoising_end, T)
    return schedule
