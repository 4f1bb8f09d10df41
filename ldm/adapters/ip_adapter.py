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
It reads the text's keys and values as the attention's own class does (`key_value`: accelerate's fused `to_kv`
too). The image tokens are the call's, one row per row of the UNet's batch (with guidance: [unconditional;
conditional]); each adapter acts at the UNet calls its start/end fractions keep (the rule of diffusers'
`controlnet_keep`, as `ldm.pipelines.control.Unit.acts_at`), at weight 0 elsewhere (its attention added × 0: the
same numbers as without it).

How the call's state reaches the attentions, so that a CUDA graph replays it: a forward pre-hook on the module the
pipeline calls (the speed wrapper, or the UNet itself) adds three keyword arguments to each call — the tokens
(`ip_tokens`, a list of tensors), the scales of this call (`ip_scales`, a row of a table made once on the device:
nothing crosses from the host per step) and which adapters these are (`ip_adapters`, numbers never reused) — and a
pre-hook on the UNet takes them off again and hands them to its cross-attentions before its forward runs.
`ldm.speed.accelerate.CUDAGraphs` sees them as it sees a ControlNet's residuals: tensors copied into a graph's
buffers before each replay, and in its layout key (a graph captured without image prompts, or with other adapters,
is never replayed for the call). A compiled UNet is not given them (`ldm.pipelines.image_prompts` runs the eager UNet
then).
"""

import itertools
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
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


# the keyword arguments a UNet call carries the image prompts' state in (`decoupled_attention`)
TOKENS, SCALES, ADAPTERS = "ip_tokens", "ip_scales", "ip_adapters"
_instances = itertools.count(1)  # adapters' numbers in a graph's layout key (an id() could be reused)


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

    def scale_at(self, call: int) -> float:
        """`weight` at UNet call `call`, or 0 outside [start, end]."""
        acts = not (call / self.calls < self.start or (call + 1) / self.calls > self.end)
        return self.weight if acts else 0.0


class ImageCrossAttention(Attention):
    """A cross-attention with the image attention of each adapter of the call added (`pairs`: this attention's
    key/value pair of each adapter; `image`: the call's (tokens, scale) of each, set by `decoupled_attention`)."""

    pairs: list[ImageKeyValue]
    image: list[tuple[Tensor, Tensor]]
    text_class: type  # the class it had, restored after the call

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q, (k, v) = self.to_q(x), self.text_class.key_value(self, context)  # (accelerate's: one fused projection)
        out = attention(q, k, v, self.heads, upcast=self.upcast)
        for (tokens, scale), pair in zip(self.image, self.pairs, strict=True):
            tokens = tokens.to(x.dtype)
            image = attention(q, pair.to_k_ip(tokens), pair.to_v_ip(tokens), self.heads, upcast=self.upcast)
            out = out + scale.to(out.dtype) * image
        return self.to_out[0](out)


def adapter_number(adapter: IPAdapter) -> int:
    """A number of the adapter's own, never another's (a graph captured with it replays only for it)."""
    if not hasattr(adapter, "graph_number"):
        adapter.graph_number = next(_instances)
    return adapter.graph_number


@contextmanager
def decoupled_attention(unet: nn.Module, prompts: list[ImageTokens], caller: nn.Module | None = None) -> Iterator[None]:
    """Every cross-attention of `unet` adds the image attention of `prompts` inside the block (none: untouched);
    `caller`: the module the pipeline calls (the speed wrapper around `unet`; None: `unet` itself)."""
    if not prompts:
        yield
        return
    targets, tokens = cross_attentions(unet), [prompt.tokens for prompt in prompts]
    numbers = tuple(adapter_number(prompt.adapter) for prompt in prompts)
    calls = prompts[0].calls  # a row per UNet call, and a last one (all 0) for any call past them
    table = torch.tensor([[p.scale_at(c) for p in prompts] for c in range(calls + 1)]).to(tokens[0].device)
    call = 0

    def carry(_module, args, kwargs):  # (each call: this call's scales, by then on the device)
        nonlocal call
        scales, call = table[min(call, calls)], call + 1
        return args, kwargs | {TOKENS: tokens, SCALES: scales, ADAPTERS: numbers}

    def hand_over(_module, args, kwargs):
        given, scales = kwargs.pop(TOKENS), kwargs.pop(SCALES)
        kwargs.pop(ADAPTERS)
        for module in targets:
            module.image = list(zip(given, scales.unbind(0), strict=True))
        return args, kwargs

    hooks = [(caller or unet).register_forward_pre_hook(carry, with_kwargs=True),
             unet.register_forward_pre_hook(hand_over, with_kwargs=True)]
    for i, module in enumerate(targets):
        module.pairs = [prompt.adapter.key_values()[i] for prompt in prompts]
        module.text_class, module.__class__ = type(module), ImageCrossAttention
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()
        for module in targets:
            module.__class__ = module.text_class
            del module.pairs, module.text_class
            module.__dict__.pop("image", None)
