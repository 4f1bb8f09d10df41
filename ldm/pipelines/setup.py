"""Loading a pipeline: a diffusers folder (or its Hub id) or an original single-file checkpoint → a ready
pipeline (`ldm.loading.components` reads the files; `StableDiffusion.from_components` builds the pipeline).

    pipe = load("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")   # StableDiffusion.from_pretrained

`RunSettings` holds every choice of which model runs and how (the model options `ldm generate`, `ldm serve` and
`ldm batch` share), and `prepare_pipeline` turns them into the pipeline that runs: loaded, seamless or VAE-tiled,
accelerated, with its refiner, offloaded, with its embeddings and LoRAs.

    pipe = prepare_pipeline(RunSettings("sdxl-base", refiner="sdxl-refiner", vae_tiling=True))
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from ldm.adapters.seamless import set_seamless
from ldm.errors import InputError
from ldm.loading.components import (
    DTYPES,
    hub_files,
    load_components,
    load_single_file_components,
    read_folder,
    resolve_device,
    resolve_dtype,
)
from ldm.loading.files import resolve, safetensors_header
from ldm.networks.taesd import TinyVAE
from ldm.pipelines.refiner import DEFAULT_START, BaseWithRefiner
from ldm.pipelines.request import GenerationRequest
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.accelerate import accelerate
from ldm.speed.offload import enable_offload
from ldm.speed.tiling import enable_vae_tiling


def load(model: str | Path, device: str = "auto", dtype: str = "auto", variant: str | None = None,
         revision: str | None = None, local_files_only: bool = False, prediction_type: str | None = None,
         safety_checker: bool = True, vae: str | Path | None = None, unet: str | Path | None = None) -> StableDiffusion:
    """`ldm.loading.components.load_components` → a pipeline (a `StableDiffusionXL` for SDXL models)."""
    return StableDiffusion.from_components(load_components(model, device, dtype, variant, revision, local_files_only,
                                                           prediction_type, safety_checker, vae, unet))


def load_single_file(path: str | Path, device: str = "auto", dtype: str = "auto", prediction_type: str | None = None,
                     vae: str | Path | None = None) -> StableDiffusion:
    """`ldm.loading.components.load_single_file_components` → a pipeline."""
    return StableDiffusion.from_components(load_single_file_components(path, device, dtype, prediction_type, vae))


def dtype_name(dtype: torch.dtype) -> str:
    """The name users type for a torch dtype (`ldm.loading.components.DTYPES`): fp32, fp16 or bf16."""
    return next(name for name, known in DTYPES.items() if known == dtype)


@dataclass(frozen=True)
class RunSettings:
    """Which model runs and how: the options of `ldm generate`, `ldm serve` and `ldm batch` that are not a
    request's (their command-line flags in parentheses where the name differs)."""

    model: str  # a diffusers folder, a single .safetensors file (or its name in weights/), a Hub id, a manifest name
    device: str = "auto"  # auto, cpu, cuda or cuda:N
    dtype: str = "auto"  # auto (fp16 on CUDA, fp32 on the CPU), fp32, fp16 or bf16
    variant: str | None = None  # the weights variant of a diffusers folder (*.fp16.safetensors)
    revision: str | None = None  # a Hub revision
    local_files_only: bool = False  # never contact the Hub
    prediction_type: str | None = None  # eps, v or sample, over the model's own
    safety_checker: bool = True  # (--no-safety-checker: False) the checker of models that ship one
    vae: str | None = None  # another VAE: a diffusers vae/ folder or a .safetensors file of the model's family
    unet: str | None = None  # another UNet (the distilled ones shipped alone): a diffusers UNet folder or a file
    vae_tiling: bool = False  # decode and encode in tiles always (otherwise only where a whole pass would not fit)
    vae_tile_size: int | None = None  # pixels (default: the VAE config's sample_size)
    seamless: bool = False  # (--tiling) circular padding in every convolution of the UNet and VAE
    compile: bool | str = False  # (--compile, --compile-mode) torch.compile: True or a `COMPILE_MODES` name
    cuda_graph: bool = True  # (--no-cuda-graph: False) on CUDA, replay the UNet step as a captured CUDA graph
    offload: str | None = None  # "model" or "sequential": the weights wait on the CPU (`ldm.speed.offload`)
    refiner: str | None = None  # an SDXL refiner that finishes the SDXL base's text-to-image runs
    refiner_start: float | None = None  # the fraction of the schedule the base runs (default: 0.8)
    embeddings: tuple[str, ...] = ()  # textual-inversion files (--embedding)
    loras: tuple[tuple[str | Path, float], ...] = ()  # (LoRA file, weight), merged at load (--lora)

    def check(self) -> "RunSettings":
        """Reject the combinations and values no model could load, before any weight is read; returns self."""
        if self.refiner_start is not None and not self.refiner:
            raise InputError("--refiner-start goes with --refiner", field="refiner_start")
        GenerationRequest("", refiner_start=self.refiner_start).check()  # the library's range check and message
        if self.seamless and (self.vae_tiling or self.vae_tile_size):
            raise InputError("--tiling does not combine with --vae-tiling: each VAE tile would wrap on itself",
                             field="vae_tiling")
        if self.vae_tile_size is not None and (self.vae_tile_size < 32 or self.vae_tile_size % 8):
            raise InputError(f"--vae-tile-size must be a multiple of 8 pixels, at least 32, got {self.vae_tile_size}",
                             field="vae_tile_size")
        for name in ("vae", "unet"):
            if getattr(self, name) is not None and not Path(getattr(self, name)).exists():
                raise InputError(f"--{name} {getattr(self, name)}: no such file or folder", field=name)
        for path in self.embeddings:
            if not Path(path).is_file():
                raise InputError(f"--embedding {path}: no such file", field="embeddings")
        if self.offload and self.compile:
            raise InputError("--offload does not combine with --compile: compiled code and CUDA graphs keep the "
                             "weights where they were when compiled (leave out one of them)", field="offload")
        return self


def offload_device(settings: RunSettings) -> torch.device:
    """The offload's execution device: the GPU the run is on. Refused on the CPU (and with compile: `check`)."""
    device = resolve_device(settings.device)
    if device.type == "cpu":
        raise InputError("--offload moves weights between the CPU and a GPU, and this run is on the CPU (--device "
                         "cpu, or no CUDA device here): there is nothing to offload, leave it out", field="offload")
    return device


def check_models(settings: RunSettings) -> None:
    """Everything that can be said before the weights load: the settings, the device, and that the model (and
    the refiner) can be found and read — a single file's safetensors header, a folder's model_index.json and
    configs. (`ldm serve` says a mistake here at once, instead of a server that is up and failed.)"""
    resolve_device(settings.device)
    settings.check()
    if settings.offload:
        offload_device(settings)
    for model in (settings.model, settings.refiner) if settings.refiner else (settings.model,):
        root = resolve(model, hub_files(settings.variant), settings.revision, settings.local_files_only)
        if root.is_file() and settings.variant is not None:
            raise InputError(f"--variant {settings.variant} selects files in a diffusers folder; {root} is a single "
                             "file", field="variant")
        if root.is_file():
            safetensors_header(root)  # exists, is not a pickle, and its header reads
        else:
            read_folder(root)  # model_index.json and the configs


def _load_one(settings: RunSettings, model: str, device: str, dtype: str, prediction_type: str | None,
              unet: str | None = None):
    """One model as the settings load it, seamless or VAE-tiled (before `accelerate`: its Winograd convolutions
    pad with zeros); `unet` in place of its own."""
    pipe = load(model, device=device, dtype=dtype, variant=settings.variant, revision=settings.revision,
                local_files_only=settings.local_files_only, prediction_type=prediction_type,
                safety_checker=settings.safety_checker, vae=settings.vae, unet=unet)
    if settings.seamless:
        set_seamless(pipe)
    elif isinstance(pipe.vae, TinyVAE):  # TAESD: a fraction of the VAE's memory, decoded whole
        if settings.vae_tiling:
            raise InputError("--vae-tiling: TAESD (--vae) decodes whole images in a fraction of the VAE's memory; "
                             "leave out --vae-tiling", field="vae_tiling")
    else:  # vae_tiling: always; otherwise where the whole image would not fit (ldm.speed.tiling)
        enable_vae_tiling(pipe.vae, "on" if settings.vae_tiling else "auto", settings.vae_tile_size)
    return pipe


def prepare_pipeline(settings: RunSettings):
    """The pipeline the settings describe, ready to run. With a refiner: the SDXL base and its refiner as one
    `ldm.pipelines.refiner` pipeline (the refiner loaded at once, so that a bad path fails before the base runs,
    and parked on the CPU until its turn; it runs uncompiled). `unet` swaps the base's UNet, `vae` the VAE of both,
    `seamless` makes
    both seamless, and both VAEs tile (`vae_tiling`: always; otherwise where a whole image would not fit).
    `offload`: the weights load on the CPU in the dtype they run in on the GPU and stay there
    (`ldm.speed.offload`); the networks are accelerated without CUDA graphs, then offloaded (the base and
    refiner as one). Last, the embeddings are added and the LoRAs merged, in the order given."""
    settings.check()
    if settings.offload:
        target = offload_device(settings)
        pipe = _load_one(settings, settings.model, "cpu", dtype_name(resolve_dtype(settings.dtype, target)),
                         settings.prediction_type, settings.unet)
        pipe.device = target  # where `accelerate` below and the offload hooks take it to run
    else:
        pipe = _load_one(settings, settings.model, settings.device, settings.dtype, settings.prediction_type,
                         settings.unet)
    if settings.compile or pipe.device.type == "cuda":  # CUDA's default path: fused, channels_last, the CUDA graph
        accelerate(pipe, compile=settings.compile,
                   cuda_graph=False if not settings.cuda_graph or settings.offload else None)
    if settings.refiner:
        refiner = _load_one(settings, settings.refiner, "cpu", dtype_name(pipe.dtype), None)
        start = DEFAULT_START if settings.refiner_start is None else settings.refiner_start
        pipe = BaseWithRefiner(pipe, refiner, start)
    if settings.offload:
        enable_offload(pipe, settings.offload, target)
    for path in settings.embeddings:
        pipe.load_embedding(path)
    for path, weight in settings.loras:
        pipe.load_lora(path, weight)
    return pipe
