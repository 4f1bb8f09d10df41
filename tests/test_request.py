"""One request object through every entry point: the SDXL base → refiner hand-off through `ldm generate`,
`ldm serve` (HTTP) and `ldm batch` gives one image; one invalid request gets one message from each; step
events (callbacks, previews) leave the image as it is."""

import base64
import io
import json

import numpy as np
import pytest
import torch
from PIL import Image
from test_serve import Server

from ldm.errors import InputError
from ldm.pipelines.refiner import BaseWithRefiner
from ldm.pipelines.request import GenerationRequest
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.sampling.samplers import Step
from ldm.serving.runner import score
from ldm.serving.schema import RequestError
from ldm.serving.server import ServeConfig
from ldm_cli.main import main

PROMPT = "a lighthouse on a cliff at dusk"
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def test_refiner_through_serve_and_batch_equals_the_cli(sdxl_folder, sdxl_refiner_folder, tmp_path, capsys):
    out = tmp_path / "cli.png"
    assert main(["generate", PROMPT, "--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder),
                 "--refiner-start", "0.7", "--steps", "6", "--seed", "3", "-o", str(out)]) == 0
    cli = Image.open(out)
    assert "Refiner: tiny-sdxl-refiner, Refiner switch at: 0.7" in cli.text["parameters"]

    base = StableDiffusion.from_pretrained(sdxl_folder)
    refined = BaseWithRefiner(base, StableDiffusion.from_pretrained(sdxl_refiner_folder))
    server = Server(lambda: refined, ServeConfig(queue_size=2))
    try:  # the scoring schema names the hand-off as diffusers does (denoising_end), or refiner_start
        for name in ("denoising_end", "refiner_start"):
            status, _, answer = server.request("POST", "/score", {"input_data": {
                "columns": ["prompt"], "index": [0], "data": [PROMPT],
                "parameters": {"num_inference_steps": 6, "seed": 3, name: 0.7, "prompt_syntax": "a1111"}}})
            assert status == 200, answer
            served = Image.open(io.BytesIO(base64.b64decode(answer[0]["generated_image"])))
            assert np.array_equal(pixels(served), pixels(cli)), name
            assert served.text["parameters"] == cli.text["parameters"]
    finally:
        server.close()

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(PROMPT) + "\n")
    capsys.readouterr()
    assert main(["batch", "--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder), "--refiner-start",
                 "0.7", "--input", str(rows), "--output", str(tmp_path / "batch"), "--seed", "3",
                 "--parameters", json.dumps({"num_inference_steps": 6})]) == 0, capsys.readouterr().err
    assert np.array_equal(pixels(Image.open(tmp_path / "batch" / "00000.png")), pixels(cli))


def test_a_server_without_a_refiner_refuses_refiner_start(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    body = {"input_data": {"columns": ["prompt"], "index": [0], "data": [PROMPT],
                           "parameters": {"num_inference_steps": 2, "refiner_start": 0.8}}}
    with pytest.raises(RequestError) as caught:
        score(pipe, body)
    assert caught.value.field == "parameters.refiner_start" and "without a refiner" in caught.value.message


@pytest.mark.parametrize("flag, value, parameter", [
    ("--clip-skip", "13", {"clip_skip": 13}),
    ("--width", "100", {"width": 100}),
    ("--seed", "-1", {"seed": -1}),
    ("--sampler", "ddim", {"scheduler": "ddim", "karras": True}),
])
def test_one_invalid_request_one_message_everywhere(sd1_folder, tmp_path, capsys, flag, value, parameter):
    if "karras" in parameter:  # not a scoring parameter: the library's own check, from Python and the CLI
        with pytest.raises(InputError) as caught:
            GenerationRequest(PROMPT, sampler="ddim", karras=True).check()
        message = str(caught.value)
        assert main(["generate", PROMPT, "--model", str(sd1_folder), flag, value, "--karras",
                     "-o", str(tmp_path / "x.png")]) == 2
        assert capsys.readouterr().err.strip() == f"ldm: error: {message}"
        return
    name = next(iter(parameter))
    body = {"input_data": {"columns": ["prompt"], "index": [0], "data": [PROMPT], "parameters": parameter}}
    with pytest.raises(RequestError) as caught:  # the adapter (serve): a 400 naming the parameter
        score(None, body)
    assert caught.value.field == f"parameters.{name}"
    message = caught.value.message

    assert main(["generate", PROMPT, "--model", str(sd1_folder), flag, value, "-o", str(tmp_path / "x.png")]) == 2
    assert capsys.readouterr().err.strip() == f"ldm: error: {message}"  # before any weight is loaded

    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps(PROMPT) + "\n")
    assert main(["batch", "--model", str(sd1_folder), "--input", str(rows), "--output", str(tmp_path / "out"),
                 "--parameters", json.dumps(parameter)]) == 2
    assert capsys.readouterr().err.strip() == f"ldm: error: --input {rows}: parameters.{name}: {message}"


def test_a_request_object_and_keywords_give_one_image(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder, safety_checker=False)
    by_keywords = pipe(PROMPT, "fog", steps=3, seed=5, sampler="euler_a")
    by_object = pipe(GenerationRequest(PROMPT, "fog", steps=3, seed=5, sampler="euler_a"))
    assert np.array_equal(pixels(by_keywords.images[0]), pixels(by_object.images[0]))
    assert by_keywords.infotexts == by_object.infotexts
    with pytest.raises(TypeError):
        pipe(GenerationRequest(PROMPT), steps=3)


def test_step_events_leave_the_image_alone_and_previews_decode(sd1_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder, safety_checker=False)
    plain = pipe(PROMPT, steps=4, seed=2, sampler="dpmpp_2m")
    events: list[Step] = []

    class Recorder:
        def begin(self, total):
            events.append(total)

        def __call__(self, step):
            events.append(step)

    watched = pipe(PROMPT, steps=4, seed=2, sampler="dpmpp_2m", callbacks=[Recorder()])
    assert np.array_equal(pixels(plain.images[0]), pixels(watched.images[0]))  # hooks on: bit-identical
    assert events[0] == 4 and [s.i for s in events[1:]] == [0, 1, 2, 3]
    assert all(s.total == 4 and s.denoised.shape == s.x.shape for s in events[1:])
    assert events[1].sigma > events[2].sigma > events[4].sigma > 0
    # the last estimate of x0 is the image: σ after the last step is 0, so x is the last denoised
    assert torch.equal(events[-1].x, events[-1].denoised)

    out = tmp_path / "img.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "4", "--seed", "2", "--sampler",
                 "dpmpp_2m", "--preview-every", "2", "-o", str(out), "--no-safety-checker"]) == 0
    previews = sorted(p.name for p in tmp_path.glob("img-step*.png"))
    assert previews == ["img-step002.png", "img-step004.png"]
    last = Image.open(tmp_path / "img-step004.png")
    assert last.size == plain.images[0].size
    assert np.array_equal(pixels(last), pixels(Image.open(out)))  # the last step's x0 is the image itself


def test_attention_maps_from_the_command_line(sd1_folder, tmp_path):
    out, maps = tmp_path / "img.png", tmp_path / "maps"
    assert main(["generate", "a red apple", "--model", str(sd1_folder), "--steps", "2", "--seed", "1",
                 "--attention-maps", str(maps), "-o", str(out), "--no-safety-checker"]) == 0
    tokens = json.loads((maps / "tokens.json").read_text())
    assert [t["token"] for t in tokens] == ["a", "red", "apple"]
    for token in tokens:
        assert Image.open(maps / token["file"]).size == Image.open(out).size
    plain = tmp_path / "plain.png"
    assert main(["generate", "a red apple", "--model", str(sd1_folder), "--steps", "2", "--seed", "1",
                 "-o", str(plain), "--no-safety-checker"]) == 0
    assert np.array_equal(pixels(Image.open(out)), pixels(Image.open(plain)))  # recording changes nothing
