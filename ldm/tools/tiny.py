"""Tiny random models in the official diffusers layouts: what `ldm tiny FAMILY DIR` writes, and what the tests
load (tests/official.py draws the same folders' weights with diffusers' and transformers' own initialisation).

Field sets and file names follow `runwayml/stable-diffusion-v1-5` / `CompVis/stable-diffusion-v1-4`,
`stabilityai/stable-diffusion-2-1`, `stabilityai/stable-diffusion-2-inpainting`,
`stabilityai/stable-diffusion-xl-base-1.0`, `stabilityai/stable-diffusion-xl-refiner-1.0` and
`SimianLuo/LCM_Dreamshaper_v7`: config.json files with the official fields only (absent fields take the library
defaults, as they do for the real files), `diffusion_pytorch_model.safetensors` / `model.safetensors` with the
official key names, the text encoder in transformers-4 names with the `text_model.` prefix and the `position_ids`
buffer, and a tokenizer folder without `tokenizer.json`. Only the widths are small (a 64×64 native size, 30 to
110 MB a model). The widths keep each family's head convention (SD 1.x UNet: 8 heads; SD 2.x/SDXL UNet and every
text tower: 64-dim heads), which a single-file checkpoint does not store, so the same models also serve as single
files.

The weights are random: such a model draws noise. It is for trying every command, the server and the Python API
without a download, and for checking that two implementations agree (`ldm parity`), never for pictures.
"""

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from ldm.networks.clip import CLIPTextConfig, CLIPTextModel
from ldm.networks.safety import SafetyChecker, SafetyCheckerConfig
from ldm.networks.tokenizer import write_tokenizer_folder
from ldm.networks.unet import UNet, UNetConfig
from ldm.networks.vae import VAE, VAEConfig

SD1_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.6.0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "safety_checker": ["stable_diffusion", "StableDiffusionSafetyChecker"],
    "scheduler": ["diffusers", "PNDMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}

SD1_SCHEDULER = {
    "_class_name": "PNDMScheduler",
    "_diffusers_version": "0.6.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "num_train_timesteps": 1000,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
    "clip_sample": False,
}

# The official SD 1.5 unet/config.json, widths shrunk (320/640/1280/1280 → 32/32/64/64, context 768 → 64).
SD1_UNET = {
    "_class_name": "UNet2DConditionModel",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [32, 32, 64, 64],
    "center_input_sample": False,
    "cross_attention_dim": 64,
    "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 8,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}

SD1_VAE = {
    "_class_name": "AutoencoderKL",
    "_diffusers_version": "0.6.0",
    "act_fn": "silu",
    "block_out_channels": [32, 32, 64, 64],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 64,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}

SD1_TEXT_ENCODER = {
    "_name_or_path": "openai/clip-vit-large-patch14",
    "architectures": ["CLIPTextModel"],
    "attention_dropout": 0.0,
    "bos_token_id": 0,
    "dropout": 0.0,
    "eos_token_id": 2,
    "hidden_act": "quick_gelu",
    "hidden_size": 64,
    "initializer_factor": 1.0,
    "initializer_range": 0.02,
    "intermediate_size": 37,
    "layer_norm_eps": 1e-05,
    "max_position_embeddings": 77,
    "model_type": "clip_text_model",
    "num_attention_heads": 1,
    "num_hidden_layers": 2,
    "pad_token_id": 1,
    "projection_dim": 768,
    "torch_dtype": "float32",
    "transformers_version": "4.22.0.dev0",
    "vocab_size": 49408,
}


# The official safety_checker/config.json (a transformers-4 CLIPConfig: full sub-configs plus the overrides in
# *_config_dict) with the ViT-L/14 vision tower shrunk (1024 wide, 24 layers, 16 heads → 32, 2, 2; projection
# 768 → 16). Patch 14 and 224 px are kept, so the preprocessing is the real one.
SD1_SAFETY_CHECKER_VISION = {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2,
                             "num_hidden_layers": 2, "patch_size": 14}
SD1_SAFETY_CHECKER = {
    "_commit_hash": "4bb648a606ef040e7685bde262611766a5fdd67b",
    "_name_or_path": "CompVis/stable-diffusion-safety-checker",
    "architectures": ["StableDiffusionSafetyChecker"],
    "initializer_factor": 1.0,
    "logit_scale_init_value": 2.6592,
    "model_type": "clip",
    "projection_dim": 16,
    "text_config": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 2,
                    "model_type": "clip_text_model"},
    "text_config_dict": {"hidden_size": 32, "intermediate_size": 37, "num_attention_heads": 2, "num_hidden_layers": 2},
    "torch_dtype": "float32",
    "transformers_version": None,
    "vision_config": SD1_SAFETY_CHECKER_VISION | {"image_size": 224, "hidden_act": "quick_gelu",
                                                  "layer_norm_eps": 1e-05, "model_type": "clip_vision_model",
                                                  "num_channels": 3},
    "vision_config_dict": SD1_SAFETY_CHECKER_VISION,
}
SD1_FEATURE_EXTRACTOR = {
    "crop_size": 224, "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_resize": True,
    "feature_extractor_type": "CLIPFeatureExtractor", "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "size": 224,
}


# stabilityai/stable-diffusion-2-1: OpenCLIP-H text tower (gelu, 23 layers kept), linear projections,
# per-level heads of 64 dims (here 1/1/2/2 of widths 64/64/128/128), upcast attention, DDIM with v-prediction, 768 px.
SD21_MODEL_INDEX = {
    "_class_name": "StableDiffusionPipeline",
    "_diffusers_version": "0.10.0.dev0",
    "feature_extractor": ["transformers", "CLIPImageProcessor"],
    "requires_safety_checker": False,
    "safety_checker": [None, None],
    "scheduler": ["diffusers", "DDIMScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SD21_SCHEDULER = {
    "_class_name": "DDIMScheduler",
    "_diffusers_version": "0.8.0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "v_prediction",
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "trained_betas": None,
}
SD21_UNET = SD1_UNET | {
    "_diffusers_version": "0.10.0.dev0",
    "attention_head_dim": [1, 1, 2, 2],
    "block_out_channels": [64, 64, 128, 128],
    "cross_attention_dim": 128,
    "dual_cross_attention": False,
    "num_class_embeds": None,
    "only_cross_attention": False,
    "sample_size": 8,
    "upcast_attention": True,
    "use_linear_projection": True,
}
SD21_VAE = SD1_VAE | {"_diffusers_version": "0.10.0.dev0"}
SD21_TEXT_ENCODER = SD1_TEXT_ENCODER | {
    "_name_or_path": "hf-models/stable-diffusion-v2-768x768/text_encoder",
    "hidden_act": "gelu",
    "hidden_size": 128,
    "intermediate_size": 80,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 512,
    "transformers_version": "4.25.0.dev0",
}

# stabilityai/stable-diffusion-2-inpainting: SD 2 with a 9-channel UNet input, PNDM, epsilon, 512 px.
SD2_INPAINT_MODEL_INDEX = SD21_MODEL_INDEX | {
    "_class_name": "StableDiffusionInpaintPipeline",
    "_diffusers_version": "0.8.0.dev0",
    "scheduler": ["diffusers", "PNDMScheduler"],
}
SD2_INPAINT_SCHEDULER = SD1_SCHEDULER | {"_diffusers_version": "0.8.0"}
SD2_INPAINT_UNET = SD21_UNET | {"_diffusers_version": "0.8.0.dev0", "in_channels": 9, "upcast_attention": False}

# stabilityai/stable-diffusion-xl-base-1.0: CLIP-L + OpenCLIP-bigG (with projection), three UNet levels with
# per-level transformer depth and `text_time` micro-conditioning, a 0.13025-scaled force_upcast VAE, Euler.
SDXL_MODEL_INDEX = {
    "_class_name": "StableDiffusionXLPipeline",
    "_diffusers_version": "0.19.0.dev0",
    "force_zeros_for_empty_prompt": True,
    "add_watermarker": None,
    "scheduler": ["diffusers", "EulerDiscreteScheduler"],
    "text_encoder": ["transformers", "CLIPTextModel"],
    "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
    "tokenizer": ["transformers", "CLIPTokenizer"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"],
}
SDXL_SCHEDULER = {
    "_class_name": "EulerDiscreteScheduler",
    "_diffusers_version": "0.19.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "sample_max_value": 1.0,
    "set_alpha_to_one": False,
    "skip_prk_steps": True,
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_TEXT_ENCODER = SD1_TEXT_ENCODER | {"_name_or_path": "openai/clip-vit-large-patch14",
                                        "transformers_version": "4.32.0.dev0"}
SDXL_TEXT_ENCODER_2 = SD1_TEXT_ENCODER | {
    "_name_or_path": "laion/CLIP-ViT-bigG-14-laion2B-39B-b160k",
    "architectures": ["CLIPTextModelWithProjection"],
    "hidden_act": "gelu",
    "hidden_size": 128,
    "intermediate_size": 96,
    "num_attention_heads": 2,
    "num_hidden_layers": 3,
    "projection_dim": 128,
    "transformers_version": "4.32.0.dev0",
}
SDXL_UNET = {
    "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.19.0.dev0", "act_fn": "silu",
    "addition_embed_type": "text_time", "addition_embed_type_num_heads": 64, "addition_time_embed_dim": 8,
    "attention_head_dim": [1, 2, 2], "block_out_channels": [64, 128, 128], "center_input_sample": False,
    "class_embed_type": None, "class_embeddings_concat": False, "conv_in_kernel": 3, "conv_out_kernel": 3,
    "cross_attention_dim": 64 + 128, "cross_attention_norm": None,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"], "downsample_padding": 1,
    "dual_cross_attention": False, "encoder_hid_dim": None, "encoder_hid_dim_type": None, "flip_sin_to_cos": True,
    "freq_shift": 0, "in_channels": 4, "layers_per_block": 2, "mid_block_only_cross_attention": None,
    "mid_block_scale_factor": 1, "mid_block_type": "UNetMidBlock2DCrossAttn", "norm_eps": 1e-05,
    "norm_num_groups": 32, "num_attention_heads": None, "num_class_embeds": None, "only_cross_attention": False,
    "out_channels": 4, "projection_class_embeddings_input_dim": 6 * 8 + 128, "resnet_out_scale_factor": 1.0,
    "resnet_skip_time_act": False, "resnet_time_scale_shift": "default", "sample_size": 8,
    "time_cond_proj_dim": None, "time_embedding_act_fn": None, "time_embedding_dim": None,
    "time_embedding_type": "positional", "timestep_post_act": None, "transformer_layers_per_block": [1, 2, 3],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"], "upcast_attention": None,
    "use_linear_projection": True,
}
SDXL_VAE = SD1_VAE | {"_diffusers_version": "0.20.0.dev0", "force_upcast": True, "sample_size": 1024,
                      "scaling_factor": 0.13025}

# stabilityai/stable-diffusion-xl-refiner-1.0: bigG only, aesthetic-score conditioning, four UNet levels.
SDXL_REFINER_MODEL_INDEX = SDXL_MODEL_INDEX | {
    "_class_name": "StableDiffusionXLImg2ImgPipeline",
    "force_zeros_for_empty_prompt": False,
    "requires_aesthetics_score": True,
    "text_encoder": [None, None],
    "tokenizer": [None, None],
}
SDXL_REFINER_UNET = SDXL_UNET | {
    "attention_head_dim": [1, 2, 2, 3], "block_out_channels": [64, 128, 128, 192], "cross_attention_dim": 128,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "projection_class_embeddings_input_dim": 5 * 8 + 128, "transformer_layers_per_block": 2,
}

# SimianLuo/LCM_Dreamshaper_v7: an SD 1.5 folder named for the LCM pipeline, with LCMScheduler and a UNet that takes
# the guidance scale's embedding (time_cond_proj_dim 256 there)
LCM_MODEL_INDEX = SD1_MODEL_INDEX | {"_class_name": "LatentConsistencyModelPipeline",
                                     "_diffusers_version": "0.22.0.dev0", "requires_safety_checker": True,
                                     "scheduler": ["diffusers", "LCMScheduler"]}
LCM_SCHEDULER = {
    "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "original_inference_steps": 50,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0, "set_alpha_to_one": True,
    "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0, "timestep_spacing": "leading",
    "trained_betas": None,
}
LCM_UNET = SD1_UNET | {"time_cond_proj_dim": 24}

CLIP_L, OPENCLIP = "<|endoftext|>", "!"  # the pad tokens of the two tokenizer folders
FAMILIES = {
    "sd1": (SD1_MODEL_INDEX, SD1_SCHEDULER, SD1_UNET, SD1_VAE, {"text_encoder": (SD1_TEXT_ENCODER, CLIP_L)}),
    "sd21": (SD21_MODEL_INDEX, SD21_SCHEDULER, SD21_UNET, SD21_VAE, {"text_encoder": (SD21_TEXT_ENCODER, OPENCLIP)}),
    "sd2-inpaint": (SD2_INPAINT_MODEL_INDEX, SD2_INPAINT_SCHEDULER, SD2_INPAINT_UNET, SD21_VAE,
                    {"text_encoder": (SD21_TEXT_ENCODER, OPENCLIP)}),
    "sdxl": (SDXL_MODEL_INDEX, SDXL_SCHEDULER, SDXL_UNET, SDXL_VAE,
             {"text_encoder": (SDXL_TEXT_ENCODER, CLIP_L), "text_encoder_2": (SDXL_TEXT_ENCODER_2, OPENCLIP)}),
    "sdxl-refiner": (SDXL_REFINER_MODEL_INDEX, SDXL_SCHEDULER, SDXL_REFINER_UNET, SDXL_VAE,
                     {"text_encoder_2": (SDXL_TEXT_ENCODER_2, OPENCLIP)}),
    "lcm-sd1": (LCM_MODEL_INDEX, LCM_SCHEDULER, LCM_UNET, SD1_VAE, {"text_encoder": (SD1_TEXT_ENCODER, CLIP_L)}),
}

NAMES = {"sd2": "sd21", "lcm": "lcm-sd1"}  # `ldm tiny` also takes these for the FAMILIES keys


# ------------------------------------------------------------------------------------------- random weights


@dataclass(frozen=True)
class RandomWeights:
    """How the networks' random weights are drawn: each function takes the component's config dict (as written
    to its config.json) and a seed and returns the state dict in the official file's key names."""

    unet: Callable[[dict, int], dict[str, Tensor]]
    vae: Callable[[dict, int], dict[str, Tensor]]
    text_encoder: Callable[[dict, int], dict[str, Tensor]]
    safety_checker: Callable[[dict, int], dict[str, Tensor]]


def randomize(model: nn.Module, seed: int) -> nn.Module:
    """Every parameter drawn from one seeded generator: matrices and kernels N(0, 1/fan_in), norm weights
    1 + N(0, 0.1²) (never all ones, so a mix-up of two norms changes the output), other vectors N(0, 0.1²)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=generator)
            if p.ndim >= 2:
                p.copy_(noise / p[0].numel() ** 0.5)
            else:
                p.copy_(noise * 0.1 + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    return model


def ldm_text_encoder(cfg: dict, seed: int) -> dict[str, Tensor]:
    """ldm's CLIP text model, whose names are transformers-4's, plus the `position_ids` buffer of the files."""
    model = randomize(CLIPTextModel(CLIPTextConfig.from_transformers(cfg)), seed)
    n = cfg["max_position_embeddings"]
    return model.state_dict() | {"text_model.embeddings.position_ids": torch.arange(n, dtype=torch.int64)[None]}


def ldm_safety_checker(cfg: dict, seed: int) -> dict[str, Tensor]:
    """ldm's safety checker with its thresholds at 1.0, which no cosine similarity exceeds: nothing is flagged."""
    model = randomize(SafetyChecker(SafetyCheckerConfig.from_transformers(cfg)), seed)
    with torch.no_grad():
        model.concept_embeds_weights.fill_(1.0)
        model.special_care_embeds_weights.fill_(1.0)
    return model.state_dict()


LDM_WEIGHTS = RandomWeights(
    unet=lambda cfg, seed: randomize(UNet(UNetConfig.from_diffusers(cfg)), seed).state_dict(),
    vae=lambda cfg, seed: randomize(VAE(VAEConfig.from_diffusers(cfg)), seed).state_dict(),
    text_encoder=ldm_text_encoder, safety_checker=ldm_safety_checker)


# ------------------------------------------------------------------------------------------- the folder


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=2))


def save_component(folder: Path, config: dict, state: dict, stem: str, fp16_variant: bool) -> None:
    """`folder/config.json` and `folder/{stem}.safetensors` (and `{stem}.fp16.safetensors` if `fp16_variant`)."""
    write_json(folder / "config.json", config)
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, str(folder / f"{stem}.safetensors"), metadata={"format": "pt"})
    if fp16_variant:
        half = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
        save_file(half, str(folder / f"{stem}.fp16.safetensors"), metadata={"format": "pt"})


def write_safety_checker(root: Path, state: dict[str, Tensor], fp16_variant: bool = False) -> None:
    save_component(root / "safety_checker", SD1_SAFETY_CHECKER, state, "model", fp16_variant)
    write_json(root / "feature_extractor" / "preprocessor_config.json", SD1_FEATURE_EXTRACTOR)


def write_folder(root: Path, family: str = "sd1", seed: int = 0, fp16_variant: bool = False,
                 weights: RandomWeights = LDM_WEIGHTS) -> Path:
    """A tiny folder in the official layout of `family` (a FAMILIES key; 64×64 native size), its weights drawn
    by `weights` from `seed` (each network its own seed after it). Returns `root`."""
    model_index, scheduler, unet, vae, towers = FAMILIES[NAMES.get(family, family)]
    root = Path(root)
    write_json(root / "model_index.json", model_index)
    write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    save_component(root / "unet", unet, weights.unet(unet, seed), "diffusion_pytorch_model", fp16_variant)
    save_component(root / "vae", vae, weights.vae(vae, seed + 1), "diffusion_pytorch_model", fp16_variant)
    for i, (tower, (config, pad)) in enumerate(towers.items()):
        write_tokenizer_folder(root / tower.replace("text_encoder", "tokenizer"), pad_token=pad)
        save_component(root / tower, config, weights.text_encoder(config, seed + 2 + i), "model", fp16_variant)
    if model_index.get("safety_checker", [None])[0] is not None:
        write_safety_checker(root, weights.safety_checker(SD1_SAFETY_CHECKER, seed + 5), fp16_variant)
    return root
