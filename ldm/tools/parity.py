"""`ldm parity`: ldm against diffusers and transformers on the user's own weights, one component at a time.

For a diffusers folder or an original single-file checkpoint (a fine-tune, a merge, a local change to ldm's
internals), both implementations load the same weights in fp32 on the same device and get identical inputs:

- each text tower: the hidden state the UNet is conditioned on (SD 1.x/2.x: the last layer through the final
  LayerNorm; SDXL: the penultimate layer, as diffusers' pipelines read it), ldm's tower against transformers'
  on the same token ids (diffusers' tokenizer's); the SDXL pooled embedding as well; and whether ldm's
  tokenizer produces those ids;
- one UNet call: the same latents, timestep and conditioning (transformers' text states, and for SDXL the
  pooled embedding and micro-conditioning);
- one VAE decode of the same latents;
- a whole generation with the same prompt, seed, sampler, steps and size (diffusers with the sampler's
  scheduler class built from the model's scheduler config and a CPU generator seeded like ldm's; an SDXL
  refiner runs image-to-image and an inpainting model inpaints, on a fixed synthetic picture and mask).

Modules are measured as max |ldm − reference| / max |reference| and held to the project's 1e-4; images as the
largest difference in 1/255 levels (and the mean), held to 2/255 (`Report.table` prints both).

A single file has no configs for diffusers' `from_single_file`, which would fetch them from the Hub: the
configs ldm infers from the tensor shapes are written to a temporary diffusers-layout folder and passed as
its `config=`, so diffusers' own key conversion is what is compared against ldm's.

diffusers and transformers are not dependencies of ldm: they are imported here, when a check runs.
"""

import json
import math
import tempfile
import warnings
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ldm.errors import InputError, LdmError

MODULE_TOLERANCE = 1e-4  # max relative error of an fp32 module output (the project standard)
IMAGE_TOLERANCE = 2  # largest pixel difference, in 1/255 levels
DEFAULT_PROMPT = "a photograph of an astronaut riding a horse"
DEFAULT_STEPS = 10
GUIDANCE = 7.5  # given to both: the pipelines' defaults differ (diffusers' SDXL pipelines take 5.0)
UNET_TIMESTEP = 500  # the timestep of the single UNet call: mid-schedule
MISSING_REFERENCE = ("ldm parity compares ldm with diffusers and transformers, which are not installed here "
                     "(pip install diffusers transformers)")
# ldm's sampler → the scheduler options that make its diffusers class run the same algorithm, whatever the
# model's scheduler config holds (a folder shipping the SDE variant, say)
SCHEDULER_SETTINGS = {"dpmpp_2m": {"algorithm_type": "dpmsolver++"},
                      "dpmpp_2m_sde": {"algorithm_type": "sde-dpmsolver++"}}


# ------------------------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Row:
    """One comparison: `error` (relative, 1/255 levels, or differing token ids) against `tolerance`."""

    component: str
    error: float
    tolerance: float
    unit: str  # "rel", "/255" or "ids"
    detail: str = ""  # the mean difference of an image, what was compared

    @property
    def ok(self) -> bool:
        return self.error <= self.tolerance  # NaN is never within tolerance

    def cells(self) -> tuple[str, str, str, str]:
        if self.unit == "rel":
            error, tolerance = f"{self.error:.1e}", f"{self.tolerance:.0e}"
        elif self.unit == "/255":
            error, tolerance = f"{self.error:g}/255", f"{self.tolerance:g}/255"
        else:
            error, tolerance = f"{self.error:g} ids differ", f"{self.tolerance:g}"
        verdict = "within tolerance" if self.ok else "OUT OF TOLERANCE"
        return self.component, error, tolerance, verdict + (f" ({self.detail})" if self.detail else "")


@dataclass
class Report:
    title: str  # the model, its kind, sampler, steps, size, seed, device and reference versions
    rows: list[Row] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(row.ok for row in self.rows)

    @property
    def status(self) -> int:
        """The command's exit status: 0 when every row is within tolerance, 1 otherwise."""
        return 0 if self.ok else 1

    def row(self, component: str) -> Row:
        return next(r for r in self.rows if r.component == component)

    def table(self) -> str:
        header = ("component", "max error", "tolerance", "verdict")
        cells = [header] + [row.cells() for row in self.rows]
        widths = [max(len(c[i]) for c in cells) for i in range(3)]
        lines = [self.title]
        for c in cells:
            lines.append("  ".join(x.ljust(w) for x, w in zip(c[:3], widths, strict=True)) + "  " + c[3])
        failed = sum(not row.ok for row in self.rows)
        lines.append("all within tolerance" if not failed else f"{failed} of {len(self.rows)} out of tolerance")
        return "\n".join(lines)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual − expected| / max |expected|, in float64."""
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    if actual.shape != expected.shape:
        return math.inf
    return ((actual - expected).abs().max() / expected.abs().max()).item()


# ------------------------------------------------------------------------------------------ inputs


def reference_libraries():
    """diffusers and transformers, or an LdmError in one line saying they are needed."""
    try:
        import diffusers
        import transformers
    except ImportError:
        raise LdmError(MISSING_REFERENCE) from None
    return diffusers, transformers


def locate(model: str) -> Path:
    """The user's weights: a diffusers folder or a .safetensors file (a path, or a name in weights/)."""
    from ldm.loading.families import weights_dir

    path = Path(model).expanduser()
    if not path.exists() and not path.is_absolute() and (weights_dir() / model).exists():
        path = weights_dir() / model
    if not path.exists():
        raise LdmError(f"{model}: no such file or folder (ldm parity checks a local diffusers folder or a "
                       f".safetensors single file; `ldm download` fetches official ones)")
    return path


def picture(width: int, height: int) -> Image.Image:
    """A fixed, smooth, colourful picture: the image-to-image and inpainting input."""
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    rgb = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 0.4 + 0.5
    return Image.fromarray((rgb * 255).round().astype(np.uint8), "RGB")


def mask(width: int, height: int) -> Image.Image:
    """White (repaint) in the middle half of the picture."""
    pixels = np.zeros((height, width), np.uint8)
    pixels[height // 4: height - height // 4, width // 4: width - width // 4] = 255
    return Image.fromarray(pixels, "L")


@contextmanager
def strict_fp32(device: torch.device):
    """fp32 that is fp32: no TF32 in CUDA matmuls and convolutions while the check runs."""
    if device.type != "cuda":
        yield
        return
    kept = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = kept


@contextmanager
def quiet(diffusers, transformers):
    """Keep the references' chatter off the report: loading progress bars, config-upgrade and deprecation
    notices, the keys of a single file they do not use."""
    libraries = [lib.utils.logging for lib in (diffusers, transformers)]
    kept = [(lib.get_verbosity(), lib.is_progress_bar_enabled()) for lib in libraries]
    for lib in libraries:
        lib.set_verbosity_error()
        lib.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", DeprecationWarning)
            yield
    finally:
        for lib, (verbosity, bars) in zip(libraries, kept, strict=True):
            lib.set_verbosity(verbosity)
            if bars:
                lib.enable_progress_bar()


# ------------------------------------------------------------------------------- diffusers pipeline


def describe(pipe) -> str:
    """SD 1.x, SD 2.x, SDXL base or SDXL refiner (+ inpainting): the loaded model's family (`ModelSpec.label`)."""
    return pipe.spec.label


def pipeline_class(pipe) -> str:
    """The diffusers pipeline that runs the task ldm's pipeline is checked on."""
    if pipe.spec.xl:
        if pipe.inpainting:
            return "StableDiffusionXLInpaintPipeline"
        return "StableDiffusionXLImg2ImgPipeline" if pipe.requires_aesthetics_score else "StableDiffusionXLPipeline"
    return "StableDiffusionInpaintPipeline" if pipe.inpainting else "StableDiffusionPipeline"


def write_config_folder(root: Path, checkpoint, class_name: str) -> Path:
    """A diffusers-layout folder without weights: model_index.json, each component's config.json as ldm
    inferred it from the single file (`ldm.loading.single_file.SingleFile`), the family's scheduler config, and CLIP's
    tokenizer files: what `from_single_file(config=…)` reads instead of fetching the Hub's."""
    from ldm.loading.single_file import TOWERS
    from ldm.networks.tokenizer import EOS, write_tokenizer_folder

    family = checkpoint.family

    def write(path: Path, obj: dict) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(obj, indent=2))

    index = {"_class_name": class_name, "scheduler": ["diffusers", checkpoint.scheduler["_class_name"]],
             "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"]}
    if family.xl:
        index |= {"force_zeros_for_empty_prompt": not family.refiner, "text_encoder": [None, None],
                  "tokenizer": [None, None]}
        if family.refiner:
            index["requires_aesthetics_score"] = True
    else:
        index |= {"safety_checker": [None, None], "feature_extractor": [None, None],
                  "requires_safety_checker": False}
    for component, _, kind in TOWERS[family.key]:
        config = checkpoint.configs[component]
        tokenizer = component.replace("text_encoder", "tokenizer")
        index |= {component: ["transformers", config["architectures"][0]], tokenizer: ["transformers",
                                                                                     "CLIPTokenizer"]}
        write(root / component / "config.json", {"model_type": "clip_text_model"} | config)
        write_tokenizer_folder(root / tokenizer, pad_token=EOS if kind == "clip" else "!")
    write(root / "unet" / "config.json", {"_class_name": "UNet2DConditionModel"} | checkpoint.configs["unet"])
    write(root / "vae" / "config.json", {"_class_name": "AutoencoderKL"} | checkpoint.configs["vae"])
    write(root / "scheduler" / "scheduler_config.json", checkpoint.scheduler)
    write(root / "model_index.json", index)
    return root


def reference_pipeline(diffusers, path: Path, pipe, sampler: str, device: torch.device):
    """diffusers' pipeline on the same weights, fp32, with the scheduler that runs ldm's `sampler`."""
    from ldm.sampling.samplers import SAMPLERS

    name = pipeline_class(pipe)
    cls = getattr(diffusers, name)
    extra = {} if pipe.spec.xl else {"safety_checker": None, "feature_extractor": None,
                                                        "requires_safety_checker": False}
    if path.is_dir():
        ref = cls.from_pretrained(path, torch_dtype=torch.float32, **extra)
    else:
        from ldm.loading.files import read_safetensors
        from ldm.loading.single_file import read_single_file

        checkpoint = read_single_file(read_safetensors(path))
        with tempfile.TemporaryDirectory(prefix="ldm-parity-") as tmp:
            config = write_config_folder(Path(tmp), checkpoint, name)
            extra.pop("requires_safety_checker", None)
            try:
                ref = cls.from_single_file(str(path), config=str(config), torch_dtype=torch.float32,
                                           local_files_only=True, **extra)
            except Exception as e:  # diffusers' loader, not ldm, refused the file: say so rather than guess
                raise LdmError(f"{path}: diffusers' from_single_file could not load it offline with the configs "
                               f"ldm inferred ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                               "convert it to a diffusers folder to compare") from None
    ref.to(device)
    ref.set_progress_bar_config(disable=True)
    spec = SAMPLERS[sampler]
    ref.scheduler = getattr(diffusers, spec.diffusers_class).from_config(ref.scheduler.config,
                                                                          **SCHEDULER_SETTINGS.get(sampler, {}))
    return ref


# ------------------------------------------------------------------------------------- comparisons


@torch.no_grad()
def compare_text(pipe, ref, prompt: str) -> tuple[list[Row], torch.Tensor, torch.Tensor | None]:
    """Rows for each tower (tokens, the hidden state the UNet reads, SDXL's pooled embedding), and
    transformers' conditioning (context, pooled) for the UNet call."""
    xl = pipe.spec.xl
    rows, contexts, pooled = [], [], None
    towers = pipe.text_towers()
    for name, tokenizer, encoder, layer, final_norm in towers:
        ref_tokenizer = getattr(ref, name.replace("text_encoder", "tokenizer"))
        ref_encoder = getattr(ref, name)
        ids = ref_tokenizer(prompt, padding="max_length", max_length=ref_tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids
        ours = tokenizer(prompt)
        differ = int((ours != ids).sum()) if ours.shape == ids.shape else max(ours.numel(), ids.numel())
        rows.append(Row(name.replace("text_encoder", "tokenizer"), differ, 0, "ids",
                        f"of {ids.shape[1]}, ldm's tokenizer against transformers'"))
        ids = ids.to(pipe.device)
        # diffusers' rule: SD reads the last hidden state (final LayerNorm applied), SDXL the penultimate layer
        out = ref_encoder(ids, output_hidden_states=True)
        expected = out.hidden_states[-2] if xl else out.last_hidden_state
        got = encoder(ids, layer=layer, final_norm=final_norm)
        rows.append(Row(name, max_rel_err(got.hidden, expected), MODULE_TOLERANCE, "rel",
                        "penultimate hidden state" if xl else "last hidden state"))
        contexts.append(expected)
        if xl and name == towers[-1][0]:  # the pooled embedding SDXL conditions on: the last tower's
            pooled = out.text_embeds
            rows.append(Row(f"{name} pooled", max_rel_err(got.pooled, pooled), MODULE_TOLERANCE, "rel"))
    return rows, torch.cat(contexts, dim=-1), pooled


@torch.no_grad()
def compare_unet(pipe, ref, context: torch.Tensor, pooled: torch.Tensor | None, width: int, height: int,
                 generator: torch.Generator) -> Row:
    cfg = pipe.unet.config
    x = torch.randn((1, cfg.in_channels, height // pipe.vae_scale, width // pipe.vae_scale), generator=generator)
    x = x.to(pipe.device)
    t = torch.tensor(float(UNET_TIMESTEP), device=pipe.device)
    ours, theirs = {}, {}
    if cfg.addition_embed_type == "text_time":
        micro = (height, width, 0, 0, 6.0) if pipe.requires_aesthetics_score else (height, width, 0, 0, height,
                                                                                     width)
        added = {"text_embeds": pooled, "time_ids": torch.tensor([micro], dtype=torch.float32, device=pipe.device)}
        ours, theirs = added, {"added_cond_kwargs": added}
    got = pipe.unet(x, t, context=context, **ours)
    expected = ref.unet(x, t, encoder_hidden_states=context, **theirs).sample
    return Row("unet", max_rel_err(got, expected), MODULE_TOLERANCE, "rel", f"one call at t={UNET_TIMESTEP}")


@torch.no_grad()
def compare_vae(pipe, ref, width: int, height: int, generator: torch.Generator) -> Row:
    cfg = pipe.vae.config
    z = torch.randn((1, cfg.latent_channels, height // pipe.vae_scale, width // pipe.vae_scale), generator=generator)
    z = (z / cfg.scaling_factor).to(pipe.device)  # the spread of the latents a pipeline decodes
    return Row("vae decode", max_rel_err(pipe.vae.decode(z), ref.vae.decode(z).sample), MODULE_TOLERANCE, "rel")


def compare_images(pipe, ref, prompt: str, sampler: str, steps: int, width: int, height: int, seed: int) -> Row:
    """A whole generation on both: text-to-image, or the refiner's image-to-image, or inpainting."""
    task, size = {}, {"width": width, "height": height}
    if pipe.inpainting:
        task = {"image": picture(width, height), "mask": mask(width, height)}
    elif pipe.spec.requires_aesthetics_score:
        task, size = {"image": picture(width, height)}, {}
    ours = pipe(prompt, steps=steps, seed=seed, width=width, height=height, sampler=sampler, guidance=GUIDANCE,
                prompt_syntax="plain", **task).images[0]
    reference_task = {"mask_image": task["mask"], "image": task["image"]} if "mask" in task else task
    generator = torch.Generator("cpu").manual_seed(seed)  # on the CPU, as ldm draws (design decision 4)
    theirs = ref(prompt, num_inference_steps=steps, guidance_scale=GUIDANCE, generator=generator, output_type="np",
                 **size, **reference_task).images[0]
    actual = np.asarray(ours.convert("RGB")).astype(np.int16)
    expected = (theirs * 255).round().astype(np.int16)
    if actual.shape != expected.shape:
        return Row("image", math.inf, IMAGE_TOLERANCE, "/255", f"shapes {actual.shape} and {expected.shape}")
    diff = np.abs(actual - expected)
    what = "inpainting" if "mask" in task else "image-to-image" if task else "text-to-image"
    return Row("image", float(diff.max()), IMAGE_TOLERANCE, "/255", f"mean {diff.mean():.2g}/255, {what}")


# ------------------------------------------------------------------------------------------- check


def check_comparable(pipe, steps: int, width: int, height: int) -> None:
    """An InputError for what the loaded model cannot be compared at: a size off its VAE's multiple, or (the SDXL
    refiner, compared on image-to-image) too few steps for its strength to leave one."""
    for name, value in (("width", width), ("height", height)):
        if value < pipe.vae_scale or value % pipe.vae_scale:
            raise InputError(f"--size: the {name} must be a positive multiple of {pipe.vae_scale}, got {value}")
    if pipe.spec.requires_aesthetics_score and int(steps * pipe.default_strength) < 1:
        raise InputError(f"the SDXL refiner is checked on image-to-image at strength {pipe.default_strength}, "
                         f"which runs int(steps × {pipe.default_strength}) steps: pass --steps "
                         f"{math.ceil(1 / pipe.default_strength)} or more")


def check(model: str | Path, sampler: str | None = None, steps: int = DEFAULT_STEPS,
          size: tuple[int, int] | None = None, device: str = "auto", seed: int = 0, prompt: str = DEFAULT_PROMPT,
          adjust: Callable | None = None, log: Callable[[str], None] = lambda message: None) -> Report:
    """Compare ldm with diffusers/transformers on `model` (a diffusers folder or a .safetensors file).

    `sampler`: one of ldm's (default: the model's scheduler's); `size`: (width, height) in pixels (default:
    the native size); `adjust(pipe)` is called on ldm's loaded pipeline before anything runs: a change to
    ldm's side under test (a patched module, an edited weight), the reference left as it is.
    """
    from ldm.pipelines.stable_diffusion import StableDiffusion
    from ldm.sampling.samplers import SAMPLERS

    diffusers, transformers = reference_libraries()
    path = locate(str(model))
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if not isinstance(steps, int) or steps < 1:
        raise InputError(f"--steps must be a whole number ≥ 1, got {steps!r}")
    log(f"loading {path} with ldm…")
    pipe = StableDiffusion.from_pretrained(path, device=device, dtype="fp32", safety_checker=False)
    if adjust is not None:
        adjust(pipe)
    sampler = sampler or pipe.default_sampler
    if sampler is None:
        raise InputError(f"{pipe.name}'s scheduler ({pipe.scheduler.class_name}) is not one ldm implements; "
                         f"pass --sampler (one of {', '.join(SAMPLERS)})")
    native = pipe.native_size
    width, height = size or (native, native)
    check_comparable(pipe, steps, width, height)
    dev = pipe.device
    with strict_fp32(dev), quiet(diffusers, transformers):
        log(f"loading {path} with diffusers {diffusers.__version__}…")
        ref = reference_pipeline(diffusers, path, pipe, sampler, dev)
        kind = "single file" if path.is_file() else "diffusers folder"
        report = Report(f"ldm parity: {path.name} ({describe(pipe)}, {kind}); {sampler}, {steps} steps, "
                        f"{width}x{height}, seed {seed}, {dev} fp32; against diffusers {diffusers.__version__}, "
                        f"transformers {transformers.__version__}")
        generator = torch.Generator("cpu").manual_seed(seed)
        log("comparing the text towers, one UNet call and a VAE decode…")
        rows, context, pooled = compare_text(pipe, ref, prompt)
        report.rows += rows
        report.rows.append(compare_unet(pipe, ref, context, pooled, width, height, generator))
        report.rows.append(compare_vae(pipe, ref, width, height, generator))
        log(f"generating with both ({sampler}, {steps} steps)…")
        report.rows.append(compare_images(pipe, ref, prompt, sampler, steps, width, height, seed))
    return report
