"""CPU offload (`ldm.speed.offload`, `--offload`): the same image with and without it, where every weight is while each
network and each layer runs, and what the command line refuses.

There is no GPU here, so the tests make the movement itself observable on the CPU: `Placeholders` parks a
weight by putting its values aside and leaving an empty tensor in its place, and brings it back by restoring
them. A network that computes with a weight the hooks did not bring fails (an empty weight fits no
operation), and where the weights are is read from the tensors themselves, not from the offload's
bookkeeping.
"""

import numpy as np
import pytest
import torch
from PIL import Image
from test_image_tasks import picture
from torch import Tensor

from ldm.errors import InputError
from ldm.pipelines.refiner import BaseWithRefiner
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.accelerate import CUDAGraphs, TensorTimestep, accelerate
from ldm.speed.offload import KEPT_RESIDENT, MOVED_WHOLE, Offload, disable_offload, enable_offload
from ldm_cli.main import main, parse_args

PROMPT = "a lighthouse on a cliff at dawn"
pytestmark = pytest.mark.usefixtures("one_thread")  # images compared within the process only


class Placeholders(Offload):
    """Offload with the CPU as the execution device, and an empty tensor in place of each parked weight."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.values: dict[int, Tensor] = {}

    def park(self, t: Tensor) -> Tensor:
        assert t.numel(), "parked twice"
        self.values[id(t)] = t.data
        return t.data.new_empty(0)

    def bring(self, t: Tensor) -> Tensor:
        assert not t.numel(), "brought twice"
        return self.values[id(t)]


def here(t: Tensor) -> bool:
    return t.numel() > 0


def load(folder) -> StableDiffusion:
    return StableDiffusion.from_pretrained(folder, device="cpu")


def run(pipe, task: str, **options) -> np.ndarray:
    image = {"image": picture(64, 64, seed=3), "strength": 0.6} if task == "img2img" else {}
    result = pipe(PROMPT, **{"steps": 3, "seed": 5} | image | options)
    pixels = np.asarray(result.images[0])
    assert pixels.std() > 5  # a real image (not one the safety checker blacked out), which a mistake would change
    return pixels


@pytest.fixture(scope="module")
def expected(request):
    """The image without offload, per (family, task)."""
    cache = {}

    def get(family: str, task: str) -> np.ndarray:
        if (family, task) not in cache:
            cache[family, task] = run(load(request.getfixturevalue(f"{family}_folder")), task)
        return cache[family, task]

    return get


@pytest.mark.parametrize("mode", ["model", "sequential"])
@pytest.mark.parametrize("task", ["txt2img", "img2img"])
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_same_image_with_offload(request, expected, family, task, mode):
    pipe = load(request.getfixturevalue(f"{family}_folder"))
    offload = Placeholders.enable(pipe, mode, "cpu")
    assert not any(here(t) for network in offload.networks.values() for t in network.parameters()
                   if not isinstance(network, KEPT_RESIDENT))  # everything parked until called
    assert np.array_equal(run(pipe, task), expected(family, task))
    disable_offload(pipe)  # every weight back, the hooks gone
    assert all(here(t) for network in pipe.networks().values() for t in network.parameters())
    assert np.array_equal(run(pipe, task), expected(family, task))


def one_network_here(offload: Offload):
    """A `watch` check for model offload: the running network's weights here, no other network's (all of them
    checked when the running network changes, the module's own at every call)."""
    last = []

    def check(module, running):
        if last[-1:] != [running]:
            last.append(running)
            for name, network in offload.networks.items():
                assert all(here(t) == (name == running) for t in network.parameters()), (running, name)
        assert all(here(t) for t in module.parameters(recurse=False))

    check.calls = last
    return check


def watch(offload: Offload, check) -> None:
    """Call `check(module, network name)` at the start of every forward of every module of every network (after
    the offload's own hooks, which were registered first)."""
    for name, network in offload.networks.items():
        for module in network.modules():
            module.register_forward_pre_hook(lambda m, args, name=name: check(m, name))


@pytest.mark.parametrize("task", ["txt2img", "img2img"])
def test_model_offload_keeps_one_network_on_the_device(sd1_folder, expected, task):
    pipe = load(sd1_folder)
    offload = Placeholders.enable(pipe, "model", "cpu", log=True)
    check = one_network_here(offload)
    watch(offload, check)
    assert np.array_equal(run(pipe, task), expected("sd1", task))
    assert set(check.calls) == {"text_encoder", "unet", "vae", "safety_checker"}
    order = ["text_encoder"] + (["vae"] if task == "img2img" else []) + ["unet", "vae", "safety_checker"]
    moves = [("in", order[0])] + [move for a, b in zip(order, order[1:], strict=False) for move in (("out", a),
                                                                                                  ("in", b))]
    assert offload.log == moves  # the UNet came in once and stayed for every step
    offload.log.clear()
    run(pipe, task)  # a second run first sends the last network of the first one back
    assert offload.log[:2] == [("out", "safety_checker"), ("in", "text_encoder")]


def test_sequential_offload_brings_each_layer_only_for_its_own_forward(sdxl_folder, expected):
    pipe = load(sdxl_folder)
    offload = Placeholders.enable(pipe, "sequential", "cpu", log=True)
    own = {module: [*module.parameters(False), *module.buffers(False)] for network in offload.networks.values()
           for module in network.modules()}
    everything = [t for tensors in own.values() for t in tensors]
    wholes = []  # the MOVED_WHOLE modules running: their whole subtree is here

    def check(module, running):
        if isinstance(module, MOVED_WHOLE):
            wholes.append(module)
        if own[module]:
            mine = {id(t) for t in own[module]} | {id(t) for whole in wholes for t in whole.parameters()}
            assert all(here(t) == (id(t) in mine) for t in everything), type(module).__name__
            checked.add(module)

    checked = set()
    watch(offload, check)
    for whole in {m for m in own if isinstance(m, MOVED_WHOLE)}:
        whole.register_forward_hook(lambda *args: wholes.pop() and None)
    assert np.array_equal(run(pipe, "txt2img"), expected("sdxl", "txt2img"))
    assert {m for m in pipe.unet.modules() if own[m]} <= checked  # every UNet layer ran, each with its weights alone
    assert not any(here(t) for t in everything)  # and all went back
    assert ("in", "unet.conv_in") in offload.log and ("out", "text_encoder_2.text_model.embeddings") in offload.log


def test_textual_inversion_under_offload(sd1_folder, tmp_path, expected):
    """ldm.pipelines.prompts looks the token embedding up directly (not through the encoder's forward) for an
    embedding's vectors: both modes bring it for that call too."""
    from safetensors.torch import save_file

    width = load(sd1_folder).tower_widths()["text_encoder"]
    save_file({"emb_params": torch.randn(2, width, generator=torch.Generator().manual_seed(0))},
              str(tmp_path / "shiny.safetensors"))
    images = []
    for mode in (None, "model", "sequential"):
        pipe = load(sd1_folder)
        pipe.load_embedding(tmp_path / "shiny.safetensors")
        if mode:
            Placeholders.enable(pipe, mode, "cpu")
        images.append(np.asarray(pipe(f"{PROMPT}, shiny", steps=3, seed=5).images[0]))
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])
    assert not np.array_equal(images[0], expected("sd1", "txt2img"))  # the embedding was used


def test_hooks_that_do_nothing_fail(sd1_folder):
    """The harness itself: with the weights parked and no hooks to bring them, the run cannot succeed."""
    pipe = load(sd1_folder)
    offload = Placeholders.enable(pipe, "model", "cpu")
    for handle in offload.handles:
        handle.remove()
    with pytest.raises(RuntimeError):
        run(pipe, "txt2img")


@pytest.mark.parametrize("mode", ["model", "sequential"])
def test_base_and_refiner_offloaded_as_one(sdxl_folder, sdxl_refiner_folder, mode):
    def refined():
        return BaseWithRefiner(load(sdxl_folder), load(sdxl_refiner_folder), start=0.5)

    want = run(refined(), "txt2img", steps=4)
    pipe = refined()
    offload = Placeholders.enable(pipe, mode, "cpu", log=True)
    assert pipe.device == pipe.base.device == pipe.refiner.device == torch.device("cpu")
    if mode == "model":
        watch(offload, one_network_here(offload))
    assert np.array_equal(run(pipe, "txt2img", steps=4), want)
    if mode == "model":
        assert [name for move, name in offload.log if move == "in"] == [
            "base.text_encoder", "base.text_encoder_2", "base.unet", "refiner.text_encoder_2", "refiner.unet",
            "refiner.vae"]


def test_accelerated_networks_offload(sd1_folder):
    """`accelerate` without compile or CUDA graphs (fused projections, channels_last) before offload: the layers
    it adds are hooked like the others."""
    want = run(accelerate(load(sd1_folder), compile=False), "txt2img")
    pipe = accelerate(load(sd1_folder), compile=False)
    Placeholders.enable(pipe, "sequential", "cpu")
    assert np.array_equal(run(pipe, "txt2img"), want)


def test_refused_offloads(sd1_folder):
    pipe = load(sd1_folder)
    pipe.unet = TensorTimestep(pipe.unet, graphs=CUDAGraphs(pipe.unet))
    with pytest.raises(InputError, match="CUDA graph"):
        enable_offload(pipe, "model", "cpu")
    pipe = load(sd1_folder)
    with pytest.raises(InputError, match="unknown offload mode"):
        enable_offload(pipe, "layers", "cpu")
    enable_offload(pipe, "model", "cpu")
    with pytest.raises(InputError, match="offloaded already"):
        enable_offload(pipe, "sequential", "cpu")


@pytest.mark.parametrize("flags, message", [
    (["--compile"], "--offload does not combine with --compile"),
    (["--compile-mode", "max"], "--offload does not combine with --compile"),
    ([], "there is nothing to offload"),
])
def test_cli_refuses_offload_with_compile_and_on_the_cpu(sd1_folder, tmp_path, capsys, flags, message):
    code = main(["generate", PROMPT, "--model", str(sd1_folder), "--device", "cpu", "--offload", "model",
                 "-o", str(tmp_path / "out.png"), *flags])
    err = capsys.readouterr().err
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out.png").exists()


def test_generate_serve_and_batch_take_offload():
    for command in (["generate", "x"], ["serve"], ["batch", "--input", "a.jsonl", "--output", "out"]):
        assert parse_args([*command, "--offload", "sequential"]).offload == "sequential"


def test_cli_offload_gives_the_same_png(sd1_folder, tmp_path, monkeypatch):
    """`prepare_pipeline`'s offload path (load on the CPU, offload), with the CPU standing in for the GPU."""
    import ldm.pipelines.setup

    def generate(*flags):
        out = tmp_path / f"out{len(flags)}.png"
        assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "3", "--seed", "2", "-o", str(out),
                     *flags]) == 0
        image = Image.open(out)
        return np.asarray(image.convert("RGB")), image.text["parameters"]

    want, text = generate()
    monkeypatch.setattr(ldm.pipelines.setup, "offload_device", lambda settings: torch.device("cpu"))
    offloaded = []
    attach = Offload.attach
    monkeypatch.setattr(Offload, "attach", lambda self: offloaded.append(self.mode) or attach(self))
    got, offloaded_text = generate("--offload", "model")
    assert offloaded == ["model"] and np.array_equal(got, want) and offloaded_text == text  # nothing in the infotext


def test_bench_offload_modes():
    """`ldm bench --mode model-offload sequential-offload`: ldm's offload against diffusers' (CUDA only)."""
    from ldm.tools.bench import check_mode, configurations

    assert configurations(["model-offload"], diffusers=True) == [("ldm", "model-offload"),
                                                                  ("diffusers", "model-offload")]
    with pytest.raises(ValueError, match="needs --device cuda"):
        check_mode("sequential-offload", "cpu")


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_gpu_offload_same_image_less_memory(request, family):
    """On CUDA: the same image with either offload as without, at a lower peak of GPU memory."""
    folder = request.getfixturevalue(f"{family}_folder")
    images, peaks = {}, {}
    for mode in (None, "model", "sequential"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        pipe = StableDiffusion.from_pretrained(folder, device="cpu" if mode else "cuda", dtype="fp32")
        if mode:
            enable_offload(pipe, mode, "cuda")
        images[mode] = run(pipe, "txt2img")
        peaks[mode] = torch.cuda.max_memory_allocated()
        del pipe
    print(f"{family}: peak GPU memory (MiB) " + ", ".join(f"{m or 'none'} {p / 2**20:.2f}" for m, p in peaks.items()))
    assert np.array_equal(images["model"], images[None]) and np.array_equal(images["sequential"], images[None])
    assert peaks[None] > peaks["model"] > peaks["sequential"]
