"""The SDXL refiner hand-off on an accelerator (issue 33, item 1), with stand-in memory figures and a stand-in
device: both models resident and the refiner accelerated where the free memory allows, parked only under memory
pressure, and a note saying which. The hand-off's images against diffusers are tests/test_sdxl.py's."""

import pytest
import torch

from ldm.pipelines import refiner as hand_off
from ldm.pipelines.refiner import RESIDENT_HEADROOM, BaseWithRefiner, weight_bytes
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.accelerate import accelerate, speed_wrapper

CUDA = torch.device("cuda")


def on_stand_in_device(pipe: StableDiffusion, moves: list) -> StableDiffusion:
    """`pipe` as if on CUDA: `to` records the move and sets the device, the weights stay on the CPU."""

    def to(device):
        moves.append((pipe.name, str(device)))
        pipe.device = torch.device(device)
        return pipe

    pipe.to = to
    return pipe


@pytest.fixture
def pair(sdxl_folder, sdxl_refiner_folder, monkeypatch):
    """An accelerated base "on CUDA" and its refiner on the CPU, as `ldm generate --refiner` loads them."""
    monkeypatch.setattr(hand_off, "weights_device", lambda pipe: pipe.device)
    moves = []
    base = on_stand_in_device(StableDiffusion.from_pretrained(sdxl_folder), moves)
    base.device = CUDA
    accelerate(base, compile=False)  # on "CUDA": fused, channels_last, the CUDA graph
    refiner = on_stand_in_device(StableDiffusion.from_pretrained(sdxl_refiner_folder), moves)
    return base, refiner, moves


def test_both_stay_resident_and_the_refiner_is_accelerated_when_memory_allows(pair, monkeypatch):
    base, refiner, moves = pair
    monkeypatch.setattr(hand_off, "free_bytes", lambda device: 100 * 2**30)  # an H200 with the base loaded
    pipe = BaseWithRefiner(base, refiner)
    assert pipe.resident and refiner.device == CUDA and moves == [(refiner.name, "cuda")]
    wrapper = speed_wrapper(refiner.networks()["unet"])
    assert wrapper is not None and wrapper.graphs is not None  # fused, channels_last, its own CUDA graph
    pipe._on_device(base)
    pipe._on_device(refiner)
    assert moves == [(refiner.name, "cuda")]  # nothing parked at the hand-offs
    assert "both models resident" in pipe.placement and pipe.placement in pipe.notes


def test_under_memory_pressure_the_waiting_model_is_parked(pair, monkeypatch):
    base, refiner, moves = pair
    tight = weight_bytes(refiner) + RESIDENT_HEADROOM - 1
    monkeypatch.setattr(hand_off, "free_bytes", lambda device: tight)
    pipe = BaseWithRefiner(base, refiner)
    assert not pipe.resident and refiner.device.type == "cpu"
    assert "parked on the CPU" in pipe.placement and pipe.placement in pipe.notes
    pipe._on_device(refiner)
    assert moves[-2:] == [(base.name, "cpu"), (refiner.name, "cuda")]
    assert speed_wrapper(refiner.networks()["unet"]).graphs is not None  # accelerated when it first comes in
    pipe._on_device(base)
    assert moves[-2:] == [(refiner.name, "cpu"), (base.name, "cuda")]
    assert len([n for n in pipe.notes if n.startswith("refiner:")]) == 1


def test_a_cpu_run_moves_nothing_and_notes_nothing(sdxl_folder, sdxl_refiner_folder):
    pipe = BaseWithRefiner(StableDiffusion.from_pretrained(sdxl_folder),
                           StableDiffusion.from_pretrained(sdxl_refiner_folder))
    assert not pipe.resident and pipe.placement is None
    assert speed_wrapper(pipe.refiner.networks()["unet"]) is None


def test_auto_cuda_and_cuda_0_are_one_device():
    """`--device auto` gives `cuda`, the weights sit on `cuda:0`: the same device, so residency still applies."""
    assert hand_off.same_device(torch.device("cuda"), torch.device("cuda", 0))
    assert not hand_off.same_device(torch.device("cuda", 1), torch.device("cuda", 0))
    assert not hand_off.same_device(torch.device("cpu"), torch.device("cuda"))
