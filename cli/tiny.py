"""`ldm tiny FAMILY DIR`: a tiny random model in the official diffusers layout of FAMILY (`ldm.tools.tiny`), 30 to
110 MB, to try every command without a download. Its weights are random: it draws noise."""

import argparse

FAMILY_NAMES = ("sd1", "sd2", "sd2-inpaint", "sdxl", "sdxl-refiner", "lcm")  # `sd21`, `lcm-sd1` are taken too
NOISE = ("its weights are random: it draws noise, not pictures (for trying the commands, the server and the "
         "Python API, and for `ldm parity`)")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `tiny` on the `ldm` command's subparsers."""
    parser = subparsers.add_parser(
        "tiny", help="write a tiny random model (draws noise) to try ldm without a download",
        description="Write a tiny model with random weights in the official diffusers folder layout of FAMILY "
                    "(SD 1.5, SD 2.1, SD 2 inpainting, SDXL base, SDXL refiner, LCM Dreamshaper) to DIR: the "
                    "same configs and files as the real model, only 30 to 110 MB. Every command takes it as "
                    f"--model DIR. Such a model {NOISE}.")
    parser.add_argument("family", metavar="FAMILY", choices=FAMILY_NAMES + ("sd21", "lcm-sd1"),
                        help=", ".join(FAMILY_NAMES))
    parser.add_argument("dir", metavar="DIR", help="the folder to write (created; must not hold a model already)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random weights (default: %(default)s)")
    return parser


def run(args: argparse.Namespace) -> None:
    from pathlib import Path

    from ldm.errors import InputError
    from ldm.tools.tiny import write_folder

    root = Path(args.dir).expanduser()
    if root.is_file() or (root / "model_index.json").exists():
        raise InputError(f"{args.dir}: already exists (choose another DIR or remove it)")
    write_folder(root, args.family, seed=args.seed)
    print(f"{root}: a tiny random {args.family} model; {NOISE}")
