"""TAESD, the tiny autoencoder (madebyollin/taesd, taesdxl): images ↔ the latents a UNet works on, in ~1 % of the
KL VAE's compute. A drop-in for the VAE (`--vae`) and the decoder of previews.

Reproduces diffusers' `AutoencoderTiny` (src/diffusers/models/autoencoders/autoencoder_tiny.py, with `EncoderTiny`
and `DecoderTiny` in vae.py and `AutoencoderTinyBlock` in unet_2d_blocks.py, diffusers v0.42): module names are its
own (`encoder.layers.N…`, `decoder.layers.N…`), so a diffusers `AutoencoderTiny` folder loads with `strict=True`.
The original files (`taesd_encoder.safetensors`, `taesd_decoder.safetensors`) are those Sequentials' own state
dicts; `original_keys` maps them. TAESD's latents are the UNet's (its scaling factor is 1.0) and encoding is
deterministic: no posterior, no random draw.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import ConfigError


@dataclass(frozen=True)
class TinyVAEConfig:
    """The fields of an `AutoencoderTiny` config.json (absent ones: the class defaults, which are TAESD's)."""

    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 4
    encoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    decoder_block_out_channels: tuple[int, ...] = (64, 64, 64, 64)
    num_encoder_blocks: tuple[int, ...] = (1, 3, 3, 3)
    num_decoder_blocks: tuple[int, ...] = (3, 3, 3, 1)
    scaling_factor: float = 1.0
    shift_factor: float | None = None
    force_upcast: bool = False

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        """One width per level, as the KL VAE's config has it (its length gives the pixels per latent)."""
        return self.encoder_block_out_channels

    @classmethod
    def from_diffusers(cls, cfg: dict) -> "TinyVAEConfig":
        for key, value in (("act_fn", "relu"), ("upsample_fn", "nearest"), ("upsampling_scaling_factor", 2),
                           ("latent_magnitude", 3), ("latent_shift", 0.5)):
            if cfg.get(key, value) != value:
                raise ConfigError(f"AutoencoderTiny config: {key}={cfg[key]!r} is not supported (expected {value!r})")
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()
                  if k in cls.__dataclass_fields__ and v is not None}
        shift = cfg.get("shift_factor")
        return cls(**fields | {"shift_factor": shift or None})  # diffusers writes 0.0 for "no shift"


class Block(nn.Module):
    """conv → ReLU → conv → ReLU → conv, plus the input (1×1 conv when the width changes), then ReLU."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(in_ch, out_ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(out_ch, out_ch, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.skip = nn.Conv2d(in_ch, out_ch, 1, bias=False) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.conv(x) + self.skip(x))


class Encoder(nn.Module):
    """Per level: a conv (stride 2 after the first, no bias), then its blocks; a last conv to the latents."""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        layers, width = [], cfg.in_channels
        for level, (channels, blocks) in enumerate(zip(cfg.encoder_block_out_channels, cfg.num_encoder_blocks,
                                                       strict=True)):
            layers.append(nn.Conv2d(width, channels, 3, padding=1) if level == 0 else
                          nn.Conv2d(width, channels, 3, padding=1, stride=2, bias=False))
            layers += [Block(channels, channels) for _ in range(blocks)]
            width = channels
        layers.append(nn.Conv2d(width, cfg.latent_channels, 3, padding=1))
        self.layers = nn.Sequential(*layers)

    def forward(self, images: Tensor) -> Tensor:
        return self.layers(images.add(1).div(2))  # TAESD takes images in [0, 1]


class Decoder(nn.Module):
    """A conv and ReLU, then per level its blocks, a ×2 nearest upsample (not after the last) and a conv."""

    def __init__(self, cfg: TinyVAEConfig):
        super().__init__()
        widths = cfg.decoder_block_out_channels
        layers = [nn.Conv2d(cfg.latent_channels, widths[0], 3, padding=1), nn.ReLU()]
        for level, (channels, blocks) in enumerate(zip(widths, cfg.num_decoder_blocks, strict=True)):
            last = level == len(widths) - 1
            layers += [Block(channels, channels) for _ in range(blocks)]
            if not last:
                layers.append(nn.Upsample(scale_factor=2, mode="nearest"))
            layers.append(nn.Conv2d(channels, cfg.out_channels if last else channels, 3, padding=1, bias=last))
        self.layers = nn.Sequential(*layers)

    def forward(self, z: Tensor) -> Tensor:
        return self.layers(torch.tanh(z / 3) * 3).mul(2).sub(1)  # latents soft-clamped to ±3; images to [-1, 1]


class TinyVAE(nn.Module):
    """The VAE's interface (`encode` → (latents, None), `sample`, `decode`) on TAESD. Either half may be absent (an
    original `taesd_decoder.safetensors` alone): using it is then an error that says which file is missing."""

    def __init__(self, cfg: TinyVAEConfig, encoder: bool = True, decoder: bool = True):
        super().__init__()
        self.config = cfg
        self.encoder = Encoder(cfg) if encoder else None
        self.decoder = Decoder(cfg) if decoder else None

    def encode(self, images: Tensor) -> tuple[Tensor, None]:
        if self.encoder is None:
            raise ConfigError("this TAESD has no encoder (taesd_encoder.safetensors beside the decoder's file)")
        return self.encoder(images), None

    @staticmethod
    def sample(latents: Tensor, _logvar: None = None, generator: torch.Generator | None = None) -> Tensor:
        """The latents themselves: TAESD encodes deterministically (diffusers' `retrieve_latents` takes
        `.latents`), and draws nothing from the generator."""
        return latents

    def decode(self, z: Tensor) -> Tensor:
        if self.decoder is None:
            raise ConfigError("this TAESD has no decoder (taesd_decoder.safetensors beside the encoder's file)")
        return self.decoder(z)


def original_keys(part: str, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """An original TAESD file's state dict (its Sequential's, `part` "encoder" or "decoder") in diffusers' names: the
    encoder's layers keep their indices; the decoder's lose one, its first layer (a clamp) being in `forward` in
    diffusers (as diffusers' scripts/convert_tiny_autoencoder_to_diffusers.py renames them)."""
    shift = 1 if part == "decoder" else 0

    def renamed(key: str) -> str:
        index, rest = key.split(".", 1)
        return f"{part}.layers.{int(index) - shift}.{rest}"

    return {renamed(key): value for key, value in state.items()}
