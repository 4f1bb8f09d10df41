"""`ldm bench`: ldm against diffusers on identical weights, each configuration in a fresh process
(`ldm.tools.bench`)."""

import argparse
import os
import sys

from ldm.choices import BENCH_MODES, SAMPLER_LABELS
from ldm.errors import LdmError
from ldm_cli.options import DTYPE_CHOICES


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `bench` on the `ldm` command's subparsers."""
    bench = subparsers.add_parser(
        "bench", help="time ldm against diffusers on identical weights (README: 'Performance')",
        description="Times load, first step, first image, compile/capture, text encode, UNet step (wall, and GPU "
                    "time on CUDA), VAE decode, end to end and peak memory of ldm and (when installed) diffusers "
                    "in each --mode, each configuration in a fresh process, on a full-size random model in the "
                    "official layout (or --model), and prints a table with ratios.")
    bench.add_argument("--model", default=None, help="a diffusers folder to time (default: full-size random weights)")
    bench.add_argument("--arch", default="sd15", choices=("sd15", "sdxl"), help="random architecture (default: sd15)")
    bench.add_argument("--size", type=int, default=None, help="image size (default: 512 on CUDA, 256 on the CPU)")
    bench.add_argument("--steps", type=int, default=4, help="steps of the end-to-end run (default: %(default)s)")
    bench.add_argument("--sampler", default="euler", choices=list(SAMPLER_LABELS), help="(default: %(default)s)")
    bench.add_argument("--mode", nargs="+", default=None, choices=BENCH_MODES,
                       help="ldm modes to time (diffusers in its counterpart of each): eager (no CUDA graph, no "
                            "compile), graph (CUDA only: the CUDA-graph default there), compile (--compile), max "
                            "(--compile-mode max), model-offload / sequential-offload (CUDA only: --offload); "
                            "default: eager graph on CUDA, eager on the CPU")
    bench.add_argument("--compile", action="store_true", help="also time the compile mode")
    bench.add_argument("--timeout", type=float, default=None,
                       help="seconds each configuration may take before it is stopped and left out (default: none)")
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    bench.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: fp16 on CUDA, fp32 on the CPU")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats of each part (default: %(default)s)")
    bench.add_argument("--no-diffusers", action="store_true", help="time ldm only")
    bench.add_argument("--check-gpu", action="store_true",
                       help="the GPU path's self-check (ldm.tools.check_gpu): graph vs eager, fused vs unfused under "
                            "each SDPA backend at full model shapes, step time by layout, samplers, graph memory, a "
                            "forced out-of-memory capture, the refiner hand-off; each part under its own timeout, each "
                            "result printed as it exists. With --device cpu: a dry run at small shapes")
    return bench


def run(args: argparse.Namespace) -> None:
    import importlib.util

    from ldm.loading.components import resolve_device, resolve_dtype
    from ldm.pipelines.setup import dtype_name
    from ldm.tools.bench import bench, table

    device = resolve_device(args.device)
    if args.check_gpu:
        return check_gpu(device)
    dtype = dtype_name(resolve_dtype(args.dtype, device))
    size = args.size or (512 if device.type == "cuda" else 256)
    with_diffusers = not args.no_diffusers and importlib.util.find_spec("diffusers") is not None
    if not with_diffusers and not args.no_diffusers:
        print("note: diffusers is not installed; timing ldm only", file=sys.stderr)
    modes = list(dict.fromkeys((args.mode or (["eager", "graph"] if device.type == "cuda" else ["eager"]))
                               + (["compile"] if args.compile else [])))
    if "graph" in modes and device.type != "cuda":
        raise LdmError("--mode graph replays CUDA graphs: it needs a CUDA device (--device cuda)")
    if {"model-offload", "sequential-offload"} & set(modes) and device.type != "cuda":
        raise LdmError("--mode model-offload and sequential-offload offload from a GPU: they need --device cuda")
    rows = bench(args.model, args.arch, size, args.steps, args.sampler, modes, device.type, dtype,
                 args.repeats, with_diffusers, log=lambda m: print(m, file=sys.stderr, flush=True),
                 timeout=args.timeout)
    print(f"{args.model or args.arch + ' (random weights)'}{weights(rows)}, {size}x{size}, {args.steps} steps "
          f"{args.sampler}, {dtype}, {machine(device, with_diffusers)}")
    print(table(rows))


def check_gpu(device) -> int:
    """`--check-gpu`: every part's results as JSON lines on stdout as they come, then one line: how many failed."""
    import torch

    from ldm.tools.check_gpu import check_gpu as run_checks

    if device.type != "cuda":  # the dry run's toy shapes: one thread is plenty, and never waits for a busy core
        torch.set_num_threads(1)
    print(f"# ldm bench --check-gpu on {machine(device, False)}" + (" (dry run)" if device.type != "cuda" else ""),
          flush=True)
    results = run_checks(device.type if device.type != "cuda" else str(device), log=lambda m: print(m, flush=True))
    failed = [r for r in results if "error" in r or r.get("ok") is False]
    print(f"# {len(results)} results, {len(failed)} failed" + (": " + ", ".join(sorted({r['part'] for r in failed}))
                                                              if failed else ""), flush=True)
    return 1 if failed else 0


def weights(rows: list[dict]) -> str:
    return f", weights {rows[0]['weight_gib']:.2f} GiB" if rows else ""


def machine(device, with_diffusers: bool) -> str:
    """The GPU (or the CPU threads), the architecture and the versions the times were taken with."""
    import importlib.metadata
    import platform

    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU threads"
    versions = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if device.type == "cuda" else "")
    if with_diffusers:
        versions += f", diffusers {importlib.metadata.version('diffusers')}"
    return f"{gpu}, {platform.machine()}, {versions}"
