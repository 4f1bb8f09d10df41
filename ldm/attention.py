"""The one attention dispatch point of every network in ldm.

All attention in the UNet, the VAE and the CLIP towers goes through `attention`. The reference path is
PyTorch's `scaled_dot_product_attention` (which picks flash / memory-efficient / math kernels itself);
speed-ups (other kernels) are installed from outside with `set_attention_backend`, never by editing the
networks.
"""

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Reference backend: q, k, v are (batch, heads, tokens, head_dim)."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


_backend: Callable[..., Tensor] = sdpa


def set_attention_backend(fn: Callable[..., Tensor] | None) -> None:
    """Route every attention call through `fn(q, k, v, mask)`; None restores SDPA."""
    global _backend
    _backend = fn or sdpa


def attention(q: Tensor, k: Tensor, v: Tensor, heads: int, mask: Tensor | None = None,
              upcast: bool = False) -> Tensor:
    """Multi-head attention over (batch, tokens, heads*head_dim) projections.

    `upcast` computes the attention in float32 when the inputs are half precision (SD 2.x sets
    `upcast_attention`: its scores overflow fp16). `mask` is additive, broadcast to (batch, heads, q, k).
    """
    dtype = q.dtype
    q, k, v = (t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k, v))
    if upcast and dtype in (torch.float16, torch.bfloat16):
        q, k, v = q.float(), k.float(), v.float()
        mask = None if mask is None else mask.float()
    out = _backend(q, k, v, mask)
    return out.transpose(1, 2).flatten(2).to(dtype)
