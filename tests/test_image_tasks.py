"""SD 2.x text-to-image (v-prediction), image-to-image and inpainting through `ldm generate`, against
diffusers' StableDiffusionPipeline / StableDiffusionImg2ImgPipeline / StableDiffusionInpaintPipeline."""

import numpy as np
import pytest
import torch
from conftest import assert_images_close
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from official import diffusers_scheduler
from PIL import Image

from ldm_cli.main import main

PROMPT = "a red barn in a snowy field"

# (conftest.py) ldm and diffusers run in this process and are compared here: both at one thread
pytestmark = pytest.mark.usefixtures("one_thread")


def picture(width: int, height: int, seed: int = 0) -> Image.Image:
    """A smooth, colourful RGB test picture with some texture."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width] / max(width, height)
    base = np.stack([np.sin(6 * x + 1), np.cos(5 * y), np.sin(4 * (x + y))], -1) * 0.4 + 0.5
    noisy = np.clip(base + rng.normal(0, 0.05, base.shape), 0, 1)
    return Image.fromarray((noisy * 255).astype(np.uint8), "RGB")


def rectangle_mask(width: int, height: int, box: tuple[int, int, int, int]) -> Image.Image:
    mask = np.zeros((height, width), np.uint8)
    left, top, right, bottom = box
    mask[top:bottom, left:right] = 255
    return Image.fromarray(mask, "L")


LOADED = {}  # (pipeline class, folder) → (pipeline, the folder's scheduler): each loaded once


def load(cls, folder, sampler=None):
    """diffusers' `cls` on `folder` (loaded once, then reused), with a fresh scheduler: `sampler`'s, or the
    folder's own."""
    if (cls, folder) not in LOADED:
        pipe = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        LOADED[cls, folder] = pipe, pipe.scheduler
    pipe, scheduler = LOADED[cls, folder]
    pipe.scheduler = (diffusers_scheduler(sampler, scheduler.config) if sampler
                      else type(scheduler).from_config(scheduler.config))
    return pipe


def reference(pipe, seed, **kwargs) -> np.ndarray:
    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]
    assert out.std() > 0.04  # a real image, not a flat one that any output would match
    return (out * 255).round().astype(np.int16)


def generate(tmp_path, folder, *args) -> np.ndarray:
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(folder), "-o", str(out), *args]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def test_sd21_v_prediction_text_to_image(sd21_folder, tmp_path):
    # defaults from the folder: DDIM with v-prediction, native size (sample_size × 8)
    actual = generate(tmp_path, sd21_folder, "--steps", "8", "--seed", "11")
    expected = reference(load(StableDiffusionPipeline, sd21_folder), 11, num_inference_steps=8)
    assert_images_close("sd21 txt2img ddim-v", actual, expected)


# Not the DPM-Solver samplers: on this tiny random SD 2.1 model, guidance rescale makes their multistep
# chaotic — diffusers itself moves by 2.6e-2 relative (8 pixel levels) when its initial latents move by
# 1e-6. They are compared without rescale below; trajectory parity (test_samplers.py) covers the rest.
@pytest.mark.parametrize("sampler", ["euler", "pndm", "heun", "lms", "euler_a"])
def test_sd21_guidance_rescale(sd21_folder, tmp_path, sampler):
    actual = generate(tmp_path, sd21_folder, "--steps", "6", "--seed", "5", "--guidance-rescale", "0.7",
                      "--sampler", sampler)
    expected = reference(load(StableDiffusionPipeline, sd21_folder, sampler), 5, num_inference_steps=6,
                         guidance_rescale=0.7)
    assert_images_close(f"sd21 txt2img {sampler}-v rescale 0.7", actual, expected)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "dpmpp_2m_sde", "unipc"])
def test_sd21_dpm_solvers(sd21_folder, tmp_path, sampler):
    actual = generate(tmp_path, sd21_folder, "--steps", "6", "--seed", "5", "--sampler", sampler)
    expected = reference(load(StableDiffusionPipeline, sd21_folder, sampler), 5, num_inference_steps=6)
    assert_images_close(f"sd21 txt2img {sampler}-v", actual, expected)


@pytest.mark.parametrize("family, sampler", [("sd21", None), ("sd1", None), ("sd1", "euler_a"), ("sd1", "euler"),
                                             ("sd1", "lms"), ("sd1", "unipc")])
def test_image_to_image(request, tmp_path, family, sampler):
    folder = request.getfixturevalue(f"{family}_folder")
    init = picture(69, 77)  # → 64×72, rounded down to multiples of 8 as diffusers does
    init.save(tmp_path / "init.png")
    args = ["--image", str(tmp_path / "init.png"), "--strength", "0.6", "--steps", "10", "--seed", "21"]
    actual = generate(tmp_path, folder, *args, *(["--sampler", sampler] if sampler else []))
    expected = reference(load(StableDiffusionImg2ImgPipeline, folder, sampler), 21, image=init, strength=0.6,
                         num_inference_steps=10)
    assert actual.shape == (72, 64, 3)
    assert_images_close(f"{family} img2img {sampler or 'default'} strength 0.6", actual, expected)


def test_image_to_image_explicit_size_resizes(sd1_folder, tmp_path):
    init = picture(64, 64, seed=2)
    init.save(tmp_path / "init.png")
    actual = generate(tmp_path, sd1_folder, "--image", str(tmp_path / "init.png"), "--width", "48", "--height",
                      "56", "--steps", "5", "--seed", "4", "--sampler", "ddim")
    # diffusers' img2img pipeline takes no size; its image processor resizes with Lanczos, as done here
    resized = init.resize((48, 56), Image.Resampling.LANCZOS)
    expected = reference(load(StableDiffusionImg2ImgPipeline, sd1_folder, "ddim"), 4, image=resized,
                         num_inference_steps=5, strength=0.8)
    assert_images_close("sd1 img2img resized", actual, expected)


@pytest.mark.parametrize("sampler, strength", [(None, None), (None, 0.7), ("ddim", 0.7), ("euler_a", None)])
def test_nine_channel_inpainting(sd2_inpaint_folder, tmp_path, sampler, strength):
    image, mask = picture(64, 56, seed=3), rectangle_mask(64, 56, (16, 8, 48, 40))
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    args = ["--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "8",
            "--seed", "8", *(["--sampler", sampler] if sampler else []),
            *(["--strength", str(strength)] if strength else [])]
    actual = generate(tmp_path, sd2_inpaint_folder, *args)
    expected = reference(load(StableDiffusionInpaintPipeline, sd2_inpaint_folder, sampler), 8, image=image,
                         mask_image=mask, height=56, width=64, num_inference_steps=8, strength=strength or 1.0)
    assert_images_close(f"sd2-inpaint 9ch {sampler or 'pndm'} strength {strength or 1.0}", actual, expected)


@pytest.mark.parametrize("sampler, strength", [("ddim", None), ("euler", 0.75), ("euler_a", None), ("pndm", None),
                                               ("pndm", 0.7), ("dpmpp_2m", 0.8)])
def test_four_channel_model_with_a_mask_blends_like_diffusers(sd1_folder, tmp_path, sampler, strength):
    image, mask = picture(64, 64, seed=4), rectangle_mask(64, 64, (0, 20, 40, 64))
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    args = ["--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"), "--steps", "6",
            "--seed", "6", "--sampler", sampler, *(["--strength", str(strength)] if strength else [])]
    actual = generate(tmp_path, sd1_folder, *args)
    expected = reference(load(StableDiffusionInpaintPipeline, sd1_folder, sampler), 6, image=image, mask_image=mask,
                         height=64, width=64, num_inference_steps=6, strength=strength or 1.0)
    assert_images_close(f"sd1 4ch-inpaint {sampler} strength {strength or 1.0}", actual, expected)
    keep = np.asarray(mask) < 128
    source = np.asarray(image).astype(np.int16)
    assert np.abs(actual[keep] - source[keep]).mean() < np.abs(actual[~keep] - source[~keep]).mean()


def grey_mask(width: int, height: int, seed: int = 0) -> Image.Image:
    """A mask of random grey levels (uniform 0–255 per pixel): after resizing, which pixels repaint depends on the
    resampling filter and on the threshold."""
    levels = np.random.default_rng(seed).integers(0, 256, (height, width), dtype=np.uint8)
    return Image.fromarray(levels, "L")


def banded_mask(width: int, height: int) -> Image.Image:
    """Grey levels either side of 50%: the top 16 rows 127 (left half) and 128 (right half), the rest a horizontal
    gradient from 0 to 255. Bands wider than 8 pixels, so that the latent-size mask sees them too."""
    mask = np.zeros((height, width), np.uint8)
    mask[:16, : width // 2], mask[:16, width // 2:] = 127, 128
    mask[16:] = np.round(np.linspace(0, 255, width))[None].astype(np.uint8)
    return Image.fromarray(mask, "L")


INPAINT_FAMILIES = [("sd2_inpaint", "9ch"), ("sd1", "4ch")]


@pytest.mark.parametrize("family, kind", INPAINT_FAMILIES)
def test_mask_of_another_size_is_resized_to_the_image(request, tmp_path, capsys, family, kind):
    """A 16×14 mask of random greys on a 64×56 image: ldm resizes it to the image (Lanczos) and binarises it as
    diffusers' StableDiffusionInpaintPipeline's mask processor does (for the 9-channel UNet's input and the
    4-channel model's paste-back alike); the image is diffusers' within 2/255, and a note says the mask was
    resized."""
    folder = request.getfixturevalue(f"{family}_folder")
    image, mask = picture(64, 56, seed=6), grey_mask(16, 14, seed=1)
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    actual = generate(tmp_path, folder, "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
                      "--steps", "6", "--seed", "1", "--sampler", "ddim")
    assert "the mask (16x14) is resized to the image's 64x56" in capsys.readouterr().err
    expected = reference(load(StableDiffusionInpaintPipeline, folder, "ddim"), 1, image=image, mask_image=mask,
                         height=56, width=64, num_inference_steps=6)
    assert_images_close(f"{family} {kind} inpaint, 16x14 mask", actual, expected)


@pytest.mark.parametrize("family, kind", INPAINT_FAMILIES)
def test_grey_mask_is_binarised_at_half(request, tmp_path, family, kind):
    """A mask of greys (127 and 128 either side of 50%, and a 0–255 gradient) is binarised at 0.5 as diffusers'
    StableDiffusionInpaintPipeline binarises it (128 repaints, 127 keeps); the image is diffusers' within 2/255."""
    folder = request.getfixturevalue(f"{family}_folder")
    image, mask = picture(64, 56, seed=7), banded_mask(64, 56)
    image.save(tmp_path / "image.png")
    mask.save(tmp_path / "mask.png")
    actual = generate(tmp_path, folder, "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
                      "--steps", "6", "--seed", "2", "--sampler", "ddim")
    expected = reference(load(StableDiffusionInpaintPipeline, folder, "ddim"), 2, image=image, mask_image=mask,
                         height=56, width=64, num_inference_steps=6)
    assert_images_close(f"{family} {kind} inpaint, grey mask", actual, expected)


@pytest.mark.parametrize("args, message", [
    (["--mask", "m.png"], "--mask needs the image it applies to"),
    (["--strength", "0.5"], "--strength applies to image-to-image"),
    (["--image", "missing.png"], "image missing.png: no such file"),
    (["--image", "not-an-image.png"], "not a readable image"),
    (["--image", "image.png", "--strength", "1.5"], "strength must be in (0, 1]"),
    (["--image", "image.png", "--strength", "0.05", "--steps", "10"], "leaves no step to run"),
    (["--image", "image.png", "--guidance-rescale", "2"], "guidance rescale must be between 0 and 1"),
])
def test_image_task_errors(sd1_folder, tmp_path, capsys, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    picture(16, 16).save("image.png")
    (tmp_path / "not-an-image.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a PNG")
    code = main(["generate", PROMPT, "--model", str(sd1_folder), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err


def test_inpainting_model_needs_a_mask(sd2_inpaint_folder, tmp_path, capsys):
    code = main(["generate", PROMPT, "--model", str(sd2_inpaint_folder), "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "is an inpainting model (9-channel UNet)" in err
