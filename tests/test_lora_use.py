"""LoRAs where users name them: `<lora:NAME:WEIGHT>` in a prompt, `ldm generate --lora`, the `loras` parameter
of a scoring request (`ldm serve`, `ldm batch`), and the infotext's `Lora hashes`. The merge itself is proven
against diffusers in test_lora.py; here, that every entry point gives the image of an explicit `load_lora`,
that a call's own LoRAs leave the model as it was, bit for bit, and that requests name only the LoRA folder."""

import base64
import io

import numpy as np
import pytest
from lora_files import ATTENTION, TEXT, draw, modules, save_kohya
from PIL import Image
from test_lora import assert_same_bits, states

from ldm.adapters.lora import lora_hash
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.runner import score
from ldm.serving.schema import RequestError, parse
from ldm_cli.main import main

RUN = {"steps": 3, "seed": 4, "width": 64, "height": 64, "sampler": "euler"}

# (conftest.py) every comparison here is within this process: ldm and the references at one thread
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture
def loras(sd1, tmp_path, monkeypatch):
    """weights/loras (in a temporary $LDM_WEIGHTS) with two kohya LoRAs for the tiny SD 1.5."""
    monkeypatch.setenv("LDM_WEIGHTS", str(tmp_path))
    (tmp_path / "loras").mkdir()
    targets = {"unet": modules(sd1.unet, ATTENTION), "text_encoder": modules(sd1.text_encoder, TEXT)}
    for i, name in enumerate(("inkwash", "film grain")):
        save_kohya(tmp_path / "loras" / f"{name}.safetensors", draw(targets, std=0.3, seed=i), xl=False)
    return tmp_path / "loras"


def pixels(result) -> np.ndarray:
    return np.asarray(result.images[0]).astype(np.int16)


def test_prompt_tag_equals_an_explicit_load_and_leaves_the_model_as_it_was(sd1, loras):
    before = states(sd1)
    tagged = sd1("a house <lora:inkwash:0.7> by a lake", **RUN)
    assert_same_bits(states(sd1), before)  # the call's LoRA is gone again
    plain = sd1("a house  by a lake", **RUN)
    sd1.load_lora("inkwash", 0.7)
    try:
        explicit = sd1("a house  by a lake", **RUN)
    finally:
        sd1.unload_loras()
    assert np.abs(pixels(tagged) - pixels(explicit)).max() == 0
    assert np.abs(pixels(tagged) - pixels(plain)).max() > 10
    text = tagged.infotexts[0]
    assert text.startswith("a house <lora:inkwash:0.7> by a lake\n")  # the tag stays in the prompt
    assert f'Lora hashes: "inkwash: {lora_hash(loras / "inkwash.safetensors")}"' in text
    assert "Lora hashes" not in plain.infotexts[0]


def test_a_calls_loras_come_on_top_of_the_loaded_ones(sd1, loras):
    sd1.load_lora(loras / "inkwash.safetensors", 0.5)
    try:
        merged = states(sd1)
        both = sd1("a boat <lora:film grain>", **RUN)
        assert_same_bits(states(sd1), merged)
        assert [lora.name for lora in sd1.loras] == ["inkwash"]
        assert "Lora hashes: \"inkwash: " in both.infotexts[0] and ", film grain: " in both.infotexts[0]
        sd1.load_lora("film grain", 1.0)
        explicit = sd1("a boat ", **RUN)
    finally:
        sd1.unload_loras()
    assert np.abs(pixels(both) - pixels(explicit)).max() == 0


def test_prompt_tags_name_the_lora_folder_only(sd1, loras, tmp_path):
    with pytest.raises(Exception, match="not a path"):
        sd1(f"a cat <lora:{loras / 'inkwash.safetensors'}:1>", **RUN)
    with pytest.raises(Exception, match="'nothing': not in .*it holds film grain, inkwash"):
        sd1("a cat <lora:nothing:1>", **RUN)
    with pytest.raises(Exception, match="must be a number"):
        sd1("a cat <lora:inkwash:strong>", **RUN)
    assert sd1.loras == []


def test_cli_lora_by_name_and_path(sd1_folder, sd1, loras, tmp_path, capsys):
    out = tmp_path / "cli.png"
    common = ["--model", str(sd1_folder), "--no-safety-checker", "--steps", "3", "--seed", "4", "--width", "64",
              "--height", "64", "--sampler", "euler"]
    assert main(["generate", "a house", "--lora", "inkwash:0.7", "--lora", str(loras / "film grain.safetensors"),
                 "-o", str(out), *common]) == 0
    sd1.load_lora("inkwash", 0.7)
    sd1.load_lora("film grain")
    try:
        expected = pixels(sd1("a house", **RUN))
    finally:
        sd1.unload_loras()
    image = Image.open(out)
    assert np.abs(np.asarray(image.convert("RGB")).astype(np.int16) - expected).max() == 0
    assert 'Lora hashes: "inkwash: ' in image.info["parameters"]
    assert main(["generate", "a house", "--lora", "missing", "-o", str(out), *common]) == 2
    assert "LoRA 'missing': no such file" in capsys.readouterr().err


def test_scoring_loras_parameter(sd1, loras):
    body = {"input_data": {"data": ["a house"], "parameters": {"num_inference_steps": 3, "width": 64, "height": 64,
                                                               "scheduler": "euler", "seed": 4,
                                                               "loras": {"inkwash": 0.7}}}}
    out = score(sd1, body)
    sd1.load_lora("inkwash", 0.7)
    try:
        expected = pixels(sd1("a house", **RUN))
    finally:
        sd1.unload_loras()
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(out[0]["generated_image"]))).convert("RGB"))
    assert np.abs(got.astype(np.int16) - expected).max() == 0
    assert parse({"input_data": {"data": ["a"], "parameters": {"loras": ["inkwash:0.5", "film grain"]}}}
                 ).parameters.loras == (("inkwash", 0.5), ("film grain", 1.0))


@pytest.mark.parametrize("loras_value, message", [
    ({"../loras/inkwash": 1}, "not a path"),
    ({"/etc/passwd": 1}, "not a path"),
    ({"nothing": 1}, "not in"),
    ({"inkwash": "strong"}, "finite number"),
    ({"inkwash": True}, "finite number"),
    ("inkwash", "expected"),
])
def test_scoring_loras_errors_name_the_field(loras, loras_value, message):
    with pytest.raises(RequestError) as info:
        parse({"input_data": {"data": ["a"], "parameters": {"loras": loras_value}}}, Limits())
    assert info.value.field == "parameters.loras" and message in info.value.message


def test_rows_with_other_lora_tags_do_not_share_a_pass(sd1, loras):
    body = {"input_data": {"data": ["a cat <lora:inkwash:0.8>", "a hen <lora:inkwash:0.8>", "a dog"],
                           "parameters": {"num_inference_steps": 2, "width": 64, "height": 64, "seed": 1,
                                          "scheduler": "euler"}}}
    alone, batched = score(sd1, body), score(sd1, body, batch_size=4)  # the cat and the hen share a pass
    for a, b in zip(alone, batched, strict=True):
        a, b = (np.asarray(Image.open(io.BytesIO(base64.b64decode(o["generated_image"])))).astype(np.int16)
                for o in (a, b))
        assert np.abs(a - b).max() <= 2  # only batched matmuls round differently
