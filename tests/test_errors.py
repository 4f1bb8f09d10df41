"""Bad input: a clear one-line error, a non-zero exit, no traceback, nothing unpickled."""

import os
import pickle
import shutil
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from ldm.errors import LoadError
from ldm.loading.files import read_safetensors
from ldm_cli.main import main

PROMPT = "a cat"


def run(capsys, *args):
    code = main(["generate", PROMPT, *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return code, err


@pytest.fixture
def folder_copy(sd1_folder, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(sd1_folder, dst)
    return dst


def test_missing_folder(capsys, tmp_path):
    code, err = run(capsys, "--model", str(tmp_path / "nope"))
    assert code == 2 and "no such file or folder" in err


def test_folder_without_model_index(capsys, tmp_path):
    code, err = run(capsys, "--model", str(tmp_path))
    assert code == 2 and "model_index.json is missing" in err


def test_missing_component_folder(capsys, folder_copy):
    shutil.rmtree(folder_copy / "vae")
    code, err = run(capsys, "--model", str(folder_copy))
    assert code == 2 and "the vae/ folder is missing" in err


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_safetensors(capsys, folder_copy, damage):
    path = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    data = path.read_bytes()
    path.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    code, err = run(capsys, "--model", str(folder_copy), "--steps", "1")
    assert code == 2
    assert "diffusion_pytorch_model.safetensors" in err and "truncated or corrupt" in err


def test_weights_that_do_not_match_the_config(capsys, folder_copy):
    path = folder_copy / "unet" / "diffusion_pytorch_model.safetensors"
    state = load_file(path)
    del state["conv_in.weight"]
    state["extra.weight"] = state["conv_out.bias"].clone()
    state["conv_out.bias"] = state["conv_out.bias"][:2].clone()
    save_file(state, str(path))
    code, err = run(capsys, "--model", str(folder_copy), "--steps", "1")
    assert code == 2
    assert "missing keys: conv_in.weight" in err and "unexpected keys: extra.weight" in err
    assert "wrong shapes: conv_out.bias" in err and "SD 1.x" in err


class Boom:
    """Unpickling this writes a marker file: the tests prove it is never unpickled."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_only_folder_is_refused_unread(capsys, folder_copy, tmp_path):
    marker = tmp_path / "unpickled"
    for path in (folder_copy / "unet").glob("*.safetensors"):
        path.unlink()
    (folder_copy / "unet" / "diffusion_pytorch_model.bin").write_bytes(pickle.dumps(Boom(str(marker))))
    code, err = run(capsys, "--model", str(folder_copy))
    assert code == 2 and "pickle" in err and "safetensors" in err
    assert not marker.exists()


def test_ckpt_file_is_refused_unread(capsys, tmp_path):
    marker = tmp_path / "unpickled"
    ckpt = tmp_path / "sd-v1-4.ckpt"
    ckpt.write_bytes(pickle.dumps(Boom(str(marker))))
    code, err = run(capsys, "--model", str(ckpt))
    assert code == 2 and "never unpickles" in err
    assert not marker.exists()
    with pytest.raises(LoadError, match="pickle"):
        read_safetensors(ckpt)


@pytest.mark.parametrize("args, message", [
    (["--width", "65"], "width must be a positive multiple of 8"),
    (["--height", "0"], "height must be a positive multiple of 8"),
    (["--steps", "0"], "steps must be a whole number from 1 to 1000"),
    (["--steps", "1001"], "steps must be a whole number from 1 to 1000"),
    (["--num-images", "0"], "number of images must be ≥ 1"),
    (["--seed", "-1"], "seed must be between 0"),
    (["--guidance", "-2"], "guidance must be a number ≥ 0"),
    (["--eta", "1.5"], "eta must be between 0 and 1"),
    (["--guidance", "nan"], "guidance must be a number ≥ 0"),
    (["--image", "x.png", "--strength", "0"], "strength must be in (0, 1]"),
    (["-o", "out.jpg"], "must be a .png file"),
])
def test_out_of_range_parameters_fail_before_loading(capsys, tmp_path, args, message):
    # the model path does not exist: these must be reported before any loading is attempted
    code, err = run(capsys, "--model", str(tmp_path / "not-loaded"), *args)
    assert code == 2 and message in err


def test_unknown_sampler_lists_the_valid_ones(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", PROMPT, "--sampler", "dpm_fast"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2
    assert "invalid choice: 'dpm_fast'" in err and "pndm" in err and "ddim" in err and "euler" in err


def test_console_script_help_and_error(tmp_path):
    ldm = shutil.which("ldm", path=os.path.dirname(sys.executable)) or shutil.which("ldm")
    assert ldm, "the `ldm` console script is not installed"
    help_text = subprocess.run([ldm, "generate", "--help"], capture_output=True, text=True, check=True).stdout
    for flag in ("--negative-prompt", "--steps", "--guidance", "--seed", "--width", "--height", "--sampler",
                 "--num-images", "--device", "--dtype", "pndm", "ddim", "euler"):
        assert flag in help_text
    proc = subprocess.run([ldm, "generate", PROMPT, "--model", str(tmp_path / "missing")], capture_output=True,
                          text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "no such file or folder" in proc.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda(capsys, sd1_folder):
    code, err = run(capsys, "--model", str(sd1_folder), "--device", "cuda")
    assert code == 2 and "no CUDA device" in err


@pytest.mark.parametrize("device", ["mps", "meta", "tpu", "cuda:x"])
def test_unknown_devices(capsys, sd1_folder, device):
    code, err = run(capsys, "--model", str(sd1_folder), "--device", device)
    assert code == 2 and ("unknown device" in err or "no CUDA device" in err)


@pytest.mark.parametrize("damage, message", [
    (lambda root: (root / "model_index.json").write_text("[1, 2]"), "StableDiffusionPipeline"),
    (lambda root: (root / "tokenizer" / "vocab.json").write_text("{not json"), "vocab.json is not valid JSON"),
    (lambda root: (root / "unet" / "config.json").write_text(
        (root / "unet" / "config.json").read_text().replace('"attention_head_dim": 8', '"attention_head_dim": "8"')),
     "heads = ('8', '8', '8', '8') is not of the expected type"),
    (lambda root: (root / "vae" / "config.json").write_text('"a string"'), "is not a JSON object"),
    (lambda root: (root / "scheduler" / "scheduler_config.json").write_text(
        '{"_class_name": "PNDMScheduler", "beta_schedule": "squaredcos_cap_v2"}'), "beta_schedule"),
])
def test_damaged_folder_files(capsys, folder_copy, damage, message):
    damage(folder_copy)
    code, err = run(capsys, "--model", str(folder_copy), "--steps", "1")
    assert code == 2 and message in err


@pytest.mark.parametrize("field, value, sampler", [
    ("solver_order", 3, "dpmpp_2m"), ("solver_type", "heun", "dpmpp_2m"), ("use_lu_lambdas", True, "dpmpp_2m_sde"),
    ("algorithm_type", "dpmsolver", "dpmpp_2m"), ("solver_type", "bh1", "unipc"), ("predict_x0", False, "unipc"),
    ("disable_corrector", [0], "unipc"), ("use_exponential_sigmas", True, "euler"), ("use_beta_sigmas", True, "lms"),
])
def test_scheduler_settings_ldm_does_not_implement_are_refused(field, value, sampler):
    from official import SD1_SCHEDULER

    from ldm.errors import ConfigError
    from ldm.sampling.samplers import SAMPLERS
    from ldm.sampling.schedules import SchedulerConfig

    config = SchedulerConfig.from_diffusers(SD1_SCHEDULER | {field: value})
    with pytest.raises(ConfigError, match=f"{field}="):
        SAMPLERS[sampler].schedule(config, 10, False)
    SAMPLERS["ddim"].schedule(config, 10, False)  # a setting of another scheduler class does not matter to DDIM


def test_a_folder_with_an_sde_dpm_scheduler_defaults_to_the_sde_sampler():
    from official import SD1_SCHEDULER

    from ldm.sampling.samplers import sampler_for
    from ldm.sampling.schedules import SchedulerConfig

    dpm = SD1_SCHEDULER | {"_class_name": "DPMSolverMultistepScheduler"}
    assert sampler_for(SchedulerConfig.from_diffusers(dpm)) == "dpmpp_2m"
    assert sampler_for(SchedulerConfig.from_diffusers(dpm | {"algorithm_type": "sde-dpmsolver++"})) == "dpmpp_2m_sde"


@pytest.mark.parametrize("args, message", [
    (["--sampler", "heun", "--image", "image.png", "--mask", "image.png"], "heun: diffusers cuts the schedule"),
    (["--refiner-start", "0.7"], "--refiner-start goes with --refiner"),
])
def test_combinations_ldm_refuses(capsys, sd1_folder, tmp_path, monkeypatch, args, message):
    from PIL import Image

    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (64, 64), "white").save("image.png")
    code, err = run(capsys, "--model", str(sd1_folder), "--steps", "2", *args)
    assert code == 2 and message in err


def test_a_scheduler_ldm_lacks_needs_a_sampler_named(capsys, folder_copy, tmp_path):
    import json

    path = folder_copy / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | {"_class_name": "KDPM2DiscreteScheduler"}))
    code, err = run(capsys, "--model", str(folder_copy), "--steps", "1")
    assert code == 2 and "KDPM2DiscreteScheduler) is not one ldm implements; pick a sampler" in err
    assert main(["generate", PROMPT, "--model", str(folder_copy), "--steps", "1", "--sampler", "euler",
                 "-o", str(tmp_path / "ok.png")]) == 0


def test_karras_is_checked_against_the_folders_default_sampler(sd1_folder):
    from ldm.errors import InputError
    from ldm.pipelines.stable_diffusion import StableDiffusion

    pipe = StableDiffusion.from_pretrained(sd1_folder)  # PNDM folder: no Karras grid in diffusers
    with pytest.raises(InputError, match="not to pndm"):
        pipe(PROMPT, steps=2, seed=0, karras=True)


def test_a_cast_on_load_reads_each_tensor_once_and_gives_the_same_values(sd1_folder):
    """Casting while loading streams the file tensor by tensor (the memory peak is the cast weights plus one
    tensor); the values must be those of casting the memory-mapped tensors."""
    import torch

    from ldm.loading.files import read_safetensors

    for path in (sd1_folder / "unet" / "diffusion_pytorch_model.safetensors", sd1_folder / "text_encoder" /
                 "model.safetensors"):
        mapped = read_safetensors(path)
        for dtype in (torch.float16, torch.bfloat16):
            cast = read_safetensors(path, dtype)
            assert set(cast) == set(mapped)
            for k, v in mapped.items():
                expected = v.to(dtype) if v.is_floating_point() else v
                assert cast[k].dtype == expected.dtype and torch.equal(cast[k], expected), k
