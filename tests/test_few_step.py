"""Few-step sampling through `ldm generate`: the LCM and TCD samplers, `--timestep-spacing` (Turbo and Lightning
models are sampled with trailing spacing) and x0 prediction (`--prediction-type sample`), as whole images against
diffusers' StableDiffusion(XL)Pipeline / StableDiffusionImg2ImgPipeline given the same scheduler (LCMScheduler,
TCDScheduler, Euler with `timestep_spacing="trailing"`, …) on the same tiny folder and seed."""

import base64
import io

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF, assert_images_close
from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline
from official import diffusers_scheduler
from PIL import Image

from ldm_cli.main import main

PROMPT = "a lighthouse on a cliff at dusk"

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py) ldm and diffusers compared in one process

LOADED = {}


def load(cls, folder, sampler: str, **settings):
    """diffusers' `cls` on `folder` (loaded once), with `sampler`'s scheduler on the folder's config and `settings`."""
    if (cls, folder) not in LOADED:
        pipe = cls.from_pretrained(folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False) \
            if cls is not StableDiffusionXLPipeline else cls.from_pretrained(folder)
        pipe.set_progress_bar_config(disable=True)
        LOADED[cls, folder] = pipe, dict(pipe.scheduler.config)
    pipe, config = LOADED[cls, folder]
    scheduler = diffusers_scheduler(sampler, config)
    # as keyword arguments: a loaded config lists the fields its file left out (`_use_default_values`), and
    # `from_config` drops those from the dict, so a setting merged into it would be ignored
    pipe.scheduler = type(scheduler).from_config(scheduler.config, **settings)
    assert all(pipe.scheduler.config[k] == v for k, v in settings.items())
    return pipe


def reference(pipe, seed: int, **kwargs) -> np.ndarray:
    out = pipe(PROMPT, generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **kwargs).images[0]
    assert out.std() > 0.04  # a real image, not a flat one that any output would match
    return (out * 255).round().astype(np.int16)


def generate(tmp_path, folder, *args) -> np.ndarray:
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(folder), "-o", str(out), *args]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


# (ldm's options, diffusers' scheduler settings, diffusers' call arguments)
TEXT_TO_IMAGE = {
    "lcm-4": (["--sampler", "lcm", "--steps", "4", "--guidance", "1.5"], {}, {"guidance_scale": 1.5}),
    "lcm-1-no-cfg": (["--sampler", "lcm", "--steps", "1", "--guidance", "1"], {}, {"guidance_scale": 1.0}),
    "tcd-4": (["--sampler", "tcd", "--steps", "4", "--guidance", "1.5"], {}, {"guidance_scale": 1.5, "eta": 0.3}),
    "tcd-3-eta": (["--sampler", "tcd", "--steps", "3", "--eta", "0.8"], {}, {"eta": 0.8}),
    "euler-1-trailing": (["--sampler", "euler", "--steps", "1", "--timestep-spacing", "trailing", "--guidance", "0"],
                         {"timestep_spacing": "trailing"}, {"guidance_scale": 0.0}),  # SD-Turbo
    "euler_a-2-trailing": (["--sampler", "euler_a", "--steps", "2", "--timestep-spacing", "trailing"],
                           {"timestep_spacing": "trailing"}, {}),  # SDXL-Turbo's scheduler
    "ddim-3-trailing": (["--sampler", "ddim", "--steps", "3", "--timestep-spacing", "trailing"],
                        {"timestep_spacing": "trailing"}, {}),
    "dpmpp_2m-4-linspace": (["--sampler", "dpmpp_2m", "--steps", "4", "--timestep-spacing", "linspace"],
                            {"timestep_spacing": "linspace"}, {}),
}


@pytest.mark.parametrize("case", list(TEXT_TO_IMAGE))
def test_text_to_image_equals_diffusers(sd1_folder, tmp_path, case):
    options, settings, call = TEXT_TO_IMAGE[case]
    sampler = options[options.index("--sampler") + 1]
    steps = int(options[options.index("--steps") + 1])
    actual = generate(tmp_path, sd1_folder, "--seed", "5", *options)
    expected = reference(load(StableDiffusionPipeline, sd1_folder, sampler, **settings), 5, num_inference_steps=steps,
                         height=64, width=64, **call)
    assert_images_close(case, actual, expected)


def test_spacing_and_eta_change_the_image(sd1_folder, tmp_path):
    """The controls: trailing spacing and TCD's γ each move these images far beyond the tolerance."""
    leading = generate(tmp_path, sd1_folder, "--seed", "5", "--sampler", "euler_a", "--steps", "2")
    trailing = generate(tmp_path, sd1_folder, "--seed", "5", "--sampler", "euler_a", "--steps", "2",
                        "--timestep-spacing", "trailing")
    assert np.abs(leading - trailing).max() > 20
    gamma_default = generate(tmp_path, sd1_folder, "--seed", "5", "--sampler", "tcd", "--steps", "4")
    gamma_0 = generate(tmp_path, sd1_folder, "--seed", "5", "--sampler", "tcd", "--steps", "4", "--eta", "0")
    assert np.abs(gamma_default - gamma_0).max() > 20


@pytest.mark.parametrize("sampler, steps, strength", [("lcm", 4, 0.6), ("lcm", 2, 1.0), ("tcd", 4, 0.5)])
def test_image_to_image_equals_diffusers(sd1_folder, tmp_path, sampler, steps, strength):
    """Image-to-image runs the last int(steps·strength) steps of the grid, as StableDiffusionImg2ImgPipeline does
    with these schedulers (diffusers' LCM image-to-image pipeline instead rebuilds the grid from strength)."""
    image = Image.fromarray((np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "init.png")
    actual = generate(tmp_path, sd1_folder, "--seed", "8", "--sampler", sampler, "--steps", str(steps), "--image",
                      str(tmp_path / "init.png"), "--strength", str(strength), "--guidance", "1.5")
    pipe = load(StableDiffusionImg2ImgPipeline, sd1_folder, sampler)
    # diffusers' pipelines pass their own eta (0.0) to TCDScheduler.step, whose γ default is 0.3: ldm's default
    eta = {"eta": 0.3} if sampler == "tcd" else {}
    expected = reference(pipe, 8, image=image, num_inference_steps=steps, strength=strength, guidance_scale=1.5,
                         **eta)
    assert_images_close(f"{sampler} img2img {strength}", actual, expected)


@pytest.mark.parametrize("sampler, options, settings", [
    ("lcm", ["--steps", "4", "--guidance", "1.5"], {}),
    ("euler_a", ["--steps", "1", "--guidance", "0", "--timestep-spacing", "trailing"],
     {"timestep_spacing": "trailing"}),
])
def test_sdxl_few_step_equals_diffusers(sdxl_folder, tmp_path, sampler, options, settings):
    actual = generate(tmp_path, sdxl_folder, "--seed", "3", "--sampler", sampler, *options)
    guidance = float(options[options.index("--guidance") + 1])
    expected = reference(load(StableDiffusionXLPipeline, sdxl_folder, sampler, **settings), 3,
                         num_inference_steps=int(options[1]), guidance_scale=guidance)
    assert_images_close(f"sdxl {sampler}", actual, expected)


@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "lcm"])
def test_x0_prediction_equals_diffusers(sdxl_folder, tmp_path, sampler):
    """`--prediction-type sample`: the UNet's output is x0 (the 1-step SDXL-Lightning UNet: Euler, trailing)."""
    args = ["--seed", "4", "--sampler", sampler, "--steps", "2", "--guidance", "1"]
    spacing = {"timestep_spacing": "trailing"} if sampler != "lcm" else {}
    if spacing:
        args += ["--timestep-spacing", "trailing"]
    actual = generate(tmp_path, sdxl_folder, *args, "--prediction-type", "sample")
    expected = reference(load(StableDiffusionXLPipeline, sdxl_folder, sampler, prediction_type="sample", **spacing), 4,
                         num_inference_steps=2, guidance_scale=1.0)
    assert_images_close(f"x0 {sampler}", actual, expected)
    eps = generate(tmp_path, sdxl_folder, *args)
    assert np.abs(eps - actual).max() > 20  # control: the prediction type moves the image


def test_infotext_round_trip(sd1_folder, tmp_path):
    """LCM and TCD are written as `Sampler: LCM` / `TCD`, the spacing as `Timestep spacing`, γ as `Eta`; each read
    back by --from-png gives the same image."""
    for options, written in ((["--sampler", "tcd", "--eta", "0.6"], "Sampler: TCD, "),
                             (["--sampler", "euler", "--timestep-spacing", "trailing"], "Timestep spacing: trailing"),
                             (["--sampler", "lcm"], "Sampler: LCM, ")):
        first = tmp_path / "first.png"
        assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "3", "--seed", "2", "-o", str(first),
                     *options]) == 0
        params = Image.open(first).text["parameters"]
        assert written in params
        assert ("Eta: 0.6" in params) == ("--eta" in options)
        again = tmp_path / "again.png"
        assert main(["generate", "--from-png", str(first), "--model", str(sd1_folder), "-o", str(again)]) == 0
        assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))


@pytest.mark.parametrize("args, message", [
    (["--sampler", "lcm", "--timestep-spacing", "trailing"], "--timestep-spacing applies to"),
    (["--sampler", "euler_a", "--prediction-type", "sample"], "euler_a: EulerAncestralDiscreteScheduler does not take"),
    (["--sampler", "pndm", "--prediction-type", "sample"], "pndm: PNDMScheduler does not take"),
    (["--sampler", "lcm", "--steps", "51"], "lcm takes at most 50 steps"),
    (["--sampler", "tcd", "--eta", "1.5"], "eta must be between 0 and 1"),
    (["--timestep-spacing", "uniform"], "invalid choice: 'uniform'"),
])
def test_bad_input_is_one_line(sd1_folder, tmp_path, capsys, args, message):
    try:
        code = main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "2", "-o", str(tmp_path / "x.png"),
                     *args])
    except SystemExit as e:  # argparse's own refusals
        code = e.code
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_folder_sampler_with_spacing_it_ignores(sd1_folder, tmp_path, capsys):
    """A folder whose scheduler is LCM's refuses --timestep-spacing without --sampler, in one line."""
    import json
    import shutil

    folder = shutil.copytree(sd1_folder, tmp_path / "lcm-folder")
    config = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(config | {"_class_name": "LCMScheduler"}))
    code = main(["generate", PROMPT, "--model", str(folder), "--steps", "2", "--timestep-spacing", "trailing",
                 "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "not to lcm" in err, err


# ------------------------------------------------------------------------------------------------ LCM UNets


@pytest.fixture(scope="module")
def lcm_folder(tmp_path_factory):
    from official import write_folder
    from safetensors.torch import load_file, save_file

    folder = write_folder(tmp_path_factory.mktemp("lcm") / "tiny-lcm", "lcm-sd1", seed=31)
    # a trained LCM UNet depends on the guidance; a random cond_proj barely moves this tiny one: strengthen it
    path = folder / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(str(path))
    state["time_embedding.cond_proj.weight"] *= 30
    save_file(state, str(path))
    return folder


def test_lcm_unet_equals_diffusers(lcm_folder):
    """A `time_cond_proj_dim` UNet (the guidance embedding through `time_embedding.cond_proj`) against diffusers'
    UNet2DConditionModel with `timestep_cond`, the embedding built by diffusers' own pipeline function."""
    from conftest import max_rel_err
    from diffusers import LatentConsistencyModelPipeline, UNet2DConditionModel

    from ldm.networks.unet import guidance_embedding
    from ldm.pipelines.stable_diffusion import StableDiffusion

    reference = UNet2DConditionModel.from_pretrained(lcm_folder / "unet")
    ours = StableDiffusion.from_pretrained(lcm_folder).unet
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, reference.config.cross_attention_dim, generator=g)
    w = torch.tensor([7.5, 2.0])
    expected_cond = LatentConsistencyModelPipeline.get_guidance_scale_embedding(None, w, embedding_dim=24)
    assert torch.equal(guidance_embedding(w, 24), expected_cond)
    with torch.no_grad():
        expected = reference(x, 499, context, timestep_cond=expected_cond).sample
        actual = ours(x, torch.tensor(499.0), context, timestep_cond=expected_cond)
        without = reference(x, 499, context, timestep_cond=torch.zeros_like(expected_cond)).sample
    assert max_rel_err(actual, expected) < 1e-4
    assert max_rel_err(without, expected) > 1e-2  # control: the guidance embedding moves the output


def lcm_reference(folder, seed: int, **kwargs) -> np.ndarray:
    from diffusers import LatentConsistencyModelPipeline

    if (LatentConsistencyModelPipeline, folder) not in LOADED:
        pipe = LatentConsistencyModelPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                              requires_safety_checker=False)
        pipe.set_progress_bar_config(disable=True)
        LOADED[LatentConsistencyModelPipeline, folder] = pipe, dict(pipe.scheduler.config)
    pipe, _ = LOADED[LatentConsistencyModelPipeline, folder]
    return reference(pipe, seed, height=64, width=64, **kwargs)


@pytest.mark.parametrize("steps, guidance", [(4, 8.5), (2, 1.0), (1, 3.0)])
def test_lcm_folder_equals_latent_consistency_pipeline(lcm_folder, tmp_path, steps, guidance):
    """An LCM folder (model_index names LatentConsistencyModelPipeline, its scheduler is LCMScheduler) runs lcm by
    default, with the guidance embedded and no unconditional pass, as LatentConsistencyModelPipeline."""
    actual = generate(tmp_path, lcm_folder, "--seed", "6", "--steps", str(steps), "--guidance", str(guidance))
    expected = lcm_reference(lcm_folder, 6, num_inference_steps=steps, guidance_scale=guidance)
    assert_images_close(f"lcm folder {steps} steps, guidance {guidance}", actual, expected)
    if guidance != 1.0:  # control: the embedded guidance moves the image (w = 0 at guidance 1; measured 8/255)
        plain = generate(tmp_path, lcm_folder, "--seed", "6", "--steps", str(steps), "--guidance", "1")
        assert np.abs(plain - actual).max() > 2 * MAX_PIXEL_DIFF


def test_lcm_unet_runs_once_per_step_and_notes_the_negative_prompt(lcm_folder, tmp_path, capsys):
    from ldm.pipelines.stable_diffusion import StableDiffusion

    pipe = StableDiffusion.from_pretrained(lcm_folder)
    batches = []
    pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    result = pipe(PROMPT, negative_prompt="blurry", steps=3, seed=1, guidance=8.0)
    assert batches == [1, 1, 1]  # no unconditional batch, whatever the guidance
    assert any("negative prompt is not used" in note for note in result.notes)
    assert "Sampler: LCM, CFG scale: 8.0" in result.infotexts[0]


def test_lcm_single_file_equals_the_folder(lcm_folder, tmp_path):
    """An LDM-named single file of an LCM UNet: `time_embedding.cond_proj` kept under the `model.diffusion_model.`
    prefix (the name stable-diffusion.cpp lists among the keys it skips), its width read from the shape. A single
    file has no scheduler config: --sampler lcm, as the README's table says."""
    from official import write_single_file
    from safetensors.torch import load_file

    path = write_single_file(lcm_folder, tmp_path / "lcm.safetensors", "lcm-sd1")
    assert load_file(str(path))["model.diffusion_model.time_embedding.cond_proj.weight"].shape[1] == 24
    actual = generate(tmp_path, path, "--seed", "6", "--steps", "4", "--guidance", "8.5", "--sampler", "lcm",
                      "--width", "64", "--height", "64")
    expected = lcm_reference(lcm_folder, 6, num_inference_steps=4, guidance_scale=8.5)
    assert_images_close("lcm single file", actual, expected)


# ----------------------------------------------------------------------------------------------------- --unet


def sdxl_reference_with(sdxl_folder, unet, sampler: str, **settings):
    """StableDiffusionXLPipeline on the folder with `unet` in place of its own (as the cards of lcm-sdxl and
    SDXL-Lightning load theirs), and `sampler`'s scheduler."""
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_folder, unet=unet)
    pipe.set_progress_bar_config(disable=True)
    scheduler = diffusers_scheduler(sampler, dict(pipe.scheduler.config))
    pipe.scheduler = type(scheduler).from_config(scheduler.config, **settings)
    return pipe


def test_unet_folder_of_an_lcm_sdxl(sdxl_folder, tmp_path):
    """latent-consistency/lcm-sdxl: an SDXL UNet folder with time_cond_proj_dim, run on the SDXL base by `--unet`."""
    from diffusers import UNet2DConditionModel
    from official import SDXL_UNET, make_unet

    config = SDXL_UNET | {"time_cond_proj_dim": 16}
    unet = make_unet(config, seed=12)
    unet.save_pretrained(tmp_path / "lcm-sdxl")
    actual = generate(tmp_path, sdxl_folder, "--unet", str(tmp_path / "lcm-sdxl"), "--sampler", "lcm", "--steps", "4",
                      "--guidance", "8", "--seed", "3")
    pipe = sdxl_reference_with(sdxl_folder, UNet2DConditionModel.from_pretrained(tmp_path / "lcm-sdxl"), "lcm")
    expected = reference(pipe, 3, num_inference_steps=4, guidance_scale=8.0)
    assert_images_close("--unet lcm-sdxl folder", actual, expected)


@pytest.mark.parametrize("names", ["diffusers", "ldm"])
def test_unet_file_of_an_sdxl_lightning(sdxl_folder, tmp_path, names):
    """SDXL-Lightning's UNet-only files (`sdxl_lightning_4step_unet.safetensors`: diffusers' names, which its card
    loads with `unet.load_state_dict`), and the same UNet in LDM names (`model.diffusion_model.…`), sampled as
    its card says: Euler, trailing, guidance off."""
    from official import SDXL_UNET, make_unet
    from safetensors.torch import save_file

    from ldm.loading.single_file import to_single_file, unet_rules
    from ldm.networks.unet import UNetConfig

    other = make_unet(SDXL_UNET, seed=13)
    state = other.state_dict()
    if names == "ldm":
        state = to_single_file(unet_rules(UNetConfig.from_diffusers(SDXL_UNET)), state)
        assert all(k.startswith("model.diffusion_model.") for k in state)
    path = tmp_path / "sdxl_lightning_2step_unet.safetensors"
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    options = ["--sampler", "euler", "--timestep-spacing", "trailing", "--steps", "2", "--guidance", "0"]
    actual = generate(tmp_path, sdxl_folder, "--unet", str(path), "--seed", "4", *options)
    expected = reference(sdxl_reference_with(sdxl_folder, other, "euler", timestep_spacing="trailing"), 4,
                         num_inference_steps=2, guidance_scale=0.0)
    assert_images_close(f"--unet {names}-named file", actual, expected)
    own = generate(tmp_path, sdxl_folder, "--seed", "4", *options)
    assert np.abs(own - actual).max() > 20  # control: the other UNet draws another image


def test_unet_of_another_family_is_one_error(sd1_folder, sdxl_folder, tmp_path, capsys):
    code = main(["generate", PROMPT, "--model", str(sdxl_folder), "--unet", str(sd1_folder), "--steps", "1",
                 "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and "Traceback" not in err, err
    assert "does not fit this SDXL base model's" in errors[0] and "cross-attention" in errors[0]


# ------------------------------------------------------------------------------------ the models by name


@pytest.fixture()
def sd_turbo_hub(sd21_folder, tmp_path, monkeypatch):
    """stabilityai/sd-turbo as the Hub serves it (its folder: the SD 2.1 architecture at 512, ε-prediction, Euler
    with trailing spacing), a tiny copy in place of the download."""
    import json
    import shutil

    folder = shutil.copytree(sd21_folder, tmp_path / "sd-turbo")
    scheduler = folder / "scheduler" / "scheduler_config.json"
    config = json.loads(scheduler.read_text()) | {"_class_name": "EulerDiscreteScheduler", "timestep_spacing":
                                                  "trailing", "prediction_type": "epsilon"}
    scheduler.write_text(json.dumps(config))
    asked = []

    def snapshot_download(repo_id, **kwargs):
        asked.append(repo_id)
        return str(folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", snapshot_download)
    return folder, asked


@pytest.mark.parametrize("name", ["sd-turbo", "stabilityai/sd-turbo"])
def test_a_turbo_model_by_name_runs_as_its_card_says(sd_turbo_hub, tmp_path, name):
    """Given no steps or guidance, a manifest model runs with its card's (SD-Turbo: 1 step, guidance off) and its
    folder's sampler (Euler, trailing): the image of StableDiffusionPipeline called as the card calls it."""
    folder, asked = sd_turbo_hub
    out = tmp_path / "turbo.png"
    assert main(["generate", PROMPT, "--model", name, "--seed", "9", "-o", str(out)]) == 0
    assert asked == ["stabilityai/sd-turbo"]
    params = Image.open(out).text["parameters"]
    assert "Steps: 1, Sampler: Euler, CFG scale: 0.0," in params
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    expected = reference(pipe, 9, num_inference_steps=1, guidance_scale=0.0, height=64, width=64)
    assert_images_close(f"{name} by its card", np.asarray(Image.open(out).convert("RGB")).astype(np.int16), expected)
    given = tmp_path / "given.png"  # what the user gives wins over the card
    assert main(["generate", PROMPT, "--model", name, "--seed", "9", "--steps", "2", "--guidance", "1.5",
                 "-o", str(given)]) == 0
    assert "Steps: 2, Sampler: Euler, CFG scale: 1.5," in Image.open(given).text["parameters"]


def test_the_manifest_lists_the_few_step_models():
    from ldm.loading.families import manifest

    models = manifest()
    assert models["sd-turbo"].card == {"steps": 1, "guidance": 0.0} and models["sd-turbo"].family == "sd2"
    assert models["sdxl-turbo"].card == {"steps": 1, "guidance": 0.0, "width": 512, "height": 512}
    assert models["lcm-dreamshaper-v7"].card == {"steps": 4, "guidance": 8.5}
    assert "--prediction-type eps" in models["sd-turbo"].note  # what its single file needs


# --------------------------------------------------------------------------------- over HTTP and in batch


@pytest.mark.parametrize("parameters, request_fields", [
    ({"scheduler": "LCMScheduler", "num_inference_steps": 3, "guidance_scale": 1.5},
     {"sampler": "lcm", "steps": 3, "guidance": 1.5}),
    ({"scheduler": "tcd", "eta": 0.6, "num_inference_steps": 2}, {"sampler": "tcd", "eta": 0.6, "steps": 2}),
    ({"scheduler": "EulerDiscreteScheduler", "timestep_spacing": "trailing", "num_inference_steps": 1,
      "guidance_scale": 0}, {"sampler": "euler", "timestep_spacing": "trailing", "steps": 1, "guidance": 0.0}),
])
def test_scoring_takes_the_few_step_parameters(sd1_folder, parameters, request_fields):
    """The scoring schema (ldm serve, ldm batch) names the new samplers by ldm's name or diffusers' class, and takes
    `timestep_spacing` and `eta`: its image is the pipeline's for the same request."""
    from ldm.pipelines.stable_diffusion import StableDiffusion
    from ldm.serving.runner import score

    pipe = StableDiffusion.from_pretrained(sd1_folder)
    body = {"input_data": {"columns": ["prompt"], "data": [PROMPT], "parameters": parameters | {"seed": 3}}}
    (out,) = score(pipe, body)
    image = Image.open(io.BytesIO(base64.b64decode(out["generated_image"])))
    expected = pipe(PROMPT, seed=3, width=64, height=64, **request_fields).images[0]
    assert np.array_equal(np.asarray(image), np.asarray(expected))


@pytest.mark.parametrize("parameters, field", [
    ({"timestep_spacing": "uniform"}, "parameters.timestep_spacing"),
    ({"scheduler": "lcm", "timestep_spacing": "trailing"}, "parameters.timestep_spacing"),
    ({"eta": 2}, "parameters.eta"),
])
def test_scoring_refuses_bad_few_step_parameters_naming_the_field(sd1_folder, parameters, field):
    from ldm.serving.schema import RequestError, parse

    with pytest.raises(RequestError) as error:
        parse({"input_data": {"data": [PROMPT], "parameters": parameters}})
    assert error.value.field == field, error.value


@pytest.mark.parametrize("folder_fixture, sampler", [("sd2_inpaint_folder", "lcm"), ("sd1_folder", "lcm"),
                                                     ("sd1_folder", "tcd")])
def test_inpainting_with_the_few_step_samplers(request, tmp_path, folder_fixture, sampler):
    """LCM/TCD with a mask, on a 9-channel inpainting UNet and on a 4-channel one (the known region pasted back,
    re-noised to the next step), against StableDiffusionInpaintPipeline with that scheduler."""
    from diffusers import StableDiffusionInpaintPipeline

    folder = request.getfixturevalue(folder_fixture)
    image = Image.fromarray((np.random.default_rng(4).random((64, 64, 3)) * 255).astype(np.uint8))
    mask = np.zeros((64, 64), np.uint8)
    mask[16:48, 8:40] = 255
    image.save(tmp_path / "image.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")
    actual = generate(tmp_path, folder, "--image", str(tmp_path / "image.png"), "--mask", str(tmp_path / "mask.png"),
                      "--sampler", sampler, "--steps", "4", "--seed", "5", "--guidance", "1.5")
    eta = {"eta": 0.3} if sampler == "tcd" else {}
    expected = reference(load(StableDiffusionInpaintPipeline, folder, sampler), 5, image=image,
                         mask_image=Image.fromarray(mask), height=64, width=64, num_inference_steps=4,
                         guidance_scale=1.5, **eta)
    assert_images_close(f"{folder_fixture} {sampler} inpainting", actual, expected)


# ---------------------------------------------------------------------------------------------- LCM-LoRA


def test_lcm_lora_on_sd1_equals_diffusers(sd1_folder, tmp_path):
    """latent-consistency/lcm-lora-sdv1-5's layout: kohya keys on the UNet only (`lora_unet_<diffusers module>` with
    `.lora_down`, `.lora_up`, `.alpha`), attention and projections, the resnets' conv1/conv2/conv_shortcut and
    time_emb_proj, and the resamplers; merged and sampled with lcm, 4 steps, guidance 1 (its card), against
    StableDiffusionPipeline with load_lora_weights and LCMScheduler."""
    from lora_files import ATTENTION, CONVS, draw, modules, save_kohya

    from ldm.pipelines.stable_diffusion import StableDiffusion

    pipe = StableDiffusion.from_pretrained(sd1_folder)
    targets = modules(pipe.unet, f"({ATTENTION})|({CONVS})")
    assert any(name.endswith("time_emb_proj") for name in targets) and any("samplers" in n for n in targets)
    path = save_kohya(tmp_path / "pytorch_lora_weights.safetensors", draw({"unet": targets}, seed=21), xl=False)
    options = ["--sampler", "lcm", "--steps", "4", "--guidance", "1", "--seed", "2"]
    actual = generate(tmp_path, sd1_folder, "--lora", str(path), *options)
    plain = generate(tmp_path, sd1_folder, *options)
    reference_pipe = load(StableDiffusionPipeline, sd1_folder, "lcm")
    reference_pipe.load_lora_weights(str(path))
    try:
        expected = reference(reference_pipe, 2, num_inference_steps=4, guidance_scale=1.0, height=64, width=64)
    finally:
        reference_pipe.unload_lora_weights()
    assert_images_close("LCM-LoRA", actual, expected)
    assert np.abs(actual - plain).mean() > 5  # the LoRA visibly changes the image
