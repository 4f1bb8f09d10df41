"""Every Python block of the README runs, as written, on the tiny models: the only changes are the model names
(Hub ids → the tiny folders and files of the same families), the device (the CPU), the file the image-to-image
example opens and, for the attention maps, the size (64² in place of 512², the tiny models' scale). A block that no
longer runs (a renamed import, a changed signature) fails here. The `ldm parity` block runs diffusers beside ldm at
a single file's native 512², two minutes here: it is marked slow.

The README's shell commands run too, as a user types them, each an `ldm` subprocess in one folder that holds the
models `ldm tiny` writes (tiny-sd1, tiny-sdxl): the quick start's lines exactly as written, the other commands with
the substitutions in SHELL_NAMES (the Hub ids → those folders, pixel sizes ÷ 8 to the tiny models' scale, 2 steps,
the venv's `ldm`). A command that cannot run here (the Hub, a GPU, a LoRA or ControlNet download, a server that
keeps running, torchrun) is listed in NOT_RUN with the test that covers it; a new command must be put in one or
the other."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
PARITY_BLOCK = "from ldm.tools.parity import check"
A1111_BLOCK = "import webuiapi"  # runs against a live server: tests/test_a1111_api.py runs it

pytestmark = pytest.mark.usefixtures("one_thread")


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.M | re.S)


def run_blocks(blocks: list[str], names: dict[str, str], folder: Path) -> None:
    """Each block with `names` substituted (every one of them must occur), in order, in one namespace, in `folder`."""
    text = "\n".join(blocks)
    missing = [old for old in names if old not in text]
    assert not missing, f"the README no longer says {missing}: update this test's substitutions"
    namespace: dict = {}
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        for i, block in enumerate(blocks):
            code = block
            for old, new in names.items():
                code = code.replace(old, new)
            try:
                exec(compile(code, f"README.md python block {i}", "exec"), namespace)
            except Exception as e:
                raise AssertionError(f"README python block {i} failed: {e!r}\n{code}") from e
    finally:
        os.chdir(cwd)


def test_the_readme_has_its_python_blocks():
    blocks = python_blocks()
    assert len(blocks) >= 6 and sum(PARITY_BLOCK in b for b in blocks) == 1


def test_python_blocks_run_on_the_tiny_models(sd1_folder, sdxl_folder, sdxl_refiner_folder, tmp_path):
    names = {'"stable-diffusion-v1-5/stable-diffusion-v1-5"': repr(str(sd1_folder)),
             '"stabilityai/stable-diffusion-xl-base-1.0"': repr(str(sdxl_folder)),
             '"stabilityai/stable-diffusion-xl-refiner-1.0"': repr(str(sdxl_refiner_folder)),
             'device="cuda"': 'device="cpu"', "width=512, height=512": "width=64, height=64"}
    Image.new("RGB", (64, 48), (200, 120, 40)).save(tmp_path / "sketch.png")
    run_blocks([b for b in python_blocks() if PARITY_BLOCK not in b and A1111_BLOCK not in b], names, tmp_path)
    for written in ("astronaut.png", "lighthouse.png", "fox.png"):
        assert (tmp_path / written).is_file(), written
    assert any((tmp_path / "maps").glob("*.png"))


@pytest.mark.slow
def test_the_parity_block_runs_on_a_tiny_single_file(single_file, tmp_path):
    names = {'"my-finetune.safetensors"': repr(str(single_file("sd1")))}
    run_blocks([b for b in python_blocks() if PARITY_BLOCK in b], names, tmp_path)


# ------------------------------------------------------------------------------------------- shell commands

LDM = str(Path(sys.executable).with_name("ldm"))
SHELL_NAMES = {  # README text → what runs here (applied to every command but the quick start's)
    "--model stable-diffusion-v1-5/stable-diffusion-v1-5": "--model tiny-sd1",
    "--model sdxl-base": "--model tiny-sdxl",
    "weights/sdxl-vae-fp16-fix": "tiny-sdxl/vae",
    "2048": "256", "1536": "192", "512": "64",
    '"num_inference_steps": 30': '"num_inference_steps": 2',
}
NOT_RUN = {  # the start of a command → why not here, and what covers it
    "ldm generate \"a lighthouse, <lora:": "a LoRA file in weights/loras (tests/test_lora_use.py)",
    "ldm generate \"a lighthouse\" --lora": "LoRA files (tests/test_lora_use.py)",
    "ldm download": "the Hub (tests/test_hub_download.py)",
    "ldm info": "a Hub model or a real single file (tests/test_info.py)",
    "ldm generate \"a house by a lake\"": "a ControlNet download (tests/test_controlnet_files.py)",
    "ldm serve": "a server that keeps running (tests/test_serve.py)",
    "ldm batch --model MODEL": "the Azure layout's input folder (tests/test_azure_batch.py)",
    "ldm generate \"a cat\" --model sdxl-base --offload": "a CUDA device (tests/test_offload.py)",
    "ldm bench": "a minute each (tests/test_cli.py's bench tests, slow)",
}


def shell_commands() -> list[tuple[str, str]]:
    """(section, command) for each `ldm …` command of the README's shell examples: the ``` blocks that are not
    Python, the indented blocks of the quick start and indented `$ ldm …` lines, continuation lines joined, `$ `
    and `.venv/bin/` dropped."""
    lines, commands, fence, section = README.read_text().replace("\\\n", " ").splitlines(), [], None, ""
    for line in lines:
        if line.startswith("```"):
            fence = line[3:].strip() if fence is None else None
            continue
        section = line[3:] if fence is None and line.startswith("## ") else section
        shell = (fence == "" or (fence is None and line.startswith("    ")
                                 and (section == "Quick start" or line.lstrip().startswith("$ "))))
        command = line.strip().removeprefix("$ ").removeprefix(".venv/bin/")
        if shell and command.startswith("ldm "):
            commands.append((section, command))
    return commands


def run_shell(command: str, folder: Path) -> subprocess.CompletedProcess:
    argv = shlex.split(command, comments=True)
    if argv[:2] == ["ldm", "generate"] and "--model" not in argv:
        argv += ["--model", "tiny-sd1"]  # the default model, SD 1.5, in its tiny form
    if argv[:2] == ["ldm", "generate"] and "--steps" not in argv:
        argv += ["--steps", "2", "--device", "cpu"]
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    return subprocess.run([LDM, *argv[1:]], cwd=folder, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> Path:
    """A folder with the quick start's `ldm tiny sd1 tiny-sd1` run in it, and an SDXL one (`tiny-sdxl`)."""
    folder = tmp_path_factory.mktemp("readme-shell")
    (folder / "prompts.jsonl").write_text('"a lighthouse"\n{"prompt": "a red door"}\n')
    done = run_shell("ldm tiny sdxl tiny-sdxl", folder)
    assert done.returncode == 0, done.stderr
    return folder


def test_the_quick_start_runs_as_written(tiny_models):
    """`ldm tiny`, a generation and `ldm parity` on the tiny model, exactly as the quick start writes them."""
    quick = [c for section, c in shell_commands() if section == "Quick start"]
    assert [c.split()[1] for c in quick] == ["tiny", "generate", "parity"], quick
    outputs = []
    for command in quick:
        done = run_shell(command, tiny_models)
        assert done.returncode == 0, f"{command}\n{done.stdout}\n{done.stderr}"
        outputs.append(done.stdout)
    assert "draws noise" in outputs[0]
    assert (tiny_models / "noise.png").is_file()
    assert outputs[2].rstrip().endswith("all within tolerance"), outputs[2]


def test_the_shell_examples_run_on_the_tiny_models(tiny_models):
    quick = {c for section, c in shell_commands() if section == "Quick start"}
    commands = [c for _, c in shell_commands() if c not in quick and not any(c.startswith(p) for p in NOT_RUN)]
    assert len(commands) >= 6, commands
    if not (tiny_models / "tiny-sd1").exists():  # (when this test runs alone)
        assert run_shell("ldm tiny sd1 tiny-sd1", tiny_models).returncode == 0
    for command in commands:
        for old, new in SHELL_NAMES.items():
            command = command.replace(old, new)
        done = run_shell(command, tiny_models)
        assert done.returncode == 0, f"README: {command}\n{done.stdout}\n{done.stderr}"
    assert len(list((tiny_models / "out").glob("*.png"))) == 2


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation but `-` dropped, spaces as `-`."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_the_contents_list_names_every_section():
    text = README.read_text()
    contents = text.split("**Contents**:", 1)[1].split("\n\n", 1)[0]
    links = re.findall(r"\]\(#([^)]+)\)", contents)
    sections = [anchor(h) for h in re.findall(r"^## (.+)$", text, flags=re.M)]
    assert links == sections, f"README's contents list: {links}\nits sections: {sections}"
    assert text.index("## Quick start") < text.index("## What to expect") < text.index("## The command")
