"""ControlNet (ldm.networks.controlnet, ldm.pipelines.control) against diffusers: the network against ControlNetModel,
whole images against StableDiffusion(XL)ControlNetPipeline with one and two units, weight, start/end and guess mode,
A1111's control modes against their rule written here, and the command line's units and their mistakes.

The tiny ControlNets are diffusers' own `ControlNetModel.from_unet` of the tiny UNets (the layout of the official
ControlNets: the UNet's encoder and mid block, the hint embedding 16/32/96/256), with every weight moved off its
initial value: the zero convolutions start at zero, which would make every residual zero and every test pass."""

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF, assert_images_close, max_rel_err
from diffusers import (
    ControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionXLControlNetPipeline,
    UNet2DConditionModel,
)
from official import diffusers_scheduler
from PIL import Image

from ldm.networks.controlnet import ControlNet, ControlNetConfig
from ldm.pipelines.request import Control
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm_cli.main import main

PROMPT = "a house by a lake, line art"

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py) ldm and diffusers compared in one process


def make_controlnet(folder, out, seed: int):
    """A random ControlNet in the official layout for the UNet of `folder`, saved as diffusers saves it; for an
    inpainting UNet, one that reads the 4 latent channels (as the ControlNets used with inpainting models do)."""
    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    # (an LCM UNet's time embedding has a cond_proj that a ControlNet's lacks: its weights are not copied then)
    net = ControlNetModel.from_unet(unet, load_weights_from_unet=unet.config.time_cond_proj_dim is None)
    if net.config.in_channels != 4:
        net = ControlNetModel(**{k: v for k, v in net.config.items() if not k.startswith("_")} | {"in_channels": 4})
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn_like(p) * (0.3 if "controlnet_" in name else 0.02))
    net.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def controlnets(sd1_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("controlnet")
    return [make_controlnet(sd1_folder, root / f"control-{i}", seed=i) for i in (1, 2)]


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


def hint(seed: int = 0, size=(64, 64)) -> Image.Image:
    """A control image with structure (bars and a disc), as an edge or depth map would have."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    disc = ((x - size[0] * rng.uniform(0.3, 0.7)) ** 2 + (y - size[1] / 2) ** 2) < (size[0] / 4) ** 2
    bars = (x // 6 + seed) % 3 == 0
    return Image.fromarray((np.stack([disc, bars, disc ^ bars], -1) * 255).astype(np.uint8))


REFERENCES = {}


def reference_pipe(folder, paths, cls=StableDiffusionControlNetPipeline, sampler="euler"):
    key = (folder, tuple(paths), cls)
    if key not in REFERENCES:
        nets = [ControlNetModel.from_pretrained(p) for p in paths]
        kwargs = {} if cls is StableDiffusionXLControlNetPipeline else {
            "safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
        ref = cls.from_pretrained(folder, controlnet=nets[0] if len(nets) == 1 else nets, **kwargs)
        ref.set_progress_bar_config(disable=True)
        REFERENCES[key] = ref, dict(ref.scheduler.config)
    ref, config = REFERENCES[key]
    ref.scheduler = diffusers_scheduler(sampler, config)
    return ref


def as_pixels(images) -> np.ndarray:
    return (np.asarray(images[0]) * 255).round().astype(np.int16)


def ours(pipe, controls, seed=3, **kwargs) -> np.ndarray:
    image = pipe(PROMPT, steps=4, seed=seed, sampler="euler", controls=controls, **kwargs).images[0]
    return np.asarray(image).astype(np.int16)


def theirs(ref, images, seed=3, **kwargs) -> np.ndarray:
    out = ref(PROMPT, image=images, num_inference_steps=4, generator=torch.Generator().manual_seed(seed),
              output_type="np", height=64, width=64, **kwargs).images
    return as_pixels(out)


def test_network_equals_controlnet_model(controlnets):
    """Residuals of ldm's ControlNet against diffusers' ControlNetModel on the same folder (conditioning scale 1)."""
    import json

    from ldm.loading.files import load_module, read_safetensors

    path = controlnets[0]
    reference = ControlNetModel.from_pretrained(path).eval()
    cfg = ControlNetConfig.from_diffusers(json.loads((path / "config.json").read_text()))
    net = load_module(lambda: ControlNet(cfg), read_safetensors(path / "diffusion_pytorch_model.safetensors"), path,
                      "test")
    g = torch.Generator().manual_seed(0)
    x, image = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    context = torch.randn(2, 77, reference.config.cross_attention_dim, generator=g)
    with torch.no_grad():
        down, mid = reference(x, 500, context, image, return_dict=False)
        our_down, our_mid = net(x, torch.tensor(500.0), context, image)
    assert len(our_down) == len(down) == 12
    for a, e in zip([*our_down, our_mid], [*down, mid], strict=True):
        assert max_rel_err(a, e) < 1e-4
        assert e.abs().max() > 1e-3  # the zero convolutions were moved: residuals are not zero


@pytest.mark.parametrize("case", ["default", "weight-start-end", "guess-mode", "guess-mode-weight"])
def test_one_unit_equals_diffusers(pipe, sd1_folder, controlnets, case):
    settings = {"default": {}, "weight-start-end": {"weight": 0.6, "start": 0.2, "end": 0.8},
                "guess-mode": {"guess_mode": True}, "guess-mode-weight": {"guess_mode": True, "weight": 1.5}}[case]
    image = hint(1)
    actual = ours(pipe, [Control(str(controlnets[0]), image, **settings)])
    expected = theirs(reference_pipe(sd1_folder, controlnets[:1]), image,
                      controlnet_conditioning_scale=settings.get("weight", 1.0),
                      control_guidance_start=settings.get("start", 0.0), control_guidance_end=settings.get("end", 1.0),
                      guess_mode=settings.get("guess_mode", False))
    assert_images_close(f"one unit, {case}", actual, expected, plain=ours(pipe, []))


def test_two_units_equal_multicontrolnet(pipe, sd1_folder, controlnets):
    """Two units with their own weights and ranges: their residuals summed, as MultiControlNetModel sums them."""
    images = [hint(1), hint(2)]
    controls = [Control(str(controlnets[0]), images[0], weight=0.8, end=0.75),
                Control(str(controlnets[1]), images[1], weight=0.5, start=0.25)]
    actual = ours(pipe, controls)
    expected = theirs(reference_pipe(sd1_folder, controlnets), images, controlnet_conditioning_scale=[0.8, 0.5],
                      control_guidance_start=[0.0, 0.25], control_guidance_end=[0.75, 1.0])
    # (the second unit moved pixels by 5)
    assert_images_close("two units", actual, expected, plain=ours(pipe, controls[:1]), moved=MAX_PIXEL_DIFF)


def test_a_unit_of_weight_zero_changes_nothing(pipe, controlnets):
    plain = ours(pipe, [])
    assert np.array_equal(ours(pipe, [Control(str(controlnets[0]), hint(1), weight=0.0)]), plain)
    assert np.array_equal(ours(pipe, [Control(str(controlnets[0]), hint(1), start=0.0, end=0.2)]), plain)  # no step


def a1111_forward(net: ControlNetModel, weight: float, mode: str):
    """sd-webui-controlnet's control modes (scripts/hook.py), written from its rule around diffusers' ControlNetModel
    forward: soft injection (prompt, control) weights residual i by weight·0.825^(12 − i); CFG injection (control)
    zeroes the unconditional rows' residuals (diffusers' batch: [unconditional; conditional])."""
    forward = net.forward

    def a1111(*args, conditioning_scale=1.0, guess_mode=False, return_dict=False, **kwargs):
        down, mid = forward(*args, conditioning_scale=1.0, return_dict=False, **kwargs)
        scales = [weight * 0.825 ** float(12 - i) for i in range(13)] if mode != "balanced" else [weight] * 13
        residuals = [r * s for r, s in zip([*down, mid], scales, strict=True)]
        if mode == "control":
            half = residuals[0].shape[0] // 2
            residuals = [torch.cat([torch.zeros_like(r[:half]), r[half:]]) for r in residuals]
        return residuals[:-1], residuals[-1]

    return a1111


@pytest.mark.parametrize("mode", ["prompt", "control"])
def test_control_modes_follow_a1111s_rule(pipe, sd1_folder, controlnets, mode):
    image, weight = hint(3), 1.2
    actual = ours(pipe, [Control(str(controlnets[0]), image, weight=weight, mode=mode)])
    ref = reference_pipe(sd1_folder, controlnets[:1])
    ref.controlnet.forward = a1111_forward(ref.controlnet, weight, mode)
    try:
        expected = theirs(ref, image)
    finally:
        del ref.controlnet.forward  # (the class's forward again)
    balanced = ours(pipe, [Control(str(controlnets[0]), image, weight=weight)])
    # (the mode moved pixels by 8 or more)
    assert_images_close(f"control mode {mode}", actual, expected, plain=balanced, moved=2 * MAX_PIXEL_DIFF)


@pytest.fixture(scope="module")
def sdxl_controlnet(sdxl_folder, tmp_path_factory):
    return make_controlnet(sdxl_folder, tmp_path_factory.mktemp("controlnet-xl") / "control-xl", seed=4)


def test_sdxl_unit_equals_diffusers(sdxl_folder, sdxl_controlnet):
    """An SDXL ControlNet (its `text_time` embedding of the pooled text and the size ids)."""
    xl = StableDiffusion.from_pretrained(sdxl_folder)
    image = hint(4)
    actual = ours(xl, [Control(str(sdxl_controlnet), image, weight=0.9)])
    expected = theirs(reference_pipe(sdxl_folder, [sdxl_controlnet], StableDiffusionXLControlNetPipeline), image,
                      controlnet_conditioning_scale=0.9)
    assert_images_close("sdxl unit", actual, expected, plain=ours(xl, []))


def test_command_line_units_and_the_infotext(sd1_folder, controlnets, tmp_path):
    for i, path in enumerate((tmp_path / "a.png", tmp_path / "b.png")):
        hint(i + 1).save(path)
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "4", "--seed", "3", "--sampler", "euler",
                 "--controlnet", str(controlnets[0]), "--control-image", str(tmp_path / "a.png"),
                 "--controlnet", str(controlnets[1]), "--control-image", str(tmp_path / "b.png"),
                 "--control-weight", "0.8", "--control-weight", "0.5", "--control-start", "0", "--control-start",
                 "0.25", "--control-end", "0.75", "--control-end", "1", "-o", str(out)]) == 0
    expected = theirs(reference_pipe(sd1_folder, controlnets), [hint(1), hint(2)],
                      controlnet_conditioning_scale=[0.8, 0.5], control_guidance_start=[0.0, 0.25],
                      control_guidance_end=[0.75, 1.0])
    assert_images_close("command line", np.asarray(Image.open(out).convert("RGB")).astype(np.int16), expected)
    params = Image.open(out).text["parameters"]
    assert (f'ControlNet 0: "Module: none, Model: {controlnets[0].name}, Weight: 0.8, Resize Mode: Just Resize, '
            'Guidance Start: 0.0, Guidance End: 0.75, Control Mode: Balanced"') in params
    assert f'ControlNet 1: "Module: none, Model: {controlnets[1].name}, Weight: 0.5,' in params


@pytest.mark.parametrize("args, message", [
    (["--controlnet", "C"], "1 --controlnet for 0 --control-image"),
    (["--controlnet", "C", "--control-image", "I", "--control-weight", "1", "--control-weight", "2"],
     "--control-weight was given 2 times for 1 ControlNet units"),
    (["--controlnet", "C", "--control-image", "NOIMAGE.png"], "control image NOIMAGE.png: no such file"),
    (["--controlnet", "C", "--control-image", "I", "--control-weight", "2.5"], "the weight must be from 0 to 2"),
    (["--controlnet", "C", "--control-image", "I", "--control-start", "0.8", "--control-end", "0.5"],
     "0 ≤ start < end ≤ 1"),
    (["--controlnet", "NOCONTROLNET", "--control-image", "I"], "ControlNet 'NOCONTROLNET': no such file or folder"),
    (["--controlnet", "SDXL", "--control-image", "I"], "it was made for another model"),
])
def test_bad_units_are_one_line(sd1_folder, controlnets, sdxl_controlnet, tmp_path, capsys, args, message):
    hint(1).save(tmp_path / "hint.png")
    names = {"C": str(controlnets[0]), "I": str(tmp_path / "hint.png"), "SDXL": str(sdxl_controlnet)}
    code = main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "1", "-o", str(tmp_path / "x.png"),
                 *[names.get(a, a) for a in args]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


@pytest.mark.parametrize("task", ["img2img", "inpaint-4ch", "inpaint-9ch"])
def test_image_to_image_and_inpainting_with_a_unit(request, sd1_folder, controlnets, tmp_path, task):
    """A unit in image-to-image and inpainting, against StableDiffusionControlNetImg2ImgPipeline and
    StableDiffusionControlNetInpaintPipeline (a 9-channel UNet's ControlNet reads the noisy latents alone)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline, StableDiffusionControlNetInpaintPipeline

    folder = request.getfixturevalue("sd2_inpaint_folder") if task == "inpaint-9ch" else sd1_folder
    net = controlnets[0] if task != "inpaint-9ch" else make_controlnet(folder, tmp_path / "control-sd2", seed=5)
    init = Image.fromarray((np.random.default_rng(7).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:56] = 255
    mask = Image.fromarray(mask)
    image = hint(5)
    extra = {} if task == "img2img" else {"mask": mask}
    model = StableDiffusion.from_pretrained(folder)
    strength = 0.75 if task == "img2img" else 1.0
    actual = ours(model, [Control(str(net), image, weight=0.9)], image=init, strength=strength, **extra)
    cls = StableDiffusionControlNetImg2ImgPipeline if task == "img2img" else StableDiffusionControlNetInpaintPipeline
    ref = reference_pipe(folder, [net], cls)
    reference_inputs = {"image": init, "control_image": image, "strength": strength}
    if task != "img2img":
        reference_inputs["mask_image"] = mask
    out = ref(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(3), output_type="np",
              controlnet_conditioning_scale=0.9, height=64, width=64, **reference_inputs).images
    plain = ours(model, [], image=init, strength=strength, **extra)
    assert_images_close(f"{task} with a unit", actual, as_pixels(out), plain=plain, moved=MAX_PIXEL_DIFF)


# ------------------------------------------------------------------------------------ over HTTP and in batch


@pytest.fixture()
def served_controlnets(controlnets, tmp_path, monkeypatch):
    """A weights/ store whose controlnet/ folder holds the tiny ControlNet as `canny-tiny`."""
    import shutil

    store = tmp_path / "weights"
    shutil.copytree(controlnets[0], store / "controlnet" / "canny-tiny")
    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    return store / "controlnet" / "canny-tiny"


def b64png(image: Image.Image) -> str:
    import base64
    import io

    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def test_scoring_takes_controlnet_units(pipe, served_controlnets):
    """`parameters.controlnet` names a model of the server's weights/controlnet/; a row's `control_image` is its
    control image (base64, as `image`); weight, start, end and mode apply to every unit. A row without its control
    image gets an error naming the cell, and the other rows are answered."""
    import base64
    import io

    from ldm.serving.runner import score

    image = hint(6)
    body = {"input_data": {"columns": ["prompt", "control_image"], "data": [[PROMPT, b64png(image)], [PROMPT, None]],
                           "parameters": {"controlnet": "canny-tiny", "control_weight": 0.7, "control_end": 0.75,
                                          "num_inference_steps": 4, "scheduler": "euler", "seed": 3}}}
    first, second = score(pipe, body)
    got = np.asarray(Image.open(io.BytesIO(base64.b64decode(first["generated_image"])))).astype(np.int16)
    expected = ours(pipe, [Control(str(served_controlnets), image, weight=0.7, end=0.75)])
    assert np.array_equal(got, expected)
    assert second["error"]["field"] == "data[1].control_image"


@pytest.mark.parametrize("parameters, field, message", [
    ({"controlnet": "/etc/passwd"}, "parameters.controlnet", "not a path"),
    ({"controlnet": "no-such-model"}, "parameters.controlnet", "no such file or folder"),
    ({"controlnet": "canny-tiny", "control_weight": 3}, "parameters.control_weight", "from 0 to 2"),
    ({"controlnet": "canny-tiny", "control_mode": "loud"}, "parameters.control_mode", "unknown control mode"),
])
def test_scoring_refuses_bad_units_naming_the_field(served_controlnets, parameters, field, message):
    from ldm.serving.schema import RequestError, parse

    with pytest.raises(RequestError) as error:
        parse({"input_data": {"columns": ["prompt"], "data": [PROMPT], "parameters": parameters}})
    assert error.value.field == field and message in error.value.message, error.value


def test_hires_fix_keeps_the_unit_with_a1111s_soft_weights(pipe, sd1_folder, controlnets):
    """The hires fix's second pass runs the unit again on the upscaled image, its control image resized to the new
    size and its residuals weighted softly as sd-webui-controlnet weights them there: against diffusers' ControlNet
    text-to-image, a Lanczos upscale, then ControlNet image-to-image with A1111's rule (`a1111_forward`)."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    image, weight = hint(7), 0.9
    actual = pipe(PROMPT, steps=4, seed=3, sampler="euler", hires_scale=1.5, hires_upscaler="lanczos",
                  controls=[Control(str(controlnets[0]), image, weight=weight)]).images[0]
    first = reference_pipe(sd1_folder, controlnets[:1])(
        PROMPT, image=image, num_inference_steps=4, generator=torch.Generator().manual_seed(3), height=64, width=64,
        controlnet_conditioning_scale=weight).images[0]
    upscaled = first.resize((96, 96), Image.Resampling.LANCZOS)
    second = reference_pipe(sd1_folder, controlnets[:1], StableDiffusionControlNetImg2ImgPipeline)

    def second_pass(**kwargs):
        return as_pixels(second(PROMPT, image=upscaled, control_image=image, strength=0.7, num_inference_steps=4,
                                generator=torch.Generator().manual_seed(3), output_type="np", height=96, width=96,
                                **kwargs).images)

    balanced = second_pass(controlnet_conditioning_scale=weight)  # the control: diffusers' own weighting
    second.controlnet.forward = a1111_forward(second.controlnet, weight, "prompt")
    try:
        expected = second_pass()
    finally:
        del second.controlnet.forward
    assert_images_close("hires with a unit", np.asarray(actual).astype(np.int16), expected, plain=balanced,
                        moved=MAX_PIXEL_DIFF)


def test_from_png_restores_the_units(sd1_folder, controlnets, tmp_path, capsys, monkeypatch):
    """--from-png reads the units back (model by name in weights/controlnet/, weight, start, end, mode); the control
    images are given again, as the PNG holds none: the same image. Without them, one line says what to give."""
    import shutil

    store = tmp_path / "weights"
    shutil.copytree(controlnets[0], store / "controlnet" / "tiny-a")
    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    hint(8).save(tmp_path / "a.png")
    first = tmp_path / "first.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "3", "--seed", "5", "--sampler", "euler",
                 "--controlnet", "tiny-a", "--control-image", str(tmp_path / "a.png"), "--control-weight", "0.7",
                 "--control-end", "0.7", "--control-mode", "prompt", "--control-preprocess", "canny",
                 "--control-threshold-a", "50", "--control-resize", "crop-and-resize", "-o", str(first)]) == 0
    again = tmp_path / "again.png"
    assert main(["generate", "--from-png", str(first), "--model", str(sd1_folder), "--control-image",
                 str(tmp_path / "a.png"), "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert Image.open(first).text["parameters"] == Image.open(again).text["parameters"]
    capsys.readouterr()
    code = main(["generate", "--from-png", str(first), "--model", str(sd1_folder), "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "made with 1 ControlNet unit(s) (tiny-a): give their control images" in err, err


def test_a_refiner_hand_off_controls_the_base_only(sdxl_folder, sdxl_refiner_folder, sdxl_controlnet):
    """With a refiner, the units steer the base's part (the refiner's UNet has other widths: no SDXL ControlNet
    fits it), and the refiner finishes from the controlled latents."""
    from ldm.pipelines.refiner import BaseWithRefiner

    base, refiner = StableDiffusion.from_pretrained(sdxl_folder), StableDiffusion.from_pretrained(sdxl_refiner_folder)
    both = BaseWithRefiner(base, refiner, 0.5)
    controlled = both(PROMPT, steps=4, seed=3, sampler="euler", controls=[Control(str(sdxl_controlnet), hint(4))])
    plain = both(PROMPT, steps=4, seed=3, sampler="euler")
    assert np.abs(np.asarray(controlled.images[0]).astype(int) - np.asarray(plain.images[0])).max() > 10
    assert not refiner.controlnets and len(base.controlnets) == 1


def test_an_lcm_model_with_a_unit_equals_diffusers(tmp_path):
    """An LCM UNet (its guidance embedded) with a ControlNet, which takes no guidance embedding: as
    StableDiffusionControlNetPipeline runs them, with LCMScheduler."""
    from official import write_folder

    folder = write_folder(tmp_path / "tiny-lcm", "lcm-sd1", seed=31)
    net = make_controlnet(folder, tmp_path / "control-lcm", seed=9)
    model = StableDiffusion.from_pretrained(folder)
    image = hint(9)
    actual = np.asarray(model(PROMPT, steps=4, seed=3, guidance=4.0, controls=[Control(str(net), image)])
                        .images[0]).astype(np.int16)
    expected = theirs(reference_pipe(folder, [net], sampler="lcm"), image, guidance_scale=4.0)
    plain = np.asarray(model(PROMPT, steps=4, seed=3, guidance=4.0).images[0]).astype(np.int16)
    assert_images_close("lcm with a unit", actual, expected, plain=plain)
