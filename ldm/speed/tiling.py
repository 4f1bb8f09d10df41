"""Large images: the VAE in tiles, applied to a loaded VAE from outside (design decision 5).

    enable_vae_tiling(pipe.vae)          # decode/encode in overlapping tiles: diffusers' `enable_tiling()`
    enable_vae_tiling(pipe.vae, "auto")  # only where the whole-image pass would not fit in memory

    python -m ldm.speed.tiling 2048 on         # an SDXL VAE's 2048² decode: its time and peak RSS (BENCHMARKS.md)

Tiled VAE reproduces diffusers' `AutoencoderKL.tiled_decode` / `_tiled_encode` / `blend_v` / `blend_h`
(huggingface/diffusers v0.42.1, src/diffusers/models/autoencoders/autoencoder_kl.py): tiles of the VAE
config's `sample_size` pixels (`sample_size / 8` latents) that start every 75 % of a tile, each blended
linearly over the 25 % it shares with the tile above and the tile to the left, then cropped. The
`VAE` class stays as it is: `enable_vae_tiling` gives the instance its own `encode` / `decode`, and
`disable_vae_tiling` takes them away again.
"""

import os
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor

from ldm.choices import VAE_TILING_MODES
from ldm.errors import InputError
from ldm.networks.vae import VAE, VAEConfig
from ldm.speed.offload import execution_device

MIN_TILE_LATENTS = 4  # below this a tile overlaps its neighbour by less than one latent

# The untiled decoder's peak memory, in bytes per output pixel per channel of its full-resolution level
# (block_out_channels[0], 128 for every official VAE) per byte of the dtype: measured on the CPU in fp32 as the
# rise of the process's peak RSS (VmHWM) over an SD-sized VAE's decode at 256² (9.2) and 512² (7.9; 7.4 as the
# slope between them), rounded up. SDXL at 2048² in fp32: 8 × 2048² × 128 × 4 B = 16 GiB untiled.
DECODE_BYTES_PER_PIXEL_CHANNEL_BYTE = 8
AUTO_FRACTION = 0.5  # "auto" tiles when the estimate exceeds this share of the memory free on the device


@dataclass(frozen=True)
class Tiles:
    """diffusers' three tiling attributes: `tile_sample_min_size` (pixels), `tile_latent_min_size`, overlap."""

    sample: int
    latent: int
    overlap: float = 0.25

    @classmethod
    def for_vae(cls, vae: VAE, size: int | None = None, overlap: float = 0.25) -> "Tiles":
        """Tiles of `size` pixels (default: the VAE config's `sample_size`, as diffusers), checked."""
        scale = 2 ** (len(vae.config.block_out_channels) - 1)
        size = vae.config.sample_size if size is None else size
        if not isinstance(size, int) or isinstance(size, bool) or size < MIN_TILE_LATENTS * scale or size % scale:
            raise InputError(f"the VAE tile size must be a multiple of {scale} pixels, at least "
                             f"{MIN_TILE_LATENTS * scale}, "
                             f"got {size!r}", field="vae_tile_size")
        if not isinstance(overlap, (int, float)) or not 0 < overlap < 0.5:
            raise InputError(f"the VAE tile overlap must be a fraction in (0, 0.5), got {overlap!r}",
                             field="vae_tile_overlap")
        return cls(size, size // scale, float(overlap))


def blend_v(a: Tensor, b: Tensor, extent: int) -> Tensor:
    """b's top `extent` rows faded in from a's bottom rows (in place, as diffusers)."""
    extent = min(a.shape[2], b.shape[2], extent)
    for y in range(extent):
        b[:, :, y, :] = a[:, :, -extent + y, :] * (1 - y / extent) + b[:, :, y, :] * (y / extent)
    return b


def blend_h(a: Tensor, b: Tensor, extent: int) -> Tensor:
    """b's left `extent` columns faded in from a's right columns (in place, as diffusers)."""
    extent = min(a.shape[3], b.shape[3], extent)
    for x in range(extent):
        b[:, :, :, x] = a[:, :, :, -extent + x] * (1 - x / extent) + b[:, :, :, x] * (x / extent)
    return b


def tiled(run, x: Tensor, tile_in: int, tile_out: int, overlap: float) -> Tensor:
    """`run` over overlapping `tile_in`-sized tiles of x (each gives a `tile_out`-sized one), blended and joined.

    The tiles start every `tile_in * (1 - overlap)` and are blended over `tile_out * overlap`; each keeps its
    first `tile_out - blend` rows and columns. The blends write into the tiles, and a later blend reads the
    tile above or to the left as already blended, exactly as diffusers does."""
    stride = int(tile_in * (1 - overlap))
    blend = int(tile_out * overlap)
    keep = tile_out - blend
    rows = [[run(x[:, :, i:i + tile_in, j:j + tile_in]) for j in range(0, x.shape[3], stride)]
            for i in range(0, x.shape[2], stride)]
    joined = []
    for i, row in enumerate(rows):
        kept = []
        for j, tile in enumerate(row):
            if i > 0:
                tile = blend_v(rows[i - 1][j], tile, blend)
            if j > 0:
                tile = blend_h(row[j - 1], tile, blend)
            kept.append(tile[:, :, :keep, :keep])
        joined.append(torch.cat(kept, dim=3))
    return torch.cat(joined, dim=2)


def tiled_decode(vae: VAE, z: Tensor, tiles: Tiles) -> Tensor:
    """`vae.decode(z)` tile by tile (diffusers' `tiled_decode`)."""

    def run(tile: Tensor) -> Tensor:
        if vae.post_quant_conv is not None:
            tile = vae.post_quant_conv(tile)
        return vae.decoder(tile)

    return tiled(run, z, tiles.latent, tiles.sample, tiles.overlap)


def tiled_encode(vae: VAE, x: Tensor, tiles: Tiles) -> tuple[Tensor, Tensor]:
    """`vae.encode(x)` tile by tile (diffusers' `_tiled_encode`): the posterior's mean and clamped log-variance."""

    def run(tile: Tensor) -> Tensor:
        moments = vae.encoder(tile)
        return moments if vae.quant_conv is None else vae.quant_conv(moments)

    mean, logvar = tiled(run, x, tiles.sample, tiles.latent, tiles.overlap).chunk(2, dim=1)
    return mean, logvar.clamp(-30.0, 20.0)


def decode_bytes(vae: VAE, batch: int, height: int, width: int) -> int:
    """An estimate of the untiled decode's peak memory (the activations; the weights are already resident)."""
    itemsize = next(vae.parameters()).element_size()
    return DECODE_BYTES_PER_PIXEL_CHANNEL_BYTE * batch * height * width * vae.config.block_out_channels[0] * itemsize


def free_bytes(device: torch.device) -> int:
    """Memory free for activations: the CUDA device's free memory plus what PyTorch's caching allocator holds
    reserved but unused (free to this process's tensors, counted as used by the driver), or the host's
    MemAvailable."""
    if device.type == "cuda":
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return torch.cuda.mem_get_info(device)[0] + cached
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def needs_tiles(vae: VAE, batch: int, height: int, width: int) -> bool:
    """The "auto" rule: tile when the untiled decode's estimated peak exceeds half the free memory."""
    return decode_bytes(vae, batch, height, width) > AUTO_FRACTION * free_bytes(execution_device(vae))


def _decode(vae: VAE, tiles: Tiles, mode: str, z: Tensor) -> Tensor:
    larger = z.shape[-1] > tiles.latent or z.shape[-2] > tiles.latent
    scale = tiles.sample // tiles.latent
    if larger and (mode == "on" or needs_tiles(vae, z.shape[0], z.shape[-2] * scale, z.shape[-1] * scale)):
        return tiled_decode(vae, z, tiles)
    return VAE.decode(vae, z)


def _encode(vae: VAE, tiles: Tiles, mode: str, x: Tensor) -> tuple[Tensor, Tensor]:
    larger = x.shape[-1] > tiles.sample or x.shape[-2] > tiles.sample
    # the encoder's activations at full resolution are those of the decoder's last level
    if larger and (mode == "on" or needs_tiles(vae, x.shape[0], x.shape[-2], x.shape[-1])):
        return tiled_encode(vae, x, tiles)
    return VAE.encode(vae, x)


def enable_vae_tiling(vae: VAE, mode: str = "on", size: int | None = None, overlap: float = 0.25) -> Tiles:
    """Make `vae.decode` / `vae.encode` tile images larger than a tile: always ("on", diffusers'
    `enable_tiling()`), or only where the untiled pass would not fit ("auto": `needs_tiles`)."""
    if mode not in VAE_TILING_MODES:
        raise InputError(f"unknown VAE tiling mode {mode!r} (use {' or '.join(VAE_TILING_MODES)})", field="vae_tiling")
    tiles = Tiles.for_vae(vae, size, overlap)
    vae.decode = partial(_decode, vae, tiles, mode)
    vae.encode = partial(_encode, vae, tiles, mode)
    vae.tiling = (mode, tiles)
    return tiles


def disable_vae_tiling(vae: VAE) -> None:
    """Back to the class's whole-image `decode` / `encode`."""
    for name in ("decode", "encode", "tiling"):
        vae.__dict__.pop(name, None)


# --------------------------------------------------------------------------------- measurement

SDXL_VAE = {"block_out_channels": [128, 256, 512, 512], "latent_channels": 4, "layers_per_block": 2,
            "sample_size": 1024, "scaling_factor": 0.13025,
            "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


def _vm_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure_decode(size: int, mode: str | None = "on") -> dict:
    """A full-size SDXL VAE (random fp32 weights) decodes one `size`² image on the CPU: the wall time and this
    process's peak RSS (Linux VmHWM). `mode` is enable_vae_tiling's, or None for the whole-image decode. Run
    each case in a fresh process: VmHWM is the process's peak since exec."""
    import time

    torch.manual_seed(0)
    vae = VAE(VAEConfig.from_diffusers(SDXL_VAE)).eval()
    z = torch.randn(1, 4, size // 8, size // 8)
    estimate = decode_bytes(vae, 1, size, size)
    auto_tiles = needs_tiles(vae, 1, size, size)
    tiles = enable_vae_tiling(vae, mode) if mode else None
    before = _vm_kib("VmHWM")
    start = time.perf_counter()
    with torch.inference_mode():
        image = vae.decode(z)
    wall = time.perf_counter() - start
    assert image.shape == (1, 3, size, size)
    return {"size": size, "mode": mode or "untiled", "tiles": tiles and [tiles.sample, tiles.overlap],
            "threads": torch.get_num_threads(), "wall_s": round(wall, 1),
            "peak_rss_mib": _vm_kib("VmHWM") // 1024, "rss_before_decode_mib": before // 1024,
            "untiled_estimate_gib": round(estimate / 2**30, 2), "auto_would_tile": auto_tiles,
            "mem_available_gib": round(free_bytes(torch.device("cpu")) / 2**30, 1)}


if __name__ == "__main__":  # python -m ldm.speed.tiling SIZE [on|auto|untiled]
    import json
    import sys

    size = int(sys.argv[1]) if len(sys.argv) > 1 else 2048
    mode = sys.argv[2] if len(sys.argv) > 2 else "on"
    print(json.dumps(measure_decode(size, None if mode == "untiled" else mode)), flush=True)
