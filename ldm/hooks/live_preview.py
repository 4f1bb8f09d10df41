"""The live preview of a run in progress, as AUTOMATIC1111's `/sdapi/v1/progress` answers it in `current_image`: the
denoiser's latest estimate of the final image (x0), decoded by TAESD where one is loaded (A1111's "TAESD"), else by
A1111's "Approx cheap" (`modules/sd_vae_approx.py` `cheap_approximation`): each pixel of the latent (as the UNet sees
it, scaled) mapped to RGB by a fixed 4 × 3 matrix, an image the latent's size (1/8 of the image's side) for nothing.

    preview = live_preview(pipe, step.denoised)            # the first image's, as a PIL image (None: no approximation)
"""

import numpy as np
import torch
from PIL import Image
from torch import Tensor

# A1111 modules/sd_vae_approx.py `cheap_approximation` (after discuss.huggingface.co/t/…/23204/2): latent channel → RGB
CHEAP_FACTORS = {
    "SD 1.x/2.x": [[0.298, 0.207, 0.208], [0.187, 0.286, 0.173], [-0.158, 0.189, 0.264], [-0.184, -0.271, -0.473]],
    "SDXL": [[0.3448, 0.4168, 0.4395], [-0.1953, -0.0290, 0.0250], [0.1074, 0.0886, -0.0163],
             [-0.3730, -0.2499, -0.2088]],
}


def cheap_preview(latent: Tensor, latent_space: str) -> Image.Image | None:
    """One (scaled) latent, C × h × w, as A1111's "Approx cheap" shows it (sd_samplers_common.py
    `single_sample_to_image`: RGB × 0.5 + 0.5, clamped, × 255 truncated to uint8): an h × w image; None for a latent
    space A1111 has no factors for."""
    factors = CHEAP_FACTORS.get(latent_space)
    if factors is None or latent.shape[0] != len(factors):
        return None
    rgb = torch.einsum("lxy,lr->rxy", latent.detach().float().cpu(), torch.tensor(factors))
    rgb = torch.clamp(rgb * 0.5 + 0.5, min=0.0, max=1.0)
    return Image.fromarray((255.0 * np.moveaxis(rgb.numpy(), 0, 2)).astype(np.uint8))


def live_preview(pipe, denoised: Tensor, vae=None) -> Image.Image | None:
    """The first image of a step's x0 estimate (scaled latents, B × C × h × w): decoded by `vae` (a TAESD, full
    size) when given, else A1111's cheap approximation of the pipeline's latent space (latent size)."""
    if vae is not None:
        return pipe.decode(denoised[:1], vae)[0]
    return cheap_preview(denoised[0], pipe.spec.latent_space)
