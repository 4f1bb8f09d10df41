"""Infotext as AUTOMATIC1111 writes it (keys, order, quoting, hashes) and `ldm generate --from-png`, which reads
it back: every field written is read, and the same parameters give the same image."""

import hashlib

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from ldm.pipelines.infotext import infotext, parse_infotext
from ldm_cli.main import main


def parameters(path) -> str:
    return Image.open(path).info["parameters"]


def test_quoting_round_trips():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "TI hashes": "a: 0123, b: 4567",
              "Odd": 'say "hi": now\nthen', "Skipped": None}
    text = infotext("a (cat:1.2), dog\nsecond line", "ugly, bad", params)
    assert 'TI hashes: "a: 0123, b: 4567"' in text and "Skipped" not in text
    prompt, negative, read = parse_infotext(text)
    assert prompt == "a (cat:1.2), dog\nsecond line" and negative == "ugly, bad"
    assert read == {k: str(v) for k, v in params.items() if v is not None}


def test_every_field_is_written_and_from_png_regenerates_the_image(single_file, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    model = single_file("sd1")
    torch.manual_seed(0)
    save_file({"emb_params": torch.randn(2, 64)}, tmp_path / "inkwash.safetensors")
    first = tmp_path / "first.png"
    args = ["--model", str(model), "--embedding", str(tmp_path / "inkwash.safetensors")]
    assert main(["generate", "a (red:1.3) house, inkwash, BREAK [blue] sky", "--negative-prompt", "blurry, dark",
                 "--steps", "3", "--seed", "5", "--width", "64", "--height", "48", "--sampler", "dpmpp_2m",
                 "--karras", "--guidance", "6", "--clip-skip", "2", "--emphasis", "no-norm", "-o", str(first),
                 *args]) == 0
    text = parameters(first)
    digest = hashlib.sha256(model.read_bytes()).hexdigest()
    ti = hashlib.sha256((tmp_path / "inkwash.safetensors").read_bytes()).hexdigest()[:12]
    assert text == ("a (red:1.3) house, inkwash, BREAK [blue] sky\nNegative prompt: blurry, dark\n"
                    "Steps: 3, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 6.0, Seed: 5, Size: 64x48, "
                    f"Model hash: {digest[:10]}, Model: {model.stem}, Clip skip: 2, TI hashes: \"inkwash: {ti}\", "
                    "Emphasis: No norm")
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "-o", str(again), *args]) == 0
    assert parameters(again) == text
    assert again.read_bytes() == first.read_bytes()  # same parameters, same pixels

    override = tmp_path / "override.png"
    assert main(["generate", "--from-png", str(first), "--steps", "2", "--seed", "6", "-o", str(override), *args]) == 0
    assert "Steps: 2, " in parameters(override) and "Seed: 6, " in parameters(override)
    assert "Sampler: DPM++ 2M, Schedule type: Karras" in parameters(override)


def test_from_png_of_an_image_to_image_run(sd1_folder, tmp_path):
    init = tmp_path / "init.png"
    Image.new("RGB", (64, 64), (200, 30, 30)).save(init)
    first = tmp_path / "first.png"
    base = ["--model", str(sd1_folder), "--no-safety-checker"]
    assert main(["generate", "a red door", "--image", str(init), "--strength", "0.6", "--steps", "4", "--seed", "1",
                 "--sampler", "euler_a", "-o", str(first), *base]) == 0
    assert "Sampler: Euler a, CFG scale: 7.5, Seed: 1, Size: 64x64, Model: tiny-sd1, Denoising strength: 0.6" \
        in parameters(first)
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--image", str(init), "-o", str(again), *base]) == 0
    assert again.read_bytes() == first.read_bytes()


@pytest.mark.parametrize("make, message", [
    (lambda p: Image.new("RGB", (8, 8)).save(p), "carries no generation parameters"),
    (lambda p: p.write_text("not an image"), "not a readable image"),
])
def test_from_png_errors(sd1_folder, tmp_path, capsys, make, message):
    png = tmp_path / "in.png"
    make(png)
    assert main(["generate", "--from-png", str(png), "--model", str(sd1_folder), "-o", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1


def test_from_png_of_image_to_image_needs_the_image(sd1_folder, tmp_path, capsys):
    from ldm.pipelines.images import save_png

    png = tmp_path / "i2i.png"
    save_png(Image.new("RGB", (8, 8)), png, "a door\nSteps: 4, Sampler: Euler, CFG scale: 7, Seed: 1, Size: 64x64, "
                                           "Denoising strength: 0.5")
    assert main(["generate", "--from-png", str(png), "--model", str(sd1_folder), "-o", str(tmp_path / "o.png")]) == 2
    assert "give its --image" in capsys.readouterr().err


def test_model_hash_is_computed_once(single_file, tmp_path, monkeypatch):
    from ldm.loading import hashes

    monkeypatch.setenv("LDM_CACHE", str(tmp_path))
    model = single_file("sd1")
    expected = hashlib.sha256(model.read_bytes()).hexdigest()
    assert hashes.sha256(model) == expected
    monkeypatch.setattr(hashes.hashlib, "sha256", lambda: pytest.fail("hashed twice"))
    assert hashes.sha256(model) == expected


def test_base_to_refiner_png_names_the_base_as_model(sdxl_folder, sdxl_refiner_folder, tmp_path, capsys):
    out = tmp_path / "fox.png"
    assert main(["generate", "a red fox", "--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder),
                 "--steps", "3", "--seed", "1", "-o", str(out)]) == 0
    assert parameters(out).endswith(f"Model: {sdxl_folder.name}, Refiner: {sdxl_refiner_folder.name}, "
                                    "Refiner switch at: 0.8")
    assert main(["generate", "--from-png", str(out), "--model", str(sdxl_folder), "--steps", "1",
                 "-o", str(tmp_path / "again.png")]) == 0
    assert f"the PNG was finished by the refiner {sdxl_refiner_folder.name} from 0.8" in capsys.readouterr().err


# AUTOMATIC1111's names of the samplers ldm has (modules/sd_samplers_kdiffusion.py: samplers_k_diffusion;
# modules/sd_samplers_timesteps.py: samplers_timesteps), written here rather than read from ldm's table
A1111_SAMPLER_NAMES = {"euler_a": "Euler a", "euler": "Euler", "lms": "LMS", "heun": "Heun", "dpmpp_2m": "DPM++ 2M",
                       "dpmpp_2m_sde": "DPM++ 2M SDE", "ddim": "DDIM", "pndm": "PLMS", "unipc": "UniPC"}


@pytest.mark.parametrize("sampler", list(A1111_SAMPLER_NAMES))
def test_sampler_is_written_with_a1111s_name_and_read_back(sd1_folder, tmp_path, sampler):
    """Each sampler's PNG names it as A1111 does (`Sampler: PLMS`, `UniPC`, …); `--from-png` reads that name back
    to the same sampler, and the image made again is the same PNG byte for byte."""
    from ldm.pipelines.infotext import read_png

    first, again = tmp_path / "first.png", tmp_path / "again.png"
    base = ["--model", str(sd1_folder), "--no-safety-checker"]
    assert main(["generate", "a red door", "--sampler", sampler, "--steps", "3", "--seed", "2", "-o", str(first),
                 *base]) == 0
    assert parse_infotext(parameters(first))[2]["Sampler"] == A1111_SAMPLER_NAMES[sampler]
    assert read_png(first).request.sampler == sampler
    assert main(["generate", "--from-png", str(first), "-o", str(again), *base]) == 0
    assert again.read_bytes() == first.read_bytes()


@pytest.mark.parametrize("written, sampler", [("LMS Karras", "lms"), ("DPM++ 2M Karras", "dpmpp_2m"),
                                              ("DPM++ 2M SDE Karras", "dpmpp_2m_sde")])
def test_a1111_karras_sampler_names_before_1_9_are_read(written, sampler):
    """A1111 before 1.9 named Karras σ in the sampler (`DPM++ 2M Karras`); those names read as the sampler with
    Karras σ."""
    from ldm.pipelines.infotext import read_infotext

    request = read_infotext(f"a door\nSteps: 4, Sampler: {written}, CFG scale: 7, Seed: 1, Size: 64x64").request
    assert (request.sampler, request.karras) == (sampler, True)


def test_eta_round_trips_through_from_png(sd1_folder, tmp_path):
    """`--sampler ddim --eta 0.7`: the PNG records η and `--from-png` makes the same PNG again byte for byte; the
    same run at η = 0 is another image (the control: η changes the image, so the round trip carries it)."""
    from ldm.pipelines.infotext import read_png

    first, again, zero = tmp_path / "first.png", tmp_path / "again.png", tmp_path / "zero.png"
    base = ["--model", str(sd1_folder), "--no-safety-checker"]
    run = ["a red door", "--sampler", "ddim", "--steps", "4", "--seed", "2", *base]
    assert main(["generate", *run, "--eta", "0.7", "-o", str(first)]) == 0
    assert read_png(first).request.eta == 0.7
    assert main(["generate", "--from-png", str(first), "-o", str(again), *base]) == 0
    assert again.read_bytes() == first.read_bytes()
    assert main(["generate", *run, "-o", str(zero)]) == 0
    assert Image.open(zero).tobytes() != Image.open(first).tobytes()


def test_ddim_eta_is_written_as_a1111_writes_it(sd1_folder, tmp_path):
    """A1111's DDIM records a non-zero η as `Eta DDIM: 0.7` (modules/sd_samplers_timesteps.py, CompVisSampler:
    `eta_infotext_field = 'Eta DDIM'`, written by Sampler.initialize when η is not its default 0)."""
    out = tmp_path / "eta.png"
    assert main(["generate", "a red door", "--sampler", "ddim", "--eta", "0.7", "--steps", "2", "--seed", "2",
                 "--model", str(sd1_folder), "--no-safety-checker", "-o", str(out)]) == 0
    params = parse_infotext(parameters(out))[2]
    assert params.get("Eta DDIM") == "0.7" and "Eta" not in params


def test_a1111_eta_ddim_is_read_as_ddims_eta():
    """An infotext A1111 wrote for DDIM with η = 0.7 (`Eta DDIM: 0.7`) reads as ldm's DDIM at η = 0.7."""
    from ldm.pipelines.infotext import read_infotext

    back = read_infotext("a door\nSteps: 20, Sampler: DDIM, CFG scale: 7, Seed: 1, Size: 512x512, Eta DDIM: 0.7")
    assert (back.request.sampler, back.request.eta) == ("ddim", 0.7) and "eta" in back.fields
