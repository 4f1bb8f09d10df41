"""Image prompts (IP-Adapter) under `--offload` (ldm.speed.offload `offload_with` and `offload_beside`, called by
ldm.pipelines.image_prompts `ip_adapter` and `image_encoder`): the same image as without offload, bit for bit, in
both modes, for a plain and a Plus adapter; in model mode the image encoder is a network of its own (on the execution
device for its call only, as the text encoders are) and the adapter's pairs and projection travel with the UNet they
run inside (as a ControlNet does); in sequential mode each of their layers brings its weights for its own forward.

Offload is observed on the CPU as tests/test_offload.py observes it (`Placeholders`: a parked weight is an empty
tensor, so a layer that runs without its weights brought fails, and where the weights are is read from the tensors
themselves). The adapter and the encoder are loaded after the offload, as a run loads them: by the first run that
names them (here, where hooks must watch them from the start, by the two functions such a run calls)."""

import numpy as np
import pytest
import torch
from test_ip_adapter import adapter_file, make_encoder, reference_image
from test_offload import Placeholders, here

import ldm.pipelines.image_prompts
from ldm import ImagePrompt
from ldm.pipelines.image_prompts import image_encoder, ip_adapter
from ldm.pipelines.refiner import BaseWithRefiner
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.offload import MOVED_WHOLE, disable_offload

PROMPT = "a house by a lake"
KINDS = ("plain", "plus")
pytestmark = pytest.mark.usefixtures("one_thread")  # images compared within the process only


@pytest.fixture(scope="module")
def files(sd1_folder, sdxl_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ipadapter-offload")
    return {"encoder": make_encoder(root / "image_encoder"),
            "plain": adapter_file(root / "ip-adapter_sd15.safetensors", sd1_folder, "plain", 24, seed=1),
            "plus": adapter_file(root / "ip-adapter-plus_sd15.safetensors", sd1_folder, "plus", 32, seed=2),
            "sdxl": adapter_file(root / "ip-adapter_sdxl.safetensors", sdxl_folder, "plain", 24, seed=4)}


def load(folder) -> StableDiffusion:
    return StableDiffusion.from_pretrained(folder, device="cpu")


def image_prompt(files, kind: str) -> ImagePrompt:
    return ImagePrompt(str(files[kind]), reference_image(2), weight=0.8, encoder=str(files["encoder"]))


def run(pipe, files, kind: str | None, **options) -> np.ndarray:
    prompts = [image_prompt(files, kind)] if kind else []
    image = pipe(PROMPT, **{"steps": 3, "seed": 3, "sampler": "euler", "image_prompts": prompts} | options).images[0]
    return np.asarray(image).astype(np.int16)


@pytest.fixture(scope="module")
def expected(sd1_folder, files):
    """The image of each adapter without offload, and (to show the adapter acts) the image without one."""
    pipe = load(sd1_folder)
    return {kind: run(pipe, files, kind) for kind in (*KINDS, None)}


def weights(network) -> list[torch.Tensor]:
    return [*network.parameters(), *network.buffers()]


def preload(pipe, files, kind: str):
    """The adapter and the encoder as a run's first use loads them: `ip_adapter`, then `image_encoder`."""
    adapter = ip_adapter(pipe, str(files[kind]))
    return adapter, image_encoder(pipe, str(files["encoder"]), adapter, kind)


@pytest.mark.parametrize("mode", ["model", "sequential"])
@pytest.mark.parametrize("kind", KINDS)
def test_same_image_with_offload(sd1_folder, files, expected, kind, mode):
    pipe = load(sd1_folder)
    Placeholders.enable(pipe, mode, "cpu")
    got = run(pipe, files, kind)  # loads the adapter and the encoder after the offload
    assert np.array_equal(got, expected[kind]) and np.abs(got - expected[None]).max() > 10
    (adapter,), (encoder,) = pipe.ip_adapters.values(), pipe.image_encoders.values()
    assert not any(here(t) for t in weights(adapter) + weights(encoder))  # after the run: both back off the device
    assert np.array_equal(run(pipe, files, kind), expected[kind])  # a second run: loaded once, offloaded once
    disable_offload(pipe)  # every weight back, the hooks gone
    assert all(here(t) for t in weights(adapter) + weights(encoder))
    assert np.array_equal(run(pipe, files, kind), expected[kind])


@pytest.mark.parametrize("kind", KINDS)
def test_model_offload_runs_the_encoder_alone_and_the_adapter_with_the_unet(sd1_folder, files, expected, kind):
    pipe = load(sd1_folder)
    offload = Placeholders.enable(pipe, "model", "cpu", log=True)
    adapter, encoder = preload(pipe, files, kind)
    assert not any(here(t) for t in weights(adapter) + weights(encoder))  # parked from the start
    unet = pipe.networks()["unet"]
    seen = []

    def check(running, module, args):
        seen.append(running)
        alone = running == "encoder"  # the encoder alone on the device; else the UNet with the adapter (all of each)
        for network, present in ((encoder, alone), (unet, not alone), (adapter, not alone), (pipe.text_encoder, False)):
            assert {here(t) for t in weights(network)} == {present}, (running, type(network).__name__)

    watched = [(encoder, "encoder"), (unet, "unet"), (adapter, "projection"), (adapter.key_values()[0].to_v_ip, "pair")]
    for network, name in watched:
        network.register_forward_pre_hook(lambda module, args, name=name: check(name, module, args))
    assert np.array_equal(run(pipe, files, kind), expected[kind])
    encodings = 1 if kind == "plain" else 2  # Plus: the references, then the zero image for the negative
    assert seen[:encodings + 2] == ["encoder"] * encodings + ["projection", "projection"]
    assert {"unet", "pair"} <= set(seen[encodings + 2:]) and "encoder" not in seen[encodings:]
    assert [name for move, name in offload.log if move == "in"] == [
        "text_encoder", "image_encoder", "unet", "vae", "safety_checker"]  # each once: came, ran, went
    assert ("out", "image_encoder") in offload.log


@pytest.mark.parametrize("kind", KINDS)
def test_sequential_offload_brings_each_layer_for_its_forward(sd1_folder, files, expected, kind):
    pipe = load(sd1_folder)
    offload = Placeholders.enable(pipe, "sequential", "cpu", log=True)
    adapter, encoder = preload(pipe, files, kind)
    everything = weights(adapter) + weights(encoder)
    # the weights of the modules whose forward is in progress stay while their layers run (the Resampler's
    # `latents`; the whole of the encoder's embeddings, MOVED_WHOLE)
    running, checked = [], set()

    def mine(module) -> set[int]:
        whole = isinstance(module, MOVED_WHOLE)
        return {id(t) for t in [*module.parameters(recurse=whole), *module.buffers(recurse=whole)]}

    def check(module, args):
        allowed = set().union(*map(mine, running), mine(module))
        if mine(module):
            assert all(here(t) == (id(t) in allowed) for t in everything), type(module).__name__
            checked.add(module)
        running.append(module)

    def done(module, args, output):
        running.pop()

    for module in [*adapter.modules(), *encoder.modules()]:
        module.register_forward_pre_hook(check)
        module.register_forward_hook(done)
    assert np.array_equal(run(pipe, files, kind), expected[kind])
    layers = {m for m in [*adapter.modules(), *encoder.modules()] if [*m.parameters(recurse=False)]}
    assert layers - checked == {encoder.vision_model.embeddings.position_embedding}  # (read, not called)
    assert not any(here(t) for t in everything)  # and all went back
    assert {("in", "image_encoder.visual_projection"), ("in", "ip_adapter0.ip_adapter.1.to_k_ip")} <= set(offload.log)


def test_loaded_onto_the_offload_device(sd1_folder, files, monkeypatch):
    """Under offload the adapter and the encoder are loaded where the offload keeps weights, not onto the execution
    device (a ViT-H/14 encoder would sit on a small GPU until parked); without offload onto the pipeline's device.
    The offload device is told apart here by a name of its own (the loaders are given the CPU to load onto)."""
    asked = []

    def recording(load):
        def loads(*args):
            asked.append(args[-2])
            return load(*args[:-2], torch.device("cpu"), args[-1])
        return loads

    for name in ("load_ip_adapter", "load_image_encoder"):
        monkeypatch.setattr(ldm.pipelines.image_prompts, name, recording(getattr(ldm.pipelines.image_prompts, name)))
    pipe = load(sd1_folder)
    preload(pipe, files, "plain")
    assert asked == [pipe.device] * 2
    asked.clear()
    pipe = load(sd1_folder)
    offload = Placeholders.enable(pipe, "model", "cpu")
    offload.offload_device = torch.device("meta")  # (Placeholders park without it)
    preload(pipe, files, "plain")
    assert asked == [torch.device("meta")] * 2


def test_given_modules_are_offloaded_too(sd1_folder, files, expected):
    """A loaded `IPAdapter` and encoder given in the prompt (not by name) are offloaded as named ones are."""
    adapter, encoder = preload(load(sd1_folder), files, "plain")
    pipe = load(sd1_folder)
    Placeholders.enable(pipe, "model", "cpu")
    prompt = ImagePrompt(adapter, reference_image(2), weight=0.8, encoder=encoder)
    got = pipe(PROMPT, steps=3, seed=3, sampler="euler", image_prompts=[prompt]).images[0]
    assert np.array_equal(np.asarray(got).astype(np.int16), expected["plain"])
    assert not any(here(t) for t in weights(adapter) + weights(encoder))


def test_base_with_refiner_offloaded_with_an_image_prompt(sdxl_folder, sdxl_refiner_folder, files):
    """An SDXL base with its refiner, offloaded as one: the base's encoder is `base.image_encoder`, the image the
    same as without offload."""
    def refined():
        return BaseWithRefiner(load(sdxl_folder), load(sdxl_refiner_folder), start=0.5)

    prompt = image_prompt(files, "sdxl")
    want = refined()(PROMPT, steps=4, seed=3, sampler="euler", image_prompts=[prompt]).images[0]
    pipe = refined()
    offload = Placeholders.enable(pipe, "model", "cpu", log=True)
    got = pipe(PROMPT, steps=4, seed=3, sampler="euler", image_prompts=[prompt]).images[0]
    assert np.array_equal(np.asarray(got), np.asarray(want))
    assert [name for move, name in offload.log if move == "in"] == [
        "base.text_encoder", "base.text_encoder_2", "base.image_encoder", "base.unet", "refiner.text_encoder_2",
        "refiner.unet", "refiner.vae"]
