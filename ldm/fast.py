"""Speed, applied from outside the reference networks (design decision 5): `accelerate(pipe)`.

The networks in `ldm/` stay plain fp32 PyTorch, the definition of correct. This module rewrites a loaded
pipeline in place for speed, each step optional and each one checked against the reference in the tests:

- fused projections: every self-attention computes q, k and v with one matmul (`to_qkv`), every
  cross-attention k and v of the text with one (`to_kv`); the weights are concatenated once, here;
- channels_last memory format for the convolutional networks (UNet, VAE);
- on the CPU in fp32, Winograd F(4×4, 3×3) for the 3×3 convolutions of the UNet and VAE decoder where it
  pays (kernels/winograd.py, installed as `ldm_kernels`): a quarter of the multiplications, about 2× faster
  convolutions at the widths and sizes where the matmuls stay large, for 4× the converted filters' memory
  (see `use_winograd`);
- `torch.compile(fullgraph=True, dynamic=False)` of the UNet and the VAE decoder: one graph each, no
  graph breaks; the timestep reaches the UNet as a tensor, so the denoising steps of a run, and later
  runs of the same shape, reuse the compiled code. On CUDA the "max-autotune" mode also captures the
  UNet step as a CUDA graph; on the CPU inductor's freezing folds the weights into the graph (pre-packed
  for the CPU's matmul and convolution kernels). Compiled code is cached on disk between runs
  (inductor's cache, in `$LDM_CACHE` or ~/.cache/ldm/inductor).

Half precision is a load-time choice (`--dtype`), not this module's: on the CPU it only pays where the
cores have native bf16/fp16 arithmetic.
"""

import os
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm_kernels import winograd as _winograd

from .attention import attention
from .unet import Attention, ResnetBlock, TransformerBlock


class FusedSelfAttention(Attention):
    """Self-attention with q, k and v from one projection."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out[0](attention(q, k, v, self.heads, upcast=self.upcast))


class FusedCrossAttention(Attention):
    """Cross-attention with k and v of the context from one projection."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        return self.to_out[0](attention(self.to_q(x), k, v, self.heads, upcast=self.upcast))


def _fused_linear(parts: list[nn.Linear]) -> nn.Linear:
    weight = torch.cat([p.weight for p in parts])
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    return fused


def fuse_projections(unet: nn.Module) -> int:
    """Fuse the attention projections of every transformer block in place; returns how many were fused."""
    n = 0
    for block in unet.modules():
        if not isinstance(block, TransformerBlock) or type(block.attn1) is not Attention:
            continue
        a1, a2 = block.attn1, block.attn2
        a1.to_qkv = _fused_linear([a1.to_q, a1.to_k, a1.to_v])
        del a1.to_q, a1.to_k, a1.to_v
        a1.__class__ = FusedSelfAttention
        a2.to_kv = _fused_linear([a2.to_k, a2.to_v])
        del a2.to_k, a2.to_v
        a2.__class__ = FusedCrossAttention
        n += 2
    return n


class KernelResnetBlock(ResnetBlock):
    """A resnet whose GroupNorm+SiLU pairs run as the fused `ldm::group_norm_silu` op (kernels/)."""

    def forward(self, x: Tensor, temb: Tensor | None = None) -> Tensor:
        op = torch.ops.ldm.group_norm_silu
        h = self.conv1(op(x, self.norm1.weight, self.norm1.bias, self.norm1.num_groups, self.norm1.eps))
        if self.time_emb_proj is not None:
            h = h + self.time_emb_proj(torch.nn.functional.silu(temb))[:, :, None, None]
        h = self.conv2(op(h, self.norm2.weight, self.norm2.bias, self.norm2.num_groups, self.norm2.eps))
        return (x if self.conv_shortcut is None else self.conv_shortcut(x)) + h


def use_kernels(*modules: nn.Module) -> int:
    """Route the resnets of `modules` through the Triton kernels of kernels/ (installed as `ldm_kernels`);
    returns how many resnets now use them. Without Triton the op is the reference, so this is always safe."""
    import ldm_kernels.group_norm_silu  # noqa: F401  (registers torch.ops.ldm.group_norm_silu)

    n = 0
    for module in modules:
        for block in module.modules():
            if type(block) is ResnetBlock:
                block.__class__ = KernelResnetBlock
                n += 1
    return n


class WinogradConv2d(nn.Conv2d):
    """A 3×3 convolution (stride 1, padding 1) that also holds its filters in the Winograd domain and runs
    as Winograd F(4×4, 3×3) for the input shapes where that is faster (`ldm_kernels.winograd.pays`); other
    shapes take the direct convolution. Shapes are static under torch.compile, so the choice is made when
    tracing and costs nothing per call."""

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if _winograd.pays(n, c, self.out_channels, h, w):
            return _winograd.conv2d(x, self.winograd_weight, self.bias)
        return super().forward(x)


WINOGRAD_MAX_FILTERS = 1920 * 640  # in × out channels: up to the widest convolution of the 640-wide levels


def use_winograd(*modules: nn.Module, min_channels: int = 256, max_filters: int = WINOGRAD_MAX_FILTERS) -> int:
    """Convert the 3×3 convolutions of `modules` that Winograd can speed up (at least `min_channels` in and
    out, as `pays` requires) to `WinogradConv2d`; returns how many. The Winograd-domain filters take 4× the
    memory of the originals, which stay for the shapes that run direct, so convolutions with more than
    `max_filters` in × out channels are left alone. In SD 1.5 that keeps the 1280-wide levels direct (464 M
    of the UNet's 541 M convolution weights; at 256² they are at 8×8 and 4×4, too small to pay) and adds
    1.15 GB for the 320- and 640-wide levels, 0.75 GB for the VAE decoder's 256- and 512-wide ones.
    """
    n = 0
    for module in modules:
        for conv in module.modules():
            if (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                    and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                    and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= min_channels
                    and conv.in_channels * conv.out_channels <= max_filters):
                conv.winograd_weight = nn.Parameter(_winograd.transform_weight(conv.weight), requires_grad=False)
                conv.__class__ = WinogradConv2d
                n += 1
    return n


class TensorTimestep(nn.Module):
    """Calls a compiled UNet with the timestep as a float32 tensor on the UNet's device: a Python number
    would be baked into the graph and recompile it at every step."""

    def __init__(self, unet: nn.Module, compiled):
        super().__init__()
        self.unet, self.compiled, self.config = unet, compiled, unet.config

    def forward(self, x: Tensor, t, context: Tensor, **kwargs) -> Tensor:
        if not torch.is_tensor(t):
            t = torch.full((1,), float(t), dtype=torch.float32, device=x.device)
        return self.compiled(x, t, context, **kwargs)


def cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm") / "inductor"


def accelerate(pipe, compile: bool = True, channels_last: bool = True, fuse: bool = True, mode: str | None = None,
               backend: str = "inductor", kernels: bool = False, winograd: bool | None = None):
    """Make `pipe` fast in place and return it. `mode`: torch.compile's mode (default: "max-autotune" on CUDA,
    which includes CUDA graphs; inductor's default plus weight freezing on the CPU). `backend` is for tests
    ("aot_eager" traces the same graphs without generating code). `kernels`: the Triton kernels of kernels/
    (off by default: they have not yet been measured to beat what inductor generates, see BENCHMARKS.md).
    `winograd`: Winograd 3×3 convolutions (`use_winograd`; default: on for fp32 on the CPU, where it was
    measured to pay, off elsewhere: cuDNN chooses its own algorithms)."""
    unet = pipe.unet.unet if isinstance(pipe.unet, TensorTimestep) else pipe.unet
    if fuse:
        fuse_projections(unet)
    if kernels:
        use_kernels(unet, pipe.vae)
    if winograd is None:
        winograd = pipe.device.type == "cpu" and next(unet.parameters()).dtype == torch.float32
    if winograd:
        use_winograd(unet, pipe.vae.decoder)  # not the encoder: it runs once, for image-to-image only
    if channels_last:
        unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if compile:
        os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
        import torch._inductor.config as inductor

        cuda = pipe.device.type == "cuda"
        if not cuda and backend == "inductor":
            inductor.freezing = True  # weights become constants of the graph: pre-packed, folded (process-wide)
        options = {"fullgraph": True, "dynamic": False, "backend": backend}
        if backend == "inductor":
            options["mode"] = mode or ("max-autotune" if cuda else None)
        pipe.unet = TensorTimestep(unet, torch.compile(unet, **options))
        pipe.vae.decoder = torch.compile(pipe.vae.decoder, **options)
    return pipe
