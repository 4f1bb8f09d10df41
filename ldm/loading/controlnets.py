"""ControlNet files → a `ControlNet` (`ldm.networks.controlnet`) that fits a model.

The files people use: a diffusers ControlNet folder (`lllyasviel/control_v11p_sd15_canny`,
`diffusers/controlnet-canny-sdxl-1.0`: config.json and diffusion_pytorch_model(.fp16).safetensors). By name, a
folder or file in `weights/controlnet/` (`$LDM_WEIGHTS/controlnet`), as LoRAs in `weights/loras/`. It must fit the
model: the latents it reads, the text it attends to, SDXL's size embedding and the UNet's widths, or the error names
both. `.pth`/`.bin` files are refused, never unpickled.
"""

from pathlib import Path

import torch

from ldm.errors import LoadError
from ldm.loading.families import ModelSpec, weights_dir
from ldm.loading.files import PICKLE_SUFFIXES, load_module, read_config, read_safetensors, refuse_pickle, weights_file
from ldm.networks.controlnet import ControlNet, ControlNetConfig
from ldm.networks.unet import UNetConfig

# what a ControlNet's encoder must share with the UNet it steers (and it reads the latents, not an inpainting UNet's
# extra channels: diffusers' ControlNet inpainting pipeline gives it the noisy latents alone)
FITS = ("cross_attention_dim", "block_out_channels", "layers_per_block", "addition_embed_type",
        "projection_class_embeddings_input_dim", "addition_time_embed_dim")


def controlnet_dir() -> Path:
    return weights_dir() / "controlnet"


def find_controlnet(name: str | Path, allow_paths: bool = True) -> Path:
    """A ControlNet by path, or by name in `weights/controlnet/` (a folder, or NAME.safetensors). With
    `allow_paths=False` (a request over HTTP) only names there are accepted."""
    path = Path(name).expanduser()
    if allow_paths and path.exists():
        return path
    if not allow_paths and (path.name != str(name) or str(name).startswith(".")):
        raise LoadError(f"ControlNet {name!r}: give the name of a model in the server's weights/controlnet/, "
                        "not a path")
    for candidate in (controlnet_dir() / str(name), controlnet_dir() / f"{name}.safetensors"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem if p.is_file() else p.name for p in controlnet_dir().glob("*")) \
        if controlnet_dir().is_dir() else []
    raise LoadError(f"ControlNet {name!r}: no such file or folder, here or in {controlnet_dir()}"
                    + (f" (there: {', '.join(known)})" if known else ""))


def describe(cfg: UNetConfig, latent_channels: int) -> str:
    return (f"{latent_channels} latent channels, widths {list(cfg.block_out_channels)}, cross-attention "
            f"{cfg.cross_attention_dim}"
            + (f", size embedding {cfg.projection_class_embeddings_input_dim}" if cfg.addition_embed_type else ""))


def load_controlnet(source: str | Path, unet: UNetConfig, spec: ModelSpec, device: torch.device,
                    dtype: torch.dtype, allow_paths: bool = True) -> ControlNet:
    """The ControlNet of `source` for a model whose UNet config is `unet` (of the family `spec`)."""
    path = find_controlnet(source, allow_paths)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        raise LoadError(f"ControlNet {source}: give a diffusers ControlNet folder (config.json and "
                        "diffusion_pytorch_model.safetensors)")
    cfg = read_config(path / "config.json", ControlNetConfig.from_diffusers)
    if cfg.unet.in_channels != spec.latent_channels or any(getattr(cfg.unet, f) != getattr(unet, f) for f in FITS):
        theirs, ours = describe(cfg.unet, cfg.unet.in_channels), describe(unet, spec.latent_channels)
        raise LoadError(f"ControlNet {source}: it was made for another model ({theirs}) than this {spec.label} one "
                        f"({ours})")
    weights = weights_file(path, "diffusion_pytorch_model")
    return load_module(lambda: ControlNet(cfg), read_safetensors(weights, dtype), weights, "ControlNet", device)
