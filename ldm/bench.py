"""`ldm bench`: ldm against diffusers on identical weights, size, steps and sampler, in one run.

Without `--model` it writes a full-size SD 1.5 or SDXL base folder in the official layout with random
weights (official configs, key names and file names; cached under ~/.cache/ldm/bench). Each measured
configuration runs in a fresh subprocess, so that load time is measured from process start and peak RSS
is that configuration's own: ldm and diffusers, eager and (with --compile) compiled. Timings:

- load: process start → pipeline ready; to first step: process start → the first UNet call begins (the
  prompt encoded, the latents drawn); first step: process start → the first denoising step done;
- text encode (prompt and negative), UNet step (classifier-free guidance: batch 2, the median of the
  timed steps after a warm-up), VAE decode (one image), end to end (a whole second generation);
- peak RSS of the process, and the weight bytes for scale.

The table prints each number and the ratio ldm / diffusers. Nothing here is asserted: BENCHMARKS.md records
what was measured, where, with which command.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

START = time.monotonic()  # the runner subprocess imports this module first

SD15 = {
    "unet": {"_class_name": "UNet2DConditionModel", "act_fn": "silu", "attention_head_dim": 8,
             "block_out_channels": [320, 640, 1280, 1280], "center_input_sample": False, "cross_attention_dim": 768,
             "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                  "DownBlock2D"], "downsample_padding": 1, "flip_sin_to_cos": True, "freq_shift": 0,
             "in_channels": 4, "layers_per_block": 2, "mid_block_scale_factor": 1, "norm_eps": 1e-05,
             "norm_num_groups": 32, "out_channels": 4, "sample_size": 64,
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]},
    "text_encoder": {"architectures": ["CLIPTextModel"], "hidden_act": "quick_gelu", "hidden_size": 768,
                     "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12,
                     "max_position_embeddings": 77, "vocab_size": 49408, "model_type": "clip_text_model",
                     "projection_dim": 768},
    "scheduler": "PNDMScheduler", "pipeline": "StableDiffusionPipeline",
}
SDXL = {
    "unet": {"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20],
             "block_out_channels": [320, 640, 1280], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "sample_size": 128,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816},
    "text_encoder": SD15["text_encoder"],
    "text_encoder_2": {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu", "hidden_size": 1280,
                       "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
                       "max_position_embeddings": 77, "vocab_size": 49408, "model_type": "clip_text_model",
                       "projection_dim": 1280},
    "scheduler": "EulerDiscreteScheduler", "pipeline": "StableDiffusionXLPipeline",
}
ARCHITECTURES = {"sd15": SD15, "sdxl": SDXL}


def write_random_folder(root: Path, arch: str) -> Path:
    """A full-size folder of `arch` in the official layout, random weights (ldm's module names are the
    official ones, so ldm's own modules write it)."""
    import torch
    from safetensors.torch import save_file

    from .clip import CLIPTextConfig, CLIPTextModel
    from .families import FAMILIES
    from .tokenizer import EOS, write_tokenizer_folder
    from .unet import UNet, UNetConfig
    from .vae import VAE, VAEConfig

    spec = ARCHITECTURES[arch]
    if (root / "model_index.json").is_file():
        return root
    family = FAMILIES["sdxl" if arch == "sdxl" else "sd1"]
    vae = {"_class_name": "AutoencoderKL", "act_fn": "silu", "block_out_channels": [128, 256, 512, 512],
           "in_channels": 3, "out_channels": 3, "latent_channels": 4, "layers_per_block": 2, "norm_num_groups": 32,
           "sample_size": family.sample_size * 8, "scaling_factor": family.vae_scaling_factor,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
    towers = [t for t in ("text_encoder", "text_encoder_2") if t in spec]
    torch.manual_seed(0)
    parts = {"unet": (spec["unet"], UNet(UNetConfig.from_diffusers(spec["unet"])), "diffusion_pytorch_model"),
             "vae": (vae, VAE(VAEConfig.from_diffusers(vae)), "diffusion_pytorch_model")}
    for t in towers:
        parts[t] = (spec[t], CLIPTextModel(CLIPTextConfig.from_transformers(spec[t])), "model")
    for name, (config, module, stem) in parts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        (root / name / "config.json").write_text(json.dumps(config, indent=2))
        state = {k: v.contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(root / name / f"{stem}.safetensors"), metadata={"format": "pt"})
    for t in towers:
        write_tokenizer_folder(root / t.replace("text_encoder", "tokenizer"), EOS if t == "text_encoder" else "!")
    (root / "scheduler").mkdir(exist_ok=True)
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps(family.scheduler, indent=2))
    index = {"_class_name": spec["pipeline"], "scheduler": ["diffusers", spec["scheduler"]],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    for t in towers:
        cls = spec[t]["architectures"][0]
        index |= {t: ["transformers", cls], t.replace("text_encoder", "tokenizer"): ["transformers", "CLIPTokenizer"]}
    (root / "model_index.json").write_text(json.dumps(index, indent=2))
    return root


# --------------------------------------------------------------------------------- one configuration


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def median_time(fn, repeats: int) -> float:
    import torch

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def run_one(impl: str, model: str, size: int, steps: int, sampler: str, compile: bool, device: str,
            dtype: str, repeats: int) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess by `bench`)."""
    import torch

    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    first_step = {}

    def mark_first(*args):  # ldm: callback(i, x); diffusers: callback_on_step_end(pipe, i, t, callback_kwargs)
        first_step.setdefault("t", time.monotonic() - START)
        return args[3] if impl == "diffusers" else None

    def mark_start(*args):  # a forward pre-hook on the UNet the pipeline calls (outside any compiled graph)
        first_step.setdefault("start", time.monotonic() - START)

    prompt, negative = "a photograph of an astronaut riding a horse", "blurry"
    latent = size // 8
    if impl == "ldm":
        from .fast import accelerate
        from .pipeline import StableDiffusion

        pipe = StableDiffusion.from_pretrained(model, device=device, dtype=dtype, safety_checker=False)
        if compile:
            accelerate(pipe)
        load = time.monotonic() - START
        cfg = pipe.unet.config
        unet, vae_decode = pipe.unet, lambda z: pipe.vae.decode(z)
        xl = hasattr(pipe, "text_encoder_2")

        def encode():
            return pipe.conditioning([prompt], [negative], 1, True, (size, size), {})

        def generate(callback=None):
            return pipe(prompt, negative, steps=steps, sampler=sampler, width=size, height=size, seed=0,
                        callback=callback)

        def unet_call():
            cond, uncond = conds
            batched = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
            return unet(x, 500.0, **batched)
    else:
        import diffusers

        from .samplers import SAMPLERS

        index = json.loads((Path(model) / "model_index.json").read_text())
        cls = getattr(diffusers, index["_class_name"])
        kwargs = {} if "XL" in index["_class_name"] else {"safety_checker": None, "requires_safety_checker": False}
        pipe = cls.from_pretrained(model, torch_dtype=dt, **kwargs).to(device)
        pipe.set_progress_bar_config(disable=True)
        pipe.scheduler = getattr(diffusers, SAMPLERS[sampler].diffusers_class).from_config(pipe.scheduler.config)
        if compile:  # as diffusers' documentation recommends
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
            mode = "max-autotune" if device == "cuda" else None
            pipe.unet = torch.compile(pipe.unet, mode=mode, fullgraph=True)
            pipe.vae.decode = torch.compile(pipe.vae.decode, mode=mode, fullgraph=True)
        load = time.monotonic() - START
        cfg = pipe.unet.config
        xl = hasattr(pipe, "text_encoder_2")

        def encode():
            return pipe.encode_prompt(prompt, device, 1, True, negative) if not xl else pipe.encode_prompt(
                prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                negative_prompt=negative)

        def generate(callback=None):
            return pipe(prompt, negative_prompt=negative, num_inference_steps=steps, height=size, width=size,
                        generator=torch.Generator("cpu").manual_seed(0), output_type="pil",
                        callback_on_step_end=callback)

        def vae_decode(z):
            return pipe.vae.decode(z).sample

        def unet_call():
            extra = {}
            if xl:
                extra = {"added_cond_kwargs": {"text_embeds": torch.randn(2, 1280, device=device, dtype=dt),
                                               "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                                                        device=device, dtype=dt)}}
            return pipe.unet(x, torch.tensor(500.0, device=device), context, **extra).sample

    x = torch.randn(2, cfg.in_channels, latent, latent, device=device, dtype=dt)
    context = torch.randn(2, 77, cfg.cross_attention_dim, device=device, dtype=dt)
    z = torch.randn(1, 4, latent, latent, device=device, dtype=dt)
    with torch.no_grad():
        hook = pipe.unet.register_forward_pre_hook(mark_start)
        generate(mark_first)  # warm-up: compiles when compiling; the first step of the process is marked
        hook.remove()
        conds = encode() if impl == "ldm" else None
        result = {"impl": impl, "compile": compile, "load_s": load, "to_first_step_s": first_step.get("start"),
                  "first_step_s": first_step.get("t"),
                  "text_encode_s": median_time(encode, repeats),
                  "unet_step_s": median_time(unet_call, repeats),
                  "vae_decode_s": median_time(lambda: vae_decode(z), repeats),
                  "end_to_end_s": median_time(generate, 1),
                  "peak_rss_gib": _peak_rss_bytes() / 2**30}
    return result


# ----------------------------------------------------------------------------------------- driver


def bench(model: str | None, arch: str, size: int, steps: int, sampler: str, compile: bool, device: str,
          dtype: str, repeats: int, diffusers: bool, log=print) -> list[dict]:
    if model is None:
        root = Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm") / "bench" / f"{arch}-random"
        log(f"writing a full-size random {arch} folder in the official layout to {root} (once)…")
        model = str(write_random_folder(root, arch))
    weight_bytes = sum(p.stat().st_size for p in Path(model).rglob("*.safetensors") if ".fp16." not in p.name)
    configs = [(impl, c) for c in ([False, True] if compile else [False])
               for impl in (["ldm", "diffusers"] if diffusers else ["ldm"])]
    rows = []
    for impl, c in configs:
        log(f"running {impl}{' compiled' if c else ''}…")
        args = [sys.executable, "-m", "ldm.bench", impl, model, str(size), str(steps), sampler, str(int(c)), device,
                dtype, str(repeats)]
        proc = subprocess.run(args, capture_output=True, text=True)
        if proc.returncode != 0:
            log(f"{impl} failed:\n{proc.stderr[-3000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"weight_gib": weight_bytes / 2**30})
    return rows


METRICS = [("load_s", "load (s)"), ("to_first_step_s", "to first step (s)"), ("first_step_s", "first step (s)"),
           ("text_encode_s", "text encode (s)"),
           ("unet_step_s", "UNet step (s)"), ("vae_decode_s", "VAE decode (s)"), ("end_to_end_s", "end to end (s)"),
           ("peak_rss_gib", "peak RSS (GiB)")]


def table(rows: list[dict]) -> str:
    """Markdown: one column per configuration, and ldm/diffusers ratios for each mode measured on both."""
    names = [f"{r['impl']}{' compiled' if r['compile'] else ''}" for r in rows]
    lines = ["| metric | " + " | ".join(names) + " | " + " | ".join(
        f"ldm/diffusers{' compiled' if c else ''}" for c in sorted({r["compile"] for r in rows})) + " |"]
    lines.append("|---" * (1 + len(names) + len({r["compile"] for r in rows})) + "|")
    for key, label in METRICS:
        cells = [f"{r[key]:.3f}" if r.get(key) is not None else "-" for r in rows]
        ratios = []
        for c in sorted({r["compile"] for r in rows}):
            pair = {r["impl"]: r.get(key) for r in rows if r["compile"] == c}
            ok = pair.get("ldm") and pair.get("diffusers")
            ratios.append(f"{pair['ldm'] / pair['diffusers']:.2f}" if ok else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " | " + " | ".join(ratios) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    impl, model, size, steps, sampler, compiled, device, dtype, repeats = sys.argv[1:]
    print(json.dumps(run_one(impl, model, int(size), int(steps), sampler, compiled == "1", device, dtype,
                             int(repeats))))
