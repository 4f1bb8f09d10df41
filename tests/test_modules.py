"""Module parity: ldm's UNet, VAE and CLIP text tower against diffusers / transformers on identical weights."""

import json

import pytest
import torch
from conftest import MODULE_TOL, max_rel_err
from official import (
    SD1_TEXT_ENCODER,
    SD1_UNET,
    SD1_VAE,
    make_text_encoder,
    make_unet,
    make_vae,
    official_text_encoder_state,
    save_component,
)

from ldm.loading.components import text_encoder_state
from ldm.loading.files import load_module, read_safetensors
from ldm.networks.clip import CLIPTextConfig, CLIPTextModel
from ldm.networks.unet import UNet, UNetConfig
from ldm.networks.vae import VAE, VAEConfig

TOL = MODULE_TOL

# Tiny versions of every UNet family the engine serves, each in its official config field set.
SD2_UNET = SD1_UNET | {"attention_head_dim": [2, 4, 4, 4], "cross_attention_dim": 48,
                       "use_linear_projection": True, "upcast_attention": True}
SD2_INPAINT_UNET = SD2_UNET | {"in_channels": 9, "upcast_attention": False}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "act_fn": "silu", "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 8, "attention_head_dim": [2, 4, 4],
    "block_out_channels": [32, 64, 64], "center_input_sample": False, "class_embed_type": None,
    "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3, "cross_attention_dim": 64,
    "cross_attention_norm": None, "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1, "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None,
    "flip_sin_to_cos": True, "freq_shift": 0, "in_channels": 4, "layers_per_block": 2,
    "mid_block_only_cross_attention": None, "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05, "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None,
    "only_cross_attention": False, "out_channels": 4, "projection_class_embeddings_input_dim": 6 * 8 + 32,
    "resnet_out_scale_factor": 1.0, "resnet_skip_time_act": False, "resnet_time_scale_shift": "default",
    "sample_size": 16, "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 3],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_REFINER_UNET = SDXL_UNET | {
    "attention_head_dim": [2, 4, 4, 4], "block_out_channels": [32, 64, 64, 96], "cross_attention_dim": 48,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 5 * 8 + 32, "transformer_layers_per_block": 2,
}
UNETS = {"sd1": SD1_UNET, "sd2": SD2_UNET, "sd2-inpaint": SD2_INPAINT_UNET, "sdxl": SDXL_UNET,
         "sdxl-refiner": SDXL_REFINER_UNET}


def write_and_load(tmp_path, config, reference, build, stem="diffusion_pytorch_model", state=None):
    """Save the reference weights in the official layout, load them back with ldm's strict loader."""
    save_component(tmp_path, config, reference.state_dict() if state is None else state, stem, False)
    tensors = read_safetensors(tmp_path / f"{stem}.safetensors")
    return load_module(build(json.loads((tmp_path / "config.json").read_text())), tensors, tmp_path, "test")


@pytest.mark.parametrize("family", list(UNETS))
def test_unet_matches_diffusers(tmp_path, family):
    config = UNETS[family]
    ref = make_unet(config)
    ours = write_and_load(tmp_path, config, ref, lambda cfg: lambda: UNet(UNetConfig.from_diffusers(cfg)))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, config["in_channels"], 10, 14, generator=g)  # odd sizes: upsampling must follow the skips
    context = torch.randn(2, 7, config["cross_attention_dim"], generator=g)
    t = torch.tensor([981.0, 3.5])
    kwargs, added = {}, None
    if config.get("addition_embed_type") == "text_time":
        pooled_dim = 32
        n_ids = (config["projection_class_embeddings_input_dim"] - pooled_dim) // config["addition_time_embed_dim"]
        kwargs = {"text_embeds": torch.randn(2, pooled_dim, generator=g),
                  "time_ids": torch.tensor([[1024.0, 768, 0, 16, 1024, 1024, 6.0][:n_ids]] * 2)}
        added = kwargs
    with torch.no_grad():
        expected = ref(x, t, context, added_cond_kwargs=added).sample
        actual = ours(x, t, context, **kwargs)
    assert actual.shape == expected.shape
    assert max_rel_err(actual, expected) < TOL


def test_unet_config_reads_heads_like_diffusers():
    # `attention_head_dim` is the number of heads unless `num_attention_heads` is given
    assert UNetConfig.from_diffusers(SD1_UNET).heads == (8, 8, 8, 8)
    assert UNetConfig.from_diffusers(SD2_UNET).heads == (2, 4, 4, 4)
    assert UNetConfig.from_diffusers(SD2_UNET | {"num_attention_heads": 1}).heads == (1, 1, 1, 1)
    assert UNetConfig.from_diffusers(SDXL_UNET).transformer_depth_up == (3, 2, 1)


def test_vae_matches_diffusers(tmp_path):
    ref = make_vae(SD1_VAE)
    ours = write_and_load(tmp_path, SD1_VAE, ref, lambda cfg: lambda: VAE(VAEConfig.from_diffusers(cfg)))
    image = torch.rand(1, 3, 48, 40, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(image).latent_dist
        mean, logvar = ours.encode(image)
        assert max_rel_err(mean, dist.mean) < TOL
        assert max_rel_err(logvar, dist.logvar) < TOL
        sample = ours.sample(mean, logvar, torch.Generator().manual_seed(5))
        assert max_rel_err(sample, dist.sample(torch.Generator().manual_seed(5))) < TOL
        assert max_rel_err(ours.decode(sample), ref.decode(sample).sample) < TOL


TEXT_ENCODERS = {
    "clip-l": SD1_TEXT_ENCODER,
    "openclip-h": SD1_TEXT_ENCODER | {"hidden_act": "gelu", "hidden_size": 48, "num_attention_heads": 4,
                                      "intermediate_size": 64, "num_hidden_layers": 3},
    "openclip-bigg": SD1_TEXT_ENCODER | {"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                                         "hidden_size": 40, "projection_dim": 40, "num_hidden_layers": 3},
}


@pytest.mark.parametrize("family", list(TEXT_ENCODERS))
@pytest.mark.parametrize("names", ["transformers4", "transformers5"])
def test_text_encoder_matches_transformers(tmp_path, family, names):
    config = TEXT_ENCODERS[family]
    ref = make_text_encoder(config)
    state = official_text_encoder_state(ref)
    if names == "transformers5":  # transformers 5 saves without the `text_model.` prefix and position_ids
        state = {k.removeprefix("text_model."): v for k, v in state.items() if "position_ids" not in k}
    save_component(tmp_path, config, state, "model", False)
    tensors = text_encoder_state(read_safetensors(tmp_path / "model.safetensors"))
    ours = load_module(lambda: CLIPTextModel(CLIPTextConfig.from_transformers(config)), tensors, tmp_path, "test")
    ids = torch.randint(0, 49406, (2, 77), generator=torch.Generator().manual_seed(0))
    ids[:, 0], ids[0, 9:], ids[1, 30], ids[1, 31:] = 49406, 49407, 49407, 0  # pad with EOS / with "!"
    with torch.no_grad():
        out = ref(ids, output_hidden_states=True)
        last = ours(ids)
        penultimate = ours(ids, layer=-2, final_norm=False)
    assert max_rel_err(last.hidden, out.last_hidden_state) < TOL
    assert max_rel_err(penultimate.hidden, out.hidden_states[-2]) < TOL
    pooled = out.text_embeds if hasattr(out, "text_embeds") else out.pooler_output
    assert max_rel_err(last.pooled, pooled) < TOL


def test_absent_config_fields_take_diffusers_class_defaults():
    """A config.json that leaves a field out means diffusers' class default: the same network must come out."""
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from ldm.networks.unet import UNet
    from ldm.networks.vae import VAE, VAEConfig

    with torch.device("meta"):  # shapes only
        pairs = ((VAE(VAEConfig.from_diffusers({})), AutoencoderKL()),
                 (UNet(UNetConfig.from_diffusers({"sample_size": 64})), UNet2DConditionModel(sample_size=64)))
    for ours, theirs in pairs:
        expected = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
        assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == expected
