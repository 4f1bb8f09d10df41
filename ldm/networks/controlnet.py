"""ControlNet (Zhang et al. 2023, "Adding Conditional Control to Text-to-Image Diffusion Models"): a trainable copy
of the UNet's encoder half and mid block that reads a control image (edges, depth, pose…) and returns one residual per
skip connection and one for the mid block, which the UNet adds (`UNet.forward(down_residuals=, mid_residual=)`).

Reproduces diffusers' `ControlNetModel` (src/diffusers/models/controlnets/controlnet.py, v0.42): module names are
its own (`controlnet_cond_embedding.*`, `controlnet_down_blocks.N`, `controlnet_mid_block`, and the UNet's for the
rest), so a diffusers ControlNet folder loads with `strict=True`. The encoder is built from ldm's UNet blocks
(`ldm.networks.unet`), not a fork of them. How the residuals are weighted (a unit's weight, diffusers' guess mode,
A1111's control modes) is `scaled`'s, outside the network.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import ConfigError
from ldm.networks.unet import DownBlock, MidBlock, TimestepEmbedding, UNetConfig, embed_time

# config.json fields that are the ControlNet's own, not its encoder's (a UNet config's)
OWN_FIELDS = ("conditioning_channels", "conditioning_embedding_out_channels", "global_pool_conditions",
              "controlnet_conditioning_channel_order", "_class_name", "_diffusers_version", "_name_or_path")


@dataclass(frozen=True)
class ControlNetConfig:
    """A ControlNet's config.json: its encoder's layout as a `UNetConfig` (the up blocks mirrored, unused) and the
    hint embedding's widths."""

    unet: UNetConfig
    conditioning_channels: int = 3
    conditioning_embedding_out_channels: tuple[int, ...] = (16, 32, 96, 256)
    global_pool_conditions: bool = False  # shuffle models: each residual averaged over the image
    bgr: bool = False  # `controlnet_conditioning_channel_order: "bgr"`: the hint's channels reversed

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "ControlNetConfig":
        order = cfg.get("controlnet_conditioning_channel_order", "rgb")
        if order not in ("rgb", "bgr"):
            raise ConfigError(f"controlnet config: controlnet_conditioning_channel_order={order!r} is not supported")
        if cfg.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
            raise ConfigError(f"controlnet config: mid_block_type={cfg['mid_block_type']!r} is not supported")
        down = cfg.get("down_block_types", UNetConfig.down_block_types)
        encoder = {k: v for k, v in cfg.items() if k not in OWN_FIELDS}
        encoder["up_block_types"] = [kind.replace("Down", "Up") for kind in reversed(down)]
        widths = cfg.get("conditioning_embedding_out_channels") or cls.conditioning_embedding_out_channels
        return cls(UNetConfig.from_diffusers(encoder), cfg.get("conditioning_channels", 3), tuple(widths),
                   bool(cfg.get("global_pool_conditions", False)), order == "bgr")


class HintEmbedding(nn.Module):
    """The control image to the UNet's first width at the latent size: a conv, then per width a conv and a stride-2
    conv, SiLU after each, and a last conv (zero-initialised in training). diffusers'
    `ControlNetConditioningEmbedding`."""

    def __init__(self, out_ch: int, in_ch: int, widths: tuple[int, ...]):
        super().__init__()
        self.conv_in = nn.Conv2d(in_ch, widths[0], 3, padding=1)
        self.blocks = nn.ModuleList()
        for width, wider in zip(widths, widths[1:], strict=False):
            self.blocks.append(nn.Conv2d(width, width, 3, padding=1))
            self.blocks.append(nn.Conv2d(width, wider, 3, padding=1, stride=2))
        self.conv_out = nn.Conv2d(widths[-1], out_ch, 3, padding=1)

    def forward(self, hint: Tensor) -> Tensor:
        x = F.silu(self.conv_in(hint))
        for block in self.blocks:
            x = F.silu(block(x))
        return self.conv_out(x)


class ControlNet(nn.Module):
    """`controlnet(x, t, context, hint)` → (one residual per UNet skip connection, the mid block's residual),
    unweighted. `hint`: (B, 3, H, W) in [0, 1] at the image's size (8× the latents')."""

    def __init__(self, cfg: ControlNetConfig):
        super().__init__()
        self.controlnet_config = cfg
        self.config = u = cfg.unet  # (read by `embed_time`, as a UNet's)
        ch, levels = u.block_out_channels, len(u.block_out_channels)
        temb_ch = ch[0] * 4
        self.conv_in = nn.Conv2d(u.in_channels, ch[0], 3, padding=1)
        self.time_embedding = TimestepEmbedding(ch[0], temb_ch, u.time_cond_proj_dim)
        if u.addition_embed_type == "text_time":
            self.add_embedding = TimestepEmbedding(u.projection_class_embeddings_input_dim, temb_ch)
        elif u.addition_embed_type is not None:
            raise ConfigError(f"controlnet config: addition_embed_type={u.addition_embed_type!r} is not supported")
        self.controlnet_cond_embedding = HintEmbedding(ch[0], cfg.conditioning_channels,
                                                       cfg.conditioning_embedding_out_channels)
        self.down_blocks = nn.ModuleList(
            DownBlock(u, ch[max(i - 1, 0)], ch[i], temb_ch, i, attn=kind.startswith("CrossAttn"),
                      downsample=i < levels - 1) for i, kind in enumerate(u.down_block_types))
        skip_widths = [ch[0]] + [w for i, w in enumerate(ch) for _ in range(u.layers_per_block + (i < levels - 1))]
        self.controlnet_down_blocks = nn.ModuleList(nn.Conv2d(w, w, 1) for w in skip_widths)
        self.mid_block = MidBlock(u, ch[-1], temb_ch)
        self.controlnet_mid_block = nn.Conv2d(ch[-1], ch[-1], 1)

    def forward(self, x: Tensor, t, context: Tensor, hint: Tensor, text_embeds: Tensor | None = None,
                time_ids: Tensor | None = None, timestep_cond: Tensor | None = None) -> tuple[list[Tensor], Tensor]:
        temb = embed_time(self, x, t, text_embeds, time_ids, timestep_cond)
        if self.controlnet_config.bgr:
            hint = hint.flip(1)
        x = self.conv_in(x) + self.controlnet_cond_embedding(hint.to(x.dtype))
        skips = [x]
        for block in self.down_blocks:
            x, block_skips = block(x, temb, context)
            skips += block_skips
        x = self.mid_block(x, temb, context)
        return [conv(skip) for conv, skip in zip(self.controlnet_down_blocks, skips, strict=True)], \
            self.controlnet_mid_block(x)


def scaled(down: list[Tensor], mid: Tensor, scale: float, guess_mode: bool = False, soft: bool = False,
           global_pool: bool = False) -> tuple[list[Tensor], Tensor]:
    """A unit's residuals weighted: each × `scale` (diffusers' `conditioning_scale`); diffusers' guess mode instead
    × logspace(−1, 0, N + 1)·scale (from the first residual to the mid one; not for pooled models); A1111's soft
    injection (`soft`: "My prompt is more important" and "ControlNet is more important") × scale·0.825^(12 − i),
    i over the 13 residuals of an SD 1.x ControlNet, the first of those for a shorter list (sd-webui-controlnet
    scripts/hook.py); then, for `global_pool` models (shuffle), each averaged over the image."""
    residuals = [*down, mid]
    if soft:
        factors = [scale * 0.825 ** float(12 - i) for i in range(13)][:len(residuals)]
    elif guess_mode and not global_pool:  # (0-dim tensors, as diffusers multiplies by them)
        factors = list(torch.logspace(-1, 0, len(residuals), device=mid.device) * scale)
    else:
        factors = [scale] * len(residuals)
    residuals = [r * f for r, f in zip(residuals, factors, strict=True)]
    if global_pool:
        residuals = [r.mean(dim=(2, 3), keepdim=True) for r in residuals]
    return residuals[:-1], residuals[-1]
