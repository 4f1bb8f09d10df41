"""`ldm generate`'s ControlNet options: units given by repeating --controlnet and --control-image (paired by order),
each option of a unit repeated as often (or given once for every unit)."""

import argparse

from ldm.choices import CONTROL_MODES
from ldm.errors import LdmError


def add_control_options(gen: argparse.ArgumentParser) -> None:
    control = gen.add_argument_group("ControlNet", "README: 'ControlNet'; repeat --controlnet and --control-image for "
                                                   "several units (their residuals are summed)")
    control.add_argument("--controlnet", action="append", default=[], metavar="MODEL",
                         help="a diffusers ControlNet folder, or its name in weights/controlnet/")
    control.add_argument("--control-image", action="append", default=[], metavar="IMAGE",
                         help="its control image (an edge map, a depth map, a pose…), resized to the output's size")
    control.add_argument("--control-weight", action="append", type=float, default=[], metavar="W",
                         help="its residuals' scale, 0 to 2 (default: 1)")
    control.add_argument("--control-start", action="append", type=float, default=[], metavar="F",
                         help="the fraction of the steps where it starts acting (default: 0)")
    control.add_argument("--control-end", action="append", type=float, default=[], metavar="F",
                         help="the fraction of the steps where it stops (default: 1)")
    control.add_argument("--control-mode", action="append", default=[], choices=list(CONTROL_MODES),
                         help="A1111's control mode: balanced (default), prompt (my prompt is more important), "
                              "control (ControlNet is more important)")
    control.add_argument("--guess-mode", action="store_true",
                         help="diffusers' guess mode for every unit: residuals × logspace(−1, 0), the conditional half "
                              "of guidance only")


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
    options = {name: per_unit(getattr(args, f"control_{name}"), units, f"--control-{name}", default)
               for name, default in (("weight", 1.0), ("start", 0.0), ("end", 1.0), ("mode", "balanced"))}
    return [Control(model, load_image(image, "control image"), weight=options["weight"][i],
                    start=options["start"][i], end=options["end"][i], mode=options["mode"][i],
                    guess_mode=args.guess_mode)
            for i, (model, image) in enumerate(zip(args.controlnet, args.control_image, strict=True))]
