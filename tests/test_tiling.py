"""Large images and seamless textures (ldm.speed.tiling): tiled VAE against diffusers' enable_tiling(), the seam check,
and circular padding that makes images wrap. Swapping the VAE (--vae): test_vae_swap.py."""

from functools import partial

import numpy as np
import pytest
import torch
from conftest import max_rel_err
from PIL import Image

from ldm.adapters.seamless import set_seamless
from ldm.errors import InputError
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.tiling import Tiles, disable_vae_tiling, enable_vae_tiling
from ldm_cli.main import main

TILE = 32  # pixels (4 latents): the fixture's 96×80 images take 4×4 tiles
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: threads cost more than they give


@pytest.fixture(scope="module")
def pipe(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder, device="cpu", safety_checker=False)


@pytest.fixture(scope="module")
def reference(sd1_folder):
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(sd1_folder / "vae").eval()
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size, vae.tile_overlap_factor = TILE, TILE // 8, 0.25
    return vae


def to_uint8(x: torch.Tensor) -> np.ndarray:
    return ((x / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).numpy()


@torch.no_grad()
def test_tiled_decode_and_encode_equal_diffusers(pipe, reference):
    z = torch.randn(1, 4, 12, 10, generator=torch.Generator().manual_seed(0))
    x = torch.rand(1, 3, 96, 80, generator=torch.Generator().manual_seed(1)) * 2 - 1
    enable_vae_tiling(pipe.vae, size=TILE)
    try:
        ours = pipe.vae.decode(z)
        mean, logvar = pipe.vae.encode(x)
    finally:
        disable_vae_tiling(pipe.vae)
    theirs = reference.decode(z).sample
    posterior = reference.encode(x).latent_dist
    assert ours.shape == theirs.shape == (1, 3, 96, 80)
    assert max_rel_err(ours, theirs) <= 1e-4
    assert np.abs(to_uint8(ours).astype(int) - to_uint8(theirs)).max() <= 2
    assert max_rel_err(mean, posterior.mean) <= 1e-4 and max_rel_err(logvar, posterior.logvar) <= 1e-4
    assert not torch.equal(ours, pipe.vae.decode(z))  # the tiles were used (and are gone again)


SEAM_LIMIT = 1.18  # measured (8 random latents, seed 10): blended 1.04-1.11, pasted tiles 1.27


def pasted_tiles(vae, z: torch.Tensor, tiles: Tiles) -> torch.Tensor:
    """The control: the same tiles decoded and pasted side by side, with no blend."""
    stride, keep = int(tiles.latent * (1 - tiles.overlap)), tiles.sample - int(tiles.sample * tiles.overlap)
    return torch.cat([torch.cat([vae.decode(z[:, :, i:i + tiles.latent, j:j + tiles.latent])[:, :, :keep, :keep]
                                 for j in range(0, z.shape[3], stride)], dim=3)
                      for i in range(0, z.shape[2], stride)], dim=2)


def join_step(image: torch.Tensor, at: torch.Tensor, dim: int) -> torch.Tensor:
    """The mean |step| between pixel `at - 1` and pixel `at` along `dim`."""
    return image.diff(dim=dim).abs().index_select(dim, at - 1).mean()


@torch.no_grad()
def test_no_seams_at_tile_borders(pipe):
    """Where tiles join (the first column and row each tile keeps, and where its blend ends), the tiled image's
    mean step between neighbouring pixels stays within 18 % of the untiled image's mean step at the same columns
    and rows (8 random latents). The control, each tile decoded and pasted with no blend, fails that criterion."""
    z = torch.randn(8, 4, 12, 12, generator=torch.Generator().manual_seed(10))
    whole = pipe.vae.decode(z)
    tiles = enable_vae_tiling(pipe.vae, size=TILE)
    try:
        tiled = pipe.vae.decode(z)
    finally:
        disable_vae_tiling(pipe.vae)
    naive = pasted_tiles(pipe.vae, z, tiles)
    keep = tiles.sample - int(tiles.sample * tiles.overlap)  # each tile keeps this many rows and columns
    joins = torch.tensor(range(keep, whole.shape[-1], keep))
    ends = joins + (tiles.sample - keep)  # where each blend ends
    for dim in (2, 3):  # rows, columns
        step = partial(join_step, dim=dim)
        for at in (joins, ends[ends < whole.shape[-1]]):
            assert step(tiled, at) <= SEAM_LIMIT * step(whole, at), (dim, at, step(tiled, at) / step(whole, at))
        assert step(naive, joins) > SEAM_LIMIT * step(whole, joins), (dim, step(naive, joins) / step(whole, joins))


def test_auto_tiles_only_what_does_not_fit(pipe, monkeypatch):
    import ldm.speed.tiling as tiling

    z = torch.randn(1, 4, 12, 12, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        whole = pipe.vae.decode(z)
        enable_vae_tiling(pipe.vae, "auto", size=TILE)
        try:
            assert torch.equal(pipe.vae.decode(z), whole)  # a 96² decode fits
            monkeypatch.setattr(tiling, "free_bytes", lambda device: 1000)
            assert not torch.equal(pipe.vae.decode(z), whole)
        finally:
            disable_vae_tiling(pipe.vae)


@pytest.mark.parametrize("size, overlap", [(30, 0.25), (16, 0.25), (64, 0.5), (64, 0), (True, 0.25)])
def test_bad_tile_options(pipe, size, overlap):
    with pytest.raises(InputError, match="tile"):
        Tiles.for_vae(pipe.vae, size, overlap)
    with pytest.raises(InputError, match="mode"):
        enable_vae_tiling(pipe.vae, "always")


def run(pipe, monkeypatch, shift: int) -> tuple[np.ndarray, str]:
    """A 128×64 image from seed 5, its starting noise rolled `shift` latents to the right."""
    start = type(pipe).start

    def rolled(plan):
        unet, x, paste = start(pipe, plan)
        return unet, torch.roll(x, shift, dims=-1), paste

    monkeypatch.setattr(pipe, "start", rolled)
    result = pipe("a tile", steps=3, seed=5, width=128, height=64, sampler="euler")
    monkeypatch.delattr(pipe, "start")
    return np.asarray(result.images[0], dtype=int), result.infotexts[0]


def test_seamless_images_wrap(pipe, monkeypatch):
    """With circular padding the image lives on a torus: noise rolled by 8 latents (the UNet's three
    downsamplings) gives the image rolled by 64 pixels, so the left edge continues the right edge exactly as
    column 64 continues column 63. With zero padding the edges are edges."""
    plain, _ = run(pipe, monkeypatch, 0)
    plain_rolled, _ = run(pipe, monkeypatch, 8)
    assert set_seamless(pipe, True) > 0
    try:
        assert {c.padding_mode for m in (pipe.unet, pipe.vae) for c in m.modules()
                if isinstance(c, torch.nn.Conv2d)} == {"circular"}
        seamless, text = run(pipe, monkeypatch, 0)
        seamless_rolled, _ = run(pipe, monkeypatch, 8)
    finally:
        assert set_seamless(pipe, False) > 0
    assert "Tiling: True" in text and "Tiling" not in run(pipe, monkeypatch, 0)[1]  # (the pipeline says it)
    assert np.abs(np.roll(seamless, 64, axis=1) - seamless_rolled).max() <= 1
    assert np.abs(np.roll(plain, 64, axis=1) - plain_rolled).max() > 10
    assert np.array_equal(run(pipe, monkeypatch, 0)[0], plain)  # off again: the same image as before


def cli_image(sd1_folder, out, *flags) -> np.ndarray:
    assert main(["generate", "a tile", "--model", str(sd1_folder), "--device", "cpu", "--steps", "2", "--seed", "3",
                 "--sampler", "euler", "--no-safety-checker", "-o", str(out), *flags]) == 0
    return np.asarray(Image.open(out).convert("RGB"))


@pytest.mark.parametrize("flags, message", [
    (["--vae-tile-size", "30"], "--vae-tile-size must be a multiple of 8"),
    (["--tiling", "--vae-tiling"], "--tiling does not combine with --vae-tiling"),
    (["--vae", "no-such-vae"], "--vae no-such-vae: no such file or folder"),
    (["--width", "100"], "width must be a positive multiple of 8"),
])
def test_bad_options_give_one_line(sd1_folder, tmp_path, capsys, flags, message):
    assert main(["generate", "a", "--model", str(sd1_folder), "--device", "cpu", "-o", str(tmp_path / "x.png"),
                 *flags]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


def test_cli_tiling_and_vae_tiling(sd1_folder, tmp_path):
    seamless = cli_image(sd1_folder, tmp_path / "seamless.png", "--tiling", "--width", "64", "--height", "64")
    assert "Tiling: True" in Image.open(tmp_path / "seamless.png").text["parameters"]
    again = tmp_path / "again.png"  # --from-png restores Tiling with the rest
    assert main(["generate", "--from-png", str(tmp_path / "seamless.png"), "--model", str(sd1_folder), "--device",
                 "cpu", "--no-safety-checker", "-o", str(again)]) == 0
    assert np.array_equal(np.asarray(Image.open(again).convert("RGB")), seamless)
    whole = cli_image(sd1_folder, tmp_path / "whole.png", "--width", "96")
    tiled = cli_image(sd1_folder, tmp_path / "tiled.png", "--width", "96", "--vae-tiling", "--vae-tile-size", "32")
    assert whole.shape == tiled.shape and not np.array_equal(whole, tiled)
