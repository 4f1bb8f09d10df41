"""Pixel Perfect (sd-webui-controlnet's `pixel_perfect`): the preprocessor resolution computed from the image's size,
the output's and the resize mode, against the rule written here from its source; the control image made at it; the
unit's field through `Control`, `--control-pixel-perfect`, the A1111 API's units, the infotext and `--from-png`."""


import numpy as np
import pytest
import torch
from PIL import Image
from test_control_preprocess import a1111_canny, detectmap_proc, get_pytorch_control, picture
from test_controlnet import PROMPT, b64png, make_controlnet

from ldm.pipelines.control import control_image, control_infotext
from ldm.pipelines.infotext import read_png
from ldm.pipelines.preprocess import pixel_perfect_resolution
from ldm.pipelines.request import Control
from ldm_cli.main import main

LABELS = {"just-resize": "Just Resize", "crop-and-resize": "Crop and Resize", "resize-and-fill": "Resize and Fill"}


def a1111_pixel_perfect_resolution(image: np.ndarray, target_H: int, target_W: int, resize_mode: str) -> int:
    """sd-webui-controlnet v1.1.455, internal_controlnet/external_code.py `pixel_perfect_resolution` (ResizeMode by
    its label; OUTER_FIT is "Resize and Fill")."""
    raw_H, raw_W, _ = image.shape
    k0 = float(target_H) / float(raw_H)
    k1 = float(target_W) / float(raw_W)
    if resize_mode == "Resize and Fill":
        estimation = min(k0, k1) * float(min(raw_H, raw_W))
    else:
        estimation = max(k0, k1) * float(min(raw_H, raw_W))
    return int(np.round(estimation))


@pytest.mark.parametrize("mode", list(LABELS))
@pytest.mark.parametrize("size, target", [((100, 100), (50, 100)), ((48, 40), (64, 56)), ((300, 200), (512, 768)),
                                          ((77, 131), (1024, 1024)), ((640, 427), (96, 64)), ((10, 10), (25, 25))])
def test_the_resolution_follows_sd_webui_controlnets_rule(size, target, mode):
    image = np.zeros((*size, 3), np.uint8)
    expected = a1111_pixel_perfect_resolution(image, *target, LABELS[mode])
    assert pixel_perfect_resolution(*size, *target, mode) == expected


def test_sd_webui_controlnets_own_cases():
    """Its tests (tests/external_code_api/external_code_test.py `TestPixelPerfectResolution`): 100² to 50×100."""
    assert pixel_perfect_resolution(100, 100, 50, 100, "resize-and-fill") == 50
    assert pixel_perfect_resolution(100, 100, 50, 100, "crop-and-resize") == 100


@pytest.mark.parametrize("mode", list(LABELS))
def test_the_control_image_is_made_at_that_resolution(mode):
    """sd-webui-controlnet's canny at the pixel-perfect resolution, then fitted by the mode (`detectmap_proc`); not
    the map the default 512 gives."""
    pixels = picture(90, 70)
    image, (w, h) = Image.fromarray(pixels), (56, 64)
    unit = Control("net", image, preprocess="canny", resize=mode, pixel_perfect=True)
    resolution = a1111_pixel_perfect_resolution(pixels, h, w, LABELS[mode])
    fit = "Crop and Resize" if mode == "just-resize" else LABELS[mode]  # (just-resize is diffusers' Lanczos here)
    got = control_image(unit, w, h)
    if mode != "just-resize":
        assert torch.equal(got, get_pytorch_control(detectmap_proc(a1111_canny(pixels, resolution), fit, h, w, set())))
    at_resolution = Control("net", image, preprocess="canny", resize=mode, processor_res=resolution)
    assert torch.equal(got, control_image(at_resolution, w, h))
    assert not torch.equal(got, control_image(Control("net", image, preprocess="canny", resize=mode), w, h))


def test_without_a_preprocessor_it_changes_nothing():
    image = Image.fromarray(picture(90, 70))
    assert torch.equal(control_image(Control("net", image, pixel_perfect=True), 56, 64),
                       control_image(Control("net", image), 56, 64))


def test_the_infotext_writes_it_as_sd_webui_controlnet():
    """`serialize_unit` writes the unit's fields in their order: Pixel Perfect after Guidance End."""
    image = Image.fromarray(picture())
    text = control_infotext(Control("canny-tiny", image, preprocess="canny", pixel_perfect=True))
    assert text.endswith("Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: True, Control Mode: Balanced")
    assert "Pixel Perfect" not in control_infotext(Control("canny-tiny", image, preprocess="canny"))


@pytest.fixture(scope="module")
def store(sd1_folder, tmp_path_factory):
    """A weights/ store whose controlnet/ holds a tiny ControlNet as `canny-tiny`."""
    root = tmp_path_factory.mktemp("pixel-perfect") / "weights"
    make_controlnet(sd1_folder, root / "controlnet" / "canny-tiny", seed=1)
    return root


@pytest.mark.usefixtures("one_thread")
def test_command_line_and_from_png(sd1_folder, store, tmp_path, monkeypatch):
    """--control-pixel-perfect gives the image --control-processor-res at the pixel-perfect resolution gives; the
    PNG says `Pixel Perfect: True`, and --from-png makes the same image again."""
    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    pixels = picture(90, 70)
    Image.fromarray(pixels).save(tmp_path / "picture.png")

    def generate(out, *options):
        assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "2", "--seed", "4", "--sampler",
                     "euler", "--width", "64", "--height", "64", "--controlnet", "canny-tiny", "--control-image",
                     str(tmp_path / "picture.png"), "--control-preprocess", "canny", *options, "-o", str(out)]) == 0
        return np.asarray(Image.open(out).convert("RGB"))

    perfect = generate(tmp_path / "perfect.png", "--control-pixel-perfect")
    resolution = a1111_pixel_perfect_resolution(pixels, 64, 64, "Just Resize")
    assert np.array_equal(perfect, generate(tmp_path / "at.png", "--control-processor-res", str(resolution)))
    assert "Pixel Perfect: True, " in Image.open(tmp_path / "perfect.png").text["parameters"]
    assert read_png(tmp_path / "perfect.png").controls[0]["pixel_perfect"] is True
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(tmp_path / "perfect.png"), "--model", str(sd1_folder),
                 "--control-image", str(tmp_path / "picture.png"), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), perfect)
    assert Image.open(again).text["parameters"] == Image.open(tmp_path / "perfect.png").text["parameters"]


def test_command_line_refuses_a_value_that_is_not_yes_or_no(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", PROMPT, "--controlnet", "C", "--control-image", "I", "--control-pixel-perfect", "maybe"])
    assert exit_.value.code == 2 and "'maybe': give yes or no" in capsys.readouterr().err


def test_a1111_units_take_pixel_perfect(store, monkeypatch):
    from ldm.serving.a1111 import ApiError, control_unit

    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    unit = {"module": "canny", "model": "canny-tiny [0123abcd]", "image": b64png(Image.fromarray(picture())),
            "pixel_perfect": True}
    assert control_unit(unit, "alwayson_scripts.controlnet.args[0]").pixel_perfect is True
    assert control_unit(unit | {"pixel_perfect": False}, "u").pixel_perfect is False
    assert control_unit({k: v for k, v in unit.items() if k != "pixel_perfect"}, "u").pixel_perfect is False
    with pytest.raises(ApiError) as error:
        control_unit(unit | {"pixel_perfect": "yes"}, "alwayson_scripts.controlnet.args[0]")
    assert error.value.status == 422 and "alwayson_scripts.controlnet.args[0].pixel_perfect" in str(error.value)
