"""`ldm generate`'s image prompt (IP-Adapter) options: --ip-adapter MODEL with one or more --ip-image (their
encodings averaged); --ip-weight and --ip-image-encoder given once. One adapter per run from the command line
(the Python API takes several: `image_prompts=[ImagePrompt(…), …]`)."""

import argparse

from ldm.errors import LdmError


def add_image_prompt_options(gen: argparse.ArgumentParser) -> None:
    ip = gen.add_argument_group("image prompts (IP-Adapter)", "README: 'Image prompts (IP-Adapter)'")
    ip.add_argument("--ip-adapter", default=None, metavar="MODEL",
                    help="an IP-Adapter .safetensors file (h94/IP-Adapter's flat layout: plain, plus, full-face), or "
                         "its name in weights/ipadapter/")
    ip.add_argument("--ip-image", action="append", default=[], metavar="IMAGE",
                    help="its reference image; repeat for several (their encodings averaged)")
    ip.add_argument("--ip-weight", type=float, default=1.0, metavar="W",
                    help="the scale of its image attention, 0 to 2 (default: 1; 0.5 to 0.8 keeps more of the prompt)")
    ip.add_argument("--ip-start", type=float, default=0.0, metavar="F",
                    help="the fraction of the steps where it starts acting (default: 0)")
    ip.add_argument("--ip-end", type=float, default=1.0, metavar="F",
                    help="the fraction of the steps where it stops (default: 1)")
    ip.add_argument("--ip-image-encoder", default=None, metavar="ENCODER",
                    help="the CLIP image encoder: a CLIPVisionModelWithProjection folder (h94/IP-Adapter's "
                         "models/image_encoder, ViT-H; sdxl_models/image_encoder, ViT-bigG) or its name in "
                         "weights/clip_vision/ (default: the first there whose width the adapter reads)")


def image_prompts(args: argparse.Namespace) -> list:
    """The options as a list of `ldm.pipelines.request.ImagePrompt` (their images read); none without --ip-adapter."""
    from ldm.pipelines.images import load_image
    from ldm.pipelines.request import ImagePrompt

    if args.ip_adapter is None and not args.ip_image:
        return []
    if args.ip_adapter is None or not args.ip_image:
        raise LdmError("--ip-adapter and --ip-image go together: give the adapter and at least one reference image")
    images = [load_image(path, "reference image") for path in args.ip_image]
    return [ImagePrompt(args.ip_adapter, images, weight=args.ip_weight, start=args.ip_start, end=args.ip_end,
                        encoder=args.ip_image_encoder)]
