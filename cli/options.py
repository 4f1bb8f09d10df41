"""What the commands share: the parser class, the model options (`ldm generate`, `ldm serve`, `ldm batch`) and
the request limits (`ldm serve`), and the model options as the library's `RunSettings`.

Importable without torch, as every module of the command line's parsers: `ldm --help` answers at once.
"""

import argparse
import sys

from ldm.choices import DTYPE_NAMES, FORMS, OFFLOAD_MODES

DTYPE_CHOICES = ("auto", *DTYPE_NAMES)
DEFAULT_MODEL = "stable-diffusion-v1-5/stable-diffusion-v1-5"


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


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """Which model to load and how: shared by generate, serve and batch (`run_settings` reads them)."""
    parser.add_argument("--model", default=DEFAULT_MODEL,
                        help="a diffusers model folder, an original single-file .safetensors checkpoint (a path, "
                             "or a file name in weights/), a Hub repo id or a weights/manifest.json name "
                             "(downloaded on first use); default: %(default)s")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    parser.add_argument("--dtype", default="auto", choices=DTYPE_CHOICES, help="auto: fp16 on CUDA, fp32 on CPU")
    parser.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (*.fp16.safetensors)")
    parser.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    parser.add_argument("--no-safety-checker", action="store_true",
                        help="skip the safety checker of models that ship one (SD 1.x): nothing is blacked out")
    parser.add_argument("--local-files-only", action="store_true",
                        help="never contact the Hub: a Hub model must be in the cache (as with HF_HUB_OFFLINE=1)")
    add_speed_options(parser)
    parser.add_argument("--prediction-type", default=None, choices=("eps", "v", "sample"),
                        help="override the model's prediction type (a single file does not store it: SD 2.x files "
                             "default to v, the 768-px models; pass eps for a 512-px SD 2.x base file or SD-Turbo, "
                             "sample for the 1-step SDXL-Lightning UNet)")
    parser.add_argument("--refiner", default=None,
                        help="an SDXL refiner (folder, single file or Hub id) that finishes the SDXL base's "
                             "text-to-image runs (the SDXL model card's base → refiner hand-off)")
    parser.add_argument("--refiner-start", type=float, default=None,
                        help="fraction of the schedule the base runs before the refiner takes over (default: 0.8)")
    add_vae_options(parser)
    parser.add_argument("--offload", default=None, choices=OFFLOAD_MODES,
                        help="for GPUs too small for the model: keep the weights on the CPU and bring each network "
                             "to the GPU only while it runs (model), or each layer only for its own forward "
                             "(sequential: least memory, slowest); the image is the same. Not with --compile")


def add_speed_options(parser: argparse.ArgumentParser) -> None:
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


def add_vae_options(parser: argparse.ArgumentParser) -> None:
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
                       help="use this VAE: a diffusers vae/ folder or a .safetensors VAE file of the model's family, "
                            "or TAESD (an AutoencoderTiny folder, taesd_decoder.safetensors)")
    large.add_argument("--unet", default=None, metavar="FILE_OR_FOLDER",
                       help="use this UNet (SDXL-Lightning's, lcm-sdxl's: the distilled UNets shipped alone): a "
                            "diffusers UNet folder or a .safetensors UNet file, diffusers- or LDM-named, that fits "
                            "the model")


def run_settings(args: argparse.Namespace, **overrides):
    """The model options as `ldm.pipelines.setup.RunSettings` (`overrides`: fields the command sets itself)."""
    from ldm.pipelines.setup import RunSettings

    return RunSettings(
        args.model, device=args.device, dtype=args.dtype, variant=args.variant, revision=args.revision,
        local_files_only=args.local_files_only, prediction_type=args.prediction_type,
        safety_checker=not args.no_safety_checker, vae=args.vae, unet=args.unet, vae_tiling=args.vae_tiling,
        vae_tile_size=args.vae_tile_size, seamless=args.tiling, compile=args.compile_mode or args.compile,
        cuda_graph=not args.no_cuda_graph, offload=args.offload, refiner=args.refiner,
        refiner_start=args.refiner_start, **overrides)


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """What one request may ask for (`ldm.serving.limits.Limits`), and the response form."""
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
