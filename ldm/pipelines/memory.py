"""Will a request fit? Its activation memory, estimated before anything is allocated, against the memory free where
it runs; and an allocator failure that still happens told in one line.

The estimate is a lower bound, so that nothing that would fit is refused: the larger of
- the UNet at the latents' full resolution: a ResNet block there holds at least its input and its output, each
  `block_out_channels[0]` channels of every image of the batch (twice the batch with classifier-free guidance);
- the VAE decode of the whole batch, as the VAE tiling's "auto" rule estimates it (`ldm.speed.tiling.decode_bytes`,
  measured), or of one tile of one image when the VAE is tiled ("on" or "auto").
The free memory is the CUDA device's, or the host's MemAvailable (`ldm.speed.tiling.free_bytes`).
"""

import functools
import math

import torch

from ldm.errors import LdmError
from ldm.pipelines.plan import Plan
from ldm.speed.offload import execution_device
from ldm.speed.tiling import decode_bytes, free_bytes

UNET_TENSORS = 2  # the input and output of a ResNet block at the latents' full resolution: the least a step holds
ALLOCATION_FAILURES = ("can't allocate memory", "out of memory", "not enough memory")  # torch's CPU/CUDA wording


class OutOfMemory(LdmError):
    """A request too large for the memory where it runs (refused before it starts, or failed while running)."""


def gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB"


def activation_bytes(pipe, plan: Plan) -> tuple[int, str]:
    """The request's estimated peak activations in bytes, and which part of the run needs them."""
    r = plan.request
    batch, _, h, w = plan.shape
    passes = batch * (2 if r.guidance > 1 and not pipe.embeds_guidance else 1)
    network = pipe.networks()["unet"]  # (under a speed wrapper, if any)
    itemsize = next(network.parameters()).element_size()
    unet = UNET_TENSORS * passes * network.config.block_out_channels[0] * h * w * itemsize
    vae = 0
    if r.output_type != "latent" and r.denoising_end is None:
        mode, tiles = getattr(pipe.vae, "tiling", (None, None))
        tiled = mode in ("on", "auto")  # ("auto" tiles whatever would not fit whole)
        vae = decode_bytes(pipe.vae, 1, tiles.sample, tiles.sample) if tiled else \
            decode_bytes(pipe.vae, batch, r.height, r.width)
    return (unet, "the UNet") if unet >= vae else (vae, "the VAE decode")


def check_fits(pipe, plan: Plan) -> Plan:
    """`plan` as it is, if its activations fit in the memory free where the pipeline runs; else OutOfMemory naming
    the size it needs and the largest square image that would fit."""
    need, part = activation_bytes(pipe, plan)
    device = execution_device(pipe.networks()["unet"])
    free = free_bytes(device)
    if need <= free:
        return plan
    r, n = plan.request, plan.shape[0]
    step = 8 * pipe.vae_scale
    side = int(math.sqrt(r.width * r.height * free / need)) // step * step
    fits = f"about {side}×{side} would fit" if side >= step else "no size would fit"
    hint = " (or --vae-tiling)" if part == "the VAE decode" else ""
    images = f"{n} image{'s' if n > 1 else ''}"
    raise OutOfMemory(f"{r.width}×{r.height}, {images}: {part} needs at least {gib(need)}, more than the "
                      f"{gib(free)} free on {device}; {fits}{hint}")


def memory_errors(generate):
    """`generate` with the allocator's failure (torch.OutOfMemoryError, the CPU allocator's RuntimeError) told in
    one line, an OutOfMemory, on every entry point (the CLI's exit 2, the server's and batch's row error)."""

    @functools.wraps(generate)
    def run(pipe, request, *args, **kwargs):
        try:
            return generate(pipe, request, *args, **kwargs)
        except RuntimeError as e:  # (torch.OutOfMemoryError is one)
            if not isinstance(e, torch.OutOfMemoryError) and not any(s in str(e) for s in ALLOCATION_FAILURES):
                raise
            wanted = str(e).split("you tried to allocate ")[-1].split(".")[0] if "tried to allocate" in str(e) else ""
            raise OutOfMemory(f"out of memory on {execution_device(pipe.networks()['unet'])}"
                              + (f" (an allocation of {wanted})" if wanted else "")
                              + ": ask for a smaller size or fewer images, or use --vae-tiling or --offload") from None

    return run

