"""`ldm generate`'s ControlNet options: units given by repeating --controlnet and --control-image (paired by order),
each option of a unit repeated as often (or given once for every unit). A preprocessor's parameters are A1111's
generic threshold A and B (--control-threshold-a/-b), not one option per preprocessor: one pair covers every
preprocessor, repeats per unit like the other options (units with different preprocessors each get theirs) and is
what sd-webui-controlnet's API and infotext hold."""

import argparse

from ldm.choices import (
    CONTROL_MODES,
    CONTROL_PREPROCESSOR_PARAMS,
    CONTROL_PREPROCESSORS,
    CONTROL_PROCESSOR_RES,
    CONTROL_RESIZE_MODES,
    CONTROL_RESOLUTION_PREPROCESSORS,
)
from ldm.errors import LdmError


def add_control_options(gen: argparse.ArgumentParser) -> None:
    control = gen.add_argument_group("ControlNet", "README: 'ControlNet'; repeat --controlnet and --control-image for "
                                                   "several units (their residuals are summed)")
    control.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                         help="a diffusers ControlNet folder, or its name in weights/controlnet/")
    control.add_argument("--control-image", action="append", default=[], metavar="IMAGE",
                         help="its control image (an edge map, a depth map, a pose…, or a picture --control-preprocess "
                              "makes one of), fitted to the output's size (--control-resize)")
    control.add_argument("--control-weight", action="append", type=float, default=[], metavar="W",
                         help="its residuals' scale, 0 to 2 (default: 1)")
    control.add_argument("--control-start", action="append", type=float, default=[], metavar="F",
                         help="the fraction of the steps where it starts acting (default: 0)")
    control.add_argument("--control-end", action="append", type=float, default=[], metavar="F",
                         help="the fraction of the steps where it stops (default: 1)")
    control.add_argument("--control-mode", action="append", default=[], choices=list(CONTROL_MODES),
                         help="A1111's control mode: balanced (default), prompt (my prompt is more important), "
                              "control (ControlNet is more important)")
    control.add_argument("--control-resize", action="append", default=[], choices=list(CONTROL_RESIZE_MODES),
                         help="how its image is fitted to the output's size (sd-webui-controlnet's resize modes): "
                              "just-resize (default: stretched, as diffusers does), crop-and-resize (scaled to cover "
                              "it, the centre kept), resize-and-fill (scaled to fit inside it, padded with its "
                              "border's colour)")
    control.add_argument("--control-preprocess", action="append", default=[], choices=["none", *CONTROL_PREPROCESSORS],
                         metavar="NAME",
                         help="make its control image from the picture given (sd-webui-controlnet's preprocessors; "
                              "see `ldm preprocess --help`): " + ", ".join(CONTROL_PREPROCESSORS) + "; none "
                              "(default): the image is the control image")
    control.add_argument("--control-threshold-a", action="append", type=float, default=[], metavar="A",
                         help="its preprocessor's first parameter (A1111's threshold A): " + params_help(0))
    control.add_argument("--control-threshold-b", action="append", type=float, default=[], metavar="B",
                         help="its preprocessor's second parameter (A1111's threshold B): " + params_help(1))
    control.add_argument("--control-processor-res", action="append", type=int, default=[], metavar="PX",
                         help=f"the short side {', '.join(CONTROL_RESOLUTION_PREPROCESSORS)} work at "
                              f"({CONTROL_PROCESSOR_RES[1]} to {CONTROL_PROCESSOR_RES[2]}; default: "
                              f"{CONTROL_PROCESSOR_RES[0]}, A1111's)")
    control.add_argument("--control-pixel-perfect", action="append", nargs="?", const=True, type=yes_no, default=[],
                         metavar="yes|no",
                         help="sd-webui-controlnet's Pixel Perfect: the processor resolution computed from the "
                              "image's size, the output's and the resize mode (instead of --control-processor-res); "
                              "alone: yes")
    control.add_argument("--guess-mode", action="store_true",
                         help="diffusers' guess mode for every unit: residuals × logspace(−1, 0), the conditional half "
                              "of guidance only")


def yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "on", "1"):
        return True
    if text.lower() in ("no", "false", "off", "0"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: give yes or no")


def params_help(which: int) -> str:
    """What --control-threshold-a (0) or -b (1) means for each preprocessor that has it: range and default."""
    return ", ".join(f"{name}'s {p[1]} ({p[3]:g} to {p[4]:g}, default {p[2]:g})"
                     for name, params in CONTROL_PREPROCESSOR_PARAMS.items() if len(params) > which
                     for p in [params[which]])


def per_unit(values: list, units: int, option: str, default):
    """One value per unit: as given, one given for all, or none (the default)."""
    if not values:
        return [default] * units
    if len(values) == 1:
        return values * units
    if len(values) != units:
        raise LdmError(f"{option} was given {len(values)} times for {units} ControlNet units: give it once for all, "
                       "or once per --controlnet")
    return values


def control_units(args: argparse.Namespace) -> list:
    """The options as a list of `ldm.pipelines.request.Control` (their images read)."""
    from ldm.pipelines.images import load_image
    from ldm.pipelines.request import Control

    units = len(args.controlnet)
    if len(args.control_image) != units:
        raise LdmError(f"{units} --controlnet for {len(args.control_image)} --control-image: give one image per "
                       "ControlNet, in the same order")
    options = {name: per_unit(getattr(args, f"control_{name}"), units, f"--control-{name.replace('_', '-')}", default)
               for name, default in (("weight", 1.0), ("start", 0.0), ("end", 1.0), ("mode", "balanced"),
                                     ("resize", "just-resize"), ("preprocess", "none"), ("threshold_a", None),
                                     ("threshold_b", None), ("processor_res", None), ("pixel_perfect", False))}
    return [Control(model, load_image(image, "control image"), weight=options["weight"][i],
                    start=options["start"][i], end=options["end"][i], mode=options["mode"][i],
                    guess_mode=args.guess_mode, resize=options["resize"][i],
                    preprocess=None if options["preprocess"][i] == "none" else options["preprocess"][i],
                    threshold_a=options["threshold_a"][i], threshold_b=options["threshold_b"][i],
                    processor_res=options["processor_res"][i], pixel_perfect=options["pixel_perfect"][i])
            for i, (model, image) in enumerate(zip(args.controlnet, args.control_image, strict=True))]
