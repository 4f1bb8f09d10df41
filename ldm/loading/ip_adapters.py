"""IP-Adapter files and the CLIP image encoders they read: names, shapes, fit, loading.

An adapter is one safetensors file with flat keys, as h94/IP-Adapter ships them (`ip-adapter_sd15.safetensors`,
`ip-adapter-plus_sd15`, `ip-adapter-plus-face_sd15`, `ip-adapter-full-face_sd15`, `ip-adapter_sdxl`,
`ip-adapter_sdxl_vit-h`, `ip-adapter-plus_sdxl_vit-h`): `image_proj.*` (the projection, its kind told by its keys
as diffusers tells it: `proj.weight` plain, `proj.3.weight` full, `latents` plus; src/diffusers/loaders/unet.py
`_convert_ip_adapter_image_proj_to_diffusers`, v0.42) and `ip_adapter.N.to_k_ip/to_v_ip.weight` (one pair per
cross-attention, N = 1, 3, 5, …). A name resolves in weights/ipadapter/. `.bin` files are refused, never unpickled.

An image encoder is a transformers `CLIPVisionModelWithProjection` folder (config.json and model.safetensors:
h94/IP-Adapter `models/image_encoder`, ViT-H/14, for the SD 1.5 adapters and the SDXL `vit-h` ones;
`sdxl_models/image_encoder`, ViT-bigG/14, for `ip-adapter_sdxl`), or its name in weights/clip_vision/. With none
given, the first folder there whose width the adapter reads is taken.
"""

from pathlib import Path

import torch
from torch import Tensor

from ldm.errors import LoadError
from ldm.loading.families import weights_dir
from ldm.loading.files import (
    PICKLE_SUFFIXES,
    load_module,
    read_config,
    read_safetensors,
    refuse_pickle,
    weights_file,
)
from ldm.networks.clip import CLIPVisionConfig, CLIPVisionModelWithProjection
from ldm.networks.ip_adapter import HEAD_DIM, IPAdapter, IPAdapterConfig

FAMILY_BY_WIDTH = {768: "SD 1.x", 1024: "SD 2.x", 2048: "SDXL"}  # the cross-attention width of the real UNets


def ipadapter_dir() -> Path:
    return weights_dir() / "ipadapter"


def clip_vision_dir() -> Path:
    return weights_dir() / "clip_vision"


def _find(name: str | Path, folder: Path, what: str, suffix: str, allow_paths: bool) -> Path:
    """`name` as a path (where allowed), else `folder/name` or `folder/name{suffix}`."""
    path = Path(name).expanduser()
    if allow_paths and path.exists():
        return path
    if not allow_paths and (path.name != str(name) or str(name).startswith(".")):
        raise LoadError(f"{what} {name!r}: give the name of one in the server's {folder.name}/, not a path")
    for candidate in (folder / str(name), folder / f"{name}{suffix}"):
        if candidate.exists():
            return candidate
    known = sorted(p.stem if p.is_file() else p.name for p in folder.glob("*")) if folder.is_dir() else []
    raise LoadError(f"{what} {name!r}: no such file or folder, here or in {folder}"
                    + (f" (there: {', '.join(known)})" if known else ""))


def find_ip_adapter(name: str | Path, allow_paths: bool = True) -> Path:
    """An adapter file by path, or by name in weights/ipadapter/ (NAME or NAME.safetensors)."""
    return _find(name, ipadapter_dir(), "IP-Adapter", ".safetensors", allow_paths)


def _shape(tensors: dict[str, Tensor], key: str, path: Path) -> tuple[int, ...]:
    if key not in tensors:
        raise LoadError(f"IP-Adapter {path}: no {key} (not an IP-Adapter file ldm reads)")
    return tuple(tensors[key].shape)


def _plus_config(t: dict[str, Tensor], path: Path, common: dict) -> IPAdapterConfig:
    """The resampler's sizes; heads = to_q rows // 64 (diffusers' rule), depth the layers the file has."""
    _, tokens, hidden = _shape(t, "image_proj.latents", path)
    depth = len({k.split(".")[2] for k in t if k.startswith("image_proj.layers.")})
    return IPAdapterConfig("plus", _shape(t, "image_proj.proj_in.weight", path)[1],
                           _shape(t, "image_proj.proj_out.weight", path)[0], tokens, **common, hidden_dim=hidden,
                           depth=depth, heads=_shape(t, "image_proj.layers.0.0.to_q.weight", path)[0] // HEAD_DIM,
                           ff_dim=_shape(t, "image_proj.layers.0.1.1.weight", path)[0])


def ip_adapter_config(path: Path, t: dict[str, Tensor]) -> IPAdapterConfig:
    """What the file's shapes say: its kind, the widths it reads and makes, its cross-attentions' widths."""
    pairs = sorted({int(k.split(".")[1]) for k in t if k.startswith("ip_adapter.")})
    if not pairs or not any(k.startswith("image_proj.") for k in t):
        raise LoadError(f"IP-Adapter {path}: not an IP-Adapter file (it needs image_proj.* and ip_adapter.* keys; "
                        "FaceID adapters and other formats are not read)")
    if pairs != list(range(1, 2 * len(pairs), 2)):
        raise LoadError(f"IP-Adapter {path}: its ip_adapter.N keys are not N = 1, 3, 5, … (found {pairs[:6]}…)")
    widths = tuple(_shape(t, f"ip_adapter.{n}.to_k_ip.weight", path)[0] for n in pairs)
    common = {"widths": widths}
    if "image_proj.proj.weight" in t:
        out, embed = _shape(t, "image_proj.proj.weight", path)
        cross = _shape(t, "image_proj.norm.weight", path)[0]
        return IPAdapterConfig("plain", embed, cross, out // cross, **common)
    if "image_proj.proj.3.weight" in t:
        return IPAdapterConfig("full", _shape(t, "image_proj.proj.0.weight", path)[0],  # (one token per hidden
                               _shape(t, "image_proj.proj.3.weight", path)[0], 257, **common)  # state: ViT-H's 257)
    if "image_proj.latents" in t:
        return _plus_config(t, path, common)
    raise LoadError(f"IP-Adapter {path}: its image_proj keys are none of plain (proj), full (proj.3) or plus "
                    "(latents); FaceID adapters are not read")


def _describe(cross: int, count: int) -> str:
    family = FAMILY_BY_WIDTH.get(cross)
    return f"cross-attention width {cross} and {count} cross-attentions" + (f" ({family})" if family else "")


def load_ip_adapter(source: str | Path, widths: list[int], cross_attention_dim: int, model: str,
                    device: torch.device, dtype: torch.dtype, allow_paths: bool = True) -> IPAdapter:
    """The adapter of `source` for a UNet whose cross-attentions (in diffusers' order) have inner `widths` and read
    a context of `cross_attention_dim`; `model` names that UNet's model in the error when it does not fit."""
    path = find_ip_adapter(source, allow_paths)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.is_dir() or path.suffix != ".safetensors":
        raise LoadError(f"IP-Adapter {source}: give a .safetensors file (the flat image_proj.* / ip_adapter.* "
                        "layout h94/IP-Adapter ships)")
    tensors = read_safetensors(path, dtype)
    cfg = ip_adapter_config(path, tensors)
    if cfg.cross_attention_dim != cross_attention_dim or len(cfg.widths) != len(widths):
        raise LoadError(f"IP-Adapter {path.name} is for a UNet of {_describe(cfg.cross_attention_dim, len(cfg.widths))}"
                        f"; {model} has {_describe(cross_attention_dim, len(widths))}")
    if list(cfg.widths) != list(widths):
        raise LoadError(f"IP-Adapter {path.name} is for a UNet whose cross-attentions have the widths "
                        f"{list(cfg.widths)}; {model}'s have {list(widths)}")
    return load_module(lambda: IPAdapter(cfg), tensors, path, "IP-Adapter", device)


# ------------------------------------------------------------------------------------ image encoders


def encoder_width(cfg: CLIPVisionConfig, adapter: IPAdapterConfig) -> int:
    """The width of what the encoder gives the adapter: its hidden states (full, plus) or its image embedding."""
    return cfg.hidden_size if adapter.reads_hidden_states else cfg.projection_dim


def _vision_config(cfg: dict) -> CLIPVisionConfig:
    arch = (cfg.get("architectures") or ["CLIPVisionModelWithProjection"])[0]
    if arch != "CLIPVisionModelWithProjection":
        raise ValueError(f"architecture {arch!r} is not CLIPVisionModelWithProjection")
    return CLIPVisionConfig.from_transformers(cfg)


def _encoder_folder(path: Path, source) -> Path:
    if path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        path = path.parent  # its model.safetensors, config.json beside it
    if not (path / "config.json").is_file():
        raise LoadError(f"image encoder {source}: give a CLIPVisionModelWithProjection folder (config.json and "
                        "model.safetensors, as h94/IP-Adapter's models/image_encoder)")
    return path


def find_image_encoder(name: str | Path | None, adapter: IPAdapterConfig | None, allow_paths: bool = True) -> Path:
    """The encoder folder `name` (a path, or a name in weights/clip_vision/), or with none the first folder there
    whose width fits `adapter`."""
    if name is not None:
        return _encoder_folder(_find(name, clip_vision_dir(), "image encoder", "", allow_paths), name)
    folders = sorted(p for p in clip_vision_dir().glob("*") if (p / "config.json").is_file()) \
        if clip_vision_dir().is_dir() else []
    for folder in folders:
        cfg = read_config(folder / "config.json", _vision_config)
        if encoder_width(cfg, adapter) == adapter.embed_dim:
            return folder
    reads = "hidden states" if adapter.reads_hidden_states else "image embeddings"
    raise LoadError(f"no image encoder in {clip_vision_dir()} gives the {reads} of width {adapter.embed_dim} the "
                    "IP-Adapter reads: give one (--ip-image-encoder; ViT-H/14 is h94/IP-Adapter's "
                    "models/image_encoder, ViT-bigG/14 its sdxl_models/image_encoder)")


def image_encoder_of_width(adapter: IPAdapterConfig, hidden_size: int) -> Path | None:
    """The first folder in weights/clip_vision/ whose tower is `hidden_size` wide (1280: ViT-H/14, 1664: ViT-bigG/14,
    the encoders sd-webui-controlnet's modules ip-adapter_clip_h and ip-adapter_clip_g name) and that gives the width
    `adapter` reads; None: none there."""
    folders = sorted(p for p in clip_vision_dir().glob("*") if (p / "config.json").is_file()) \
        if clip_vision_dir().is_dir() else []
    for folder in folders:
        cfg = image_encoder_config(folder)
        if cfg.hidden_size == hidden_size and encoder_width(cfg, adapter) == adapter.embed_dim:
            return folder
    return None


def image_encoder_config(folder: Path) -> CLIPVisionConfig:
    """An encoder folder's config (its config.json; no weights read)."""
    return read_config(folder / "config.json", _vision_config)


def load_image_encoder(folder: Path, device: torch.device, dtype: torch.dtype) -> CLIPVisionModelWithProjection:
    """A `CLIPVisionModelWithProjection` folder (the `position_ids` buffer older files hold is dropped)."""
    cfg = read_config(folder / "config.json", _vision_config)
    weights = weights_file(folder, "model")
    state = {k: v for k, v in read_safetensors(weights, dtype).items() if not k.endswith("position_ids")}
    return load_module(lambda: CLIPVisionModelWithProjection(cfg), state, weights, "CLIP image encoder", device)


def check_encoder(encoder: CLIPVisionConfig, encoder_name: str, adapter: IPAdapter, adapter_name: str) -> None:
    """One error naming both when the encoder's width (its config's) is not the one the adapter reads."""
    got, cfg = encoder_width(encoder, adapter.config), adapter.config
    if got != cfg.embed_dim:
        reads = "hidden states" if cfg.reads_hidden_states else "image embeddings (the projected class token)"
        raise LoadError(f"IP-Adapter {adapter_name} ({cfg.kind}) reads {reads} of width {cfg.embed_dim}; the image "
                        f"encoder {encoder_name} gives width {got}")
