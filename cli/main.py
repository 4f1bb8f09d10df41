"""The `ldm` command. Thin: parse, call the library, report. User errors → one line on stderr, exit 2."""

import argparse
import json
import os
import secrets
import sys
import time
from pathlib import Path

from ldm.choices import EMPHASES, HIRES_UPSCALERS, KARRAS_SAMPLERS, SAMPLER_LABELS
from ldm.errors import LdmError
from ldm_cli import parity

# Nothing here imports torch at module level: `ldm --help` and argument errors answer at once.


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("ldm")
    except PackageNotFoundError:
        return "(not installed)"


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line and a pointer to --help instead of the whole usage."""

    def error(self, message: str):
        print(f"{self.prog}: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        sys.exit(2)


class ProgressBar:
    """A one-line progress bar on stderr: a step callback of the pipeline (`begin(total)`, then each `Step`), or
    told (done, total) directly with `show` (batch rows)."""

    def __init__(self, width: int = 30, unit: str = "steps"):
        self.width, self.unit, self.start, self.first, self.total = width, unit, time.monotonic(), None, 0
        self.last = 0

    def begin(self, total: int) -> None:
        """Before the first step: the bar shows at once (a base → refiner run draws one bar per model)."""
        self.first = None
        self.show(0, total)

    def __call__(self, step) -> None:
        if step.i + 1 > self.last:  # PNDM reports its doubled step twice
            self.show(step.i + 1, step.total)

    def show(self, done: int, total: int) -> None:
        if self.first is None:
            self.first = done if done == 0 else done - 1  # a resumed batch starts part-way
            self.start = time.monotonic()
        self.total, self.last = total, done
        filled = self.width * done // total
        rate = "starting…" if done == self.first else \
            f"{(time.monotonic() - self.start) / (done - self.first):.2f} s/{self.unit.rstrip('s')}"
        end = "\n" if done == total else ""
        print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} {self.unit}, {rate}",
              end=end, file=sys.stderr, flush=True)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to load and how: shared by generate, serve and batch."""
    parser.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                        help="a diffusers model folder, an original single-file .safetensors checkpoint (a path, "
                             "or a file name in weights/), a Hub repo id or a weights/manifest.json name "
                             "(downloaded on first use); default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                        help="auto: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (*.fp16.safetensors)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="skip the safety checker of models that ship one (SD 1.x): nothing is blacked out")
    parser.add_argument("--local-files-only", action="store_true",
                        help="never contact the Hub: a Hub model must be in the cache (as with HF_HUB_OFFLINE=1)")
    parser.add_argument("--compile", action="store_true",
                        help="also torch.compile the UNet and VAE decoder (on the CPU: fused attention "
                             "projections, channels_last, Winograd convolutions and weight freezing too); the "
                             "first run compiles (minutes on a CPU), later runs reuse the on-disk cache")
    parser.add_argument("--compile-mode", default=None, choices=("default", "max"),
                        help="implies --compile. default: inductor's default mode, no autotuning; max: "
                             "max-autotune (Triton autotunes convolutions and matmuls: many minutes on CUDA)")
    parser.add_argument("--no-cuda-graph", action="store_true",
                        help="on CUDA, run the UNet step eagerly instead of replaying it as a captured CUDA graph "
                             "(the default there, with fused attention projections and channels_last)")
    parser.add_argument("--prediction-type", default=None, choices=("eps", "v"),
                        help="override the model's prediction type (a single file does not store it: SD 2.x files "
                             "default to v, the 768-px models; pass eps for a 512-px SD 2.x base file)")
    parser.add_argument("--refiner", default=None,
                        help="an SDXL refiner (folder, single file or Hub id) that finishes the SDXL base's "
                             "text-to-image runs (the SDXL model card's base → refiner hand-off)")
    parser.add_argument("--refiner-start", type=float, default=None,
                        help="fraction of the schedule the base runs before the refiner takes over (default: 0.8)")
    large = parser.add_argument_group("the VAE and seamless textures", "README: 'Large images and seamless textures'")
    large.add_argument("--vae-tiling", action="store_true",
                       help="decode (and encode) in overlapping tiles, as diffusers' enable_tiling(); without it, "
                            "ldm tiles only where the whole-image pass would not fit in memory")
    large.add_argument("--vae-tile-size", type=int, default=None, metavar="PIXELS",
                       help="tile size (default: the VAE config's sample_size, 512 for SD 1.x, 1024 for SDXL)")
    large.add_argument("--tiling", action="store_true",
                       help="seamless textures: circular padding in every convolution of the UNet and VAE "
                            "(A1111's --tiling); the image's edges continue each other")
    large.add_argument("--vae", default=None, metavar="FILE_OR_FOLDER",
                       help="use this VAE: a diffusers vae/ folder or a .safetensors VAE file of the model's family")
    parser.add_argument("--offload", default=None, choices=("model", "sequential"),
                        help="for GPUs too small for the model: keep the weights on the CPU and bring each network "
                             "to the GPU only while it runs (model), or each layer only for its own forward "
                             "(sequential: least memory, slowest); the image is the same. Not with --compile")


def offload_device(args: argparse.Namespace):
    """--offload's execution device: the GPU the run is on. Refused with --compile, and on the CPU."""
    if args.compile or args.compile_mode:
        raise LdmError("--offload does not combine with --compile: compiled code and CUDA graphs keep the weights "
                       "where they were when compiled (leave out one of them)")
    from ldm.loading.components import resolve_device

    device = resolve_device(args.device)
    if device.type == "cpu":
        raise LdmError("--offload moves weights between the CPU and a GPU, and this run is on the CPU (--device cpu, "
                       "or no CUDA device here): there is nothing to offload, leave it out")
    return device


def check_vae_options(args: argparse.Namespace) -> None:
    if args.tiling and (args.vae_tiling or args.vae_tile_size):
        raise LdmError("--tiling does not combine with --vae-tiling: each VAE tile would wrap on itself")
    if args.vae_tile_size is not None and (args.vae_tile_size < 32 or args.vae_tile_size % 8):
        raise LdmError(f"--vae-tile-size must be a multiple of 8 pixels, at least 32, got {args.vae_tile_size}")
    if args.vae is not None and not Path(args.vae).exists():
        raise LdmError(f"--vae {args.vae}: no such file or folder")


def load_model(args: argparse.Namespace):
    """--model as the options say; with --refiner, the SDXL base and its refiner as one `Refined` pipeline (the
    refiner loaded at once, so that a bad path fails before the base runs, and parked on the CPU until its
    turn; it runs uncompiled). `--vae` swaps the VAE of both, `--tiling` makes both seamless, and both VAEs
    tile (`--vae-tiling`: always; otherwise where a whole image would not fit).
    --offload: the weights load on the CPU in the dtype they run in on the GPU and stay there (`ldm.speed.offload`);
    the networks are accelerated without CUDA graphs, then offloaded (the base and refiner as one)."""
    from ldm.adapters.seamless import set_seamless
    from ldm.loading.components import DTYPES, resolve_dtype
    from ldm.pipelines.setup import load as load_pipeline
    from ldm.speed.tiling import enable_vae_tiling

    check_vae_options(args)

    def load(model: str, device: str, dtype: str, prediction_type: str | None):
        pipe = load_pipeline(
            model, device=device, dtype=dtype, variant=args.variant, revision=args.revision,
            local_files_only=args.local_files_only, prediction_type=prediction_type,
            safety_checker=not args.no_safety_checker, vae=args.vae)
        if args.tiling:  # before `accelerate`: its Winograd convolutions pad with zeros
            set_seamless(pipe)
        else:  # --vae-tiling: always; otherwise where the whole image would not fit (ldm.speed.tiling)
            enable_vae_tiling(pipe.vae, "on" if args.vae_tiling else "auto", args.vae_tile_size)
        return pipe

    offload = getattr(args, "offload", None)
    if offload:
        target = offload_device(args)
        dtype = next(name for name, dt in DTYPES.items() if dt == resolve_dtype(args.dtype, target))
        pipe = load(args.model, "cpu", dtype, args.prediction_type)
        pipe.device = target  # where `accelerate` below and the offload hooks take it to run
    else:
        pipe = load(args.model, args.device, args.dtype, args.prediction_type)
    compile = args.compile_mode or args.compile  # --compile-mode implies --compile
    if compile or pipe.device.type == "cuda":  # CUDA's default path: fused, channels_last, the CUDA graph
        from ldm.speed.accelerate import accelerate

        accelerate(pipe, compile=compile, cuda_graph=False if args.no_cuda_graph or offload else None)
    if getattr(args, "refiner", None):
        from ldm.pipelines.refiner import DEFAULT_START, Refined

        dtype = next(name for name, dt in DTYPES.items() if dt == pipe.dtype)
        refiner = load(args.refiner, "cpu", dtype, None)
        pipe = Refined(pipe, refiner, DEFAULT_START if args.refiner_start is None else args.refiner_start)
    if offload:
        from ldm.speed.offload import enable_offload

        enable_offload(pipe, offload, target)
    return pipe


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = Parser(prog="ldm", description="Latent diffusion in pure PyTorch.")
    parser.add_argument("--version", action="version", version=f"ldm {version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate images from a text prompt",
        description="Generate images from a text prompt. Defaults (size, sampler) come from the model folder.")
    gen.add_argument("prompt", nargs="?", default=None,
                     help="what to draw, in AUTOMATIC1111's prompt syntax: (word:1.3) emphasis, any length, BREAK, "
                          "embedding trigger words")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from")
    prompts = gen.add_argument_group("prompts", "README: 'Prompts'")
    prompts.add_argument("--prompt-syntax", default="a1111", choices=("a1111", "plain"),
                         help="a1111: AUTOMATIC1111's emphasis, chunks of 75 tokens and BREAK (default); plain: "
                              "the text read literally and cut at 77 tokens, as diffusers does")
    prompts.add_argument("--emphasis", default="original", choices=("original", "no-norm", "none"),
                         help="A1111's emphasis mode: original (weights, then each chunk's mean restored; default), "
                              "no-norm (weights only), none (brackets are text)")
    prompts.add_argument("--clip-skip", type=int, default=1,
                         help="condition on the text tower's N-th layer from the end: 1 = the last (default), 2 = "
                              "the penultimate (A1111's Clip skip; see README for SD 2.x and SDXL)")
    prompts.add_argument("--embedding", action="append", default=[], metavar="FILE",
                         help="a textual-inversion embedding (.safetensors, or A1111 .pt); its trigger word is the "
                              "file name without extension. Repeatable; weights/embeddings/ is always loaded")
    prompts.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                         help="merge a LoRA/LyCORIS file (a path, or a name in weights/loras) at WEIGHT (default 1); "
                              "repeatable. <lora:NAME:WEIGHT> in the prompt does the same for names in weights/loras")
    prompts.add_argument("--from-png", default=None, metavar="IMAGE.png",
                         help="take prompt, negative prompt, steps, sampler, schedule, CFG, seed, size, clip skip "
                              "and strength from a PNG's A1111 parameters; flags given beside it override them")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    gen.add_argument("--guidance", type=float, default=7.5,
                     help="classifier-free guidance scale; ≤ 1 turns it off (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    gen.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--sampler", default=None, choices=list(SAMPLER_LABELS),
                     help="sampler (default: the model folder's scheduler): "
                          + ", ".join(f"{name} ({label})" for name, label in SAMPLER_LABELS.items()))
    gen.add_argument("--karras", action="store_true",
                     help="Karras et al.'s σ schedule, for: " + ", ".join(KARRAS_SAMPLERS))
    gen.add_argument("--guidance-rescale", type=float, default=0.0,
                     help="rescale guided output toward the conditional one's std, 0–1 (default: %(default)s)")
    gen.add_argument("--image", default=None,
                     help="start from this image (image-to-image), or repaint it with --mask; the output size "
                          "is its size rounded down to a multiple of 8 unless --width/--height are given")
    gen.add_argument("--mask", default=None,
                     help="inpainting mask for --image: white = repaint, black = keep (binarised at 50%%)")
    gen.add_argument("--strength", type=float, default=None,
                     help="how much of the schedule to run from --image, (0, 1] (default: 0.8; 1.0 with --mask)")
    sdxl = gen.add_argument_group("SDXL", "micro-conditioning (diffusers' defaults: the output size, crop 0 0) "
                                          "and the base → refiner hand-off")
    sdxl.add_argument("--original-size", type=int, nargs=2, metavar=("W", "H"), default=None,
                      help="the size the image is to look as if it came from (default: the output size)")
    sdxl.add_argument("--crop-coords", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                      help="the crop it is to look as if it were cut from (default: 0 0, uncropped)")
    sdxl.add_argument("--target-size", type=int, nargs=2, metavar=("W", "H"), default=None, help="base only")
    sdxl.add_argument("--aesthetic-score", type=float, default=None, help="refiner only (default: 6.0)")
    sdxl.add_argument("--negative-aesthetic-score", type=float, default=None, help="refiner only (default: 2.5)")
    gen.add_argument("--eta", type=float, default=0.0,
                     help="DDIM's η: 0 deterministic, 1 DDPM-like noise (default: %(default)s)")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate (default: %(default)s)")
    gen.add_argument("-o", "--output", default="output.png",
                     help="PNG path; several images: NAME.png, NAME-1.png, … (default: %(default)s)")
    gen.add_argument("--preview-every", type=int, default=None, metavar="N",
                     help="every N steps, decode the current estimate of the final image to NAME-stepNNN.png")
    gen.add_argument("--attention-maps", default=None, metavar="DIR",
                     help="write a cross-attention heat map per prompt token, overlaid on the image, and tokens.json "
                          "into DIR (README: 'Attention maps'; not with --compile)")
    large = gen.add_argument_group("large images and seamless textures", "README: 'Large images and seamless textures'")
    large.add_argument("--hires-scale", type=float, default=None, metavar="F",
                       help="A1111's hires fix: generate, upscale the result by F (1 to 4), then redraw it with "
                            "image-to-image at the larger size")
    large.add_argument("--hires-steps", type=int, default=None, metavar="N",
                       help="steps of the hires pass (default: --steps)")
    large.add_argument("--hires-denoise", type=float, default=None, metavar="STRENGTH",
                       help="denoising strength of the hires pass (default: 0.7)")
    large.add_argument("--hires-upscaler", default=None, choices=list(HIRES_UPSCALERS),
                       help="latent* interpolate the latents, lanczos and nearest resize the image (default: latent)")
    add_model_options(gen)

    dl = sub.add_parser(
        "download", help="fetch a model into the Hugging Face cache",
        description="Download an official model's diffusers folder (safetensors only) or, with --single-file, its "
                    "original single-file checkpoint into the Hugging Face cache ($HF_HOME/hub), and print where "
                    "it is. MODEL: a name from weights/manifest.json (" + ", ".join(_manifest_names()) + "), a Hub "
                    "repo id, or an alias such as runwayml/stable-diffusion-v1-5.")
    dl.add_argument("model", metavar="MODEL", help="a manifest name (sd15, sdxl-base, …) or a Hub repo id")
    dl.add_argument("--single-file", action="store_true", help="the original single-file .safetensors checkpoint")
    dl.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (*.fp16.safetensors)")
    dl.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    dl.add_argument("--force", action="store_true", help="download again even if cached (a damaged file)")

    info = sub.add_parser(
        "info", help="describe a model: family, configs, dtype, parameters, files",
        description="Describe a local folder, a single file, or a cached Hub model (nothing is downloaded or "
                    "loaded: configs and safetensors headers only).")
    info.add_argument("model", metavar="MODEL",
                      help="a diffusers folder, a single .safetensors file, a manifest name or a cached Hub repo id")
    info.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    info.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")

    srv = sub.add_parser(
        "serve", help="serve the scoring schema over HTTP (POST /score, GET /health, /docs)",
        description="A real-time endpoint speaking the Azure ML model-catalog scoring schema (README: 'Serving'). "
                    "One model, loaded once; requests wait in a bounded queue for the one worker that owns the "
                    "device; a full queue answers 503 with Retry-After. Needs the serve extra "
                    "(pip install -e '.[serve]').")
    add_model_options(srv)
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    srv.add_argument("--port", type=int, default=8080, help="TCP port to listen on (default: %(default)s)")
    add_limit_options(srv)
    srv.add_argument("--queue-size", type=int, default=8,
                     help="requests that may wait for the worker; more get 503 (default: %(default)s)")
    srv.add_argument("--batch-size", type=int, default=None,
                     help="images of a request's text-to-image rows that run through the networks together "
                          "(default: 4 on CUDA, where batching raises throughput; 1 on the CPU, where it does not)")
    srv.add_argument("--max-body-mb", type=float, default=32, help="largest request body (default: %(default)s)")
    srv.add_argument("--allow-image-urls", action="store_true",
                     help="fetch image and mask cells given as http(s) URLs (each at most --max-body-mb, within 10 s); "
                          "without it such a row is refused. The server can then reach any address a client names")
    srv.add_argument("--timeout", type=float, default=600,
                     help="seconds a request may wait and run before it is cancelled with 504 (default: %(default)s)")

    bat = sub.add_parser(
        "batch", help="run a file of prompts (JSON request, JSONL or CSV) into PNGs and results.jsonl",
        description="Generate one PNG per row (per image) into --output, with results.jsonl in the scoring "
                    "response form. Row i gets seed + i; a killed run resumes where it stopped. Under torchrun "
                    "(torchrun --nproc-per-node N -m ldm_cli.main batch ...) the ranks share the rows, one device "
                    "each.")
    add_model_options(bat)
    bat.add_argument("--input", required=True, type=Path,
                     help="a scoring request (.json), one row a line (.jsonl: a prompt string or an object with "
                          "prompt/image/mask), or .csv with a prompt column (image/mask: file paths or base64)")
    bat.add_argument("--output", required=True, type=Path, help="folder for the PNGs, results.jsonl and batch.json")
    bat.add_argument("--parameters", default=None, type=json.loads, metavar="JSON",
                     help='scoring parameters for every row, e.g. \'{"num_inference_steps": 30, "width": 512}\'')
    bat.add_argument("--seed", type=int, default=None, help="seed of row 0 (default: the input's, else random)")
    bat.add_argument("--base64-in-results", action="store_true",
                     help="repeat each image's base64 PNG in its results.jsonl line (by default the line names the "
                          "PNG file only)")
    bat.add_argument("--format", default="rows", choices=("rows", "azure"),
                     help="rows: --input is one file as above (default); azure: --input is a folder of CSV files "
                          "(prompt; image, mask_image, prompt) as Azure ML batch endpoints take it, and "
                          "predictions.csv is written too")
    bat.add_argument("--images", default=None, choices=("base64", "files"),
                     help="--format azure: predictions.csv's generated_image is the base64 PNG (default) or the "
                          "PNG's file name")
    bat.add_argument("--mini-batch-size", type=int, default=None, metavar="FILES",
                     help="--format azure: CSV files per mini-batch, the unit a torchrun rank takes (default: 1)")

    parity.add_parser(sub)

    bench = sub.add_parser(
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
    bench.add_argument("--mode", nargs="+", default=None,
                       choices=("eager", "graph", "compile", "max", "model-offload", "sequential-offload"),
                       help="ldm modes to time (diffusers in its counterpart of each): eager (no CUDA graph, no "
                            "compile), graph (CUDA only: the CUDA-graph default there), compile (--compile), max "
                            "(--compile-mode max), model-offload / sequential-offload (CUDA only: --offload); "
                            "default: eager graph on CUDA, eager on the CPU")
    bench.add_argument("--compile", action="store_true", help="also time the compile mode")
    bench.add_argument("--timeout", type=float, default=None,
                       help="seconds each configuration may take before it is stopped and left out (default: none)")
    bench.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    bench.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                       help="auto: fp16 on CUDA, fp32 on the CPU")
    bench.add_argument("--repeats", type=int, default=3, help="timed repeats of each part (default: %(default)s)")
    bench.add_argument("--no-diffusers", action="store_true", help="time ldm only")
    args = parser.parse_args(argv)
    if args.command == "generate":  # which options were given (they override a PNG's parameters)
        for action in gen._actions:
            action.default = argparse.SUPPRESS
        args.given = set(vars(parser.parse_args(argv))) - {"command"}
    return args


def warn_size(pipe, width: int | None, height: int | None) -> None:
    """Say what a size far above the model's native one means, before minutes pass without a step."""
    native = pipe.native_size
    ratio = (width or native) * (height or native) / native**2
    if ratio >= 4:
        print(f"note: {width or native}x{height or native} is {ratio:.0f}× the pixels of {pipe.name}'s native "
              f"{native}x{native}: the model draws best at its native size (larger ones repeat subjects), and a "
              f"step costs {ratio:.0f}× to {ratio**2:.0f}× a native step (attention grows with the square of "
              "the pixels)", file=sys.stderr)


def lora_option(value: str):
    """--lora FILE[:WEIGHT] → (the file, a path or a name in weights/loras; the weight)."""
    from ldm.adapters.lora import find_lora

    name, weight = value, 1.0
    if ":" in value:
        head, tail = value.rsplit(":", 1)
        try:
            name, weight = head, float(tail)
        except ValueError:
            pass  # a colon of the path itself
    return find_lora(name), weight


def from_png(args: argparse.Namespace) -> None:
    """Fill the options not given on the command line from the A1111 parameters of `--from-png`."""
    from ldm.pipelines.images import parse_infotext, png_parameters

    prompt, negative, params = parse_infotext(png_parameters(args.from_png))
    by_label = {label: name for name, label in SAMPLER_LABELS.items()}

    def value(key, kind):
        try:
            return kind(params[key])
        except ValueError:
            raise LdmError(f"--from-png {args.from_png}: {key}: {params[key]!r} is not a valid value") from None

    found = {"prompt": prompt, "negative_prompt": negative or None}
    for key, dest, kind in (("Steps", "steps", int), ("CFG scale", "guidance", float), ("Seed", "seed", int),
                            ("Clip skip", "clip_skip", int), ("Eta", "eta", float),
                            ("CFG rescale", "guidance_rescale", float)):
        if key in params:
            found[dest] = value(key, kind)
    if "Size" in params:
        size = params["Size"].split("x")
        if len(size) != 2 or not all(v.isdigit() for v in size):
            raise LdmError(f"--from-png {args.from_png}: Size: {params['Size']!r} is not WxH")
        found["width"], found["height"] = int(size[0]), int(size[1])
    sampler = params.get("Sampler")
    if sampler is not None:
        karras = sampler.endswith(" Karras")  # A1111 before 1.9 wrote "DPM++ 2M Karras"
        label = sampler.removesuffix(" Karras")
        if label not in by_label:
            raise LdmError(f"--from-png {args.from_png}: sampler {sampler!r} is not one ldm has ("
                           f"{', '.join(by_label)}): pass --sampler")
        found["sampler"], found["karras"] = by_label[label], karras or params.get("Schedule type") == "Karras"
    emphasis = {v: k for k, v in EMPHASES.items()}.get(params.get("Emphasis", "Original"))
    if emphasis is None:
        raise LdmError(f"--from-png {args.from_png}: emphasis {params['Emphasis']!r} is not one ldm has")
    found["emphasis"] = emphasis
    found["prompt_syntax"] = params.get("Prompt syntax", "a1111")
    found["tiling"] = params.get("Tiling") == "True"
    if "Hires upscale" in params:  # the hires fix: its strength is the second pass's
        found["hires_scale"] = value("Hires upscale", float)
        for key, dest, kind in (("Hires steps", "hires_steps", int), ("Denoising strength", "hires_denoise", float)):
            if key in params:
                found[dest] = value(key, kind)
        by_name = {label: name for name, label in HIRES_UPSCALERS.items()}
        upscaler = params.get("Hires upscaler", "Latent")
        if upscaler not in by_name:
            raise LdmError(f"--from-png {args.from_png}: hires upscaler {upscaler!r} is not one ldm has "
                           f"({', '.join(by_name)}): pass --hires-upscaler")
        found["hires_upscaler"] = by_name[upscaler]
    elif "Denoising strength" in params:
        if args.image is None:
            raise LdmError(f"--from-png {args.from_png}: the image was made by image-to-image (Denoising strength "
                           f"{params['Denoising strength']}): give its --image")
        found["strength"] = value("Denoising strength", float)
    for dest, v in found.items():
        if dest not in args.given:
            setattr(args, dest, v)
    if params.get("Model") and "model" not in args.given:
        print(f"note: the PNG was made with {params['Model']}; this run uses --model {args.model}", file=sys.stderr)
    if params.get("Refiner") and "refiner" not in args.given:
        print(f"note: the PNG was finished by the refiner {params['Refiner']} from "
              f"{params.get('Refiner switch at', '?')}: pass --refiner (and --refiner-start) to do the same",
              file=sys.stderr)


def run_bench(args: argparse.Namespace) -> None:
    import importlib.metadata
    import importlib.util

    from ldm.loading.components import resolve_device
    from ldm.tools.bench import bench, table

    device = resolve_device(args.device)
    dtype = args.dtype if args.dtype != "auto" else "fp16" if device.type == "cuda" else "fp32"
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
    import platform

    import torch

    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else f"{os.cpu_count()} CPU threads"
    weights = f", weights {rows[0]['weight_gib']:.2f} GiB" if rows else ""
    versions = f"torch {torch.__version__}" + (f" (CUDA {torch.version.cuda})" if device.type == "cuda" else "")
    if with_diffusers:
        versions += f", diffusers {importlib.metadata.version('diffusers')}"
    print(f"{args.model or args.arch + ' (random weights)'}{weights}, {size}x{size}, {args.steps} steps "
          f"{args.sampler}, {dtype}, {gpu}, {platform.machine()}, {versions}")
    print(table(rows))


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    from ldm.choices import FORMS
    from ldm.serving.limits import Limits

    limits = Limits()
    parser.add_argument("--max-rows", type=int, default=limits.max_rows, help="rows per request (default: %(default)s)")
    parser.add_argument("--max-steps", type=int, default=limits.max_steps,
                        help="num_inference_steps a request may ask for (default: %(default)s)")
    parser.add_argument("--max-pixels", type=int, default=limits.max_pixels,
                        help="width × height of one image (default: %(default)s)")
    parser.add_argument("--max-images", type=int, default=limits.max_images_per_prompt,
                        help="num_images_per_prompt (default: %(default)s)")
    parser.add_argument("--response-format", default="rows", choices=FORMS,
                        help="rows: one object per image, as the SD 2.1/SDXL/inpainting cards show (default); "
                             "sd15 / sd14: the SD 1.5 / 1.4 cards' single object of lists")


def _manifest_names() -> list[str]:
    from ldm.loading.families import manifest

    try:
        return list(manifest())
    except LdmError:
        return []


def download(args: argparse.Namespace) -> None:
    from ldm.loading.components import hub_files
    from ldm.loading.families import lookup
    from ldm.loading.files import hub_file, is_hub_id, resolve, safetensors_header

    entry = lookup(args.model)
    if entry is None and not is_hub_id(args.model):
        raise LdmError(f"{args.model}: not a Hub repo id ('owner/name') or a manifest name "
                       f"({', '.join(_manifest_names())})")
    if args.single_file:
        if entry is None or entry.single_file is None:
            known = [e.name for e in (lookup(n) for n in _manifest_names()) if e and e.single_file]
            raise LdmError(f"{args.model}: no safetensors single file is known for it (known: {', '.join(known)})")
        if args.variant:
            raise LdmError("--variant selects files of a diffusers folder, not a single file")
        path = hub_file(entry.repo, entry.single_file, args.revision, force=args.force)
        files = [path]
    else:
        from huggingface_hub.utils import filter_repo_objects

        patterns = hub_files(args.variant)
        path = resolve(args.model, patterns, args.revision, force_download=args.force, downloading=True)
        # the snapshot folder is shared with other variants and single files: check only what this download asked for
        names = [p.relative_to(path).as_posix() for p in path.rglob("*.safetensors")]
        files = sorted(path / name for name in filter_repo_objects(names, allow_patterns=patterns))
        if not files:
            raise LdmError(f"{args.model}: the repo has no {'.' + args.variant if args.variant else ''}"
                           ".safetensors weights ldm reads (it never loads .ckpt/.bin pickles)")
    for file in files:
        safetensors_header(file)  # a damaged or truncated file is reported now, not at generation time
    print(path)


def info(args: argparse.Namespace) -> None:
    from ldm.loading.info import model_info

    print("\n".join(model_info(args.model, args.revision, args.variant).lines()))


def serve(args: argparse.Namespace) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise LdmError("ldm serve needs FastAPI and uvicorn: pip install -e '.[serve]'") from None
    from ldm.serving.scoring import Limits
    from ldm.serving.server import ServeConfig
    from ldm.serving.server import serve as run_server

    for name in ("max_rows", "max_steps", "max_pixels", "max_images", "queue_size", "port"):
        if getattr(args, name) < 1:
            raise LdmError(f"--{name.replace('_', '-')} must be at least 1")
    import torch

    batch_size = args.batch_size
    if batch_size is None:
        batch_size = 4 if args.device != "cpu" and torch.cuda.is_available() else 1
    if batch_size < 1 or args.timeout <= 0 or args.max_body_mb <= 0:
        raise LdmError("--batch-size must be at least 1, --timeout and --max-body-mb above 0")
    config = ServeConfig(Limits(args.max_rows, args.max_steps, args.max_pixels, args.max_images), args.queue_size,
                         int(args.max_body_mb * 1024 * 1024), args.timeout, form=args.response_format,
                         batch_size=batch_size, allow_image_urls=args.allow_image_urls)
    # a model that cannot be found or read is the user's error, said now (exit 2), not a server up and failed
    from ldm.loading.components import hub_files, read_folder, resolve_device
    from ldm.loading.files import resolve, safetensors_header

    resolve_device(args.device)
    check_refiner_options(args)
    check_vae_options(args)
    if args.offload:
        offload_device(args)
    for model in (args.model, args.refiner) if args.refiner else (args.model,):
        root = resolve(model, hub_files(args.variant), args.revision, args.local_files_only)
        if root.is_file() and args.variant is not None:
            raise LdmError(f"--variant {args.variant} selects files in a diffusers folder; {root} is a single file")
        if root.is_file():
            safetensors_header(root)  # exists, is not a pickle, and its header reads
        else:
            read_folder(root)  # model_index.json and the configs
    print(f"ldm: serving {args.model} on http://{args.host}:{args.port} (POST /score, GET /health, /docs); "
          "loading the model…", file=sys.stderr)
    run_server(lambda: load_model(args), args.model, args.host, args.port, config)


def check_refiner_options(args: argparse.Namespace) -> None:
    if args.refiner_start is not None and not args.refiner:
        raise LdmError("--refiner-start goes with --refiner")
    from ldm.pipelines.request import GenerationRequest

    GenerationRequest("", refiner_start=args.refiner_start).check()  # the library's range check and message


def batch(args: argparse.Namespace) -> int:
    """One process, or one rank of a torchrun job (its rows, its device); rank 0 speaks for the job."""
    from ldm.serving.batch import prepare_batch, run_batch
    from ldm.serving.distributed import Ranks

    if args.parameters is not None and not isinstance(args.parameters, dict):
        raise LdmError("--parameters must be a JSON object")
    if args.format != "azure" and (args.images or args.mini_batch_size):
        raise LdmError("--images and --mini-batch-size go with --format azure")
    settings = {k: getattr(args, k) for k in ("model", "variant", "revision", "prediction_type", "no_safety_checker",
                                              "dtype")}
    if args.refiner:  # (absent without one: a folder started before --refiner existed resumes as it was)
        settings |= {"refiner": args.refiner, "refiner_start": args.refiner_start}
    # what changes the images (absent when not given, so that a folder started before these options resumes)
    settings |= {k: getattr(args, k) for k in ("vae", "tiling", "vae_tiling", "vae_tile_size") if getattr(args, k)}
    check_refiner_options(args)
    check_vae_options(args)
    ranks = Ranks.from_env()
    args.device = ranks.device(args.device)  # under torchrun: cuda:LOCAL_RANK, or the CPU
    ranks.start(args.device)
    try:
        try:  # before the model loads; every rank reads the same and takes rank 0's word on the state
            if args.format == "azure":
                from ldm.serving.azure import read_folder

                source = read_folder(args.input, args.parameters, args.mini_batch_size or 1)
            else:
                source = args.input
            job = prepare_batch(source, args.output, args.parameters, args.seed, settings, ranks)
        except LdmError:
            if ranks.rank > 0:
                return 2  # rank 0 says why
            raise
        pipe = load_model(args) if job.left() else None  # (a finished batch again: its outputs written again)
        ran, skipped, failed = run_batch(pipe, job, progress=ProgressBar(unit="rows").show if ranks.rank == 0 else None,
                                         base64_in_results=args.base64_in_results)
        if ranks.rank == 0:
            written = "results.jsonl"
            if args.format == "azure":
                from ldm.serving.azure import write_predictions

                written = write_predictions(job, args.images or "base64").name + " and results.jsonl"
            on = f" on {ranks.world} ranks" if ranks.world > 1 else ""
            print(f"{args.output}: {ran} rows run{on}, {skipped} already done, {failed} failed (see {written})",
                  file=sys.stderr)
    finally:
        ranks.stop()
    return 1 if failed else 0


def generate(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise LdmError(f"-o {args.output}: the output must be a .png file")
    if not out.parent.is_dir():
        raise LdmError(f"-o {args.output}: folder {out.parent} does not exist")
    if args.preview_every is not None and args.preview_every < 1:
        raise LdmError(f"--preview-every must be at least 1, got {args.preview_every}")
    if args.attention_maps and (args.compile or args.compile_mode):
        raise LdmError("--attention-maps records attention as the eager networks compute it: leave out --compile")
    if args.attention_maps and Path(args.attention_maps).is_file():
        raise LdmError(f"--attention-maps {args.attention_maps}: a file; give a folder")

    from ldm.pipelines.images import load_image, numbered_paths, save_png
    from ldm.pipelines.request import IMAGE_PLACEHOLDER, MAX_SEED, GenerationRequest

    if args.from_png:
        from_png(args)
    if args.attention_maps and args.hires_scale is not None:
        raise LdmError("--attention-maps records one pass at one size: leave out --hires-scale")
    if args.prompt is None:
        raise LdmError("give a prompt (or --from-png IMAGE.png)")
    for path in args.embedding:
        if not Path(path).is_file():
            raise LdmError(f"--embedding {path}: no such file")
    loras = [lora_option(value) for value in args.lora]
    if args.refiner and args.image:
        raise LdmError("--refiner finishes a text-to-image run; it does not combine with --image")
    check_refiner_options(args)

    def flip(pair):  # W H on the command line, (height, width) in the pipelines
        return None if pair is None else (pair[1], pair[0])

    seed = secrets.randbits(32) if args.seed is None else args.seed
    if not args.image and args.num_images > 1 and isinstance(seed, int) and 0 <= seed <= MAX_SEED:
        # text-to-image: image i has seed + i (its PNG says so, and that seed alone gives it again, as in A1111);
        # image-to-image draws every image from one stream
        seed = [(seed + i) % (MAX_SEED + 1) for i in range(args.num_images)]
    request = GenerationRequest(
        args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
        guidance_rescale=args.guidance_rescale, seed=seed, width=args.width, height=args.height, sampler=args.sampler,
        karras=args.karras, eta=args.eta, num_images=args.num_images, strength=args.strength,
        image=IMAGE_PLACEHOLDER if args.image else None, mask=IMAGE_PLACEHOLDER if args.mask else None,  # (read below)
        original_size=flip(args.original_size), crop_coords=tuple(args.crop_coords) if args.crop_coords else None,
        target_size=flip(args.target_size), aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score, refiner_start=args.refiner_start,
        prompt_syntax=args.prompt_syntax, emphasis=args.emphasis, clip_skip=args.clip_skip,
        hires_scale=args.hires_scale, hires_steps=args.hires_steps, hires_denoise=args.hires_denoise,
        hires_upscaler=args.hires_upscaler)
    request.check()  # everything about the request is checked before gigabytes of weights are loaded
    image = load_image(args.image) if args.image else None
    mask = load_image(args.mask, "mask") if args.mask else None
    if mask is not None and mask.size != image.size:
        print(f"note: the mask ({mask.width}x{mask.height}) is resized to the image's {image.width}x{image.height}",
              file=sys.stderr)
    request = request.replace(image=image, mask=mask)
    if args.refiner_start is not None:
        request = request.replace(refiner_start=None)  # given to the pipeline (Refined) instead

    pipe = load_model(args)
    if "auto" in (args.device, args.dtype):
        from ldm.loading.components import DTYPES

        dtype = next(name for name, dt in DTYPES.items() if dt == pipe.dtype)
        print(f"ldm: {pipe.name} on {pipe.device}, {dtype}", file=sys.stderr)
    warn_size(pipe, args.width or (image.width if image else None), args.height or (image.height if image else None))
    for path in args.embedding:
        pipe.load_embedding(path)
    for path, weight in loras:
        pipe.load_lora(path, weight)
    bar = ProgressBar()
    callbacks = [bar]
    if args.preview_every:
        callbacks.append(Previews(pipe, out, args.preview_every))
    if args.attention_maps:
        from ldm.hooks.attention_maps import AttentionMaps
        from ldm.pipelines.images import fit_size

        width, height = (args.width, args.height) if image is None else fit_size(image, pipe.vae_scale)
        maps = AttentionMaps.for_pipeline(pipe, args.width or width, args.height or height, args.guidance)
        with maps:
            result = pipe(request, callbacks=callbacks)
        save_maps(maps, pipe, request, result, Path(args.attention_maps))
    else:
        result = pipe(request, callbacks=callbacks)
    if result.evaluations != bar.total and not (args.refiner or args.hires_scale):  # Heun: two a step; PNDM: its
        # second step twice (a refiner or a hires pass: two runs, two bars)
        print(f"({result.evaluations} UNet evaluations for {bar.total} steps)", file=sys.stderr)
    for note in dict.fromkeys(pipe.notes + result.notes):
        print(f"note: {note}", file=sys.stderr)
    if args.seed is None:
        print(f"seed: {result.seed}", file=sys.stderr)
    for picture, text, path, nsfw in zip(result.images, result.infotexts, numbered_paths(out, len(result.images)),
                                         result.nsfw, strict=True):
        save_png(picture, path, text)
        if nsfw:
            print(f"note: {path} was flagged by the safety checker and is black (--no-safety-checker skips the "
                  "check)", file=sys.stderr)
        print(path)


def save_maps(maps, pipe, request, result, folder: Path) -> None:
    """One heat map per prompt token over each image (several images: a subfolder each, 0/, 1/, …)."""
    from ldm.hooks.attention_maps import prompt_tokens, save_attention_maps

    tokens = prompt_tokens(pipe, request.prompt, request.prompt_syntax, request.emphasis)
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(result.images):
        save_attention_maps(maps, picture, tokens, folder if len(result.images) == 1 else folder / str(i), row=i)
    print(f"{folder}: attention maps of {len(tokens)} tokens", file=sys.stderr)


class Previews:
    """A step callback that decodes the denoiser's x0 estimate every `every` steps into OUT-stepNNN.png (with
    several images: OUT-stepNNN-1.png, …): how the image forms, at the cost of one VAE decode each time."""

    def __init__(self, pipe, out: Path, every: int):
        self.pipe, self.out, self.every, self.written, self.passes = pipe, out, every, set(), 0

    def begin(self, total: int) -> None:
        """A pass begins: a hires fix's second pass (or a refiner's part) writes OUT-pass2-stepNNN.png."""
        self.passes += 1
        self.written = set()

    def __call__(self, step) -> None:
        from ldm.pipelines.images import numbered_paths, save_png

        done = step.i + 1
        if done % self.every or done in self.written:  # (PNDM reports its doubled step twice)
            return
        self.written.add(done)
        images = self.pipe.decode(step.denoised)
        run = f"-pass{self.passes}" if self.passes > 1 else ""
        base = self.out.with_name(f"{self.out.stem}{run}-step{done:03d}{self.out.suffix}")
        for picture, path in zip(images, numbered_paths(base, len(images)), strict=True):
            save_png(picture, path, f"preview after step {done} of {step.total}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        command = {"generate": generate, "download": download, "info": info, "serve": serve, "batch": batch,
                   "bench": run_bench, "parity": parity.run}
        return command[args.command](args) or 0
    except LdmError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
