"""The guards of issue 26 on the A1111 routes (issue 28 item 2), through HTTP against a loopback server on the tiny
model with small limits: images refused by their header's size before they are decoded (`--max-pixels`), prompts
bounded before they are tokenized, lone surrogates a 422 naming the field (never a 500), a LoRA that is not there
answered without the folder's path or listing, and `--max-steps`, `--max-pixels`, `--max-images` (batch_size ×
n_iter) each a 422 naming the field — all before the job is queued."""

import base64
import io
import json
import struct
import time
import zlib

import pytest
from PIL import Image
from test_serve import Server

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.server import ServeConfig

LIMITS = Limits(max_steps=10, max_pixels=64 * 64, max_images_per_prompt=3)
FAST = {"prompt": "a lighthouse", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler"}

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def weights(tmp_path_factory, sd1_folder):
    """The server's weights folder: a LoRA named `ink` (whose name must not show in answers about another), and a
    tiny ControlNet `control_v11p_sd15_canny`."""
    from test_controlnet import make_controlnet

    store = tmp_path_factory.mktemp("guard-weights")
    (store / "loras").mkdir()
    (store / "loras" / "ink.safetensors").write_bytes(b"")
    make_controlnet(sd1_folder, store / "controlnet" / "control_v11p_sd15_canny", seed=1)
    return store


@pytest.fixture(scope="module")
def server(sd1_folder, weights):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LDM_WEIGHTS", str(weights))
        s = Server(lambda: pipe, ServeConfig(LIMITS, queue_size=4))
        deadline = time.monotonic() + 30
        while s.request("GET", "/health")[0] != 200 and time.monotonic() < deadline:
            time.sleep(0.02)
        yield s
        s.close()


def post(server, path: str, body: dict):
    status, _, out = server.request("POST", f"/sdapi/v1/{path}", body)
    return status, out


def png_header_only(width: int, height: int) -> str:
    """A PNG that is all header: its IHDR says width × height, and no pixel data follows. Decoding it fails; only a
    check of the header's size can answer with that size."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    raw = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)) + \
        chunk(b"IEND", b"")
    return base64.b64encode(raw).decode()


def b64(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def too_large(size: int, limit: int = LIMITS.max_pixels) -> str:
    return f"{size}x{size} is larger than this server's {limit} pixels per image; resize it first"


@pytest.mark.parametrize("path, body, field", [
    ("img2img", {"init_images": ["BIG"]}, "init_images[0]"),
    ("img2img", {"init_images": ["SMALL"], "mask": "BIG"}, "mask"),
    ("png-info", {"image": "BIG"}, "image"),
])
def test_images_over_max_pixels_are_refused_by_their_header(server, path, body, field):
    """An image over --max-pixels (4096 here, not a fixed 8192²) is refused by the size its header gives, before a
    pixel is decoded (the PNG has no pixels: decoding it would fail with another message)."""
    small = b64(Image.new("RGB", (64, 64), "gray"))
    body = {k: ([small if i == "SMALL" else png_header_only(65, 65) for i in v] if isinstance(v, list) else
                png_header_only(65, 65) if v == "BIG" else v) for k, v in body.items()}
    status, out = post(server, path, (FAST if path == "img2img" else {}) | body)
    assert status == 422 and out["detail"] == f"{field}: {too_large(65)}", out


def test_controlnet_images_over_four_times_max_pixels_are_refused_by_their_header(server):
    """A ControlNet unit's image (resized to the generation's size) may be 4× --max-pixels, as /score takes them."""
    unit = {"model": "control_v11p_sd15_canny", "image": png_header_only(129, 129)}
    status, out = post(server, "txt2img", FAST | {"alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert status == 422 and out["detail"] == f"alwayson_scripts.controlnet.args[0].image: {too_large(129, 16384)}"


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_prompts_are_bounded_before_they_are_tokenized(server, field):
    status, out = post(server, "txt2img", FAST | {field: "x" * 24_001})
    assert status == 422 and out["detail"] == (f"{field}: 24001 characters; this server takes at most 24000 (ldm "
                                               "encodes 32 chunks of 75 tokens)"), out


@pytest.mark.parametrize("path, body, field", [
    ("txt2img", FAST | {"prompt": "a \ud800 lighthouse"}, "prompt"),
    ("txt2img", FAST | {"sampler_name": "Euler\udc00"}, "sampler_name"),
    ("txt2img", FAST | {"styles": ["ok", "\ud83d"]}, "styles[1]"),
    ("txt2img", FAST | {"override_settings": {"\ud800": 1}}, "override_settings.\\ud800"),
    ("img2img", FAST | {"init_images": ["\ud800"]}, "init_images[0]"),
    ("options", {"sd_model_checkpoint": "\ud800"}, "sd_model_checkpoint"),
    ("png-info", {"image": "\ud800"}, "image"),
])
def test_lone_surrogates_are_422_naming_the_field(server, path, body, field):
    """A lone surrogate (JSON's "\\ud800", which UTF-8 cannot encode) anywhere in a body, its keys too: a 422 that
    names the field, in valid JSON; an answer repeating it was a 500."""
    status, out = post(server, path, body)
    assert status == 422, out
    assert out["detail"].startswith(f"{field}: not valid Unicode: a lone surrogate"), out


def test_a_lone_surrogate_in_a_field_of_the_wrong_type_is_a_422(server):
    """pydantic's 422 repeats the value it refused: with a lone surrogate in it that was a 500. (pydantic refuses a
    lone surrogate in a key itself, naming the body.)"""
    status, out = post(server, "txt2img", FAST | {"steps": "\ud800", "cfg_scale": "x" * 5000})
    assert status == 422 and {e["loc"][-1] for e in out["detail"]} == {"steps", "cfg_scale"}, out
    assert all(len(json.dumps(e)) < 1000 for e in out["detail"])  # (what it repeats, cut)
    status, out = post(server, "txt2img", FAST | {"\ud800": "y"})
    assert status == 422 and out["detail"][0]["type"] == "string_unicode" and out["detail"][0]["loc"] == ["body"]


def test_a_lora_that_is_not_there_names_no_folder(server, weights):
    status, out = post(server, "txt2img", FAST | {"prompt": "a <lora:missing:0.5> lighthouse"})
    assert status == 422 and out["detail"] == "prompt: LoRA 'missing': not in the LoRA folder", out
    assert str(weights) not in out["detail"] and "ink" not in out["detail"]
    status, out = post(server, "txt2img", FAST | {"negative_prompt": "<lora:ink:1e300>"})
    assert status == 422 and out["detail"] == ("negative_prompt: <lora:ink:1e300>: the weight must be a finite number "
                                               "from -100 to 100"), out


@pytest.mark.parametrize("body, detail", [
    ({"steps": 11}, "steps: must be from 1 to 10 on this server, got 11"),
    ({"enable_hr": True, "hr_scale": 1.0, "hr_second_pass_steps": 11},
     "hr_second_pass_steps: must be from 0 to 10 on this server, got 11"),
    ({"width": 72}, "width: 72x64 is more than this server's 4096 pixels per image"),
    ({"height": 72}, "height: 64x72 is more than this server's 4096 pixels per image"),
    ({"enable_hr": True, "hr_scale": 1.5}, "hr_scale: 64x64 upscaled 1.5× is 96x96, more than this server's 4096 "
                                           "pixels per image"),
    ({"batch_size": 2, "n_iter": 2}, "batch_size: 2 × n_iter 2 is 4 images; this server makes at most 3 a request"),
    ({"n_iter": 0}, "n_iter: must be at least 1, got 0"),
])
def test_the_servers_limits_are_422_naming_the_field(server, body, detail):
    status, out = post(server, "txt2img", FAST | body)
    assert status == 422 and out["detail"] == detail, out


def test_within_the_limits_it_runs(server):
    """The limits' edges are taken: 10 steps, 64×64, 3 images (batch 3 × 1)."""
    status, out = post(server, "txt2img", FAST | {"steps": 10, "batch_size": 3})
    assert status == 200 and len(out["images"]) == 3 and json.loads(out["info"])["all_seeds"][0] >= 0
