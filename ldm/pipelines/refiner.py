"""The SDXL base → refiner hand-off (the SDXL model card's "ensemble of expert denoisers"), as one pipeline.

    pipe = Refined(StableDiffusion.from_pretrained("sdxl-base"), StableDiffusion.from_pretrained("sdxl-refiner"))
    result = pipe("a lion", seed=1)   # the base runs the first 80% of the schedule, the refiner the rest

The base stops at `start` (a request's `refiner_start` overrides it) and hands its σ-space latents to the
refiner, which finishes the same schedule with the same generators: diffusers' `denoising_end` /
`denoising_start` rule, image for image. Only one of the two models sits on the accelerator at a time: the one
that waits is parked on the CPU. The infotext names the base as Model and the refiner as Refiner, as A1111
does. Anything else (`unet`, `vae_scale`, `chunk_count`, `load_lora`, …) is the base's.
"""

import secrets
from collections.abc import Sequence

import torch

from ldm.errors import InputError
from ldm.pipelines.request import GenerationRequest
from ldm.pipelines.stable_diffusion import Callback, Generation, Generators, StableDiffusion, StableDiffusionXL

DEFAULT_START = 0.8  # the SDXL model card's and diffusers' example


class Refined:
    """An SDXL base with its refiner; called like a pipeline (a `GenerationRequest`, or a prompt and keywords)."""

    def __init__(self, base: StableDiffusion, refiner: StableDiffusion, start: float = DEFAULT_START):
        if not (isinstance(base, StableDiffusionXL) and isinstance(refiner, StableDiffusionXL)):
            raise InputError(f"the hand-off is between SDXL models; {base.name} and {refiner.name} are "
                             f"{type(base).__name__} and {type(refiner).__name__}", field="refiner")
        if base.requires_aesthetics_score or not refiner.requires_aesthetics_score:
            raise InputError(f"{base.name} → {refiner.name}: the first must be an SDXL base, the second an SDXL "
                             "refiner", field="refiner")
        if not 0 < start < 1:
            raise InputError(f"refiner start must be strictly between 0 and 1, got {start}", field="refiner_start")
        self.base, self.refiner, self.start = base, refiner, start
        self.device = base.device  # where the running model sits; the waiting one is parked on the CPU
        if refiner.device != torch.device("cpu") and self.device.type != "cpu":
            refiner.to("cpu")

    def __getattr__(self, name: str):
        if name in ("base", "refiner"):  # not yet set (a half-built object): no recursion
            raise AttributeError(name)
        return getattr(self.base, name)

    @property
    def name(self) -> str:
        return f"{self.base.name} + {self.refiner.name}"

    def _on_device(self, pipe: StableDiffusion) -> None:
        """Park the other model on the CPU and bring `pipe` to the accelerator (nothing moves on a CPU run)."""
        if self.device.type == "cpu" or pipe.device == self.device:
            return
        other = self.refiner if pipe is self.base else self.base
        other.to("cpu")
        pipe.to(self.device)

    def __call__(self, request: GenerationRequest | str | list[str], negative_prompt: str | list[str] | None = None,
                 *, callbacks: Sequence[Callback] = (), generator: Generators | None = None,
                 describe: dict | None = None, **options) -> Generation:
        if not isinstance(request, GenerationRequest):
            request = GenerationRequest(request, negative_prompt, **options)
        request.check()
        if request.image is not None or request.latents is not None:
            raise InputError("the refiner finishes a text-to-image run; image-to-image and inpainting run without "
                             "it", field="image")
        if request.hires_scale is not None:
            raise InputError("the hires fix redraws a finished image; it does not combine with a refiner",
                             field="hires_scale")
        if request.denoising_end is not None or request.denoising_start is not None:
            raise InputError("denoising_start/denoising_end: the hand-off point of a base with a refiner is "
                             "refiner_start", field="denoising_end")
        start = self.start if request.refiner_start is None else request.refiner_start
        if request.seed is None:
            request = request.replace(seed=secrets.randbits(32))
        generator = generator or request.generators()  # both halves draw from the same stream, as in diffusers
        base_part = request.replace(denoising_end=start, refiner_start=None, aesthetic_score=None,
                                    negative_aesthetic_score=None)
        self._on_device(self.base)
        first = self.base(base_part, callbacks=callbacks, generator=generator)
        self._on_device(self.refiner)
        # the PNG names the base as Model (with its hash and LoRAs) and the refiner as Refiner, as A1111 does
        described = {k: first.params[k] for k in ("Model hash", "Model", "VAE", "Tiling", "Lora hashes")} | {
            "Refiner": self.refiner.name, "Refiner switch at": start} | (describe or {})
        refiner_part = request.replace(latents=first.latents, denoising_start=start, refiner_start=None,
                                       target_size=None, loras=[],
                                       prompt_loras=False)  # the base's LoRAs are for the base
        result = self.refiner(refiner_part, callbacks=callbacks, generator=generator, describe=described)
        result.notes = list(dict.fromkeys(first.notes + result.notes))
        result.evaluations += first.evaluations
        return result

    def decode(self, latents: torch.Tensor):
        """Decode with the VAE of whichever model sits where the latents are (the two share the SDXL VAE)."""
        running = self.refiner if self.refiner.device == latents.device != self.base.device else self.base
        return running.decode(latents)

    def load_embedding(self, path):
        """A textual-inversion embedding for both models (the refiner takes its OpenCLIP-bigG vectors)."""
        self.refiner.load_embedding(path)
        return self.base.load_embedding(path)

    def to(self, device: torch.device | str) -> "Refined":
        self.device = torch.device(device)
        if self.device.type == "cpu":
            self.base.to("cpu")
            self.refiner.to("cpu")
        else:
            self._on_device(self.base)
        return self
