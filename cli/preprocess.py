"""`ldm preprocess`: one ControlNet preprocessor (`ldm.pipelines.preprocess`) run on one image and written as a PNG, to
look at the control image `ldm generate --control-preprocess` would make (before it is fitted to the output's size).
Its parameters have their own names here (--low, --high, …); on `generate` they are A1111's threshold A and B."""

import argparse
import secrets
from pathlib import Path

from ldm.choices import (
    CONTROL_PREPROCESSOR_PARAMS,
    CONTROL_PREPROCESSORS,
    CONTROL_PROCESSOR_RES,
    CONTROL_RESOLUTION_PREPROCESSORS,
)
from ldm.errors import LdmError

AT_RESOLUTION = ", ".join(CONTROL_RESOLUTION_PREPROCESSORS)


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `preprocess` on the `ldm` command's subparsers."""
    pre = subparsers.add_parser(
        "preprocess", help="make a ControlNet control image from a picture (canny, invert, threshold, tile, …)",
        description="Run one of sd-webui-controlnet's preprocessors that need no model on an image and write the "
                    "control image it makes: canny (edges), invert (white-background line art → white lines on "
                    "black), threshold (black and white), tile (shrunk by a rate), blur (Gaussian), shuffle (its "
                    "content moved by a random flow field of the seed). Needs OpenCV (pip install 'ldm[control]').")
    pre.add_argument("preprocessor", choices=list(CONTROL_PREPROCESSORS), metavar="PREPROCESSOR",
                     help=", ".join(CONTROL_PREPROCESSORS))
    pre.add_argument("image", metavar="IMAGE", help="the picture to make a control image of")
    pre.add_argument("-o", "--output", default=None,
                     help="the PNG to write (default: IMAGE's name with -PREPROCESSOR.png, in this folder)")
    for name, params in CONTROL_PREPROCESSOR_PARAMS.items():
        for option, what, default, low, high, _ in params:
            pre.add_argument(f"--{option}", type=float, default=None, metavar="N",
                             help=f"{name}'s {what}, {low:g} to {high:g} (default: {default:g})")
    pre.add_argument("--resolution", type=int, default=None, metavar="PX",
                     help=f"the short side {AT_RESOLUTION} work at, {CONTROL_PROCESSOR_RES[1]} to "
                          f"{CONTROL_PROCESSOR_RES[2]} (default: {CONTROL_PROCESSOR_RES[0]}, A1111's)")
    pre.add_argument("--seed", type=int, default=None,
                     help="shuffle's seed: the run's seed its flow field comes from (default: a random one, printed)")
    return pre


# each parameter option → the preprocessor it belongs to
OWNERS = {option: name for name, params in CONTROL_PREPROCESSOR_PARAMS.items() for option, *_ in params}


def options(args: argparse.Namespace) -> tuple:
    """(a, b, resolution, seed) for the preprocessor named, checked: an option of another preprocessor, or a value
    out of its range, is an LdmError."""
    from ldm.pipelines.preprocess import PREPROCESSORS, RESOLUTION

    name = args.preprocessor
    p = PREPROCESSORS[name]
    for option, owner in OWNERS.items():
        if owner != name and getattr(args, option) is not None:
            takes = ", ".join(f"--{q.option}" for q in p.params) or "no parameter"
            raise LdmError(f"--{option} is {owner}'s; {name} takes {takes}")
    if args.resolution is not None and not p.resolution:
        raise LdmError(f"--resolution applies to {AT_RESOLUTION}; {name} works at "
                       f"{'512' if name == 'shuffle' else 'the image size'}")
    if args.seed is not None and name != "shuffle":
        raise LdmError(f"--seed applies to shuffle, not to {name}")
    values = [getattr(args, q.option) for q in p.params]
    for value, q in [*zip(values, p.params, strict=True), (args.resolution, RESOLUTION)]:
        if value is not None and not q.accepts(value):
            raise LdmError(f"{name}'s --{q.option} ({q.what}) must be {q.rule}, got {value:g}")
    if args.seed is not None and args.seed < 0:
        raise LdmError(f"--seed must be 0 or more, got {args.seed}")
    seed = (secrets.randbits(32) if args.seed is None else args.seed) if name == "shuffle" else None
    a, b = (values + [None, None])[:2]
    return a, b, args.resolution, seed


def run(args: argparse.Namespace) -> None:
    import numpy as np
    from PIL import Image

    from ldm.pipelines.images import load_image
    from ldm.pipelines.preprocess import opencv_missing, preprocess

    a, b, resolution, seed = options(args)
    if missing := opencv_missing(args.preprocessor):
        raise LdmError(missing)
    image = load_image(args.image)
    out = Path(args.output or f"{Path(args.image).stem}-{args.preprocessor}.png")
    made = Image.fromarray(preprocess(np.asarray(image.convert("RGB")), args.preprocessor, a, b, resolution, seed))
    try:
        made.save(out, format="PNG")
    except OSError as e:
        raise LdmError(f"{out}: cannot write it ({e.strerror or e})") from None
    print(f"{out} ({made.width}x{made.height})" + (f", seed {seed}" if seed is not None else ""))
