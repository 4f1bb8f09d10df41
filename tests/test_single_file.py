"""Original single-file checkpoints: ldm's converter checked by diffusers' own single-file loader, the
inferred configs and key tables, and images from each family's file against diffusers on its folder."""

import dataclasses
import json

import diffusers
import numpy as np
import pytest
import torch
from conftest import assert_images_close
from official import FOLDER_FIXTURES, LDM_FAMILY, folder_components, write_single_file
from PIL import Image
from safetensors.torch import load_file, save_file
from test_image_tasks import picture, rectangle_mask

from ldm.loading.families import SPECS
from ldm.loading.files import read_safetensors
from ldm.loading.single_file import component_rules, read_single_file, write_single_file_state
from ldm.networks.clip import CLIPTextConfig, CLIPTextModel
from ldm.networks.unet import UNet, UNetConfig
from ldm.networks.vae import VAE, VAEConfig
from ldm.pipelines.stable_diffusion import StableDiffusion, StableDiffusionXL
from ldm_cli.main import main

FAMILY_NAMES = ["sd1", "sd21", "sd2-inpaint", "sdxl", "sdxl-refiner"]
DIFFUSERS_PIPELINES = {"sd1": "StableDiffusionPipeline", "sd21": "StableDiffusionPipeline",
                       "sd2-inpaint": "StableDiffusionInpaintPipeline", "sdxl": "StableDiffusionXLPipeline",
                       "sdxl-refiner": "StableDiffusionXLImg2ImgPipeline"}
PROMPT = "a red bicycle leaning on a blue wall"
# ldm and diffusers compared in one process at one thread (conftest.py): at two, the sd1 image came 3/255 from
# diffusers' on an AMX Xeon VM (the two threads' partial sums are added in another order), within the 2/255 at one
pytestmark = pytest.mark.usefixtures("one_thread")


def folder_of(request, family):
    return request.getfixturevalue(FOLDER_FIXTURES[family])


def diffusers_pipeline(family, folder):
    extra = {} if family.startswith("sdxl") else {"safety_checker": None, "feature_extractor": None,
                                                  "requires_safety_checker": False}
    pipe = getattr(diffusers, DIFFUSERS_PIPELINES[family]).from_pretrained(folder, **extra)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_diffusers_reads_the_converters_file_back(request, single_file, family):
    """The converter (ldm's tables run backwards) checked independently: diffusers' from_single_file on the
    written file reproduces every tensor of the folder exactly."""
    folder = folder_of(request, family)
    cls = getattr(diffusers, DIFFUSERS_PIPELINES[family])
    extra = {} if family.startswith("sdxl") else {"safety_checker": None, "feature_extractor": None}
    pipe = cls.from_single_file(str(single_file(family)), config=str(folder), local_files_only=True, **extra)
    _, states = folder_components(folder)
    for component, expected in states.items():
        actual = {k if k.startswith(("text_model.", "text_projection")) or not component.startswith("text")
                  else "text_model." + k: v for k, v in getattr(pipe, component).state_dict().items()}
        actual = {k: v for k, v in actual.items() if not k.endswith("position_ids")}
        assert set(actual) == set(expected), component
        assert all(torch.equal(actual[k], expected[k]) for k in expected), component


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_configs_inferred_from_shapes_match_the_folder(request, single_file, family):
    folder = folder_of(request, family)
    checkpoint = read_single_file(read_safetensors(single_file(family)))
    assert checkpoint.family.key == LDM_FAMILY[family]
    configs, _ = folder_components(folder)
    # the native size is not in a file (the family's is used); everything else must come out the same
    unet = UNetConfig.from_diffusers(checkpoint.configs["unet"])
    assert dataclasses.replace(unet, sample_size=8) == UNetConfig.from_diffusers(configs["unet"])
    vae = VAEConfig.from_diffusers(checkpoint.configs["vae"])
    assert dataclasses.replace(vae, sample_size=configs["vae"]["sample_size"]) == VAEConfig.from_diffusers(
        configs["vae"])
    for tower in ("text_encoder", "text_encoder_2"):
        if tower in configs:
            assert CLIPTextConfig.from_transformers(checkpoint.configs[tower]) == CLIPTextConfig.from_transformers(
                configs[tower])


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_every_key_maps_one_to_one(request, single_file, family):
    """Each ldm parameter has one rule; each file key is read by one rule (the three slices of a fused
    OpenCLIP in_proj by exactly q, k and v) or ignored with a stated reason."""
    checkpoint = read_single_file(read_safetensors(single_file(family)))
    rules = component_rules(checkpoint.family, checkpoint.configs)
    builders = {"unet": lambda c: UNet(UNetConfig.from_diffusers(c)), "vae": lambda c: VAE(VAEConfig.from_diffusers(c)),
                "text_encoder": lambda c: CLIPTextModel(CLIPTextConfig.from_transformers(c)),
                "text_encoder_2": lambda c: CLIPTextModel(CLIPTextConfig.from_transformers(c))}
    readers: dict[str, list] = {}
    for component, table in rules.items():
        with torch.device("meta"):
            expected = set(builders[component](checkpoint.configs[component]).state_dict())
        ours = [r.ours for r in table]
        assert len(ours) == len(set(ours)) and set(ours) == expected, component
        for r in table:
            readers.setdefault(r.theirs, []).append(r.op)
    for key, ops in readers.items():
        assert ops == [None] or ops == ["conv1x1"] or ops == ["T"] or sorted(ops) == ["k", "q", "v"], (key, ops)
    file_keys = set(load_file(str(single_file(family))))
    assert set(readers) | set(checkpoint.ignored) == file_keys
    assert not set(readers) & set(checkpoint.ignored)
    if family == "sd21":  # the 24th OpenCLIP block is present in the file and ignored by its rule
        last = checkpoint.configs["text_encoder"]["num_hidden_layers"]
        assert f"cond_stage_model.model.transformer.resblocks.{last}.attn.in_proj_weight" in checkpoint.ignored


TASKS = {  # family → keyword arguments of both pipelines (the size is given: the tiny folders' native size is 64)
    "sd1": {},
    "sd21": {},
    "sd2-inpaint": {"image": picture(64, 64, 3), "mask": rectangle_mask(64, 64, (8, 16, 48, 56))},
    "sdxl": {},
    "sdxl-refiner": {"image": picture(64, 64, 4)},
}


@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_single_file_image_matches_diffusers_on_the_folder(request, single_file, family, tmp_path):
    folder = folder_of(request, family)
    task = TASKS[family]
    args = ["--steps", "5", "--seed", "21", "--width", "64", "--height", "64"]
    if "image" in task:
        task["image"].save(tmp_path / "image.png")
        args += ["--image", str(tmp_path / "image.png")]
    if "mask" in task:
        task["mask"].save(tmp_path / "mask.png")
        args += ["--mask", str(tmp_path / "mask.png")]
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "--model", str(single_file(family)), "-o", str(out), *args]) == 0
    actual = np.asarray(Image.open(out).convert("RGB"))
    reference = diffusers_pipeline(family, folder)
    kwargs = {"mask_image": task["mask"]} if "mask" in task else {}
    if "image" in task:
        kwargs["image"] = task["image"]
    size = {} if family == "sdxl-refiner" else {"height": 64, "width": 64}
    expected = reference(PROMPT, num_inference_steps=5, guidance_scale=7.5, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(21), **size, **kwargs).images
    expected = (expected[0] * 255).round().astype(np.uint8)
    assert expected.std() > 10  # a real image, not a flat one
    assert_images_close(f"{family} single file vs diffusers folder", actual, expected)


def test_single_file_loads_the_same_networks_as_the_folder(sd1_folder, single_file):
    from_file = StableDiffusion.from_pretrained(single_file("sd1"))
    from_folder = StableDiffusion.from_pretrained(sd1_folder)
    assert type(from_file) is StableDiffusion and from_file.name == single_file("sd1").stem
    for a, b in zip(from_file.modules(), from_folder.modules(), strict=True):
        sa, sb = a.state_dict(), b.state_dict()
        assert set(sa) == set(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert from_file.scheduler == from_folder.scheduler  # SD 1.x's official PNDM config
    assert from_file.tokenizer(["a photo!"]).tolist() == from_folder.tokenizer(["a photo!"]).tolist()


def test_sdxl_single_files_build_the_xl_pipelines(single_file):
    base = StableDiffusion.from_pretrained(single_file("sdxl"))
    refiner = StableDiffusion.from_pretrained(single_file("sdxl-refiner"))
    assert isinstance(base, StableDiffusionXL) and isinstance(refiner, StableDiffusionXL)
    assert base.force_zeros_for_empty_prompt and not base.requires_aesthetics_score
    assert refiner.text_encoder is None and refiner.requires_aesthetics_score
    assert base.tokenizer.pad_token == "<|endoftext|>" and base.tokenizer_2.pad_token == "!"


def test_prediction_type_defaults_to_v_for_sd2_and_can_be_overridden(single_file, sd21_folder):
    assert StableDiffusion.from_pretrained(single_file("sd21")).scheduler.prediction_type == "v_prediction"
    eps = StableDiffusion.from_pretrained(single_file("sd21"), prediction_type="eps")
    assert eps.scheduler.prediction_type == "epsilon"
    assert StableDiffusion.from_pretrained(single_file("sd2-inpaint")).scheduler.prediction_type == "epsilon"
    folder_eps = StableDiffusion.from_pretrained(sd21_folder, prediction_type="eps")
    assert eps(PROMPT, steps=3, seed=1, width=64, height=64).images[0].tobytes() == \
        folder_eps(PROMPT, steps=3, seed=1, width=64, height=64).images[0].tobytes()


def test_older_sd1_files_without_the_text_model_segment(sd1_folder, single_file, tmp_path):
    legacy = write_single_file(sd1_folder, tmp_path / "legacy.safetensors", "sd1", legacy_clip=True)
    a = StableDiffusion.from_pretrained(legacy)(PROMPT, steps=3, seed=4, width=64, height=64).images[0]
    b = StableDiffusion.from_pretrained(single_file("sd1"))(PROMPT, steps=3, seed=4, width=64, height=64).images[0]
    assert a.tobytes() == b.tobytes()


def rewrite(source, target, change):
    tensors = load_file(str(source))
    change(tensors)
    save_file(tensors, str(target))
    return target


@pytest.mark.parametrize("change, message", [
    (lambda t: t.update({"model.diffusion_model.extra_head.weight": torch.zeros(2)}),
     "holds keys no SD 1.x module reads: model.diffusion_model.extra_head.weight"),
    (lambda t: t.pop("first_stage_model.decoder.mid.attn_1.k.weight"),
     "vae does not match the SD 1.x layout inferred from it: missing keys: first_stage_model.decoder.mid.attn_1.k"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("cond_stage_model.")],
     "no text encoder ldm knows"),
    (lambda t: [t.pop(k) for k in list(t) if k.startswith("first_stage_model.")],
     "match no Stable Diffusion family"),
    (lambda t: t.update({"model.diffusion_model.out.2.weight": torch.zeros(4, 16, 3, 3)}),
     "does not match the SD 1.x UNet"),
])
def test_bad_single_files_are_named(single_file, tmp_path, capsys, change, message):
    bad = rewrite(single_file("sd1"), tmp_path / "bad.safetensors", change)
    code = main(["generate", PROMPT, "--model", str(bad), "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and str(bad) in err and "Traceback" not in err


def test_truncated_and_pickle_files_are_refused(single_file, tmp_path, capsys):
    data = single_file("sd1").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["generate", PROMPT, "--model", str(tmp_path / "cut.safetensors"), "-o", str(tmp_path / "x.png")]) == 2
    assert "truncated or corrupt" in capsys.readouterr().err
    (tmp_path / "v1-5-pruned-emaonly.ckpt").write_bytes(b"\x80\x02}q\x00.")
    assert main(["generate", PROMPT, "--model", str(tmp_path / "v1-5-pruned-emaonly.ckpt"),
                 "-o", str(tmp_path / "x.png")]) == 2
    assert "never unpickles" in capsys.readouterr().err


def test_sd2_file_converted_back_from_a_folder_keeps_all_its_blocks(sd21_folder, single_file, tmp_path):
    """diffusers' convert_diffusers_to_original_stable_diffusion.py writes the folder's 23 OpenCLIP blocks and no
    text_projection: nothing is dropped then, and the networks are those of the 24-block original."""
    converted = write_single_file(sd21_folder, tmp_path / "converted.safetensors", "sd21", extras=False)
    checkpoint = read_single_file(read_safetensors(converted))
    original = read_single_file(read_safetensors(single_file("sd21")))
    assert checkpoint.configs["text_encoder"] == original.configs["text_encoder"]
    assert checkpoint.configs["text_encoder"]["num_hidden_layers"] == \
        json.loads((sd21_folder / "text_encoder" / "config.json").read_text())["num_hidden_layers"]
    a = StableDiffusion.from_pretrained(converted)(PROMPT, steps=2, seed=1, width=64, height=64).images[0]
    b = StableDiffusion.from_pretrained(single_file("sd21"))(PROMPT, steps=2, seed=1, width=64, height=64).images[0]
    assert a.tobytes() == b.tobytes()


# The official full-size configs (the fields that matter; models.md), to check shape inference at real size.
SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "attention_head_dim": 8, "cross_attention_dim": 768,
             "sample_size": 64}
SD21_UNET = SD15_UNET | {"attention_head_dim": [5, 10, 20, 20], "cross_attention_dim": 1024, "sample_size": 96,
                         "use_linear_projection": True, "upcast_attention": True}
SDXL_UNET = {"block_out_channels": [320, 640, 1280], "attention_head_dim": [5, 10, 20], "cross_attention_dim": 2048,
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "transformer_layers_per_block": [1, 2, 10], "use_linear_projection": True, "sample_size": 128,
             "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
REFINER_UNET = SDXL_UNET | {
    "block_out_channels": [384, 768, 1536, 1536], "attention_head_dim": [6, 12, 24, 24], "cross_attention_dim": 1280,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "transformer_layers_per_block": 4, "projection_class_embeddings_input_dim": 2560}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_attention_heads": 12, "num_hidden_layers": 12}
OPENCLIP_H = {"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 23,
              "hidden_act": "gelu"}
BIGG = {"hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20, "num_hidden_layers": 32,
        "hidden_act": "gelu", "architectures": ["CLIPTextModelWithProjection"], "projection_dim": 1280}
VAE_CFG = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "sample_size": 512,
           "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
OFFICIAL = {
    "sd1": {"unet": SD15_UNET, "text_encoder": CLIP_L},
    "sd2": {"unet": SD21_UNET, "text_encoder": OPENCLIP_H},
    "sd2-inpaint": {"unet": SD21_UNET | {"in_channels": 9, "upcast_attention": False, "sample_size": 64},
                    "text_encoder": OPENCLIP_H},
    "sdxl": {"unet": SDXL_UNET, "text_encoder": CLIP_L, "text_encoder_2": BIGG},
    "sdxl-refiner": {"unet": REFINER_UNET, "text_encoder_2": BIGG},
}


@pytest.mark.parametrize("family", list(OFFICIAL))
def test_full_size_official_layouts_infer_the_official_configs(family):
    """The five official architectures at full size, as meta tensors (no memory): written under their
    single-file names, shape inference must give back each official config (SD 2.x with all 24 blocks)."""
    official = OFFICIAL[family] | {"vae": VAE_CFG | ({"scaling_factor": 0.13025} if "xl" in family else {})}
    builders = {"unet": lambda c: UNet(UNetConfig.from_diffusers(c)), "vae": lambda c: VAE(VAEConfig.from_diffusers(c))}
    states = {}
    with torch.device("meta"):
        for component, cfg in official.items():
            module = builders[component](cfg) if component in builders else CLIPTextModel(
                CLIPTextConfig.from_transformers(cfg))
            states[component] = module.state_dict()
    tensors = write_single_file_state(SPECS[family], official, states)
    if family.startswith("sd2"):  # the 24th OpenCLIP-H block the folder drops, and the unused projection
        tensors |= {k.replace("resblocks.0.", "resblocks.23."): v for k, v in tensors.items()
                    if k.startswith("cond_stage_model.model.transformer.resblocks.0.")}
        tensors["cond_stage_model.model.text_projection"] = torch.empty(1024, 1024, device="meta")
    checkpoint = read_single_file(tensors)
    assert checkpoint.family.key == family
    assert UNetConfig.from_diffusers(checkpoint.configs["unet"]) == UNetConfig.from_diffusers(official["unet"])
    assert dataclasses.replace(VAEConfig.from_diffusers(checkpoint.configs["vae"]), sample_size=512) == \
        VAEConfig.from_diffusers(official["vae"])
    for tower in ("text_encoder", "text_encoder_2"):
        if tower in official:
            assert CLIPTextConfig.from_transformers(checkpoint.configs[tower]) == \
                CLIPTextConfig.from_transformers(official[tower])
