"""IP-Adapter through the A1111 API and the infotext, as sd-webui-controlnet has them: an IP-Adapter is one of its
ControlNet units (module `ip-adapter_clip_h` / `ip-adapter_clip_g`, the older `ip-adapter_clip_sd15`,
`ip-adapter_clip_sdxl`, `ip-adapter_clip_sdxl_plus_vith`, and `ip-adapter-auto`), written into the infotext as
`ControlNet N: "Module: ip-adapter_clip_h, Model: …, Weight: …"` (its infotext.py `serialize_unit`).

Driven by the real `webuiapi` client (its `ControlNetUnit`) against a loopback server on the tiny model: the image
equals the Python API's `pipe(…, image_prompts=[ImagePrompt(…)])` bit for bit (test_ip_adapter.py proves that path
equal to diffusers'), with the encoder the module names (a ViT-H-wide and a ViT-bigG-wide tiny encoder in
weights/clip_vision/: hidden sizes 1280 and 1664, one layer); a ControlNet unit and an IP unit in one call; the
mistakes a 422 naming the field. The infotext read back (`read_infotext`, `ldm generate --from-png`, png-info)."""

import shutil

import numpy as np
import pytest
import webuiapi
from PIL import Image
from PIL.PngImagePlugin import PngInfo
from test_a1111_api import pixels
from test_controlnet import b64png
from test_ip_adapter import PROMPT, adapter_file, gentle_controlnet, make_encoder, reference_image
from test_serve import Server

from ldm import ImagePrompt
from ldm.errors import InputError
from ldm.pipelines.infotext import read_infotext
from ldm.pipelines.request import Control
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.server import ServeConfig
from ldm_cli.main import main

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)
TOWER = {"num_hidden_layers": 1, "num_attention_heads": 4}  # a ViT-H- or ViT-bigG-wide tower, one layer


@pytest.fixture(scope="module")
def store(sd1_folder, sdxl_folder, tmp_path_factory):
    """weights/ with ipadapter/ (a plain SD 1.x adapter, a plus one reading ViT-H's hidden states, an SDXL one),
    clip_vision/ (two tiny encoders as wide as ViT-H/14 and ViT-bigG/14, both giving the plain adapter's 24) and
    controlnet/."""
    root = tmp_path_factory.mktemp("weights")
    (root / "ipadapter").mkdir()
    adapter_file(root / "ipadapter" / "ip-adapter_sd15.safetensors", sd1_folder, "plain", 24, seed=1)
    adapter_file(root / "ipadapter" / "ip-adapter-plus_sd15.safetensors", sd1_folder, "plus", 1280, seed=2)
    adapter_file(root / "ipadapter" / "ip-adapter_sdxl.safetensors", sdxl_folder, "plain", 24, seed=4)
    make_encoder(root / "clip_vision" / "vit-bigg", seed=1, hidden_size=1664, **TOWER)
    make_encoder(root / "clip_vision" / "vit-h", seed=2, hidden_size=1280, **TOWER)
    gentle_controlnet(sd1_folder, root / "controlnet" / "control_v11p_sd15_canny")
    return root


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture
def server(pipe, store, monkeypatch):
    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    s = Server(lambda: pipe, ServeConfig(Limits(max_steps=1000), queue_size=4))
    yield s
    s.close()


@pytest.fixture
def api(server):
    return webuiapi.WebUIApi(host="127.0.0.1", port=server.port)


def python_api(pipe, prompts, **kwargs) -> np.ndarray:
    """The Python API's image of what the A1111 calls below send (webuiapi's cfg_scale 7, Euler)."""
    return pixels(pipe(PROMPT, seed=3, steps=4, guidance=7.0, width=64, height=64, sampler="euler",
                       image_prompts=prompts, **kwargs).images[0])


def txt2img(api, units):
    # (a dict of its own: webuiapi writes the units into its `alwayson_scripts={}` default)
    return api.txt2img(prompt=PROMPT, seed=3, steps=4, width=64, height=64, sampler_name="Euler",
                       controlnet_units=units, alwayson_scripts={})


@pytest.mark.parametrize("module, encoder, written", [
    ("ip-adapter_clip_h", "vit-h", "ip-adapter_clip_h"),
    ("ip-adapter_clip_sd15", "vit-h", "ip-adapter_clip_h"),  # (sd-webui-controlnet's older name of clip_h)
    ("ip-adapter_clip_g", "vit-bigg", "ip-adapter_clip_g"),
    ("ip-adapter-auto", "vit-bigg", "ip-adapter_clip_g"),  # (the first encoder that fits, by name)
])
def test_an_ip_unit_equals_the_python_api(api, pipe, store, module, encoder, written):
    """webuiapi's ControlNetUnit of an IP-Adapter module: the adapter by A1111's "name [hash]", its weight and
    guidance range, the encoder of the width the module names; the image the Python API's, bit for bit; the
    infotext's unit as sd-webui-controlnet writes it."""
    reference = reference_image(2)
    unit = webuiapi.ControlNetUnit(image=reference, module=module, model="ip-adapter_sd15 [6a3f6166]", weight=0.7,
                                   guidance_end=0.75)
    result = txt2img(api, [unit])
    expected = python_api(pipe, [ImagePrompt(str(store / "ipadapter" / "ip-adapter_sd15.safetensors"), reference,
                                             weight=0.7, end=0.75, encoder=str(store / "clip_vision" / encoder))])
    assert np.array_equal(pixels(result.images[0]), expected)
    assert np.abs(expected - python_api(pipe, [])).max() > 4  # (the adapter acts)
    assert (f'ControlNet 0: "Module: {written}, Model: ip-adapter_sd15, Weight: 0.7, Resize Mode: Crop and Resize, '
            'Processor Res: 512, Guidance Start: 0.0, Guidance End: 0.75, Pixel Perfect: False, Control Mode: '
            'Balanced"') in result.info["infotexts"][0]


def test_a_controlnet_unit_and_an_ip_unit_in_one_call(api, pipe, store):
    """Both units at once, as the Python API runs a ControlNet unit and an image prompt; the infotext numbers the IP
    unit after the ControlNet unit, and png-info gives it back."""
    from test_controlnet import hint

    reference = reference_image(4)
    units = [webuiapi.ControlNetUnit(image=hint(1), model="control_v11p_sd15_canny", weight=0.8,
                                     resize_mode="Just Resize"),
             webuiapi.ControlNetUnit(image=reference, module="ip-adapter_clip_h", model="ip-adapter_sd15", weight=0.6)]
    result = txt2img(api, units)
    control = Control(str(store / "controlnet" / "control_v11p_sd15_canny"), hint(1), weight=0.8)
    prompt = ImagePrompt(str(store / "ipadapter" / "ip-adapter_sd15.safetensors"), reference, weight=0.6,
                         encoder=str(store / "clip_vision" / "vit-h"))
    expected = python_api(pipe, [prompt], controls=[control])
    assert np.array_equal(pixels(result.images[0]), expected)
    assert np.abs(expected - python_api(pipe, [prompt])).max() > 4  # (the ControlNet unit acts too)
    assert np.abs(expected - python_api(pipe, [], controls=[control])).max() > 4  # (and the adapter)
    text = result.info["infotexts"][0]
    assert 'ControlNet 0: "Module: none, Model: control_v11p_sd15_canny' in text
    assert 'ControlNet 1: "Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 0.6' in text
    info = api.png_info(result.images[0])  # (webuiapi sends the PNG with its text chunks)
    assert info.parameters["ControlNet 1"].startswith("Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 0.6")
    assert read_infotext(info.info).image_prompts == (
        {"model": "ip-adapter_sd15", "weight": 0.6, "start": 0.0, "end": 1.0, "encoder": "h"},)


def test_the_infotext_numbers_units_in_the_requests_order(api, pipe, store):
    """sd-webui-controlnet's `get_enabled_units` + `write_infotext`: `ControlNet 0, 1, …` over the enabled units in
    the request's order (an IP unit sent first is unit 0; a disabled unit takes no number); read back as sent. A
    text whose numbers skip one (edited by hand) still gives every unit."""
    from test_controlnet import hint

    units = [webuiapi.ControlNetUnit(image=reference_image(4), module="ip-adapter_clip_h", model="ip-adapter_sd15",
                                     weight=0.6),
             webuiapi.ControlNetUnit(image=hint(2), model="control_v11p_sd15_canny", enabled=False),
             webuiapi.ControlNetUnit(image=hint(1), model="control_v11p_sd15_canny", weight=0.8,
                                     resize_mode="Just Resize")]
    result = txt2img(api, units)
    text = result.info["infotexts"][0]
    assert 'ControlNet 0: "Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 0.6' in text
    assert 'ControlNet 1: "Module: none, Model: control_v11p_sd15_canny, Weight: 0.8' in text
    assert "ControlNet 2" not in text and text.index("ControlNet 0") < text.index("ControlNet 1")
    back = read_infotext(api.png_info(result.images[0]).info)
    assert [unit["model"] for unit in back.image_prompts] == ["ip-adapter_sd15"]
    assert [(unit["model"], unit["weight"]) for unit in back.controls] == [("control_v11p_sd15_canny", 0.8)]
    skipping = read_infotext(text.replace("ControlNet 1:", "ControlNet 3:"))
    assert (len(skipping.image_prompts), len(skipping.controls)) == (1, 1)


@pytest.mark.parametrize("unit, message", [
    ({"module": "ip-adapter_face_id_plus", "model": "ip-adapter-faceid-plus_sd15", "image": "PNG"},
     "[0].module: ip-adapter_face_id_plus is an IP-Adapter FaceID module"),
    ({"module": "ip-adapter_clip_h", "model": "ip-adapter_nowhere", "image": "PNG"},
     "[0].model: 'ip-adapter_nowhere' is not an IP-Adapter of the server's weights/ipadapter/"),
    ({"module": "ip-adapter_clip_h", "model": "../ipadapter/ip-adapter_sd15", "image": "PNG"}, "[0].model:"),
    ({"module": "ip-adapter_clip_h", "model": "ip-adapter_sdxl", "image": "PNG"},
     "[0].model: IP-Adapter ip-adapter_sdxl.safetensors is for a UNet of cross-attention width"),
    ({"module": "ip-adapter_clip_g", "model": "ip-adapter-plus_sd15", "image": "PNG"},
     "[0].module: ip-adapter_clip_g runs a ViT-bigG/14 image encoder (width 1664); none in the server's "
     "weights/clip_vision/ gives the hidden states of width 1280 IP-Adapter ip-adapter-plus_sd15 reads"),
    ({"module": "ip-adapter_clip_h", "model": "ip-adapter_sd15"}, "[0].image: a base64 reference image is required"),
    ({"module": "ip-adapter_clip_h", "model": "ip-adapter_sd15", "image": "PNG", "weight": 5},
     "alwayson_scripts.controlnet.args: image prompt 0: the weight must be from 0 to 2"),
])
def test_bad_ip_units_are_422_naming_the_field(server, unit, message):
    unit = unit | ({"image": b64png(reference_image(1))} if unit.get("image") == "PNG" else {})
    code, _, body = server.request("POST", "/sdapi/v1/txt2img", {
        "prompt": "x", "steps": 1, "width": 64, "height": 64, "alwayson_scripts": {"controlnet": {"args": [unit]}}})
    assert code == 422 and body["detail"].startswith("alwayson_scripts.controlnet.args") and message in body["detail"]
    assert "/" + "tmp" not in body["detail"], body  # (no folder of the server's)


# ------------------------------------------------------------------------------------------------ infotext read back

A1111_IP = ('a cat\nNegative prompt: blurry\nSteps: 20, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, '
            'Seed: 1, Size: 512x512, Model: v1-5, ControlNet 0: "Module: canny, Model: control_v11p_sd15_canny '
            '[d14c016b], Weight: 1, Resize Mode: Crop and Resize, Processor Res: 512, Threshold A: 100, Threshold B: '
            '200, Guidance Start: 0, Guidance End: 1, Pixel Perfect: False, Control Mode: Balanced", ControlNet 1: '
            '"Module: {module}, Model: ip-adapter-plus_sd15 [c817b455], Weight: 0.7, Resize Mode: Crop and Resize, '
            'Low Vram: False, Processor Res: 512, Guidance Start: 0.1, Guidance End: 0.9, Pixel Perfect: False, '
            'Control Mode: Balanced, Hr Option: Both", Version: v1.10.1')


@pytest.mark.parametrize("module, encoder", [
    ("ip-adapter_clip_h", "h"), ("ip-adapter_clip_g", "g"), ("ip-adapter_clip_sd15", "h"),
    ("ip-adapter_clip_sdxl", "g"), ("ip-adapter_clip_sdxl_plus_vith", "h"), ("ip-adapter-auto", None)])
def test_an_sd_webui_controlnet_ip_unit_reads_as_an_image_prompt(module, encoder):
    back = read_infotext(A1111_IP.replace("{module}", module))
    assert back.image_prompts == ({"model": "ip-adapter-plus_sd15", "weight": 0.7, "start": 0.1, "end": 0.9,
                                   "encoder": encoder},)
    assert [unit["model"] for unit in back.controls] == ["control_v11p_sd15_canny"]
    assert not any("ControlNet" in key for key in back.unused)


def test_a_face_id_unit_is_one_error():
    with pytest.raises(InputError, match=r"ControlNet 1 is an IP-Adapter FaceID unit \(ip-adapter_face_id_plus\): "
                                         "FaceID adapters"):
        read_infotext(A1111_IP.replace("{module}", "ip-adapter_face_id_plus"))


@pytest.fixture
def cli_store(store, monkeypatch, tmp_path):
    """The store with one encoder (the ViT-H-wide one), as a CLI user's weights/ would be."""
    local = tmp_path / "weights"
    shutil.copytree(store / "ipadapter", local / "ipadapter")
    shutil.copytree(store / "clip_vision" / "vit-h", local / "clip_vision" / "vit-h")
    monkeypatch.setenv("LDM_WEIGHTS", str(local))
    reference_image(8).save(tmp_path / "ref.png")
    return local


def test_from_png_makes_an_ip_adapter_image_again(sd1_folder, cli_store, tmp_path, capsys):
    """`ldm generate --ip-adapter` → PNG → `--from-png` with the reference (`--ip-image`): the same image; without
    it, one line and exit 2; --ip-weight given overrides the PNG's."""
    first, again = tmp_path / "first.png", tmp_path / "again.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "4", "--seed", "3", "--sampler", "euler",
                 "--ip-adapter", "ip-adapter_sd15", "--ip-image", str(tmp_path / "ref.png"), "--ip-weight", "0.6",
                 "--ip-start", "0.25", "-o", str(first)]) == 0
    assert 'ControlNet 0: "Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 0.6' in \
        Image.open(first).text["parameters"]
    assert main(["generate", "--from-png", str(first), "--model", str(sd1_folder), "--ip-image",
                 str(tmp_path / "ref.png"), "-o", str(again)]) == 0
    assert np.array_equal(pixels(Image.open(again)), pixels(Image.open(first)))
    assert main(["generate", "--from-png", str(first), "--model", str(sd1_folder), "--ip-image",
                 str(tmp_path / "ref.png"), "--ip-weight", "0.9", "-o", str(again)]) == 0
    assert not np.array_equal(pixels(Image.open(again)), pixels(Image.open(first)))
    capsys.readouterr()
    code = main(["generate", "--from-png", str(first), "--model", str(sd1_folder), "-o", str(again)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "give its reference image (--ip-image)" in errors[0], err


def test_a_png_of_two_ip_units_is_one_line(sd1_folder, cli_store, tmp_path, capsys):
    text = A1111_IP.replace("{module}", "ip-adapter_clip_h").replace("Version: v1.10.1", (
        'ControlNet 2: "Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 1, Guidance Start: 0, Guidance '
        'End: 1", Version: v1.10.1'))
    info = PngInfo()
    info.add_text("parameters", text)
    Image.new("RGB", (64, 64)).save(tmp_path / "two.png", pnginfo=info)
    code = main(["generate", "--from-png", str(tmp_path / "two.png"), "--model", str(sd1_folder), "--ip-image",
                 str(tmp_path / "ref.png"), "--control-image", str(tmp_path / "ref.png"), "-o",
                 str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "2 IP-Adapter units (ip-adapter-plus_sd15, ip-adapter_sd15)" in \
        errors[0], err
