"""`ldm bench --check-gpu`: the first thing to run on a GPU (issue 33), each part in a fresh process under its own
timeout, each result printed (one JSON line) as soon as it exists.

The parts (`PARTS`), on random fp16 UNets of the official SD 1.5 and SDXL shapes (`ldm.tools.bench`'s configs, built
on the meta device and filled on the GPU: no files), batch 2 as classifier-free guidance runs them:

- kernels: graph vs eager and fused vs unfused projections, under each SDPA backend the real head widths reach
  (FLASH, CUDNN, EFFICIENT; the tests' tiny fixtures, head widths 4–8, never reach them), and `failed is None`;
- layouts: the UNet step by CUDA events for NCHW and channels_last, eager and graph, with and without
  `cudnn.benchmark`, and channels_last with the GroupNorm+SiLU kernel of kernels/; the profiler's count of
  layout-copy kernels per step (`native_group_norm` takes and returns NCHW on CUDA);
- samplers: euler and euler_a per-step wall time through the graph, and the time from the loop's end to
  `synchronize` (how far the host ran ahead of the GPU);
- graph_memory: the allocator's memory after capturing three layouts with two kept (one shared pool);
- oom_capture: a capture that runs out of memory for real (an allocation larger than the device, inside the
  capture only): the call's result is the eager one, the runner is not marked failed, the next call captures;
- refiner: the SDXL hand-off's cost without residency (the base's UNet to the CPU and the refiner's to the GPU,
  pageable, as each call did) against residency (nothing moves);
- ip_adapter: a plain IP-Adapter's image attention through the graph (a start/end window's per-step scales
  replayed) against eager, and its share of a graphed SD 1.5 step.

`--device cpu` is a dry run: the same parts end to end at small shapes in fp32, the graphs a stand-in (the replay
runs the network again), CUDA events replaced by the wall clock; its figures say nothing about a GPU.
Reproduces no reference: every figure compares ldm with itself. BENCHMARKS.md's GPU section is where the output goes.
"""

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable

import torch

from ldm.tools.bench import SD15, SDXL

PARTS = ("kernels", "layouts", "samplers", "graph_memory", "oom_capture", "refiner", "ip_adapter")
# seconds per part, each from process start (CUDA initialised, networks built): 7 minutes in all at most
TIMEOUTS = {"kernels": 100, "layouts": 80, "samplers": 50, "graph_memory": 40, "oom_capture": 40, "refiner": 50,
            "ip_adapter": 50}
TOLERANCE = 2e-2  # fp16, relative to the output's largest value: graph vs eager, fused vs unfused
COPY_KERNELS = ("copy", "nchwtonhwc", "nhwctonchw", "contiguous")  # profiler kernel names that are layout copies


# ------------------------------------------------------------------------------ the networks


def unet_config(arch: str, dry: bool) -> dict:
    """The official config of `arch`, or (dry run) the same architecture at toy widths."""
    cfg = dict((SDXL if arch == "sdxl" else SD15)["unet"])
    if dry:
        levels = len(cfg["block_out_channels"])
        cfg |= {"block_out_channels": [16 * min(i + 1, 2) for i in range(levels)], "cross_attention_dim": 16,
                "sample_size": 8, "layers_per_block": 1, "norm_num_groups": 8}
        if arch == "sdxl":
            cfg |= {"attention_head_dim": [2] * levels, "transformer_layers_per_block": [1] * levels,
                    "addition_time_embed_dim": 8, "projection_class_embeddings_input_dim": 16 + 6 * 8}
    return cfg


def random_unet(arch: str, device: torch.device, dtype: torch.dtype, dry: bool):
    """A UNet of `arch`'s shapes with random weights (fan-in scaled, norms at 1), built on meta, filled on `device`."""
    from ldm.networks.unet import UNet, UNetConfig

    with torch.device("meta"):
        unet = UNet(UNetConfig.from_diffusers(unet_config(arch, dry)))
    return filled_randomly(unet.to_empty(device=device).to(dtype).eval().requires_grad_(False), device, seed=0)


def filled_randomly(network, device: torch.device, seed: int):
    """`network` with random weights in place: fan-in scaled normals for matrices, norms at 1, biases at 0."""
    generator = torch.Generator(device).manual_seed(seed)
    for name, p in network.named_parameters():
        if p.dim() > 1:
            p.normal_(0, p[0].numel() ** -0.5, generator=generator)
        else:
            p.fill_(1.0 if "norm" in name and name.endswith("weight") else 0.0)
    return network


def unet_inputs(unet, arch: str, device: torch.device, dtype: torch.dtype, dry: bool, batch: int = 2) -> dict:
    """Latents at the native size, a timestep, the text context (and SDXL's pooled text and micro-conditioning)."""
    cfg, size = unet.config, unet_config(arch, dry)["sample_size"]
    g = torch.Generator().manual_seed(1)
    inputs = {"x": torch.randn(batch, cfg.in_channels, size, size, generator=g),
              "context": torch.randn(batch, 77, cfg.cross_attention_dim, generator=g)}
    if arch == "sdxl":
        width = unet_config(arch, dry)["projection_class_embeddings_input_dim"] - 6 * cfg.addition_time_embed_dim
        inputs |= {"text_embeds": torch.randn(batch, width, generator=g),
                   "time_ids": torch.tensor([[8.0 * size, 8.0 * size, 0, 0, 8.0 * size, 8.0 * size]] * batch)}
    return {k: v.to(device, dtype) for k, v in inputs.items()}


def stand_in_capture(run: Callable, pool=None):
    """The dry run's graph: a replay runs the network again into the captured output (what a graph computes)."""
    output = run()
    return lambda: output.copy_(run()), output


def step_runner(unet, device: torch.device, graph: bool, **graph_options):
    """The UNet as `accelerate` leaves it: the timestep a device tensor, replayed as a CUDA graph if `graph`."""
    from ldm.speed.accelerate import CUDAGraphs, TensorTimestep

    if not graph:
        return TensorTimestep(unet)
    if device.type == "cuda":
        return TensorTimestep(unet, graphs=CUDAGraphs(unet, **graph_options))
    return TensorTimestep(unet, graphs=CUDAGraphs(unet, capture=stand_in_capture, device_type=device.type,
                                                  **graph_options))


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_time(fn: Callable, device: torch.device, repeats: int) -> float:
    """The median time of `fn()`: CUDA events on CUDA, the wall clock elsewhere (after one warm-up call)."""
    fn()
    sync(device)
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            began = time.perf_counter()
            fn()
            times.append(time.perf_counter() - began)
    return statistics.median(times)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-12))


# ---------------------------------------------------------------------------------- the parts


def sdpa_backends(device: torch.device) -> dict:
    """The SDPA backends to check: those real models reach on CUDA; on the CPU the two it has."""
    from torch.nn.attention import SDPBackend

    if device.type == "cuda":
        return {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                "efficient": SDPBackend.EFFICIENT_ATTENTION}
    return {"math": SDPBackend.MATH}


def part_kernels(device: torch.device, dtype: torch.dtype, dry: bool, report: Callable) -> None:
    """Per architecture and SDPA backend: the graph's output against eager, fused against unfused projections."""
    from torch.nn.attention import sdpa_kernel

    from ldm.speed.accelerate import fuse_projections

    for arch in ("sd15", "sdxl"):
        unet = random_unet(arch, device, dtype, dry)
        inputs = unet_inputs(unet, arch, device, dtype, dry)
        x, rest = inputs.pop("x"), inputs
        fused_unet = random_unet(arch, device, dtype, dry)  # the same weights (seeded), projections fused
        fuse_projections(fused_unet)
        for name, backend in sdpa_backends(device).items():
            try:
                with sdpa_kernel([backend]):
                    plain = unet(x, torch.full((1,), 500.0, device=device), **rest)
                    fused = fused_unet(x, torch.full((1,), 500.0, device=device), **rest)
                    graphed = step_runner(fused_unet, device, graph=True)
                    replays = [graphed(x, 500.0, **rest) for _ in range(2)]
                    failed = graphed.graphs.failed
                report({"arch": arch, "sdpa": name, "fused_vs_unfused": rel_err(fused, plain),
                        "graph_vs_eager": max(rel_err(r, fused) for r in replays), "failed": failed,
                        "ok": failed is None and rel_err(fused, plain) <= TOLERANCE
                        and max(rel_err(r, fused) for r in replays) <= TOLERANCE})
            except RuntimeError as e:  # a backend this device or these shapes cannot run
                report({"arch": arch, "sdpa": name, "error": f"{type(e).__name__}: {str(e)[:200]}", "ok": False})
        del unet, fused_unet


def copy_kernels(fn: Callable, device: torch.device) -> int:
    """How many layout-copy kernels (CUDA) or copy ops (the CPU) one call of `fn` runs, by the profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CUDA] if device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        fn()
        sync(device)
    kind = "cuda" if device.type == "cuda" else "cpu"
    names = [e.name.lower() for e in prof.events() if e.device_type.name.lower() == kind]
    return sum(any(k in n for k in COPY_KERNELS) for n in names)


def part_layouts(device: torch.device, dtype: torch.dtype, dry: bool, report: Callable) -> None:
    """SD 1.5's step for NCHW and channels_last × eager and graph × cudnn.benchmark off and on, then channels_last
    with the fused GroupNorm+SiLU kernel of kernels/ (its NHWC path: no layout copies around the GroupNorms)."""
    from ldm.speed.accelerate import use_kernels

    unet = random_unet("sd15", device, dtype, dry)
    inputs = unet_inputs(unet, "sd15", device, dtype, dry)
    x, rest = inputs.pop("x"), inputs
    before = torch.backends.cudnn.benchmark
    try:
        for benchmark in (False, True) if not dry else (False,):
            torch.backends.cudnn.benchmark = benchmark
            for layout in (torch.contiguous_format, torch.channels_last):
                name = "channels_last" if layout is torch.channels_last else "nchw"
                layout_rows(unet.to(memory_format=layout), x.contiguous(memory_format=layout), rest, device, dry,
                            {"layout": name, "cudnn_benchmark": benchmark}, report)
        use_kernels(unet)
        layout_rows(unet.to(memory_format=torch.channels_last), x.contiguous(memory_format=torch.channels_last),
                    rest, device, dry, {"layout": "channels_last + group_norm_silu kernel",
                                        "cudnn_benchmark": benchmark}, report)
    finally:
        torch.backends.cudnn.benchmark = before


def layout_rows(unet, x: torch.Tensor, rest: dict, device: torch.device, dry: bool, row: dict,
                report: Callable) -> None:
    """The step time eager and as a graph, and the eager step's layout-copy kernels (a graph replays those)."""
    for graph in (False, True):
        runner = step_runner(unet, device, graph)
        seconds = step_time(lambda: runner(x, 500.0, **rest), device, 1 if dry else 5)  # noqa: B023
        copies = None if graph else copy_kernels(lambda: runner(x, 500.0, **rest), device)  # noqa: B023
        report(row | {"graph": graph, "step_s": seconds, "copy_kernels_per_step": copies})


def part_samplers(device: torch.device, dtype: torch.dtype, dry: bool, report: Callable) -> None:
    """euler and euler_a through the graph: per-step wall time, and the loop's end → synchronize."""
    steps = 1 if dry else 10
    from ldm.sampling.samplers import SAMPLERS
    from ldm.sampling.schedules import SchedulerConfig

    unet = random_unet("sd15", device, dtype, dry).to(memory_format=torch.channels_last)
    inputs = unet_inputs(unet, "sd15", device, dtype, dry)
    x, rest = inputs.pop("x"), inputs
    runner = step_runner(unet, device, graph=True)
    config = SchedulerConfig.from_diffusers({"_class_name": "EulerDiscreteScheduler", "beta_schedule": "scaled_linear",
                                             "beta_start": 0.00085, "beta_end": 0.012, "steps_offset": 1})
    for name in ("euler", "euler_a") if dry else ("euler", "euler_a", "euler", "euler_a"):  # the first two capture
        spec = SAMPLERS[name]
        schedule = spec.schedule(config, steps, False)
        model = lambda latents, sigma: runner(latents.to(dtype), 500.0, **rest).float()  # noqa: E731  (timing only)
        sync(device)
        began = time.perf_counter()
        spec.sample(model, x.float(), schedule, generator=torch.Generator().manual_seed(0))
        loop_end = time.perf_counter()
        sync(device)
        done = time.perf_counter()
        report({"sampler": name, "steps": steps, "per_step_wall_s": (loop_end - began) / steps,
                "loop_end_to_sync_s": done - loop_end, "whole_s": done - began})



def allocator_gib(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"reserved_gib": None, "allocated_gib": None}
    return {"reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
            "allocated_gib": torch.cuda.memory_allocated(device) / 2**30}


def part_graph_memory(device: torch.device, dtype: torch.dtype, dry: bool, report: Callable) -> None:
    """The allocator's memory after capturing three layouts (sizes) with two kept, in the runner's one pool."""
    unet = random_unet("sd15", device, dtype, dry).to(memory_format=torch.channels_last)
    inputs = unet_inputs(unet, "sd15", device, dtype, dry)
    x, rest = inputs.pop("x"), inputs
    runner = step_runner(unet, device, graph=True, max_graphs=2)
    sync(device)
    report({"stage": "weights only", **allocator_gib(device)})
    for side in (x.shape[-1], x.shape[-1] + 8, x.shape[-1] + 16):
        runner(torch.nn.functional.interpolate(x, size=(side, side)), 500.0, **rest)
        sync(device)
        report({"stage": f"captured {side}x{side} latents", "graphs_kept": len(runner.graphs.graphs),
                "captures": runner.graphs.captures, **allocator_gib(device)})
    runner.graphs.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    report({"stage": "graphs dropped, cache emptied", **allocator_gib(device)})


def part_oom_capture(device: torch.device, dtype: torch.dtype, dry: bool, report: Callable) -> None:
    """A capture that runs out of memory: one allocation larger than the device, made inside the capture only."""
    unet = random_unet("sd15", device, dtype, dry)
    inputs = unet_inputs(unet, "sd15", device, dtype, dry)
    x, rest = inputs.pop("x"), inputs
    huge = torch.cuda.get_device_properties(device).total_memory * 2 if device.type == "cuda" else None

    def greedy(*args, **kwargs):
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        if capturing:
            torch.empty(huge, dtype=torch.uint8, device=device)
        elif greedy.force:  # the dry run's stand-in capture: raise as the allocator would
            greedy.force = False
            raise torch.OutOfMemoryError("stand-in: CUDA out of memory")
        return unet(*args, **kwargs)

    greedy.force, greedy.config = device.type != "cuda", unet.config
    runner = step_runner(greedy, device, graph=True)
    eager = unet(x, torch.full((1,), 500.0, device=device), **rest)
    out = runner(x, 500.0, **rest)
    graphs = runner.graphs
    again = runner(x, 500.0, **rest)  # the next call captures (nothing is forced now)
    report({"vs_eager": rel_err(out, eager), "failed": graphs.failed, "captured_after": graphs.captures,
            "next_call_vs_eager": rel_err(again, eager),
            "ok": graphs.failed is None and rel_err(out, eager) <= TOLERANCE and graphs.captures == 1})


def part_refiner(device: torch.device, dtype: torch.dtype, dry: bool, report: Callable) -> None:
    """The hand-off's moves without residency (the base's UNet out to the CPU, the refiner's in, pageable), per call,
    against residency (none). The text towers and VAE moved too before: this counts the UNets only."""
    base = random_unet("sdxl", device, dtype, dry)
    refiner = random_unet("sdxl", device, dtype, dry).to("cpu")  # near the refiner's size; filled on the device
    bytes_moved = sum(p.numel() * p.element_size() for m in (base, refiner) for p in m.parameters())
    times = []
    for _ in range(2):  # base out / refiner in, then back: one call's two hand-offs
        sync(device)
        began = time.perf_counter()
        base.to("cpu")
        refiner.to(device)
        sync(device)
        times.append(time.perf_counter() - began)
        base, refiner = refiner, base
    report({"parked_s_per_call": sum(times), "resident_s_per_call": 0.0, "gib_moved_per_hand_off": bytes_moved / 2**30,
            "note": "parked: the moved base also captures its CUDA graph again at every call"})


def random_ip_adapter(unet, device: torch.device, dtype: torch.dtype, dry: bool):
    """A plain IP-Adapter for `unet` (the `ip-adapter_sd15` layout: a ViT-H/14 embedding of 1024 → 4 tokens, a
    key/value pair per cross-attention), random weights as `random_unet`'s."""
    from ldm.adapters.ip_adapter import attention_widths
    from ldm.networks.ip_adapter import IPAdapter, IPAdapterConfig

    cfg = IPAdapterConfig("plain", embed_dim=16 if dry else 1024, cross_attention_dim=unet.config.cross_attention_dim,
                          tokens=4, widths=tuple(attention_widths(unet)))
    return filled_randomly(IPAdapter(cfg).to(device, dtype).eval().requires_grad_(False), device, seed=2)


def part_ip_adapter(device: torch.device, dtype: torch.dtype, dry: bool, report: Callable) -> None:
    """SD 1.5's step with a plain IP-Adapter's image attention through the graph: four calls of a 0.25–0.75 window
    (scale 0, 0.8, 0.8, 0) against eager, the prompted layout captured once; then the graphed step's time with and
    without the adapter."""
    from ldm.adapters.ip_adapter import ImageTokens, decoupled_attention

    unet = random_unet("sd15", device, dtype, dry)
    inputs = unet_inputs(unet, "sd15", device, dtype, dry)
    x, rest = inputs.pop("x"), inputs
    adapter = random_ip_adapter(unet, device, dtype, dry)
    tokens = adapter(torch.randn(1, adapter.config.embed_dim, generator=torch.Generator().manual_seed(3))
                     .to(device, dtype)).repeat(2, 1, 1)
    eager, graphed = step_runner(unet, device, graph=False), step_runner(unet, device, graph=True)
    plain = eager(x, 500.0, **rest)
    steps = []
    for runner in (eager, graphed):
        with decoupled_attention(unet, [ImageTokens(adapter, tokens, 0.8, 0.25, 0.75, calls=4)], caller=runner):
            steps.append([runner(x, 500.0, **rest) for _ in range(4)])
    errors = [rel_err(g, e) for g, e in zip(steps[1], steps[0], strict=True)]
    moved = rel_err(steps[0][1], plain)
    graphs = graphed.graphs
    report({"graph_vs_eager": max(errors), "off_step_vs_plain": rel_err(steps[0][0], plain),
            "adapter_moves_output": moved, "captures": graphs.captures, "failed": graphs.failed,
            "ok": graphs.failed is None and graphs.captures == 1 and max(errors) <= TOLERANCE and moved > TOLERANCE})
    repeats = 2 if dry else 20  # (step_time makes one warm-up call first: the adapter acts at each of the repeats + 1)
    without = step_time(lambda: graphed(x, 500.0, **rest), device, repeats)
    with decoupled_attention(unet, [ImageTokens(adapter, tokens, 0.8, calls=repeats + 1)], caller=graphed):
        with_adapter = step_time(lambda: graphed(x, 500.0, **rest), device, repeats)
    report({"graphed_step_s": without, "graphed_step_with_adapter_s": with_adapter,
            "adapter_share": with_adapter / without - 1, "captures": graphs.captures})


RUNS = {"kernels": part_kernels, "layouts": part_layouts, "samplers": part_samplers,
        "graph_memory": part_graph_memory, "oom_capture": part_oom_capture, "refiner": part_refiner,
        "ip_adapter": part_ip_adapter}


def run_part(name: str, device_name: str, report: Callable[[dict], None] | None = None) -> None:
    """One part in this process, each result passed to `report` (default: a JSON line on stdout, flushed) as it
    exists."""
    device = torch.device(device_name)
    dry = device.type != "cuda"
    dtype = torch.float32 if dry else torch.float16

    def printed(result: dict) -> None:
        print(json.dumps(result, default=str), flush=True)

    report = report or printed
    with torch.no_grad():
        RUNS[name](device, dtype, dry, lambda result: report({"part": name, **result}))


def check_gpu(device: str = "cuda", parts: tuple[str, ...] = PARTS, timeout_scale: float = 1.0,
              log: Callable[[str], None] = print) -> list[dict]:
    """On CUDA every part in a fresh process (`python -m ldm.tools.check_gpu PART DEVICE`) under its own timeout
    (`TIMEOUTS` × `timeout_scale`), each line it prints logged as it comes; the CPU's dry run runs the parts in
    this process, one after the other (one import of torch: seconds, not minutes). Returns the results, and one
    `{"part", "error"}` row per part that failed or ran out of time."""
    results = []
    for name in parts:
        limit = TIMEOUTS[name] * timeout_scale
        log(f"# {name}" + (" (dry run)" if torch.device(device).type != "cuda" else f" (timeout {limit:.0f} s)"))
        if torch.device(device).type != "cuda":
            error = in_process(name, device, results, log)
        else:
            error = run_logged([sys.executable, "-m", "ldm.tools.check_gpu", name, device], limit, results, log)
        if error is not None:
            results.append({"part": name, "error": error})
            log(json.dumps(results[-1]))
    return results


def in_process(name: str, device: str, results: list[dict], log: Callable[[str], None]) -> str | None:
    """The dry run's part `name` in this process; None, or its error in one line."""

    def report(result: dict) -> None:
        results.append(result)
        log(json.dumps(result, default=str))

    try:
        run_part(name, device, report)
    except Exception as e:  # a part that breaks is a row of the output, and the next part runs
        return f"{type(e).__name__}: {str(e)[:300]}"
    return None


def run_logged(command: list[str], limit: float, results: list[dict], log: Callable[[str], None]) -> str | None:
    """Run `command`, logging each JSON line of its stdout as it arrives (into `results` too); stop it after
    `limit` seconds. Returns None, or why it failed (its stderr's last line, or the timeout)."""
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=os.environ | {"PYTHONUNBUFFERED": "1"})

    def read() -> None:
        for line in proc.stdout:
            if line.startswith("{"):
                results.append(json.loads(line))
                log(line.rstrip())

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=limit)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join()
        return f"timed out after {limit:.0f} s"
    reader.join()
    err = proc.stderr.read().strip().splitlines()
    return None if proc.returncode == 0 else (err or ["(no message)"])[-1][:300]


if __name__ == "__main__":
    run_part(sys.argv[1], sys.argv[2])
