"""IP-Adapter's networks (Ye et al. 2023, "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image
Diffusion Models"): an image projection that turns a CLIP image encoding into tokens of the UNet's cross-attention
width, and for each cross-attention of the UNet a key and a value projection of those tokens (`to_k_ip`, `to_v_ip`).

Module names are the original files' (tencent-ailab/IP-Adapter `ip_adapter/ip_adapter.py` `ImageProjModel`,
`MLPProjModel`, `ip_adapter/resampler.py` `Resampler`; the flat `image_proj.*` / `ip_adapter.*` keys of the
h94/IP-Adapter files), so a file loads with strict=True and no renaming. diffusers computes the same under other
names (src/diffusers/models/embeddings.py `ImageProjection`, `IPAdapterFullImageProjection`,
`IPAdapterPlusImageProjection`, v0.42; src/diffusers/loaders/unet.py `_convert_ip_adapter_image_proj_to_diffusers`
maps them):

- plain (`ip-adapter_sd15`, `ip-adapter_sdxl`, `…_vit-h`): the image embedding (the projected class token) → a
  linear layer → 4 tokens → LayerNorm;
- full (`ip-adapter-full-face_sd15`): the penultimate hidden states (257 tokens) → Linear, GELU, Linear, LayerNorm;
- plus (`ip-adapter-plus_sd15`, `-plus-face_sd15`, `-plus_sdxl_vit-h`): the penultimate hidden states → a
  perceiver resampler whose learnt queries (`latents`, 16) attend to them over `depth` layers (heads of 64).

How the tokens enter the UNet is `ldm.adapters.ip_adapter`'s (decoupled cross-attention, from outside).
"""

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ldm.networks.attention import attention

KINDS = ("plain", "full", "plus")
HEAD_DIM = 64  # the resampler's head width (the original's `dim_head`; diffusers reads heads = to_q rows // 64)


@dataclass(frozen=True)
class IPAdapterConfig:
    """What an adapter file's shapes say (`ldm.loading.ip_adapters` reads them)."""

    kind: str  # one of KINDS
    embed_dim: int  # the width it reads: the encoder's projection_dim (plain), its hidden_size (full, plus)
    cross_attention_dim: int  # the UNet's
    tokens: int  # image tokens it makes
    widths: tuple[int, ...]  # the inner width of each cross-attention it adds to, in diffusers' order
    hidden_dim: int = 0  # plus: the resampler's width, depth, heads and feed-forward width
    depth: int = 0
    heads: int = 0
    ff_dim: int = 0

    @property
    def reads_hidden_states(self) -> bool:
        """Full and plus read the encoder's penultimate hidden states; plain its image embedding."""
        return self.kind != "plain"


class ImageProjModel(nn.Module):
    """plain: (B, embed_dim) → (B, tokens, cross_attention_dim)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.tokens = cfg.tokens
        self.proj = nn.Linear(cfg.embed_dim, cfg.tokens * cfg.cross_attention_dim)
        self.norm = nn.LayerNorm(cfg.cross_attention_dim)

    def forward(self, embeds: Tensor) -> Tensor:
        return self.norm(self.proj(embeds).reshape(embeds.shape[0], self.tokens, -1))


class MLPProjModel(nn.Module):
    """full: (B, 257, embed_dim) → (B, 257, cross_attention_dim)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        d, c = cfg.embed_dim, cfg.cross_attention_dim
        self.proj = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, c), nn.LayerNorm(c))

    def forward(self, states: Tensor) -> Tensor:
        return self.proj(states)


class PerceiverAttention(nn.Module):
    """The queries attend to the image features and to themselves (keys and values of both, concatenated)."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = heads * HEAD_DIM
        self.norm1 = nn.LayerNorm(dim)  # the image features'
        self.norm2 = nn.LayerNorm(dim)  # the queries'
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=-2)).chunk(2, dim=-1)
        return self.to_out(attention(self.to_q(latents), k, v, self.heads))


class Resampler(nn.Module):
    """plus: (B, 257, embed_dim) → (B, tokens, cross_attention_dim), each layer attention then a feed-forward
    (LayerNorm, Linear, GELU, Linear; no biases), both residual."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        h = cfg.hidden_dim
        self.latents = nn.Parameter(torch.empty(1, cfg.tokens, h))
        self.proj_in = nn.Linear(cfg.embed_dim, h)
        self.proj_out = nn.Linear(h, cfg.cross_attention_dim)
        self.norm_out = nn.LayerNorm(cfg.cross_attention_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(h, cfg.heads),
                           nn.Sequential(nn.LayerNorm(h), nn.Linear(h, cfg.ff_dim, bias=False), nn.GELU(),
                                         nn.Linear(cfg.ff_dim, h, bias=False))])
            for _ in range(cfg.depth))

    def forward(self, states: Tensor) -> Tensor:
        latents = self.latents.repeat(states.shape[0], 1, 1)
        x = self.proj_in(states)
        for attn, ff in self.layers:
            latents = attn(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))


PROJECTIONS = {"plain": ImageProjModel, "full": MLPProjModel, "plus": Resampler}


class ImageKeyValue(nn.Module):
    """One cross-attention's key and value projections of the image tokens."""

    def __init__(self, cross_attention_dim: int, width: int):
        super().__init__()
        self.to_k_ip = nn.Linear(cross_attention_dim, width, bias=False)
        self.to_v_ip = nn.Linear(cross_attention_dim, width, bias=False)


class IPAdapter(nn.Module):
    """`adapter(encoding)` → image tokens (B, tokens, cross_attention_dim); `adapter.key_values()` the pairs, in the
    order of the UNet's cross-attentions (`ip_adapter.1`, `.3`, …: the original numbered every attention processor,
    the self-attentions taking the even numbers)."""

    def __init__(self, cfg: IPAdapterConfig):
        super().__init__()
        self.config = cfg
        self.image_proj = PROJECTIONS[cfg.kind](cfg)
        self.ip_adapter = nn.ModuleDict({str(2 * i + 1): ImageKeyValue(cfg.cross_attention_dim, width)
                                         for i, width in enumerate(cfg.widths)})

    def forward(self, features: Tensor) -> Tensor:
        return self.image_proj(features)

    def key_values(self) -> list[ImageKeyValue]:
        return list(self.ip_adapter.values())
