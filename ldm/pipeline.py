"""Stable Diffusion: prompt → text embeddings → sampled latents → VAE decode → PIL images.

    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = pipe("a photograph of an astronaut riding a horse", seed=1)
    result.images[0].save("astronaut.png")

Image-to-image (SDEdit) starts from a noised encoding of `image`; inpainting adds a `mask`, fed to a
9-channel UNet as extra channels, or pasted back after every step for a 4-channel one.

`pipe.unet`, `pipe.vae`, `pipe.text_encoder` and `pipe.tokenizer` are plain attributes: swap them,
hook them, or call them directly.
"""

import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .clip import CLIPTextConfig, CLIPTextModel
from .denoisers import Denoiser, guided, with_channels
from .errors import InputError, LoadError
from .images import fit_size, image_to_tensor, infotext, mask_to_tensor, to_pil
from .loading import load_module, read_config, read_json, read_safetensors, refuse_pickle, resolve, weights_file
from .samplers import SAMPLERS, sampler_for_class
from .schedules import Schedule, SchedulerConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**64 - 1


def resolve_device(device: str = "auto") -> torch.device:
    """auto, cpu, cuda or cuda:N; anything else is refused before it reaches torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def hub_files(variant: str | None) -> list[str]:
    """What a text-to-image run needs from an official diffusers repo: configs, tokenizer, safetensors."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    return ["model_index.json", "scheduler/*.json", "tokenizer/*", "unet/config.json", "vae/config.json",
            "text_encoder/config.json", f"unet/diffusion_pytorch_model{suffix}",
            f"vae/diffusion_pytorch_model{suffix}", f"text_encoder/model{suffix}"]


def text_encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official transformers-4 names as they are; transformers-5 files (no `text_model.` prefix) renamed.

    The SD 1.x files also carry the `position_ids` buffer (0…76), which the model computes itself.
    """
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


def check_request(steps: int, width: int | None, height: int | None, guidance: float, num_images: int,
                  seed: int | None, sampler: str | None, eta: float, size_multiple: int = 8,
                  guidance_rescale: float = 0.0, strength: float | None = None) -> None:
    """Reject out-of-range generation parameters with a message that says what to pass instead."""
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a whole number ≥ 1, got {steps!r}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or value < size_multiple or value % size_multiple):
            raise InputError(f"{name} must be a positive multiple of {size_multiple}, got {value!r}")
    if not math.isfinite(guidance) or guidance < 0:
        raise InputError(f"guidance must be a number ≥ 0, got {guidance}")
    if not isinstance(num_images, int) or num_images < 1:
        raise InputError(f"the number of images must be ≥ 1, got {num_images!r}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    if not 0 <= eta <= 1:
        raise InputError(f"eta must be between 0 and 1, got {eta}")
    if not 0 <= guidance_rescale <= 1:
        raise InputError(f"guidance rescale must be between 0 and 1, got {guidance_rescale}")
    if strength is not None and not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength}")


@dataclass
class Generation:
    images: list[Image.Image]
    seed: int
    infotexts: list[str] = field(default_factory=list)  # AUTOMATIC1111 `parameters`, one per image


class StableDiffusion:
    """SD 1.x/2.x text-to-image, image-to-image and inpainting on the official diffusers folder layout."""

    def __init__(self, unet: UNet, vae: VAE, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler: SchedulerConfig, device: torch.device, dtype: torch.dtype, name: str = "model"):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler, self.device, self.dtype, self.name = scheduler, device, dtype, name
        self.default_sampler = sampler_for_class(scheduler.class_name) or "euler"
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str = "auto", dtype: str = "auto",
                        variant: str | None = None, revision: str | None = None,
                        local_files_only: bool = False) -> "StableDiffusion":
        """Load an official diffusers folder (or its Hub id): model_index.json, unet/, vae/, text_encoder/,
        tokenizer/, scheduler/. `variant="fp16"` reads the `*.fp16.safetensors` files."""
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        root = resolve(str(model), hub_files(variant), revision, local_files_only)
        if root.is_file():
            if root.suffix in (".ckpt", ".bin", ".pt", ".pth", ".pkl"):
                refuse_pickle(root)
            raise LoadError(f"{root}: single-file checkpoints are not supported yet; pass the model's "
                            "diffusers folder (the one with model_index.json) or its Hub id")
        index = read_json(root / "model_index.json")
        pipeline_class = index.get("_class_name") if isinstance(index, dict) else None
        if pipeline_class not in SD_PIPELINES:
            raise LoadError(f"{root}: a {pipeline_class} folder is not supported yet (ldm loads "
                            f"{', '.join(SD_PIPELINES)} folders: SD 1.x and 2.x)")
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (root / part).is_dir():
                raise LoadError(f"{root}: the {part}/ folder is missing")

        unet_cfg = read_config(root / "unet" / "config.json", UNetConfig.from_diffusers)
        vae_cfg = read_config(root / "vae" / "config.json", VAEConfig.from_diffusers)
        te_cfg = read_config(root / "text_encoder" / "config.json", CLIPTextConfig.from_transformers)
        family = "SD 1.x" if te_cfg.hidden_act == "quick_gelu" else "SD 2.x"  # CLIP-L vs OpenCLIP-H
        if unet_cfg.in_channels > vae_cfg.latent_channels:
            family += " inpainting"
        def weights(part, stem, dtype):
            path = weights_file(root / part, stem, variant)
            return path, read_safetensors(path, dtype)

        path, state = weights("unet", "diffusion_pytorch_model", dt)
        unet = load_module(lambda: UNet(unet_cfg), state, path, family, dev)
        path, state = weights("vae", "diffusion_pytorch_model", dt)  # in fp16 too, as StableDiffusionPipeline
        vae = load_module(lambda: VAE(vae_cfg), state, path, family, dev)
        path, state = weights("text_encoder", "model", dt)
        text_encoder = load_module(lambda: CLIPTextModel(te_cfg), text_encoder_state(state), path, family, dev)
        tokenizer = CLIPTokenizer.from_folder(root / "tokenizer")
        scheduler = read_config(root / "scheduler" / "scheduler_config.json", SchedulerConfig.from_diffusers)
        name = Path(str(model)).name if Path(str(model)).exists() else str(model)
        return cls(unet, vae, text_encoder, tokenizer, scheduler, dev, dt, name)

    # ------------------------------------------------------------------------------- generation

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> Tensor:
        """(len(prompts), 77, width) text embeddings: the last hidden state after the final LayerNorm."""
        ids = self.tokenizer(prompts).to(self.device)
        return self.text_encoder(ids).hidden

    @torch.no_grad()
    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 steps: int = 50, guidance: float = 7.5, guidance_rescale: float = 0.0, seed: int | None = None,
                 width: int | None = None, height: int | None = None, sampler: str | None = None,
                 num_images: int = 1, eta: float = 0.0, image: Image.Image | None = None,
                 mask: Image.Image | None = None, strength: float | None = None,
                 callback: Callable[[int, Tensor], Tensor | None] | None = None,
                 progress: Callable[[int, int], None] | None = None) -> Generation:
        """Generate `num_images` images per prompt.

        Text-to-image by default; image-to-image (SDEdit) with `image`; inpainting with `image` and
        `mask` (white = repaint). Defaults: the model's native size (the image's, rounded down to a
        multiple of 8, when there is one), its folder's sampler, 50 steps, guidance 7.5, strength 0.8
        (1.0 with a mask), a random seed (returned in the result).

        `callback(i, x)` sees the σ-space latents after step i and may return replacements;
        `progress(done, total)` is told each finished step.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        if mask is not None and image is None:
            raise InputError("a mask needs the image it applies to (--image)")
        if self.inpainting and mask is None:
            raise InputError(f"{self.name} is an inpainting model (9-channel UNet): give it an image and a mask")
        if image is None and strength is not None:
            raise InputError("strength applies to image-to-image and inpainting: give an image (--image)")
        strength = (1.0 if mask is not None else 0.8) if strength is None else strength
        native = self.unet.config.sample_size * self.vae_scale
        default_w, default_h = fit_size(image, self.vae_scale) if image is not None else (native, native)
        width, height = width or default_w, height or default_h
        sampler = sampler or self.default_sampler
        check_request(steps, width, height, guidance, num_images, seed, sampler, eta, self.vae_scale,
                      guidance_rescale, strength)
        seed = secrets.randbits(32) if seed is None else seed
        spec = SAMPLERS[sampler]
        schedule = spec.schedule(self.scheduler, steps)
        if image is not None:
            schedule = schedule.from_strength(strength)
        generator = torch.Generator("cpu").manual_seed(seed)

        cond = {"context": self.encode_prompt(prompts).repeat_interleave(num_images, dim=0)}
        uncond = None
        if guidance > 1:  # diffusers' rule: guidance is on when the scale exceeds 1
            uncond = {"context": self.encode_prompt(negatives).repeat_interleave(num_images, dim=0)}
        batch = len(prompts) * num_images
        shape = (batch, self.vae.config.latent_channels, height // self.vae_scale, width // self.vae_scale)
        total = len(schedule.sigmas) - 1

        def step_end(i: int, x: Tensor) -> Tensor | None:
            if progress is not None:
                progress(i + 1, total)
            return None if callback is None else callback(i, x)

        unet, x, step_end = self.prepare(shape, schedule, generator, image, mask, strength, step_end)
        denoiser = Denoiser(guided(unet, cond, uncond, guidance, guidance_rescale), schedule,
                            self.scheduler.prediction_type, self.dtype)
        options = {"eta": eta, "generator": generator, "output": self.scheduler.prediction_type}
        x = spec.run(denoiser, x, schedule.sigmas, callback=step_end, **{k: options[k] for k in spec.options})
        images = self.decode(schedule.to_latents(x))

        params = {"Steps": steps, "Sampler": spec.label, "CFG scale": guidance, "Seed": seed,
                  "Size": f"{width}x{height}", "Model": self.name}
        if "eta" in spec.options and eta:
            params["Eta"] = eta
        if guidance_rescale:
            params["CFG rescale"] = guidance_rescale
        if image is not None:
            params["Denoising strength"] = strength
        texts = []
        for i in range(len(images)):
            extra = {"Batch size": len(images), "Batch pos": i} if len(images) > 1 else {}
            texts.append(infotext(prompts[i // num_images], negatives[i // num_images], params | extra))
        return Generation(images, seed, texts)

    @property
    def inpainting(self) -> bool:
        """A UNet that takes mask and masked-image latents besides the noisy latents (9 channels)."""
        return self.unet.config.in_channels > self.vae.config.latent_channels

    def encode_image(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Scaled float32 latents of an image in [-1, 1]: a sample of the VAE posterior, noise from
        `generator`."""
        vae_dtype = next(self.vae.parameters()).dtype
        mean, logvar = self.vae.encode(image.to(self.device, vae_dtype))
        return (self.vae.sample(mean, logvar, generator) * self.vae.config.scaling_factor).float()

    def prepare(self, shape, schedule: Schedule, generator: torch.Generator, image: Image.Image | None,
                mask: Image.Image | None, strength: float, callback):
        """The UNet to call, the initial σ-space latents (float32) and the per-step callback, for each task.

        Random draws come in diffusers' order: text-to-image: noise. Image-to-image: the image's latent
        sample, then noise. Inpainting: the image's latent sample (4-channel UNet, or strength < 1),
        noise, then the masked image's latent sample.
        """
        batch, _, h, w = shape

        def noise() -> Tensor:
            return torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)

        if image is None:
            return self.unet, noise() * schedule.init_noise_sigma, callback
        pixels = image_to_tensor(image, w * self.vae_scale, h * self.vae_scale)
        if mask is None:  # image-to-image: the init latents noised to the first σ kept
            init = self.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
            return self.unet, init + noise() * schedule.sigmas[0], callback

        repaint = mask_to_tensor(mask, w * self.vae_scale, h * self.vae_scale)
        init = None
        if not self.inpainting or strength < 1:
            init = self.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
        eps = noise()
        x = eps * schedule.init_noise_sigma if strength == 1 else init + eps * schedule.sigmas[0]
        latent_mask = F.interpolate(repaint, size=(h, w)).to(self.device)
        if self.inpainting:
            masked = self.encode_image(pixels * (repaint < 0.5), generator)
            return with_channels(self.unet, torch.cat([latent_mask, masked], dim=1)), x, callback

        # A 4-channel UNet. diffusers encodes the masked image here too (unused): draw what its latent
        # sample draws, so that later random draws (ancestral samplers) stay in step.
        torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        sigmas = schedule.sigmas

        def paste_known(i: int, x: Tensor) -> Tensor:
            """After every step, paste the known region back noised to the new σ with the starting noise;
            after the last step, clean (scaled so that it is clean once `to_latents` has run)."""
            sigma = sigmas[i + 1]
            known = init * (1 + sigma**2) ** 0.5 if i + 2 == len(sigmas) else init + eps * sigma
            x = (1 - latent_mask) * known + latent_mask * x
            replaced = None if callback is None else callback(i, x)
            return x if replaced is None else replaced

        return self.unet, x, paste_known

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        vae_dtype = next(self.vae.parameters()).dtype
        return to_pil(self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor))
