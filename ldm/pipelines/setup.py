"""Loading a pipeline: a diffusers folder (or its Hub id) or an original single-file checkpoint → a ready
pipeline (`ldm.loading.components` reads the files; `StableDiffusion.from_components` builds the pipeline).

    pipe = load("stable-diffusion-v1-5/stable-diffusion-v1-5", device="cuda")   # StableDiffusion.from_pretrained
"""

from pathlib import Path

from ldm.loading.components import load_components, load_single_file_components
from ldm.pipelines.stable_diffusion import StableDiffusion


def load(model: str | Path, device: str = "auto", dtype: str = "auto", variant: str | None = None,
         revision: str | None = None, local_files_only: bool = False, prediction_type: str | None = None,
         safety_checker: bool = True, vae: str | Path | None = None) -> StableDiffusion:
    """`ldm.loading.components.load_components` → a pipeline (a `StableDiffusionXL` for SDXL models)."""
    return StableDiffusion.from_components(load_components(model, device, dtype, variant, revision, local_files_only,
                                                           prediction_type, safety_checker, vae))


def load_single_file(path: str | Path, device: str = "auto", dtype: str = "auto", prediction_type: str | None = None,
                     vae: str | Path | None = None) -> StableDiffusion:
    """`ldm.loading.components.load_single_file_components` → a pipeline."""
    return StableDiffusion.from_components(load_single_file_components(path, device, dtype, prediction_type, vae))
