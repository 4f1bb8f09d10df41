"""Winograd F(4×4, 3×3) convolution for the CPU: the 3×3 convolutions of the UNet and VAE in a quarter of
the multiplications.

A 3×3 convolution computes each 4×4 output tile from a 6×6 input tile with 144 multiply-adds per input and
output channel pair; Winograd's minimal filtering algorithm (Lavin & Gray 2016) does it with 36: the input
tile and the filter are taken into a 6×6 "Winograd domain" by fixed linear maps (B, G), multiplied there
element by element, which summed over the input channels is 36 independent matmuls, and brought back by a
third map (A). On this project's CPUs the direct convolution runs at the matmul peak, so a quarter of the
matmul work is worth up to 4× less time minus the transforms; measured ~2× on the convolutions where the
matmuls stay large (BENCHMARKS.md), and the rule `pays` keeps the others direct.

Everything is plain PyTorch (the transforms are small dense matmuls with the Kronecker products of the 1-D
maps), so it runs eagerly and torch.compile traces it. The filter transform is done once, when a convolution
is converted (`transform_weight`). Error: F(4, 3)'s interpolation points (0, ±1, ±2, ∞) keep
fp32 results within ~1e-5 relative of the float64 convolution, about 3× the direct fp32 convolution's own
error (tests/test_winograd.py). Only fp32 on the CPU uses it: on CUDA cuDNN picks its own algorithms.
"""

import statistics
import time

import torch
from torch import Tensor

M, R = 4, 3  # output tile, filter size
A = M + R - 1  # input tile: 6

_BT = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
       [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]]
_G = [[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
      [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]]
_AT = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]


def _kron(rows) -> Tensor:
    m = torch.tensor(rows, dtype=torch.float64)
    return torch.kron(m, m)  # the 2-D map of a tile flattened row-major: (M ⊗ M) vec(X) = vec(M X Mᵀ)


_B2, _G2, _A2 = _kron(_BT), _kron(_G), _kron(_AT)  # [36, 36], [36, 9], [16, 36]


def filter_map() -> Tensor:
    """G ⊗ G, the [36, 9] map of 3×3 filters into the Winograd domain, in fp32."""
    return _G2.float()


def transform_weight(weight: Tensor, g_map: Tensor | None = None) -> Tensor:
    """[K, C, 3, 3] filters → [36, C, K] in the Winograd domain (G g Gᵀ), computed in fp32 (within 3e-8
    relative of float64: G's entries are sums of at most three terms). `g_map`: `filter_map()`, passed by a
    module that holds it as a buffer, so that under torch.compile with inductor's freezing both operands are
    constants of the graph and the whole transform is folded (a module-level tensor would be a graph input)."""
    k, c = weight.shape[:2]
    if weight.shape[2:] != (R, R):
        raise ValueError(f"Winograd F(4, 3) takes 3×3 filters, not {tuple(weight.shape[2:])}")
    g = weight.detach().to(torch.float32).permute(2, 3, 1, 0).reshape(R * R, c * k)
    return ((filter_map() if g_map is None else g_map) @ g).reshape(A * A, c, k).to(weight.dtype).contiguous()


def conv2d(x: Tensor, u: Tensor, bias: Tensor | None) -> Tensor:
    """`F.conv2d(x, weight, bias, padding=1)` from `u = transform_weight(weight)`, for any H and W (the
    input is padded to whole tiles, the output cropped). The result is channels_last."""
    n, c, h, w = x.shape
    k = u.shape[2]
    th, tw = -(-h // M), -(-w // M)
    # the padded input, channels last, built explicitly: its layout is the same whatever x's is (and so the
    # same when torch.compile traces it with fake tensors as when it runs)
    padded = x.new_zeros(n, th * M + 2, tw * M + 2, c)
    padded[:, 1:h + 1, 1:w + 1] = x.permute(0, 2, 3, 1)
    tiles = padded.unfold(1, A, M).unfold(2, A, M)  # [N, th, tw, C, 6, 6], overlapping by 2
    d = tiles.permute(4, 5, 0, 1, 2, 3).reshape(A * A, n * th * tw * c)
    v = (_B2.to(x.dtype) @ d).reshape(A * A, n * th * tw, c)  # Bᵀ d B for every tile and channel
    m = torch.bmm(v, u).reshape(A * A, n * th * tw * k)  # 36 matmuls: the sum over input channels
    y = (_A2.to(x.dtype) @ m).reshape(M, M, n, th, tw, k).permute(2, 3, 0, 4, 1, 5).reshape(n, th * M, tw * M, k)
    if bias is not None:
        y = y + bias
    if th * M != h or tw * M != w:
        y = y[:, :h, :w].contiguous()  # cropped: one copy, so the output stays dense
    return y.permute(0, 3, 1, 2)  # NHWC memory seen as NCHW: channels_last


def pays(n: int, c: int, k: int, h: int, w: int) -> bool:
    """Whether Winograd beats the direct (pre-packed oneDNN) convolution for this call on the CPU, from the
    measurements in BENCHMARKS.md: it needs wide matmuls (enough tiles for the 36 · C · K filter values it
    reads) and enough channels that the transforms, which cost 36 per tile and channel, stay small; above
    128×128 the transforms' memory traffic grows past what the matmuls save (0.93–1.24× at 256 × 128² already)."""
    tiles = n * -(-h // M) * -(-w // M)
    return min(c, k) >= 256 and tiles >= 32 and h * w <= 128 * 128


def _median_time(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of `fn`, in seconds."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _bench(shapes=((2, 320, 32), (2, 640, 16), (2, 1280, 8), (2, 1280, 4), (2, 1280, 16), (1, 512, 64),
                   (1, 256, 128), (1, 128, 128)), repeats: int = 5) -> None:
    """`python -m ldm_kernels.winograd`: one convolution (C in = C out), direct and pre-packed by oneDNN as
    inductor's freezing leaves it, against `torch.compile(conv2d)`; the medians of `repeats` calls."""

    def timed(fn) -> float:
        fn()  # warm-up (compiles)
        return _median_time(fn, repeats)

    def measure(x: Tensor, weight: Tensor, bias: Tensor) -> tuple[float, float]:
        packed = torch.ops.mkldnn._reorder_convolution_weight(weight, [1, 1], [1, 1], [1, 1], 1, list(x.shape))
        u = transform_weight(weight)
        fast = torch.compile(lambda t: conv2d(t, u, bias), fullgraph=True)
        with torch.no_grad():
            direct = timed(lambda: torch.ops.mkldnn._convolution_pointwise(
                x, packed, bias, [1, 1], [1, 1], [1, 1], 1, "none", [], ""))
            return direct, timed(lambda: fast(x))

    print("| N × C × H×W | direct (pre-packed) | Winograd (compiled) | speed-up | pays |\n|---|---|---|---|---|")
    for n, c, s in shapes:
        torch._dynamo.reset()
        x = torch.randn(n, c, s, s).contiguous(memory_format=torch.channels_last)
        weight = torch.randn(c, c, 3, 3).contiguous(memory_format=torch.channels_last) / (9 * c) ** 0.5
        direct, wino = measure(x, weight, torch.randn(c))
        print(f"| {n} × {c} × {s}² | {direct * 1e3:.1f} ms | {wino * 1e3:.1f} ms | {direct / wino:.2f}× "
              f"| {pays(n, c, c, s, s)} |", flush=True)


if __name__ == "__main__":
    _bench()
