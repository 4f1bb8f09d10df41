"""LoRA and LyCORIS adapters (`ldm.adapters.lora`): merged weights against diffusers' `load_lora_weights` +
`fuse_lora` on the same tiny official-layout folders (tensor by tensor, and whole images), LoHa/LoKr against
LyCORIS's merge formulas computed here, exact unloading, LoRAs before and after `ldm.speed.accelerate`, and bad
input."""

import hashlib
import json
import pickle
import re

import numpy as np
import pytest
import torch
from conftest import MODULE_TOL, max_rel_err
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft
from lora_files import (
    ATTENTION,
    CONVS,
    TEXT,
    draw,
    kohya_key,
    loha_factors,
    lokr_factors,
    modules,
    save_kohya,
    save_lycoris,
    save_peft,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ldm.adapters.lora import find_lora, load_lora, lora_hash, loras_dir, unload_loras
from ldm.errors import InputError, LoadError
from ldm.loading.single_file import unet_rules
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.accelerate import WinogradConv2d, accelerate, use_winograd

PROMPT = "a red boat on a calm sea"

# (conftest.py) every comparison here is within this process: ldm and the references at one thread
pytestmark = pytest.mark.usefixtures("one_thread")
FIXTURES = {"sd1": "sd1_folder", "sd21": "sd21_folder", "sdxl": "sdxl_folder"}
TOWERS = {"sd1": ["text_encoder"], "sd21": ["text_encoder"], "sdxl": ["text_encoder", "text_encoder_2"]}
WEIGHT = 0.7


def states(pipe) -> dict[str, dict[str, torch.Tensor]]:
    """Copies of every network's tensors (UNet, VAE, text towers), by component."""
    nets = {"unet": pipe.unet, "vae": pipe.vae, "text_encoder": pipe.text_encoder,
            "text_encoder_2": getattr(pipe, "text_encoder_2", None)}
    return {c: {k: v.detach().clone() for k, v in m.state_dict().items()} for c, m in nets.items() if m is not None}


def assert_same_bits(actual: dict, expected: dict) -> None:
    assert actual.keys() == expected.keys()
    for component in expected:
        assert actual[component].keys() == expected[component].keys(), component
        for key, value in expected[component].items():
            assert torch.equal(actual[component][key], value), f"{component} {key}"


def spec_for(pipe, family: str, convs: bool, **kwargs) -> dict:
    """A random LoRA for `pipe`'s networks: attention (and, with `convs`, LoCon convolutions) and text towers. Module
    names come from ldm's networks, which carry the official diffusers / transformers-4 names."""
    unet = f"({ATTENTION})|({CONVS})" if convs else ATTENTION
    targets = {"unet": modules(pipe.unet, unet)} | {t: modules(getattr(pipe, t), TEXT) for t in TOWERS[family]}
    return draw(targets, **kwargs)


def ldm_unet_names(pipe) -> dict[str, str]:
    """diffusers module name → LDM/SGM module name, from the single-file tables (which test_single_file checks
    against diffusers' own single-file loader)."""
    return {r.ours.removesuffix(".weight"): r.theirs.removesuffix(".weight")
            for r in unet_rules(pipe.unet.config, prefix="") if r.ours.endswith(".weight")}


def write(fmt: str, path, pipe, family: str, spec: dict):
    if fmt == "kohya":
        return save_kohya(path, spec, xl=family == "sdxl")
    if fmt == "kohya-ldm":
        return save_kohya(path, spec, xl=family == "sdxl", ldm_names=ldm_unet_names(pipe))
    return save_peft(path, spec, old=fmt == "old")


# ------------------------------------------------------------------------------------- reference


class Reference:
    """diffusers pipelines on the tiny folders, one per family, restored to their own weights before each use."""

    def __init__(self, request):
        self.request, self.pipes = request, {}

    def pipe(self, family: str):
        if family not in self.pipes:
            folder = self.request.getfixturevalue(FIXTURES[family])
            if family == "sdxl":
                pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
            else:
                pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                               requires_safety_checker=False)
            pipe.set_progress_bar_config(disable=True)
            nets = ["unet", *TOWERS[family]]
            self.pipes[family] = (pipe, {n: {k: v.clone() for k, v in getattr(pipe, n).state_dict().items()}
                                         for n in nets})
        pipe, originals = self.pipes[family]
        for name, state in originals.items():
            getattr(pipe, name).load_state_dict(state)
        return pipe

    def merged(self, family: str, *loras) -> tuple:
        """The reference pipeline with each (path or state dict, weight) fused in turn (fuse_lora, then the adapter
        unloaded), and its UNet and text-tower tensors under ldm's names (`tensors`)."""
        pipe = self.pipe(family)
        for lora, weight in loras:
            pipe.load_lora_weights(lora if isinstance(lora, dict) else str(lora))
            pipe.fuse_lora(lora_scale=weight)
            pipe.unload_lora_weights()
        return pipe, self.tensors(family)

    def tensors(self, family: str) -> dict[str, dict[str, torch.Tensor]]:
        """The reference pipeline's UNet and text-tower tensors as they are now, under ldm's names (transformers 5
        drops the `text_model.` prefix)."""
        pipe, out = self.pipes[family][0], {}
        for name in ["unet", *TOWERS[family]]:
            state = getattr(pipe, name).state_dict()
            out[name] = {(k if name == "unet" or k.startswith(("text_model.", "text_projection")) else
                          "text_model." + k): v for k, v in state.items()}
        return out


@pytest.fixture(scope="module")
def reference(request):
    return Reference(request)


def assert_merged_like(pipe, expected: dict, before: dict, changed: dict[str, set[str]]) -> None:
    """Every UNet/text-tower tensor of `pipe` within MODULE_TOL of the reference's; exactly `changed` differ from
    `before` (no module silently skipped, on either side)."""
    for component, theirs in expected.items():
        ours = getattr(pipe, component).state_dict()
        for key, value in ours.items():
            if key.endswith("position_ids"):
                continue
            assert close(value, theirs[key]), f"{component} {key}: {max_rel_err(value, theirs[key]):.3g} relative"
        moved = {k for k, v in ours.items() if not torch.equal(v, before[component][k])}
        moved_ref = {k for k, v in before[component].items() if k in theirs and not torch.equal(theirs[k], v)}
        assert moved == moved_ref == changed[component], component


def close(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Within MODULE_TOL relative (equal, for the all-zero biases the random init leaves)."""
    return torch.equal(actual, expected) or max_rel_err(actual, expected) <= MODULE_TOL


def changed_weights(spec: dict) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for component, name in spec:
        out.setdefault(component, set()).add(f"{name}.weight")
    return out


def image(pipe, **kwargs) -> np.ndarray:
    args = {"steps": 3, "seed": 5, "width": 64, "height": 64} | kwargs
    return np.asarray(pipe(PROMPT, **args).images[0]).astype(np.int16)


def reference_image(pipe, family: str) -> np.ndarray:
    """diffusers' image with the folder's scheduler, the same seed and steps as `image`."""
    kwargs = {"guidance_scale": 7.5} if family == "sdxl" else {}
    out = pipe(PROMPT, num_inference_steps=3, height=64, width=64, generator=torch.Generator("cpu").manual_seed(5),
               output_type="np", **kwargs).images[0]
    return (out * 255).round().astype(np.int16)


# ------------------------------------------------------------------------------------------ formats


@pytest.fixture(scope="module")
def locon(sd1_folder, tmp_path_factory):
    """An SD 1.x kohya LoRA + LoCon file (attention, 1×1-conv proj_in/out, resnet and resampler convolutions, the
    text tower), and ldm's images without it and with it (no accelerate)."""
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    path = save_kohya(tmp_path_factory.mktemp("locon") / "locon.safetensors",
                      spec_for(pipe, "sd1", convs=True, seed=11), xl=False)
    plain = image(pipe)
    load_lora(pipe, path, WEIGHT)
    return path, image(pipe), plain


def assert_image_like_diffusers(name: str, ours: np.ndarray, theirs: np.ndarray, plain: np.ndarray) -> None:
    print(f"{name}: max pixel difference {np.abs(ours - theirs).max()}, the LoRA moved pixels by "
          f"{np.abs(ours - plain).max()} (mean {np.abs(ours - plain).mean():.1f})")
    assert np.abs(ours - theirs).max() <= 2
    assert np.abs(ours - plain).mean() > 5  # the LoRA visibly changes the image: the comparison means something


@pytest.mark.parametrize("family, fmt, convs", [
    ("sd1", "kohya", True),  # LoRA + LoCon (1×1-conv proj_in, 3×3 resnet convs, resamplers), CLIP-L
    ("sd21", "kohya", False),  # linear projections, OpenCLIP-H-style tower
    ("sdxl", "kohya-ldm", True),  # kohya's SDXL trainer: LDM/SGM UNet names (+ LoCon), both towers
    ("sdxl", "kohya", False),  # diffusers-named SDXL UNet
    ("sd1", "peft", True),  # lora_A/lora_B, alphas from lora_adapter_metadata (alpha_pattern for the convs)
    ("sdxl", "peft", False),  # unet. / text_encoder. / text_encoder_2.
    ("sd1", "old", False),  # diffusers 0.21: lora.down/lora.up, lora_linear_layer (alpha = rank)
])
def test_lora_merges_like_diffusers(request, reference, tmp_path, family, fmt, convs):
    pipe = StableDiffusion.from_pretrained(request.getfixturevalue(FIXTURES[family]))
    before = states(pipe)
    ranks = {"alpha": 4, "conv_alpha": 3} if fmt == "old" else {}  # the old format has no alphas: alpha = rank
    spec = spec_for(pipe, family, convs, seed=len(fmt), **ranks)
    path = write(fmt, tmp_path / f"{family}-{fmt}.safetensors", pipe, family, spec)

    lora = load_lora(pipe, path, WEIGHT)
    assert (lora.name, lora.path, lora.weight, lora.keys) == (path.stem, path, WEIGHT, len(spec))
    assert lora.hash == lora_hash(path) and pipe.loras == [lora]
    _, expected = reference.merged(family, (path, WEIGHT))
    assert_merged_like(pipe, expected, before, changed_weights(spec))
    assert {c for c, _ in spec} == {"unet", *TOWERS[family]}  # every network adapted

    unload_loras(pipe)
    assert pipe.loras == [] and not pipe.lora_originals
    assert_same_bits(states(pipe), before)


def test_sd1_image_with_a_locon_lora_equals_diffusers(locon, reference):
    path, ours, plain = locon
    ref, _ = reference.merged("sd1", (path, WEIGHT))
    assert_image_like_diffusers("sd1 kohya LoCon", ours, reference_image(ref, "sd1"), plain)


def test_sdxl_image_with_a_kohya_sdxl_lora_equals_diffusers(sdxl_folder, reference, tmp_path):
    pipe = StableDiffusion.from_pretrained(sdxl_folder)
    plain = image(pipe)
    path = save_kohya(tmp_path / "xl.safetensors", spec_for(pipe, "sdxl", convs=True, seed=12), xl=True,
                      ldm_names=ldm_unet_names(pipe))
    load_lora(pipe, path, WEIGHT)
    ref, _ = reference.merged("sdxl", (path, WEIGHT))
    assert_image_like_diffusers("sdxl kohya LDM-named", image(pipe), reference_image(ref, "sdxl"), plain)


def full_checkpoint_ldm_names(pipe, unet) -> dict[str, str]:
    """diffusers module name → LDM module name as diffusers' full-checkpoint converter reads an original file
    (`convert_ldm_unet_checkpoint`): each key of the file gets a distinct marker, and the converter's output says
    which diffusers tensor it becomes. ldm's tables supply only the set of file keys, not where they go."""
    keys = sorted({rule.theirs for rule in unet_rules(pipe.unet.config, prefix="")})
    file = {"model.diffusion_model." + key: torch.tensor(float(i)) for i, key in enumerate(keys)}
    converted = convert_ldm_unet_checkpoint(file, unet.config)
    assert set(converted) == set(unet.state_dict())  # every tensor of the UNet read from the file
    return {name.removesuffix(".weight"): keys[int(marker)].removesuffix(".weight")
            for name, marker in converted.items() if name.endswith(".weight")}


def diffusers_lora_names(stems, unet_config) -> dict[str, str]:
    """kohya LDM-named UNet stem → the UNet module diffusers' LoRA converter assigns it: lora_state_dict given the
    UNet config (its SGM block mapping runs only then; SD 1.x's load_lora_weights never passes it, SDXL's does),
    then diffusers' PEFT renaming. One module at a time: over a whole SD 1.x file the block mapping takes
    `input_blocks_10_…` and `_11_…` for block 1's (a substring match) and fails with a KeyError."""
    out = {}
    for stem in stems:
        factors = {f"{stem}.lora_down.weight": torch.zeros(1), f"{stem}.lora_up.weight": torch.zeros(1),
                   f"{stem}.alpha": torch.zeros(())}
        converted, _ = StableDiffusionPipeline.lora_state_dict(factors, unet_config=unet_config)
        peft = convert_unet_state_dict_to_peft({k.removeprefix("unet."): v for k, v in converted.items()})
        (out[stem],) = {k.removesuffix(".lora_A.weight") for k in peft if k.endswith(".lora_A.weight")}
    return out


def reference_merge(weight: torch.Tensor, tensors: dict[str, torch.Tensor], stem: str, scale: float) -> None:
    """kohya's merge rule for the file's module `stem`, written out: W += scale · alpha / rank · (up @ down), the
    kernel in down's columns, rank = down's rows."""
    up, down = tensors[f"{stem}.lora_up.weight"].float(), tensors[f"{stem}.lora_down.weight"].float()
    delta = up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)
    weight += scale * tensors[f"{stem}.alpha"].float().item() / down.shape[0] * delta.reshape(weight.shape)


# What people's SD 1.x files hold under LDM names: attention, proj_in/out, a resnet's convs, shortcut and time
# projection, the down- and upsamplers (up block 0 of SD 1.x has no attention: its upsampler is output_blocks.2.1,
# the others' .5.2 and .8.2), blocks 10 and 11 (whose names contain block 1's), and the text tower.
SD1_LDM_STEMS = ("lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q", "lora_unet_input_blocks_1_1_proj_in",
                 "lora_unet_input_blocks_1_1_proj_out", "lora_unet_middle_block_1_transformer_blocks_0_attn2_to_k",
                 "lora_unet_middle_block_2_in_layers_2", "lora_unet_input_blocks_7_0_skip_connection",
                 "lora_unet_input_blocks_3_0_op", "lora_unet_output_blocks_2_1_conv",
                 "lora_unet_output_blocks_5_2_conv", "lora_unet_output_blocks_8_2_conv",
                 "lora_unet_input_blocks_11_0_emb_layers_1", "lora_unet_output_blocks_9_0_out_layers_3",
                 "lora_unet_output_blocks_10_1_transformer_blocks_0_ff_net_2",
                 "lora_te_text_model_encoder_layers_0_self_attn_q_proj")


def test_sd1_lora_with_ldm_names_merges_like_diffusers(sd1_folder, reference, tmp_path):
    """SD 1.x kohya files with LDM UNet names (`lora_unet_input_blocks_1_1_proj_in`, `…_output_blocks_2_1_conv`,
    `…_in_layers_2`, …; A1111 reads them), against diffusers: tensor by tensor and the image. The file's LDM names
    come from diffusers' full-checkpoint converter (the truth for where an original key goes). diffusers' LoRA
    loader cannot read such a file whole (diffusers_lora_names), so each module is renamed by its converter one at
    a time and the renamed file merged by load_lora_weights + fuse_lora. Where that converter disagrees with the
    full-checkpoint one, the module is merged into diffusers' UNet by kohya's rule (reference_merge) instead: up
    block 0's upsampler, `output_blocks_2_1_conv`, which it sends to `up_blocks.0.attentions.2.conv` (it takes
    output_blocks.N.1 for an attention, but SD 1.x's first up block has none: the full-checkpoint converter maps
    it to `up_blocks.0.upsamplers.0.conv`, as ldm does)."""
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    before, plain = states(pipe), image(pipe)
    ref = reference.pipe("sd1")
    ldm_names = full_checkpoint_ldm_names(pipe, ref.unet)
    spec = spec_for(pipe, "sd1", convs=True, seed=21)
    path = save_kohya(tmp_path / "sd1-ldm-named.safetensors", spec, xl=False, ldm_names=ldm_names)
    tensors = load_file(str(path))
    stems = {key.partition(".")[0] for key in tensors}
    assert set(SD1_LDM_STEMS) <= stems and not any("down_blocks" in s or "up_blocks" in s for s in stems)

    assert load_lora(pipe, path, WEIGHT).keys == len(spec)

    modules = {"lora_unet_" + ldm_names[name].replace(".", "_"): name for c, name in spec if c == "unet"}
    theirs = diffusers_lora_names(modules, ref.unet.config)
    by_rule = {stem: name for stem, name in modules.items() if theirs[stem] != name}
    print(f"diffusers' LoRA converter maps {', '.join(f'{s} to {theirs[s]}' for s in by_rule)}")
    assert set(by_rule) <= {"lora_unet_output_blocks_2_1_conv"}  # diffusers' merge is the reference for the rest
    for_diffusers = {}  # the other modules under the diffusers names diffusers' converter gives them
    for key, tensor in tensors.items():
        stem, _, part = key.partition(".")
        if stem not in by_rule:
            for_diffusers[f"lora_unet_{theirs[stem].replace('.', '_')}.{part}" if stem in theirs else key] = tensor
    ref, _ = reference.merged("sd1", (for_diffusers, WEIGHT))
    with torch.no_grad():
        for stem, name in by_rule.items():
            reference_merge(ref.unet.get_submodule(name).weight, tensors, stem, WEIGHT)
    assert_merged_like(pipe, reference.tensors("sd1"), before, changed_weights(spec))
    assert_image_like_diffusers("sd1 kohya LDM-named", image(pipe), reference_image(ref, "sd1"), plain)


def test_two_loras_stack_like_diffusers_and_unload_exactly(sd1_folder, reference, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    before = states(pipe)
    first = save_kohya(tmp_path / "first.safetensors", spec_for(pipe, "sd1", convs=True, seed=1), xl=False)
    second_spec = spec_for(pipe, "sd1", convs=False, seed=2, alpha=1.0)
    second = save_peft(tmp_path / "second.safetensors", second_spec)
    load_lora(pipe, first, 0.6)
    load_lora(pipe, second, -0.4)
    assert [lora.name for lora in pipe.loras] == ["first", "second"]
    _, expected = reference.merged("sd1", (first, 0.6), (second, -0.4))
    changed = changed_weights(spec_for(pipe, "sd1", convs=True))
    assert_merged_like(pipe, expected, before, changed)
    assert len(pipe.lora_originals) == sum(len(v) for v in changed.values())  # each kept once, at first touch
    unload_loras(pipe)
    assert_same_bits(states(pipe), before)


def test_weight_zero_is_the_unmodified_model(sdxl_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sdxl_folder)
    before = states(pipe)
    path = save_kohya(tmp_path / "z.safetensors", spec_for(pipe, "sdxl", convs=True), xl=True,
                      ldm_names=ldm_unet_names(pipe))
    lora = load_lora(pipe, path, 0.0)
    assert lora.weight == 0 and lora.keys > 0 and pipe.loras == [lora]
    assert_same_bits(states(pipe), before)


def test_model_file_is_untouched_by_merging(sd1_folder, tmp_path):
    """ldm loads fp32 files without a cast: the parameters are safetensors' tensors. Merging into them in place
    must never reach the file."""
    model_file = sd1_folder / "unet" / "diffusion_pytorch_model.safetensors"
    digest = hashlib.sha256(model_file.read_bytes()).hexdigest()
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    load_lora(pipe, save_kohya(tmp_path / "l.safetensors", spec_for(pipe, "sd1", convs=True), xl=False))
    del pipe
    assert hashlib.sha256(model_file.read_bytes()).hexdigest() == digest


# ---------------------------------------------------------------------------------------- LyCORIS


def kron(w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    """Kronecker product written out: block (i, j) of the result is w1[i, j] · w2 (w2 may carry a kernel)."""
    a, b = w1.shape
    c, d, *kernel = w2.shape
    blocks = w1[:, None, :, None].reshape(a, 1, b, 1, *[1] * len(kernel)) * w2[None, :, None, :]
    return blocks.reshape(a * c, b * d, *kernel)


def tucker(core: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS's Tucker rebuild, as two tensordots: core [r1, r2, kh, kw], a [r1, out], b [r2, in]."""
    x = torch.tensordot(core, b, dims=([1], [0]))  # [r1, kh, kw, in]
    return torch.tensordot(a, x, dims=([0], [0])).permute(0, 3, 1, 2)  # [out, in, kh, kw]


def lycoris_delta(f: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """The documented merge of each LyCORIS layout (A1111 network_hada / network_lokr / network_lora)."""
    if "hada_w1_a" in f:
        halves = [tucker(f[f"hada_t{i}"], f[f"hada_w{i}_a"], f[f"hada_w{i}_b"]) if f"hada_t{i}" in f
                  else f[f"hada_w{i}_a"] @ f[f"hada_w{i}_b"] for i in (1, 2)]
        return (halves[0].reshape(shape) * halves[1].reshape(shape))
    if "lora_mid" in f:
        return tucker(f["lora_mid"], f["lora_up"].reshape(shape[0], -1).T,
                      f["lora_down"].reshape(f["lora_down"].shape[0], -1))
    if "lora_up" in f:
        return (f["lora_up"].reshape(shape[0], -1) @ f["lora_down"].reshape(f["lora_down"].shape[0], -1)).reshape(shape)
    w1 = f["lokr_w1"] if "lokr_w1" in f else f["lokr_w1_a"] @ f["lokr_w1_b"]
    if "lokr_w2" in f:
        w2 = f["lokr_w2"]
    elif "lokr_t2" in f:
        w2 = tucker(f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"])
    else:
        w2 = f["lokr_w2_a"] @ f["lokr_w2_b"]
    return kron(w1, w2).reshape(shape)


def test_lycoris_loha_and_lokr_merge_by_their_formulas(sd1_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    weights = {n: m.weight for n, m in [*pipe.unet.named_modules(), *pipe.text_encoder.named_modules()]
               if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)}
    g = torch.Generator().manual_seed(7)
    attn, res, te = "down_blocks.1.attentions.0", "down_blocks.1.resnets.0", "text_model.encoder.layers.1"
    # module → (factors, alpha in the file, scale A1111's rules give: alpha / rank, 1 without alpha or rank)
    cases = {
        f"{attn}.transformer_blocks.0.attn1.to_q": (loha_factors(weights[f"{attn}.transformer_blocks.0.attn1.to_q"]
                                                                 .shape, 4, g), 3.0, 3.0 / 4),
        f"{res}.conv1": (loha_factors(weights[f"{res}.conv1"].shape, 3, g), None, 1.0),  # conv, w1_b flattened
        f"{res}.conv2": (loha_factors(weights[f"{res}.conv2"].shape, 2, g, tucker=True), 1.0, 1.0 / 2),
        f"{te}.mlp.fc1": (loha_factors(weights[f"{te}.mlp.fc1"].shape, 2, g), 0.0, 1.0),  # alpha 0 = rank
        f"{attn}.transformer_blocks.0.ff.net.2": (
            lokr_factors(weights[f"{attn}.transformer_blocks.0.ff.net.2"].shape, 4, g), 5.0, 1.0),  # alpha unused
        f"{attn}.transformer_blocks.0.attn2.to_k": (
            lokr_factors(weights[f"{attn}.transformer_blocks.0.attn2.to_k"].shape, 4, g, "low", "low", rank=2),
            1.0, 1.0 / 2),
        f"{attn}.transformer_blocks.0.attn1.to_v": (
            lokr_factors(weights[f"{attn}.transformer_blocks.0.attn1.to_v"].shape, 2, g, "low", rank=3), 1.5,
            1.5 / 3),  # only w1 factorised: rank of w1_b
        "down_blocks.0.resnets.0.conv1": (lokr_factors(weights["down_blocks.0.resnets.0.conv1"].shape, 4, g),
                                          None, 1.0),  # w2 a full 3×3 conv
        "down_blocks.0.resnets.0.conv2": (lokr_factors(weights["down_blocks.0.resnets.0.conv2"].shape, 2, g,
                                                       w2="tucker", rank=2), 1.0, 1.0 / 2),
        "down_blocks.0.resnets.1.conv1": (lokr_factors(weights["down_blocks.0.resnets.1.conv1"].shape, 4, g,
                                                       w2="low", rank=2), 4.0, 2.0),  # w2_b flattened
        "down_blocks.0.resnets.1.conv2": ({"lora_up": torch.randn(32, 4, 1, 1, generator=g) * 0.3,
                                           "lora_mid": torch.randn(4, 4, 3, 3, generator=g) * 0.3,
                                           "lora_down": torch.randn(4, 32, 1, 1, generator=g) * 0.3}, 2.0, 0.5),
    }
    keys = {name: ("lora_te_" if name.startswith("text_model") else "lora_unet_") + name.replace(".", "_")
            for name in cases}
    path = save_lycoris(tmp_path / "lycoris.safetensors", {keys[n]: f for n, (f, _, _) in cases.items()},
                        {keys[n]: a for n, (_, a, _) in cases.items()})
    before = {n: w.detach().clone() for n, w in weights.items()}
    assert load_lora(pipe, path, WEIGHT).keys == len(cases)
    for name, w in weights.items():
        if name not in cases:
            assert torch.equal(w, before[name]), name
            continue
        factors, _, scale = cases[name]
        expected = before[name] + WEIGHT * scale * lycoris_delta(factors, tuple(w.shape))
        assert max_rel_err(w, expected) <= MODULE_TOL, name
        assert max_rel_err(w, before[name]) > 0.05, name  # a real change
    unload_loras(pipe)
    assert all(torch.equal(weights[n], before[n]) for n in weights)


# ------------------------------------------------------------------------------------- accelerate


def winograd_everywhere(pipe, monkeypatch) -> int:
    """As in test_fast: the tiny models are narrower than where Winograd pays, so take it everywhere."""
    from ldm_kernels import winograd

    monkeypatch.setattr(winograd, "pays", lambda *shape: True)
    return use_winograd(pipe.unet, pipe.vae, min_channels=1)


def test_lora_then_accelerate_and_accelerate_then_lora(sd1_folder, locon, monkeypatch):
    path, expected, _ = locon
    early = StableDiffusion.from_pretrained(sd1_folder)
    load_lora(early, path, WEIGHT)
    assert winograd_everywhere(early, monkeypatch) > 10
    accelerate(early, compile=False)
    assert np.abs(image(early) - expected).max() <= 2

    late = StableDiffusion.from_pretrained(sd1_folder)
    winograd_everywhere(late, monkeypatch)
    accelerate(late, compile=False)
    fused = states(late)
    assert any(k.endswith("to_qkv.weight") for k in fused["unet"])
    assert any(k.endswith("winograd_weight") for k in fused["unet"])
    load_lora(late, path, WEIGHT)
    assert np.abs(image(late) - expected).max() <= 2
    unload_loras(late)
    assert_same_bits(states(late), fused)  # fused projections and Winograd filters back, bit for bit

    unload_loras(early)  # loaded before accelerate, unloaded after it
    assert_same_bits(states(early), fused)
    assert sum(isinstance(m, WinogradConv2d) for m in early.unet.modules()) > 10


@pytest.mark.slow  # an aot_eager compile of the UNet; LoRA with accelerate uncompiled stays in the default run
def test_lora_on_a_compiled_pipeline(sd1_folder, locon, monkeypatch):
    """A pipeline compiled with aot_eager: the graphs inductor would compile, without its code generation (minutes
    here). Under inductor's CPU freezing, which `accelerate` turns on, the weights become constants of the compiled
    code and a weight changed in place is not seen until the code is dropped (checked by hand on a small module);
    so with freezing on, loading and unloading drop the compiled code (torch._dynamo.reset), and only then."""
    import torch._dynamo
    import torch._inductor.config

    path, expected, _ = locon
    real_reset, resets = torch._dynamo.reset, []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: (resets.append(1), real_reset())[1])
    real_reset()
    pipe = accelerate(StableDiffusion.from_pretrained(sd1_folder), backend="aot_eager")
    with torch._inductor.config.patch(freezing=False):  # (pytest's monkeypatch breaks torch's config modules)
        load_lora(pipe, path, WEIGHT)
        unload_loras(pipe)
    assert resets == []  # graphs that read the parameters (CUDA graphs included) see in-place writes
    with torch._inductor.config.patch(freezing=True):
        load_lora(pipe, path, WEIGHT)
        assert len(resets) == 1
        assert np.abs(image(pipe) - expected).max() <= 2  # compiled with the merged weights
        unload_loras(pipe)
        assert len(resets) == 2
    real_reset()


# -------------------------------------------------------------------------------------- bad input


def test_a_lora_for_another_family_is_one_clear_error(sd1_folder, sdxl_folder, tmp_path):
    sd1 = StableDiffusion.from_pretrained(sd1_folder)
    path = save_kohya(tmp_path / "sd15-style.safetensors", spec_for(sd1, "sd1", convs=False), xl=False)
    xl = StableDiffusion.from_pretrained(sdxl_folder)
    before = states(xl)
    with pytest.raises(LoadError) as error:
        load_lora(xl, path)
    message = str(error.value)
    assert str(path) in message and "another model family" in message
    key, lora_shape, model_shape = re.search(r"(lora_unet_\w+): LoRA \(([\d, ]+)\) vs model \(([\d, ]+)\)",
                                             message).groups()
    with safe_open(str(path), "pt") as f:
        up, down = f.get_slice(f"{key}.lora_up.weight").get_shape(), f.get_slice(f"{key}.lora_down.weight").get_shape()
    assert lora_shape == ", ".join(map(str, [up[0], *down[1:]]))
    module = key.removeprefix("lora_unet_")
    weight = next(m.weight for n, m in xl.unet.named_modules() if n.replace(".", "_") == module)
    assert model_shape == ", ".join(map(str, weight.shape))
    assert_same_bits(states(xl), before)  # nothing merged
    assert getattr(xl, "loras", None) in (None, [])


def test_keys_for_modules_the_model_lacks_are_named(sd1_folder, sdxl_folder, tmp_path):
    xl = StableDiffusion.from_pretrained(sdxl_folder)
    xl_lora = save_kohya(tmp_path / "xl.safetensors", spec_for(xl, "sdxl", convs=False), xl=True)
    with pytest.raises(LoadError, match=r"lora_te2_text_model_encoder_layers_0_\w+ \(this model has no "
                                        r"text_encoder_2\)"):
        load_lora(StableDiffusion.from_pretrained(sd1_folder), xl_lora)

    sd1 = StableDiffusion.from_pretrained(sd1_folder)
    spec = spec_for(sd1, "sd1", convs=False)
    tensors = {f"{kohya_key(c, n, False)}.{p}.weight": f[p] for (c, n), f in spec.items() for p in ("lora_down",
                                                                                                  "lora_up")}
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_down.weight"] = torch.zeros(4, 32)
    tensors["lora_unet_down_blocks_9_attentions_0_proj_in.lora_up.weight"] = torch.zeros(32, 4)
    tensors["text_projection.lora_A.weight"] = torch.zeros(4, 64)  # no naming ldm knows
    tensors["lora_unet_mid_block_attentions_0_proj_out.dora_scale"] = torch.ones(1, 64)
    tensors["lora_unet_mid_block_resnets_0_conv1.lora_down.weight"] = torch.zeros(4, 64, 3, 3)  # no lora_up
    tensors |= {"lora_unet_mid_block_resnets_0_conv2.lokr_w1_a": torch.zeros(4, 2),  # w1_a @ w1_b cannot be
                "lora_unet_mid_block_resnets_0_conv2.lokr_w1_b": torch.zeros(3, 4),  # formed (2 vs 3)
                "lora_unet_mid_block_resnets_0_conv2.lokr_w2": torch.zeros(16, 16, 3, 3)}
    save_file(tensors, str(tmp_path / "odd.safetensors"))
    before = states(sd1)
    with pytest.raises(LoadError) as error:
        load_lora(sd1, tmp_path / "odd.safetensors")
    message = str(error.value)
    for needle in ("lora_unet_down_blocks_9_attentions_0_proj_in", "text_projection.lora_A.weight",
                   "lora_unet_mid_block_attentions_0_proj_out.dora_scale (DoRA)",
                   "lora_unet_mid_block_resnets_0_conv1.lora_down.weight",
                   "lora_unet_mid_block_resnets_0_conv2: its factors do not compose"):
        assert needle in message
    assert_same_bits(states(sd1), before)  # checked whole before anything is merged


def test_truncated_and_pickled_files_are_refused(sd1_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    path = save_kohya(tmp_path / "cut.safetensors", spec_for(pipe, "sd1", convs=False), xl=False)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(LoadError, match=r"(?s)cut\.safetensors is not a readable safetensors file .*truncated"):
        load_lora(pipe, path)

    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"lora_unet_x.lora_down.weight": Payload()}))
    for where in (tmp_path / "evil.pt", str(tmp_path / "evil.pt")):
        with pytest.raises(LoadError, match="pickle checkpoint; ldm never unpickles"):
            load_lora(pipe, where)
    assert not marker.exists()


def test_lora_hash_is_a1111s_and_ignores_the_header(sd1_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    spec = spec_for(pipe, "sd1", convs=False)
    path = save_kohya(tmp_path / "h.safetensors", spec, xl=False)
    raw = path.read_bytes()
    header = int.from_bytes(raw[:8], "little")
    assert lora_hash(path) == hashlib.sha256(raw[8 + header:]).hexdigest()[:12]
    with safe_open(str(path), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    save_file(tensors, str(tmp_path / "renamed.safetensors"), metadata={"ss_output_name": "something else"})
    assert lora_hash(tmp_path / "renamed.safetensors") == lora_hash(path)  # metadata is not hashed
    key = next(iter(tensors))
    tensors[key] = tensors[key] + 1
    save_file(tensors, str(tmp_path / "changed.safetensors"), metadata={"ss_network_module": "networks.lora"})
    assert lora_hash(tmp_path / "changed.safetensors") != lora_hash(path)


def test_find_lora_by_name_and_path(tmp_path, monkeypatch):
    monkeypatch.setenv("LDM_WEIGHTS", str(tmp_path / "store"))
    folder = loras_dir()
    assert folder == tmp_path / "store" / "loras"
    folder.mkdir(parents=True)
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(folder / "detail.safetensors"))
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(folder / "style.safetensors"))
    outside = tmp_path / "elsewhere.safetensors"
    save_file({"lora_unet_x.alpha": torch.tensor(1.0)}, str(outside))

    for name in ("detail", "detail.safetensors"):
        assert find_lora(name) == folder / "detail.safetensors"
        assert find_lora(name, allow_paths=False) == folder / "detail.safetensors"
    assert find_lora(str(outside)) == outside
    for bad in (str(outside), "../elsewhere", "sub/detail", "..", "a\\b", "/etc/passwd"):
        with pytest.raises(InputError, match="not a path"):
            find_lora(bad, allow_paths=False)
    with pytest.raises(InputError, match=r"'missing'.*it holds detail, style"):
        find_lora("missing")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match="not a path"):
        find_lora("elsewhere.safetensors/", allow_paths=False)
    with pytest.raises(InputError, match="'elsewhere.safetensors': not in"):
        find_lora("elsewhere.safetensors", allow_paths=False)  # a file in the working directory is not in the folder


def test_peft_metadata_alpha_pattern_and_alpha_keys(sd1_folder, tmp_path):
    """PEFT files: alpha from `<module>.alpha` keys when the file has them, else from the header's
    lora_adapter_metadata, module by module (alpha_pattern); checked against the kohya file of the same factors."""
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    spec = spec_for(pipe, "sd1", convs=True, seed=4)
    load_lora(pipe, save_kohya(tmp_path / "k.safetensors", spec, xl=False, dtype=torch.float32), WEIGHT)
    expected = states(pipe)
    unload_loras(pipe)

    peft = save_peft(tmp_path / "p.safetensors", spec)
    with safe_open(str(peft), "pt") as f:
        meta = json.loads(f.metadata()["lora_adapter_metadata"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    assert meta["unet.alpha_pattern"]  # the convolutions' alpha differs from the linears'
    load_lora(pipe, peft, WEIGHT)
    assert all(close(v, expected[c][k]) for c, s in states(pipe).items() for k, v in s.items())
    unload_loras(pipe)

    for (component, name), f in spec.items():
        tensors[f"{component}.{name}.alpha"] = torch.tensor(float(f["alpha"]))
    save_file(tensors, str(tmp_path / "keys.safetensors"))  # no metadata: the alpha keys alone
    load_lora(pipe, tmp_path / "keys.safetensors", WEIGHT)
    assert all(close(v, expected[c][k]) for c, s in states(pipe).items() for k, v in s.items())
