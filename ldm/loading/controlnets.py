"""ControlNet files → a `ControlNet` (`ldm.networks.controlnet`) that fits a model.

The files people use:

- a diffusers ControlNet folder (`lllyasviel/control_v11p_sd15_canny`, `diffusers/controlnet-canny-sdxl-1.0` and its
  `-mid`/`-small`: config.json and diffusion_pytorch_model(.fp16).safetensors);
- a single file in the original (lllyasviel/ControlNet `cldm`) names: `control_v11p_sd15_canny.safetensors`,
  `control_v11f1p_sd15_depth_fp16.safetensors`, `control_sd15_canny.safetensors`, its keys with the
  `control_model.` prefix or without (`controlnet_rules`); the full training checkpoints that hold the Stable
  Diffusion model beside `control_model.*` too (that model is not read: the one in use is);
- a single file in diffusers' names without its config.json (`diffusers_xl_canny_full.safetensors`, a renamed
  `diffusion_pytorch_model.safetensors`).

A single file's config is inferred from its shapes (`infer_controlnet`), as ldm infers a UNet's
(`ldm.loading.single_file.infer_unet`); what no shape holds is the model's: the heads and the attention upcast of the
UNet it steers (the UNet's encoder is what a ControlNet copies, as diffusers' `ControlNetModel.from_unet` copies
them), and, from the A1111/ComfyUI convention, global pooling for a file named `…shuffle…`. Every key of a file is
read or the error names it. By name, a folder or file in `weights/controlnet/` (`$LDM_WEIGHTS/controlnet`), as LoRAs
in `weights/loras/`; by Hub id, the repo's config.json and safetensors in the Hugging Face cache (`hub_controlnet`).
It must fit the model: the latents it reads, the text it attends to, SDXL's size embedding and the UNet's widths, or
the error names both. `.pth`/`.ckpt`/`.bin` files are refused, never unpickled; so are the
files of other architectures that share the name (kohya's ControlNet-LLLite, Stability's Control-LoRA, "difference"
ControlNets).
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm.errors import ConfigError, LoadError
from ldm.loading.families import ModelSpec, weights_dir
from ldm.loading.files import (
    PICKLE_SUFFIXES,
    hub_errors,
    is_hub_id,
    load_module,
    read_config,
    read_safetensors,
    refuse_pickle,
    weights_file,
)
from ldm.loading.single_file import IGNORED, UNET, VAE_PREFIX, Rule, _indices, _shape, module_rules, take, unet_modules
from ldm.networks.controlnet import ControlNet, ControlNetConfig
from ldm.networks.unet import UNetConfig

# what a ControlNet's encoder must share with the UNet it steers (and it reads the latents, not an inpainting UNet's
# extra channels: diffusers' ControlNet inpainting pipeline gives it the noisy latents alone)
FITS = ("cross_attention_dim", "block_out_channels", "layers_per_block", "addition_embed_type",
        "projection_class_embeddings_input_dim", "addition_time_embed_dim")

PREFIX = "control_model."  # the original files' ControlNet prefix (diffusers' LDM_CONTROLNET_KEY)
# Keys a full ControlNet training checkpoint (lllyasviel/ControlNet's `control_sd15_*`) holds beside `control_model.*`:
# the Stable Diffusion model it was trained with, and its training buffers. Only with the prefix; anything else is an
# error.
BESIDE = (UNET, VAE_PREFIX, "cond_stage_model.")
BESIDE_WHY = "the Stable Diffusion model the ControlNet was trained with (the model in use is the one given)"


def controlnet_dir() -> Path:
    return weights_dir() / "controlnet"


def find_controlnet(name: str | Path, allow_paths: bool = True) -> Path:
    """A ControlNet by path, by name in `weights/controlnet/` (a folder, or NAME.safetensors; an `owner/name` folder
    there too), or by Hub id (`hub_controlnet`). With `allow_paths=False` (a request over HTTP) only names there are
    accepted: no path, no Hub id."""
    path = Path(name).expanduser()
    if allow_paths and path.exists():
        return path
    local = is_hub_id(str(name)) and (controlnet_dir() / str(name)).is_dir()  # (a Hub id's folder, copied there)
    if not allow_paths and not local and (path.name != str(name) or str(name).startswith(".")):
        raise LoadError(f"ControlNet {name!r}: give the name of a model in the server's weights/controlnet/, "
                        "not a path" + (" or a Hub id (the server downloads nothing)" if is_hub_id(str(name)) else ""))
    for candidate in (controlnet_dir() / str(name), controlnet_dir() / f"{name}.safetensors"):
        if candidate.exists():
            return candidate
    if allow_paths and is_hub_id(str(name)):
        return hub_controlnet(str(name))
    known = sorted(p.stem if p.is_file() else p.name for p in controlnet_dir().glob("*")) \
        if controlnet_dir().is_dir() else []
    raise LoadError(f"ControlNet {name!r}: no such file or folder, here or in {controlnet_dir()}"
                    + (f" (there: {', '.join(known)})" if known else ""))


HUB_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.fp16.safetensors")  # in that order
_hub_folders: dict[str, Path] = {}  # Hub id → its snapshot, resolved once a process (no Hub request per run)


def hub_controlnet(repo: str) -> Path:
    """A diffusers ControlNet repo on the Hub (`lllyasviel/control_v11p_sd15_canny`,
    `diffusers/controlnet-canny-sdxl-1.0-small`, `thibaud/controlnet-sd21-canny-diffusers`) in the Hugging Face
    cache, as ldm fetches a model's repo (`ldm.loading.files.resolve`: HF_HOME, HF_HUB_OFFLINE): its config.json and
    diffusion_pytorch_model.safetensors, or the .fp16 one where the repo has only that (`weights_file`'s rule);
    never its pickled .bin files."""
    if repo in _hub_folders:
        return _hub_folders[repo]
    from huggingface_hub import snapshot_download

    for weights in HUB_WEIGHTS:
        with hub_errors(repo, repo, None, downloading=True):
            folder = Path(snapshot_download(repo, allow_patterns=["config.json", weights]))
        if (folder / weights).is_file():
            break
    else:
        raise LoadError(f"ControlNet {repo}: the Hub repo has no {' or '.join(HUB_WEIGHTS)}"
                        + ("" if (folder / "config.json").is_file() else " nor config.json: it is not a diffusers "
                           "ControlNet") + " (pickled .bin weights are never loaded)")
    if not (folder / "config.json").is_file():
        raise LoadError(f"ControlNet {repo}: the Hub repo has no config.json: it is not a diffusers ControlNet")
    _hub_folders[repo] = folder
    return folder


def fetched_from_hub(name: str) -> bool:
    """Whether `name` was resolved as a Hub id (`hub_controlnet`) in this process."""
    return name in _hub_folders


def describe(cfg: UNetConfig, latent_channels: int) -> str:
    return (f"{latent_channels} latent channels, widths {list(cfg.block_out_channels)}, cross-attention "
            f"{cfg.cross_attention_dim}"
            + (f", size embedding {cfg.projection_class_embeddings_input_dim}" if cfg.addition_embed_type else ""))


def check_fits(source, cfg: UNetConfig, unet: UNetConfig, spec: ModelSpec) -> None:
    if cfg.in_channels != spec.latent_channels or any(getattr(cfg, f) != getattr(unet, f) for f in FITS):
        raise LoadError(f"ControlNet {source}: it was made for another model ({describe(cfg, cfg.in_channels)}) "
                        f"than this {spec.label} one ({describe(unet, spec.latent_channels)})")


# ------------------------------------------------------------------------------------------ key table


def controlnet_rules(cfg: ControlNetConfig, prefix: str = "") -> list[Rule]:
    """ldm's (diffusers' ControlNetModel) names ↔ the original ones: the encoder's as the UNet's (`time_embed`,
    `label_emb`, `input_blocks`, `middle_block`: `unet_modules`), the hint embedding's convs
    `input_hint_block.{0, 2, …, 14}` (a SiLU at each odd index: conv_in, blocks.0…5, conv_out), the residuals' 1×1
    convs `zero_convs.i.0`, the mid block's `middle_block_out.0`. diffusers' `convert_controlnet_checkpoint`
    (src/diffusers/loaders/single_file_utils.py, v0.42), run through ldm's table machinery."""
    u = cfg.unet
    inner = 2 * (len(cfg.conditioning_embedding_out_channels) - 1)  # the hint's convs between conv_in and conv_out
    skips = len(u.block_out_channels) * (u.layers_per_block + 1)  # conv_in's, each resnet's, each downsampler's
    modules = unet_modules(u) | {
        "controlnet_cond_embedding.conv_in": ("input_hint_block.0", {}),
        "controlnet_cond_embedding.conv_out": (f"input_hint_block.{2 * inner + 2}", {}),
        "controlnet_mid_block": ("middle_block_out.0", {}),
    }
    modules |= {f"controlnet_cond_embedding.blocks.{k}": (f"input_hint_block.{2 * k + 2}", {}) for k in range(inner)}
    modules |= {f"controlnet_down_blocks.{i}": (f"zero_convs.{i}.0", {}) for i in range(skips)}
    return module_rules(lambda: ControlNet(cfg), modules, prefix)


# -------------------------------------------------------------------------------- config inference


@dataclass
class Shapes:
    """What a ControlNet file's shapes say, in either naming: per level, each resnet's (width, has attention,
    transformer depth); the mid block's (has attention, depth); the hint embedding's input channels and widths."""

    in_channels: int
    levels: list[list[tuple[int, bool, int]]]
    mid: tuple[bool, int]
    hint_channels: int
    hint_widths: list[int]
    size_embedding: int | None  # SDXL's `label_emb` / `add_embedding` input width
    cross_attention_dim: int | None  # None: no cross-attention to read it from (SDXL "small")
    linear: bool | None  # the transformers' projections are linear; None: no transformer


def _shared_facts(t: dict[str, Tensor], hint: list[tuple[int, ...]], size_key: str) -> dict:
    """The `Shapes` fields either naming finds the same way: the hint embedding's from its convs' (out, in) channels
    in order (conv_in, the blocks, conv_out), the size embedding's, the cross-attention's and the projections'."""
    if len(hint) < 2 or len(hint) % 2:
        raise LoadError(f"its hint embedding has {len(hint)} convolutions, not conv_in, pairs of blocks and conv_out")
    to_k = next((k for k in t if k.endswith("attn2.to_k.weight")), None)
    proj_in = next((k for k in t if k.endswith("proj_in.weight")), None)
    return {"hint_channels": hint[0][1], "hint_widths": [hint[0][0]] + [out for out, _ in hint[2:-1:2]],
            "size_embedding": _shape(t, size_key)[1] if size_key in t else None,
            "cross_attention_dim": None if to_k is None else _shape(t, to_k)[1],
            "linear": None if proj_in is None else len(_shape(t, proj_in)) == 2}


def _ldm_shapes(t: dict[str, Tensor]) -> Shapes:
    levels, level = [], []
    for n in _indices(t, "input_blocks.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in t:  # a downsampler closes the level
            levels.append(level)
            level = []
            continue
        attn = any(k.startswith(f"input_blocks.{n}.1.") for k in t)
        level.append((_shape(t, f"input_blocks.{n}.0.out_layers.3.weight")[0], attn,
                      len(_indices(t, f"input_blocks.{n}.1.transformer_blocks."))))
    levels.append(level)
    hint = [_shape(t, f"input_hint_block.{i}.weight")[:2] for i in _indices(t, "input_hint_block.")]
    # (without attention, middle_block.1 would be the second resnet)
    mid = "middle_block.1.proj_in.weight" in t, len(_indices(t, "middle_block.1.transformer_blocks."))
    return Shapes(in_channels=_shape(t, "input_blocks.0.0.weight")[1], levels=levels, mid=mid,
                  **_shared_facts(t, hint, "label_emb.0.0.weight"))


def _diffusers_shapes(t: dict[str, Tensor]) -> Shapes:
    levels = []
    for i in _indices(t, "down_blocks."):
        p = f"down_blocks.{i}."
        levels.append([(_shape(t, f"{p}resnets.{j}.conv2.weight")[0],
                        any(k.startswith(f"{p}attentions.{j}.") for k in t),
                        len(_indices(t, f"{p}attentions.{j}.transformer_blocks.")))
                       for j in _indices(t, f"{p}resnets.")])
    e = "controlnet_cond_embedding."
    blocks = [_shape(t, f"{e}blocks.{k}.weight")[:2] for k in _indices(t, f"{e}blocks.")]
    hint = [_shape(t, f"{e}conv_in.weight")[:2], *blocks, _shape(t, f"{e}conv_out.weight")[:2]]
    mid = "mid_block.attentions.0.proj_in.weight" in t, len(_indices(t, "mid_block.attentions.0.transformer_blocks."))
    return Shapes(in_channels=_shape(t, "conv_in.weight")[1], levels=levels, mid=mid,
                  **_shared_facts(t, hint, "add_embedding.linear_1.weight"))


def infer_controlnet(shapes: Shapes, unet: UNetConfig, pooled: bool = False) -> dict:
    """A diffusers ControlNet config.json for a file's shapes; what they do not hold (heads, upcast, the cross-attention
    width of a ControlNet without cross-attention, the size ids' width) is the UNet's it steers."""
    per_level = {len(lv) for lv in shapes.levels}
    if len(per_level) != 1 or any(len(set(lv)) != 1 for lv in shapes.levels):
        raise LoadError("its levels differ in resnet count, or in width or attention within a level; ldm's "
                        "ControlNet does not build that layout")
    (n,) = per_level
    widths, attns, depths = zip(*(lv[0] for lv in shapes.levels), strict=True)
    mid_attn, mid_depth = shapes.mid
    if not mid_attn:
        raise LoadError("its mid block has no attention (diffusers' UNetMidBlock2D), which ldm's ControlNet does not "
                        "build")
    if attns[-1] and depths[-1] != mid_depth:
        raise LoadError(f"its mid block has {mid_depth} transformer blocks and its last level {depths[-1]}; "
                        "diffusers' layout (and ldm's) ties the two")
    cfg = {
        "in_channels": shapes.in_channels,
        "block_out_channels": list(widths),
        "layers_per_block": n,
        "down_block_types": ["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in attns],
        # diffusers builds the mid block with the last level's depth, and ignores the depth of attention-less levels
        "transformer_layers_per_block": [d if a else 1 for a, d in zip(attns, depths, strict=True)][:-1] + [mid_depth],
        "attention_head_dim": list(unet.heads) if len(unet.heads) == len(widths) else 1,  # (checked with the fit)
        "upcast_attention": unet.upcast_attention,
        "cross_attention_dim": shapes.cross_attention_dim or unet.cross_attention_dim,
        "use_linear_projection": unet.use_linear_projection if shapes.linear is None else shapes.linear,
        "conditioning_channels": shapes.hint_channels,
        "conditioning_embedding_out_channels": shapes.hint_widths,
        "global_pool_conditions": pooled,
    }
    if shapes.size_embedding is not None:  # SDXL's `text_time`: the ids' width is the model's (SDXL's 256)
        cfg |= {"addition_embed_type": "text_time", "addition_time_embed_dim": unet.addition_time_embed_dim or 256,
                "projection_class_embeddings_input_dim": shapes.size_embedding}
    return cfg


# ------------------------------------------------------------------------------------------- reading


def _refuse_other_architectures(path: Path, tensors: dict[str, Tensor]) -> None:
    if any(k.startswith("lllite_") for k in tensors):
        raise LoadError(f"ControlNet {path}: it is a kohya ControlNet-LLLite (`lllite_unet_*` keys), a different "
                        "architecture (small modules inside the UNet's attention) that ldm does not run")
    if "lora_controlnet" in tensors:
        raise LoadError(f"ControlNet {path}: it is a Control-LoRA (Stability AI's `control-lora-*`: a low-rank "
                        "difference to the base UNet), which ldm does not run; use a full ControlNet")
    if "difference" in tensors:
        raise LoadError(f"ControlNet {path}: it is a 'difference' ControlNet (weights stored as differences from SD "
                        "1.5's), which needs the SD 1.5 weights added; use the plain (or fp16) ControlNet file")


def _show(keys: list[str]) -> str:
    return ", ".join(keys[:6]) + (f" … ({len(keys)} in all)" if len(keys) > 6 else "")


def read_controlnet_file(path: Path, tensors: dict[str, Tensor], unet: UNetConfig,
                         spec: ModelSpec) -> tuple[ControlNetConfig, dict[str, Tensor]]:
    """A single file's config (inferred, and checked to fit the model) and its state dict under ldm's names."""
    _refuse_other_architectures(path, tensors)
    prefix = PREFIX if any(k.startswith(PREFIX) for k in tensors) else ""
    own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    # a prefixed file may hold the model it was trained beside (left unread); anything else is named
    other = [k for k in tensors if not k.startswith(prefix) and not k.startswith(BESIDE)
             and not any(re.fullmatch(pattern, k) for pattern, _ in IGNORED)]
    if other:
        raise LoadError(f"ControlNet {path}: it holds keys no ControlNet module reads: {_show(other)}")
    if "controlnet_cond_embedding.conv_in.weight" in own:
        reader, original = _diffusers_shapes, False
    elif "input_hint_block.0.weight" in own:
        reader, original = _ldm_shapes, True
    else:
        names = sorted({k.split(".")[0] for k in own})[:8]
        raise LoadError(f"ControlNet {path}: its keys are not a ControlNet's (input_hint_block.* in the original "
                        f"names, controlnet_cond_embedding.* in diffusers'); its top-level names are {names}")
    try:
        cfg = ControlNetConfig.from_diffusers(infer_controlnet(reader(own), unet, "shuffle" in path.name.lower()))
    except (LoadError, ConfigError) as e:
        raise LoadError(f"ControlNet {path}: {e}") from None
    check_fits(path, cfg.unet, unet, spec)
    if not original:
        return cfg, own  # (load_module names what is missing or unexpected)
    rules = controlnet_rules(cfg, prefix)
    try:
        state = take(tensors, rules)
    except LoadError as e:
        raise LoadError(f"ControlNet {path}: it does not match the layout inferred from it: {e}") from None
    used = {r.theirs for r in rules}
    unexpected = [k for k in tensors if k.startswith(prefix) and k not in used]
    if unexpected:
        raise LoadError(f"ControlNet {path}: it holds keys no ControlNet module reads: {_show(unexpected)}")
    return cfg, state


def load_controlnet(source: str | Path, unet: UNetConfig, spec: ModelSpec, device: torch.device,
                    dtype: torch.dtype, allow_paths: bool = True) -> ControlNet:
    """The ControlNet of `source` for a model whose UNet config is `unet` (of the family `spec`)."""
    path = find_controlnet(source, allow_paths)
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise LoadError(f"ControlNet {source}: give a .safetensors file or a diffusers ControlNet folder "
                            "(config.json and diffusion_pytorch_model.safetensors)")
        if not (path.name.startswith("diffusion_pytorch_model") and (path.parent / "config.json").is_file()):
            cfg, state = read_controlnet_file(path, read_safetensors(path, dtype), unet, spec)
            return load_module(lambda: ControlNet(cfg), state, path, "ControlNet", device)
        path, weights = path.parent, path  # a folder's weights file, its config.json beside it
    else:
        weights = weights_file(path, "diffusion_pytorch_model")
    cfg = read_config(path / "config.json", ControlNetConfig.from_diffusers)
    check_fits(source, cfg.unet, unet, spec)
    return load_module(lambda: ControlNet(cfg), read_safetensors(weights, dtype), weights, "ControlNet", device)

