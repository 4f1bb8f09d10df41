"""`ldm generate`: a prompt (or a PNG's parameters) → PNGs. The options become a `GenerationRequest` and the
model options a `RunSettings`; the library loads (`ldm.pipelines.setup`), runs and reads PNGs back
(`ldm.pipelines.infotext`); this module says what happened."""

import argparse
import sys
from pathlib import Path

from ldm.choices import HIRES_UPSCALERS, KARRAS_SAMPLERS, SAMPLER_LABELS, TIMESTEP_SPACINGS
from ldm.errors import LdmError
from ldm_cli.controls import add_control_options, control_units
from ldm_cli.image_prompts import add_image_prompt_options, image_prompts
from ldm_cli.options import add_model_options, run_settings


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `generate` on the `ldm` command's subparsers."""
    gen = subparsers.add_parser(
        "generate", help="generate images from a text prompt",
        description="Generate images from a text prompt. Defaults (size, sampler) come from the model folder.")
    gen.add_argument("prompt", nargs="?", default=None,
                     help="what to draw, in AUTOMATIC1111's prompt syntax: (word:1.3) emphasis, any length, BREAK, "
                          "embedding trigger words")
    gen.add_argument("--negative-prompt", default=None, help="what to steer away from")
    add_prompt_options(gen)
    add_sampling_options(gen)
    add_image_options(gen)
    add_sdxl_options(gen)
    add_output_options(gen)
    add_hires_options(gen)
    add_control_options(gen)
    add_image_prompt_options(gen)
    add_model_options(gen)
    return gen


def add_prompt_options(gen: argparse.ArgumentParser) -> None:
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
    prompts.add_argument("--from-png", "--from-image", dest="from_png", default=None, metavar="IMAGE",
                         help="take prompt, negative prompt, steps, sampler, schedule, CFG, seed, size, clip skip, "
                              "batch and strength from an image's A1111 parameters (a PNG's text chunk, a JPEG's or "
                              "WebP's EXIF UserComment); flags given beside it override them")


def add_sampling_options(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--steps", type=int, default=None,
                     help="denoising steps (default: 50, or the model card's: 1 for SD-Turbo, 4 for LCM)")
    gen.add_argument("--guidance", type=float, default=None,
                     help="classifier-free guidance scale; ≤ 1 turns it off (default: 7.5, or the model card's: "
                          "0 for the Turbo models)")
    gen.add_argument("--seed", type=int, default=None, help="random seed (default: a random one, printed)")
    gen.add_argument("--width", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--height", type=int, default=None, help="multiple of 8 (default: the model's native size)")
    gen.add_argument("--sampler", default=None, choices=list(SAMPLER_LABELS),
                     help="sampler (default: the model folder's scheduler): "
                          + ", ".join(f"{name} ({label})" for name, label in SAMPLER_LABELS.items()))
    gen.add_argument("--karras", action="store_true",
                     help="Karras et al.'s σ schedule, for: " + ", ".join(KARRAS_SAMPLERS))
    gen.add_argument("--timestep-spacing", default=None, choices=TIMESTEP_SPACINGS,
                     help="how the steps are spaced over the training timesteps (default: the model folder's "
                          "scheduler config, else each sampler's diffusers default); trailing for Turbo and "
                          "Lightning models; not for lcm, tcd")
    gen.add_argument("--guidance-rescale", type=float, default=0.0,
                     help="rescale guided output toward the conditional one's std, 0–1 (default: %(default)s)")


def add_image_options(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--image", default=None,
                     help="start from this image (image-to-image), or repaint it with --mask; the output size "
                          "is its size rounded down to a multiple of 8 unless --width/--height are given")
    gen.add_argument("--mask", default=None,
                     help="inpainting mask for --image: white = repaint, black = keep (binarised at 50%%)")
    gen.add_argument("--strength", type=float, default=None,
                     help="how much of the schedule to run from --image, (0, 1] (default: 0.8; 1.0 with --mask)")


def add_sdxl_options(gen: argparse.ArgumentParser) -> None:
    sdxl = gen.add_argument_group("SDXL", "micro-conditioning (diffusers' defaults: the output size, crop 0 0) "
                                          "and the base → refiner hand-off")
    sdxl.add_argument("--original-size", type=int, nargs=2, metavar=("W", "H"), default=None,
                      help="the size the image is to look as if it came from (default: the output size)")
    sdxl.add_argument("--crop-coords", type=int, nargs=2, metavar=("TOP", "LEFT"), default=None,
                      help="the crop it is to look as if it were cut from (default: 0 0, uncropped)")
    sdxl.add_argument("--target-size", type=int, nargs=2, metavar=("W", "H"), default=None, help="base only")
    sdxl.add_argument("--aesthetic-score", type=float, default=None, help="refiner only (default: 6.0)")
    sdxl.add_argument("--negative-aesthetic-score", type=float, default=None, help="refiner only (default: 2.5)")


def add_output_options(gen: argparse.ArgumentParser) -> None:
    gen.add_argument("--eta", type=float, default=None,
                     help="DDIM's η: 0 deterministic (its default), 1 DDPM-like noise; TCD's γ (its default: 0.3)")
    gen.add_argument("--num-images", type=int, default=1, help="images to generate (default: %(default)s)")
    gen.add_argument("-o", "--output", default="output.png",
                     help="PNG path; several images: NAME.png, NAME-1.png, … (default: %(default)s)")
    gen.add_argument("--preview-every", type=int, default=None, metavar="N",
                     help="every N steps, decode the current estimate of the final image to NAME-stepNNN.png")
    gen.add_argument("--preview-vae", default=None, metavar="TAESD",
                     help="decode the previews with this VAE instead of the model's: TAESD (an AutoencoderTiny "
                          "folder, or taesd_decoder.safetensors; taesdxl for SDXL), A1111's cheap live preview")
    gen.add_argument("--attention-maps", default=None, metavar="DIR",
                     help="write a cross-attention heat map per prompt token, overlaid on the image, and tokens.json "
                          "into DIR (README: 'Attention maps'; not with --compile)")


def add_hires_options(gen: argparse.ArgumentParser) -> None:
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


def given_options(parser: argparse.ArgumentParser, gen: argparse.ArgumentParser, argv: list[str] | None) -> set[str]:
    """Which of generate's options were given on the command line (they override a PNG's parameters): `argv`
    parsed again by `parser` with every default of `gen` suppressed."""
    for action in gen._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"command"}


def run(args: argparse.Namespace) -> None:
    out = check_options(args)
    batch_pos = apply_png(args) if args.from_png else None
    if args.attention_maps and args.hires_scale is not None:
        raise LdmError("--attention-maps records one pass at one size: leave out --hires-scale")
    if args.prompt is None:
        raise LdmError("give a prompt (or --from-png IMAGE.png)")
    loras = tuple(lora_option(value) for value in args.lora)
    if args.refiner and args.image:
        raise LdmError("--refiner finishes a text-to-image run; it does not combine with --image")
    settings = run_settings(args, embeddings=tuple(args.embedding), loras=loras).check()
    request = build_request(args)

    from ldm.pipelines.setup import dtype_name, prepare_pipeline

    pipe = prepare_pipeline(settings)
    if "auto" in (args.device, args.dtype):
        print(f"ldm: {pipe.name} on {pipe.device}, {dtype_name(pipe.dtype)}", file=sys.stderr)
    image = request.image
    warn_size(pipe, args.width or (image.width if image else None), args.height or (image.height if image else None))
    result, steps = run_pipeline(args, pipe, request, out)
    report(args, pipe, result, steps, out, batch_pos)


def check_options(args: argparse.Namespace) -> Path:
    """The output path, once checked with the options that go with it."""
    out = Path(args.output)
    if out.suffix.lower() != ".png":
        raise LdmError(f"-o {args.output}: the output must be a .png file")
    if not out.parent.is_dir():
        raise LdmError(f"-o {args.output}: folder {out.parent} does not exist")
    if args.preview_every is not None and args.preview_every < 1:
        raise LdmError(f"--preview-every must be at least 1, got {args.preview_every}")
    if args.preview_vae and not args.preview_every:
        raise LdmError("--preview-vae decodes the previews: give --preview-every N too")
    if args.attention_maps and (args.compile or args.compile_mode):
        raise LdmError("--attention-maps records attention as the eager networks compute it: leave out --compile")
    if args.attention_maps and Path(args.attention_maps).is_file():
        raise LdmError(f"--attention-maps {args.attention_maps}: a file; give a folder")
    return out


def apply_png(args: argparse.Namespace) -> int | None:
    """Fill the options not given on the command line from the A1111 parameters of `--from-png`. Returns the
    PNG's position in the batch that is made again to give its image (an image-to-image batch draws every image
    from one random stream), or None: the image is made alone."""
    from ldm.pipelines.infotext import read_png

    back = read_png(args.from_png, with_image=args.image is not None, given=frozenset(args.given))
    for name in back.fields - args.given:  # the request's fields are named as generate's options
        setattr(args, name, getattr(back.request, name))
    if "tiling" not in args.given:
        args.tiling = back.seamless
    apply_png_controls(args, back.controls)
    apply_png_image_prompts(args, back.image_prompts)
    model_file = args.model if Path(args.model).is_file() else None  # (its hash is the text's Model hash, or not)
    for note in back.notes(None if "model" in args.given else args.model, "refiner" in args.given,
                           frozenset(args.given), model_file):
        print(f"note: {note}", file=sys.stderr)
    if back.batch_pos is None or "num_images" in args.given:
        return None
    print(f"note: {args.from_png} is image {back.batch_pos + 1} of an image-to-image batch of {args.num_images}, "
          f"drawn from one random stream: the batch is made again and that image written to {args.output}",
          file=sys.stderr)
    return back.batch_pos


def apply_png_controls(args: argparse.Namespace, units: tuple[dict, ...]) -> None:
    """The PNG's ControlNet units, unless --controlnet is given: their models (by name, in weights/controlnet/) and
    settings; their control images must be given (--control-image, one per unit), as the PNG holds none."""
    if not units or "controlnet" in args.given:
        return
    if len(args.control_image) != len(units):
        raise LdmError(f"the PNG was made with {len(units)} ControlNet unit(s) ({', '.join(u['model'] for u in units)})"
                       f": give their control images (--control-image, {len(units)} times), or --controlnet")
    args.controlnet = [unit["model"] for unit in units]
    for name in ("weight", "start", "end", "mode", "resize", "preprocess", "threshold_a", "threshold_b",
                 "processor_res", "pixel_perfect"):
        if f"control_{name}" not in args.given:
            setattr(args, f"control_{name}", [unit[name] for unit in units])


def apply_png_image_prompts(args: argparse.Namespace, prompts: tuple[dict, ...]) -> None:
    """The PNG's IP-Adapter unit, unless --ip-adapter is given: its adapter (by name, in weights/ipadapter/), weight,
    start and end (each unless given); its reference image must be given (--ip-image), as the PNG holds none. The
    command line takes one adapter: a PNG of two is one error."""
    if not prompts or "ip_adapter" in args.given:
        return
    names = ", ".join(p["model"] for p in prompts)
    if len(prompts) > 1:
        raise LdmError(f"the PNG was made with {len(prompts)} IP-Adapter units ({names}); the command line takes one "
                       "(--ip-adapter to choose it, or the Python API's image_prompts=[…] for all)")
    if not args.ip_image:
        raise LdmError(f"the PNG was made with the IP-Adapter {names}: give its reference image (--ip-image), or "
                       "--ip-adapter")
    args.ip_adapter = prompts[0]["model"]
    for name in ("weight", "start", "end"):
        if f"ip_{name}" not in args.given:
            setattr(args, f"ip_{name}", prompts[0][name])


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


def build_request(args: argparse.Namespace):
    """The options as a checked `GenerationRequest`, its image and mask read."""
    from ldm.pipelines.images import load_image
    from ldm.pipelines.request import IMAGE_PLACEHOLDER, MAX_SEED, GenerationRequest, checked, derived, random_seed

    def flip(pair):  # W H on the command line, (height, width) in the pipelines
        return None if pair is None else (pair[1], pair[0])

    seed = random_seed() if args.seed is None else args.seed
    if not args.image and args.num_images > 1 and isinstance(seed, int) and 0 <= seed <= MAX_SEED:
        # text-to-image: image i has seed + i (its PNG says so, and that seed alone gives it again, as in A1111);
        # image-to-image draws every image from one stream
        seed = [(seed + i) % (MAX_SEED + 1) for i in range(args.num_images)]
    request = GenerationRequest(
        args.prompt, args.negative_prompt, steps=args.steps, guidance=args.guidance,
        guidance_rescale=args.guidance_rescale, seed=seed, width=args.width, height=args.height, sampler=args.sampler,
        karras=args.karras, timestep_spacing=args.timestep_spacing, eta=args.eta, num_images=args.num_images,
        strength=args.strength,
        image=IMAGE_PLACEHOLDER if args.image else None, mask=IMAGE_PLACEHOLDER if args.mask else None,  # (read below)
        original_size=flip(args.original_size), crop_coords=tuple(args.crop_coords) if args.crop_coords else None,
        target_size=flip(args.target_size), aesthetic_score=args.aesthetic_score,
        negative_aesthetic_score=args.negative_aesthetic_score, refiner_start=args.refiner_start,
        prompt_syntax=args.prompt_syntax, emphasis=args.emphasis, clip_skip=args.clip_skip,
        hires_scale=args.hires_scale, hires_steps=args.hires_steps, hires_denoise=args.hires_denoise,
        hires_upscaler=args.hires_upscaler)
    request = checked(request)  # everything about the request is checked before gigabytes of weights are loaded
    image = load_image(args.image) if args.image else None
    mask = load_image(args.mask, "mask") if args.mask else None
    if mask is not None and mask.size != image.size:
        print(f"note: the mask ({mask.width}x{mask.height}) is resized to the image's {image.width}x{image.height}",
              file=sys.stderr)
    request = derived(request, image=image, mask=mask)  # (one image, one mask: what the placeholders stood for)
    if args.controlnet or args.control_image:
        request = request.replace(controls=control_units(args)).check()
    if args.ip_adapter or args.ip_image:
        request = request.replace(image_prompts=image_prompts(args)).check()
    if args.refiner_start is not None:
        request = derived(request, refiner_start=None)  # given to the pipeline (the base with its refiner) instead
    return request


def warn_size(pipe, width: int | None, height: int | None) -> None:
    """Say what a size far above the model's native one means, before minutes pass without a step."""
    native = pipe.native_size
    ratio = (width or native) * (height or native) / native**2
    if ratio >= 4:
        print(f"note: {width or native}x{height or native} is {ratio:.0f}× the pixels of {pipe.name}'s native "
              f"{native}x{native}: the model draws best at its native size (larger ones repeat subjects), and a "
              f"step costs {ratio:.0f}× to {ratio**2:.0f}× a native step (attention grows with the square of "
              "the pixels)", file=sys.stderr)


def run_pipeline(args: argparse.Namespace, pipe, request, out: Path):
    """Run the request with the progress bar, the previews and the attention maps asked for: (the result, the
    steps the bar counted)."""
    from ldm.hooks.previews import Previews
    from ldm.hooks.progress import ProgressBar

    bar = ProgressBar()
    callbacks = [bar]
    if args.preview_every:
        callbacks.append(Previews(pipe, out, args.preview_every, preview_vae(pipe, args.preview_vae)))
    if not args.attention_maps:
        return pipe(request, callbacks=callbacks), bar.total
    from ldm.hooks.attention_maps import AttentionMaps
    from ldm.pipelines.images import fit_size

    image = request.image
    width, height = (args.width, args.height) if image is None else fit_size(image, pipe.vae_scale)
    maps = AttentionMaps.for_pipeline(pipe, args.width or width, args.height or height, args.guidance)
    with maps:
        result = pipe(request, callbacks=callbacks)
    save_maps(maps, pipe, request, result, Path(args.attention_maps))
    return result, bar.total


def preview_vae(pipe, source: str | None):
    """The VAE of `--preview-vae` for this model (None: the model's own decodes the previews)."""
    if source is None:
        return None
    from ldm.loading.components import load_vae

    return load_vae(source, pipe.vae.config, pipe.spec, pipe.device, pipe.dtype)


def save_maps(maps, pipe, request, result, folder: Path) -> None:
    """One heat map per prompt token over each image (several images: a subfolder each, 0/, 1/, …)."""
    from ldm.hooks.attention_maps import prompt_tokens, save_attention_maps

    tokens = prompt_tokens(pipe, request.prompt, request.prompt_syntax, request.emphasis)
    folder.mkdir(parents=True, exist_ok=True)
    for i, picture in enumerate(result.images):
        save_attention_maps(maps, picture, tokens, folder if len(result.images) == 1 else folder / str(i), row=i)
    print(f"{folder}: attention maps of {len(tokens)} tokens", file=sys.stderr)


def report(args: argparse.Namespace, pipe, result, steps: int, out: Path, batch_pos: int | None = None) -> None:
    """Write the PNGs and say what the run did: UNet evaluations other than the steps, notes, the seed drawn,
    the images the safety checker blacked out, and each PNG's path (on stdout). `batch_pos`: write only that image
    of the batch, to `out` (a PNG's image made again with its batch)."""
    from ldm.pipelines.images import numbered_paths, save_png

    if result.evaluations != steps and not (args.refiner or args.hires_scale):  # Heun: two a step; PNDM: its
        # second step twice (a refiner or a hires pass: two runs, two bars)
        print(f"({result.evaluations} UNet evaluations for {steps} step{'s' * (steps != 1)})", file=sys.stderr)
    for note in dict.fromkeys(pipe.notes + result.notes):
        print(f"note: {note}", file=sys.stderr)
    if args.seed is None:
        print(f"seed: {result.seed}", file=sys.stderr)
    written = list(zip(result.images, result.infotexts, numbered_paths(out, len(result.images)), result.nsfw,
                       strict=True))
    if batch_pos is not None:
        picture, text, _, nsfw = written[batch_pos]
        written = [(picture, text, out, nsfw)]
    for picture, text, path, nsfw in written:
        save_png(picture, path, text)
        if nsfw:
            print(f"note: {path} was flagged by the safety checker and is black (--no-safety-checker skips the "
                  "check)", file=sys.stderr)
        print(path)
