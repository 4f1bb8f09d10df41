"""The SDXL base → refiner hand-off (the SDXL model card's "ensemble of expert denoisers"), a pipeline of its own.

    pipe = BaseWithRefiner(StableDiffusion.from_pretrained("sdxl-base"),
                           StableDiffusion.from_pretrained("sdxl-refiner"))
    result = pipe("a lion", seed=1)   # the base runs the first 80% of the schedule, the refiner the rest

The base stops at `start` (a request's `refiner_start` overrides it) and hands its σ-space latents to the
refiner, which finishes the same schedule with the same generators: diffusers' `denoising_end` /
`denoising_start` rule, image for image. On an accelerator both models stay resident when its free memory holds
the refiner with room for a run (`RESIDENT_HEADROOM`; an H100/H200 holds both), and the refiner is accelerated
like the base (fused projections, channels_last, its own CUDA graph); only under memory pressure does the model
that waits go to the CPU, each hand-off then moving both across the bus (and the moved base capturing its graphs
again). A note says which was chosen (`placement`). The infotext names the base as Model and the refiner as
Refiner, as A1111 does. Besides the call, it has the part of a pipeline's surface that its users read (the
command line, the server, attention maps, offload): its name, device and dtype, both models' networks, and what
the base decides (native size, VAE scale, prompt chunks and text towers, embeddings, notes, LoRAs).
"""

from collections.abc import Sequence
from pathlib import Path

import torch

from ldm.errors import InputError
from ldm.pipelines.request import GenerationRequest, checked, derived, random_seed
from ldm.pipelines.stable_diffusion import Generation, Generators, StableDiffusion
from ldm.sampling.samplers import StepCallback
from ldm.speed.accelerate import accelerate, speed_wrapper
from ldm.speed.offload import tensors
from ldm.speed.tiling import free_bytes

DEFAULT_START = 0.8  # the SDXL model card's and diffusers' example
BASE_IDENTITY = ("Model hash", "Model", "VAE", "Tiling", "Lora hashes")  # the base's, in the infotext (`identity`)
# Free memory kept beyond the refiner's weights for both to stay resident: a 1024² SDXL run's UNet activations
# (batch 2, fp16: about 2 GiB) and its fp32 VAE decode (`ldm.speed.tiling`'s estimate: 4 GiB), with room to spare.
RESIDENT_HEADROOM = 8 * 2**30


def weight_bytes(pipe: StableDiffusion) -> int:
    """The bytes of a pipeline's weights (every network's parameters and buffers)."""
    return sum(t.numel() * t.element_size() for network in pipe.networks().values() for t in tensors(network))


def weights_device(pipe: StableDiffusion) -> torch.device:
    """Where a pipeline's UNet weights are (the CPU, before an offload moves them in for each run)."""
    return next(pipe.networks()["unet"].parameters()).device


def same_device(a: torch.device, b: torch.device) -> bool:
    """`cuda` (the current device, as `--device auto` gives it) and `cuda:0` are the same device here."""
    return a.type == b.type and (a.index is None or b.index is None or a.index == b.index)


def keeps_both(refiner_bytes: int, free: int, headroom: int = RESIDENT_HEADROOM) -> bool:
    """Whether the refiner joins the base on the accelerator: its weights and `headroom` fit in `free`."""
    return free >= refiner_bytes + headroom


def check_hand_off(base: StableDiffusion, refiner: StableDiffusion, start: float) -> None:
    """An SDXL base, then an SDXL refiner (their family specs say so), and a start strictly inside the schedule."""
    if not (base.spec.xl and refiner.spec.xl):
        raise InputError(f"the hand-off is between SDXL models; {base.name} and {refiner.name} are "
                         f"{base.spec.label} and {refiner.spec.label}", field="refiner")
    if base.spec.refiner or not refiner.spec.refiner:
        raise InputError(f"{base.name} → {refiner.name}: the first must be an SDXL base, the second an SDXL "
                         "refiner", field="refiner")
    if not 0 < start < 1:
        raise InputError(f"refiner start must be strictly between 0 and 1, got {start}", field="refiner_start")


class BaseWithRefiner:
    """An SDXL base with its refiner; called like a pipeline (a `GenerationRequest`, or a prompt and keywords)."""

    def __init__(self, base: StableDiffusion, refiner: StableDiffusion, start: float = DEFAULT_START):
        check_hand_off(base, refiner, start)
        self.base, self.refiner, self.start = base, refiner, start
        self._device = base.device  # where the running model sits (both, when `resident`)
        self.resident, self.placement = False, None  # placement: the note that says which was chosen
        self._place()

    # ------------------------------------------------------------------------------ the surface

    @property
    def name(self) -> str:
        return f"{self.base.name} + {self.refiner.name}"

    @property
    def device(self) -> torch.device:
        """Where the running model computes (both, when `resident`; else the waiting one is parked on the CPU,
        unless offloaded)."""
        return self._device

    @device.setter
    def device(self, device: torch.device | str) -> None:
        """Where both models compute from now on, their weights left where they are: offload's execution device
        (`ldm.speed.offload`: its hooks bring the weights, so nothing is parked). `to` moves them."""
        self._device = self.base.device = self.refiner.device = torch.device(device)

    @property
    def dtype(self) -> torch.dtype:
        return self.base.dtype

    @property
    def native_size(self) -> int:
        return self.base.native_size

    @property
    def vae_scale(self) -> int:
        return self.base.vae_scale

    @property
    def defaults(self) -> dict:
        """The base's card defaults (`StableDiffusion.defaults`): a request's steps, guidance and size."""
        return self.base.defaults

    @property
    def embeds_guidance(self) -> bool:
        """Whether the base's UNet takes the guidance as an input (`StableDiffusion.embeds_guidance`)."""
        return self.base.embeds_guidance

    @property
    def notes(self) -> list[str]:
        """The base's notes from loading."""
        return self.base.notes

    @property
    def embeddings(self) -> dict:
        """The base's textual-inversion embeddings (`load_embedding` gives both models each one)."""
        return self.base.embeddings

    def chunk_count(self, text: str, prompt_syntax: str = "a1111") -> int:
        return self.base.chunk_count(text, prompt_syntax)

    def text_towers(self, clip_skip: int = 1) -> list:
        """The base's text towers (CLIP-L first): how the prompt is read."""
        return self.base.text_towers(clip_skip)

    def networks(self) -> dict[str, torch.nn.Module]:
        """Both models' networks (`StableDiffusion.networks`), named `base.unet`, `refiner.unet`, …: offloaded as
        one, they share one execution device and, in model mode, one resident network at a time."""
        return {f"{part}.{name}": network for part, pipe in (("base", self.base), ("refiner", self.refiner))
                for name, network in pipe.networks().items()}

    def load_lora(self, path: str | Path, weight: float = 1.0):
        """A LoRA for the base (`StableDiffusion.load_lora`): the refiner finishes the base's run without it."""
        return self.base.load_lora(path, weight)

    def load_embedding(self, path: str | Path):
        """A textual-inversion embedding for both models (the refiner takes its OpenCLIP-bigG vectors)."""
        self.refiner.load_embedding(path)
        return self.base.load_embedding(path)

    def decode(self, latents: torch.Tensor):
        """Decode with the VAE of whichever model sits where the latents are (the two share the SDXL VAE)."""
        running = self.refiner if self.refiner.device == latents.device != self.base.device else self.base
        return running.decode(latents)

    def to(self, device: torch.device | str) -> "BaseWithRefiner":
        """Move to `device`: on the CPU both models; elsewhere the base, and the refiner too where both fit
        (`_place`)."""
        self._device = torch.device(device)
        if self._device.type == "cpu":
            self.base.to("cpu")
            self.refiner.to("cpu")
        else:
            self.base.to(self._device)
        self._place()
        return self

    def _place(self) -> None:
        """On an accelerator the base's weights are on (not a CPU run, not an offload to come): both models
        resident when the free memory holds the refiner and `RESIDENT_HEADROOM`, else the refiner parked on the
        CPU until its turn. The choice is a note (`placement`, in every result's notes)."""
        self.base.notes[:] = [n for n in self.base.notes if n != self.placement]
        self.resident, self.placement = False, None
        if self._device.type == "cpu" or not same_device(weights_device(self.base), self._device):
            return
        need = 0 if same_device(weights_device(self.refiner), self._device) else weight_bytes(self.refiner)
        free = free_bytes(self._device)
        self.resident = keeps_both(need, free)
        gib = f"{free / 2**30:.1f} GiB free on {self._device}, the refiner's weights {need / 2**30:.1f} GiB"
        if self.resident:
            self._to_device(self.refiner)
            note = f"refiner: both models resident ({gib} + {RESIDENT_HEADROOM / 2**30:.0f} GiB for the run)"
        else:
            self.refiner.to("cpu")
            note = (f"refiner: parked on the CPU between turns, each hand-off moving both models ({gib}: less than "
                    f"{RESIDENT_HEADROOM / 2**30:.0f} GiB would be left for the run)")
        self.base.notes.append(note)
        self.placement = note

    def _to_device(self, pipe: StableDiffusion) -> None:
        """`pipe` to the accelerator; the refiner accelerated there as the base was, the first time (fused
        projections, channels_last, the CUDA graph when the base has one; not compiled)."""
        pipe.to(self._device)
        base_speed = speed_wrapper(self.base.networks()["unet"])
        if pipe is self.refiner and base_speed is not None and speed_wrapper(pipe.networks()["unet"]) is None:
            accelerate(pipe, compile=False, cuda_graph=base_speed.graphs is not None)

    def _on_device(self, pipe: StableDiffusion) -> None:
        """Bring `pipe` to the accelerator, parking the other model on the CPU unless both are resident (nothing
        moves on a CPU run)."""
        if self.device.type == "cpu" or pipe.device == self.device:
            return
        if not self.resident:
            (self.refiner if pipe is self.base else self.base).to("cpu")
        self._to_device(pipe)

    # -------------------------------------------------------------------------------- the run

    def __call__(self, request: GenerationRequest | str | list[str], negative_prompt: str | list[str] | None = None,
                 *, callbacks: Sequence[StepCallback] = (), generator: Generators | None = None,
                 describe: dict | None = None, **options) -> Generation:
        """Run the base up to the start (`start`, or the request's `refiner_start`), then the refiner from its
        latents, both drawing from the same generators (`generator`, or those seeded from the seed)."""
        if not isinstance(request, GenerationRequest):
            request = GenerationRequest(request, negative_prompt, **options)
        request = self._check(request)
        start = self.start if request.refiner_start is None else request.refiner_start
        if request.seed is None:
            request = derived(request, seed=random_seed())
        generator = generator or request.generators()  # both halves draw from the same stream, as in diffusers
        self._on_device(self.base)
        first = self.base(derived(request, denoising_end=start, refiner_start=None, aesthetic_score=None,
                                  negative_aesthetic_score=None), callbacks=callbacks, generator=generator)
        self._on_device(self.refiner)
        refiner_part = derived(request, latents=first.latents, denoising_start=start, refiner_start=None,
                               target_size=None, loras=[], controls=[], image_prompts=[],
                               prompt_loras=False)  # the base's LoRAs, ControlNets and image prompts: the base's
        # the PNG names the base as Model (with its hash and LoRAs) and the refiner as Refiner, as A1111 does
        described = {"Refiner": self.refiner.name, "Refiner switch at": start} | (describe or {})
        return first.then(lambda params: self.refiner(refiner_part, callbacks=callbacks, generator=generator,
                                                      describe=params), BASE_IDENTITY, described)

    def _check(self, request: GenerationRequest) -> GenerationRequest:
        """The request checked (once: `ldm.pipelines.request.checked`), and what a hand-off does not run refused."""
        request = checked(request, self.base.scheduler.num_train_timesteps)
        if request.image is not None or request.latents is not None:
            raise InputError("the refiner finishes a text-to-image run; image-to-image and inpainting run without "
                             "it", field="image")
        if request.hires_scale is not None:
            raise InputError("the hires fix redraws a finished image; it does not combine with a refiner",
                             field="hires_scale")
        if request.denoising_end is not None or request.denoising_start is not None:
            raise InputError("denoising_start/denoising_end: the hand-off point of a base with a refiner is "
                             "refiner_start", field="denoising_end")
        return request
