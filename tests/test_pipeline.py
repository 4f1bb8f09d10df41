"""Whole images through the `ldm generate` CLI against diffusers' StableDiffusionPipeline on the same folder."""

import shutil

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF
from diffusers import StableDiffusionPipeline
from official import diffusers_scheduler, write_folder
from PIL import Image

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm_cli.main import main

PROMPT = "a photograph of an astronaut riding a horse"

# (conftest.py) every comparison here is within this process: ldm and the references at one thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def reference(sd1_folder):
    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.folder_scheduler_config = dict(pipe.scheduler.config)  # each test's scheduler starts from the folder's
    return pipe


def diffusers_images(pipe, sampler, seed, steps=6, karras=False, **kwargs):
    config = getattr(pipe, "folder_scheduler_config", pipe.scheduler.config)
    pipe.scheduler = diffusers_scheduler(sampler, config, karras)
    # the tiny fixture's native size is 64; diffusers would upgrade its sample_size of this old-version config
    generator = [torch.Generator("cpu").manual_seed(s) for s in seed] if isinstance(seed, list) else \
        torch.Generator("cpu").manual_seed(seed)
    out = pipe(PROMPT, num_inference_steps=steps, height=64, width=64, generator=generator, output_type="np",
               **kwargs).images
    return (out * 255).round().astype(np.int16)


def read_png(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("sampler, karras", [(None, False), ("pndm", False), ("ddim", False), ("euler", False),
                                             ("heun", False), ("lms", False), ("dpmpp_2m", False),
                                             ("dpmpp_2m", True), ("dpmpp_2m_sde", False), ("euler", True),
                                             ("lms", True), ("euler_a", False), ("unipc", False),
                                             ("unipc", True)])
def test_cli_image_equals_diffusers(sd1_folder, reference, tmp_path, capsys, sampler, karras):
    out = tmp_path / "astronaut.png"
    args = ["generate", PROMPT, "--model", str(sd1_folder), "--steps", "6", "--seed", "42", "-o", str(out)]
    assert main(args + (["--sampler", sampler] if sampler else []) + (["--karras"] if karras else [])) == 0
    expected = diffusers_images(reference, sampler or "pndm", seed=42, karras=karras)[0]  # default: PNDM
    diff = np.abs(read_png(out) - expected).max()
    print(f"{sampler or 'default(pndm)'}{' karras' if karras else ''}: max pixel difference {diff}")
    assert diff <= MAX_PIXEL_DIFF
    assert expected.std() > 10  # a real image, not a flat one that any output would match


def test_negative_prompt_and_several_images(sd1_folder, reference, tmp_path):
    out = tmp_path / "pair.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "5", "--seed", "3", "--sampler",
                 "euler", "--negative-prompt", "blurry, low quality", "--num-images", "2", "--guidance", "5",
                 "-o", str(out)]) == 0
    # image i has seed 3 + i, as in A1111: diffusers with one generator per image
    expected = diffusers_images(reference, "euler", seed=[3, 4], steps=5, negative_prompt="blurry, low quality",
                                num_images_per_prompt=2, guidance_scale=5.0)
    for path, exp in zip([out, tmp_path / "pair-1.png"], expected, strict=True):
        assert np.abs(read_png(path) - exp).max() <= MAX_PIXEL_DIFF
    params = Image.open(out).text["parameters"]
    assert params.splitlines()[0] == PROMPT
    assert params.splitlines()[1] == "Negative prompt: blurry, low quality"
    assert "Steps: 5, Sampler: Euler, CFG scale: 5.0, Seed: 3, Size: 64x64, Model: tiny-sd1" in params
    assert "Batch size: 2, Batch pos: 0" in params
    second = Image.open(tmp_path / "pair-1.png").text["parameters"]
    assert "Seed: 4, " in second  # the seed that gives the second image on its own
    alone = tmp_path / "alone.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "5", "--seed", "4", "--sampler",
                 "euler", "--negative-prompt", "blurry, low quality", "--guidance", "5", "-o", str(alone)]) == 0
    assert np.abs(read_png(alone) - read_png(tmp_path / "pair-1.png")).max() <= MAX_PIXEL_DIFF


def test_guidance_off_runs_the_unet_once(sd1_folder, reference, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    image = pipe(PROMPT, steps=3, seed=9, sampler="ddim", guidance=1.0).images[0]
    assert calls == [1, 1, 1]  # no unconditional batch when guidance ≤ 1, as in diffusers
    expected = diffusers_images(reference, "ddim", seed=9, steps=3, guidance_scale=1.0)[0]
    assert np.abs(np.asarray(image).astype(np.int16) - expected).max() <= MAX_PIXEL_DIFF


def test_fp16_variant_files(sd1_folder, reference, tmp_path):
    """`--variant fp16` reads each component's `*.fp16.safetensors`, as diffusers' `variant="fp16"` does: the
    image equals StableDiffusionPipeline's loaded with that variant. The variant files here hold another random
    model's weights (not the fp32 files rounded to fp16, which move the image by ≤ 1/255), so a variant that
    is ignored gives a visibly different image."""
    folder = tmp_path / "tiny-sd1-variant"
    shutil.copytree(sd1_folder, folder)
    other = write_folder(tmp_path / "other", "sd1", seed=77, fp16_variant=True)
    variants = sorted(other.glob("*/*.fp16.safetensors"))
    assert {p.parent.name for p in variants} == {"unet", "vae", "text_encoder", "safety_checker"}
    for path in variants:
        shutil.copyfile(path, folder / path.relative_to(other))
    ref = StableDiffusionPipeline.from_pretrained(folder, variant="fp16", torch_dtype=torch.float32,
                                                  safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False)
    ref.set_progress_bar_config(disable=True)
    expected = diffusers_images(ref, "pndm", seed=1, steps=4)[0]
    # the variant is another model: the folder's fp32 files give an image far from it
    assert np.abs(diffusers_images(reference, "pndm", seed=1, steps=4)[0] - expected).max() > 30
    out = tmp_path / "v.png"
    assert main(["generate", PROMPT, "--model", str(folder), "--variant", "fp16", "--steps", "4",
                 "--seed", "1", "-o", str(out)]) == 0
    diff = np.abs(read_png(out) - expected).max()
    print(f"--variant fp16: max pixel difference {diff}")
    assert diff <= MAX_PIXEL_DIFF


def test_random_seed_is_printed_and_recorded(sd1_folder, tmp_path, capsys):
    first = tmp_path / "first.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "2", "-o", str(first)]) == 0
    seed = int(capsys.readouterr().err.split("seed: ")[1].split()[0])
    assert f"Seed: {seed}," in Image.open(first).text["parameters"]
    again = tmp_path / "again.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "2", "--seed", str(seed),
                 "-o", str(again)]) == 0
    assert np.array_equal(read_png(first), read_png(again))


def test_modules_are_plain_attributes(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    assert isinstance(pipe.unet, torch.nn.Module) and isinstance(pipe.vae, torch.nn.Module)
    assert isinstance(pipe.text_encoder, torch.nn.Module)
    assert pipe.default_sampler == "pndm"
    assert all(not p.requires_grad and p.device.type == "cpu" for p in pipe.unet.parameters())
