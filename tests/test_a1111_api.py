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
from conftest import MAX_PIXEL_DIFF
from PIL import Image
from test_serve import Server

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.server import ServeConfig

PROMPT = "a lighthouse at night"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture
def server(pipe):
    s = Server(lambda: pipe, ServeConfig(Limits(max_steps=1000), queue_size=4))
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
    assert status == 404 and body["detail"] == ("sd_model_checkpoint: '/etc/passwd' is not loaded here (this server "
                                                "runs tiny-sd1)")
    assert api.util_get_current_model() == "tiny-sd1"


def test_sd_model_checkpoint_takes_the_served_model_by_any_of_its_names(api, server, pipe):
    """webuiapi's `util_set_model` (it lowercases the name, then sends the closest title) and `override_settings`:
    the served model by title or name is taken; another is a 404 naming the field and the model served."""
    api.util_set_model("TINY-SD1")
    assert api.get_options()["sd_model_checkpoint"] == "tiny-sd1"
    result = api.txt2img(prompt=PROMPT, seed=4, steps=2, width=64, height=64, sampler_name="Euler",
                         override_settings={"sd_model_checkpoint": "tiny-sd1"})
    assert "override_settings.sd_model_checkpoint" not in result.info["ignored"] and result.info["all_seeds"] == [4]
    status, _, body = server.request("POST", "/sdapi/v1/txt2img", {
        "prompt": "x", "steps": 1, "width": 64, "height": 64, "override_settings": {"sd_model_checkpoint": "sdxl"}})
    assert status == 404 and body["detail"] == ("override_settings.sd_model_checkpoint: 'sdxl' is not loaded here "
                                                "(this server runs tiny-sd1)")


def test_a_single_files_title_has_its_hash(tmp_path, monkeypatch):
    """A single-file checkpoint is listed as A1111 lists one: "file [sha256[:10]]", its name (never its folder), and
    taken by title, name, short or full hash."""
    import hashlib
    from types import SimpleNamespace

    from ldm.serving.a1111 import ApiError, checkpoint_of, checkpoint_title

    monkeypatch.setenv("LDM_CACHE", str(tmp_path / "cache"))
    file = tmp_path / "models" / "dream.safetensors"
    file.parent.mkdir()
    file.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    served = SimpleNamespace(model_file=file)
    entry = checkpoint_of(served, str(file))
    assert entry == {"title": f"dream.safetensors [{digest[:10]}]", "model_name": "dream.safetensors",
                     "hash": digest[:10], "sha256": digest, "filename": "dream.safetensors", "config": None}
    for alias in (entry["title"], "dream.safetensors", digest[:10], digest, str(file)):
        assert checkpoint_title(alias, served, str(file), "sd_model_checkpoint") == entry["title"]
    with pytest.raises(ApiError) as refused:
        checkpoint_title("other", served, str(file), "sd_model_checkpoint")
    assert refused.value.status == 404 and str(tmp_path) not in refused.value.detail


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
    # (a dict of its own: webuiapi writes the units into its `alwayson_scripts={}` default, which every later call
    # in the process would then send)
    result = api.txt2img(prompt=PROMPT, seed=3, steps=4, width=64, height=64, sampler_name="Euler",
                         controlnet_units=[unit], alwayson_scripts={})
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


# ------------------------------------------------------------------------------------------------ live preview

# A1111 modules/sd_vae_approx.py `cheap_approximation` (SD 1.x/2.x), written out here as the reference
A1111_CHEAP = np.array([[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]])


class Recording:
    """The pipeline, each step's x0 estimate (of the first image) kept, in order."""

    def __init__(self, pipe):
        self.pipe, self.latents = pipe, []

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, request, callbacks=(), **options):
        def keep(event):
            self.latents.append(event.denoised[0].detach().clone())
            time.sleep(0.01)

        return self.pipe(request, callbacks=[*callbacks, keep], **options)


def cheap_reference(latent) -> np.ndarray:
    """sd_samplers_common.py `single_sample_to_image` with the cheap approximation: RGB·0.5 + 0.5, clamped, ×255
    truncated."""
    rgb = np.einsum("lxy,lr->rxy", latent.double().numpy(), A1111_CHEAP) * 0.5 + 0.5
    return (255.0 * np.moveaxis(np.clip(rgb, 0, 1), 0, 2)).astype(np.uint8).astype(np.int16)


def watch_preview(api, server, steps: int = 400) -> tuple[Image.Image, dict]:
    """A long txt2img run, `progress` polled (webuiapi's `get_progress`: A1111's default sends the preview) until
    it has a preview; then the same asked with skip_current_image=true, then the run interrupted. (the preview
    decoded, the answer skipping it)."""
    import base64
    import io

    results = {}
    thread = threading.Thread(target=lambda: results.setdefault("r", api.txt2img(
        prompt=PROMPT, seed=1, steps=steps, width=64, height=64, sampler_name="Euler")))
    thread.start()
    deadline = time.monotonic() + 60
    while (progress := api.get_progress())["current_image"] is None and time.monotonic() < deadline:
        time.sleep(0.05)
    skipped = server.request("GET", "/sdapi/v1/progress?skip_current_image=true")[2]
    api.interrupt()
    thread.join(60)
    assert progress["current_image"] is not None and progress["state"]["job_count"] == 1
    assert not thread.is_alive() and api.get_progress()["current_image"] is None  # no job runs
    preview = Image.open(io.BytesIO(base64.b64decode(progress["current_image"])))
    assert preview.format == "PNG"
    return preview, skipped


def test_progress_sends_the_cheap_live_preview(pipe):
    """Without a TAESD: A1111's "Approx cheap" of the running job's latest x0 estimate, at the latent's size (8×8 for
    64×64), equal to the reference applied to one of the run's steps; null when asked to skip."""
    recording = Recording(pipe)
    server = Server(lambda: recording, ServeConfig(Limits(max_steps=1000), queue_size=4))
    try:
        preview, skipped = watch_preview(webuiapi.WebUIApi(host="127.0.0.1", port=server.port), server)
    finally:
        server.close()
    assert skipped["current_image"] is None and skipped["state"]["job_count"] == 1
    assert preview.size == (8, 8)
    shown = pixels(preview)
    assert min(np.abs(shown - cheap_reference(latent)).max() for latent in recording.latents) <= 1


def test_progress_sends_the_taesd_live_preview(pipe, tmp_path):
    """With `--preview-vae` (a TAESD): the preview is its decode of one of the run's steps at the image's size, as
    diffusers' AutoencoderTiny decodes that latent."""
    import torch
    from diffusers import AutoencoderTiny

    torch.manual_seed(0)
    reference = AutoencoderTiny().eval()
    reference.save_pretrained(tmp_path / "taesd")
    recording = Recording(pipe)
    server = Server(lambda: recording, ServeConfig(Limits(max_steps=1000), queue_size=4,
                                                   preview_vae=str(tmp_path / "taesd")))
    try:
        preview, _ = watch_preview(webuiapi.WebUIApi(host="127.0.0.1", port=server.port), server)
    finally:
        server.close()
    assert preview.size == (64, 64)
    shown = pixels(preview)

    def decoded(latent) -> np.ndarray:
        with torch.no_grad():
            x = reference.decode(latent[None] / reference.config.scaling_factor).sample[0]
        rgb = (x / 2 + 0.5).clamp(0, 1).permute(1, 2, 0).numpy()
        return np.round(rgb * 255).astype(np.int16)

    assert min(np.abs(shown - decoded(latent)).max() for latent in recording.latents) <= MAX_PIXEL_DIFF
