"""IP-Adapter's decoupled cross-attention, applied to a UNet from outside for the length of a call.

    with decoupled_attention(unet, [ImageTokens(adapter, tokens, weight=0.6)]):
        ...  # every cross-attention adds its image attention; after the block the UNet is as it was

Each cross-attention (`attn2`) computes attn(q, k_text, v_text) + Σ scale · attn(q, k_ip, v_ip) over the adapters,
k_ip and v_ip the adapter's `to_k_ip` / `to_v_ip` of its image tokens, before `to_out` (diffusers
`IPAdapterAttnProcessor2_0`, src/diffusers/models/attention_processor.py, v0.42: a scale of 0 skips the adapter). The
adapters' pairs are matched to the cross-attentions in diffusers' order (`cross_attentions`).

From outside: `decoupled_attention` turns each cross-attention into an `ImageCrossAttention` (its class swapped, as
`ldm.speed.accelerate` swaps in its fused projections; the module keeps its weights and their names) and back when
the block ends; the UNet file has no branch for it, and a UNet without image prompts never sees one (bit-identical).
It works on accelerate's fused `to_kv` as on `to_k`/`to_v`. The image tokens are the call's, one row per row of the
UNet's batch (with guidance: [unconditional; conditional]); each adapter acts at the UNet calls its start/end
fractions keep (counted by a forward pre-hook on the UNet; the rule of diffusers' `controlnet_keep`, as
`ldm.pipelines.control.Unit.acts_at`). State read in Python at every call: a compiled UNet or CUDA graphs would not
see it, so the pipeline runs the eager UNet for a call with image prompts (`ldm.pipelines.image_prompts`).
"""

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from torch import Tensor, nn

from ldm.networks.attention import attention
from ldm.networks.ip_adapter import ImageKeyValue, IPAdapter
from ldm.networks.unet import Attention

# diffusers' `attn_processors` order: UNet2DConditionModel registers `up_blocks` before it builds `mid_block`
BLOCK_ORDER = {"down_blocks": 0, "up_blocks": 1, "mid_block": 2}


def cross_attentions(unet: nn.Module) -> list[nn.Module]:
    """The UNet's cross-attentions in diffusers' `attn_processors` order, the order of an adapter's `ip_adapter.1`,
    `.3`, … pairs (diffusers `_convert_ip_adapter_attn_to_diffusers`, src/diffusers/loaders/unet.py): down blocks, up
    blocks, then the mid block, each in module order."""
    found = [(name, m) for name, m in unet.named_modules() if name.endswith(".attn2")]
    return [m for _, m in sorted(found, key=lambda item: BLOCK_ORDER[item[0].split(".")[0]])]


def attention_widths(unet: nn.Module) -> list[int]:
    """Each cross-attention's inner width (what its `to_q` makes), in that order: what an adapter must fit."""
    return [m.to_q.out_features for m in cross_attentions(unet)]


@dataclass
class ImageTokens:
    """One adapter in a call: its tokens (a row per row of the UNet's batch), its scale, and the fractions of the
    UNet calls it acts in (`calls`: how many the call makes)."""

    adapter: IPAdapter
    tokens: Tensor
    weight: float = 1.0
    start: float = 0.0
    end: float = 1.0
    calls: int = 1
    scale: float = 0.0  # at the current UNet call: `weight`, or 0 outside [start, end]

    def acts_at(self, call: int) -> bool:
        return not (call / self.calls < self.start or (call + 1) / self.calls > self.end)


class ImageCrossAttention(Attention):
    """A cross-attention with the image attention of each adapter of the call added (`image` set by
    `decoupled_attention`: per adapter, its tokens and this attention's key/value pair)."""

    image: list[tuple[ImageTokens, ImageKeyValue]]
    text_class: type  # the class it had, restored after the call

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q = self.to_q(x)
        if hasattr(self, "to_kv"):  # accelerate's fused projection
            k, v = self.to_kv(context).chunk(2, dim=-1)
        else:
            k, v = self.to_k(context), self.to_v(context)
        out = attention(q, k, v, self.heads, upcast=self.upcast)
        for prompt, pair in self.image:
            if prompt.scale != 0:
                tokens = prompt.tokens.to(x.dtype)
                image = attention(q, pair.to_k_ip(tokens), pair.to_v_ip(tokens), self.heads, upcast=self.upcast)
                out = out + prompt.scale * image
        return self.to_out[0](out)


@contextmanager
def decoupled_attention(unet: nn.Module, prompts: list[ImageTokens]) -> Iterator[None]:
    """Every cross-attention of `unet` adds the image attention of `prompts` inside the block (none: untouched)."""
    if not prompts:
        yield
        return
    targets = cross_attentions(unet)
    call = 0

    def count(_module, _args) -> None:
        nonlocal call
        for prompt in prompts:
            prompt.scale = prompt.weight if prompt.acts_at(call) else 0.0
        call += 1

    hook = unet.register_forward_pre_hook(count)
    for i, module in enumerate(targets):
        module.image = [(prompt, prompt.adapter.key_values()[i]) for prompt in prompts]
        module.text_class, module.__class__ = type(module), ImageCrossAttention
    try:
        yield
    finally:
        hook.remove()
        for module in targets:
            module.__class__ = module.text_class
            del module.image, module.text_class
