"""SDXL base 1.0 and refiner 1.0 through `ldm generate`, against diffusers' StableDiffusionXLPipeline and
StableDiffusionXLImg2ImgPipeline on the same tiny official-layout folders and seeds."""

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF, assert_images_close
from diffusers import StableDiffusionXLImg2ImgPipeline, StableDiffusionXLPipeline
from official import diffusers_scheduler
from PIL import Image
from test_image_tasks import picture

from ldm.pipelines.stable_diffusion import StableDiffusion, StableDiffusionXL
from ldm_cli.main import main

PROMPT = "a lighthouse on a cliff at dawn"

# (conftest.py) ldm and diffusers run in this process and are compared here: both at one thread
pytestmark = pytest.mark.usefixtures("one_thread")

LOADED = {}  # (pipeline class, folder) → (pipeline, the folder's scheduler): each loaded once


def load(cls, folder, sampler=None):
    """diffusers' `cls` on `folder` (loaded once, then reused), with a fresh scheduler: `sampler`'s, or the
    folder's own."""
    if (cls, folder) not in LOADED:
        pipe = cls.from_pretrained(folder, add_watermarker=False)
        pipe.set_progress_bar_config(disable=True)
        LOADED[cls, folder] = pipe, pipe.scheduler
    pipe, scheduler = LOADED[cls, folder]
    pipe.scheduler = (diffusers_scheduler(sampler, scheduler.config) if sampler
                      else type(scheduler).from_config(scheduler.config))
    return pipe


@pytest.fixture(scope="module")
def base(sdxl_folder):
    """ldm's pipeline on the tiny SDXL base folder, for the tests that call it directly."""
    return StableDiffusion.from_pretrained(sdxl_folder)


def as_pixels(images) -> np.ndarray:
    assert images[0].std() > 0.04  # a real image, not a flat one that any output would match
    return (images[0] * 255).round().astype(np.int16)


def generate(tmp_path, *args) -> tuple[np.ndarray, str]:
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "-o", str(out), *args]) == 0
    image = Image.open(out)
    return np.asarray(image.convert("RGB")).astype(np.int16), image.text["parameters"]


@pytest.mark.parametrize("negative", [None, "blurry, watermark"])
def test_base_text_to_image(sdxl_folder, tmp_path, negative):
    # no negative prompt: the folder's force_zeros_for_empty_prompt makes the unconditional embeddings zeros
    actual, params = generate(tmp_path, "--model", str(sdxl_folder), "--steps", "6", "--seed", "12",
                              *(["--negative-prompt", negative] if negative else []))
    generator = torch.Generator("cpu").manual_seed(12)
    expected = as_pixels(load(StableDiffusionXLPipeline, sdxl_folder)(
        PROMPT, negative_prompt=negative, num_inference_steps=6, guidance_scale=7.5, generator=generator,
        output_type="np").images)
    assert_images_close(f"sdxl base, negative {negative!r}", actual, expected)
    assert "Sampler: Euler," in params  # the folder's EulerDiscreteScheduler


def test_base_micro_conditioning(sdxl_folder, tmp_path):
    actual, _ = generate(tmp_path, "--model", str(sdxl_folder), "--steps", "5", "--seed", "2", "--original-size",
                         "80", "48", "--crop-coords", "4", "8", "--target-size", "32", "64", "--sampler", "euler_a")
    expected = as_pixels(load(StableDiffusionXLPipeline, sdxl_folder, "euler_a")(
        PROMPT, num_inference_steps=5, guidance_scale=7.5, original_size=(48, 80), crops_coords_top_left=(4, 8),
        target_size=(64, 32), generator=torch.Generator("cpu").manual_seed(2), output_type="np").images)
    assert_images_close("sdxl base micro-conditioning euler_a", actual, expected)


GIVEN_SCORES = {"aesthetic_score": 8.5, "negative_aesthetic_score": 1.0}  # diffusers' defaults: 6.0 / 2.5
DEFAULT_SCORES = {"aesthetic_score": 6.0, "negative_aesthetic_score": 2.5}


def refine_with_diffusers(folder, init, **scores) -> np.ndarray:
    """diffusers' refiner image-to-image of `init` (its default strength 0.3, 10 steps, seed 7) with `scores`."""
    return as_pixels(load(StableDiffusionXLImg2ImgPipeline, folder)(
        PROMPT, image=init, num_inference_steps=10, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(7),
        output_type="np", **scores).images)


@pytest.mark.parametrize("scores", [{}, GIVEN_SCORES], ids=["default-scores", "given-scores"])
def test_refiner_image_to_image(sdxl_refiner_folder, tmp_path, scores):
    """`ldm generate --image` on the refiner equals StableDiffusionXLImg2ImgPipeline, with diffusers' default
    aesthetic scores and with --aesthetic-score / --negative-aesthetic-score given (each one moves this image by
    far more than the tolerance: `test_each_aesthetic_score_moves_the_refiner_image`)."""
    init = picture(64, 72, seed=5)
    init.save(tmp_path / "init.png")
    score_args = [arg for name, value in scores.items() for arg in (f"--{name.replace('_', '-')}", str(value))]
    actual, params = generate(tmp_path, "--model", str(sdxl_refiner_folder), "--image", str(tmp_path / "init.png"),
                              "--steps", "10", "--seed", "7", *score_args)
    expected = refine_with_diffusers(sdxl_refiner_folder, init, **scores)
    assert_images_close(f"sdxl refiner img2img strength 0.3, scores {scores or 'default'}", actual, expected)
    assert "Denoising strength: 0.3" in params


def test_each_aesthetic_score_moves_the_refiner_image(sdxl_refiner_folder):
    """Control for `test_refiner_image_to_image[given-scores]`: in diffusers, putting either score back to its
    default moves the image by well over the tolerance, so an ldm that ignored either score would fail there."""
    init = picture(64, 72, seed=5)
    given = refine_with_diffusers(sdxl_refiner_folder, init, **GIVEN_SCORES)
    for name, default in DEFAULT_SCORES.items():
        moved = np.abs(refine_with_diffusers(sdxl_refiner_folder, init, **(GIVEN_SCORES | {name: default})) - given)
        print(f"{name} {GIVEN_SCORES[name]} → {default}: max pixel difference {moved.max()}")
        assert moved.max() > 5 * MAX_PIXEL_DIFF


@pytest.mark.parametrize("sampler", [None, "euler_a"])
def test_base_to_refiner_hand_off(sdxl_folder, sdxl_refiner_folder, tmp_path, sampler):
    """`ldm generate --refiner` equals diffusers' base (denoising_end) then refiner (denoising_start) on one
    generator. The aesthetic scores go to the refiner alone (an SDXL base refuses them); they barely move its two
    low-noise steps here, so `test_refiner_image_to_image[given-scores]` is what proves they are used."""
    actual, params = generate(tmp_path, "--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder),
                              "--refiner-start", "0.8", "--steps", "10", "--seed", "3", "--aesthetic-score", "7",
                              "--negative-aesthetic-score", "2", *(["--sampler", sampler] if sampler else []))
    generator = torch.Generator("cpu").manual_seed(3)  # diffusers' documented use: one generator for both
    latents = load(StableDiffusionXLPipeline, sdxl_folder, sampler)(
        PROMPT, num_inference_steps=10, guidance_scale=7.5, denoising_end=0.8, generator=generator,
        output_type="latent").images
    expected = as_pixels(load(StableDiffusionXLImg2ImgPipeline, sdxl_refiner_folder, sampler)(
        PROMPT, image=latents, num_inference_steps=10, guidance_scale=7.5, denoising_start=0.8, aesthetic_score=7.0,
        negative_aesthetic_score=2.0, generator=generator, output_type="np").images)
    assert_images_close(f"sdxl base→refiner at 0.8, {sampler or 'euler'}", actual, expected)
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.8" in params


def test_hand_off_splits_the_schedule(base, sdxl_refiner_folder):
    assert isinstance(base, StableDiffusionXL) and base.text_encoder is not None
    refiner = StableDiffusion.from_pretrained(sdxl_refiner_folder)
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score
    steps = []
    first = base(PROMPT, steps=10, seed=1, denoising_end=0.8, callbacks=[lambda step: steps.append(step.total)])
    assert first.images == [] and first.latents.shape == (1, 4, 8, 8)
    refiner(PROMPT, steps=10, seed=1, latents=first.latents, denoising_start=0.8,
            callbacks=[lambda step: steps.append(step.total)])
    assert sorted(set(steps)) == [2, 8]  # timesteps ≥ 200 on the base, < 200 on the refiner


@pytest.mark.parametrize("model, args, message", [
    ("sdxl", ["--aesthetic-score", "6"], "aesthetic_score does not apply to an SDXL base model"),
    ("sdxl-refiner", ["--target-size", "64", "64", "--image", "init.png", "--steps", "10"],
     "target_size does not apply"),
    ("sd1", ["--original-size", "64", "64"], "original_size: SDXL micro-conditioning"),
    ("sdxl", ["--refiner", "x", "--refiner-start", "1.2"], "refiner start must be strictly between 0 and 1"),
    ("sdxl", ["--refiner", "x", "--image", "init.png"], "does not combine with --image"),
])
def test_sdxl_errors(request, tmp_path, monkeypatch, capsys, model, args, message):
    folder = request.getfixturevalue(f"{model.replace('-', '_')}_folder")
    monkeypatch.chdir(tmp_path)
    picture(64, 64).save("init.png")
    code = main(["generate", PROMPT, "--model", str(folder), "--steps", "2", *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_half_precision_keeps_the_force_upcast_vae_in_fp32(sdxl_folder, sd1_folder):
    xl = StableDiffusion.from_pretrained(sdxl_folder, dtype="fp16")
    assert next(xl.unet.parameters()).dtype == torch.float16
    assert next(xl.vae.parameters()).dtype == torch.float32  # the SDXL VAE overflows in fp16
    sd = StableDiffusion.from_pretrained(sd1_folder, dtype="fp16")
    assert next(sd.vae.parameters()).dtype == torch.float16  # as StableDiffusionPipeline


def test_nan_decode_is_an_error_not_a_black_image(base, monkeypatch):
    from ldm.errors import LdmError

    monkeypatch.setattr(base.vae, "decode", lambda z: torch.full((z.shape[0], 3, 64, 64), float("nan")))
    with pytest.raises(LdmError, match="NaN/inf"):
        base(PROMPT, steps=1, seed=0)


def test_refiner_needs_sdxl_on_both_sides(sd1_folder, sdxl_refiner_folder, capsys, tmp_path):
    code = main(["generate", PROMPT, "--model", str(sd1_folder), "--refiner", str(sdxl_refiner_folder), "--steps", "2",
                 "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "the hand-off is between SDXL models" in err and "Traceback" not in err
