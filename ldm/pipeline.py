"""Text-to-image: prompt → text embeddings → sampled latents → VAE decode → PIL images.

    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = pipe("a photograph of an astronaut riding a horse", seed=1)
    result.images[0].save("astronaut.png")

`pipe.unet`, `pipe.vae`, `pipe.text_encoder` and `pipe.tokenizer` are plain attributes: swap them,
hook them, or call them directly.
"""

import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch import Tensor

from .clip import CLIPTextConfig, CLIPTextModel
from .denoisers import Denoiser, guided
from .errors import InputError, LoadError
from .images import infotext, to_pil
from .loading import load_module, read_json, read_safetensors, refuse_pickle, resolve, weights_file
from .samplers import SAMPLERS, sampler_for_class
from .schedules import SchedulerConfig
from .tokenizer import CLIPTokenizer
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**64 - 1


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InputError("--device cuda: no CUDA device is available here (use --device cpu or auto)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise InputError(f"unknown device {device!r} (use auto, cpu or cuda)") from None


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
                  seed: int | None, sampler: str | None, eta: float, size_multiple: int = 8) -> None:
    """Reject out-of-range generation parameters with a message that says what to pass instead."""
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"steps must be a whole number ≥ 1, got {steps!r}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or value < size_multiple or value % size_multiple):
            raise InputError(f"{name} must be a positive multiple of {size_multiple}, got {value!r}")
    if guidance < 0:
        raise InputError(f"guidance must be ≥ 0, got {guidance}")
    if not isinstance(num_images, int) or num_images < 1:
        raise InputError(f"the number of images must be ≥ 1, got {num_images!r}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    if not 0 <= eta <= 1:
        raise InputError(f"eta must be between 0 and 1, got {eta}")


@dataclass
class Generation:
    images: list[Image.Image]
    seed: int
    infotexts: list[str] = field(default_factory=list)  # AUTOMATIC1111 `parameters`, one per image


class StableDiffusion:
    """SD 1.x/2.x text-to-image on the official diffusers folder layout."""

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
        pipeline_class = index.get("_class_name")
        if pipeline_class not in ("StableDiffusionPipeline",):
            raise LoadError(f"{root}: a {pipeline_class} folder is not supported yet (ldm loads "
                            "StableDiffusionPipeline folders: SD 1.x)")
        for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
            if not (root / part).is_dir():
                raise LoadError(f"{root}: the {part}/ folder is missing")

        unet_cfg = UNetConfig.from_diffusers(read_json(root / "unet" / "config.json"))
        vae_cfg = VAEConfig.from_diffusers(read_json(root / "vae" / "config.json"))
        te_cfg = CLIPTextConfig.from_transformers(read_json(root / "text_encoder" / "config.json"))
        family = "SD 1.x" if te_cfg.hidden_act == "quick_gelu" else "SD 2.x"  # CLIP-L vs OpenCLIP-H
        # the SDXL-style VAE overflows in half precision: decode in fp32 when its config asks for it
        vae_dtype = torch.float32 if (dt == torch.float16 and vae_cfg.force_upcast) else dt

        def weights(part, stem, dtype):
            path = weights_file(root / part, stem, variant)
            return path, read_safetensors(path, dtype)

        path, state = weights("unet", "diffusion_pytorch_model", dt)
        unet = load_module(lambda: UNet(unet_cfg), state, path, family, dev)
        path, state = weights("vae", "diffusion_pytorch_model", vae_dtype)
        vae = load_module(lambda: VAE(vae_cfg), state, path, family, dev)
        path, state = weights("text_encoder", "model", dt)
        text_encoder = load_module(lambda: CLIPTextModel(te_cfg), text_encoder_state(state), path, family, dev)
        tokenizer = CLIPTokenizer.from_folder(root / "tokenizer")
        sched_dir = root / "scheduler"
        sched_file = sched_dir / "scheduler_config.json"
        scheduler = SchedulerConfig.from_diffusers(read_json(sched_file))
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
                 steps: int = 50, guidance: float = 7.5, seed: int | None = None, width: int | None = None,
                 height: int | None = None, sampler: str | None = None, num_images: int = 1, eta: float = 0.0,
                 callback: Callable[[int, Tensor], None] | None = None) -> Generation:
        """Generate `num_images` images per prompt. Defaults: the model's native size and its folder's
        sampler; 50 steps, guidance 7.5; a random seed (returned in the result)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        if len(negatives) != len(prompts):
            raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        size = self.unet.config.sample_size * self.vae_scale
        width, height = width or size, height or size
        sampler = sampler or self.default_sampler
        check_request(steps, width, height, guidance, num_images, seed, sampler, eta, self.vae_scale)
        seed = secrets.randbits(32) if seed is None else seed
        spec = SAMPLERS[sampler]
        schedule = spec.schedule(self.scheduler, steps)
        generator = torch.Generator("cpu").manual_seed(seed)

        cond = self.encode_prompt(prompts).repeat_interleave(num_images, dim=0)
        uncond = None
        if guidance > 1:  # diffusers' rule: guidance is on when the scale exceeds 1
            uncond = {"context": self.encode_prompt(negatives).repeat_interleave(num_images, dim=0)}
        model = guided(self.unet, {"context": cond}, uncond, guidance)
        denoiser = Denoiser(model, schedule, self.scheduler.prediction_type)

        shape = (len(prompts) * num_images, self.unet.config.out_channels, height // self.vae_scale,
                 width // self.vae_scale)
        x = torch.randn(shape, generator=generator, dtype=torch.float32) * schedule.init_noise_sigma
        x = x.to(self.device, self.dtype)
        options = {"eta": eta, "generator": generator, "output": self.scheduler.prediction_type}
        x = spec.run(denoiser, x, schedule.sigmas, callback=callback, **{k: options[k] for k in spec.options})
        images = self.decode(schedule.to_latents(x))

        params = {"Steps": steps, "Sampler": spec.label, "CFG scale": guidance, "Seed": seed,
                  "Size": f"{width}x{height}", "Model": self.name}
        if spec.options and eta:
            params["Eta"] = eta
        texts = []
        for i in range(len(images)):
            extra = {"Batch size": len(images), "Batch pos": i} if len(images) > 1 else {}
            texts.append(infotext(prompts[i // num_images], negatives[i // num_images], params | extra))
        return Generation(images, seed, texts)

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        vae_dtype = next(self.vae.parameters()).dtype
        return to_pil(self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor))
