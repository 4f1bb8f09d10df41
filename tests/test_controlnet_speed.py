"""A ControlNet under `--offload` and `accelerate` (ldm.speed.offload.offload_with,
ldm.speed.accelerate.accelerate_like, called by ldm.pipelines.control.like_unet where a run takes its ControlNets),
and loaded once for every run.

Offload is observed on the CPU as tests/test_offload.py observes it (`Placeholders`: a parked weight is an empty
tensor, so a layer that runs without its weights brought fails, and where the weights are is read from the tensors
themselves). The ControlNet is loaded after the offload, as a run loads it: by the first run that names it."""

import functools

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF
from test_controlnet import PROMPT, hint, make_controlnet
from test_offload import Placeholders, here

import ldm.pipelines.stable_diffusion
import ldm.speed.accelerate
from ldm.networks.controlnet import ControlNet
from ldm.pipelines.request import Control
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.accelerate import FusedCrossAttention, FusedSelfAttention, WinogradConv2d, accelerate
from ldm.speed.offload import disable_offload
from ldm_kernels import winograd

pytestmark = pytest.mark.usefixtures("one_thread")  # images compared within the process only


@pytest.fixture(scope="module")
def controlnet(sd1_folder, tmp_path_factory):
    return make_controlnet(sd1_folder, tmp_path_factory.mktemp("controlnet-speed") / "control", seed=1)


def load(folder) -> StableDiffusion:
    return StableDiffusion.from_pretrained(folder, device="cpu")


def run(pipe, controlnet) -> np.ndarray:
    image = pipe(PROMPT, steps=3, seed=5, sampler="euler", controls=[Control(str(controlnet), hint(1))]).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def expected(sd1_folder, controlnet):
    """The image of the unit without offload or acceleration, and (to show the unit acts) without the unit."""
    pipe = load(sd1_folder)
    plain = np.asarray(pipe(PROMPT, steps=3, seed=5, sampler="euler").images[0]).astype(np.int16)
    return run(pipe, controlnet), plain


def weights(network) -> list[torch.Tensor]:
    return [*network.parameters(), *network.buffers()]


def test_model_offload_moves_the_controlnet_with_the_unet(sd1_folder, controlnet, expected):
    pipe = load(sd1_folder)
    offload = Placeholders.enable(pipe, "model", "cpu", log=True)
    net = pipe.controlnet(str(controlnet))  # loaded after the offload, as a run's first use loads it
    assert not any(here(t) for t in weights(net))  # parked with the UNet until the UNet's turn
    seen = []

    def check(module, args, running):
        seen.append(running)
        assert all(here(t) for t in weights(net)) and all(here(t) for t in weights(pipe.networks()["unet"]))
        assert not any(here(t) for t in weights(pipe.text_encoder)), running

    handles = [network.register_forward_pre_hook(functools.partial(check, running=name))
               for network, name in ((net, "controlnet"), (pipe.networks()["unet"], "unet"))]
    want, plain = expected
    assert np.array_equal(run(pipe, controlnet), want) and np.abs(want - plain).max() > 10
    assert seen[:2] == ["controlnet", "unet"] and seen.count("controlnet") == 3  # each step, the UNet's batch
    assert [name for move, name in offload.log if move == "in"] == ["text_encoder", "unet", "vae", "safety_checker"]
    assert not any(here(t) for t in weights(net))  # between calls: back on the offload device with the UNet
    for handle in handles:
        handle.remove()
    disable_offload(pipe)
    assert all(here(t) for t in weights(net))  # every weight back, the hooks gone
    assert np.array_equal(run(pipe, controlnet), want)


def test_sequential_offload_brings_each_controlnet_layer_for_its_forward(sd1_folder, controlnet, expected):
    pipe = load(sd1_folder)
    offload = Placeholders.enable(pipe, "sequential", "cpu", log=True)
    net = pipe.controlnet(str(controlnet))
    everything = weights(net)
    checked = set()

    def check(module, args):
        own = {id(t) for t in [*module.parameters(recurse=False), *module.buffers(recurse=False)]}
        if own:
            assert all(here(t) == (id(t) in own) for t in everything), type(module).__name__
            checked.add(module)

    for module in net.modules():
        module.register_forward_pre_hook(check)
    assert np.array_equal(run(pipe, controlnet), expected[0])
    assert {m for m in net.modules() if [*m.parameters(recurse=False)]} <= checked  # every layer ran, alone
    assert not any(here(t) for t in everything)  # and all went back
    assert ("in", "controlnet0.conv_in") in offload.log


@pytest.fixture()
def winograd_everywhere(monkeypatch):
    """Winograd for the tiny widths (its thresholds are the full-size models'), and run wherever it is installed."""
    monkeypatch.setattr(ldm.speed.accelerate, "use_winograd",
                        functools.partial(ldm.speed.accelerate.use_winograd, min_channels=16))
    monkeypatch.setattr(winograd, "pays", lambda *shape: True)


def test_accelerate_gives_the_controlnet_the_unets_layouts(sd1_folder, controlnet, expected, winograd_everywhere):
    pipe = accelerate(load(sd1_folder), compile=False, winograd=True)
    got = run(pipe, controlnet)
    net = pipe.controlnet(str(controlnet))
    attention = [type(m) for m in net.modules() if type(m).__name__.endswith("Attention")]
    assert attention and set(attention) == {FusedSelfAttention, FusedCrossAttention}
    assert any(type(m) is WinogradConv2d for m in net.down_blocks.modules())
    assert net.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    want, plain = expected
    diff = np.abs(got - want).max()
    print(f"accelerated ControlNet: max pixel difference {diff} from the eager one")
    assert diff <= MAX_PIXEL_DIFF and np.abs(got - plain).max() > 10


def test_accelerated_controlnet_under_offload(sd1_folder, controlnet, expected, winograd_everywhere):
    """accelerate (no compile) then offload: the layers accelerate_like makes are those offload hooks."""
    pipe = accelerate(load(sd1_folder), compile=False, winograd=True)
    Placeholders.enable(pipe, "sequential", "cpu")
    assert np.abs(run(pipe, controlnet) - expected[0]).max() <= MAX_PIXEL_DIFF
    assert not any(here(t) for t in weights(pipe.controlnet(str(controlnet))))


def test_the_controlnet_is_loaded_once_for_every_run(sd1_folder, controlnet, expected, monkeypatch):
    loads = []
    load_controlnet = ldm.pipelines.stable_diffusion.load_controlnet
    monkeypatch.setattr(ldm.pipelines.stable_diffusion, "load_controlnet",
                        lambda *args, **kwargs: loads.append(args[0]) or load_controlnet(*args, **kwargs))
    pipe = load(sd1_folder)
    first, second = run(pipe, controlnet), run(pipe, controlnet)
    assert len(loads) == 1 and np.array_equal(first, second) and np.array_equal(first, expected[0])
    assert isinstance(pipe.controlnet(str(controlnet)), ControlNet) and len(loads) == 1
