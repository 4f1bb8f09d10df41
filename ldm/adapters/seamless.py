"""Seamless textures: circular padding in the UNet's and the VAE's convolutions, set on a loaded pipeline from
outside (design decision 5).

    set_seamless(pipe, True)   # images that tile (A1111 --tiling)

Seamless tiling is AUTOMATIC1111's `--tiling` (modules/sd_hijack.py `apply_circular`): every `nn.Conv2d`
of the UNet and the VAE pads circularly instead of with zeros, so the left edge continues the right
edge and the top the bottom. The VAE's strided downsampling pads its right/bottom by hand with zeros
(`F.pad`, then a convolution without padding), as LDM's does, so it stays as in A1111.
"""

from torch import nn

from ldm.errors import InputError


def set_seamless(pipe, enable: bool = True) -> int:
    """Circular (True) or zero (False) padding in every `nn.Conv2d` of the pipeline's UNet and VAE, as A1111's
    `--tiling`; returns how many convolutions changed mode. Apply before `ldm.speed.accelerate`: its Winograd
    convolutions and compiled graphs keep the mode they were built with."""
    mode = "circular" if enable else "zeros"
    changed = 0
    networks = pipe.networks()
    for network in (networks["unet"], networks["vae"]):
        for conv in network.modules():
            if isinstance(conv, nn.Conv2d) and conv.padding_mode != mode:
                if getattr(conv, "winograd_weight", None) is not None:
                    raise InputError("seamless tiling must be set before the networks are accelerated "
                                     "(Winograd convolutions pad with zeros)", field="tiling")
                conv.padding_mode = mode
                changed += 1
    pipe.seamless = enable  # (the infotext's Tiling)
    return changed
