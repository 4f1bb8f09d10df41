"""The model families ldm loads, and the manifest of their official checkpoints (`weights/manifest.json`).

A `Family` holds what a checkpoint does not store but the official configs fix: the UNet's head
convention, the native size, the VAE scaling factor, the prediction type and the scheduler the official
repo ships. A diffusers folder states most of it in its config.json files; a single-file checkpoint
states none of it, so `ldm.loading.single_file` reads it from here.
"""

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ldm.errors import LoadError

# The official scheduler/scheduler_config.json files (absent fields take each class's defaults).
_DDPM_BETAS = {"num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
               "beta_schedule": "scaled_linear", "trained_betas": None, "steps_offset": 1, "clip_sample": False,
               "set_alpha_to_one": False, "skip_prk_steps": True}
PNDM = {"_class_name": "PNDMScheduler"} | _DDPM_BETAS  # SD 1.x, SD 2-inpainting
DDIM_V = {"_class_name": "DDIMScheduler", "prediction_type": "v_prediction"} | _DDPM_BETAS  # SD 2.1
EULER_LEADING = {"_class_name": "EulerDiscreteScheduler", "prediction_type": "epsilon", "timestep_spacing": "leading",
                 "interpolation_type": "linear", "use_karras_sigmas": False, "sample_max_value": 1.0} | _DDPM_BETAS


@dataclass(frozen=True)
class Family:
    key: str
    label: str
    unet_heads: int | None  # a fixed number of heads per level (SD 1.x) …
    head_dim: int | None  # … or heads of a fixed width (SD 2.x, SDXL)
    sample_size: int  # latent size of the native resolution
    vae_scaling_factor: float
    scheduler: dict
    upcast_attention: bool = False
    xl: bool = False
    refiner: bool = False  # SDXL refiner: aesthetic-score conditioning, no CLIP-L tower


FAMILIES = {f.key: f for f in (
    Family("sd1", "SD 1.x", unet_heads=8, head_dim=None, sample_size=64, vae_scaling_factor=0.18215, scheduler=PNDM),
    Family("sd2", "SD 2.x (768, v-prediction)", unet_heads=None, head_dim=64, sample_size=96,
           vae_scaling_factor=0.18215, scheduler=DDIM_V, upcast_attention=True),
    Family("sd2-inpaint", "SD 2 inpainting", unet_heads=None, head_dim=64, sample_size=64,
           vae_scaling_factor=0.18215, scheduler=PNDM),
    Family("sdxl", "SDXL base", unet_heads=None, head_dim=64, sample_size=128, vae_scaling_factor=0.13025,
           scheduler=EULER_LEADING, xl=True),
    Family("sdxl-refiner", "SDXL refiner", unet_heads=None, head_dim=64, sample_size=128,
           vae_scaling_factor=0.13025, scheduler=EULER_LEADING, xl=True, refiner=True),
)}

PREDICTION_TYPES = {"eps": "epsilon", "v": "v_prediction"}  # --prediction-type → scheduler config value
TEXT_HEAD_DIM = 64  # CLIP ViT-L/14, OpenCLIP ViT-H/14 and ViT-bigG/14 all use 64-wide heads


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


def manifest() -> dict[str, Checkpoint]:
    path = weights_dir() / "manifest.json"
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        entries = {name: Checkpoint(name=name, family=e["family"], repo=e["repo"], components=tuple(e["components"]),
                                    single_file=e.get("single_file"), aliases=tuple(e.get("aliases", ())))
                   for name, e in raw["checkpoints"].items()}
    except FileNotFoundError:  # a store without the manifest: repo ids and paths still work, names do not
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise LoadError(f"{path} is malformed ({e})") from None
    for entry in entries.values():
        if entry.family not in FAMILIES:
            raise LoadError(f"{path}: {entry.name} names an unknown family {entry.family!r}")
    return entries


def lookup(model: str) -> Checkpoint | None:
    """The manifest entry a name, repo id or alias refers to (None: not an official checkpoint)."""
    for entry in manifest().values():
        if model in (entry.name, entry.repo, *entry.aliases):
            return entry
    return None
