"""A UNet in place of a model's own (`--unet`), as `--vae` swaps the VAE: the distilled UNets shipped alone.

The files people use: a diffusers UNet folder (`latent-consistency/lcm-sdxl`: config.json and
diffusion_pytorch_model(.fp16).safetensors; a model folder holding one in unet/ works too), or one .safetensors file
in diffusers' names (`sdxl_lightning_4step_unet.safetensors`, loaded in ByteDance/SDXL-Lightning's card with
`unet.load_state_dict(load_file(…))`) or in the original LDM names (`model.diffusion_model.input_blocks…`, also a
whole checkpoint's UNet). A file holds no config: it takes the model's, with what its shapes state (an LCM UNet's
`time_cond_proj_dim`); a folder's config.json states its own. Either way it must fit the model: its inputs and
outputs, its text conditioning and SDXL's size embedding, or the error names both.
"""

import dataclasses
from pathlib import Path

import torch
from torch import Tensor

from ldm.errors import LoadError
from ldm.loading.families import ModelSpec
from ldm.loading.files import (
    PICKLE_SUFFIXES,
    load_module,
    read_config,
    read_safetensors,
    refuse_pickle,
    weights_file,
)
from ldm.loading.single_file import UNET, take, unet_rules
from ldm.networks.unet import UNet, UNetConfig

# what a UNet must share with the model it goes into: its latents in and out, the text it attends to, SDXL's pooled
# text and size embedding
FITS = ("in_channels", "out_channels", "cross_attention_dim", "addition_embed_type",
        "projection_class_embeddings_input_dim", "addition_time_embed_dim")


def unet_folder(path: Path) -> Path | None:
    """The UNet folder `path` names (itself, or a model folder's unet/), None for a file."""
    if path.is_dir() and (path / "unet" / "config.json").is_file() and not (path / "config.json").is_file():
        return path / "unet"
    return path if path.is_dir() else None


def file_state(path: Path, model: UNetConfig) -> tuple[UNetConfig, dict[str, Tensor]]:
    """A UNet file's config (the model's, with `time_cond_proj_dim` from the shapes) and its tensors in diffusers'
    names (LDM names mapped by `ldm.loading.single_file`'s table, with or without the `model.diffusion_model.`
    prefix)."""
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise LoadError(f"--unet {path}: give a diffusers UNet folder or a .safetensors UNet file")
    tensors = read_safetensors(path)
    ldm_names = not any(k.startswith("down_blocks.") for k in tensors)
    prefix = UNET if any(k.startswith(UNET) for k in tensors) else ""
    cond = tensors.get(f"{prefix}time_embedding.cond_proj.weight" if ldm_names else "time_embedding.cond_proj.weight")
    cfg = dataclasses.replace(model, time_cond_proj_dim=None if cond is None else cond.shape[1])
    if not ldm_names:
        return cfg, tensors
    if not any(k.startswith(f"{prefix}input_blocks.") for k in tensors):
        raise LoadError(f"--unet {path}: not a UNet (neither down_blocks.* nor input_blocks.* among its "
                        f"{len(tensors)} tensors)")
    try:
        return cfg, take(tensors, unet_rules(cfg, prefix))
    except LoadError as e:
        raise LoadError(f"--unet {path}: it does not have the model's UNet layout: {e}") from None


def describe(cfg: UNetConfig) -> str:
    return (f"in/out {cfg.in_channels}/{cfg.out_channels} channels, cross-attention {cfg.cross_attention_dim}"
            + (f", size embedding {cfg.projection_class_embeddings_input_dim}" if cfg.addition_embed_type else ""))


def load_unet(source: str | Path, model: UNetConfig, spec: ModelSpec, device: torch.device,
              dtype: torch.dtype) -> UNet:
    """The UNet of `source` for a model whose UNet config is `model` (of the family `spec`)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise LoadError(f"--unet {source}: no such file or folder")
    folder = unet_folder(path)
    if folder is not None:
        cfg = read_config(folder / "config.json", UNetConfig.from_diffusers)
        weights = weights_file(folder, "diffusion_pytorch_model")
        state = read_safetensors(weights, dtype)
    else:
        cfg, state = file_state(path, model)
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
        weights = path
    if any(getattr(cfg, f) != getattr(model, f) for f in FITS):
        raise LoadError(f"--unet {source}: its UNet ({describe(cfg)}) does not fit this {spec.label} model's "
                        f"({describe(model)})")
    return load_module(lambda: UNet(cfg), state, weights, spec.label, device)
