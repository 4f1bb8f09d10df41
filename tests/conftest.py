import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/official.py

from official import write_folder  # noqa: E402


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory) -> Path:
    """A tiny random SD 1.5-layout folder, also with the `*.fp16.safetensors` variant files."""
    return write_folder(tmp_path_factory.mktemp("sd1") / "tiny-sd1", "sd1", fp16_variant=True)


@pytest.fixture(scope="session")
def sd21_folder(tmp_path_factory) -> Path:
    """A tiny random SD 2.1-layout folder (v-prediction, DDIM, OpenCLIP-H-style text tower)."""
    return write_folder(tmp_path_factory.mktemp("sd21") / "tiny-sd21", "sd21", seed=10)


@pytest.fixture(scope="session")
def sd2_inpaint_folder(tmp_path_factory) -> Path:
    """A tiny random SD 2-inpainting-layout folder (9-channel UNet)."""
    return write_folder(tmp_path_factory.mktemp("sd2inp") / "tiny-sd2-inpainting", "sd2-inpaint", seed=20)


# fp32 module parity. The project's bar is 1e-4 relative; ldm runs the same torch ops in the same order
# as diffusers/transformers and measures 0 to 1e-7 here, while plausible mistakes on these tiny random
# models (a tanh-approximated GELU, a GroupNorm eps of 1e-5 for 1e-6) move the output by only 2e-5 to
# 5e-5. The tests therefore hold modules to 1e-6, which still leaves room for reordered fp32 sums.
MODULE_TOL = 1e-6


@pytest.fixture(scope="module")
def one_thread():
    """A module's tests at one thread (`pytestmark = pytest.mark.usefixtures("one_thread")`): on a busy 2-core
    machine two threads spin against each other and a tiny image takes ten times as long (BENCHMARKS.md, 'Batch
    throughput'). Only for modules whose comparisons are all within the process."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


MAX_PIXEL_DIFF = 2  # of 255: the project's image tolerance (fp32)


def assert_images_close(name: str, actual, expected, plain=None, moved: int = 10) -> None:
    """`actual` (pixels 0-255) of `expected`'s shape and within MAX_PIXEL_DIFF levels of it; and, given the image
    without what is tested (`plain`), more than `moved` levels from that somewhere: what is tested acts, so the
    comparison means something."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{name}: shape {actual.shape}, the reference's {expected.shape}"
    diff = np.abs(actual - expected).max()
    acted = None if plain is None else np.abs(actual - np.asarray(plain, np.float64)).max()
    print(f"{name}: max pixel difference {diff}", "" if acted is None else f"(what is tested moved pixels by {acted})")
    assert diff <= MAX_PIXEL_DIFF, f"{name}: max pixel difference {diff} > {MAX_PIXEL_DIFF}"
    assert acted is None or acted > moved, f"{name}: what is tested moved pixels by {acted} only (≤ {moved})"


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the fp32 parity measure used throughout."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def sdxl_folder(tmp_path_factory) -> Path:
    """A tiny random SDXL base 1.0-layout folder (CLIP-L + OpenCLIP-bigG, text_time UNet, Euler)."""
    return write_folder(tmp_path_factory.mktemp("sdxl") / "tiny-sdxl-base", "sdxl", seed=30)


@pytest.fixture(scope="session")
def sdxl_refiner_folder(tmp_path_factory) -> Path:
    """A tiny random SDXL refiner 1.0-layout folder (bigG only, aesthetic-score conditioning)."""
    return write_folder(tmp_path_factory.mktemp("sdxlr") / "tiny-sdxl-refiner", "sdxl-refiner", seed=40)


@pytest.fixture(scope="session")
def single_file(request, tmp_path_factory):
    """`single_file(family)`: the tiny folder of `family` as an original-layout .safetensors file (with the
    extras the official files carry), written once per session."""
    from official import FOLDER_FIXTURES, write_single_file

    written = {}

    def get(family: str) -> Path:
        if family not in written:
            folder = request.getfixturevalue(FOLDER_FIXTURES[family])
            path = tmp_path_factory.mktemp("single") / f"tiny-{family}.safetensors"
            written[family] = write_single_file(folder, path, family)
        return written[family]

    return get
