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
