"""ControlNet units in a run: the control images prepared, and the UNet called with the units' summed residuals.

Reproduces diffusers' StableDiffusion(XL)ControlNetPipeline (src/diffusers/pipelines/controlnet/pipeline_controlnet.py,
v0.42) and MultiControlNetModel: the control image resized to the output's size (Lanczos) in [0, 1]; at UNet call i
of N, a unit acts unless i/N < start or (i + 1)/N > end; each unit's residuals × its weight, summed over units; with
guess mode and guidance, only the conditional half goes through the ControlNet (zeros for the other). A1111's
control modes are sd-webui-controlnet's (scripts/hook.py): "prompt" and "control" weight residual i by
0.825^(12 − i) (soft injection), "control" also zeroes the unconditional half's (CFG injection). A unit that does
not act is not run at all, which changes nothing: the UNet without residuals is bit-identical to one given zeros.
"""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from ldm.choices import CONTROL_MODES, CONTROL_PREPROCESSORS, CONTROL_RESIZE_MODES
from ldm.loading.controlnets import fetched_from_hub
from ldm.networks.controlnet import ControlNet, scaled
from ldm.pipelines.preprocess import PREPROCESSORS, RESOLUTION, fitted, pixel_perfect_resolution, preprocess
from ldm.pipelines.request import Control
from ldm.speed.accelerate import accelerate_like
from ldm.speed.offload import offload_with


@dataclass
class Unit:
    """A control ready to run: its network and its control image as a (1, 3, H, W) tensor in [0, 1]."""

    control: Control
    net: ControlNet
    hint: Tensor

    def acts_at(self, call: int, calls: int) -> bool:
        """diffusers' `controlnet_keep` rule at UNet call `call` of `calls`."""
        return not (call / calls < self.control.start or (call + 1) / calls > self.control.end)


def like_unet(net: ControlNet, unet: torch.nn.Module) -> ControlNet:
    """The ControlNet given what was done to its plain UNet from outside since loading: `accelerate`'s layouts
    (`ldm.speed.accelerate.accelerate_like`: the ControlNet is built of the UNet's blocks) and its offload (moved on
    and off the device with it: `ldm.speed.offload.offload_with`), in that order (offload hooks the layers the
    layouts make). Called for every run that uses it; done again, nothing changes."""
    accelerate_like(unet, net)
    offload_with(unet, net)
    return net


def control_image(control: "Control | Image.Image", width: int, height: int, seed: int | None = None) -> Tensor:
    """The unit's control image as the ControlNet reads it, (1, 3, H, W) float32 in [0, 1]: its image (RGB), made
    over by its preprocessor if it names one (`ldm.pipelines.preprocess`, at the pixel-perfect resolution for
    width × height where the unit asks; shuffle draws from `seed`, the run's), then fitted to the output's size by
    its resize mode: just-resize stretches it with Lanczos where the size differs (diffusers' control
    `VaeImageProcessor`, `do_normalize=False`), crop-and-resize and resize-and-fill are sd-webui-controlnet's.
    An image alone: a unit without preprocessor, just resized."""
    unit = control if isinstance(control, Control) else Control(None, control)
    image = unit.image.convert("RGB")
    if unit.preprocess is not None:
        resolution = unit.processor_res
        if unit.pixel_perfect:  # (sd-webui-controlnet's: from the image as given, before its preprocessor)
            resolution = pixel_perfect_resolution(image.height, image.width, height, width, unit.resize)
        image = Image.fromarray(preprocess(np.asarray(image), unit.preprocess, unit.threshold_a, unit.threshold_b,
                                           resolution, seed))
    if unit.resize != "just-resize":
        image = Image.fromarray(fitted(np.asarray(image), unit.resize, width, height))
    elif image.size != (width, height):
        image = image.resize((width, height), Image.Resampling.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


def control_infotext(control: Control) -> str:
    """A unit's infotext value, as sd-webui-controlnet writes it (`infotext` quotes it: it holds commas): `Module:
    none, Model: NAME, Weight: 1.0, Resize Mode: Just Resize, …` (NAME: a file's or folder's name; a Hub id
    it was fetched by, whole); a preprocessor's parameters (`Processor Res`,
    `Threshold A`, `Threshold B`: those it has, with the values it ran with) after the resize mode, in its order;
    `Pixel Perfect: True` after the guidance end for a pixel-perfect unit (`Processor Res` then the one given, which
    the pixel-perfect one replaces, as it does when read back)."""
    name = control.model if isinstance(control.model, str) else getattr(control.model, "name", "controlnet")
    module = CONTROL_PREPROCESSORS[control.preprocess] if control.preprocess is not None else "none"
    hub_id = fetched_from_hub(str(name))  # (written whole: `--from-png` fetches it again)
    fields = {"Module": module, "Model": str(name) if hub_id else Path(str(name)).name, "Weight": control.weight,
              "Resize Mode": CONTROL_RESIZE_MODES[control.resize]}
    if control.preprocess is not None:
        p = PREPROCESSORS[control.preprocess]
        given = {"Processor Res": (control.processor_res, RESOLUTION if p.resolution else None),
                 "Threshold A": (control.threshold_a, p.param(0)), "Threshold B": (control.threshold_b, p.param(1))}
        fields |= {key: value if value is not None else param.default for key, (value, param) in given.items()
                   if param is not None}
    fields |= {"Guidance Start": control.start, "Guidance End": control.end}
    if control.pixel_perfect:  # (its `serialize_unit` writes the unit's fields in their order: this one here)
        fields["Pixel Perfect"] = True
    fields["Control Mode"] = CONTROL_MODES[control.mode]
    return ", ".join(f"{key}: {value}" for key, value in fields.items())


def residuals(unit: Unit, x: Tensor, t, kwargs: dict, guided: bool) -> tuple[list[Tensor], Tensor]:
    """One unit's weighted residuals for the UNet's batch `x` (with guidance: [unconditional; conditional])."""
    c = unit.control
    cond_only = guided and (c.guess_mode or c.mode == "control")
    if cond_only:  # the ControlNet sees the conditional half; the unconditional half gets zeros
        half = x.shape[0] // 2
        x, kwargs = x[half:], {k: v[half:] for k, v in kwargs.items()}
    hint = unit.hint.to(x.device, x.dtype).expand(x.shape[0], -1, -1, -1)
    # (an LCM UNet's embedded guidance is the UNet's own: a ControlNet takes it only where its config says so, and
    # diffusers' pipelines give it none)
    timestep_cond = kwargs.get("timestep_cond") if unit.net.config.time_cond_proj_dim else None
    down, mid = unit.net(x, t, kwargs["context"], hint, kwargs.get("text_embeds"), kwargs.get("time_ids"),
                         timestep_cond)
    down, mid = scaled(down, mid, c.weight, c.guess_mode, soft=c.mode != "balanced",
                       global_pool=unit.net.controlnet_config.global_pool_conditions)
    if cond_only:
        down, mid = [torch.cat([torch.zeros_like(d), d]) for d in down], torch.cat([torch.zeros_like(mid), mid])
    return down, mid


def with_controls(unet: Callable[..., Tensor], units: list[Unit], calls: int, guided: bool) -> Callable[..., Tensor]:
    """`unet(x, t, **conditioning)` with the units' residuals summed in; `calls`: the UNet calls the run makes (each
    call is one of diffusers' loop iterations), `guided`: the batch is classifier-free guidance's."""
    done = 0

    def controlled(x: Tensor, t, **kwargs) -> Tensor:
        nonlocal done
        call, done = done, done + 1
        down_sum, mid_sum = None, None
        for unit in units:
            if not unit.acts_at(call, calls) or unit.control.weight == 0:
                continue
            down, mid = residuals(unit, x, t, kwargs, guided)
            down_sum = down if down_sum is None else [a + b for a, b in zip(down_sum, down, strict=True)]
            mid_sum = mid if mid_sum is None else mid_sum + mid
        if down_sum is None:
            return unet(x, t, **kwargs)
        return unet(x, t, **kwargs, down_residuals=down_sum, mid_residual=mid_sum)

    return controlled
