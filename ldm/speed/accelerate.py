"""Speed, applied from outside the reference networks (design decision 5): `accelerate(pipe)`.

The networks in `ldm/` stay plain fp32 PyTorch, the definition of correct. This module rewrites a loaded
pipeline in place for speed, each step optional and each one checked against the reference in the tests:

- fused projections: every self-attention computes q, k and v with one matmul (`to_qkv`), every
  cross-attention k and v of the text with one (`to_kv`); the weights are concatenated once, here;
- channels_last memory format for the convolutional networks (UNet, VAE);
- on CUDA, the UNet step replayed as a captured CUDA graph (`CUDAGraphs`): one launch per step instead of
  about a thousand, captured on the first call of each input layout (shapes, dtypes, conditioning keys) and
  replayed after. With the timestep passed as a device tensor there is no host↔device traffic in the loop;
- on the CPU in fp32, Winograd F(4×4, 3×3) for the 3×3 convolutions of the UNet and VAE decoder where it
  pays (kernels/winograd.py, installed as `ldm_kernels`): a quarter of the multiplications, about 2× faster
  convolutions at the widths and sizes where the matmuls stay large, for 4× the converted filters' memory
  (see `use_winograd`);
- optionally `torch.compile(fullgraph=True, dynamic=False)` of the UNet and the VAE decoder: one graph each,
  no graph breaks; the timestep reaches the UNet as a tensor, so the denoising steps of a run, and later
  runs of the same shape, reuse the compiled code. Two modes (`COMPILE_MODES`): "default" (inductor's
  default: no autotuning, the compile a user can wait for) and "max" (max-autotune: Triton autotunes its
  convolutions and matmuls, many minutes on CUDA). On CUDA the compiled UNet is captured by `CUDAGraphs`
  like the eager one (inductor's own CUDA graphs stay off: one graph mechanism, one set of rules); on the
  CPU inductor's freezing folds the weights into the graph (pre-packed for the CPU's matmul and convolution
  kernels). Compiled code is cached on disk between runs (inductor's cache, in `$LDM_CACHE` or
  ~/.cache/ldm/inductor). Under freezing the compiled networks keep their weights as loaded: freezing lays them
  out, packs them and folds the Winograd transform itself, and the memory-mapped originals are paged out once
  packed (`MappedWeights`), so that each weight is in memory once, as the generated code's constant.

The default CUDA path of the command line is `accelerate(pipe, compile=False)`: fused projections,
channels_last and the CUDA graph, no compile. Half precision is a load-time choice (`--dtype`), not this
module's: on the CPU it only pays where the cores have native bf16/fp16 arithmetic.
"""

import contextlib
import gc
import os
import threading
import warnings
import weakref
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.loading.files import mapped_pages, page_out
from ldm.networks import attention as _attention
from ldm.networks.attention import attention
from ldm.networks.unet import Attention, ResnetBlock, TransformerBlock
from ldm_kernels import winograd as _winograd


class FusedSelfAttention(Attention):
    """Self-attention with q, k and v from one projection."""

    def forward(self, x: Tensor, context: Tensor | None = None) -> Tensor:
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        return self.to_out[0](attention(q, k, v, self.heads, upcast=self.upcast))


class FusedCrossAttention(Attention):
    """Cross-attention with k and v of the context from one projection."""

    def key_value(self, context: Tensor) -> tuple[Tensor, Tensor]:
        return self.to_kv(context).chunk(2, dim=-1)


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
    tracing and costs nothing per call. Without `winograd_weight` (`use_winograd(..., precompute=False)`) the
    filters are transformed in the forward from `winograd_map` (a buffer, so that freezing sees a constant):
    for inductor's freezing, which folds the transform into one constant of the generated code, so that the
    module holds no second copy of the filters."""

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        if _winograd.pays(n, c, self.out_channels, h, w):
            u = getattr(self, "winograd_weight", None)  # None: transformed here, folded once by freezing
            u = _winograd.transform_weight(self.weight, self.winograd_map) if u is None else u
            return _winograd.conv2d(x, u, self.bias)
        return super().forward(x)


WINOGRAD_MAX_FILTERS = 1920 * 640  # in × out channels: up to the widest convolution of the 640-wide levels


def use_winograd(*modules: nn.Module, min_channels: int = 256, max_filters: int = WINOGRAD_MAX_FILTERS,
                 precompute: bool = True) -> int:
    """Convert the 3×3 convolutions of `modules` that Winograd can speed up (at least `min_channels` in and
    out, as `pays` requires) to `WinogradConv2d`; returns how many. The Winograd-domain filters take 4× the
    memory of the originals, which stay for the shapes that run direct, so convolutions with more than
    `max_filters` in × out channels are left alone. In SD 1.5 that keeps the 1280-wide levels direct (464 M
    of the UNet's 541 M convolution weights; at 256² they are at 8×8 and 4×4, too small to pay) and adds
    1.15 GB for the 320- and 640-wide levels, 0.75 GB for the VAE decoder's 256- and 512-wide ones.
    `precompute=False` leaves the transform to the forward (see `WinogradConv2d`): for modules compiled with
    inductor's freezing only, since eagerly it would transform the filters at every call.
    """
    n, g_map = 0, _winograd.filter_map()
    for module in modules:
        for conv in module.modules():
            if (type(conv) is nn.Conv2d and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
                    and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
                    and conv.padding_mode == "zeros" and min(conv.in_channels, conv.out_channels) >= min_channels
                    and conv.in_channels * conv.out_channels <= max_filters):
                if precompute:
                    conv.winograd_weight = nn.Parameter(_winograd.transform_weight(conv.weight), requires_grad=False)
                else:  # 36 × 9 numbers, not saved with the weights
                    conv.register_buffer("winograd_map", g_map, persistent=False)
                conv.__class__ = WinogradConv2d
                n += 1
    return n


@dataclass(frozen=True)
class Layouts:
    """What `accelerate` did to a UNet's layers, kept for the networks made of its blocks that come later."""

    fuse: bool
    kernels: bool
    winograd: bool
    channels_last: bool


_layouts: "weakref.WeakKeyDictionary[nn.Module, Layouts]" = weakref.WeakKeyDictionary()  # plain UNet → its layouts


def accelerate_like(unet: nn.Module, module: nn.Module) -> nn.Module:
    """Give `module`, a network built of the UNet's blocks (a ControlNet: its encoder and mid block, loaded after
    `accelerate`), the layouts `accelerate` gave the plain `unet`: fused projections, the kernels' resnets, Winograd
    convolutions (filters precomputed: it runs eagerly, outside any compile) and channels_last. Nothing where `unet`
    was not accelerated; done again, nothing changes. Returns `module`."""
    done = _layouts.get(unet)
    if done is None:
        return module
    if done.fuse:
        fuse_projections(module)
    if done.kernels:
        use_kernels(module)
    if done.winograd:
        use_winograd(module)
    if done.channels_last:
        module.to(memory_format=torch.channels_last)
    return module


# ------------------------------------------------------------------------------------------ CUDA graphs


def layout(x: Tensor, t, kwargs: dict) -> tuple:
    """What a captured graph is specific to: the shape, dtype and device of x, of t (or that t is a number)
    and of each conditioning tensor by name, the values of non-tensor arguments (they are baked into the
    graph), the attention backend (`ldm.networks.attention.set_attention_backend`), whose kernels the graph
    holds, and the numerics settings that choose kernels at capture (`kernel_settings`). A list of tensors (a
    ControlNet's `down_residuals`) is described tensor by tensor, like a tensor argument: its values are inputs."""

    def describe(v):
        if torch.is_tensor(v):
            return tuple(v.shape), v.dtype, v.device
        if is_tensor_list(v):
            return "tensors", tuple(describe(e) for e in v)
        return v if v is None or isinstance(v, bool | int | float | str) else repr(v)

    return (describe(x), "number" if not torch.is_tensor(t) else describe(t),
            tuple((k, describe(v)) for k, v in sorted(kwargs.items())), _attention._backend,
            kernel_settings(x.device.type))


def kernel_settings(device_type: str) -> tuple:
    """The process-wide switches a captured graph's kernels were chosen under: TF32 for matmuls and
    convolutions, cuDNN on/benchmark/deterministic, the float32 matmul precision, the SDPA backends enabled
    (`torch.nn.attention.sdpa_kernel` sets them), and autocast (on and its dtype) on `device_type`. A graph
    captured under other settings would replay the old kernels."""
    cuda, cudnn = torch.backends.cuda, torch.backends.cudnn
    return (cuda.matmul.allow_tf32, cudnn.allow_tf32, cudnn.enabled, cudnn.benchmark, cudnn.deterministic,
            torch.get_float32_matmul_precision(), cuda.flash_sdp_enabled(), cuda.mem_efficient_sdp_enabled(),
            cuda.cudnn_sdp_enabled(), cuda.math_sdp_enabled(), torch.is_autocast_enabled(device_type),
            torch.get_autocast_dtype(device_type))


def is_tensor_list(v) -> bool:
    return isinstance(v, list | tuple) and len(v) > 0 and all(torch.is_tensor(e) for e in v)


def tensor_inputs(kwargs: dict) -> dict[str, Tensor]:
    """The tensors among a call's keyword arguments by name, a list's as `name.0`, `name.1`, …"""
    found = {}
    for name, v in kwargs.items():
        if torch.is_tensor(v):
            found[name] = v
        elif is_tensor_list(v):
            found |= {f"{name}.{i}": e for i, e in enumerate(v)}
    return found


def static_inputs(x: Tensor, t, kwargs: dict) -> dict[str, Tensor]:
    """The buffers a graph reads its inputs from: copies of the tensors of the first call on x's device (the same
    strides; a CPU-resident t or time_ids from a diffusers-style caller moved here, since the UNet's own move would
    be a host→device copy inside the capture, which fails it), and t as a float32 (1,) tensor where it came as a
    number (what the UNet makes of a number)."""
    t = t if torch.is_tensor(t) else torch.full((1,), float(t), dtype=torch.float32, device=x.device)
    tensors = {"x": x, "t": t} | tensor_inputs(kwargs)
    return {name: torch.empty_like(v, device=x.device).copy_(v) for name, v in tensors.items()}


def copy_inputs(static: dict[str, Tensor], x: Tensor, t, kwargs: dict) -> None:
    """Write a call's inputs into the graph's buffers, on the current stream: a number t is a fill (the number
    is a kernel argument: nothing crosses from the host's memory, nothing waits)."""
    static["x"].copy_(x)
    if torch.is_tensor(t):
        static["t"].copy_(t)
    else:
        static["t"].fill_(t)
    for name, v in tensor_inputs(kwargs).items():
        static[name].copy_(v)


WARMUP_CALLS = 2  # before capture: lazy initialisation, cuDNN/cuBLAS plans, a compile's first run


class CaptureError(RuntimeError):
    """`run` could not be captured (an operation this device or driver cannot capture); it ran eagerly in the
    warm-up, so the network itself is fine."""


def capture_cuda_graph(run: Callable[[], Tensor], pool=None) -> tuple[Callable[[], None], Tensor]:
    """Capture `run()` (which reads and writes only tensors that stay alive) as a `torch.cuda.CUDAGraph` in the
    memory pool `pool` (None: a pool of its own), after warm-up calls on a side stream as PyTorch's CUDA-graph
    notes require; returns the graph's replay and the output tensor each replay writes.

    What `torch.cuda.graph` does (torch/cuda/graphs.py), written out so that a failure leaves the process as it
    was: the capture is `thread_local` (other threads, the server's, may use CUDA meanwhile), the caller's stream
    is current again however the capture ends (`torch.cuda.graph` leaves the side stream current when
    `capture_end` raises), and an error of the capture (not an out-of-memory) is a `CaptureError`. An error of
    the warm-up is the network's own and propagates as it is."""
    stream, caller = torch.cuda.Stream(), torch.cuda.current_stream()
    stream.wait_stream(caller)
    with torch.cuda.stream(stream):
        for _ in range(WARMUP_CALLS):
            run()
    caller.wait_stream(stream)
    torch.cuda.synchronize()
    gc.collect()  # as `torch.cuda.graph` does: the cache emptied, so the graph's pool can take the memory it needs
    torch.cuda.empty_cache()
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_stream(stream)
    try:
        graph.capture_begin(pool=pool, capture_error_mode="thread_local")
        try:
            output = run()
        except BaseException:
            with contextlib.suppress(RuntimeError):  # the capture is broken: the run's error is the one to report
                graph.capture_end()
            raise
        graph.capture_end()
    except torch.OutOfMemoryError:
        raise
    except RuntimeError as e:
        raise CaptureError(str(e)) from e
    finally:
        torch.cuda.set_stream(caller)
    return graph.replay, output


@dataclass
class Captured:
    replay: Callable[[], None]
    inputs: dict[str, Tensor]
    output: Tensor


class CUDAGraphs:
    """`fn(x, t, **kwargs)` replayed as captured CUDA graphs, one per input layout (`layout`).

    The first call of a layout copies its inputs into static buffers, captures `fn` on them (`capture`,
    `capture_cuda_graph` by default) and replays it; a later call of the same layout copies its inputs into
    the buffers and replays. A new layout (another size, batch, dtype, conditioning) captures again; the
    `max_graphs` most recently used graphs are kept, in one memory pool (calls are serialised and each graph's
    inputs and output stay alive, so a replay never overwrites memory another graph's result is in). Every call
    returns a fresh copy of the output: a replay overwrites the graph's output tensor, and a sampler keeps earlier
    outputs alive across steps (DPM++ 2M's previous x0, a callback's `denoised`), so handing out the graph's own
    tensor would let the next step change them. The copy is one small kernel per step.

    What a graph cannot see: parameters replaced by new tensors (`.to()` and `.half()` on the wrapper drop
    the graphs, see `TensorTimestep`; after anything else call `reset()`), Python run inside the network
    (module hooks on inner modules run at capture only). Values changed in place (a LoRA merged with
    `copy_`/`addmm_`) are read by every replay. Calls are serialised by a lock and run with the inputs'
    device current (a torchrun rank's `cuda:N`). Should a capture fail (an operation this device or driver
    cannot capture: a `CaptureError`), a warning says why and the network runs eagerly from then on; should it
    run out of memory (a large hires layout), the graphs are dropped, the allocator's cache emptied and that one
    call runs eagerly, the next capturing again. Any other error is the network's own and propagates.
    """

    def __init__(self, fn: Callable[..., Tensor], capture=capture_cuda_graph, device_type: str = "cuda",
                 max_graphs: int = 2):
        self.fn, self.capture, self.device_type, self.max_graphs = fn, capture, device_type, max_graphs
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.captures, self.failed = 0, None  # failed: why a capture failed (then every call runs eagerly)
        self.pool = None  # the memory pool the runner's graphs share (calls are serialised: one runs at a time)
        self.lock = threading.Lock()

    def applies(self, x: Tensor) -> bool:
        """Whether a call with `x` is replayed: on the graphs' device, unless a capture failed there, without
        autograd, with no attention observer (observers are Python called at every attention: they need the
        eager network), and not inside someone else's capture."""
        return (x.device.type == self.device_type and self.failed is None and not torch.is_grad_enabled()
                and not _attention._observers and not (x.is_cuda and torch.cuda.is_current_stream_capturing()))

    def __call__(self, x: Tensor, t, **kwargs) -> Tensor:
        key = layout(x, t, kwargs)
        with self.lock, torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext():
            graph = self.graphs.get(key)
            if graph is None:
                try:
                    graph = self._capture(key, x, t, kwargs)
                except torch.OutOfMemoryError:  # a large (hires) layout: this call runs eagerly, later ones capture
                    self._drop()
                    torch.cuda.empty_cache()
                    return self._eager(x, t, kwargs)
                except CaptureError as e:  # a network this device or driver cannot capture
                    self.failed = f"{type(e.__cause__ or e).__name__}: {e}"
                    warnings.warn(f"CUDA graph capture failed; the UNet runs eagerly from now on ({self.failed})",
                                  stacklevel=2)
                    self._drop()
                    return self._eager(x, t, kwargs)
            else:
                self.graphs.move_to_end(key)
                copy_inputs(graph.inputs, x, t, kwargs)
            graph.replay()
            return graph.output.clone()

    def _capture(self, key: tuple, x: Tensor, t, kwargs: dict) -> Captured:
        while len(self.graphs) >= self.max_graphs:  # free the least recently used first
            self.graphs.popitem(last=False)
        inputs = static_inputs(x, t, kwargs)
        call = {k: ([inputs[f"{k}.{i}"] for i in range(len(v))] if is_tensor_list(v) else inputs[k])
                if k in inputs or is_tensor_list(v) else v for k, v in kwargs.items()}

        def run() -> Tensor:
            return self.fn(inputs["x"], inputs["t"], **call)

        if self.pool is None and self.device_type == "cuda":
            self.pool = torch.cuda.graph_pool_handle()
        replay, output = self.capture(run, pool=self.pool)
        self.captures += 1
        self.graphs[key] = Captured(replay, inputs, output)
        return self.graphs[key]

    def _eager(self, x: Tensor, t, kwargs: dict) -> Tensor:
        if not torch.is_tensor(t):
            t = torch.full((1,), float(t), dtype=torch.float32, device=x.device)
        return self.fn(x, t, **kwargs)

    def reset(self) -> None:
        """Drop every captured graph (and its memory); the next call captures again."""
        with self.lock:
            self._drop()

    def _drop(self) -> None:
        self.graphs.clear()
        self.pool = None  # the shared pool goes with the last graph in it; the next capture starts a new one


class TensorTimestep(nn.Module):
    """The UNet as `accelerate` leaves it: `run` (the UNet, or its compiled form) called with the timestep as
    a float32 tensor on the UNet's device — a Python number would be baked into a compiled graph and recompile
    it at every step, and eagerly the UNet turns it into a CPU tensor copied to the device at every step — and,
    where `graphs` applies (`CUDAGraphs.applies`: CUDA, inference), replayed as a captured CUDA graph. `unet`
    is the plain network (LoRA, `ldm.adapters.lora`, reaches it there); `config` is its config."""

    def __init__(self, unet: nn.Module, run: Callable[..., Tensor] | None = None, graphs: CUDAGraphs | None = None):
        super().__init__()
        self.unet, self.config, self.graphs = unet, unet.config, graphs
        self.__dict__["run"] = unet if run is None else run  # not a submodule: `unet` holds the parameters
        _wrappers[unet] = weakref.ref(self)

    def forward(self, x: Tensor, t, context: Tensor, **kwargs) -> Tensor:
        if self.graphs is not None and self.graphs.applies(x):
            return self.graphs(x, t, context=context, **kwargs)
        if not torch.is_tensor(t):
            t = torch.full((1,), float(t), dtype=torch.float32, device=x.device)
        return self.run(x, t, context, **kwargs)

    @property
    def compiled(self) -> bool:
        """Whether it runs the UNet's compiled form (which swaps of the UNet's modules from outside recompile)."""
        return self.run is not self.unet

    def _apply(self, fn, recurse=True):  # .to(), .half(), .cuda(): the graphs would read the old tensors
        if self.graphs is not None:
            self.graphs.reset()
        return super()._apply(fn, recurse)


# the plain UNet → the `TensorTimestep` around it (a weak reference: the wrapper goes with its pipeline)
_wrappers: "weakref.WeakKeyDictionary[nn.Module, weakref.ref[TensorTimestep]]" = weakref.WeakKeyDictionary()


def speed_wrapper(network: nn.Module) -> TensorTimestep | None:
    """The `TensorTimestep` that runs `network` (a plain UNet, as a pipeline's `networks()` lists it), if one does:
    its compiled form and CUDA graphs are the wrapper's, not the network's."""
    ref = _wrappers.get(network)
    return None if ref is None else ref()


# ------------------------------------------------------------------ the CPU compile's memory

PAGE_OUT_EVERY = 0.5  # seconds between page-outs of the mapped weights while a compile runs


class MappedWeights:
    """Keeps the memory-mapped weights of the networks compiled with inductor's freezing out of resident memory
    (`ldm.loading.files.page_out`) during and after every compile. Freezing reads each weight once, to fold and pack
    it into a constant of the generated code; the mapped original is read again only when another input shape
    compiles. A file's pages that a process has read count in its resident set until memory runs short, so
    without this the originals (3.4 GB for the SD 1.5 UNet) would stay resident beside the packed copies.

    A compile is bracketed by dynamo's compile callbacks (one pair for the process, registered at the first
    `watch`): while it runs a thread pages the weights out every `PAGE_OUT_EVERY` seconds, so that those already
    packed do not add to the compile's peak, and once more when it ends. A page still being read is read again
    from the file (or the page cache): the cost is time, at most a fraction of a second per compile; contents
    are never lost (`page_out`)."""

    def __init__(self):
        self.modules: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        self.stop: threading.Event | None = None
        self.thread: threading.Thread | None = None
        self.registered = False

    def watch(self, module: nn.Module) -> None:
        self.modules.add(module)
        if not self.registered:
            torch._dynamo.callback_handler.register_start_callback(self.started)
            torch._dynamo.callback_handler.register_end_callback(self.ended)
            self.registered = True

    def ranges(self) -> list[tuple[int, int]]:
        return mapped_pages(t for m in list(self.modules) for t in (*m.parameters(), *m.buffers()))

    def started(self, _args=None) -> None:
        ranges = self.ranges()
        if not ranges or self.thread is not None:
            return
        stop = self.stop = threading.Event()

        def pager():
            while not stop.wait(PAGE_OUT_EVERY):
                page_out(ranges)

        self.thread = threading.Thread(target=pager, name="ldm-page-out", daemon=True)
        self.thread.start()

    def ended(self, _args=None) -> None:
        if self.thread is not None:
            self.stop.set()
            self.thread.join()
            self.stop = self.thread = None
        page_out(self.ranges())


MAPPED = MappedWeights()


def cache_dir() -> Path:
    return Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm") / "inductor"


COMPILE_MODES = {  # --compile-mode → torch.compile's inductor mode on (CUDA, the CPU)
    "default": (None, None),  # inductor's default: no autotuning; on the CPU with weight freezing
    "max": ("max-autotune-no-cudagraphs", "max-autotune"),  # Triton autotuning (CUDA graphs: ours, CUDAGraphs)
}
INDUCTOR_GRAPHS = ("reduce-overhead", "max-autotune")  # inductor modes that capture CUDA graphs themselves


def accelerate(pipe, compile: bool | str = True, channels_last: bool = True, fuse: bool = True,
               mode: str | None = None, backend: str = "inductor", kernels: bool = False,
               winograd: bool | None = None, cuda_graph: bool | None = None):
    """Make `pipe` fast in place and return it.

    `compile`: False, True (= "default") or a `COMPILE_MODES` name; `mode` overrides torch.compile's mode
    outright. `cuda_graph`: replay the UNet step as a CUDA graph (`CUDAGraphs`; default: on when the pipeline
    is on CUDA, unless `mode` is one of inductor's own CUDA-graph modes). `backend` is for tests ("aot_eager"
    traces the same graphs without generating code). `kernels`: the Triton kernels of kernels/ (off by
    default: they have not yet been measured to beat what inductor generates, see BENCHMARKS.md). `winograd`:
    Winograd 3×3 convolutions (`use_winograd`; default: on for fp32 on the CPU, where it was measured to pay,
    off elsewhere: cuDNN chooses its own algorithms).

    Without compile and without a CUDA graph (the CPU's `compile=False`), `pipe.unet` stays the plain UNet.
    """
    cuda = pipe.device.type == "cuda"
    compile, mode, cuda_graph = _compile_options(cuda, compile, mode, backend, cuda_graph)
    networks = pipe.networks()  # the UNet without a wrapper from an earlier call
    unet, vae = networks["unet"], networks["vae"]
    # On the CPU, inductor's freezing folds the weights into constants of the generated code: it lays out the
    # convolutions' filters channels_last and packs them for oneDNN and MKL itself, and folds the Winograd
    # transform, so the compiled networks' own weights stay as loaded (memory-mapped) and are paged out once
    # packed (`MappedWeights`): one copy of each weight in memory, not three (BENCHMARKS.md).
    freezing = bool(compile) and not cuda and backend == "inductor"
    if fuse:
        fuse_projections(unet)
    if kernels:
        use_kernels(unet, vae)
    if winograd is None:
        winograd = pipe.device.type == "cpu" and next(unet.parameters()).dtype == torch.float32
    if winograd:  # not the encoder: it runs once, for image-to-image only
        use_winograd(unet, vae.decoder, precompute=not freezing)
    if channels_last:
        eager = [m for m in vae.children() if m is not vae.decoder] if freezing else [unet, vae]
        for module in eager:
            module.to(memory_format=torch.channels_last)
    _layouts[unet] = Layouts(fuse, kernels, winograd, channels_last)  # (for its ControlNets: `accelerate_like`)
    run = _compiled(unet, vae, mode, backend, freezing) if compile else unet
    if compile or cuda_graph or cuda:
        pipe.unet = TensorTimestep(unet, run, CUDAGraphs(run) if cuda_graph else None)
    return pipe


def _compile_options(cuda: bool, compile: bool | str, mode: str | None, backend: str,
                     cuda_graph: bool | None) -> tuple[str | bool, str | None, bool]:
    """`accelerate`'s compile, mode and cuda_graph arguments resolved: the `COMPILE_MODES` name (or False), the
    torch.compile mode for the device, and whether the UNet step is replayed as our CUDA graph."""
    if compile is True:
        compile = "default"
    if compile and compile not in COMPILE_MODES:
        raise ValueError(f"compile mode {compile!r}: one of {', '.join(COMPILE_MODES)}")
    if compile and backend == "inductor":
        mode = mode or COMPILE_MODES[compile][0 if cuda else 1]
    inductor_graphs = bool(compile) and backend == "inductor" and mode in INDUCTOR_GRAPHS
    if cuda_graph and inductor_graphs:
        raise ValueError(f"torch.compile mode {mode!r} captures CUDA graphs itself: pass cuda_graph=False")
    if cuda_graph is None:
        cuda_graph = cuda and not inductor_graphs
    return compile, mode, cuda_graph


def _compiled(unet: nn.Module, vae: nn.Module, mode: str | None, backend: str, freezing: bool):
    """torch.compile of the UNet (returned: what `TensorTimestep` runs) and of the VAE decoder (in place), one
    graph each, cached on disk (`cache_dir`); with `freezing`, the mapped weights paged out (`MAPPED`)."""
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_dir()))
    import torch._inductor.config as inductor

    if freezing:
        inductor.freezing = True  # weights become constants of the graph: pre-packed, folded (process-wide)
        MAPPED.watch(unet)
        MAPPED.watch(vae.decoder)
    options = {"fullgraph": True, "dynamic": False, "backend": backend}
    if backend == "inductor":
        options["mode"] = mode
    run = torch.compile(unet, **options)
    vae.decoder = torch.compile(vae.decoder, **options)
    return run
