"""The one attention dispatch point of every network in ldm.

All attention in the UNet, the VAE and the CLIP towers goes through `attention`. The reference path is
PyTorch's `scaled_dot_product_attention` (which picks flash / memory-efficient / math kernels itself);
speed-ups (other kernels) are installed from outside with `set_attention_backend`, never by editing the
networks.

Research hooks hang here too: `add_attention_observer(fn)` has `fn(q, k, v, mask)` called before every
attention with exactly the arguments the backend receives — (batch, heads, tokens, head_dim) tensors after
the head split (and the fp32 upcast, where it applies), and the additive mask or None. Observers read; they
must not modify their arguments in place, so the output stays what it is without them. With no observer the
cost is one truth test of an empty list per call. They are process-wide (every pipeline, every thread) and
are not traced into `torch.compile`d graphs: observe an uncompiled model. How to tell the calls apart:

- UNet cross-attention (`attn2`): q has h·w tokens (latent pixels at that level), k the text context's
  77·k; no mask;
- UNet self-attention (`attn1`), VAE mid-block attention (heads=1), the safety checker's vision tower:
  q and k equally long; no mask;
- CLIP text towers: self-attention with a causal mask (`causal=True`: with the reference backend and no observer,
  SDPA's own causal kernel, which lets flash attention run; else the additive mask it stands for, built here).

`ldm.hooks.attention_maps.AttentionMaps` is the observer that records the cross-attention maps.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

Observer = Callable[[Tensor, Tensor, Tensor, Tensor | None], None]


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reference backend: q, k, v are (batch, heads, tokens, head_dim)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_backend: Callable[..., Tensor] = sdpa
_observers: list[Observer] = []


def set_attention_backend(fn: Callable[..., Tensor] | None) -> None:
    """Route every attention call through `fn(q, k, v, mask)`; None restores SDPA."""
    global _backend
    _backend = fn or sdpa


def add_attention_observer(fn: Observer) -> None:
    """Call `fn(q, k, v, mask)` before every attention, with the backend's arguments (see the module notes)."""
    _observers.append(fn)


def remove_attention_observer(fn: Observer) -> None:
    """Stop calling `fn` (added with `add_attention_observer`)."""
    _observers.remove(fn)


def causal_mask(q: Tensor, k: Tensor) -> Tensor:
    """The additive mask of causal attention: −inf above the diagonal (query i sees keys 0…i)."""
    return torch.full((q.shape[-2], k.shape[-2]), float("-inf"), dtype=q.dtype, device=q.device).triu(1)


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
              upcast: bool = False, causal: bool = False) -> Tensor:
    """Multi-head attention over (batch, tokens, heads*head_dim) projections.

    `upcast` computes the attention in float32 when the inputs are half precision (SD 2.x sets
    `upcast_attention`: its scores overflow fp16). `mask` is additive, broadcast to (batch, heads, q, k).
    `causal` (no `mask` then): SDPA's `is_causal` on the reference path; backends and observers get the additive
    mask it stands for (`causal_mask`), so what they receive is unchanged.
    """
    dtype = q.dtype
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        mask = None if mask is None else mask.float()
    if causal and (_observers or _backend is not sdpa):  # they take the mask
        mask, causal = causal_mask(q, k), False
    if _observers:
        for observe in _observers:
            observe(q, k, v, mask)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True) if causal else _backend(q, k, v, mask)
    return out.transpose(1, 2).flatten(2).to(dtype)
