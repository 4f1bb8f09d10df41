"""The `ldm` command. Thin: parse, call the library, report. User errors → one line on stderr, exit 2."""

import argparse
import sys
import time
from pathlib import Path

from ldm.errors import LdmError
from ldm.samplers import SAMPLERS


class ProgressBar:
    """A one-line progress bar over the denoising steps, on stderr."""

    def __init__(self, width: int = 30):
        self.width, self.start = width, time.monotonic()

    def __call__(self, done: int, total: int) -> None:
        filled = self.width * done // total
        rate = f"{(time.monotonic() - self.start) / done:.2f} s/step"
        end = "\n" if done == total else ""
        print(f"\r[{'#' * filled}{'.' * (self.width - filled)}] {done}/{total} steps, {rate}",
              end=end, file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ldm", description="Latent diffusion in pure PyTorch.")
    sub = parser.add_subparsers(dest="command", required=True)
    gen = sub.add_parser(
        "generate", help="generate images from a text prompt",
        description="Generate images from a text prompt. Defaults (size, sampler) come from the model folder.")
    gen.add_argument("prompt", help="what to draw")
    gen.add_argument("--model", default="stable-diffusion-v1-5/stable-diffusion-v1-5",
                     help="a diffusers model folder or a Hub repo id (downloaded on first use); "
                          "default: %(default)s")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from")
    gen.add_argument("--steps", type=int, default=50, help="denoising steps (default: %(default)s)")
    gen.add_argument("--guidance", type=float, default=7.5,
                     help="classifier-free guidance scale; ≤ 1 turns it off (default: %(default)s)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    gen.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--sampler", default=None, choices=list(SAMPLERS),
                     help="sampler (default: the model folder's scheduler): "
                          + ", ".join(f"{name} ({spec.label})" for name, spec in SAMPLERS.items()))
    gen.add_argument("--guidance-rescale", type=float, default=0.0,
                     help="rescale guided output toward the conditional one's std, 0–1 (default: %(default)s)")
    gen.add_argument("--image", default=None,
                     help="start from this image (image-to-image), or repaint it with --mask; the output size "
                          "is its size rounded down to a multiple of 8 unless --width/--height are given")
    gen.add_argument("--mask", default=None,
                     help="inpainting mask for --image: white = repaint, black = keep (binarised at 50%%)")
    gen.add_argument("--strength", type=float, default=None,
                     help="how much of the schedule to run from --image, (0, 1] (default: 0.8; 1.0 with --mask)")
    gen.add_argument("--eta", type=float, default=0.0, help="DDIM's η: 0 deterministic, 1 DDPM-like noise")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate (default: %(default)s)")
    gen.add_argument("-o", "--output", default="output.png",
                     help="PNG path; several images: NAME.png, NAME-1.png, … (default: %(default)s)")
    gen.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    gen.add_argument("--dtype", default="auto", choices=("auto", "fp32", "fp16", "bf16"),
                     help="auto: fp16 on CUDA, fp32 on CPU")
    gen.add_argument("--variant", default=None, help="weights variant to load, e.g. fp16 (*.fp16.safetensors)")
    gen.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    return parser.parse_args(argv)


def generate(args: argparse.Namespace) -> None:
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise LdmError(f"-o {args.output}: the output must be a .png file")
    if not out.parent.is_dir():
        raise LdmError(f"-o {args.output}: folder {out.parent} does not exist")

    from ldm.images import load_image, numbered_paths, save_png
    from ldm.pipeline import StableDiffusion, check_request

    # everything about the request is checked before gigabytes of weights are loaded
    check_request(args.steps, args.width, args.height, args.guidance, args.num_images, args.seed, args.sampler,
                  args.eta, guidance_rescale=args.guidance_rescale, strength=args.strength)
    if args.mask and not args.image:
        raise LdmError("--mask needs the image it applies to (--image)")
    if args.strength is not None and not args.image:
        raise LdmError("--strength applies to image-to-image and inpainting: give an --image")
    image = load_image(args.image) if args.image else None
    mask = load_image(args.mask, "mask") if args.mask else None
    if mask is not None and mask.size != image.size:
        print(f"note: the mask ({mask.width}x{mask.height}) is resized to the image's {image.width}x{image.height}",
              file=sys.stderr)

    pipe = StableDiffusion.from_pretrained(args.model, device=args.device, dtype=args.dtype,
                                           variant=args.variant, revision=args.revision)
    result = pipe(args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
                  guidance_rescale=args.guidance_rescale, seed=args.seed, width=args.width, height=args.height,
                  sampler=args.sampler, num_images=args.num_images, eta=args.eta, image=image, mask=mask,
                  strength=args.strength, progress=ProgressBar())
    if args.seed is None:
        print(f"seed: {result.seed}", file=sys.stderr)
    for image, text, path in zip(result.images, result.infotexts, numbered_paths(out, len(result.images)),
                                 strict=True):
        save_png(image, path, text)
        print(path)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "generate":
            generate(args)
    except LdmError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ldm: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
