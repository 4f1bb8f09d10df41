"""Tiny random models written exactly as the official Hub repos lay them out, with diffusers' and transformers'
own random initialisation.

The configs and the layout are the library's (`ldm.tools.tiny`, which `ldm tiny` writes with ldm's own networks):
here only the weights differ, drawn by diffusers' `UNet2DConditionModel` / `AutoencoderKL`, transformers'
`CLIPTextModel` and diffusers' `StableDiffusionSafetyChecker` (their own init, norms perturbed), so the references
the tests compare against build and own the weights. The names below are re-exported for the tests.
"""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from ldm.tools import tiny
from ldm.tools.tiny import (  # noqa: F401  (re-exported for the tests)
    CLIP_L,
    FAMILIES,
    LCM_MODEL_INDEX,
    LCM_SCHEDULER,
    LCM_UNET,
    OPENCLIP,
    SD1_FEATURE_EXTRACTOR,
    SD1_MODEL_INDEX,
    SD1_SAFETY_CHECKER,
    SD1_SAFETY_CHECKER_VISION,
    SD1_SCHEDULER,
    SD1_TEXT_ENCODER,
    SD1_UNET,
    SD1_VAE,
    SD2_INPAINT_MODEL_INDEX,
    SD2_INPAINT_SCHEDULER,
    SD2_INPAINT_UNET,
    SD21_MODEL_INDEX,
    SD21_SCHEDULER,
    SD21_TEXT_ENCODER,
    SD21_UNET,
    SD21_VAE,
    SDXL_MODEL_INDEX,
    SDXL_REFINER_MODEL_INDEX,
    SDXL_REFINER_UNET,
    SDXL_SCHEDULER,
    SDXL_TEXT_ENCODER,
    SDXL_TEXT_ENCODER_2,
    SDXL_UNET,
    SDXL_VAE,
    save_component,
    write_json,
)


def write_safety_checker(root: Path, model, fp16_variant: bool = False) -> None:
    tiny.write_safety_checker(root, official_safety_checker_state(model), fp16_variant)


def make_safety_checker(seed: int = 0, concept_thresholds=None, special_thresholds=None):
    """diffusers' StableDiffusionSafetyChecker with random weights and concept embeddings. Thresholds default
    to 1.0, which no cosine similarity exceeds: nothing is flagged."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig

    torch.manual_seed(seed)
    cfg = SD1_SAFETY_CHECKER
    model = StableDiffusionSafetyChecker(CLIPConfig(text_config=cfg["text_config_dict"],
                                                    vision_config=cfg["vision_config"],
                                                    projection_dim=cfg["projection_dim"])).eval()
    with torch.no_grad():
        model.concept_embeds.normal_()
        model.special_care_embeds.normal_()
        model.concept_embeds_weights.fill_(1.0)
        model.special_care_embeds_weights.fill_(1.0)
        if concept_thresholds is not None:
            model.concept_embeds_weights.copy_(torch.as_tensor(concept_thresholds))
        if special_thresholds is not None:
            model.special_care_embeds_weights.copy_(torch.as_tensor(special_thresholds))
    return perturb_norms(model)


def official_safety_checker_state(model) -> dict[str, torch.Tensor]:
    """transformers-4 names, as in the official safety_checker/model.safetensors: `vision_model.vision_model.…`."""
    return {("vision_model." + k if k.startswith("vision_model.") else k): v.contiguous()
            for k, v in model.state_dict().items()}


def diffusers_config(cfg: dict) -> dict:
    return {k: v for k, v in cfg.items() if not k.startswith("_")}


def perturb_norms(model):
    """Random init leaves every norm at weight 1, bias 0; perturb them so that a mix-up of two norms, or
    a norm applied where none belongs, changes the output."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


def make_unet(cfg: dict, seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return perturb_norms(UNet2DConditionModel(**diffusers_config(cfg)).eval())


def make_vae(cfg: dict, seed: int = 0):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return perturb_norms(AutoencoderKL(**diffusers_config(cfg)).eval())


def make_text_encoder(cfg: dict, seed: int = 0):
    import transformers

    fields = {k: v for k, v in cfg.items() if not k.startswith("_") and k not in ("architectures", "model_type",
                                                                               "transformers_version")}
    torch.manual_seed(seed)
    model_class = getattr(transformers, cfg["architectures"][0])
    return perturb_norms(model_class(transformers.CLIPTextConfig(**fields)).eval())


def official_text_encoder_state(model, position_ids: bool = True) -> dict[str, torch.Tensor]:
    """transformers-4 key names (`text_model.` prefix, `text_projection.weight` at the top)."""
    state = {}
    for key, value in model.state_dict().items():
        key = key if key.startswith("text_projection") else "text_model." + key.removeprefix("text_model.")
        state[key] = value.contiguous()
    if position_ids:
        n = model.config.max_position_embeddings
        state["text_model.embeddings.position_ids"] = torch.arange(n, dtype=torch.int64)[None]
    return state




# diffusers' and transformers' initialisation of each network, in the official files' key names
DIFFUSERS_WEIGHTS = tiny.RandomWeights(
    unet=lambda cfg, seed: make_unet(cfg, seed).state_dict(),
    vae=lambda cfg, seed: make_vae(cfg, seed).state_dict(),
    text_encoder=lambda cfg, seed: official_text_encoder_state(make_text_encoder(cfg, seed)),
    safety_checker=lambda cfg, seed: official_safety_checker_state(make_safety_checker(seed)))


def write_folder(root: Path, family: str = "sd1", seed: int = 0, fp16_variant: bool = False) -> Path:
    """A tiny folder in the official layout of `family` (64×64 native size), diffusers' weights. Returns `root`."""
    return tiny.write_folder(root, family, seed, fp16_variant, weights=DIFFUSERS_WEIGHTS)


# What a diffusers user picks for each of ldm's samplers, written from the README's documented mapping ("The command",
# `--sampler`): the scheduler class, built with `from_config(<the folder's scheduler config>)` plus these settings.
# Hard-coded here, not read from ldm's registry, so that a wrong mapping in ldm cannot agree with itself.
REFERENCE_SCHEDULERS: dict[str, tuple[str, dict]] = {
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS, as every SD folder configures it
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),  # its step's default order is 4
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),  # the class defaults: order 2
    "dpmpp_2m_sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}),
    "unipc": ("UniPCMultistepScheduler", {}),  # the class defaults: bh2, order 2
    "lcm": ("LCMScheduler", {}),  # the class defaults: original_inference_steps 50, timestep_scaling 10
    "tcd": ("TCDScheduler", {}),
}


def diffusers_scheduler(name: str, config: dict, karras: bool = False):
    """diffusers' scheduler for ldm's sampler `name` on a folder's scheduler `config` (Karras σ if `karras`), from
    the table above; first asserts that ldm's registry names the same class for it."""
    import diffusers

    from ldm.sampling.samplers import SAMPLERS

    cls, settings = REFERENCE_SCHEDULERS[name]
    assert SAMPLERS[name].diffusers_class == cls, f"ldm maps {name} to {SAMPLERS[name].diffusers_class}, not {cls}"
    settings = settings | ({"use_karras_sigmas": True} if karras else {})
    return getattr(diffusers, cls).from_config(config, **settings)


# ------------------------------------------------------------------------------------ single files

FOLDER_FIXTURES = {"sd1": "sd1_folder", "sd21": "sd21_folder", "sd2-inpaint": "sd2_inpaint_folder",
                   "sdxl": "sdxl_folder", "sdxl-refiner": "sdxl_refiner_folder"}  # conftest.py's session folders
LDM_FAMILY = {"sd1": "sd1", "sd21": "sd2", "sd2-inpaint": "sd2-inpaint", "sdxl": "sdxl", "sdxl-refiner": "sdxl-refiner",
              "lcm-sd1": "sd1"}


def folder_components(root: Path) -> tuple[dict[str, dict], dict[str, dict[str, torch.Tensor]]]:
    """The config.json dicts and the state dicts (ldm names) of a diffusers folder's networks."""
    from safetensors.torch import load_file

    from ldm.loading.components import text_encoder_state

    configs, states = {}, {}
    for part, stem in (("unet", "diffusion_pytorch_model"), ("vae", "diffusion_pytorch_model"),
                       ("text_encoder", "model"), ("text_encoder_2", "model")):
        if (root / part).is_dir():
            configs[part] = json.loads((root / part / "config.json").read_text())
            state = load_file(str(root / part / f"{stem}.safetensors"))
            states[part] = text_encoder_state(state) if part.startswith("text") else state
    return configs, states


def write_single_file(folder: Path, path: Path, family: str, extras: bool = True, legacy_clip: bool = False) -> Path:
    """An original-layout single file of a tiny folder, written with ldm's converter (tables run backwards),
    plus what the official files also carry when `extras`: schedule buffers, EMA bookkeeping, CLIP's
    position_ids and logit_scale, and for SD 2.x the 24th OpenCLIP block and text_projection it does not use."""
    from ldm.loading.families import FAMILIES as LDM_FAMILIES
    from ldm.loading.single_file import write_single_file_state

    configs, states = folder_components(folder)
    tensors = write_single_file_state(LDM_FAMILIES[LDM_FAMILY[family]], configs, states)
    if legacy_clip:  # older SD 1.x files: cond_stage_model.transformer.embeddings… (no text_model.)
        tensors = {k.replace("cond_stage_model.transformer.text_model.", "cond_stage_model.transformer."): v
                   for k, v in tensors.items()}
    if extras:
        g = torch.Generator().manual_seed(123)
        if family in ("sd1", "sd21", "sd2-inpaint"):
            betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
            tensors |= {"betas": betas.float(), "alphas_cumprod": torch.cumprod(1 - betas, 0).float(),
                        "model_ema.decay": torch.tensor(0.9999), "model_ema.num_updates": torch.tensor(1000)}
            # EMA copies in a non-pruned file: `model_ema.` + the key without its dots
            tensors["model_ema.diffusion_modelout2bias"] = torch.randn(4, generator=g)
        for key in [k for k in tensors if k.endswith("embeddings.position_embedding.weight")]:
            tensors[key.replace("position_embedding.weight", "position_ids")] = torch.arange(77)[None]
        for prefix in ("cond_stage_model.model.", "conditioner.embedders.1.model.", "conditioner.embedders.0.model."):
            if prefix + "token_embedding.weight" in tensors:
                tensors[prefix + "logit_scale"] = torch.tensor(4.6052)
        if family in ("sd21", "sd2-inpaint"):
            p = "cond_stage_model.model."
            last = configs["text_encoder"]["num_hidden_layers"]
            for key in [k for k in tensors if k.startswith(f"{p}transformer.resblocks.0.")]:
                new = key.replace("resblocks.0.", f"resblocks.{last}.")
                tensors[new] = torch.randn(tensors[key].shape, generator=g)
            width = configs["text_encoder"]["hidden_size"]
            tensors[p + "text_projection"] = torch.randn(width, width, generator=g)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path
