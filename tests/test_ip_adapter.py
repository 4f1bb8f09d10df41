"""IP-Adapter (ldm.networks.ip_adapter, ldm.adapters.ip_adapter, ldm.pipelines.image_prompts) against diffusers and
transformers: the image encoder and its preprocessing against CLIPVisionModelWithProjection + CLIPImageProcessor,
whole images against StableDiffusion(XL)Pipeline after `load_ip_adapter` + `set_ip_adapter_scale` (SD 1.x plain,
Plus and full-face, SDXL plain; unfused and fused; image-to-image, inpainting, with a ControlNet unit and with a
LoRA), start/end and several images, scale 0 bit for bit, and the mistakes: an SDXL adapter on SD 1.x, an encoder
of the wrong width, an unreadable reference image, pickles.

The tiny image encoders are transformers' own `CLIPVisionModelWithProjection` (its init, norms perturbed) saved as
h94/IP-Adapter's `models/image_encoder` is; the adapters are random tensors written in the flat `image_proj.*` /
`ip_adapter.*` layout of the official files (as diffusers' tests' `create_ip_adapter_state_dict` /
`create_ip_adapter_plus_state_dict` build theirs, there in diffusers' names), their pairs numbered in the order of
diffusers' own `attn_processors`, so that ldm's order is checked against diffusers'."""

import pickle

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF, assert_images_close, max_rel_err
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from official import diffusers_scheduler
from PIL import Image
from safetensors.torch import save_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from ldm import ImagePrompt
from ldm.errors import LdmError, LoadError
from ldm.loading.ip_adapters import find_image_encoder, load_image_encoder, load_ip_adapter
from ldm.pipelines.image_prompts import encoder_pixels
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm_cli.main import main

PROMPT = "a house by a lake"
ENCODER = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 4, "num_hidden_layers": 3,
           "image_size": 32, "patch_size": 8, "projection_dim": 24, "hidden_act": "gelu"}

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py) ldm and diffusers compared in one process


def make_encoder(folder, seed: int = 0, **changes):
    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(**ENCODER | changes)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(folder)
    return folder


def reference_image(seed: int = 0, size=(50, 37)) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:size[1], 0:size[0]]
    base = np.stack([x * 5, y * 6, (x + y) * 3], -1) % 256
    return Image.fromarray((base + rng.integers(0, 60, (*base.shape,))).clip(0, 255).astype(np.uint8))


def cross_attention_widths(folder) -> list[int]:
    """The widths of the UNet's cross-attentions in diffusers' own `attn_processors` order (the reference's)."""
    unet = UNet2DConditionModel.from_pretrained(folder / "unet")
    names = [n[: -len(".processor")] for n in unet.attn_processors if n.endswith("attn2.processor")]
    return [unet.get_submodule(n).to_q.out_features for n in names], unet.config.cross_attention_dim


class RandomState(dict):
    """Random tensors by name, drawn in order from one seeded generator (weights about 1/√fan-in, biases and norm
    offsets about 0.1, norm scales about 1)."""

    def __init__(self, seed: int):
        super().__init__()
        self.g = torch.Generator().manual_seed(seed)

    def rand(self, *shape, scale=None) -> torch.Tensor:
        return torch.randn(*shape, generator=self.g) * (scale if scale is not None else shape[-1] ** -0.5)

    def linear(self, name: str, out: int, fan_in: int, bias: bool = True) -> None:
        self[f"{name}.weight"] = self.rand(out, fan_in)
        if bias:
            self[f"{name}.bias"] = self.rand(out, scale=0.1)

    def norm(self, name: str, dim: int) -> None:
        self[f"{name}.weight"], self[f"{name}.bias"] = 1 + self.rand(dim, scale=0.1), self.rand(dim, scale=0.1)


def resampler(state: RandomState, embed: int, cross: int, hidden: int = 48) -> None:
    """plus: 16 queries, depth 4 and a feed-forward of 4× (diffusers' fixed sizes), one head of 64."""
    state["image_proj.latents"] = state.rand(1, 16, hidden, scale=1.0)
    state.linear("image_proj.proj_in", hidden, embed)
    state.linear("image_proj.proj_out", cross, hidden)
    state.norm("image_proj.norm_out", cross)
    for n in range(4):
        layer = f"image_proj.layers.{n}"
        state.norm(f"{layer}.0.norm1", hidden)
        state.norm(f"{layer}.0.norm2", hidden)
        state.linear(f"{layer}.0.to_q", 64, hidden, bias=False)
        state.linear(f"{layer}.0.to_kv", 128, hidden, bias=False)
        state.linear(f"{layer}.0.to_out", hidden, 64, bias=False)
        state.norm(f"{layer}.1.0", hidden)
        state.linear(f"{layer}.1.1", 4 * hidden, hidden, bias=False)
        state.linear(f"{layer}.1.3", hidden, 4 * hidden, bias=False)


def adapter_file(path, folder, kind: str, embed: int, seed: int = 0):
    """A random adapter in the official flat layout for the UNet of `folder`, reading features of width `embed`."""
    state = RandomState(seed)
    widths, cross = cross_attention_widths(folder)
    for i, width in enumerate(widths):
        state.linear(f"ip_adapter.{2 * i + 1}.to_k_ip", width, cross, bias=False)
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = state.rand(width, cross, scale=3 * cross ** -0.5)
    if kind == "plain":
        state.linear("image_proj.proj", 4 * cross, embed)
        state.norm("image_proj.norm", cross)
    elif kind == "full":
        state.linear("image_proj.proj.0", embed, embed)
        state.linear("image_proj.proj.2", cross, embed)
        state.norm("image_proj.proj.3", cross)
    else:
        resampler(state, embed, cross)
    save_file(dict(state), str(path))
    return path


@pytest.fixture(scope="module")
def files(sd1_folder, sdxl_folder, tmp_path_factory):
    root = tmp_path_factory.mktemp("ipadapter")
    encoder = make_encoder(root / "image_encoder")
    return {"encoder": encoder, "narrow-encoder": make_encoder(root / "narrow", projection_dim=16, hidden_size=16),
            "plain": adapter_file(root / "ip-adapter_sd15.safetensors", sd1_folder, "plain", 24, seed=1),
            "plus": adapter_file(root / "ip-adapter-plus_sd15.safetensors", sd1_folder, "plus", 32, seed=2),
            "full": adapter_file(root / "ip-adapter-full-face_sd15.safetensors", sd1_folder, "full", 32, seed=3),
            "sdxl": adapter_file(root / "ip-adapter_sdxl.safetensors", sdxl_folder, "plain", 24, seed=4)}


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


def ours(pipe, prompts, seed=3, **kwargs) -> np.ndarray:
    image = pipe(PROMPT, steps=4, seed=seed, sampler="euler", image_prompts=prompts, **kwargs).images[0]
    return np.asarray(image).astype(np.int16)


def theirs(folder, files, kind, image, scale, xl=False, seed=3, step_scales=None, embeds=None) -> np.ndarray:
    """diffusers' image; `step_scales`: the scale of each step (set by a step-end callback), `embeds`: the image
    embeddings ([negative, positive]) given in place of the image."""
    encoder = CLIPVisionModelWithProjection.from_pretrained(files["encoder"])
    if xl:
        ref = StableDiffusionXLPipeline.from_pretrained(folder, image_encoder=encoder)
    else:
        ref = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                      requires_safety_checker=False, image_encoder=encoder)
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("euler", dict(ref.scheduler.config))
    path = files[kind]
    ref.load_ip_adapter(str(path.parent), subfolder="", weight_name=path.name, image_encoder_folder=None)
    step_scales = step_scales or [scale] * 4
    ref.set_ip_adapter_scale(step_scales[0])

    def next_scale(pipe, i, t, kwargs):
        if i + 1 < len(step_scales):
            pipe.set_ip_adapter_scale(step_scales[i + 1])
        return kwargs

    given = {"ip_adapter_image": image} if embeds is None else {"ip_adapter_image_embeds": [embeds]}
    out = ref(PROMPT, num_inference_steps=4, generator=torch.Generator().manual_seed(seed), guidance_scale=7.5,
              output_type="np", height=64, width=64, callback_on_step_end=next_scale, **given).images
    return (np.asarray(out[0]) * 255).round().astype(np.int16)


def test_encoder_and_preprocessing_equal_transformers(files):
    """The pixels of CLIPImageProcessor(size=image_size, crop_size=image_size) (what diffusers' load_ip_adapter
    builds) on a non-square image, exactly; the image embedding and the penultimate hidden states ≤ 1e-6."""
    images = [reference_image(0), reference_image(1, size=(29, 41))]
    processor = CLIPImageProcessor(size=ENCODER["image_size"], crop_size=ENCODER["image_size"])
    expected_pixels = processor(images, return_tensors="pt").pixel_values
    pixels = encoder_pixels(images, ENCODER["image_size"])
    assert torch.equal(pixels, expected_pixels)
    reference = CLIPVisionModelWithProjection.from_pretrained(files["encoder"]).eval()
    encoder = load_image_encoder(files["encoder"], torch.device("cpu"), torch.float32)
    with torch.no_grad():
        expected = reference(pixels, output_hidden_states=True)
        actual = encoder(pixels)
    assert max_rel_err(actual.image_embeds, expected.image_embeds) <= 1e-6
    assert max_rel_err(actual.hidden_states[-2], expected.hidden_states[-2]) <= 1e-6
    assert len(actual.hidden_states) == len(expected.hidden_states)


@pytest.mark.parametrize("kind,scale", [("plain", 0.7), ("plus", 1.0), ("full", 0.8)])
def test_sd1_images_equal_diffusers(pipe, sd1_folder, files, kind, scale):
    image = reference_image(2)
    actual = ours(pipe, [ImagePrompt(str(files[kind]), image, weight=scale, encoder=str(files["encoder"]))])
    expected = theirs(sd1_folder, files, kind, image, scale)
    assert_images_close(f"SD 1.x {kind}", actual, expected, plain=ours(pipe, []))


def test_sdxl_plain_equals_diffusers(sdxl_folder, files):
    xl = StableDiffusion.from_pretrained(sdxl_folder)
    image = reference_image(3)
    actual = ours(xl, [ImagePrompt(str(files["sdxl"]), image, weight=0.6, encoder=str(files["encoder"]))])
    expected = theirs(sdxl_folder, files, "sdxl", image, 0.6, xl=True)
    assert_images_close("SDXL plain", actual, expected, plain=ours(xl, []))


def test_fused_projections_equal_diffusers(sd1_folder, files):
    """With accelerate's fused k/v (no compile), the image attention wraps the fused projection."""
    from ldm.speed.accelerate import accelerate

    fused = accelerate(StableDiffusion.from_pretrained(sd1_folder), compile=False, channels_last=False, fuse=True)
    assert any(hasattr(m, "to_kv") for m in fused.networks()["unet"].modules())
    image = reference_image(4)
    actual = ours(fused, [ImagePrompt(str(files["plain"]), image, weight=0.7, encoder=str(files["encoder"]))])
    expected = theirs(sd1_folder, files, "plain", image, 0.7)
    assert_images_close("fused plain", actual, expected, plain=ours(fused, []))


class BakedCapture:
    """Stands in for `capture_cuda_graph` on the CPU as a graph replays: the network's Python as it was at capture
    (each module's class, what an adapter swaps in from outside, and its attributes: a value read in Python is baked
    into a graph), whatever has changed since; the tensors it reads are read anew (a graph's input buffers, which
    `CUDAGraphs` copies each call's inputs into). Unlike a graph it runs the Python inside the call again, so what it
    shows is what reaches a graph from outside (`decoupled_attention`'s hand-over reads only the call's arguments);
    `test_real_cuda_graphs_replay_image_prompts_as_eager` runs the real graphs where there is a GPU."""

    def __init__(self, network):
        self.network, self.count = network, 0

    def __call__(self, run, pool=None):
        self.count += 1
        captured = self.python_state()
        output = run()

        def replay():
            now = self.python_state()
            self.restore(captured)
            try:
                output.copy_(run())
            finally:
                self.restore(now)

        return replay, output

    def python_state(self) -> dict:
        return {m: (type(m), {k: v for k, v in vars(m).items() if not k.startswith("_")})
                for m in self.network.modules()}

    @staticmethod
    def restore(state: dict) -> None:
        for module, (cls, attributes) in state.items():
            module.__class__ = cls
            for name in [k for k in vars(module) if not k.startswith("_") and k not in attributes]:
                delattr(module, name)
            vars(module).update(attributes)


def test_under_the_cuda_graphs_image_prompts_replay_a_graph_of_their_own(pipe, sd1_folder, files):
    """A pipeline whose UNet step replays CUDA graphs (`BakedCapture` standing in on the CPU): a call with an image
    prompt captures a graph of its own (the image attention in it) and gives the eager image; a later call with the
    same adapter, another image and a start/end window replays that graph with its tokens and per-step scales and
    gives its eager image; the calls without one replay theirs."""
    from ldm.speed.accelerate import CUDAGraphs, TensorTimestep

    graphed = StableDiffusion.from_pretrained(sd1_folder)
    unet = graphed.networks()["unet"]
    graphed.unet = TensorTimestep(unet, graphs=CUDAGraphs(unet, capture=BakedCapture(unet), device_type="cpu"))
    prompted = [ImagePrompt(str(files["plain"]), reference_image(4), weight=0.7, encoder=str(files["encoder"]))]
    windowed = [ImagePrompt(str(files["plain"]), reference_image(5), weight=0.9, start=0.25, end=0.75,
                            encoder=str(files["encoder"]))]
    before = ours(graphed, [])
    images = [ours(graphed, prompted), ours(graphed, windowed)]
    assert graphed.unet.graphs.captures == 2
    for image, prompts in zip(images, [prompted, windowed], strict=True):
        assert np.array_equal(image, ours(pipe, prompts)) and not np.array_equal(image, before)
    assert not np.array_equal(images[0], images[1])
    assert np.array_equal(ours(graphed, []), before) and np.array_equal(before, ours(pipe, []))
    assert graphed.unet.graphs.captures == 2


def test_a_compiled_unet_is_passed_by_for_an_image_prompted_call(pipe, sd1_folder, files):
    """A speed wrapper running compiled code (a stand-in counting its calls): a call with an image prompt runs the
    eager UNet (compiled code is specialised to the attentions it was compiled with) and gives the eager image; a
    call without one runs the compiled code."""
    from ldm.speed.accelerate import TensorTimestep

    wrapped = StableDiffusion.from_pretrained(sd1_folder)
    unet, compiled_calls = wrapped.networks()["unet"], []

    def compiled(*args, **kwargs):
        compiled_calls.append(kwargs.keys())
        return unet(*args, **kwargs)

    wrapped.unet = TensorTimestep(unet, run=compiled)
    prompts = [ImagePrompt(str(files["plain"]), reference_image(4), weight=0.7, encoder=str(files["encoder"]))]
    assert np.array_equal(ours(wrapped, prompts), ours(pipe, prompts)) and compiled_calls == []
    assert np.array_equal(ours(wrapped, []), ours(pipe, [])) and len(compiled_calls) == 4
    assert isinstance(wrapped.unet, TensorTimestep)


@pytest.mark.gpu
def test_real_cuda_graphs_replay_image_prompts_as_eager(sd1_folder, files):
    """On CUDA (fp16): the graphed pipeline's images with an image prompt, a windowed one and none equal the eager
    CUDA path's within 2/255, the image-prompted layout captured once."""
    from ldm.speed.accelerate import accelerate

    def loaded(**speed):
        return accelerate(StableDiffusion.from_pretrained(sd1_folder, device="cuda", dtype="fp16"), compile=False,
                          **speed)

    eager, graphed = loaded(cuda_graph=False), loaded()
    for prompts in ([ImagePrompt(str(files["plain"]), reference_image(4), weight=0.7, encoder=str(files["encoder"]))],
                    [ImagePrompt(str(files["plain"]), reference_image(5), weight=0.9, start=0.25, end=0.75,
                                 encoder=str(files["encoder"]))], []):
        assert np.abs(ours(graphed, prompts) - ours(eager, prompts)).max() <= 2
    assert graphed.unet.graphs.captures == 2


def test_scale_zero_and_no_step_change_nothing(pipe, files):
    """Scale 0 (diffusers skips the adapter) and a window without a step give the image without it, bit for bit; the
    UNet is untouched after a call with an adapter."""
    unet = pipe.networks()["unet"]
    classes = [type(m) for m in unet.modules()]
    plain = ours(pipe, [])
    prompt = ImagePrompt(str(files["plain"]), reference_image(5), weight=0.0, encoder=str(files["encoder"]))
    assert np.array_equal(ours(pipe, [prompt]), plain)
    late = ImagePrompt(str(files["plain"]), reference_image(5), start=0.9, encoder=str(files["encoder"]))
    assert np.array_equal(ours(pipe, [late]), plain)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, 64)
    with torch.no_grad():
        before = unet(x, torch.tensor(10.0), context)
        ours(pipe, [ImagePrompt(str(files["plain"]), reference_image(5), encoder=str(files["encoder"]))])
        assert torch.equal(unet(x, torch.tensor(10.0), context), before)
    assert [type(m) for m in unet.modules()] == classes


def test_a_prompt_of_weight_zero_is_checked_before_the_run(pipe, files, tmp_path):
    """Left out of the run, a weight-0 prompt is still named in the infotext: a wrong adapter or encoder is its error
    before the first step, not after the last."""
    steps = []
    bad_adapter = ImagePrompt(str(tmp_path / "nope.safetensors"), reference_image(5), weight=0.0)
    with pytest.raises(LdmError, match="nope"):
        pipe(PROMPT, steps=2, seed=3, image_prompts=[bad_adapter], callbacks=[steps.append])
    wide = make_encoder(tmp_path / "wide", seed=3, projection_dim=ENCODER["projection_dim"] + 8)
    wrong_width = ImagePrompt(str(files["plain"]), reference_image(5), weight=0.0, encoder=str(wide))
    with pytest.raises(LdmError, match="gives width"):
        pipe(PROMPT, steps=2, seed=3, image_prompts=[wrong_width], callbacks=[steps.append])
    assert steps == []


@pytest.mark.parametrize("start,end,unlike", [(0.0, 0.5, "none"), (0.5, 1.0, "all"), (0.25, 0.75, "all")])
def test_start_and_end_follow_controlnets_rule(pipe, sd1_folder, files, start, end, unlike):
    """At step i of N the adapter acts unless i/N < start or (i + 1)/N > end (diffusers' `controlnet_keep`, which
    ldm's ControlNet units follow): against diffusers with its scale set per step by a step-end callback. (The late
    steps move the tiny model's pixels by a level or two: a window from 0 is told apart from no adapter, others
    from the adapter at every step.)"""
    image, scale = reference_image(6), 0.9
    actual = ours(pipe, [ImagePrompt(str(files["plain"]), image, weight=scale, start=start, end=end,
                                     encoder=str(files["encoder"]))])
    step_scales = [scale if not (i / 4 < start or (i + 1) / 4 > end) else 0.0 for i in range(4)]
    expected = theirs(sd1_folder, files, "plain", image, scale, step_scales=step_scales)
    prompts = [] if unlike == "none" else [ImagePrompt(str(files["plain"]), image, weight=scale,
                                                       encoder=str(files["encoder"]))]
    assert_images_close(f"start {start}, end {end}", actual, expected, plain=ours(pipe, prompts), moved=MAX_PIXEL_DIFF)


def test_two_images_average_their_embeddings(pipe, sd1_folder, files):
    """Several reference images: their image embeddings averaged (diffusers given the mean as the embedding)."""
    images = [reference_image(6), reference_image(7, size=(40, 60))]
    processor = CLIPImageProcessor(size=ENCODER["image_size"], crop_size=ENCODER["image_size"])
    encoder = CLIPVisionModelWithProjection.from_pretrained(files["encoder"]).eval()
    with torch.no_grad():
        mean = encoder(processor(images, return_tensors="pt").pixel_values).image_embeds.mean(0)
    embeds = torch.stack([torch.zeros_like(mean), mean])[:, None]  # [negative; positive], one image each
    actual = ours(pipe, [ImagePrompt(str(files["plain"]), images, weight=0.8, encoder=str(files["encoder"]))])
    expected = theirs(sd1_folder, files, "plain", None, 0.8, embeds=embeds)
    first = ours(pipe, [ImagePrompt(str(files["plain"]), images[0], weight=0.8, encoder=str(files["encoder"]))])
    assert_images_close("two images", actual, expected, plain=first, moved=MAX_PIXEL_DIFF)


def test_command_line_equals_python(pipe, sd1_folder, files, tmp_path):
    reference_image(8).save(tmp_path / "ref.png")
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "4", "--seed", "3", "--sampler", "euler",
                 "--ip-adapter", str(files["plain"]), "--ip-image", str(tmp_path / "ref.png"), "--ip-weight", "0.6",
                 "--ip-image-encoder", str(files["encoder"]), "-o", str(out)]) == 0
    expected = ours(pipe, [ImagePrompt(str(files["plain"]), Image.open(tmp_path / "ref.png"), weight=0.6,
                                       encoder=str(files["encoder"]))])
    assert np.array_equal(np.asarray(Image.open(out).convert("RGB")).astype(np.int16), expected)
    params = Image.open(out).text["parameters"]
    assert ('ControlNet 0: "Module: ip-adapter_clip_h, Model: ip-adapter_sd15, Weight: 0.6, Resize Mode: Crop and '
            'Resize, Processor Res: 512, Guidance Start: 0.0, Guidance End: 1.0, Pixel Perfect: False, Control Mode: '
            'Balanced"') in params


def test_names_resolve_in_the_weights_folders(pipe, files, monkeypatch, tmp_path):
    """An adapter by name in weights/ipadapter/, the encoder found in weights/clip_vision/ by the width it reads."""
    import shutil

    store = tmp_path / "weights"
    (store / "ipadapter").mkdir(parents=True)
    shutil.copy(files["plain"], store / "ipadapter" / "tiny-ip.safetensors")
    shutil.copytree(files["narrow-encoder"], store / "clip_vision" / "a-narrow")
    shutil.copytree(files["encoder"], store / "clip_vision" / "b-fits")
    monkeypatch.setenv("LDM_WEIGHTS", str(store))
    by_name = ours(pipe, [ImagePrompt("tiny-ip", reference_image(9))])
    by_path = ours(pipe, [ImagePrompt(str(files["plain"]), reference_image(9), encoder=str(files["encoder"]))])
    assert np.array_equal(by_name, by_path)
    adapter = load_ip_adapter("tiny-ip", *widths_of(pipe), "tiny", torch.device("cpu"), torch.float32)
    assert find_image_encoder(None, adapter.config).name == "b-fits"


def widths_of(pipe):
    from ldm.adapters.ip_adapter import attention_widths

    unet = pipe.networks()["unet"]
    return attention_widths(unet), unet.config.cross_attention_dim


def test_an_sdxl_adapter_on_sd1_and_a_wrong_encoder_are_one_error(pipe, files):
    with pytest.raises(LoadError) as e:
        ours(pipe, [ImagePrompt(str(files["sdxl"]), reference_image(0), encoder=str(files["encoder"]))])
    count, cross = pairs_of(files["sdxl"])  # (the tiny SDXL's: its file says)
    assert (f"IP-Adapter ip-adapter_sdxl.safetensors is for a UNet of cross-attention width {cross} and {count} "
            f"cross-attentions; {pipe.name} has cross-attention width 64 and 16 cross-attentions") in str(e.value)
    with pytest.raises(LoadError, match=r"reads image embeddings \(the projected class token\) of width 24; the "
                                        r"image encoder narrow gives width 16"):
        ours(pipe, [ImagePrompt(str(files["plain"]), reference_image(0), encoder=str(files["narrow-encoder"]))])


def pairs_of(path) -> tuple[int, int]:
    """An adapter file's number of key/value pairs and the context width they read."""
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        keys = [k for k in f.keys() if k.endswith("to_k_ip.weight")]  # noqa: SIM118
        return len(keys), f.get_slice(keys[0]).get_shape()[1]


def test_pickles_are_refused_never_unpickled(pipe, files, tmp_path):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return marker.touch, ()

    bad = tmp_path / "ip-adapter.bin"
    bad.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(LoadError, match="pickle checkpoint; ldm never unpickles"):
        ours(pipe, [ImagePrompt(str(bad), reference_image(0), encoder=str(files["encoder"]))])
    folder = tmp_path / "encoder-bin"
    folder.mkdir()
    (folder / "config.json").write_text((files["encoder"] / "config.json").read_text())
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    with pytest.raises(LoadError, match="pickle checkpoint; ldm never unpickles"):
        ours(pipe, [ImagePrompt(str(files["plain"]), reference_image(0), encoder=str(folder))])
    assert not marker.exists()


@pytest.mark.parametrize("args,message", [
    (["--ip-adapter", "P", "--ip-image", "missing.png"], "reference image missing.png: no such file"),
    (["--ip-adapter", "P", "--ip-image", "BROKEN"], "not a readable image"),
    (["--ip-image", "REF"], "--ip-adapter and --ip-image go together"),
    (["--ip-adapter", "P", "--ip-image", "REF", "--ip-weight", "3"], "the weight must be from 0 to 2"),
    (["--ip-adapter", "XL", "--ip-image", "REF", "--ip-image-encoder", "E"], "is for a UNet of cross-attention"),
])
def test_bad_input_is_one_line(sd1_folder, files, tmp_path, capsys, args, message):
    reference_image(0).save(tmp_path / "ref.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG not really")
    names = {"P": str(files["plain"]), "XL": str(files["sdxl"]), "E": str(files["encoder"]),
             "REF": str(tmp_path / "ref.png"), "BROKEN": str(tmp_path / "broken.png")}
    code = main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "1", "-o", str(tmp_path / "x.png"),
                 *[names.get(a, a) for a in args]])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error" in line]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err


def test_request_checks_the_image_prompt():
    from ldm.pipelines.request import GenerationRequest

    with pytest.raises(LdmError, match="image prompt 0: the reference images must be images"):
        GenerationRequest(PROMPT, image_prompts=[ImagePrompt("x", "not an image")]).check()
    with pytest.raises(LdmError, match="image prompt 0: start and end"):
        GenerationRequest(PROMPT, image_prompts=[ImagePrompt("x", reference_image(0), start=0.5, end=0.5)]).check()
    for unit in (-1, "2", True, 1.0):  # (its index among sd-webui-controlnet's units: a whole number ≥ 0)
        with pytest.raises(LdmError, match=f"image prompt 0: unit is its index .*, got {unit!r}"):
            GenerationRequest(PROMPT, image_prompts=[ImagePrompt("x", reference_image(0), unit=unit)]).check()
    GenerationRequest(PROMPT, image_prompts=[ImagePrompt("x", reference_image(0), unit=3)]).check()


def gentle_controlnet(folder, out):
    """diffusers' `ControlNetModel.from_unet` of the tiny UNet with its zero convolutions moved a little (the
    ControlNet tests' larger moves give residuals that drown any other conditioning)."""
    from diffusers import ControlNetModel

    torch.manual_seed(5)
    net = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(folder / "unet"))
    with torch.no_grad():
        for name, p in net.named_parameters():
            p.add_(torch.randn_like(p) * (0.01 if "controlnet_" in name else 0.02))
    net.save_pretrained(out)
    return out


def test_with_a_controlnet_unit_equals_diffusers(pipe, sd1_folder, files, tmp_path):
    """An image prompt and a ControlNet unit at once, against StableDiffusionControlNetPipeline after
    `load_ip_adapter`: the ControlNet reads the text alone, the UNet's cross-attentions the image tokens too."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from test_controlnet import hint

    from ldm.pipelines.request import Control

    net = gentle_controlnet(sd1_folder, tmp_path / "control")
    image, control = reference_image(10), hint(1)
    prompt = ImagePrompt(str(files["plain"]), image, weight=0.7, encoder=str(files["encoder"]))
    unit = Control(str(net), control, weight=0.8)
    actual = ours(pipe, [prompt], controls=[unit])
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        sd1_folder, controlnet=ControlNetModel.from_pretrained(net), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False, image_encoder=CLIPVisionModelWithProjection.from_pretrained(files["encoder"]))
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("euler", dict(ref.scheduler.config))
    ref.load_ip_adapter(str(files["plain"].parent), subfolder="", weight_name=files["plain"].name,
                        image_encoder_folder=None)
    ref.set_ip_adapter_scale(0.7)
    out = ref(PROMPT, image=control, ip_adapter_image=image, num_inference_steps=4, guidance_scale=7.5,
              controlnet_conditioning_scale=0.8,
              generator=torch.Generator().manual_seed(3), output_type="np", height=64, width=64).images
    expected = (np.asarray(out[0]) * 255).round().astype(np.int16)
    assert_images_close("with a ControlNet unit", actual, expected, plain=ours(pipe, [], controls=[unit]))
    assert np.abs(actual - ours(pipe, [prompt])).max() > 10  # the unit acts too


@pytest.mark.parametrize("task", ["img2img", "inpaint"])
def test_image_to_image_and_inpainting_equal_diffusers(pipe, sd1_folder, files, task):
    """With image-to-image and (4-channel) inpainting, against StableDiffusionImg2ImgPipeline and
    StableDiffusionInpaintPipeline after `load_ip_adapter`."""
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline

    init, image = reference_image(11, size=(64, 64)), reference_image(12)
    mask = np.zeros((64, 64), np.uint8)
    mask[8:40, 16:56] = 255
    strength, extra = (0.6, {}) if task == "img2img" else (1.0, {"mask": Image.fromarray(mask)})
    prompt = ImagePrompt(str(files["plus"]), image, weight=0.8, encoder=str(files["encoder"]))
    actual = ours(pipe, [prompt], image=init, strength=strength, **extra)
    cls = StableDiffusionImg2ImgPipeline if task == "img2img" else StableDiffusionInpaintPipeline
    ref = cls.from_pretrained(sd1_folder, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
                              image_encoder=CLIPVisionModelWithProjection.from_pretrained(files["encoder"]))
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("euler", dict(ref.scheduler.config))
    ref.load_ip_adapter(str(files["plus"].parent), subfolder="", weight_name=files["plus"].name,
                        image_encoder_folder=None)
    ref.set_ip_adapter_scale(0.8)
    inputs = {"image": init, "strength": strength} | ({"mask_image": extra["mask"]} if extra else {})
    out = ref(PROMPT, ip_adapter_image=image, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
              generator=torch.Generator().manual_seed(3), output_type="np", **inputs).images
    expected = (np.asarray(out[0]) * 255).round().astype(np.int16)
    assert_images_close(task, actual, expected, plain=ours(pipe, [], image=init, strength=strength, **extra))


def test_with_a_lora_equals_diffusers(pipe, sd1_folder, files, tmp_path):
    """An image prompt on a UNet a LoRA is merged into (its attention's to_q, to_k, to_v, to_out included), against
    diffusers with the LoRA fused (`load_lora_weights` + `fuse_lora`) and then `load_ip_adapter`."""
    from lora_files import ATTENTION, draw, modules, save_kohya

    unet = UNet2DConditionModel.from_pretrained(sd1_folder / "unet")
    lora = save_kohya(tmp_path / "detail.safetensors", draw({"unet": modules(unet, ATTENTION)}, seed=3), xl=False)
    image = reference_image(13)
    prompt = ImagePrompt(str(files["plain"]), image, weight=0.7, encoder=str(files["encoder"]))
    pipe.load_lora(lora, 0.8)
    try:
        actual, lora_only = ours(pipe, [prompt]), ours(pipe, [])
    finally:
        pipe.unload_loras()
    ref = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, feature_extractor=None,
                                                  requires_safety_checker=False,
                                                  image_encoder=CLIPVisionModelWithProjection.from_pretrained(
                                                      files["encoder"]))
    ref.set_progress_bar_config(disable=True)
    ref.scheduler = diffusers_scheduler("euler", dict(ref.scheduler.config))
    ref.load_lora_weights(str(lora))
    ref.fuse_lora(lora_scale=0.8)
    ref.unload_lora_weights()
    ref.load_ip_adapter(str(files["plain"].parent), subfolder="", weight_name=files["plain"].name,
                        image_encoder_folder=None)
    ref.set_ip_adapter_scale(0.7)
    out = ref(PROMPT, ip_adapter_image=image, num_inference_steps=4, guidance_scale=7.5, height=64, width=64,
              generator=torch.Generator().manual_seed(3), output_type="np").images
    assert_images_close("with a LoRA", actual, (np.asarray(out[0]) * 255).round().astype(np.int16), plain=lora_only)
    assert np.abs(lora_only - ours(pipe, [])).max() > 10  # the LoRA acts too


def test_a_refiner_hand_off_prompts_the_base_only(sdxl_folder, sdxl_refiner_folder, files):
    """With a refiner, the image prompt steers the base's part (as ControlNet units do: the adapter is for the base's
    cross-attentions, not the refiner's) and the refiner finishes from those latents; no adapter reaches it."""
    from ldm.pipelines.refiner import BaseWithRefiner

    base, refiner = StableDiffusion.from_pretrained(sdxl_folder), StableDiffusion.from_pretrained(sdxl_refiner_folder)
    both = BaseWithRefiner(base, refiner, 0.5)
    prompt = ImagePrompt(str(files["sdxl"]), reference_image(3), weight=0.8, encoder=str(files["encoder"]))
    prompted = both(PROMPT, steps=4, seed=3, sampler="euler", image_prompts=[prompt])
    plain = both(PROMPT, steps=4, seed=3, sampler="euler")
    assert np.abs(np.asarray(prompted.images[0]).astype(int) - np.asarray(plain.images[0])).max() > 10
    assert not refiner.ip_adapters and len(base.ip_adapters) == 1
