import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # tests/official.py

from official import write_sd1_folder  # noqa: E402


@pytest.fixture(scope="session")
def sd1_folder(tmp_path_factory) -> Path:
    """A tiny random SD 1.5-layout folder, also with the `*.fp16.safetensors` variant files."""
    return write_sd1_folder(tmp_path_factory.mktemp("sd1") / "tiny-sd1", fp16_variant=True)


def max_rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |a - e| / max |e|: the fp32 parity measure used throughout (bar: 1e-4)."""
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA device")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
