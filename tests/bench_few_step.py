"""Benchmark (a script, not a test: pytest collects test_*.py only): few-step models on the CPU (issue 25), ldm against
diffusers on the same full-size random weights, each configuration in its own process.

    python tests/bench_few_step.py                         # writes the models once, then times every configuration
    python tests/bench_few_step.py --models turbo --repeats 3 --cache /tmp/ldm-bench-few-step
    python tests/bench_few_step.py --rounds 2         # each configuration twice; the table shows the quieter run

The models, written once under `--cache` (default /tmp/ldm-bench-few-step), each by a process of its own (a
full-size model takes ~4 GB to build and save), as diffusers folders with random weights built by diffusers'
`UNet2DConditionModel` / `AutoencoderKL` and transformers' `CLIPTextModel` from the official configs
(tests/official.py's helpers, given full-size configs):

- turbo: stabilityai/sd-turbo — the SD 2.1 architecture (OpenCLIP-H text tower 1024 wide, 23 layers; UNet
  320/640/1280/1280 with 64-wide heads and linear projections; sample_size 64, 512 px), EulerDiscreteScheduler with
  `timestep_spacing="trailing"`, epsilon; run at 512², 1 step, no classifier-free guidance (guidance 0);
- lcm: SimianLuo/LCM_Dreamshaper_v7 — the SD 1.5 architecture with `time_cond_proj_dim` 256, LCMScheduler,
  `LatentConsistencyModelPipeline`; run at 512², 4 steps, guidance 8.5 (the card's), which the UNet takes embedded:
  no unconditional batch;
- taesd: madebyollin/taesd (`diffusers.AutoencoderTiny()`'s defaults), the decoder of both.

Neither folder has a safety checker (model_index lists none): neither side runs one.

The configurations, each run as `python bench_few_step.py --run IMPL MODEL` in a fresh process:

- ldm: the default path, what `ldm generate --model M --vae TAESD --no-safety-checker` builds on the CPU
  (`ldm.pipelines.setup.prepare_pipeline(RunSettings(...))`: the reference networks as loaded, memory-mapped), in
  a process whose allocator keeps freed memory, as the `ldm` command's does (`ldm_cli.allocator`);
- ldm-fast: the fastest path without compile, `ldm.speed.accelerate.accelerate(pipe, compile=False)` on top
  (fused attention projections, channels_last UNet and VAE, Winograd 3×3 convolutions of 256–640 channels,
  filters precomputed); the command line has no flag for it on the CPU (only `--compile`);
- diffusers: `AutoPipelineForText2Image.from_pretrained(folder, vae=AutoencoderTiny.from_pretrained(taesd))`;
- ldm-bf16 / diffusers-bf16: the same two in bfloat16 (`RunSettings(dtype="bf16")`, what `--dtype bf16` builds;
  diffusers' `torch_dtype=torch.bfloat16`), for CPUs with native bf16 arithmetic (AVX-512 BF16, AMX): bf16 against
  bf16 is the same-precision ratio, ldm-bf16 against diffusers' fp32 default what a user gains by the flag. Their
  images are compared with diffusers-bf16's.

Each process sets `torch.set_num_threads(2)`, generates once (process start → first image: from the kernel's start
time of the process, /proc/self/stat, so the interpreter's start and every import count), then `--repeats` more
times (warm end to end: the median). The breakdown is timed inside those warm generations: the text encoding
(ldm's `pipe.encode`, diffusers' `pipe.encode_prompt`: tokenizing and the text tower), each UNet call (forward
hooks), the VAE decode (`pipe.vae.decode`, both TAESD), and the rest (scheduler, noise, guidance embedding, the
conversion to PIL). Peak RSS is the process's VmHWM. The CPU time that other processes took during the warm runs
(/proc/stat less this process's own) says whether the machine was shared while it ran. The first images of ldm and
diffusers are compared pixel for pixel: the same weights, seed and sampler give the same image (within 2/255), so
both did the same work.

On a shared machine: the timed runs start once the load average is at most `--max-load` (1.5; `--max-wait` s at
most), each configuration once other processes keep under `--max-busy` cores busy over 5 s (`--max-wait-each` s at
most); with `--rounds N` every configuration runs N times, interleaved, and the table takes each one's run in which
other processes took the least CPU (every round's figures are printed above it).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

T0 = time.monotonic()
try:  # the machine's busy CPU time and this process's at its start (see `cpu_jiffies`)
    JIFFIES0 = (sum(int(v) for i, v in enumerate(Path("/proc/stat").read_text().split()[1:11]) if i not in (3, 4)),
                sum(int(v) for v in Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()[11:13]))
except OSError:
    JIFFIES0 = None
HERE = Path(__file__).resolve().parent
PROMPT = "a photograph of an astronaut riding a horse"
SIZE = 512
IMPLS = ("ldm", "ldm-fast", "diffusers", "ldm-bf16", "diffusers-bf16")
# the model card's settings: (steps, guidance)
RUNS = {"turbo": (1, 0.0), "lcm": (4, 8.5)}


# ------------------------------------------------------------------------------------------ the models


def turbo_configs() -> dict:
    """stabilityai/sd-turbo's configs (the SD 2.1 architecture at 512 px), in the fields tests/official.py keeps."""
    from official import SD1_TEXT_ENCODER, SD1_VAE, SD21_UNET

    model_index = {"_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.24.0.dev0",
                   "feature_extractor": [None, None], "image_encoder": [None, None],
                   "requires_safety_checker": False, "safety_checker": [None, None],
                   "scheduler": ["diffusers", "EulerDiscreteScheduler"],
                   "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
                   "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    scheduler = {"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", "beta_end": 0.012,
                 "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False,
                 "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon",
                 "sample_max_value": 1.0, "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
                 "timestep_spacing": "trailing", "trained_betas": None, "use_karras_sigmas": False}
    unet = SD21_UNET | {"_diffusers_version": "0.24.0.dev0", "attention_head_dim": [5, 10, 20, 20],
                        "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024,
                        "sample_size": 64, "upcast_attention": False}
    vae = SD1_VAE | {"_diffusers_version": "0.24.0.dev0", "block_out_channels": [128, 256, 512, 512],
                     "sample_size": 512}
    text_encoder = SD1_TEXT_ENCODER | {"hidden_act": "gelu", "hidden_size": 1024, "intermediate_size": 4096,
                                       "num_attention_heads": 16, "num_hidden_layers": 23, "projection_dim": 512,
                                       "transformers_version": "4.35.0.dev0"}
    return {"model_index": model_index, "scheduler": scheduler, "unet": unet, "vae": vae,
            "text_encoder": text_encoder, "pad": "!"}


def lcm_configs() -> dict:
    """SimianLuo/LCM_Dreamshaper_v7's configs: SD 1.5 with the guidance embedding (time_cond_proj_dim 256)."""
    from official import LCM_MODEL_INDEX, LCM_SCHEDULER, SD1_TEXT_ENCODER, SD1_UNET, SD1_VAE

    model_index = LCM_MODEL_INDEX | {"feature_extractor": [None, None], "safety_checker": [None, None],
                                     "requires_safety_checker": False}
    unet = SD1_UNET | {"_diffusers_version": "0.22.0.dev0", "block_out_channels": [320, 640, 1280, 1280],
                       "cross_attention_dim": 768, "sample_size": 64, "time_cond_proj_dim": 256}
    vae = SD1_VAE | {"block_out_channels": [128, 256, 512, 512], "sample_size": 512}
    text_encoder = SD1_TEXT_ENCODER | {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12,
                                       "num_hidden_layers": 12}
    return {"model_index": model_index, "scheduler": LCM_SCHEDULER, "unet": unet, "vae": vae,
            "text_encoder": text_encoder, "pad": "<|endoftext|>"}


def write_model(name: str, root: Path) -> None:
    """Write one model (in this process; `ensure_models` runs each in its own) into root/name, complete or not at
    all: written into a temporary folder that is renamed last."""
    import gc
    import shutil

    import torch

    sys.path.insert(0, str(HERE))
    from official import make_text_encoder, make_unet, make_vae, official_text_encoder_state, save_component, write_json

    from ldm.networks.tokenizer import write_tokenizer_folder

    torch.set_num_threads(os.cpu_count() or 2)
    final, tmp = root / name, root / f"{name}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    if name == "taesd":
        from diffusers import AutoencoderTiny

        torch.manual_seed(3)
        AutoencoderTiny().save_pretrained(tmp, safe_serialization=True)
    else:
        cfg = turbo_configs() if name == "turbo" else lcm_configs()
        write_json(tmp / "scheduler" / "scheduler_config.json", cfg["scheduler"])
        for part, make, seed in (("unet", make_unet, 0), ("vae", make_vae, 1), ("text_encoder", make_text_encoder, 2)):
            t = time.monotonic()
            module = make(cfg[part], seed)
            state = official_text_encoder_state(module) if part == "text_encoder" else module.state_dict()
            stem = "model" if part == "text_encoder" else "diffusion_pytorch_model"
            save_component(tmp / part, cfg[part], state, stem, fp16_variant=False)
            params = sum(p.numel() for p in module.parameters())
            print(f"  {name}/{part}: {params / 1e6:.0f} M parameters ({time.monotonic() - t:.0f} s)", flush=True)
            del module, state
            gc.collect()
        write_tokenizer_folder(tmp / "tokenizer", pad_token=cfg["pad"])
        write_json(tmp / "model_index.json", cfg["model_index"])
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)


def ensure_models(root: Path, names: list[str]) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for name in [*names, "taesd"]:
        done = root / name / ("config.json" if name == "taesd" else "model_index.json")
        if done.is_file():
            continue
        print(f"writing {name} to {root / name} (once)…", flush=True)
        subprocess.run([sys.executable, __file__, "--write", name, "--cache", str(root)], check=True)


# ------------------------------------------------------------------------------------ one configuration


def since_process_start() -> float:
    """Seconds since the kernel started this process (/proc: 10 ms resolution); since this module's import elsewhere."""
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        uptime = float(Path("/proc/uptime").read_text().split()[0])
        return uptime - int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22: starttime, in clock ticks
    except (OSError, IndexError, ValueError):
        return time.monotonic() - T0


def peak_rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def cpu_jiffies() -> tuple[int, int]:
    """(busy jiffies of the whole machine, of this process)."""
    cpu = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:11]]
    busy = sum(cpu) - cpu[3] - cpu[4]  # less idle and iowait
    own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
    return busy, int(own[11]) + int(own[12])  # utime + stime (fields 14, 15)


def others_cores(before: tuple[int, int] | None, after: tuple[int, int], wall: float) -> float | None:
    """The CPU cores other processes kept busy, on average, between two `cpu_jiffies`."""
    if before is None or wall <= 0:
        return None
    return ((after[0] - before[0]) - (after[1] - before[1])) / os.sysconf("SC_CLK_TCK") / wall


def page_faults() -> tuple[int, int]:
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_minflt, usage.ru_majflt


class Parts:
    """Time spent in the parts of a generation: wrapped callables and modules (forward hooks)."""

    def __init__(self):
        self.times: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, dt: float) -> None:
        self.times[name] = self.times.get(name, 0.0) + dt
        self.calls[name] = self.calls.get(name, 0) + 1

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self.add(name, time.perf_counter() - start)
            return out

        return timed

    def hook(self, name: str, module) -> None:
        started = []
        module.register_forward_pre_hook(lambda *_: started.append(time.perf_counter()))
        module.register_forward_hook(lambda *_: self.add(name, time.perf_counter() - started.pop()))

    def reset(self) -> None:
        self.times, self.calls = {}, {}


def load_ldm(folder: Path, taesd: Path, fast: bool, dtype: str = "fp32"):
    from ldm.pipelines.setup import RunSettings, prepare_pipeline

    pipe = prepare_pipeline(RunSettings(str(folder), device="cpu", dtype=dtype, vae=str(taesd), safety_checker=False))
    if fast:
        from ldm.speed.accelerate import accelerate

        accelerate(pipe, compile=False)
    return pipe


def run_one(impl: str, model: str, root: Path, repeats: int) -> dict:
    import torch

    torch.set_num_threads(2)
    steps, guidance = RUNS[model]
    folder, taesd = root / model, root / "taesd"
    parts = Parts()
    if impl.startswith("ldm"):
        from ldm_cli.allocator import keep_freed_memory

        keep_freed_memory()  # as the `ldm` command's process does (`ldm_cli.allocator`)
        pipe = load_ldm(folder, taesd, impl == "ldm-fast", "bf16" if impl.endswith("bf16") else "fp32")
        loaded = since_process_start()
        pipe.encode = parts.wrap("text_encode", pipe.encode)
        pipe.vae.decode = parts.wrap("decode", pipe.vae.decode)
        parts.hook("unet", pipe.unet)
        sampler = pipe.default_sampler

        def generate():
            return pipe(PROMPT, steps=steps, guidance=guidance, seed=0, width=SIZE, height=SIZE).images[0]
    else:
        from diffusers import AutoencoderTiny, AutoPipelineForText2Image

        dtype = torch.bfloat16 if impl.endswith("bf16") else torch.float32
        vae = AutoencoderTiny.from_pretrained(taesd, torch_dtype=dtype)
        pipe = AutoPipelineForText2Image.from_pretrained(folder, vae=vae, torch_dtype=dtype)
        pipe.set_progress_bar_config(disable=True)
        loaded = since_process_start()
        pipe.encode_prompt = parts.wrap("text_encode", pipe.encode_prompt)
        pipe.vae.decode = parts.wrap("decode", pipe.vae.decode)
        parts.hook("unet", pipe.unet)
        sampler = f"{type(pipe).__name__} + {type(pipe.scheduler).__name__}"

        def generate():
            return pipe(PROMPT, num_inference_steps=steps, guidance_scale=guidance, height=SIZE, width=SIZE,
                        generator=torch.Generator("cpu").manual_seed(0)).images[0]

    with torch.inference_mode():
        faults0 = page_faults()
        image = generate()
        first_image = since_process_start()
        faults1 = page_faults()
        print("FIRST_IMAGE", flush=True)
        first_jiffies = cpu_jiffies()
        image.save(root / f"{model}-{impl}.png")
        first = dict(parts.times)
        runs = []
        warm_jiffies = cpu_jiffies()
        wall0 = time.perf_counter()
        for _ in range(repeats):
            parts.reset()
            faults = page_faults()
            start = time.perf_counter()
            generate()
            end_to_end = time.perf_counter() - start
            rest = end_to_end - sum(parts.times.get(k, 0.0) for k in ("text_encode", "unet", "decode"))
            runs.append({"end_to_end": end_to_end, **parts.times, "rest": rest, "unet_calls": parts.calls["unet"],
                         "minor_faults": page_faults()[0] - faults[0]})
        wall = time.perf_counter() - wall0
        end_jiffies = cpu_jiffies()
    median = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    return {"impl": impl, "model": model, "sampler": str(sampler), "steps": steps, "guidance": guidance,
            "load_s": loaded, "first_image_s": first_image, "first_generation_s": first_image - loaded,
            "first_unet_s": first.get("unet"), "end_to_end_s": median["end_to_end"],
            "end_to_end_runs_s": [r["end_to_end"] for r in runs],
            "text_encode_s": median["text_encode"], "unet_s": median["unet"],
            "unet_calls": int(median["unet_calls"]), "unet_step_s": median["unet"] / median["unet_calls"],
            "decode_s": median["decode"],
            "rest_s": median["rest"], "peak_rss_gib": peak_rss_gib(), "threads": torch.get_num_threads(),
            "first_generation_faults": [faults1[0] - faults0[0], faults1[1] - faults0[1]],
            "warm_minor_faults": int(median["minor_faults"]),
            "others_cpu_cores_first": others_cores(JIFFIES0, first_jiffies, first_image),
            "others_cpu_cores": others_cores(warm_jiffies, end_jiffies, wall)}


# ----------------------------------------------------------------------------------------- driver


def wait_for_quiet(max_load: float, max_wait: float) -> list[float]:
    """Sleep (60 s at a time, `max_wait` s at most) while the 1-minute load average is above `max_load`."""
    waited = 0.0
    while os.getloadavg()[0] > max_load and waited < max_wait:
        print(f"load average {os.getloadavg()[0]:.2f} > {max_load}: waiting 60 s…", flush=True)
        time.sleep(60)
        waited += 60
    return list(os.getloadavg())


def busy_cores(window: float = 5.0) -> float:
    """The cores the machine kept busy over the next `window` seconds (this process sleeps meanwhile)."""
    before = cpu_jiffies()[0]
    time.sleep(window)
    return (cpu_jiffies()[0] - before) / os.sysconf("SC_CLK_TCK") / window


def wait_for_idle(max_busy: float, max_wait: float) -> float:
    """Wait (`max_wait` s at most) until other processes keep less than `max_busy` cores busy; returns the last
    reading. (Between configurations the load average still counts the last one's own two threads.)"""
    waited, busy = 0.0, busy_cores()
    while busy > max_busy and waited < max_wait:
        print(f"other processes busy on {busy:.2f} cores > {max_busy}: waiting…", flush=True)
        time.sleep(10)
        waited += 15
        busy = busy_cores()
    return busy


def measure(impl: str, model: str, root: Path, repeats: int, timeout: float) -> dict | None:
    env = os.environ | {"OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    load_before = os.getloadavg()[0]
    begin = time.monotonic()
    proc = subprocess.Popen([sys.executable, __file__, "--run", impl, model, "--cache", str(root), "--repeats",
                             str(repeats)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    seen, lines = None, []
    try:
        for line in proc.stdout:
            if line.strip() == "FIRST_IMAGE" and seen is None:
                seen = time.monotonic() - begin
            lines.append(line)
            if time.monotonic() - begin > timeout:
                proc.kill()
                break
        proc.wait(timeout=max(1.0, timeout - (time.monotonic() - begin)))
    except subprocess.TimeoutExpired:
        proc.kill()
    err = proc.stderr.read()
    if proc.returncode != 0 or not lines:
        print(f"{impl} {model} failed (rc {proc.returncode}):\n{err[-3000:]}", flush=True)
        return None
    row = json.loads(lines[-1])
    row |= {"popen_to_first_image_s": seen, "load_avg_before": load_before, "load_avg_after": os.getloadavg()[0]}
    print(json.dumps(row), flush=True)
    return row


METRICS = [("load_s", "start → pipeline loaded (s)"), ("first_image_s", "start → first image (s)"),
           ("first_unet_s", "first generation: UNet (s)"), ("end_to_end_s", "warm end to end (s)"),
           ("text_encode_s", "text encode (s)"), ("unet_step_s", "UNet per step (s)"),
           ("unet_s", "UNet, all steps (s)"),
           ("decode_s", "TAESD decode (s)"), ("rest_s", "rest (s)"), ("peak_rss_gib", "peak RSS (GiB)"),
           ("others_cpu_cores_first", "other processes' CPU, start → first image (cores)"),
           ("others_cpu_cores", "other processes' CPU, warm runs (cores)")]


def table(rows: list[dict]) -> str:
    by = {r["impl"]: r for r in rows}
    impls = [i for i in IMPLS if i in by]
    pairs = [(i, "diffusers") for i in impls if i != "diffusers" and "diffusers" in by]
    if {"ldm-bf16", "diffusers-bf16"} <= by.keys():
        pairs.append(("ldm-bf16", "diffusers-bf16"))
    header = impls + [f"{a} / {b}" for a, b in pairs]
    lines = ["| metric | " + " | ".join(header) + " |", "|---" * (1 + len(header)) + "|"]
    for key, label in METRICS:
        cells = [f"{by[i][key]:.3f}" if by[i].get(key) is not None else "-" for i in impls]
        for i, reference in pairs:
            a, b = by[i].get(key), by[reference].get(key)
            cells.append(f"{a / b:.2f}" if a is not None and b and not key.startswith(("others", "rest")) else "")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contention(row: dict) -> float:
    """The CPU other processes took while a configuration ran (cores, summed over its two phases)."""
    return (row.get("others_cpu_cores_first") or 0.0) + (row.get("others_cpu_cores") or 0.0)


def pixel_difference(root: Path, model: str, impl: str) -> int | None:
    import numpy as np
    from PIL import Image

    reference = "diffusers-bf16" if impl.endswith("bf16") else "diffusers"
    a, b = root / f"{model}-{impl}.png", root / f"{model}-{reference}.png"
    if not (a.is_file() and b.is_file()):
        return None
    return int(np.abs(np.asarray(Image.open(a), np.int16) - np.asarray(Image.open(b), np.int16)).max())


def machine() -> str:
    import importlib.metadata
    import platform

    cpu = next((line.split(":", 1)[1].strip() for line in subprocess.run(["lscpu"], capture_output=True,
               text=True).stdout.splitlines() if line.startswith("Model name")), platform.processor())
    flags = Path("/proc/cpuinfo").read_text()
    isa = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile") if f" {f}" in flags]
    mem = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                   if line.startswith("MemTotal"))) / 2**20
    versions = ", ".join(f"{p} {importlib.metadata.version(p)}" for p in ("torch", "diffusers", "transformers"))
    commit = subprocess.run(["git", "-C", str(HERE.parent), "rev-parse", "--short", "HEAD"], capture_output=True,
                            text=True).stdout.strip()
    return f"{os.cpu_count()} CPUs, {cpu} ({' '.join(isa)}), {mem:.0f} GiB; {versions}; ldm at {commit or '?'}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=Path("/tmp/ldm-bench-few-step"))
    parser.add_argument("--models", nargs="+", choices=list(RUNS), default=list(RUNS))
    parser.add_argument("--impls", nargs="+", choices=IMPLS, default=list(IMPLS))
    parser.add_argument("--repeats", type=int, default=3, help="warm generations after the first (median)")
    parser.add_argument("--max-load", type=float, default=1.5, help="wait while the load average is above this")
    parser.add_argument("--max-wait", type=float, default=600, help="seconds to wait for it at most, first")
    parser.add_argument("--max-busy", type=float, default=0.5,
                        help="before each configuration, wait while others keep more cores than this busy")
    parser.add_argument("--max-wait-each", type=float, default=180, help="seconds to wait for that at most")
    parser.add_argument("--timeout", type=float, default=900, help="seconds each configuration may take")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every configuration this many times (interleaved) and report, for each, the round "
                             "in which other processes took the least CPU (a shared machine)")
    parser.add_argument("--write", choices=[*RUNS, "taesd"], help=argparse.SUPPRESS)
    parser.add_argument("--run", nargs=2, metavar=("IMPL", "MODEL"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.write:
        write_model(args.write, args.cache)
        return
    if args.run:
        print(json.dumps(run_one(args.run[0], args.run[1], args.cache, args.repeats)), flush=True)
        return

    ensure_models(args.cache, args.models)
    where = machine()
    print(where, flush=True)
    load = wait_for_quiet(args.max_load, args.max_wait)
    print(f"load average before the timed runs: {' '.join(f'{v:.2f}' for v in load)}", flush=True)
    rounds: dict[str, dict[str, list[dict]]] = {model: {impl: [] for impl in args.impls} for model in args.models}
    for number in range(args.rounds):
        for model in args.models:
            for impl in args.impls:
                idle = wait_for_idle(args.max_busy, args.max_wait_each)
                if (row := measure(impl, model, args.cache, args.repeats, args.timeout)) is not None:
                    rounds[model][impl].append(row | {"busy_before": idle, "round": number + 1})
    print(f"\n{where}; 2 threads; load average after: {' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    for model, by_impl in rounds.items():
        rows = [min(runs, key=contention) for runs in by_impl.values() if runs]
        if args.rounds > 1:
            print(f"\n{model}, every round (others' CPU start → first image / warm, in cores):")
            for impl, runs in by_impl.items():
                print(f"  {impl}: " + "; ".join(
                    f"round {r['round']}: first image {r['first_image_s']:.2f} s, warm {r['end_to_end_s']:.2f} s "
                    f"({r['others_cpu_cores_first']:.2f} / {r['others_cpu_cores']:.2f})" for r in runs))
        steps, guidance = RUNS[model]
        print(f"\n{model}: {SIZE}², {steps} step(s), guidance {guidance}, TAESD decode; samplers: "
              + "; ".join(f"{r['impl']} {r['sampler']}" for r in rows)
              + ("" if args.rounds == 1 else "; rounds shown: " + ", ".join(f"{r['impl']} {r['round']}" for r in rows)))
        print(table(rows))
        diffs = {i: pixel_difference(args.cache, model, i) for i in IMPLS if not i.startswith("diffusers")}
        print("first image vs diffusers' (bf16 vs bf16), max pixel difference: "
              + ", ".join(f"{i} {d}" for i, d in diffs.items() if d is not None))
        print("before each: cores busy (5 s), load average (1 min) before/after: "
              + ", ".join(f"{r['impl']} {r['busy_before']:.2f}, {r['load_avg_before']:.2f}/{r['load_avg_after']:.2f}"
                          for r in rows))


if __name__ == "__main__":
    main()
