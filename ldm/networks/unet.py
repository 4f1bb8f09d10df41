"""The denoising UNet of every Stable Diffusion family, leaf blocks first.

One configurable network serves SD 1.x, SD 2.x (linear projections, per-level heads, upcast
attention), the 9-channel inpainting UNet, SDXL base (per-level transformer depth, `text_time`
micro-conditioning) and the SDXL refiner. Module names are those of diffusers'
`UNet2DConditionModel`, so an official `unet/diffusion_pytorch_model.safetensors` loads with
`strict=True` and no renaming.
"""

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import ConfigError
from ldm.networks.attention import attention

# ----------------------------------------------------------------------------------------- config


# config.json fields whose other values ldm does not implement, with the one value it takes (diffusers' default)
UNSUPPORTED_FIELDS = {
    "class_embed_type": None, "encoder_hid_dim": None,
    "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
    "only_cross_attention": False, "dual_cross_attention": False, "center_input_sample": False,
    "act_fn": "silu", "conv_in_kernel": 3, "conv_out_kernel": 3,
    "mid_block_type": "UNetMidBlock2DCrossAttn", "num_class_embeds": None,
    "attention_type": "default", "mid_block_only_cross_attention": None,
    "cross_attention_norm": None, "resnet_skip_time_act": False,
    "mid_block_scale_factor": 1, "resnet_out_scale_factor": 1.0,
}
BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D", "CrossAttnUpBlock2D", "UpBlock2D")


def _block_types(cfg: dict, down_default: tuple[str, ...], up_default: tuple[str, ...]) -> tuple[tuple, tuple]:
    """`down_block_types` and `up_block_types`: as many levels each, of the block types ldm builds."""
    down = tuple(cfg.get("down_block_types", down_default))
    up = tuple(cfg.get("up_block_types", up_default))
    if len(up) != len(down):
        raise ConfigError("unet config: down_block_types and up_block_types differ in length")
    for name in down + up:
        if name not in BLOCK_TYPES:
            raise ConfigError(f"unet config: block type {name!r} is not supported")
    return down, up


def _per_level(cfg: dict, levels: int) -> tuple[tuple, tuple, tuple]:
    """(heads, transformer depth in down order, transformer depth in up order), one entry per level, a single
    value given for all; layers_per_block and cross_attention_dim may not be per level."""

    def per_level(value, name):
        value = tuple(value) if isinstance(value, (list, tuple)) else (value,) * levels
        if len(value) != levels:
            raise ConfigError(f"unet config: {name} has {len(value)} entries for {levels} levels")
        return value

    if isinstance(cfg.get("layers_per_block", 2), (list, tuple)):
        raise ConfigError("unet config: per-level layers_per_block is not supported")
    if isinstance(cfg.get("cross_attention_dim", 768), (list, tuple)):
        raise ConfigError("unet config: per-level cross_attention_dim is not supported")
    # diffusers' historical misnomer: `attention_head_dim` is the number of heads unless
    # `num_attention_heads` is given.
    heads = per_level(cfg.get("num_attention_heads") or cfg.get("attention_head_dim", 8), "heads")
    depth = per_level(cfg.get("transformer_layers_per_block", 1), "transformer_layers_per_block")
    depth_up = cfg.get("reverse_transformer_layers_per_block")
    depth_up = tuple(depth[::-1]) if depth_up is None else per_level(depth_up, "reverse_transformer_layers")
    if any(isinstance(d, (list, tuple)) for d in depth_up):
        raise ConfigError("unet config: nested reverse_transformer_layers_per_block is not supported")
    return heads, depth, depth_up


@dataclass(frozen=True)
class UNetConfig:
    """The fields of an official `unet/config.json`, resolved the way diffusers resolves them."""

    in_channels: int = 4
    out_channels: int = 4
    sample_size: int = 64
    down_block_types: tuple[str, ...] = (
        "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D")
    up_block_types: tuple[str, ...] = (
        "UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    heads: tuple[int, ...] = (8, 8, 8, 8)  # per level, down order
    transformer_depth: tuple[int, ...] = (1, 1, 1, 1)  # per level, down order
    transformer_depth_up: tuple[int, ...] = (1, 1, 1, 1)  # per level, up order
    cross_attention_dim: int = 768
    use_linear_projection: bool = False
    upcast_attention: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    downsample_padding: int = 1
    addition_embed_type: str | None = None  # "text_time" for SDXL
    addition_time_embed_dim: int | None = None
    projection_class_embeddings_input_dim: int | None = None
    # LCM UNets: the width of the guidance-scale embedding the time embedding takes (`guidance_embedding`)
    time_cond_proj_dim: int | None = None
    extra: dict = field(default_factory=dict, compare=False, repr=False)  # unused config.json fields

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "UNetConfig":
        """Read an official config.json dict (absent fields take diffusers' class defaults)."""
        for key, default in UNSUPPORTED_FIELDS.items():
            if cfg.get(key, default) != default:
                raise ConfigError(f"unet config: {key}={cfg[key]!r} is not supported (expected {default!r})")
        down, up = _block_types(cfg, cls.down_block_types, cls.up_block_types)
        heads, depth, depth_up = _per_level(cfg, len(down))
        known = {f for f in cls.__dataclass_fields__} | set(UNSUPPORTED_FIELDS) | {
            "attention_head_dim", "num_attention_heads", "transformer_layers_per_block",
            "reverse_transformer_layers_per_block"}
        return cls(
            in_channels=cfg.get("in_channels", 4),
            out_channels=cfg.get("out_channels", 4),
            sample_size=cfg.get("sample_size", 64),
            down_block_types=down,
            up_block_types=up,
            block_out_channels=tuple(cfg.get("block_out_channels", cls.block_out_channels)),
            layers_per_block=cfg.get("layers_per_block", 2),
            heads=heads,
            transformer_depth=depth,
            transformer_depth_up=depth_up,
            cross_attention_dim=cfg.get("cross_attention_dim", 1280),
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
            upcast_attention=bool(cfg.get("upcast_attention", False)),
            norm_num_groups=cfg.get("norm_num_groups", 32),
            norm_eps=cfg.get("norm_eps", 1e-5),
            flip_sin_to_cos=cfg.get("flip_sin_to_cos", True),
            freq_shift=cfg.get("freq_shift", 0),
            downsample_padding=cfg.get("downsample_padding", 1),
            addition_embed_type=cfg.get("addition_embed_type"),
            addition_time_embed_dim=cfg.get("addition_time_embed_dim"),
            projection_class_embeddings_input_dim=cfg.get("projection_class_embeddings_input_dim"),
            time_cond_proj_dim=cfg.get("time_cond_proj_dim"),
            extra={k: v for k, v in cfg.items() if k not in known},
        )


# ------------------------------------------------------------------------------------ leaf blocks


def timestep_embedding(t: Tensor, dim: int, flip_sin_to_cos: bool = True, shift: float = 0.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, as in DDPM / diffusers' `Timesteps`."""
    half = dim // 2
    exponent = -math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - shift)
    emb = t[:, None].float() * torch.exp(exponent)[None, :]
    emb = torch.cat([emb.sin(), emb.cos()], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half:], emb[:, :half]], dim=-1)
    return F.pad(emb, (0, dim % 2))


def guidance_embedding(w: Tensor, dim: int) -> Tensor:
    """The sinusoidal embedding of a guidance weight w (LCM: w = guidance − 1), scaled by 1000, sin first: diffusers'
    `get_guidance_scale_embedding` (pipeline_latent_consistency_text2img.py; Luo et al. 2023, §4.2)."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, dtype=torch.float32) * -(torch.log(torch.tensor(10000.0)) / (half - 1)))
    emb = (w.float() * 1000.0)[:, None] * frequencies[None, :]
    return F.pad(torch.cat([emb.sin(), emb.cos()], dim=1), (0, dim % 2))


class TimestepEmbedding(nn.Module):
    """Linear → SiLU → Linear, mapping a sinusoidal embedding to the block-wide time embedding; with `cond_dim`
    (LCM UNets), a condition projected to the input's width (no bias) is added to the input first."""

    def __init__(self, in_dim: int, dim: int, cond_dim: int | None = None):
        super().__init__()
        self.cond_proj = nn.Linear(cond_dim, in_dim, bias=False) if cond_dim else None
        self.linear_1 = nn.Linear(in_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: Tensor, condition: Tensor | None = None) -> Tensor:
        if condition is not None:
            x = x + self.cond_proj(condition)
        return self.linear_2(F.silu(self.linear_1(x)))


class ResnetBlock(nn.Module):
    """GroupNorm → SiLU → conv, plus the time embedding, twice; 1×1 shortcut when widths change."""

    def __init__(self, in_ch: int, out_ch: int, temb_ch: int | None, groups: int = 32, eps: float = 1e-5):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_ch, eps=eps)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.time_emb_proj = nn.Linear(temb_ch, out_ch) if temb_ch else None
        self.norm2 = nn.GroupNorm(groups, out_ch, eps=eps)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.conv_shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else None

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


class Downsample(nn.Module):
    """Strided 3×3 conv; padding 0 means the VAE's asymmetric (right/bottom) zero pad."""

    def __init__(self, ch: int, padding: int = 1):
        super().__init__()
        self.padding = padding
        self.conv = nn.Conv2d(ch, ch, 3, stride=2, padding=padding)

    def forward(self, x: Tensor) -> Tensor:
        if self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour ×2 (or to `size`, for odd skip sizes) then a 3×3 conv."""

    def __init__(self, ch: int):
        super().__init__()
        self.conv = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x: Tensor, size: tuple[int, int] | None = None) -> Tensor:
        if size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=size, mode="nearest")
        return self.conv(x)


class Attention(nn.Module):
    """Multi-head (cross-)attention with diffusers' projection names: to_q, to_k, to_v, to_out.0."""

    def __init__(self, dim: int, heads: int, context_dim: int | None = None, upcast: bool = False):
        super().__init__()
        self.heads, self.upcast = heads, upcast
        context_dim = context_dim or dim
        self.to_q = nn.Linear(dim, dim, bias=False)
        self.to_k = nn.Linear(context_dim, dim, bias=False)
        self.to_v = nn.Linear(context_dim, dim, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        k, v = self.key_value(x if context is None else context)
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads, upcast=self.upcast))

    def key_value(self, context: Tensor) -> tuple[Tensor, Tensor]:
        """The keys and values of `context` (what an adapter's added attention reuses, `ldm.adapters.ip_adapter`)."""
        return self.to_k(context), self.to_v(context)


class GEGLU(nn.Module):
    """Gated GELU: one projection to twice the width, one half gating the other (Shazeer 2020)."""

    def __init__(self, dim: int, inner: int):
        super().__init__()
        self.proj = nn.Linear(dim, inner * 2)

    def forward(self, x: Tensor) -> Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        # index 1 is diffusers' dropout; keeping the slot keeps the official names `net.0` / `net.2`
        self.net = nn.ModuleList([GEGLU(dim, dim * mult), nn.Identity(), nn.Linear(dim * mult, dim)])

    def forward(self, x: Tensor) -> Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class TransformerBlock(nn.Module):
    """Pre-norm self-attention, cross-attention to the text, and a GEGLU feed-forward."""

    def __init__(self, dim: int, heads: int, context_dim: int, upcast: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn1 = Attention(dim, heads, upcast=upcast)
        self.norm2 = nn.LayerNorm(dim)
        self.attn2 = Attention(dim, heads, context_dim, upcast=upcast)
        self.norm3 = nn.LayerNorm(dim)
        self.ff = FeedForward(dim)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = x + self.attn1(self.norm1(x))
        x = x + self.attn2(self.norm2(x), context)
        return x + self.ff(self.norm3(x))


class SpatialTransformer(nn.Module):
    """diffusers' `Transformer2DModel`: GroupNorm, project in (1×1 conv or linear), blocks, project out."""

    def __init__(self, ch: int, heads: int, depth: int, context_dim: int, linear: bool, upcast: bool,
                 groups: int = 32):
        super().__init__()
        self.linear = linear
        self.norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.proj_in = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)
        self.transformer_blocks = nn.ModuleList(
            TransformerBlock(ch, heads, context_dim, upcast) for _ in range(depth))
        self.proj_out = nn.Linear(ch, ch) if linear else nn.Conv2d(ch, ch, 1)

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        b, c, h, w = x.shape
        residual = x
        x = self.norm(x)
        if not self.linear:
            x = self.proj_in(x)
        x = x.permute(0, 2, 3, 1).reshape(b, h * w, c)
        if self.linear:
            x = self.proj_in(x)
        for block in self.transformer_blocks:
            x = block(x, context)
        if self.linear:
            x = self.proj_out(x)
        # contiguous in the input's memory format: channels_last stays so (no copy), as `accelerate` lays it out
        nhwc = residual.is_contiguous(memory_format=torch.channels_last)
        x = x.reshape(b, h, w, c).permute(0, 3, 1, 2).contiguous(
            memory_format=torch.channels_last if nhwc else torch.contiguous_format)
        if not self.linear:
            x = self.proj_out(x)
        return x + residual


# ----------------------------------------------------------------------------------------- levels


class DownBlock(nn.Module):
    """One encoder level: resnets (each followed by a transformer if `heads`), then a downsampler."""

    def __init__(self, cfg: UNetConfig, in_ch: int, out_ch: int, temb_ch: int, level: int, attn: bool,
                 downsample: bool):
        super().__init__()
        n, g = cfg.layers_per_block, cfg.norm_num_groups
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, temb_ch, g, cfg.norm_eps) for i in range(n))
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_ch, cfg.heads[level], cfg.transformer_depth[level], cfg.cross_attention_dim,
                               cfg.use_linear_projection, cfg.upcast_attention, g)
            for _ in range(n)) if attn else None
        self.downsamplers = nn.ModuleList([Downsample(out_ch, cfg.downsample_padding)]) if downsample else None

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> tuple[Tensor, list[Tensor]]:
        skips = []
        for i, resnet in enumerate(self.resnets):
            x = resnet(x, temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
            skips.append(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
            skips.append(x)
        return x, skips


class MidBlock(nn.Module):
    """resnet → transformer → resnet at the lowest resolution."""

    def __init__(self, cfg: UNetConfig, ch: int, temb_ch: int):
        super().__init__()
        g = cfg.norm_num_groups
        self.resnets = nn.ModuleList(ResnetBlock(ch, ch, temb_ch, g, cfg.norm_eps) for _ in range(2))
        self.attentions = nn.ModuleList([SpatialTransformer(
            ch, cfg.heads[-1], cfg.transformer_depth[-1], cfg.cross_attention_dim, cfg.use_linear_projection,
            cfg.upcast_attention, g)])

    def forward(self, x: Tensor, temb: Tensor, context: Tensor) -> Tensor:
        x = self.resnets[0](x, temb)
        x = self.attentions[0](x, context)
        return self.resnets[1](x, temb)


class UpBlock(nn.Module):
    """One decoder level: resnets fed with the matching skips (each followed by a transformer if
    `attn`), then an upsampler."""

    def __init__(self, cfg: UNetConfig, prev_ch: int, out_ch: int, skip_in_ch: int, temb_ch: int, level: int,
                 attn: bool, upsample: bool):
        super().__init__()
        n, g = cfg.layers_per_block + 1, cfg.norm_num_groups
        heads = cfg.heads[::-1][level]
        self.resnets = nn.ModuleList(
            ResnetBlock((prev_ch if i == 0 else out_ch) + (skip_in_ch if i == n - 1 else out_ch), out_ch,
                        temb_ch, g, cfg.norm_eps) for i in range(n))
        self.attentions = nn.ModuleList(
            SpatialTransformer(out_ch, heads, cfg.transformer_depth_up[level], cfg.cross_attention_dim,
                               cfg.use_linear_projection, cfg.upcast_attention, g)
            for _ in range(n)) if attn else None
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: Tensor, skips: list[Tensor], temb: Tensor, context: Tensor,
                size: tuple[int, int] | None) -> Tensor:
        for i, resnet in enumerate(self.resnets):
            x = resnet(torch.cat([x, skips.pop()], dim=1), temb)
            if self.attentions is not None:
                x = self.attentions[i](x, context)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, size)
        return x


# ------------------------------------------------------------------------------------------ UNet


def embed_time(net: nn.Module, x: Tensor, t, text_embeds: Tensor | None = None, time_ids: Tensor | None = None,
               timestep_cond: Tensor | None = None) -> Tensor:
    """The block-wide time embedding of a UNet (or of a ControlNet, its encoder half: `net.config` is a
    `UNetConfig`): the timestep's sinusoid through `time_embedding` (with an LCM UNet's embedded guidance), plus
    SDXL's `text_time` embedding of the pooled text and the micro-conditioning ids through `add_embedding`."""
    cfg = net.config
    t = t.reshape(-1).expand(x.shape[0]) if torch.is_tensor(t) else torch.full((x.shape[0],), t)
    t_emb = timestep_embedding(t.to(x.device), cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift)
    if (timestep_cond is None) != (cfg.time_cond_proj_dim is None):
        raise ValueError("timestep_cond goes with a UNet whose config has time_cond_proj_dim, and it needs one")
    temb = net.time_embedding(t_emb.to(x.dtype), None if timestep_cond is None else timestep_cond.to(x.dtype))
    if cfg.addition_embed_type == "text_time":
        if text_embeds is None or time_ids is None:
            raise ValueError("this UNet (addition_embed_type='text_time') needs text_embeds and time_ids")
        ids = timestep_embedding(time_ids.flatten(), cfg.addition_time_embed_dim, cfg.flip_sin_to_cos,
                                 cfg.freq_shift).reshape(text_embeds.shape[0], -1)
        temb = temb + net.add_embedding(torch.cat([text_embeds, ids], dim=-1).to(temb.dtype))
    return temb


class UNet(nn.Module):
    """ε/v-prediction UNet: `unet(x, t, context[, added_cond])` → same shape as `x` (out channels)."""

    def __init__(self, cfg: UNetConfig):
        super().__init__()
        self.config = cfg
        ch = cfg.block_out_channels
        temb_ch = ch[0] * 4
        levels = len(ch)
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch, cfg.time_cond_proj_dim)
        if cfg.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(cfg.projection_class_embeddings_input_dim, temb_ch)
        elif cfg.addition_embed_type is not None:
            raise ConfigError(f"unet config: addition_embed_type={cfg.addition_embed_type!r} is not supported")

        self.down_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.down_block_types):
            self.down_blocks.append(DownBlock(
                cfg, ch[max(i - 1, 0)], ch[i], temb_ch, i, attn=kind.startswith("CrossAttn"),
                downsample=i < levels - 1))
        self.mid_block = MidBlock(cfg, ch[-1], temb_ch)
        rch = ch[::-1]
        self.up_blocks = nn.ModuleList()
        for i, kind in enumerate(cfg.up_block_types):
            self.up_blocks.append(UpBlock(
                cfg, rch[max(i - 1, 0)], rch[i], rch[min(i + 1, levels - 1)], temb_ch, i,
                attn=kind.startswith("CrossAttn"), upsample=i < levels - 1))
        self.conv_norm_out = nn.GroupNorm(cfg.norm_num_groups, ch[0], eps=cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch[0], cfg.out_channels, 3, padding=1)

    def forward(self, x: Tensor, t: Tensor, context: Tensor, text_embeds: Tensor | None = None,
                time_ids: Tensor | None = None, timestep_cond: Tensor | None = None,
                down_residuals: Sequence[Tensor] | None = None, mid_residual: Tensor | None = None) -> Tensor:
        """x: (B, in_channels, h, w) latents; t: scalar or (B,) timesteps; context: (B, tokens, dim).

        SDXL (`text_time`) also takes the pooled text embedding `text_embeds` (B, D) and the
        micro-conditioning `time_ids` (B, 6 or 5); an LCM UNet (`time_cond_proj_dim`) the embedded guidance
        weight `timestep_cond` (B, time_cond_proj_dim), as diffusers' UNet2DConditionModel takes them. A
        ControlNet's residuals are added to the skip connections (`down_residuals`, one per skip, in order) and to
        the mid block's output (`mid_residual`), as diffusers' `down_block_additional_residuals` /
        `mid_block_additional_residual`.
        """
        temb = embed_time(self, x, t, text_embeds, time_ids, timestep_cond)
        x = self.conv_in(x)
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)
        if down_residuals is not None:
            if len(down_residuals) != len(skips):
                raise ValueError(f"{len(down_residuals)} ControlNet residuals for {len(skips)} skip connections")
            skips = [skip + residual for skip, residual in zip(skips, down_residuals, strict=True)]
        if mid_residual is not None:
            x = x + mid_residual
        for block in self.up_blocks:
            n = len(block.resnets)
            level_skips, skips = skips[-n:], skips[:-n]
            # upsample to the size of the next skip (differs from ×2 when a size was odd)
            size = tuple(skips[-1].shape[-2:]) if skips else None
            x = block(x, level_skips, temb, context, size)
        return self.conv_out(F.silu(self.conv_norm_out(x)))
