"""The KL autoencoder (VAE) that maps images to latents and back, leaf blocks first.

Module names are diffusers' `AutoencoderKL` ones, so an official `vae/diffusion_pytorch_model.safetensors`
loads with `strict=True`. The resnet, down- and upsampling blocks are the UNet's (without the time
embedding).
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import ConfigError
from ldm.networks.attention import attention
from ldm.networks.unet import Downsample, ResnetBlock, Upsample


@dataclass(frozen=True)
class VAEConfig:
    """The fields of an official `vae/config.json`, with diffusers' `AutoencoderKL` defaults for absent ones
    (the official files state the SD widths — 128, 256, 512, 512 and two resnets a level — in full)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    norm_num_groups: int = 32
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "VAEConfig":
        if cfg.get("act_fn", "silu") != "silu":
            raise ConfigError(f"vae config: act_fn={cfg['act_fn']!r} is not supported")
        for key, kind in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
            if any(t != kind for t in cfg.get(key, [kind])):
                raise ConfigError(f"vae config: {key} must all be {kind!r}, got {cfg[key]}")
        if cfg.get("latents_mean") is not None:
            raise ConfigError("vae config: latents_mean/latents_std are not supported")
        levels = len(cfg.get("block_out_channels", cls.block_out_channels))
        for key in ("down_block_types", "up_block_types"):
            if len(cfg.get(key, [None])) != levels:
                raise ConfigError(f"vae config: {key} has {len(cfg.get(key, [None]))} entries for {levels} levels")
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg}
        if "block_out_channels" in fields:
            fields["block_out_channels"] = tuple(fields["block_out_channels"])
        # diffusers writes `null` for "use the class default" in some configs
        return cls(**{k: v for k, v in fields.items() if v is not None or k == "shift_factor"})


class AttentionBlock(nn.Module):
    """Single-head spatial self-attention with a residual, in the VAE's mid block."""

    def __init__(self, ch: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, ch, eps=1e-6)
        self.to_q = nn.Linear(ch, ch)
        self.to_k = nn.Linear(ch, ch)
        self.to_v = nn.Linear(ch, ch)
        self.to_out = nn.ModuleList([nn.Linear(ch, ch)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        y = self.group_norm(x).flatten(2).transpose(1, 2)
        y = attention(self.to_q(y), self.to_k(y), self.to_v(y), heads=1)
        y = self.to_out[0](y)
        return x + y.transpose(1, 2).reshape(b, c, h, w)


class MidBlock(nn.Module):
    def __init__(self, ch: int, groups: int, attn: bool):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(ch, ch, None, groups, 1e-6) for _ in range(2))
        self.attentions = nn.ModuleList([AttentionBlock(ch, groups)]) if attn else None

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        if self.attentions is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class EncoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, downsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6) for i in range(n))
        self.downsamplers = nn.ModuleList([Downsample(out_ch, padding=0)]) if downsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class DecoderBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, n: int, groups: int, upsample: bool):
        super().__init__()
        self.resnets = nn.ModuleList(
            ResnetBlock(in_ch if i == 0 else out_ch, out_ch, None, groups, 1e-6) for i in range(n))
        self.upsamplers = nn.ModuleList([Upsample(out_ch)]) if upsample else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


class Encoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels, cfg.norm_num_groups, cfg.layers_per_block
        self.conv_in = nn.Conv2d(cfg.in_channels, ch[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(
            EncoderBlock(ch[max(i - 1, 0)], ch[i], n, g, downsample=i < len(ch) - 1) for i in range(len(ch)))
        self.mid_block = MidBlock(ch[-1], g, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], 2 * cfg.latent_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: VAEConfig):
        super().__init__()
        ch, g, n = cfg.block_out_channels[::-1], cfg.norm_num_groups, cfg.layers_per_block + 1
        self.conv_in = nn.Conv2d(cfg.latent_channels, ch[0], 3, padding=1)
        self.mid_block = MidBlock(ch[0], g, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            DecoderBlock(ch[max(i - 1, 0)], ch[i], n, g, upsample=i < len(ch) - 1) for i in range(len(ch)))
        self.conv_norm_out = nn.GroupNorm(g, ch[-1], eps=1e-6)
        self.conv_out = nn.Conv2d(ch[-1], cfg.out_channels, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class VAE(nn.Module):
    """`encode(images in [-1, 1])` → latent mean and log-variance; `decode(latents)` → images in [-1, 1].

    Latents here are the raw autoencoder latents; the pipeline multiplies by `config.scaling_factor`.
    """

    def __init__(self, cfg: VAEConfig):
        super().__init__()
        self.config = cfg
        z2 = 2 * cfg.latent_channels
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv2d(z2, z2, 1) if cfg.use_quant_conv else None
        self.post_quant_conv = (nn.Conv2d(cfg.latent_channels, cfg.latent_channels, 1)
                                if cfg.use_post_quant_conv else None)

    def encode(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and log-variance (clamped to [-30, 20]) of the diagonal Gaussian posterior."""
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    @staticmethod
    def sample(mean: Tensor, logvar: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """A draw from the posterior, noise from `generator` on the CPU as diffusers' `randn_tensor` does, copied to
        a GPU through pinned memory without waiting for the encoder's work queued there."""
        noise = torch.randn(mean.shape, generator=generator, dtype=mean.dtype)
        noise = noise.pin_memory().to(mean.device, non_blocking=True) if mean.is_cuda else noise.to(mean.device)
        return mean + torch.exp(0.5 * logvar) * noise

    def decode(self, z: Tensor) -> Tensor:
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z)
