"""The model families ldm loads (one `ModelSpec` each, in `SPECS`), and the manifest of their official checkpoints
(`weights/manifest.json`).

A `ModelSpec` holds everything a family means that is not a weight: its text towers and the layer they condition
on, its scheduler and prediction type, its VAE's latent space, native size, image-to-image strength, SDXL's
conditioning choices, the UNet's head convention. A diffusers folder states much of it in its config.json files
(those win: `ldm.loading.components.read_folder` reads them); a single-file checkpoint states none of it but its
shapes, so `ldm.loading.single_file` takes the rest from here. Both resolve a model to its family's spec once, with
what the model's own configs state in its place (`ModelSpec.with_model`): the pipeline's `pipe.spec`. A new family
is one new entry in `SPECS` (the lesson of ComfyUI's `comfy/supported_models.py`: one entry per family owning its
quirks).
"""

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import InputError, LoadError

# The official scheduler/scheduler_config.json files (absent fields take each class's defaults).
_DDPM_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1, "clip_sample": False,
               "set_alpha_to_one": False, "skip_prk_steps": True}
PNDM = {"_class_name": "PNDMScheduler"} | _DDPM_BETAS  # SD 1.x, SD 2-inpainting
DDIM_V = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"} | _DDPM_BETAS  # SD 2.1
EULER_LEADING = {"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon", "timestep_spacing": "leading",
                 "interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0} | _DDPM_BETAS

# --prediction-type → scheduler config value (sample: the UNet predicts x0, as the 1-step SDXL-Lightning UNet)
PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction", "sample": "sample"}
TEXT_HEAD_DIM = 64  # CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 all use 64-wide heads


def prediction_type_override(prediction_type: str | None) -> str | None:
    """The scheduler config's prediction_type that `--prediction-type` (eps, v or sample) asks for (None: the model's
    own: a folder's scheduler config, a single file's family rule); an InputError for anything else."""
    if prediction_type not in (None, *PREDICTION_TYPES):
        raise InputError(f"unknown prediction type {prediction_type!r} (use {', '.join(PREDICTION_TYPES)})")
    return None if prediction_type is None else PREDICTION_TYPES[prediction_type]


@dataclass(frozen=True)
class TextTower:
    """One text encoder of a family: the component it loads as, where a single file keeps it, and its kind."""

    component: str  # "text_encoder" or "text_encoder_2": the folder's subfolder and the pipeline's attribute
    prefix: str  # its keys' prefix in a single file
    kind: str  # "clip": OpenAI CLIP ViT-L/14 (quick_gelu); "openclip": OpenCLIP ViT-H/14 or ViT-bigG/14 (gelu)

    @property
    def tokenizer(self) -> str:
        """Its tokenizer's component: tokenizer (tokenizer_2), the folder's subfolder and the pipeline's attribute."""
        return self.component.replace("text_encoder", "tokenizer")

    @property
    def pad_token(self) -> str:
        """What its tokenizer pads with, as the official folders' tokenizer configs say: CLIP-L its <|endoftext|>
        (`ldm.networks.tokenizer.EOS`), OpenCLIP "!" (token 0). A folder's own tokenizer config says its own."""
        return "<|endoftext|>" if self.kind == "clip" else "!"


@dataclass(frozen=True)
class ModelSpec:
    """What a family of models means, besides its weights. Fields marked (model) are the family's values in the
    registry and, in a loaded pipeline's `pipe.spec`, what the model's own configs state (`with_model`)."""

    key: str  # the manifest's family name
    label: str  # the family in messages and `ldm info`; (model): "… inpainting" for an inpainting UNet
    towers: tuple[TextTower, ...]  # in the order their hidden states are concatenated; the pooled one is the last's
    # The text layer the UNet is conditioned on: SDXL the penultimate, without the final LayerNorm; SD 1.x/2.x the
    # last, through it (`text_layer`).
    penultimate: bool
    scheduler: dict  # the official scheduler_config.json (its prediction_type: a single file's, which stores none)
    sample_size: int  # (model) the UNet's latent side at the native resolution
    unet_heads: int | None  # the UNet's heads: a fixed number per level (SD 1.x) …
    head_dim: int | None  # … or heads of a fixed width (SD 2.x, SDXL)
    vae_scaling_factor: float  # the VAE's latent scaling (a single file's VAE, which stores none, gets it)
    latent_space: str  # the VAE's latent space in messages ("SD 1.x/2.x", "SDXL"): VAEs of one space fit each other
    default_strength: float  # image-to-image: 0.8 (StableDiffusionImg2ImgPipeline), 0.3 (the SDXL img2img pipeline)
    vae_shift_factor: float | None = None  # the VAE's latent shift (none in these families)
    latent_channels: int = 4  # (model)
    unet_in_channels: int = 4  # (model) 9 for inpainting: the latents, the mask and the masked image's latents
    upcast_attention: bool = False  # the UNet's attention scores in fp32 (SD 2.x 768's unet config says so)
    upcast_vae: bool = False  # an fp16 VAE runs in fp32 where its config says force_upcast (diffusers' SDXL pipelines)
    # (model) SDXL: no negative prompt → zero unconditional embeddings (model_index.json says it for a folder)
    force_zeros_for_empty_prompt: bool = False
    # (model) the SDXL refiner's micro-conditioning: an aesthetic score in place of the target size
    requires_aesthetics_score: bool = False
    xl: bool = False  # SDXL: two text towers (or the refiner's one), pooled embedding, micro-conditioning
    refiner: bool = False  # the SDXL refiner: OpenCLIP-bigG alone, no CLIP-L tower
    # Single files: what the family's rule takes a file to be that it does not store (said after its label), and
    # `ldm info`'s note on it.
    assumed: str = ""
    file_note: str | None = None
    unused_last_text_block: bool = False  # single files: the last OpenCLIP block is stored but unused (SD 2.x)

    @property
    def inpainting(self) -> bool:
        """A UNet that takes the mask and the masked image's latents besides the noisy latents."""
        return self.unet_in_channels > self.latent_channels

    def text_layer(self, clip_skip: int = 1) -> tuple[int, bool]:
        """(hidden layer, through the final LayerNorm) the UNet is conditioned on, for clip skip N (A1111's meaning:
        1 is the family's own layer). SD 1.x/2.x: layer -N through the final LayerNorm (SD 2.x folders already
        dropped OpenCLIP's last layer, so N counts from the penultimate there); SDXL: layer -(N+1) without it
        (diffusers' `clip_skip=N-1`)."""
        return (-1 - clip_skip, False) if self.penultimate else (-clip_skip, True)

    def with_model(self, **stated) -> "ModelSpec":
        """This family's spec with what a model's own configs state in place of the family's values (a folder's
        configs, or those inferred from a single file's shapes). A UNet with more inputs than latent channels in a
        family registered without one is that family's inpainting model (SD 1.x inpainting is SD 1.x with a
        9-channel UNet), and its label says so."""
        spec = dataclasses.replace(self, **stated)
        if spec.inpainting and not self.inpainting:
            spec = dataclasses.replace(spec, label=f"{spec.label} inpainting")
        return spec


_CLIP_L = "cond_stage_model.transformer."  # the single files' text tower prefixes
_OPENCLIP_H = "cond_stage_model.model."
_SD2_FILE_NOTE = ("the prediction type is not stored in a single file: SD 2.x defaults to v (768-px models); a "
                  "512-px SD 2.x base file needs --prediction-type eps")
_SD = {"penultimate": False, "vae_scaling_factor": 0.18215, "latent_space": "SD 1.x/2.x", "default_strength": 0.8}
_XL = {"penultimate": True, "unet_heads": None, "head_dim": 64, "sample_size": 128, "vae_scaling_factor": 0.13025,
       "latent_space": "SDXL", "default_strength": 0.3, "scheduler": EULER_LEADING, "upcast_vae": True, "xl": True}

SPECS = {spec.key: spec for spec in (
    ModelSpec("sd1", "SD 1.x", (TextTower("text_encoder", _CLIP_L, "clip"),), scheduler=PNDM, sample_size=64,
              unet_heads=8, head_dim=None, **_SD),
    ModelSpec("sd2", "SD 2.x", (TextTower("text_encoder", _OPENCLIP_H, "openclip"),), scheduler=DDIM_V,
              sample_size=96, unet_heads=None, head_dim=64, upcast_attention=True, assumed="768, v-prediction",
              file_note=_SD2_FILE_NOTE, unused_last_text_block=True, **_SD),
    ModelSpec("sd2-inpaint", "SD 2.x inpainting", (TextTower("text_encoder", _OPENCLIP_H, "openclip"),),
              scheduler=PNDM, sample_size=64, unet_heads=None, head_dim=64, unet_in_channels=9,
              unused_last_text_block=True, **_SD),
    ModelSpec("sdxl", "SDXL base", (TextTower("text_encoder", "conditioner.embedders.0.transformer.", "clip"),
                                    TextTower("text_encoder_2", "conditioner.embedders.1.model.", "openclip")),
              force_zeros_for_empty_prompt=True, **_XL),
    ModelSpec("sdxl-refiner", "SDXL refiner", (TextTower("text_encoder_2", "conditioner.embedders.0.model.",
                                                         "openclip"),),
              requires_aesthetics_score=True, refiner=True, **_XL),
)}
FAMILIES = SPECS  # the registry's old name, which `ldm.tools.bench` and tests/official.py import


# ----------------------------------------------------------------------------------- weights/ store


def weights_dir() -> Path:
    """Where users drop checkpoint files and where the manifest lives: $LDM_WEIGHTS, else the checkout's weights/."""
    return Path(os.environ.get("LDM_WEIGHTS") or Path(__file__).resolve().parents[2] / "weights")


@dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint of the manifest."""

    name: str
    family: str
    repo: str  # Hub repo of the diffusers folder (and of the single file)
    components: tuple[str, ...]  # the folder's component subfolders ldm downloads
    single_file: str | None  # the original single-file checkpoint in the same repo, if it is safetensors
    aliases: tuple[str, ...] = ()
    # the model card's defaults where they are not diffusers' (steps, guidance, width, height): the few-step models'
    card: dict = dataclasses.field(default_factory=dict, compare=False)
    note: str | None = None  # what `ldm info` says of it (how it is meant to be run)


def manifest() -> dict[str, Checkpoint]:
    path = weights_dir() / "manifest.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries = {name: Checkpoint(name=name, family=e["family"], repo=e["repo"], components=tuple(e["components"]),
                                    single_file=e.get("single_file"), aliases=tuple(e.get("aliases", ())),
                                    card=dict(e.get("card", {})), note=e.get("note"))
                   for name, e in raw["checkpoints"].items()}
    except FileNotFoundError:  # a store without the manifest: repo ids and paths still work, names do not
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise LoadError(f"{path} is malformed ({e})") from None
    for entry in entries.values():
        if entry.family not in SPECS:
            raise LoadError(f"{path}: {entry.name} names an unknown family {entry.family!r}")
    return entries


def lookup(model: str) -> Checkpoint | None:
    """The manifest entry a name, repo id or alias refers to (None: not an official checkpoint)."""
    for entry in manifest().values():
        if model in (entry.name, entry.repo, *entry.aliases):
            return entry
    return None
