"""Small wrappers that turn a UNet into the denoiser the samplers call.

    unet ──guided()──▶ model(x_in, t) → ε or v ──PredictionDenoiser──▶ denoiser(x, σ) → x0

`guided` is classifier-free guidance (Ho & Salimans 2022) on the UNet's output, with the batch layout
diffusers uses ([unconditional; conditional]). `PredictionDenoiser` maps σ to the UNet's input scaling and
timestep and its ε, v or x0 output to x0 (Karras et al. 2022, Table 1 / Salimans & Ho 2022 for v; an x0 ("sample")
model's output is x0 itself).
"""

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from ldm.sampling.schedules import PREDICTIONS, Schedule, sigma_to_t

Model = Callable[[Tensor, float], Tensor]


def guided(unet: Callable[..., Tensor], cond: dict[str, Tensor], uncond: dict[str, Tensor] | None,
           scale: float, rescale: float = 0.0) -> Model:
    """`model(x, t)`: the UNet's output under classifier-free guidance of strength `scale`.

    `cond`/`uncond` are the UNet's conditioning keyword arguments (context, and SDXL's text_embeds and
    time_ids). Without `uncond` (guidance off) the UNet runs once on the conditional batch. `rescale`
    blends in the guided output rescaled to the conditional output's standard deviation (Lin et al. 2023,
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", §3.4; diffusers' `guidance_rescale`).
    """
    if uncond is None:
        return lambda x, t: unet(x, t, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def model(x: Tensor, t: float) -> Tensor:
        out_uncond, out_cond = unet(torch.cat([x, x]), t, **both).chunk(2)
        out = out_uncond + scale * (out_cond - out_uncond)
        if rescale > 0:
            dims = list(range(1, out.ndim))
            rescaled = out * (out_cond.std(dim=dims, keepdim=True) / out.std(dim=dims, keepdim=True))
            out = rescale * rescaled + (1 - rescale) * out
        return out

    return model


def with_channels(unet: Callable[..., Tensor], extra: Tensor) -> Callable[..., Tensor]:
    """The UNet with `extra` channels concatenated to its input (inpainting: mask and masked-image latents).

    The extra channels are not scaled with x and are tiled to the batch, as diffusers does.
    """

    def conditioned(x: Tensor, t: float, **kwargs) -> Tensor:
        tiled = extra.repeat(x.shape[0] // extra.shape[0], 1, 1, 1)
        return unet(torch.cat([x, tiled.to(x.dtype)], dim=1), t, **kwargs)

    return conditioned


class PredictionDenoiser:
    """`denoiser(x, σ)` → x0 for a UNet trained on discrete timesteps (ε-, v- or x0-prediction).

    The UNet sees x / √(σ²+1) (the variance-preserving latent) at the timestep the schedule pairs with σ,
    in `dtype` (the UNet's); the sampler's own state stays in the dtype of x (float32 in the pipelines).
    A σ the schedule does not list gets the fractional timestep interpolated linearly in log σ between its
    two neighbours on the training grid (k-diffusion's `DiscreteSchedule.sigma_to_t`, clamped to 0 … T-1).
    """

    def __init__(self, model: Model, schedule: Schedule, prediction_type: str = "epsilon",
                 dtype: torch.dtype | None = None):
        if prediction_type not in PREDICTIONS:
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.model, self.prediction_type, self.dtype = model, prediction_type, dtype
        self.timestep_of = dict(zip(schedule.sigmas, schedule.timesteps, strict=False))
        self.log_sigmas = None if schedule.training_sigmas is None else np.log(schedule.training_sigmas)

    def timestep(self, sigma: float) -> float:
        """The UNet timestep for σ: the schedule's own where it lists σ, else interpolated in log σ."""
        t = self.timestep_of.get(sigma)
        if t is not None:
            return t
        if self.log_sigmas is None:
            raise KeyError(f"σ = {sigma} is not on the schedule and the schedule has no training grid to place it on")
        return float(sigma_to_t(np.array([sigma]), self.log_sigmas)[0])

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        t = self.timestep(sigma)
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        out = self.model((x * c_in).to(self.dtype or x.dtype), t).to(x.dtype)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        if self.prediction_type == "sample":
            return out
        return x / (sigma**2 + 1.0) - out * (sigma * c_in)
