"""Benchmark (a script, not a test: pytest collects test_*.py only): the per-step cost of one and two ControlNet units
on the CPU (issue 29), ldm against diffusers on the same full-size random weights.

    python tests/bench_controlnet.py                      # 256² and 512², 3 timed steps per configuration
    python tests/bench_controlnet.py --sizes 256 --repeats 5
    python tests/bench_controlnet.py --fast               # ldm's side accelerated (fused projections, channels_last,
                                                          # Winograd), its ControlNets as `accelerate_like` does

The weights: diffusers' `UNet2DConditionModel` built from SD 1.5's config (stable-diffusion-v1-5's unet/config.json:
320/640/1280/1280, 8 heads, cross-attention 768; tests/official.py's `make_unet`), and two ControlNets made of it by
diffusers' `ControlNetModel.from_unet` (the layout of lllyasviel/control_v11p_sd15_*: the UNet's encoder and mid
block, the hint embedding 16/32/96/256), their zero convolutions given random values. ldm's `UNet` and `ControlNet`
are built from the same config.json and given the very same tensors (diffusers' names are ldm's): one copy of each
weight in memory, read by both.

One step is what both pipelines do per denoising step with classifier-free guidance (batch 2): each unit's ControlNet
on the latents and the control image, the residuals summed (diffusers: `MultiControlNetModel` for two units), then the
UNet with them. ldm's is `ldm.pipelines.control.with_controls` around its UNet (the code a run calls); diffusers' the
calls StableDiffusionControlNetPipeline makes (src/diffusers/pipelines/controlnet/pipeline_controlnet.py, v0.42).
"0 units" is the UNet alone, for the ControlNets' share of a step.

Both sides run in this one process, 2 threads, interleaved (for each repeat, every configuration of ldm and
diffusers in turn, the order alternating): on a machine other processes share, a change of load then falls on both
sides alike, and the ratios — not the seconds — are the figures to read. The load average and the cores other
processes kept busy (/proc/stat, less this process) are printed beside each size. Before timing, the outputs of both
sides are compared (two units, 256²): the same weights give the same noise prediction, so both did the same work.
"""

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_few_step import cpu_jiffies, others_cores  # noqa: E402  (the few-step benchmark's load measurement)
from official import SD1_UNET, make_unet  # noqa: E402

# stable-diffusion-v1-5's unet/config.json, in the fields tests/official.py keeps
SD15_UNET = SD1_UNET | {"_diffusers_version": "0.6.0", "block_out_channels": [320, 640, 1280, 1280],
                        "cross_attention_dim": 768, "sample_size": 64}
TEXT_TOKENS = 77


def build(units: int):
    """(diffusers' UNet, its ControlNets; ldm's UNet, its ControlNets): the same tensors in both."""
    from diffusers import ControlNetModel

    from ldm.networks.controlnet import ControlNet, ControlNetConfig
    from ldm.networks.unet import UNet, UNetConfig

    unet = make_unet(SD15_UNET, seed=0)
    nets = []
    for seed in range(units):
        torch.manual_seed(seed + 1)
        net = ControlNetModel.from_unet(unet).eval()
        with torch.no_grad():
            for name, p in net.named_parameters():
                if name.startswith("controlnet_") and "cond_embedding" not in name:
                    p.normal_(0, 0.02)  # the zero convolutions, zero in a fresh ControlNet: residuals of zero
        nets.append(net)

    def same_tensors(build_ldm, reference):
        with torch.device("meta"):
            module = build_ldm()
        module.load_state_dict(reference.state_dict(), strict=True, assign=True)
        return module.eval().requires_grad_(False)

    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    ours = same_tensors(lambda: UNet(UNetConfig.from_diffusers(config)), unet)
    our_nets = [same_tensors(lambda n=n: ControlNet(ControlNetConfig.from_diffusers(dict(n.config))), n) for n in nets]
    return unet.requires_grad_(False), [n.requires_grad_(False) for n in nets], ours, our_nets


def inputs(size: int, units: int):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, size // 8, size // 8, generator=g)
    context = torch.randn(2, TEXT_TOKENS, SD15_UNET["cross_attention_dim"], generator=g)
    hints = [torch.rand(1, 3, size, size, generator=g) for _ in range(units)]
    return x, torch.tensor([500.0]), context, hints


def diffusers_step(unet, nets, units: int):
    from diffusers.models.controlnets.multicontrolnet import MultiControlNetModel

    multi = MultiControlNetModel(nets[:units]) if units > 1 else None

    def step(x, t, context, hints):
        if not units:
            return unet(x, t, encoder_hidden_states=context, return_dict=False)[0]
        cond = [h.expand(2, -1, -1, -1) for h in hints[:units]]  # (the pipeline repeats the image for CFG)
        net = multi if multi is not None else nets[0]
        down, mid = net(x, t, encoder_hidden_states=context, controlnet_cond=cond if multi is not None else cond[0],
                        conditioning_scale=[1.0] * units if multi is not None else 1.0, return_dict=False)
        return unet(x, t, encoder_hidden_states=context, down_block_additional_residuals=down,
                    mid_block_additional_residual=mid, return_dict=False)[0]

    return step


def ldm_step(unet, nets, units: int):
    from PIL import Image

    from ldm.pipelines.control import Unit, with_controls
    from ldm.pipelines.request import Control

    blank = Image.new("RGB", (8, 8))

    def step(x, t, context, hints):
        if not units:
            return unet(x, t, context=context)
        made = [Unit(Control(net, blank), net, hint) for net, hint in zip(nets[:units], hints, strict=False)]
        return with_controls(unet, made, calls=1, guided=True)(x, t, context=context)

    return step


def load_line(before, after, wall) -> str:
    busy = others_cores(before, after, wall)
    return (f"load average {Path('/proc/loadavg').read_text().split()[0]}, other processes kept "
            f"{busy:.2f} cores busy" if busy is not None else "")


def measure(steps: dict, size: int, repeats: int, max_units: int) -> dict:
    """Median seconds per step of each (impl, units), timed interleaved after one warm-up step each."""
    times = {key: [] for key in steps}
    feeds = {units: inputs(size, units) for units in range(max_units + 1)}
    with torch.inference_mode():
        for key, step in steps.items():
            step(*feeds[key[1]])
        for repeat in range(repeats):
            order = list(steps) if repeat % 2 == 0 else list(reversed(steps))
            for key in order:
                start = time.perf_counter()
                steps[key](*feeds[key[1]])
                times[key].append(time.perf_counter() - start)
    return {key: statistics.median(v) for key, v in times.items()}


def check_same(ours, theirs, plain) -> tuple[float, float]:
    """(ldm against diffusers, two units; the units' effect on ldm's output): max |difference| / max |reference|."""
    feed = inputs(256, 2)
    with torch.inference_mode():
        a, b, c = ours(*feed), theirs(*feed), plain(*feed)
    return ((a - b).abs().max() / b.abs().max()).item(), ((a - c).abs().max() / c.abs().max()).item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--units", type=int, default=2, choices=[1, 2])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--fast", action="store_true", help="accelerate ldm's UNet and ControlNets (no compile)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; building SD 1.5-size UNet and "
          f"{args.units} ControlNets…", flush=True)
    unet, nets, ours, our_nets = build(args.units)
    if args.fast:  # what accelerate(pipe, compile=False) does to the UNet on the CPU, and accelerate_like to each unit
        from ldm.speed.accelerate import fuse_projections, use_winograd

        for module in (ours, *our_nets):
            fuse_projections(module)
            use_winograd(module)
            module.to(memory_format=torch.channels_last)
    steps = {}
    for units in range(args.units + 1):
        steps["ldm", units] = ldm_step(ours, our_nets, units)
        steps["diffusers", units] = diffusers_step(unet, nets, units)
    same, effect = check_same(steps["ldm", args.units], steps["diffusers", args.units], steps["ldm", 0])
    print(f"{args.units} units at 256²: ldm against diffusers, max |difference| / max |diffusers| = {same:.2e} "
          f"(the units change the UNet's output by {effect:.0%} of its max)", flush=True)
    side = "ldm-fast" if args.fast else "ldm"
    for size in args.sizes:
        before, wall0 = cpu_jiffies(), time.perf_counter()
        median = measure(steps, size, args.repeats, args.units)
        load = load_line(before, cpu_jiffies(), time.perf_counter() - wall0)
        print(f"\n{size}²  (batch 2, {args.repeats} timed steps each; {load})")
        print(f"  {'units':>5}  {side + ' s/step':>14}  {'diffusers s/step':>16}  {side + ' / diffusers':>18}  "
              f"{'ControlNets share (ldm, diffusers)':>34}")
        for units in range(args.units + 1):
            ldm_s, ref_s = median["ldm", units], median["diffusers", units]
            share = (f"{1 - median['ldm', 0] / ldm_s:.0%}, {1 - median['diffusers', 0] / ref_s:.0%}"
                     if units else "—")
            print(f"  {units:>5}  {ldm_s:>14.3f}  {ref_s:>16.3f}  {ldm_s / ref_s:>18.3f}  {share:>34}", flush=True)


if __name__ == "__main__":
    main()
