"""CLIP towers: the text towers CLIP ViT-L/14 (SD 1.x, SDXL), OpenCLIP ViT-H/14 (SD 2.x) and ViT-bigG/14
(SDXL), and the CLIP vision towers: ViT-L/14, which the SD 1.x safety checker looks through, and the ViT-H/14
and ViT-bigG/14 image encoders with their projection that IP-Adapter reads.

Module names are transformers' `CLIPTextModel` / `CLIPTextModelWithProjection` / `CLIPVisionModel` ones
(`text_model.encoder.layers.0.self_attn.q_proj`, …), so the official `text_encoder*/model.safetensors`
files load with `strict=True`. Every tower is the same pre-norm transformer (the text towers with a causal
mask); they differ in width, depth, activation (quick_gelu vs gelu) and in which hidden state is read.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ldm.errors import ConfigError
from ldm.networks.attention import attention


@dataclass(frozen=True)
class CLIPTextConfig:
    """The fields of an official `text_encoder/config.json` (transformers `CLIPTextConfig`)."""

    vocab_size: int = 49408
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # set only for CLIPTextModelWithProjection

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPTextConfig":
        arch = (cfg.get("architectures") or ["CLIPTextModel"])[0]
        if arch not in ("CLIPTextModel", "CLIPTextModelWithProjection"):
            raise ConfigError(f"text encoder config: architecture {arch!r} is not a CLIP text model")
        if cfg.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ConfigError(f"text encoder config: hidden_act={cfg['hidden_act']!r} is not supported")
        fields = {k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg and k != "projection_dim"}
        projection = cfg.get("projection_dim", 512) if arch == "CLIPTextModelWithProjection" else None
        return cls(**fields, projection_dim=projection)


def quick_gelu(x: Tensor) -> Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": F.gelu}


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        return self.out_proj(attention(self.q_proj(x), self.k_proj(x), self.v_proj(x), self.heads, causal=causal))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str):
        super().__init__()
        self.act = ACTIVATIONS[act]
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, cfg: "CLIPTextConfig | CLIPVisionConfig"):
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = SelfAttention(d, cfg.num_attention_heads)
        self.layer_norm1 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)
        self.mlp = MLP(d, cfg.intermediate_size, cfg.hidden_act)
        self.layer_norm2 = nn.LayerNorm(d, eps=cfg.layer_norm_eps)

    def forward(self, x: Tensor, causal: bool) -> Tensor:
        """`causal`: each token attends to itself and those before it (the text towers); the vision towers: all."""
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Embedding(nn.Embedding):
    """`nn.Embedding` that skips its random init on the meta device, where loading builds it (there are no
    values to initialise, and the meta `normal_` imports torch._dynamo: 1.9 s of every load)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:
            super().reset_parameters()


class Embeddings(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, ids: Tensor, token_embeds: Tensor | None = None) -> Tensor:
        tokens = self.token_embedding(ids) if token_embeds is None else token_embeds
        return tokens + self.position_embedding.weight[: ids.shape[1]]


class Encoder(nn.Module):
    def __init__(self, cfg: "CLIPTextConfig | CLIPVisionConfig"):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class TextTransformer(nn.Module):
    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.embeddings = Embeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)


@dataclass
class TextEncoding:
    hidden: Tensor  # (B, tokens, width): the hidden state the UNet reads
    pooled: Tensor  # (B, width or projection_dim): final-LN'd EOS token, projected when there is a projection


class CLIPTextModel(nn.Module):
    """`model(ids, layer=-1, final_norm=True, token_embeds=None)` → `TextEncoding`.

    `layer` picks the hidden state: -1 the last layer's output (SD 1.x, and SD 2.x whose folder already
    dropped OpenCLIP's last layer), -2 the penultimate (SDXL). `final_norm` applies the final LayerNorm to
    it (SD 1.x/2.x yes, SDXL no). The pooled output always comes from the last layer through the final
    LayerNorm at the first EOS token (transformers' rule: `argmax(ids)`; EOS is the largest id).
    `token_embeds` (B, tokens, width), when given, replaces the lookup of `ids` in the token embedding: how
    textual-inversion vectors enter (`ldm.pipelines.prompts`); `ids` still mark the EOS token.
    """

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.text_model = TextTransformer(cfg)
        if cfg.projection_dim is not None:
            self.text_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, ids: Tensor, layer: int = -1, final_norm: bool = True,
                token_embeds: Tensor | None = None) -> TextEncoding:
        tm = self.text_model
        x = tm.embeddings(ids, token_embeds)
        layers = tm.encoder.layers
        chosen = len(layers) + layer if layer < 0 else layer
        if not 0 <= chosen < len(layers):
            raise ValueError(f"layer {layer} out of range for a {len(layers)}-layer text encoder")
        hidden = None
        for i, block in enumerate(layers):
            x = block(x, causal=True)
            if i == chosen:
                hidden = x
        last = tm.final_layer_norm(x)
        if final_norm:
            hidden = last if chosen == len(layers) - 1 else tm.final_layer_norm(hidden)
        pooled = last[torch.arange(ids.shape[0], device=ids.device), ids.argmax(dim=-1)]
        if self.config.projection_dim is not None:
            pooled = self.text_projection(pooled)
        return TextEncoding(hidden, pooled)


# ------------------------------------------------------------------------------------ vision tower


@dataclass(frozen=True)
class CLIPVisionConfig:
    """transformers' `CLIPVisionConfig` fields (defaults: transformers' own, i.e. ViT-B/32)."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    projection_dim: int = 512  # `visual_projection`'s width (CLIPVisionModelWithProjection only)

    @classmethod
    def from_transformers(cls, cfg: dict) -> "CLIPVisionConfig":
        if cfg.get("hidden_act", "quick_gelu") not in ACTIVATIONS:
            raise ConfigError(f"vision config: hidden_act={cfg['hidden_act']!r} is not supported")
        return cls(**{k: cfg[k] for k in cls.__dataclass_fields__ if k in cfg})


class VisionEmbeddings(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, cfg.patch_size, bias=False)
        self.position_embedding = Embedding((cfg.image_size // cfg.patch_size) ** 2 + 1, cfg.hidden_size)

    def forward(self, pixels: Tensor) -> Tensor:
        patches = self.patch_embedding(pixels.to(self.patch_embedding.weight.dtype)).flatten(2).transpose(1, 2)
        cls = self.class_embedding.expand(pixels.shape[0], 1, -1)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight


class VisionTransformer(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: transformers' name
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor) -> Tensor:
        """(B, 3, image_size, image_size) normalised pixels → (B, width) pooled: the class token after the
        final LayerNorm."""
        return self.post_layernorm(self.hidden_states(pixels)[-1][:, 0])

    def hidden_states(self, pixels: Tensor) -> list[Tensor]:
        """transformers' `hidden_states`: the embeddings after `pre_layrnorm`, then each layer's output."""
        states = [self.pre_layrnorm(self.embeddings(pixels))]
        for layer in self.encoder.layers:
            states.append(layer(states[-1], causal=False))
        return states


class CLIPVisionModel(nn.Module):
    """transformers' `CLIPVisionModel` as the official files name it: `vision_model.embeddings…`."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = VisionTransformer(cfg)

    def forward(self, pixels: Tensor) -> Tensor:
        return self.vision_model(pixels)


@dataclass
class ImageEncoding:
    image_embeds: Tensor  # (B, projection_dim): the pooled class token projected (IP-Adapter's plain input)
    hidden_states: list[Tensor]  # transformers' order; [-2], the penultimate layer's, is IP-Adapter Plus's input


class CLIPVisionModelWithProjection(CLIPVisionModel):
    """transformers' `CLIPVisionModelWithProjection` (`vision_model.…`, `visual_projection.weight`): the image
    encoders IP-Adapter reads (h94/IP-Adapter `models/image_encoder`, ViT-H/14; `sdxl_models/image_encoder`,
    ViT-bigG/14). `model(pixels)` → `ImageEncoding`."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__(cfg)
        self.visual_projection = nn.Linear(cfg.hidden_size, cfg.projection_dim, bias=False)

    def forward(self, pixels: Tensor) -> ImageEncoding:
        states = self.vision_model.hidden_states(pixels)
        pooled = self.vision_model.post_layernorm(states[-1][:, 0])
        return ImageEncoding(self.visual_projection(pooled), states)
