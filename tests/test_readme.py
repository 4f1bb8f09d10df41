"""Every Python block of the README runs, as written, on the tiny models: the only changes are the model names
(Hub ids → the tiny folders and files of the same families), the device (the CPU), the file the image-to-image
example opens and, for the attention maps, the size (64² in place of 512², the tiny models' scale). A block that no
longer runs (a renamed import, a changed signature) fails here. The `ldm parity` block runs diffusers beside ldm at
a single file's native 512², two minutes here: it is marked slow."""

import os
import re
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
