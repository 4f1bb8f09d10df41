"""Image-to-image with several images from one seed (README, `ldm generate`: "image-to-image draws them from one
stream and records `Batch pos`"): `ldm generate --image X --num-images 3` against diffusers'
StableDiffusionImg2ImgPipeline with `num_images_per_prompt=3` and one CPU generator seeded with the seed, and
`--from-png` of each PNG, which makes the batch again to give its image (`Batch size`, `Batch pos`)."""

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF
from diffusers import StableDiffusionImg2ImgPipeline
from PIL import Image
from test_image_tasks import picture

from ldm.pipelines.infotext import parse_infotext
from ldm_cli.main import main

PROMPT = "a red barn in a snowy field"  # test_image_tasks.reference's prompt
BATCH = 3
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def pixels(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def diffusers_img2img(folder, sampler: str | None):
    """diffusers' image-to-image pipeline on `folder`, with `sampler`'s scheduler (None: the folder's)."""
    from official import diffusers_scheduler

    pipe = StableDiffusionImg2ImgPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                          requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    if sampler:
        pipe.scheduler = diffusers_scheduler(sampler, pipe.scheduler.config)
    return pipe


def generate_batch(tmp_path, folder, init, sampler: str | None) -> list:
    """`ldm generate --image init --num-images 3`: the PNGs' paths, NAME.png, NAME-1.png, NAME-2.png."""
    out = tmp_path / "batch.png"
    args = ["--image", str(init), "--num-images", str(BATCH), "--strength", "0.7", "--steps", "5", "--seed", "9",
            *(["--sampler", sampler] if sampler else [])]
    assert main(["generate", PROMPT, "--model", str(folder), "--no-safety-checker", "-o", str(out), *args]) == 0
    return [out] + [tmp_path / f"batch-{i}.png" for i in range(1, BATCH)]


def diffusers_batch(folder, init_image, sampler: str | None, per_image_seeds: bool = False) -> np.ndarray:
    """The same batch from diffusers: three images per prompt, one generator seeded with the seed (the VAE's sample
    of the image and every noise drawn from it, in diffusers' order); or, `per_image_seeds`, a generator per image
    seeded with seed + i (text-to-image's rule)."""
    pipe = diffusers_img2img(folder, sampler)
    generator = ([torch.Generator("cpu").manual_seed(9 + i) for i in range(BATCH)] if per_image_seeds
                 else torch.Generator("cpu").manual_seed(9))
    out = pipe(PROMPT, image=init_image, strength=0.7, num_inference_steps=5, num_images_per_prompt=BATCH,
               generator=generator, output_type="np").images
    assert out.shape[0] == BATCH and min(image.std() for image in out) > 0.04  # real images, not flat ones
    return (out * 255).round().astype(np.int16)


# euler_a draws fresh noise at every step from the stream (so each image's depends on the batch), pndm (the folder's
# default) only the VAE sample and the starting noise
@pytest.mark.parametrize("sampler", ["euler_a", None])
def test_image_to_image_batch_is_one_stream_like_diffusers(sd1_folder, tmp_path, sampler):
    """Each of the three PNGs is diffusers' image at its index within 2/255; the images differ from each other
    (the batch is not one image three times), and each PNG records A1111's `Batch size: 3, Batch pos: i`. The
    control: diffusers with a generator per image (seed + i) makes other images, so the comparison tells the two
    rules apart."""
    init_image = picture(64, 64, seed=3)
    init_image.save(tmp_path / "init.png")
    paths = generate_batch(tmp_path, sd1_folder, tmp_path / "init.png", sampler)
    expected = diffusers_batch(sd1_folder, init_image, sampler)
    for i, path in enumerate(paths):
        diff = np.abs(pixels(path) - expected[i]).max()
        print(f"img2img batch {sampler or 'pndm'} image {i}: max pixel difference {diff}")
        assert diff <= MAX_PIXEL_DIFF
        params = parse_infotext(Image.open(path).text["parameters"])[2]
        assert (params["Seed"], params["Batch size"], params["Batch pos"]) == ("9", str(BATCH), str(i))
    assert min(np.abs(pixels(paths[i]) - pixels(paths[i + 1])).max() for i in range(BATCH - 1)) > 20
    per_image_seeds = diffusers_batch(sd1_folder, init_image, sampler, per_image_seeds=True)
    assert np.abs(pixels(paths[1]) - per_image_seeds[1]).max() > 20


@pytest.mark.parametrize("sampler", ["euler_a", "pndm"])
def test_from_png_makes_the_batch_again_for_the_image_at_its_batch_pos(sd1_folder, tmp_path, capsys, sampler):
    """`--from-png NAME-K.png --image X` writes the image at `Batch pos: K`, byte for byte the PNG it read (the
    batch of `Batch size` is made again from its one stream, and only that image written); a note says so. Made
    alone from the seed, the image would be another one: the batch's first image at best (pndm), and not even that
    where every step draws noise for the whole batch (euler_a)."""
    picture(64, 64, seed=3).save(tmp_path / "init.png")
    paths = generate_batch(tmp_path, sd1_folder, tmp_path / "init.png", sampler)
    capsys.readouterr()
    base = ["--image", str(tmp_path / "init.png"), "--model", str(sd1_folder), "--no-safety-checker"]
    for k, path in enumerate(paths):
        again = tmp_path / f"again-{k}.png"
        assert main(["generate", "--from-png", str(path), "-o", str(again), *base]) == 0
        assert again.read_bytes() == path.read_bytes(), np.abs(pixels(again) - pixels(path)).max()
        assert f"is image {k + 1} of an image-to-image batch of {BATCH}" in capsys.readouterr().err
        assert not (tmp_path / f"again-{k}-1.png").exists()  # only the PNG's own image is written

    alone = tmp_path / "alone.png"  # control: --num-images 1 makes the seed's image alone
    assert main(["generate", "--from-png", str(paths[1]), "--num-images", "1", "-o", str(alone), *base]) == 0
    assert np.abs(pixels(alone) - pixels(paths[1])).max() > 20


def test_text_to_image_png_of_a_batch_is_made_alone(sd1_folder, tmp_path, capsys):
    """Text-to-image: image i has its own seed (seed + i), so its PNG is made alone from that seed, not with a
    batch (README: "each PNG's `Seed` gives that image again on its own")."""
    out = tmp_path / "t2i.png"
    common = ["--model", str(sd1_folder), "--no-safety-checker", "--steps", "3", "--sampler", "euler_a"]
    assert main(["generate", PROMPT, "--num-images", "2", "--seed", "4", "-o", str(out), *common]) == 0
    capsys.readouterr()
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(tmp_path / "t2i-1.png"), "-o", str(again), *common]) == 0
    assert "batch" not in capsys.readouterr().err
    assert np.abs(pixels(again) - pixels(tmp_path / "t2i-1.png")).max() <= MAX_PIXEL_DIFF
    assert "Seed: 5," in Image.open(again).text["parameters"]


def test_a_batch_pos_outside_its_batch_is_one_line(sd1_folder, tmp_path, capsys):
    from ldm.pipelines.images import save_png

    png = tmp_path / "odd.png"
    save_png(picture(64, 64), png, "a door\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, "
                                   "Denoising strength: 0.5, Batch size: 2, Batch pos: 2")
    picture(64, 64).save(tmp_path / "init.png")
    assert main(["generate", "--from-png", str(png), "--image", str(tmp_path / "init.png"), "--model",
                 str(sd1_folder), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert "Batch pos 2 is not in a batch of 2" in err and err.count("\n") == 1
