"""Small wrappers that turn a UNet into the denoiser the samplers call.

    unet ──guided()──▶ model(x_in, t) → ε or v ──Denoiser──▶ denoiser(x, σ) → x0

`guided` is classifier-free guidance (Ho & Salimans 2022) on the UNet's output, with the batch layout
diffusers uses ([unconditional; conditional]). `Denoiser` maps σ to the UNet's input scaling and
timestep and its ε or v output to x0 (Karras et al. 2022, Table 1 / Salimans & Ho 2022 for v).
"""

from collections.abc import Callable

import torch
from torch import Tensor

from .schedules import Schedule

Model = Callable[[Tensor, float], Tensor]


def guided(unet: Callable[..., Tensor], cond: dict[str, Tensor], uncond: dict[str, Tensor] | None,
           scale: float) -> Model:
    """`model(x, t)`: the UNet's output under classifier-free guidance of strength `scale`.

    `cond`/`uncond` are the UNet's conditioning keyword arguments (context, and SDXL's text_embeds and
    time_ids). Without `uncond` (guidance off) the UNet runs once on the conditional batch.
    """
    if uncond is None:
        return lambda x, t: unet(x, t, **cond)
    both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}

    def model(x: Tensor, t: float) -> Tensor:
        out_uncond, out_cond = unet(torch.cat([x, x]), t, **both).chunk(2)
        return out_uncond + scale * (out_cond - out_uncond)

    return model


class Denoiser:
    """`denoiser(x, σ)` → x0 for a UNet trained on discrete timesteps (ε- or v-prediction).

    The UNet sees x / √(σ²+1) (the variance-preserving latent) at the timestep the schedule pairs with σ.
    """

    def __init__(self, model: Model, schedule: Schedule, prediction_type: str = "epsilon"):
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"unknown prediction_type {prediction_type!r}")
        self.model, self.prediction_type = model, prediction_type
        self.timestep_of = dict(zip(schedule.sigmas, schedule.timesteps, strict=False))

    def __call__(self, x: Tensor, sigma: float) -> Tensor:
        t = self.timestep_of[sigma]
        c_in = 1.0 / (sigma**2 + 1.0) ** 0.5
        out = self.model(x * c_in, t)
        if self.prediction_type == "epsilon":
            return x - sigma * out
        return x / (sigma**2 + 1.0) - out * (sigma * c_in)
