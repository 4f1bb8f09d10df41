"""What a new user meets first on the command line (issue 19): a fast --help, --version, one-line mistakes,
what `auto` chose, what a huge size means, and a step counter that counts the steps asked for; and options that
reach the sampler (`--eta`), against diffusers."""

import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from ldm_cli.main import main


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ldm_cli.main", *args], capture_output=True, text=True, timeout=120)


def test_version_and_help_answer_without_importing_torch():
    out = run("--version")
    assert out.returncode == 0 and re.fullmatch(r"ldm \d+\.\d+\.\d+\n", out.stdout)
    probe = ("import sys\nfrom ldm_cli.main import parse_args\n"
             "for argv in (['--help'], ['generate', '--help'], ['serve', '--help'], ['batch', '--help']):\n"
             "    try:\n        parse_args(argv)\n    except SystemExit:\n        pass\n"
             "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip().endswith("False"), done.stderr  # the help texts are built without torch


@pytest.mark.parametrize("argv, message", [
    (["generate", "a cat", "--steps", "many"], "ldm generate: error: argument --steps: invalid int value: 'many' "
                                                "(see `ldm generate --help`)"),
    (["frobnicate"], "ldm: error: argument command: invalid choice: 'frobnicate'"),
])
def test_argument_mistakes_take_one_line(argv, message):
    out = run(*argv)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and out.stderr.startswith(message)


def test_step_counter_counts_the_steps_asked_for(sd1_folder, tmp_path, capsys):
    common = ["--model", str(sd1_folder), "--no-safety-checker", "--seed", "1", "-o", str(tmp_path / "o.png")]
    assert main(["generate", "a cat", "--steps", "5", "--sampler", "pndm", *common]) == 0
    err = capsys.readouterr().err
    assert "ldm: tiny-sd1 on cpu, fp32" in err.splitlines()[0]
    assert "0/5 steps, starting…" in err and "5/5 steps" in err and "6/6" not in err
    assert "(6 UNet evaluations for 5 steps)" in err  # PNDM evaluates its second step twice
    assert main(["generate", "a cat", "--steps", "4", "--sampler", "heun", *common]) == 0
    err = capsys.readouterr().err
    assert "4/4 steps" in err and "(7 UNet evaluations for 4 steps)" in err
    assert main(["generate", "a cat", "--steps", "3", "--sampler", "euler", *common]) == 0
    assert "UNet evaluations" not in capsys.readouterr().err  # said only where they differ from the steps


def test_a_size_far_above_native_is_explained_before_the_run(sd1_folder, tmp_path, capsys):
    assert main(["generate", "a cat", "--model", str(sd1_folder), "--no-safety-checker", "--steps", "1",
                 "--width", "128", "--height", "128", "-o", str(tmp_path / "o.png")]) == 0
    err = capsys.readouterr().err
    note = err.index("128x128 is 4× the pixels of tiny-sd1's native 64x64")
    assert note < err.index("steps")  # before the first step


def generated_pixels(folder, out, *args: str):
    assert main(["generate", "a red barn", "--model", str(folder), "--no-safety-checker", "-o", str(out), *args]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


@pytest.mark.usefixtures("one_thread")
def test_eta_reaches_ddim_like_diffusers(sd1_folder, tmp_path):
    """`--sampler ddim --eta 0.7` (README: "`--eta` is DDIM's η") is diffusers' StableDiffusionPipeline with
    DDIMScheduler called with `eta=0.7` and a CPU generator of the same seed, within 2/255; diffusers at η = 0 is
    far from it (the control: η reaches the sampler, and the comparison can tell)."""
    from diffusers import StableDiffusionPipeline
    from official import diffusers_scheduler

    actual = generated_pixels(sd1_folder, tmp_path / "eta.png", "--sampler", "ddim", "--eta", "0.7", "--steps", "6",
                              "--seed", "3")
    pipe = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("ddim", pipe.scheduler.config)

    def reference(eta: float) -> np.ndarray:
        out = pipe("a red barn", num_inference_steps=6, width=64, height=64, eta=eta, output_type="np",
                   generator=torch.Generator("cpu").manual_seed(3)).images[0]
        assert out.std() > 0.04  # a real image, not a flat one that any output would match
        return (out * 255).round().astype(np.int16)

    diff, control = np.abs(actual - reference(0.7)).max(), np.abs(actual - reference(0.0)).max()
    print(f"ddim eta 0.7: max pixel difference {diff} (against diffusers at eta 0: {control})")
    assert diff <= 2 and control > 20
