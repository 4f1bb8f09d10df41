"""Fused GroupNorm + SiLU: `silu(group_norm(x))`, the head of every resnet branch in the UNet and VAE.

Eager PyTorch reads and writes the activation twice (normalise, then activate); this kernel normalises,
applies the affine and the SiLU in one pass over the group after computing its statistics. It is the op
`ldm::group_norm_silu` (torch.library), so torch.compile traces it (its fake implementation gives the
output's shape), with a guard that sends what it does not handle to the pure-PyTorch reference.

Runs on CUDA, and on the CPU under Triton's interpreter (`TRITON_INTERPRET=1`, for the tests). Layouts:
NCHW (one program per image and group, the group's values adjacent) and channels_last (issue 33: one program per
image and group would read the group's few channels out of every pixel's row, strided, on only n·groups
programs; instead one kernel takes partial statistics over blocks of pixels, (count, mean, M2) per block,
combined by Chan et al.'s parallel rule, and a second normalises tiles of pixels × channels, each row of a tile
contiguous in memory). The output has the input's memory format.
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


    @triton.jit
    def _nhwc_partial_stats(x_ptr, count_ptr, mean_ptr, m2_ptr, C, HW, G, stride_n, BLOCKS,
                            BLOCK_P: tl.constexpr, BLOCK_CG: tl.constexpr):
        # program (image·group, pixel block): count, mean and centred sum of squares of its block of the group
        pid, block = tl.program_id(0), tl.program_id(1)
        n, g = pid // G, pid % G
        per_group = C // G
        pixels = block * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = tl.arange(0, BLOCK_CG)
        mask = (pixels[:, None] < HW) & (channels[None, :] < per_group)
        offset = n * stride_n + pixels[:, None] * C + g * per_group + channels[None, :]
        v = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        count = tl.sum(tl.sum(mask.to(tl.float32), axis=1), axis=0)
        mean = tl.sum(tl.sum(v, axis=1), axis=0) / count
        centred = tl.where(mask, v - mean, 0.0)
        m2 = tl.sum(tl.sum(centred * centred, axis=1), axis=0)
        tl.store(count_ptr + pid * BLOCKS + block, count)
        tl.store(mean_ptr + pid * BLOCKS + block, mean)
        tl.store(m2_ptr + pid * BLOCKS + block, m2)

    @triton.jit
    def _nhwc_apply(x_ptr, w_ptr, b_ptr, mean_ptr, rstd_ptr, y_ptr, C, HW, G, stride_n,
                    BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
        # program (image, pixel block, channel block): normalise, affine, SiLU on a tile of contiguous rows
        n, pblock, cblock = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pixels = pblock * BLOCK_P + tl.arange(0, BLOCK_P)
        channels = cblock * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (pixels[:, None] < HW) & (channels[None, :] < C)
        offset = n * stride_n + pixels[:, None] * C + channels[None, :]
        v = tl.load(x_ptr + offset, mask=mask, other=0.0).to(tl.float32)
        group = n * G + channels // (C // G)
        cmask = channels < C
        mean = tl.load(mean_ptr + group, mask=cmask, other=0.0)
        rstd = tl.load(rstd_ptr + group, mask=cmask, other=0.0)
        w = tl.load(w_ptr + channels, mask=cmask, other=1.0).to(tl.float32)
        b = tl.load(b_ptr + channels, mask=cmask, other=0.0).to(tl.float32)
        y = (v - mean[None, :]) * (rstd * w)[None, :] + b[None, :]
        y = y / (1.0 + tl.exp(-y))
        tl.store(y_ptr + offset, y.to(y_ptr.dtype.element_ty), mask=mask)


def combined_stats(count: Tensor, mean: Tensor, m2: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """Per row (image·group), the mean and 1/√(var + eps) of the blocks' (count, mean, M2) in its columns: Chan,
    Golub and LeVeque's parallel rule (the centred sums of squares of the blocks, plus each block's offset)."""
    total = count.sum(1, keepdim=True)
    overall = (count * mean).sum(1, keepdim=True) / total
    m2_total = (m2 + count * (mean - overall) ** 2).sum(1, keepdim=True)
    return overall.flatten(), torch.rsqrt(m2_total.flatten() / total.flatten() + eps)


def _nhwc(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    n, c, h, w = x.shape
    hw, per_group = h * w, c // groups
    block_cg = triton.next_power_of_2(per_group)
    block_p = max(16, min(256, 4096 // block_cg))
    blocks = triton.cdiv(hw, block_p)
    count, mean, m2 = (torch.empty(n * groups, blocks, device=x.device, dtype=torch.float32) for _ in range(3))
    _nhwc_partial_stats[(n * groups, blocks)](x, count, mean, m2, c, hw, groups, x.stride(0), blocks,
                                              BLOCK_P=block_p, BLOCK_CG=block_cg)
    mean, rstd = combined_stats(count, mean, m2, eps)
    y = torch.empty_like(x)  # channels_last, as x
    block_c = min(64, triton.next_power_of_2(c))
    _nhwc_apply[(n, triton.cdiv(hw, 64), triton.cdiv(c, block_c))](x, weight, bias, mean, rstd, y, c, hw, groups,
                                                                   x.stride(0), BLOCK_P=64, BLOCK_C=block_c)
    return y


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
    if x.stride(1) == 1 and not x.is_contiguous():  # channels_last (and not also NCHW: C = 1 or H = W = 1)
        return _nhwc(x, weight, bias, groups, eps)
    y = torch.empty_like(x)  # the same memory format as x
    stride_n, stride_c = x.stride(0), x.stride(1)
    stride_p = 1 if x.stride(3) == 1 else c  # NCHW: pixels are adjacent; NHWC: channels are
    _group_norm_silu[(n * groups,)](x, weight, bias, y, c, h * w, groups, stride_n, stride_c, stride_p, eps,
                                    BLOCK=1024)
    return y


@group_norm_silu.register_fake
def _(x: Tensor, weight: Tensor, bias: Tensor, groups: int, eps: float) -> Tensor:
    return torch.empty_like(x)
