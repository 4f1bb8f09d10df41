"""Benchmark (a script, not a test: pytest collects test_*.py only): what an IP-Adapter adds on the CPU (issue 30), per
denoising step and per image, ldm against diffusers on the same full-size random weights.

    python tests/bench_ip_adapter.py                          # 256², 5 timed repeats (about 3 minutes on 2 quiet cores)
    python tests/bench_ip_adapter.py --sizes 256 512 --repeats 5
    python tests/bench_ip_adapter.py --kinds plain --threads 4

The weights: diffusers' `UNet2DConditionModel` from SD 1.5's config (tests/bench_controlnet.py's `build`: ldm's `UNet`
holds the very same tensors); two adapters of random tensors in the h94/IP-Adapter layouts for it, plain
(`ip-adapter_sd15`: a linear layer to 4 tokens of 768, LayerNorm) and Plus (`ip-adapter-plus_sd15`: the perceiver
resampler, 16 queries of 768, depth 4, 12 heads, feed-forward 3072), each with its 16 `to_k_ip`/`to_v_ip` pairs; and
a CLIP ViT-H/14 image encoder of the real architecture (transformers' `CLIPVisionModelWithProjection`: hidden 1280,
32 layers, 16 heads, MLP 5120, patch 14, 224 px, projection 1024; 632M parameters, its own random init), whose
tensors ldm's `CLIPVisionModelWithProjection` shares. diffusers loads each adapter as `load_ip_adapter` does
(`UNet2DConditionModel._load_ip_adapter_weights`: `IPAdapterAttnProcessor2_0` and `MultiIPAdapterImageProjection`);
ldm as `ldm.pipelines.image_prompts` does (`ldm.loading.ip_adapters.ip_adapter_config`, `IPAdapter`).

Per step (batch 2, classifier-free guidance): a UNet call with the adapter minus one without (the fastest of the
repeats of each: load only ever adds time, and a difference of medians drowns in it). ldm's is its UNet
inside `decoupled_attention` with the image tokens, which a run projects once per image; diffusers' the call its
pipeline makes with `added_cond_kwargs={"image_embeds": …}`, which projects the encoding inside every UNet call
(src/diffusers/models/unets/unet_2d_condition.py `process_encoder_hidden_states`, v0.42): for Plus the resampler runs
at each step there. Per image: the encoder, from the PIL image (CLIPImageProcessor's preprocessing and, for Plus,
the second call on the zero image for the negative): ldm's `encode_references`, diffusers' pipeline `encode_image`;
ldm's projection of [negative; positive], once per image, is printed beside it.

Both sides run in this one process, interleaved (each repeat runs every configuration of both in turn, the order
alternating), so a change of load falls on both alike: read the ratios, not the seconds. Before timing, the outputs
are compared (the encodings, and the UNet's noise prediction with each adapter at 256²). The load average and the
cores other processes kept busy (/proc/stat, less this process) are printed beside each block of figures.
"""

import argparse
import os
import statistics
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_controlnet import SD15_UNET, TEXT_TOKENS, build, load_line  # noqa: E402
from bench_few_step import cpu_jiffies  # noqa: E402
from test_ip_adapter import RandomState  # noqa: E402  (random tensors in the official layouts, seeded)

VIT_H = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 16,
         "patch_size": 14, "image_size": 224, "projection_dim": 1024, "hidden_act": "gelu", "layer_norm_eps": 1e-5}
PLUS = {"tokens": 16, "hidden": 768, "depth": 4, "heads": 12, "ff": 3072}  # ip-adapter-plus_sd15's resampler
CROSS = SD15_UNET["cross_attention_dim"]


def adapter_state(kind: str, widths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """The flat keys of ip-adapter_sd15 (plain) or ip-adapter-plus_sd15 (plus), random, for cross-attentions of
    `widths` in diffusers' order."""
    state = RandomState(seed)
    for i, width in enumerate(widths):
        state.linear(f"ip_adapter.{2 * i + 1}.to_k_ip", width, CROSS, bias=False)
        state.linear(f"ip_adapter.{2 * i + 1}.to_v_ip", width, CROSS, bias=False)
    if kind == "plain":
        state.linear("image_proj.proj", 4 * CROSS, VIT_H["projection_dim"])
        state.norm("image_proj.norm", CROSS)
        return dict(state)
    h, inner = PLUS["hidden"], PLUS["heads"] * 64
    state["image_proj.latents"] = state.rand(1, PLUS["tokens"], h, scale=h ** -0.5)
    state.linear("image_proj.proj_in", h, VIT_H["hidden_size"])
    state.linear("image_proj.proj_out", CROSS, h)
    state.norm("image_proj.norm_out", CROSS)
    for n in range(PLUS["depth"]):
        layer = f"image_proj.layers.{n}"
        state.norm(f"{layer}.0.norm1", h)
        state.norm(f"{layer}.0.norm2", h)
        state.linear(f"{layer}.0.to_q", inner, h, bias=False)
        state.linear(f"{layer}.0.to_kv", 2 * inner, h, bias=False)
        state.linear(f"{layer}.0.to_out", h, inner, bias=False)
        state.norm(f"{layer}.1.0", h)
        state.linear(f"{layer}.1.1", PLUS["ff"], h, bias=False)
        state.linear(f"{layer}.1.3", h, PLUS["ff"], bias=False)
    return dict(state)


def build_encoders():
    """(transformers' ViT-H/14 CLIPVisionModelWithProjection, ldm's holding the same tensors)."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    from ldm.loading.files import load_module
    from ldm.networks import clip

    torch.manual_seed(0)
    theirs = CLIPVisionModelWithProjection(CLIPVisionConfig(**VIT_H)).eval().requires_grad_(False)
    state = {k: v for k, v in theirs.state_dict().items() if not k.endswith("position_ids")}
    cfg = clip.CLIPVisionConfig.from_transformers(theirs.config.to_dict())
    ours = load_module(lambda: clip.CLIPVisionModelWithProjection(cfg), state, Path("ViT-H-14"), "CLIP image encoder")
    return theirs, ours


def build_adapters(unet, kinds):
    """{kind: (diffusers' attention processors and projection for `unet`, ldm's IPAdapter)}; `unet` left plain."""
    from ldm.loading.files import load_module
    from ldm.loading.ip_adapters import ip_adapter_config
    from ldm.networks.ip_adapter import IPAdapter

    plain_processors = dict(unet.attn_processors)
    names = [n[: -len(".processor")] for n in plain_processors if n.endswith("attn2.processor")]
    widths = [unet.get_submodule(n).to_q.out_features for n in names]
    built = {}
    for seed, kind in enumerate(kinds):
        state = adapter_state(kind, widths, seed + 10)
        split = {part: {k[len(part) + 1:]: v for k, v in state.items() if k.startswith(part + ".")}
                 for part in ("image_proj", "ip_adapter")}
        unet._load_ip_adapter_weights([split])
        diffusers_side = (dict(unet.attn_processors), unet.encoder_hid_proj)
        cfg = ip_adapter_config(Path(kind), state)
        built[kind] = diffusers_side, load_module(lambda cfg=cfg: IPAdapter(cfg), state, Path(kind), "IP-Adapter")
    unet.encoder_hid_proj = None  # (its config keeps encoder_hid_dim_type "ip_image_proj": inert without it)
    unet.set_attn_processor(plain_processors)
    return built


def reference_image(seed: int = 0) -> Image.Image:
    """A non-square photo-like image (the preprocessing resizes and crops it)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:300, 0:400]
    base = np.stack([x * 0.6, y * 0.8, (x + y) * 0.3], -1) % 256
    return Image.fromarray((base + rng.integers(0, 40, base.shape)).clip(0, 255).astype(np.uint8))


def encoders(theirs, ours, adapters):
    """{(impl, kind): encode(image) → (positive, negative) features}: what each pipeline computes per image."""
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPImageProcessor

    from ldm.pipelines.image_prompts import encode_references

    processor = CLIPImageProcessor(size=VIT_H["image_size"], crop_size=VIT_H["image_size"])
    pipeline = SimpleNamespace(image_encoder=theirs, feature_extractor=processor)

    def diffusers_encode(kind):
        return lambda image: StableDiffusionPipeline.encode_image(pipeline, image, "cpu", 1, kind != "plain")

    def ldm_encode(kind):
        return lambda image: encode_references(ours, adapters[kind][1], [image])

    return {key: maker(kind) for kind in adapters for key, maker in
            ((("ldm", kind), ldm_encode), (("diffusers", kind), diffusers_encode))}


def unet_steps(unet, ours, adapters, features):
    """{(impl, kind or None): (prepare() → a context to call in, step(x, t, context))}: UNet calls, the adapter
    set up (untimed) as each pipeline has it during its denoising loop."""
    from ldm.adapters.ip_adapter import ImageTokens, decoupled_attention

    def diffusers_side(kind):
        def prepare():
            processors, projection = adapters[kind][0] if kind else (plain, None)
            unet.encoder_hid_proj = projection  # (first: Plus's resampler has attention processors of its own)
            unet.set_attn_processor(dict(processors))  # (set_attn_processor pops from the dict it is given)
            return ExitStack()

        def step(x, t, context):
            extra = {"added_cond_kwargs": {"image_embeds": [diffusers_embeds[kind]]}} if kind else {}
            return unet(x, t, encoder_hidden_states=context, return_dict=False, **extra)[0]

        return prepare, step

    def ldm_side(kind):
        def prepare():  # the tokens as `prepare_image_prompt` makes them, once per image: [negative; positive]
            if kind is None:
                return ExitStack()
            return decoupled_attention(ours, [ImageTokens(adapters[kind][1], ldm_tokens[kind], 1.0)])

        return prepare, lambda x, t, context: ours(x, t, context=context)

    plain = dict(unet.attn_processors)
    diffusers_embeds, ldm_tokens = {}, {}
    with torch.inference_mode():
        for kind in adapters:
            positive, negative = features["diffusers", kind]  # diffusers' layout: (2, images, …)
            diffusers_embeds[kind] = torch.cat([negative[None], positive[None]])
            positive, negative = features["ldm", kind]
            adapter = adapters[kind][1]
            ldm_tokens[kind] = torch.cat([adapter(negative), adapter(positive)])
    return {key: side(kind) for kind in (None, *adapters)
            for key, side in ((("ldm", kind), ldm_side), (("diffusers", kind), diffusers_side))}


def step_inputs(size: int):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(2, 4, size // 8, size // 8, generator=g), torch.tensor([500.0]),
            torch.randn(2, TEXT_TOKENS, CROSS, generator=g))


def interleaved(calls: dict, repeats: int) -> dict:
    """The seconds of each call at each repeat (prepare untimed), timed interleaved after one warm-up call each."""
    times = {key: [] for key in calls}
    with torch.inference_mode():
        for repeat in range(-1, repeats):
            for key in list(calls) if repeat % 2 == 0 else list(reversed(calls)):
                prepare, call = calls[key]
                with prepare():
                    start = time.perf_counter()
                    call()
                    elapsed = time.perf_counter() - start
                if repeat >= 0:
                    times[key].append(elapsed)
    return times


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def compare(features, steps, kinds) -> None:
    """ldm against diffusers: the encodings, then the UNet's output with each adapter (and the adapter's effect)."""
    x, t, context = step_inputs(256)
    with torch.inference_mode():
        outputs = {}
        for key, (prepare, step) in steps.items():
            with prepare():
                outputs[key] = step(x, t, context)
    for kind in kinds:
        (ours_pos, ours_neg), (their_pos, their_neg) = features["ldm", kind], features["diffusers", kind]
        print(f"{kind}: encodings ldm against diffusers, max |difference| / max |diffusers| = "
              f"{rel(ours_pos, their_pos):.1e} (positive), {rel(ours_neg, their_neg) if their_neg.any() else 0:.1e} "
              f"(negative); UNet output at 256² {rel(outputs['ldm', kind], outputs['diffusers', kind]):.1e} (the "
              f"adapter changes it by {rel(outputs['ldm', kind], outputs['ldm', None]):.0%} of its max)", flush=True)


def print_steps(times: dict, kinds, size: int, repeats: int, load: str) -> None:
    """Medians of each configuration; the adapter's cost from the fastest call of each (other processes only ever add
    time to a call, so the fastest is the least disturbed), as seconds and as a share of the step with it."""
    median = {key: statistics.median(v) for key, v in times.items()}

    def added(impl, kind) -> tuple[float, float]:
        fastest, without = min(times[impl, kind]), min(times[impl, None])
        return fastest - without, 1 - without / fastest

    print(f"\nper step, {size}² (batch 2, median of {repeats} after a warm-up; {load})")
    print(f"  {'adapter':>7}  {'ldm s/step':>10}  {'diffusers s/step':>16}  {'ldm / diffusers':>15}  "
          f"{'adapter ms/step (ldm, diffusers)':>32}  {'% of a step (ldm, diffusers)':>28}")
    for kind in (None, *kinds):
        ours, theirs = median["ldm", kind], median["diffusers", kind]
        (ours_ms, ours_share), (theirs_ms, theirs_share) = added("ldm", kind), added("diffusers", kind)
        extra = "—" if kind is None else f"{ours_ms * 1e3:.0f}, {theirs_ms * 1e3:.0f}"
        share = "—" if kind is None else f"{ours_share:.1%}, {theirs_share:.1%}"
        print(f"  {kind or 'none':>7}  {ours:>10.3f}  {theirs:>16.3f}  {ours / theirs:>15.3f}  {extra:>32}  "
              f"{share:>28}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256], help="image sides for the per-step figures")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each configuration (after a warm-up)")
    parser.add_argument("--kinds", nargs="+", default=["plain", "plus"], choices=["plain", "plus"])
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; building the SD 1.5-size UNet, "
          f"the ViT-H/14 encoder and the {' and '.join(args.kinds)} adapters…", flush=True)
    unet, _, ours, _ = build(0)
    theirs_encoder, our_encoder = build_encoders()
    adapters = build_adapters(unet, args.kinds)
    image = reference_image()
    encode = encoders(theirs_encoder, our_encoder, adapters)
    with torch.inference_mode():
        features = {key: fn(image) for key, fn in encode.items()}
    steps = unet_steps(unet, ours, adapters, features)
    compare(features, steps, args.kinds)

    calls = {key: (ExitStack, lambda fn=fn: fn(image)) for key, fn in encode.items()}
    for kind in args.kinds:  # ldm's projection of [negative; positive], once per image
        positive, negative = features["ldm", kind]
        calls["projection", kind] = ExitStack, lambda a=adapters[kind][1], p=positive, n=negative: (a(n), a(p))
    before, wall = cpu_jiffies(), time.perf_counter()
    median = {key: statistics.median(v) for key, v in interleaved(calls, args.repeats).items()}
    load = load_line(before, cpu_jiffies(), time.perf_counter() - wall)
    print(f"\nper image, the ViT-H/14 encoder from a PIL image (median of {args.repeats}; {load})")
    print(f"  {'adapter':>7}  {'ldm ms':>8}  {'diffusers ms':>12}  {'ldm / diffusers':>15}  "
          f"{'ldm projection ms (once per image)':>34}")
    for kind in args.kinds:
        ours_s, theirs_s = median["ldm", kind], median["diffusers", kind]
        print(f"  {kind:>7}  {ours_s * 1e3:>8.0f}  {theirs_s * 1e3:>12.0f}  {ours_s / theirs_s:>15.3f}  "
              f"{median['projection', kind] * 1e3:>34.1f}", flush=True)

    for size in args.sizes:
        feed = step_inputs(size)
        calls = {key: (prepare, lambda step=step, feed=feed: step(*feed)) for key, (prepare, step) in steps.items()}
        before, wall = cpu_jiffies(), time.perf_counter()
        times = interleaved(calls, args.repeats)
        load = load_line(before, cpu_jiffies(), time.perf_counter() - wall)
        print_steps(times, args.kinds, size, args.repeats, load)


if __name__ == "__main__":
    main()
