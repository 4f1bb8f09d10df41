"""Fused GroupNorm + SiLU: `silu(group_norm(x))`, the head of every resnet branch in the UNet and VAE.

Eager PyTorch reads and writes the activation twice (normalise, then activate); this kernel normalises,
applies the affine and the SiLU in one pass over the group after computing its statistics. It is the op
`ldm::group_norm_silu` (torch.library), so torch.compile traces it (its fake implementation gives the
output's shape), with a guard that sends what it does not handle to the pure-PyTorch reference.

Runs on CUDA, and on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, for the tests). Layouts:
NCHW and channels_last, through the strides.
"""

import os

import torch
import torch.nn.functional as F
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # no Triton: the op is the reference
    triton = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def reference(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    return F.silu(F.group_norm(x, groups, weight, bias, eps))


if triton is not None:

    @triton.jit
    def _group_norm_silu(x_ptr, w_ptr, b_ptr, y_ptr, C, HW, G, stride_n, stride_c, stride_p, eps,
                         BLOCK: tl.constexpr):
        # one program per (image, group); the group's (C/G) × HW values, addressed through the strides
        pid = tl.program_id(0)
        n, g = pid // G, pid % G
        per_group = C // G
        size = per_group * HW
        base = n * stride_n + g * per_group * stride_c
        total = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, size, BLOCK):
            i = start + tl.arange(0, BLOCK)
            offset = base + (i // HW) * stride_c + (i % HW) * stride_p
            total += tl.load(x_ptr + offset, mask=i < size, other=0.0).to(tl.float32)
        mean = tl.sum(total, axis=0) / size
        squares = tl.zeros([BLOCK], dtype=tl.float32)  # two passes: the variance of centred values
        for start in range(0, size, BLOCK):
            i = start + tl.arange(0, BLOCK)
            offset = base + (i // HW) * stride_c + (i % HW) * stride_p
            v = tl.load(x_ptr + offset, mask=i < size, other=0.0).to(tl.float32)
            squares += tl.where(i < size, (v - mean) * (v - mean), 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(squares, axis=0) / size + eps)
        for start in range(0, size, BLOCK):
            i = start + tl.arange(0, BLOCK)
            mask = i < size
            channel = g * per_group + i // HW
            offset = base + (i // HW) * stride_c + (i % HW) * stride_p
            v = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
            w = tl.load(w_ptr + channel, mask=mask, other=1.0).to(tl.float32)
            b = tl.load(b_ptr + channel, mask=mask, other=0.0).to(tl.float32)
            y = (v - mean) * rstd * w + b
            y = y / (1.0 + tl.exp(-y))
            tl.store(y_ptr + offset, y.to(y_ptr.dtype.element_ty), mask=mask)


def supported(x: Tensor, weight: Tensor, bias: Tensor, groups: int) -> bool:
    """The guard: what the kernel handles; everything else runs the reference."""
    if triton is None or not (x.is_cuda or INTERPRET) or x.dim() != 4:
        return False
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16) or x.shape[1] % groups:
        return False
    n, c, h, w = x.shape
    strides = x.stride()
    nchw = strides == (c * h * w, h * w, w, 1)
    nhwc = strides == (h * w * c, 1, w * c, c)
    return (nchw or nhwc) and weight.is_contiguous() and bias.is_contiguous()


@torch.library.custom_op("ldm::group_norm_silu", mutates_args=())
def group_norm_silu(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    if not supported(x, weight, bias, groups):
        return reference(x, weight, bias, groups, eps)
    n, c, h, w = x.shape
    y = torch.empty_like(x)  # the same memory format as x
    stride_n, stride_c = x.stride(0), x.stride(1)
    stride_p = 1 if x.stride(3) == 1 else c  # NCHW: pixels are adjacent; NHWC: channels are
    _group_norm_silu[(n * groups,)](x, weight, bias, y, c, h * w, groups, stride_n, stride_c, stride_p, eps,
                                    BLOCK=1024)
    return y


@group_norm_silu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    return torch.empty_like(x)
