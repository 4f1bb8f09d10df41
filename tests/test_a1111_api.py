"""AUTOMATIC1111's web API on `ldm serve` (ldm.serving.a1111), driven by the real `webuiapi` client (PyPI) against a
loopback server on the tiny model: the images equal the pipeline's for the same parameters, `info` parses as JSON
with A1111's keys and seeds, and requests of the wrong shape get A1111's answers (404 for an unknown sampler, 422
naming a field of the wrong type)."""

import json
import threading
import time

import numpy as np
import pytest
import webuiapi
from PIL import Image
from test_serve import Server

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.server import ServeConfig

PROMPT = "a lighthouse at night"
MAX_PIXEL_DIFF = 2

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture
def server(pipe):
    s = Server(lambda: pipe, ServeConfig(queue_size=4))
    yield s
    s.close()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def pixels(image) -> np.ndarray:
    return np.asarray(image.convert("RGB")).astype(np.int16)


def test_txt2img_equals_the_pipeline(api, pipe):
    """webuiapi's defaults (Euler a, 20 steps, scheduler "automatic", eta 1.0, its extra fields) as A1111 reads
    them; a batch of 2 has seeds seed and seed + 1, each image the one its seed gives alone."""
    result = api.txt2img(prompt=PROMPT, negative_prompt="fog", seed=11, steps=3, cfg_scale=6.0, width=64, height=64,
                         batch_size=2)
    assert len(result.images) == 2
    info = result.info
    assert info["all_seeds"] == [11, 12] and info["seed"] == 11 and info["sampler_name"] == "Euler a"
    assert info["prompt"] == PROMPT and info["steps"] == 3 and info["cfg_scale"] == 6.0
    assert info["sd_model_name"] == pipe.name and len(info["infotexts"]) == 2
    for image, seed in zip(result.images, (11, 12), strict=True):
        expected = pipe(PROMPT, negative_prompt="fog", seed=seed, steps=3, guidance=6.0, width=64, height=64,
                        sampler="euler_a").images[0]
        assert np.abs(pixels(image) - pixels(expected)).max() <= MAX_PIXEL_DIFF
        assert "Sampler: Euler a" in image.info["parameters"] and f"Seed: {seed}" in image.info["parameters"]
    assert result.parameters["prompt"] == PROMPT  # the request echoed


def test_karras_schedule_and_iterations(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=5, steps=3, width=64, height=64, sampler_name="DPM++ 2M",
                         scheduler="Karras", n_iter=2)
    assert result.info["all_seeds"] == [5, 6]
    expected = pipe(PROMPT, seed=6, steps=3, guidance=7.0, width=64, height=64, sampler="dpmpp_2m",
                    karras=True).images[0]
    assert np.abs(pixels(result.images[1]) - pixels(expected)).max() <= MAX_PIXEL_DIFF
    assert "Schedule type: Karras" in result.images[0].info["parameters"]


def test_img2img_with_a_mask(api, pipe):
    init = Image.fromarray((np.random.default_rng(2).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    result = api.img2img(images=[init], mask_image=mask, prompt=PROMPT, seed=4, steps=4, denoising_strength=0.8,
                         width=64, height=64, sampler_name="DDIM")
    # webuiapi sends eta 1.0, which A1111 gives DDIM as its η
    expected = pipe(PROMPT, image=init, mask=mask, strength=0.8, seed=4, steps=4, guidance=7.0, sampler="ddim",
                    eta=1.0, width=64, height=64).images[0]
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= MAX_PIXEL_DIFF


def test_hires_fix(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=8, steps=2, width=64, height=64, enable_hr=True, hr_scale=1.5,
                         hr_upscaler="Lanczos", denoising_strength=0.6, sampler_name="Euler")
    expected = pipe(PROMPT, seed=8, steps=2, guidance=7.0, width=64, height=64, sampler="euler", hires_scale=1.5,
                    hires_upscaler="lanczos", hires_denoise=0.6).images[0]
    assert result.images[0].size == (96, 96)
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= MAX_PIXEL_DIFF


def test_models_options_and_lists(api, server):
    assert api.util_get_model_names() == ["tiny-sd1"]
    api.util_set_model("tiny-sd1")
    assert api.util_get_current_model() == "tiny-sd1"
    assert "Euler a" in api.util_get_sampler_names() and "DPM++ 2M SDE" in api.util_get_sampler_names()
    assert {"automatic", "karras"} <= set(api.util_get_scheduler_names())  # (A1111: names, and labels beside)
    assert {"Latent", "Latent (nearest-exact)"} <= {m["name"] for m in api.get_latent_upscale_modes()}
    status, _, body = server.request("POST", "/sdapi/v1/options", {"sd_model_checkpoint": "/etc/passwd"})
    assert status == 404 and "not loaded here" in body["detail"]


def test_progress_during_a_run_and_interrupt(api, server):
    """`progress` reports the running job's steps; `interrupt` stops it at its next step, and its images (the
    current estimate, decoded) are still answered."""
    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("r", api.txt2img(
        prompt=PROMPT, seed=1, steps=400, width=64, height=64, sampler_name="Euler")))
    thread.start()
    deadline = time.monotonic() + 60
    while True:
        progress = api.get_progress()
        if progress["state"]["sampling_step"] >= 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert progress["state"]["job_count"] == 1 and progress["state"]["sampling_steps"] == 400
    assert 0 < progress["progress"] < 1
    api.interrupt()
    thread.join(60)
    assert not thread.is_alive() and len(results["r"].images) == 1
    assert api.get_progress()["state"]["job_count"] == 0


def test_png_info_reads_the_infotext(api):
    result = api.txt2img(prompt=PROMPT, seed=3, steps=2, width=64, height=64)
    info = api.png_info(result.images[0])
    assert info.info.startswith(PROMPT) and "Seed: 3" in info.info


@pytest.mark.parametrize("payload, status, field", [
    ({"prompt": "x", "sampler_name": "Frobnicate"}, 404, None),
    ({"prompt": "x", "steps": "many"}, 422, "steps"),
    ({"prompt": "x", "width": [64]}, 422, "width"),
    ({"prompt": "x", "cfg_scale": {"a": 1}}, 422, "cfg_scale"),
    ({"prompt": "x", "scheduler": "Exponential"}, 404, None),
    ({"prompt": "x", "steps": 2, "width": 63, "height": 64}, 422, None),
])
def test_malformed_requests_get_a1111s_answers(server, payload, status, field):
    code, _, body = server.request("POST", "/sdapi/v1/txt2img", payload)
    assert code == status, body
    if field is not None:
        assert any(field in error["loc"] for error in body["detail"]), body
    else:
        assert isinstance(body["detail"], str) and body["detail"], body


def test_override_settings_clip_skip_and_ignored_fields(api, pipe):
    result = api.txt2img(prompt=PROMPT, seed=2, steps=2, width=64, height=64, sampler_name="Euler",
                         override_settings={"CLIP_stop_at_last_layers": 2, "eta_noise_seed_delta": 31337},
                         restore_faces=False, tiling=False)
    expected = pipe(PROMPT, seed=2, steps=2, guidance=7.0, width=64, height=64, sampler="euler",
                    clip_skip=2).images[0]
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= MAX_PIXEL_DIFF
    assert result.info["clip_skip"] == 2
    assert "override_settings.eta_noise_seed_delta" in result.info["ignored"]
    json.dumps(result.info)  # (plain JSON)


def test_the_readme_example_runs(server, tmp_path, monkeypatch):
    """The README's webuiapi block, as written but for the port (the test server's) and the steps (2 for 20)."""
    from test_readme import A1111_BLOCK, python_blocks

    (block,) = [b for b in python_blocks() if A1111_BLOCK in b]
    assert "port=8000" in block
    monkeypatch.chdir(tmp_path)
    exec(compile(block.replace("port=8000", f"port={server.port}").replace("steps=20", "steps=2"), "README", "exec"),
         {})
    assert Image.open(tmp_path / "lighthouse.png").size == (512, 512)


@pytest.fixture
def served_controlnet(sd1_folder, tmp_path, monkeypatch):
    """A tiny ControlNet in the server's weights/controlnet/ as `control_v11p_sd15_canny`."""
    from test_controlnet import make_controlnet

    store = tmp_path / "weights"
    path = make_controlnet(sd1_folder, store / "controlnet" / "control_v11p_sd15_canny", seed=1)
    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    return path


def test_controlnet_units_in_alwayson_scripts(api, pipe, served_controlnet):
    """webuiapi's ControlNetUnit, as sd-webui-controlnet's API takes it: the model by A1111's "name [hash]", the
    weight, the guidance range, the control mode, the resize mode; the image is the pipeline's with that unit."""
    from test_controlnet import hint

    from ldm.pipelines.request import Control

    unit = webuiapi.ControlNetUnit(image=hint(2), model="control_v11p_sd15_canny [d14c016b]", weight=0.8,
                                   guidance_end=0.75, control_mode=1, resize_mode="Just Resize")
    result = api.txt2img(prompt=PROMPT, seed=3, steps=4, width=64, height=64, sampler_name="Euler",
                         controlnet_units=[unit])
    expected = pipe(PROMPT, seed=3, steps=4, guidance=7.0, width=64, height=64, sampler="euler", controls=[
        Control(str(served_controlnet), hint(2), weight=0.8, end=0.75, mode="prompt")]).images[0]
    plain = pipe(PROMPT, seed=3, steps=4, guidance=7.0, width=64, height=64, sampler="euler").images[0]
    assert np.abs(pixels(result.images[0]) - pixels(expected)).max() <= MAX_PIXEL_DIFF
    assert np.abs(pixels(result.images[0]) - pixels(plain)).max() > 4
    assert 'ControlNet 0: "Module: none, Model: control_v11p_sd15_canny' in result.images[0].info["parameters"]


@pytest.mark.parametrize("unit, message", [
    ({"model": "/etc/passwd", "image": "x"}, "not a path"),
    ({"model": "control_v11p_sd15_canny", "module": "depth_midas", "image": "x"}, "not a preprocessor ldm has"),
    ({"model": "control_v11p_sd15_canny"}, "a base64 control image is required"),
    ({"model": "control_v11p_sd15_canny", "image": "PNG", "control_mode": "Loud"}, "control_mode"),
])
def test_bad_controlnet_units_are_422(server, served_controlnet, unit, message):
    from test_controlnet import b64png, hint

    unit = unit | ({"image": b64png(hint(1))} if unit.get("image") == "PNG" else {})
    code, _, body = server.request("POST", "/sdapi/v1/txt2img", {
        "prompt": "x", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert code == 422 and message in body["detail"], body
