"""`ldm bench`: ldm against diffusers on identical weights, size, steps and sampler, in one run.

Without `--model` it writes a full-size SD 1.5 or SDXL base folder in the official layout with random
weights (official configs, key names and file names; cached under ~/.cache/ldm/bench). Each measured
configuration runs in a fresh subprocess, so that load time is measured from process start and peak RSS
is that configuration's own. The modes (`BENCH_MODES`, `--mode`), for ldm as the command line runs them:

- eager: no CUDA graph, no compile (`ldm generate` on the CPU; `--no-cuda-graph` on CUDA, where
  `accelerate` still fuses the attention projections and makes the networks channels_last);
- graph: CUDA only, `ldm generate`'s default there: the UNet step replayed as a CUDA graph (`ldm.speed.accelerate`);
- compile: `--compile` (inductor's default mode; on CUDA under the CUDA graph, on the CPU with freezing);
- max: `--compile --compile-mode max` (max-autotune);
- model-offload, sequential-offload: CUDA only, `--offload model` / `--offload sequential` (`ldm.speed.offload`: the
  weights on the CPU, each network, or each layer, brought to the GPU to run); the row to read is peak GPU memory.

diffusers runs what its documentation recommends for the same intent (`DIFFUSERS_MODE`): eager for eager
and graph (it has no CUDA-graph path without compile), regional compilation (`compile_repeated_blocks`,
the compile its docs give for a short cold start) for compile, and its max-autotune recipe (channels_last,
its inductor flags, UNet and VAE decode compiled) for max, `enable_model_cpu_offload()` /
`enable_sequential_cpu_offload()` for the offload modes. Timings:

- load: process start → pipeline ready; to first step: process start → the first UNet call begins (the
  prompt encoded, the latents drawn); first step: process start → the first denoising step done (on CUDA,
  synchronised); to first image: process start → the first image out (PIL);
- compile/capture: the first generation's time less a later one's (torch.compile, CUDA-graph capture,
  cuDNN and lazy initialisation: what a user waits for once);
- text encode (prompt and negative), UNet step (classifier-free guidance: batch 2, the median of the
  timed steps after a warm-up), VAE decode (one image, in the VAE's own dtype: the SDXL VAE runs in fp32),
  end to end (a whole later generation);
- on CUDA, UNet step GPU: the device's time for one step by CUDA events, the stream held by a spin kernel
  until the host has queued the whole step, so that launch gaps are not counted: wall well above it means
  the step is bound by the host (Python, kernel launches); and the peak GPU memory allocated, and reserved by
  PyTorch's caching allocator (the process's footprint on the device);
- peak RSS of the process, and the weight bytes for scale.

The table prints each number and the ratio ldm / diffusers for each ldm mode against diffusers' counterpart.
Nothing here is asserted: BENCHMARKS.md records what was measured, where, with which command.
"""

import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from ldm.choices import BENCH_MODES

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

    from ldm.loading.families import FAMILIES
    from ldm.networks.clip import CLIPTextConfig, CLIPTextModel
    from ldm.networks.tokenizer import EOS, write_tokenizer_folder
    from ldm.networks.unet import UNet, UNetConfig
    from ldm.networks.vae import VAE, VAEConfig

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
    """This process's peak resident set. Linux's VmHWM starts afresh at exec; `ru_maxrss` (the fallback) keeps
    the parent's peak across fork and exec, so it floors a small child at the size of the `ldm bench` process."""
    import resource

    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
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


def gpu_time(fn, repeats: int, wall: float) -> float:
    """The median device time of `fn()` by CUDA events. A spin kernel (`torch.cuda._sleep`) of about twice
    `wall` holds the stream while the host queues the call, so that the events time the kernels back to back
    rather than the host's launch gaps. A call that waits for the device inside (a host sync) counts its gaps
    again: then the figure lies between the GPU time and the wall time."""
    import torch

    clock_hz = torch.cuda.get_device_properties(torch.cuda.current_device()).clock_rate * 1e3 or 2e9
    times = []
    for _ in range(repeats):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(int(2 * wall * clock_hz))
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


OFFLOAD_OF_MODE = {"model-offload": "model", "sequential-offload": "sequential"}
DIFFUSERS_MODE = {"eager": "eager", "graph": "eager", "compile": "compile", "max": "max",
                  "model-offload": "model-offload", "sequential-offload": "sequential-offload"}
LDM_COMPILE = ({"eager": False, "graph": False, "compile": "default", "max": "max"}
               | dict.fromkeys(OFFLOAD_OF_MODE, False))


def check_mode(mode: str, device: str) -> None:
    if mode not in BENCH_MODES:
        raise ValueError(f"mode {mode!r}: one of {', '.join(BENCH_MODES)}")
    if mode == "graph" and device != "cuda":
        raise ValueError("mode 'graph' replays CUDA graphs: it needs --device cuda")
    if mode in OFFLOAD_OF_MODE and device != "cuda":
        raise ValueError(f"mode {mode!r} offloads to the CPU from a GPU: it needs --device cuda")


def setup_ldm(model: str, mode: str, device: str, dtype: str):
    """The pipeline as `ldm generate` loads it in `mode` (see the module notes)."""
    from ldm.pipelines.stable_diffusion import StableDiffusion
    from ldm.speed.accelerate import accelerate

    offload = OFFLOAD_OF_MODE.get(mode)
    pipe = StableDiffusion.from_pretrained(model, device="cpu" if offload else device, dtype=dtype,
                                           safety_checker=False)
    if offload:  # as `ldm generate --offload` loads it
        import torch

        from ldm.speed.offload import enable_offload

        pipe.device = torch.device(device)
        accelerate(pipe, compile=False, cuda_graph=False)
        enable_offload(pipe, offload, device)
        return pipe
    if mode != "eager" or device == "cuda":
        accelerate(pipe, compile=LDM_COMPILE[mode], cuda_graph=mode != "eager" if device == "cuda" else None)
    return pipe


def setup_diffusers(model: str, mode: str, device: str, dt, sampler: str):
    """The diffusers pipeline in `mode` as diffusers' documentation recommends (see the module notes)."""
    import diffusers
    import torch

    from ldm.sampling.samplers import SAMPLERS

    index = json.loads((Path(model) / "model_index.json").read_text())
    cls = getattr(diffusers, index["_class_name"])
    kwargs = {} if "XL" in index["_class_name"] else {"safety_checker": None, "requires_safety_checker": False}
    pipe = cls.from_pretrained(model, torch_dtype=dt, **kwargs)
    if mode == "model-offload":
        pipe.enable_model_cpu_offload(device=device)
    elif mode == "sequential-offload":
        pipe.enable_sequential_cpu_offload(device=device)
    else:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = getattr(diffusers, SAMPLERS[sampler].diffusers_class).from_config(pipe.scheduler.config)
    if mode in ("compile", "max"):
        pipe.unet.to(memory_format=torch.channels_last)
        pipe.vae.to(memory_format=torch.channels_last)
    if mode == "compile" and hasattr(pipe.unet, "compile_repeated_blocks"):  # regional: the repeated blocks
        pipe.unet.compile_repeated_blocks(fullgraph=True)
    elif mode == "compile":  # a diffusers before regional compilation
        pipe.unet = torch.compile(pipe.unet, fullgraph=True)
    elif mode == "max":  # diffusers' "accelerate inference" recipe
        import torch._inductor.config as inductor

        inductor.conv_1x1_as_mm = True
        inductor.coordinate_descent_tuning = True
        inductor.epilogue_fusion = False
        inductor.coordinate_descent_check_all_directions = True
        compile_mode = "max-autotune" if device == "cuda" else None
        pipe.unet = torch.compile(pipe.unet, mode=compile_mode, fullgraph=True)
        pipe.vae.decode = torch.compile(pipe.vae.decode, mode=compile_mode, fullgraph=True)
    return pipe


def ldm_vae_decode(pipe):
    """The VAE decode to time: latents in the VAE's own dtype, as the pipeline's decode casts them (the SDXL
    VAE is upcast to fp32 where the UNet runs in fp16: `ldm.loading.components.upcast_vae_dtype`)."""
    dtype = next(pipe.vae.parameters()).dtype
    return lambda z: pipe.vae.decode(z.to(dtype))


PROMPT, NEGATIVE = "a photograph of an astronaut riding a horse", "blurry"


class FirstStep:
    """The warm-up run's marks, in seconds from process start: `start` when the pipeline first calls the UNet
    (a forward pre-hook on the UNet the pipeline calls, outside any compiled graph), `t` when its first denoising
    step is done (a step callback; on CUDA, synchronised)."""

    def __init__(self, impl: str, cuda: bool):
        self.impl, self.cuda = impl, cuda
        self.start: float | None = None
        self.t: float | None = None

    def unet_called(self, *args) -> None:
        if self.start is None:
            self.start = time.monotonic() - START

    def step_done(self, *args):  # ldm: a step callback (Step); diffusers: callback_on_step_end(pipe, i, t, kwargs)
        if self.t is None:
            if self.cuda:
                import torch

                torch.cuda.synchronize()
            self.t = time.monotonic() - START
        return args[3] if self.impl == "diffusers" else None


@dataclass
class Calls:
    """What a configuration times, on its loaded pipeline."""

    encode: Callable[[], object]  # the prompt and the negative prompt
    generate: Callable[..., object]  # a whole generation; generate(callback) calls back after each step
    vae_decode: Callable[[object], object]  # latents of one image → its pixels
    unet_step: Callable[[dict], Callable[[], object]]  # the UNet inputs → one UNet call (made after the warm-up)


def ldm_calls(pipe, size: int, steps: int, sampler: str) -> Calls:
    """ldm's: the pipeline's text encoding, generation and VAE decode; the UNet on the encoded conditioning (both
    halves of classifier-free guidance, batched)."""
    import torch

    def encode():
        return pipe.conditioning([PROMPT], [NEGATIVE], 1, True, (size, size), {})

    def generate(callback=None):
        return pipe(PROMPT, NEGATIVE, steps=steps, sampler=sampler, width=size, height=size, seed=0,
                    callbacks=[callback] if callback else [])

    def unet_step(inputs: dict):
        cond, uncond = encode()
        batched = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        return lambda: pipe.unet(inputs["x"], 500.0, **batched)

    return Calls(encode, generate, ldm_vae_decode(pipe), unet_step)


def diffusers_calls(pipe, size: int, steps: int, device: str) -> Calls:
    """diffusers': `encode_prompt`, the pipeline call, the VAE decode in the VAE's dtype, the UNet on random
    conditioning."""
    import torch

    xl = hasattr(pipe, "text_encoder_2")

    def encode():
        return pipe.encode_prompt(PROMPT, device, 1, True, NEGATIVE) if not xl else pipe.encode_prompt(
            PROMPT, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
            negative_prompt=NEGATIVE)

    def generate(callback=None):
        return pipe(PROMPT, negative_prompt=NEGATIVE, num_inference_steps=steps, height=size, width=size,
                    generator=torch.Generator("cpu").manual_seed(0), output_type="pil",
                    callback_on_step_end=callback)

    def vae_decode(z):
        return pipe.vae.decode(z.to(pipe.vae.dtype)).sample

    def unet_step(inputs: dict):
        x, timestep, context, added = inputs["x"], inputs["timestep"], inputs["context"], inputs["added"]
        return lambda: pipe.unet(x, timestep, context, **added).sample

    return Calls(encode, generate, vae_decode, unet_step)


def unet_inputs(impl: str, pipe, size: int, device: str, dt) -> dict:
    """Random inputs at `size`: the UNet's latents and text context (batch 2: classifier-free guidance), one
    image's VAE latents, and for diffusers' SDXL UNet its added conditioning, made once, outside the timed call:
    no host→device copy inside it."""
    import torch

    cfg, latent = pipe.unet.config, size // 8
    inputs = {"x": torch.randn(2, cfg.in_channels, latent, latent, device=device, dtype=dt),
              "context": torch.randn(2, 77, cfg.cross_attention_dim, device=device, dtype=dt),
              "z": torch.randn(1, 4, latent, latent, device=device, dtype=dt),
              "timestep": torch.tensor(500.0, device=device), "added": {}}
    if impl == "diffusers" and hasattr(pipe, "text_encoder_2"):
        pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim  # 1280 in SDXL
        inputs["added"] = {"added_cond_kwargs": {"text_embeds": torch.randn(2, pooled, device=device, dtype=dt),
                                                 "time_ids": torch.tensor([[size, size, 0, 0, size, size]] * 2,
                                                                          device=device, dtype=dt)}}
    return inputs


def run_one(impl: str, model: str, size: int, steps: int, sampler: str, mode: str, device: str,
            dtype: str, repeats: int) -> dict:
    """Measure one configuration in this process (called in a fresh subprocess by `bench`)."""
    import torch

    check_mode(mode, device)
    cuda = device == "cuda"
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    marks = FirstStep(impl, cuda)
    if impl == "ldm":
        pipe = setup_ldm(model, mode, device, dtype)
        load = time.monotonic() - START
        calls = ldm_calls(pipe, size, steps, sampler)
    else:
        pipe = setup_diffusers(model, mode, device, dt, sampler)
        load = time.monotonic() - START
        calls = diffusers_calls(pipe, size, steps, device)
    inputs = unet_inputs(impl, pipe, size, device, dt)
    with torch.no_grad():
        hook = pipe.unet.register_forward_pre_hook(marks.unet_called)
        begin = time.monotonic()
        calls.generate(marks.step_done)  # warm-up: compiles, captures; marks the process's first step and image
        first_run, first_image = time.monotonic() - begin, time.monotonic() - START
        hook.remove()
        unet_call = calls.unet_step(inputs)
        unet_step = median_time(unet_call, repeats)
        result = {"impl": impl, "mode": mode, "load_s": load, "to_first_step_s": marks.start,
                  "first_step_s": marks.t, "to_first_image_s": first_image,
                  "text_encode_s": median_time(calls.encode, repeats),
                  "unet_step_s": unet_step,
                  "unet_step_gpu_s": gpu_time(unet_call, repeats, unet_step) if cuda else None,
                  "vae_decode_s": median_time(lambda: calls.vae_decode(inputs["z"]), repeats),
                  "end_to_end_s": median_time(calls.generate, 1),
                  "peak_rss_gib": _peak_rss_bytes() / 2**30,
                  "peak_gpu_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                  # what the caching allocator held at its peak: the process's real footprint on the device
                  "peak_gpu_reserved_gib": torch.cuda.max_memory_reserved() / 2**30 if cuda else None}
        result["compile_s"] = first_run - result["end_to_end_s"]
    return result


# ----------------------------------------------------------------------------------------- driver


def configurations(modes: list[str], diffusers: bool) -> list[tuple[str, str]]:
    """(impl, mode) in the order run: each ldm mode, then diffusers' counterpart unless already listed."""
    configs = []
    for mode in modes:
        for config in [("ldm", mode)] + ([("diffusers", DIFFUSERS_MODE[mode])] if diffusers else []):
            if config not in configs:
                configs.append(config)
    return configs


def bench(model: str | None, arch: str, size: int, steps: int, sampler: str, modes: list[str], device: str,
          dtype: str, repeats: int, diffusers: bool, log=print, timeout: float | None = None) -> list[dict]:
    """Run each configuration in a fresh process (`timeout` seconds at most each) and collect its row; a
    configuration that fails or runs out of time is logged and left out."""
    for mode in modes:
        check_mode(mode, device)
    if model is None:
        root = Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm") / "bench" / f"{arch}-random"
        log(f"writing a full-size random {arch} folder in the official layout to {root} (once)…")
        model = str(write_random_folder(root, arch))
    weight_bytes = sum(p.stat().st_size for p in Path(model).rglob("*.safetensors") if ".fp16." not in p.name)
    rows = []
    for impl, mode in configurations(modes, diffusers):
        log(f"running {impl} {mode}…")
        args = [sys.executable, "-m", "ldm.tools.bench", impl, model, str(size), str(steps), sampler, mode, device,
                dtype, str(repeats)]
        try:
            proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            log(f"{impl} {mode}: not done after {timeout:.0f} s, left out")
            continue
        if proc.returncode != 0:
            log(f"{impl} {mode} failed:\n{proc.stderr[-3000:]}")
            continue
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]) | {"weight_gib": weight_bytes / 2**30})
        log(json.dumps(rows[-1]))  # written down as soon as it exists: a later configuration may not finish
    return rows


METRICS = [("load_s", "load (s)"), ("to_first_step_s", "to first step (s)"), ("first_step_s", "first step (s)"),
           ("to_first_image_s", "to first image (s)"), ("compile_s", "compile/capture (s)"),
           ("text_encode_s", "text encode (s)"), ("unet_step_s", "UNet step (s)"),
           ("unet_step_gpu_s", "UNet step GPU (s)"), ("vae_decode_s", "VAE decode (s)"),
           ("end_to_end_s", "end to end (s)"), ("peak_rss_gib", "peak RSS (GiB)"),
           ("peak_gpu_gib", "peak GPU memory allocated (GiB)"),
           ("peak_gpu_reserved_gib", "peak GPU memory reserved (GiB)")]


def table(rows: list[dict]) -> str:
    """Markdown: one column per configuration, then ldm / diffusers for each ldm mode whose diffusers
    counterpart was measured. Rows that no configuration measured (GPU time on the CPU) are left out."""
    names = [f"{r['impl']} {r['mode']}" for r in rows]
    by = {(r["impl"], r["mode"]): r for r in rows}
    pairs = [(by[("ldm", m)], by[("diffusers", DIFFUSERS_MODE[m])]) for m in BENCH_MODES
             if ("ldm", m) in by and ("diffusers", DIFFUSERS_MODE[m]) in by]
    header = names + [f"ldm {a['mode']} / diffusers {b['mode']}" for a, b in pairs]
    lines = ["| metric | " + " | ".join(header) + " |", "|---" * (1 + len(header)) + "|"]
    for key, label in METRICS:
        if all(r.get(key) is None for r in rows):
            continue
        cells = [f"{r[key]:.3f}" if r.get(key) is not None else "-" for r in rows]
        for a, b in pairs:
            ok = a.get(key) is not None and b.get(key) and a[key] > 0
            cells.append(f"{a[key] / b[key]:.2f}" if ok else "-")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def memory(status: Path = Path("/proc/self/status")) -> dict[str, float]:
    """This process's resident memory in GiB (Linux): VmRSS, its anonymous and file-backed parts, and VmHWM."""
    fields = dict(line.split(":", 1) for line in status.read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) / 2**20 for k in ("VmRSS", "RssAnon", "RssFile", "VmHWM")}


def memory_stages(model: str, size: int = 256, repeats: int = 3, log=print) -> None:
    """`python -m ldm.tools.bench stages [FOLDER] [SIZE]`: the compiled CPU pipeline (`accelerate(pipe)`), its resident
    memory after each stage — load, accelerate, text encode, the first UNet call (compile and freezing), the
    first VAE decode (the same), then steady calls, timed (medians of `repeats`) — from /proc/self/status."""
    import torch

    from ldm.pipelines.stable_diffusion import StableDiffusion
    from ldm.speed.accelerate import accelerate

    def stage(name: str) -> None:
        m = memory()
        log(f"| {name} | {time.monotonic() - START:.0f} | {m['VmRSS']:.2f} | {m['RssAnon']:.2f} | {m['RssFile']:.2f} "
            f"| {m['VmHWM']:.2f} |")

    log("| stage | s | RSS (GiB) | anonymous | file-backed | peak (VmHWM) |\n|---|---|---|---|---|---|")
    stage("import")
    pipe = StableDiffusion.from_pretrained(model, safety_checker=False)
    stage("load")
    accelerate(pipe)
    stage("accelerate (nothing compiled yet)")
    cfg, latent = pipe.unet.config, size // 8
    x, z = torch.randn(2, cfg.in_channels, latent, latent), torch.randn(1, 4, latent, latent)
    context = torch.randn(2, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        pipe.conditioning(["a photograph of an astronaut riding a horse"], ["blurry"], 1, True, (size, size), {})
        stage("text encode (eager)")
        pipe.unet(x, 500.0, context=context)
        stage("first UNet call (compile, freezing)")
        pipe.vae.decode(z)
        stage("first VAE decode (compile, freezing)")
        unet = median_time(lambda: pipe.unet(x, 500.0, context=context), repeats)
        vae = median_time(lambda: pipe.vae.decode(z), repeats)
        stage(f"steady: UNet step {unet:.3f} s, VAE decode {vae:.3f} s")


if __name__ == "__main__" and sys.argv[1:2] == ["stages"]:
    root = Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm") / "bench" / "sd15-random"
    memory_stages(sys.argv[2] if len(sys.argv) > 2 else str(write_random_folder(root, "sd15")),
                  int(sys.argv[3]) if len(sys.argv) > 3 else 256)
elif __name__ == "__main__":
    impl, model, size, steps, sampler, mode, device, dtype, repeats = sys.argv[1:]
    print(json.dumps(run_one(impl, model, int(size), int(steps), sampler, mode, device, dtype, int(repeats))))
