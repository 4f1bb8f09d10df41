"""ControlNet single files (ldm.loading.controlnets) against diffusers: the original (lllyasviel/ControlNet) names with
and without the `control_model.` prefix, and diffusers' names without a config.json, for SD 1.x, SD 2.x and SDXL; the
SDXL "mid"/"small" layouts (down blocks without attention); the files that are refused.

The original-layout files are written from the tiny ControlNet folders by ldm's key table run backwards
(`controlnet_rules` → `to_single_file`) and checked independently by diffusers' own reader,
`ControlNetModel.from_single_file(path, config=<the folder>)`, which must give back every tensor of the folder. Then
ldm loads the file: its residuals against diffusers' ControlNetModel on the folder, and a whole image with the file
equal to the image with the folder (which tests/test_controlnet.py holds to diffusers' pipelines)."""

import json
import pickle
import shutil

import numpy as np
import pytest
import torch
from conftest import MODULE_TOL, max_rel_err
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from official import FOLDER_FIXTURES
from safetensors.torch import load_file, save_file
from test_controlnet import hint, make_controlnet

from ldm.errors import LoadError
from ldm.loading.controlnets import PREFIX, controlnet_rules
from ldm.loading.files import read_config
from ldm.loading.single_file import to_single_file
from ldm.networks.controlnet import ControlNetConfig
from ldm.pipelines.request import Control
from ldm.pipelines.stable_diffusion import StableDiffusion

PROMPT = "a lighthouse on a cliff, depth map"

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py) ldm and diffusers compared in one process

FAMILIES = ["sd1", "sd21", "sdxl"]
SEEDS = {"sd1": 11, "sd21": 12, "sdxl": 13}


@pytest.fixture(scope="module")
def made(request, tmp_path_factory):
    """`made(family)`: (the tiny model folder, its tiny ControlNet folder, the model as a pipeline), once each."""
    cache = {}

    def get(family):
        if family not in cache:
            folder = request.getfixturevalue(FOLDER_FIXTURES[family])
            net = make_controlnet(folder, tmp_path_factory.mktemp(f"cn-{family}") / "controlnet", SEEDS[family])
            cache[family] = folder, net, StableDiffusion.from_pretrained(folder)
        return cache[family]

    return get


def folder_state(net_folder) -> dict[str, torch.Tensor]:
    return load_file(net_folder / "diffusion_pytorch_model.safetensors")


def write_original(net_folder, path, prefix=PREFIX, edit=None):
    """The folder's ControlNet as an original-layout single file (ldm's table backwards), `edit(tensors)` applied."""
    cfg = read_config(net_folder / "config.json", ControlNetConfig.from_diffusers)
    tensors = to_single_file(controlnet_rules(cfg, prefix), folder_state(net_folder))
    if edit is not None:
        edit(tensors)
    save_file(tensors, str(path))
    return path


def inputs(net: ControlNetModel, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, image = torch.randn(2, 4, 8, 8, generator=g), torch.rand(2, 3, 64, 64, generator=g)
    context = torch.randn(2, 77, net.config.cross_attention_dim, generator=g)
    if net.config.addition_embed_type != "text_time":
        return x, context, image, {}
    pooled = net.config.projection_class_embeddings_input_dim - 6 * net.config.addition_time_embed_dim
    text_embeds = torch.randn(2, pooled, generator=g)
    time_ids = torch.tensor([[64.0, 64.0, 0.0, 0.0, 64.0, 64.0]] * 2)
    return x, context, image, {"text_embeds": text_embeds, "time_ids": time_ids}


def assert_residuals_equal(ours, net_folder):
    """ldm's ControlNet against diffusers' ControlNetModel on the folder, at conditioning scale 1."""
    reference = ControlNetModel.from_pretrained(net_folder).eval()
    x, context, image, added = inputs(reference)
    with torch.no_grad():
        down, mid = reference(x, 500, context, image, added_cond_kwargs=added or None, return_dict=False)
        our_down, our_mid = ours(x, torch.tensor(500.0), context, image, added.get("text_embeds"),
                                 added.get("time_ids"))
    assert len(our_down) == len(down)
    for a, e in zip([*our_down, our_mid], [*down, mid], strict=True):
        assert max_rel_err(a, e) <= MODULE_TOL
        assert e.abs().max() > 1e-3  # the zero convolutions were moved: residuals are not zero


def image(pipe, controls, steps=2):
    out = pipe(PROMPT, steps=steps, seed=5, sampler="euler", controls=controls).images[0]
    return np.asarray(out).astype(np.int16)


# ------------------------------------------------------------------------------ the original names


@pytest.mark.parametrize("family, prefix", [("sd1", PREFIX), ("sd1", ""), ("sd21", PREFIX), ("sdxl", PREFIX),
                                            ("sdxl", "")])
def test_diffusers_reads_the_original_file_back(made, tmp_path, family, prefix):
    """The key table checked by diffusers' own converter (`convert_controlnet_checkpoint`): every tensor of the
    folder back. Its converter does not map SDXL's `label_emb` (its table has the entry, `convert_controlnet_checkpoint`
    does not use it), so diffusers leaves `add_embedding` as initialised: those four are checked against that table."""
    _, net_folder, _ = made(family)
    path = write_original(net_folder, tmp_path / "control_v11p_canny.safetensors", prefix)
    ref = ControlNetModel.from_single_file(str(path), config=str(net_folder), local_files_only=True,
                                           low_cpu_mem_usage=False)
    actual, expected = ref.state_dict(), folder_state(net_folder)
    assert set(actual) == set(expected)
    differ = sorted(k for k in expected if not torch.equal(actual[k], expected[k]))
    if family != "sdxl":
        assert differ == []
        return
    table = DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"]
    assert differ == sorted(table)
    tensors = load_file(path)
    assert all(torch.equal(tensors[prefix + table[k]], expected[k]) for k in differ)


@pytest.mark.parametrize("family, prefix", [("sd1", PREFIX), ("sd1", ""), ("sd21", PREFIX), ("sdxl", PREFIX),
                                            ("sdxl", "")])
def test_original_file_equals_the_folder(made, tmp_path, family, prefix):
    """ldm reads the file (its config from the shapes, heads and upcast the model's): its residuals against
    ControlNetModel on the folder, and an image with the file equal to the image with the folder."""
    _, net_folder, pipe = made(family)
    path = write_original(net_folder, tmp_path / f"control_{family}_canny.safetensors", prefix)
    ours = pipe.controlnet(str(path))
    assert ours.controlnet_config == read_config(net_folder / "config.json", ControlNetConfig.from_diffusers)
    assert_residuals_equal(ours, net_folder)
    with_file = image(pipe, [Control(str(path), hint(1), weight=0.9)])
    assert np.array_equal(with_file, image(pipe, [Control(str(net_folder), hint(1), weight=0.9)]))
    assert np.abs(with_file - image(pipe, [])).max() > 10  # the control acts


def test_an_fp16_file_is_read_in_the_models_dtype(made, tmp_path):
    """`control_v11f1p_sd15_depth_fp16.safetensors`: half-precision tensors, cast to the model's dtype on reading."""
    _, net_folder, pipe = made("sd1")
    path = write_original(net_folder, tmp_path / "control_v11f1p_sd15_depth_fp16.safetensors",
                          edit=lambda t: t.update({k: v.half() for k, v in t.items()}))
    state = pipe.controlnet(str(path)).state_dict()
    expected = folder_state(net_folder)
    assert set(state) == set(expected)
    assert all(state[k].dtype == torch.float32 and torch.equal(state[k], v.half().float()) for k, v in expected.items())


def test_a_full_training_checkpoint_reads_only_its_controlnet(made, tmp_path):
    """lllyasviel/ControlNet's `control_sd15_*` checkpoints hold the Stable Diffusion model beside `control_model.*`
    (and its training buffers): that model is left unread; a key of neither is named."""
    _, net_folder, pipe = made("sd1")

    def beside(tensors):
        tensors |= {"model.diffusion_model.out.2.weight": torch.zeros(4, 32, 3, 3), "betas": torch.zeros(1000),
                    "first_stage_model.decoder.conv_in.bias": torch.zeros(64),
                    "cond_stage_model.transformer.text_model.final_layer_norm.bias": torch.zeros(64)}

    path = write_original(net_folder, tmp_path / "control_sd15_canny.safetensors", edit=beside)
    assert_residuals_equal(pipe.controlnet(str(path)), net_folder)
    stray = write_original(net_folder, tmp_path / "stray.safetensors",
                           edit=lambda t: t.update({"other.x": torch.zeros(3)}))
    with pytest.raises(LoadError, match="keys no ControlNet module reads: other.x"):
        pipe.controlnet(str(stray))


def test_a_missing_or_unexpected_key_is_named(made, tmp_path):
    _, net_folder, pipe = made("sd1")
    missing = write_original(net_folder, tmp_path / "missing.safetensors",
                             edit=lambda t: t.pop("control_model.zero_convs.3.0.weight"))
    with pytest.raises(LoadError, match=r"missing keys: control_model\.zero_convs\.3\.0\.weight"):
        pipe.controlnet(str(missing))
    extra = write_original(net_folder, tmp_path / "extra.safetensors", prefix="",
                           edit=lambda t: t.update({"zero_convs.12.0.weight": torch.zeros(64, 64, 1, 1)}))
    with pytest.raises(LoadError, match=r"keys no ControlNet module reads: zero_convs\.12\.0\.weight"):
        pipe.controlnet(str(extra))
    named = tmp_path / "diffusers_named.safetensors"  # diffusers' names: load_module names it
    save_file({k: v for k, v in folder_state(net_folder).items() if k != "controlnet_mid_block.bias"}, str(named))
    with pytest.raises(LoadError, match=r"missing keys: controlnet_mid_block\.bias"):
        pipe.controlnet(str(named))


def test_a_shuffle_file_pools_its_residuals(made, tmp_path):
    """The shuffle ControlNet's global pooling is in no shape: a file named `…shuffle…` pools (A1111's and ComfyUI's
    convention; diffusers' folder says `global_pool_conditions`)."""
    _, net_folder, pipe = made("sd1")
    path = write_original(net_folder, tmp_path / "control_v11e_sd15_shuffle.safetensors")
    assert pipe.controlnet(str(path)).controlnet_config.global_pool_conditions
    other = write_original(net_folder, tmp_path / "control_v11p_sd15_canny.safetensors")
    assert not pipe.controlnet(str(other)).controlnet_config.global_pool_conditions


# ------------------------------------------------------------------------ diffusers' names, no config


@pytest.mark.parametrize("family, name", [("sd1", "diffusion_pytorch_model.safetensors"),
                                          ("sdxl", "diffusers_xl_canny_full.safetensors")])
def test_a_diffusers_named_file_without_config(made, tmp_path, family, name):
    """A diffusers-named file alone (lllyasviel/sd_control_collection's `diffusers_xl_*`, a renamed folder file):
    the config from its shapes; with its folder's config.json beside it, that config."""
    _, net_folder, pipe = made(family)
    path = tmp_path / name
    shutil.copy(net_folder / "diffusion_pytorch_model.safetensors", path)
    ours = pipe.controlnet(str(path))
    assert ours.controlnet_config == read_config(net_folder / "config.json", ControlNetConfig.from_diffusers)
    assert_residuals_equal(ours, net_folder)
    if name.startswith("diffusion_pytorch_model"):  # a folder's file, given alone: its config.json is read
        config = json.loads((net_folder / "config.json").read_text()) | {"global_pool_conditions": True}
        (tmp_path / "config.json").write_text(json.dumps(config))
        pipe.controlnets.clear()
        assert pipe.controlnet(str(path)).controlnet_config.global_pool_conditions


# --------------------------------------------------------------------------------------- refusals


def test_a_controlnet_of_another_family_names_both(made, tmp_path):
    _, sd1_net, sd1 = made("sd1")
    _, xl_net, xl = made("sdxl")
    for pipe, net, theirs, mine in ((xl, sd1_net, "cross-attention 64", "SDXL base"),
                                    (sd1, xl_net, "size embedding 176", "SD 1.x")):
        path = write_original(net, tmp_path / "control.safetensors")
        with pytest.raises(LoadError, match="it was made for another model") as e:
            pipe.controlnet(str(path))
        message = str(e.value)
        assert theirs in message and mine in message and "widths" in message.split("than this")[1], message
        pipe.controlnets.clear()


class Boom:
    """Unpickling this writes a file: if it appears, something unpickled."""

    path = None

    def __reduce__(self):
        return open, (str(self.path), "w")


@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".bin"])
def test_a_pickle_is_refused_unopened(made, tmp_path, suffix):
    _, _, pipe = made("sd1")
    Boom.path = tmp_path / "unpickled"
    path = tmp_path / f"control_v11p_sd15_canny{suffix}"
    path.write_bytes(pickle.dumps({"state_dict": Boom()}))
    with pytest.raises(LoadError, match="ldm never unpickles"):
        pipe.controlnet(str(path))
    assert not Boom.path.exists()


@pytest.mark.parametrize("keys, message", [
    ({"lllite_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q.down.0.weight": 1}, "ControlNet-LLLite"),
    ({"lora_controlnet": 1, "input_hint_block.0.weight": 1}, "Control-LoRA"),
    ({"difference": 1, "control_model.input_hint_block.0.weight": 1}, "'difference' ControlNet"),
    ({"adapter.body.0.block1.weight": 1}, "its keys are not a ControlNet's"),
])
def test_other_architectures_are_refused_by_name(made, tmp_path, keys, message):
    _, _, pipe = made("sd1")
    path = tmp_path / "control.safetensors"
    save_file({k: torch.zeros(n) for k, n in keys.items()}, str(path))
    with pytest.raises(LoadError, match=message):
        pipe.controlnet(str(path))


# ---------------------------------------------------------------------- SDXL "mid" and "small" layouts

# diffusers/controlnet-canny-sdxl-1.0-mid and -small keep fewer transformers than the base's encoder: "mid" has a
# transformer only at the last level (its down_blocks.1 attention has no transformer blocks: the `norm` that diffusers'
# single-file detection looks for), "small" none at all (no attention at level 1, none of depth > 0 anywhere, the mid
# block's included: ComfyUI's SDXL_small_cnet has transformer depth 0 everywhere and no context width to read).
# Tiny analogues on the tiny SDXL base (levels 64/128/128, depths 1/2/3), and one whose level 1 is a plain DownBlock2D
# where the base has attention, with transformers elsewhere.
VARIANTS = {
    "mid": {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "transformer_layers_per_block": [0, 0, 1]},
    "small": {"down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
              "transformer_layers_per_block": [0, 0, 0]},
    "no-attention-level": {"down_block_types": ["DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D"],
                           "transformer_layers_per_block": [1, 1, 2]},
}


@pytest.fixture(scope="module")
def variants(sdxl_folder, tmp_path_factory):
    root, out = tmp_path_factory.mktemp("cn-xl-variants"), {}
    base = ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(sdxl_folder / "unet")).config
    for i, (name, change) in enumerate(VARIANTS.items()):
        torch.manual_seed(20 + i)
        net = ControlNetModel.from_config({k: v for k, v in base.items() if not k.startswith("_")} | change)
        with torch.no_grad():
            for key, p in net.named_parameters():
                p.add_(torch.randn_like(p) * (0.3 if "controlnet_" in key else 0.02))
        net.save_pretrained(root / name)
        out[name] = root / name
    return out


def attention_layout(cfg: ControlNetConfig) -> list:
    """Per level its block type and, with attention, its transformer depth (the last one is the mid block's too)."""
    u = cfg.unet
    return [(kind, depth if kind.startswith("CrossAttn") else None)
            for kind, depth in zip(u.down_block_types, u.transformer_depth, strict=True)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_sdxl_mid_and_small_layouts(made, variants, tmp_path, variant):
    """Module parity with ControlNetModel for each layout: as a folder, as an original-layout file (its config
    inferred: a level's attention without transformer blocks, no cross-attention at all) and as a diffusers-named
    file; the original file read back by diffusers too."""
    _, _, xl = made("sdxl")
    net_folder = variants[variant]
    expected_cfg = read_config(net_folder / "config.json", ControlNetConfig.from_diffusers)
    original = write_original(net_folder, tmp_path / f"xl_{variant}.safetensors")
    named = tmp_path / f"diffusers_xl_canny_{variant}.safetensors"
    shutil.copy(net_folder / "diffusion_pytorch_model.safetensors", named)
    for source in (net_folder, original, named):
        ours = xl.controlnet(str(source))
        assert attention_layout(ours.controlnet_config) == attention_layout(expected_cfg)
        assert_residuals_equal(ours, net_folder)
    ref = ControlNetModel.from_single_file(str(original), config=str(net_folder), local_files_only=True,
                                           low_cpu_mem_usage=False)
    expected = folder_state(net_folder)
    assert sorted(k for k, v in ref.state_dict().items() if not torch.equal(v, expected[k])) == \
        sorted(DIFFUSERS_TO_LDM_MAPPING["controlnet"]["addition_embed_type"])  # (as above: label_emb unmapped)
