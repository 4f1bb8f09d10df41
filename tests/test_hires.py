"""The hires fix (`ldm.pipelines.hires`, `--hires-scale`) and the image-to-image inputs it rests on (latents as the
image, one image and one seed per image), against diffusers' StableDiffusion(XL)Pipeline → upscale →
StableDiffusion(XL)Img2ImgPipeline, and against an explicit image-to-image of ldm's own first pass."""

import base64
import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_images_close
from diffusers import (
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLPipeline,
)
from PIL import Image
from test_image_tasks import picture

from ldm.pipelines.infotext import parse_infotext, read_infotext
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.runner import score
from ldm.serving.schema import RequestError, parse_parameters
from ldm_cli.main import main

PROMPT = "a castle on a hill"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder, safety_checker=False)


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def diffusers_pixels(images) -> np.ndarray:
    return pixels(images[0])


def reference_pipes(txt_cls, img_cls, folder):
    kwargs = {"add_watermarker": False} if "XL" in txt_cls.__name__ else {
        "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    first = txt_cls.from_pretrained(folder, **kwargs)
    second = img_cls(**first.components, **({"add_watermarker": False} if "XL" in txt_cls.__name__ else {
        "requires_safety_checker": False}))
    for p in (first, second):
        p.set_progress_bar_config(disable=True)
    return first, second


# A1111's hires upscalers, written here as the rule ldm is held to: the latent ones are A1111's
# `shared.latent_upscale_modes` (torch.nn.functional.interpolate's mode and antialias), the image ones
# modules/upscaler.py's UpscalerLanczos and UpscalerNearest (a PIL resize of the decoded first image; one resize to
# int(size × scale), which is the target size when that is a multiple of 8, as at the sizes here)
LATENT_RULES = {"latent": ("Latent", "bilinear", False),
                "latent-antialiased": ("Latent (antialiased)", "bilinear", True),
                "latent-bicubic": ("Latent (bicubic)", "bicubic", False),
                "latent-bicubic-antialiased": ("Latent (bicubic antialiased)", "bicubic", True),
                "latent-nearest": ("Latent (nearest)", "nearest", False),
                "latent-nearest-exact": ("Latent (nearest-exact)", "nearest-exact", False)}
IMAGE_RULES = {"lanczos": ("Lanczos", Image.Resampling.LANCZOS), "nearest": ("Nearest", Image.Resampling.NEAREST)}
# ×1.5 for the newer six: there nearest and nearest-exact pick other latent pixels (at ×2 they coincide)
UPSCALERS = [("latent", 2), ("lanczos", 2)] + [(name, 1.5) for name in (*list(LATENT_RULES)[1:], "nearest")]


def upscale_by_rule(upscaler: str, first, big: int):
    """The first pass's latents (a latent upscaler) or decoded image (an image one) upscaled to big × big pixels."""
    if upscaler in LATENT_RULES:
        _, mode, antialias = LATENT_RULES[upscaler]
        return F.interpolate(first, size=(big // 8, big // 8), mode=mode, antialias=antialias)
    return first.resize((big, big), IMAGE_RULES[upscaler][1])


def diffusers_hires(first, second, upscaler: str, seed: int, steps: int, size: int, scale: float,
                    denoise: float) -> np.ndarray:
    """A1111's hires fix spelled out with diffusers: text-to-image, upscale, image-to-image at the larger size."""
    big = int(size * scale) // 8 * 8
    generator = torch.Generator("cpu").manual_seed(seed)
    latent = upscaler in LATENT_RULES
    small = first(PROMPT, num_inference_steps=steps, width=size, height=size, generator=generator,
                  output_type="latent" if latent else "pil").images
    image = upscale_by_rule(upscaler, small if latent else small[0], big)
    out = second(PROMPT, image=image, strength=denoise, num_inference_steps=steps, width=big, height=big,
                 generator=torch.Generator("cpu").manual_seed(seed)).images
    assert np.asarray(out[0]).std() > 10  # a real image, not a flat one that any output would match
    return diffusers_pixels(out)


def recorded_passes(pipe, monkeypatch) -> list:
    """Records the request of each `pipe.generate` call: what the hires fix hands each pass."""
    requests, generate = [], pipe.generate

    def recording(request, *args, **kwargs):
        requests.append(request)
        return generate(request, *args, **kwargs)

    monkeypatch.setattr(pipe, "generate", recording)
    return requests


def upscale_difference(actual, expected) -> float:
    """max |actual − expected| of two upscaled latents (or images, in pixel levels); 0 only if they are the same
    shape."""
    if isinstance(expected, torch.Tensor):
        return (actual - expected).abs().max().item() if actual.shape == expected.shape else float("inf")
    return float(np.abs(pixels(actual) - pixels(expected)).max()) if actual.size == expected.size else float("inf")


@pytest.mark.parametrize("upscaler, scale", UPSCALERS)
def test_hires_fix_is_an_explicit_image_to_image_and_matches_diffusers(pipe, sd1_folder, monkeypatch, upscaler,
                                                                       scale):
    """Each upscaler: the second pass is handed exactly the documented rule's upscale of the first pass (bit for
    bit: the only check that tells `Latent` from `Latent (antialiased)`, whose upsamplings differ by 3e-6), is
    exactly image-to-image of it, and the image is diffusers' text-to-image → the rule → image-to-image within
    2/255; the PNG names the upscaler as A1111 does and reads back to it."""
    seed, steps, denoise = 7, 4, 0.6
    big = int(64 * scale) // 8 * 8
    with monkeypatch.context() as patch:
        passes = recorded_passes(pipe, patch)
        result = pipe(PROMPT, seed=seed, steps=steps, hires_scale=scale, hires_denoise=denoise,
                      hires_upscaler=upscaler)
    assert result.images[0].size == (big, big) and len(passes) == 2

    # the second pass is exactly image-to-image of the upscaled first result, at the larger size
    if upscaler in LATENT_RULES:
        first = pipe(PROMPT, seed=seed, steps=steps, output_type="latent")
        assert first.latents.shape == (1, 4, 8, 8) and not first.images
        upscaled = upscale_by_rule(upscaler, first.latents, big)
    else:
        first = pipe(PROMPT, seed=seed, steps=steps)
        upscaled = upscale_by_rule(upscaler, first.images[0], big)
    assert upscale_difference(passes[1].image, upscaled) == 0  # the upscale step: the rule's, bit for bit
    explicit = pipe(PROMPT, seed=seed, steps=steps, image=upscaled, strength=denoise, width=big, height=big)
    assert np.array_equal(pixels(result.images[0]), pixels(explicit.images[0]))
    assert result.evaluations == first.evaluations + explicit.evaluations

    first, second = reference_pipes(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, sd1_folder)
    expected = diffusers_hires(first, second, upscaler, seed, steps, 64, scale, denoise)
    assert_images_close(f"hires {upscaler} x{scale}", pixels(result.images[0]), expected)

    _, _, params = parse_infotext(result.infotexts[0])
    label = (LATENT_RULES | IMAGE_RULES)[upscaler][0]
    assert (params["Size"], params["Steps"], params["Seed"]) == ("64x64", "4", "7")  # the first pass's, as A1111
    assert (params["Denoising strength"], params["Hires upscale"], params["Hires upscaler"]) == \
        ("0.6", str(scale), label)
    assert "Hires steps" not in params  # A1111 writes it only when it is not the first pass's count
    assert read_infotext(result.infotexts[0]).request.hires_upscaler == upscaler


def test_hires_fix_sdxl_matches_diffusers(sdxl_folder):
    """SDXL: the second pass's micro-conditioning is the larger size, as an image-to-image call at it gives."""
    pipe = StableDiffusion.from_pretrained(sdxl_folder)
    result = pipe(PROMPT, seed=3, steps=3, hires_scale=1.5, hires_steps=4, sampler="euler")
    assert result.images[0].size == (96, 96)
    first, second = reference_pipes(StableDiffusionXLPipeline, StableDiffusionXLImg2ImgPipeline, sdxl_folder)
    from official import diffusers_scheduler

    for p in (first, second):
        p.scheduler = diffusers_scheduler("euler", p.scheduler.config)
    generator = torch.Generator("cpu").manual_seed(3)
    latents = first(PROMPT, num_inference_steps=3, guidance_scale=7.5, generator=generator,
                    output_type="latent").images  # (diffusers' SDXL default guidance is 5, ldm's 7.5)
    image = F.interpolate(latents, size=(12, 12), mode="bilinear")
    expected = second(PROMPT, image=image, strength=0.7, num_inference_steps=4, guidance_scale=7.5,
                      generator=torch.Generator("cpu").manual_seed(3)).images
    assert_images_close("sdxl hires latent", pixels(result.images[0]), diffusers_pixels(expected))
    assert parse_infotext(result.infotexts[0])[2]["Hires steps"] == "4"


def test_image_to_image_from_latents_and_per_image_inputs_match_diffusers(pipe, sd1_folder):
    """The inputs the hires fix hands over: VAE latents as the image, and one image with one generator per image
    of the batch (each image's posterior sample and noise from its own generator, as diffusers draws them)."""
    _, second = reference_pipes(StableDiffusionPipeline, StableDiffusionImg2ImgPipeline, sd1_folder)
    latents = torch.randn((1, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(0))
    actual = pipe(PROMPT, image=latents, strength=0.75, steps=4, seed=2, sampler="euler_a")
    second.scheduler = __import__("official").diffusers_scheduler("euler_a", second.scheduler.config)
    expected = second(PROMPT, image=latents, strength=0.75, num_inference_steps=4,
                      generator=torch.Generator("cpu").manual_seed(2)).images
    assert_images_close("img2img from latents", pixels(actual.images[0]), diffusers_pixels(expected))

    images = [picture(64, 64, 1), picture(64, 64, 2)]
    actual = pipe(PROMPT, image=images, num_images=2, strength=0.7, steps=4, seed=[5, 6], sampler="euler_a")
    expected = second(PROMPT, image=images, num_images_per_prompt=2, strength=0.7, num_inference_steps=4,
                      generator=[torch.Generator("cpu").manual_seed(s) for s in (5, 6)]).images
    for i in range(2):
        assert_images_close(f"img2img per-image {i}", pixels(actual.images[i]), pixels(expected[i]))
    alone = pipe(PROMPT, image=images[1], strength=0.7, steps=4, seed=6, sampler="euler_a")
    assert_images_close("per-image seed alone", pixels(actual.images[1]), pixels(alone.images[0]))


def test_hires_from_the_command_line_per_image_seeds_and_from_png(sd1_folder, tmp_path, capsys):
    def generate(seed: int, out: str, *extra: str):
        assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "3", "--seed", str(seed),
                     "--hires-scale", "1.5", "--hires-upscaler", "lanczos", "--hires-steps", "2", "--hires-denoise",
                     "0.5", "--sampler", "euler", "-o", str(tmp_path / out), *extra]) == 0

    generate(40, "out.png", "--num-images", "2")
    second = tmp_path / "out-1.png"
    assert Image.open(second).size == (96, 96)
    # image 2 has seed 41: run alone with that seed, it is the same image (A1111's per-image seeds)
    alone = tmp_path / "alone.png"
    generate(41, "alone.png", "--preview-every", "1")
    previews = sorted(p.name for p in tmp_path.glob("alone-*.png"))
    assert previews == ["alone-pass2-step001.png", "alone-step001.png", "alone-step002.png", "alone-step003.png"]
    assert np.array_equal(pixels(Image.open(tmp_path / "alone-pass2-step001.png")), pixels(Image.open(alone)))
    assert_images_close("second image vs its seed alone", pixels(Image.open(second)), pixels(Image.open(alone)))
    params = parse_infotext(Image.open(alone).text["parameters"])[2]
    assert (params["Seed"], params["Size"], params["Hires steps"], params["Hires upscaler"]) == \
        ("41", "64x64", "2", "Lanczos")
    # the PNG's parameters give the same two passes again
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(alone), "--model", str(sd1_folder), "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(Image.open(alone)))


@pytest.mark.parametrize("extra, message", [
    (["--hires-scale", "0.5"], "hires scale must be from 1 to 4"),
    (["--hires-steps", "3"], "hires steps goes with a hires scale"),
    (["--hires-scale", "2", "--hires-denoise", "0"], "hires denoising strength must be in (0, 1]"),
    (["--hires-scale", "2", "--image", "IMAGE"], "does not combine with image"),
])
def test_bad_hires_input_is_one_line(sd1_folder, tmp_path, capsys, extra, message):
    picture(64, 64).save(tmp_path / "in.png")
    extra = [str(tmp_path / "in.png") if a == "IMAGE" else a for a in extra]
    code = main(["generate", PROMPT, "--model", str(tmp_path / "no-such-model"), "-o", str(tmp_path / "o.png"),
                 *extra])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err


def test_scoring_limits_apply_to_the_upscaled_size(pipe):
    limits = Limits(max_pixels=96 * 96)
    with pytest.raises(RequestError) as e:
        parse_parameters({"width": 64, "height": 64, "hires_scale": 2}, limits)
    assert e.value.field == "parameters.hires_scale" and "128x128" in e.value.message
    with pytest.raises(RequestError) as e:
        parse_parameters({"hires_scale": 5}, limits)
    assert e.value.field == "parameters.hires_scale" and "from 1 to 4" in e.value.message
    # without a size, the model's native 64×64 is the first pass: the limit is checked when the row runs
    def body(scale):
        return {"input_data": {"columns": ["prompt"], "data": [PROMPT]},
                "parameters": {"hires_scale": scale, "num_inference_steps": 2, "seed": 1}}

    [response] = score(pipe, body(2), limits)
    assert response["error"]["field"] == "parameters.hires_scale"
    [response] = score(pipe, body(1.5), limits)
    image = Image.open(io.BytesIO(base64.b64decode(response["generated_image"])))
    assert image.size == (96, 96) and "Hires upscale: 1.5" in image.text["parameters"]
