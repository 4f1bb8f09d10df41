"""`--vae FILE_OR_FOLDER` (README, "Large images and seamless textures"): a VAE with other weights than the model's,
given as a diffusers vae/ folder or as a single file in the original LDM names, on SD 1.x, the SDXL base and the
refiner, against diffusers' pipelines given that same VAE (`vae=AutoencoderKL…`); and the half-precision upcast
that the VAE config's `force_upcast` decides, against what diffusers' SDXL pipelines do."""

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF
from official import SD1_VAE, SDXL_VAE, diffusers_scheduler, make_vae, save_component
from PIL import Image
from safetensors.torch import load_file, save_file
from test_image_tasks import picture

from ldm.errors import LoadError
from ldm.loading.single_file import to_single_file, vae_rules
from ldm.pipelines.setup import load
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm_cli.main import main

MOVED = 10 * MAX_PIXEL_DIFF  # a control: the other VAE moves the image by more than this
pytestmark = pytest.mark.usefixtures("one_thread")  # ldm and diffusers compared in one process


def write_vae(root: Path, config: dict, seed: int) -> Path:
    """A random VAE of `config` (seed `seed`, other weights than any fixture model's) as `root/vae/`."""
    save_component(root / "vae", config, make_vae(config, seed).state_dict(), "diffusion_pytorch_model", False)
    return root / "vae"


@pytest.fixture(scope="module")
def other_sd1_vae(tmp_path_factory) -> Path:
    return write_vae(tmp_path_factory.mktemp("other-sd1"), SD1_VAE, seed=61)


@pytest.fixture(scope="module")
def other_xl_vae(tmp_path_factory) -> Path:
    return write_vae(tmp_path_factory.mktemp("other-xl"), SDXL_VAE, seed=71)


# The original VAE's names (CompVis' ldm/modules/diffusionmodules/model.py Encoder/Decoder under AutoencoderKL, as in
# vae-ft-mse-840000-ema-pruned.safetensors) for diffusers' AutoencoderKL names, written here from that layout, not
# taken from ldm's converter. The decoder's `up.N` count from the lowest resolution: diffusers' up_blocks reversed.
ORIGINAL_NAMES = [
    (r"^encoder\.down_blocks\.(\d+)\.resnets\.", r"encoder.down.\1.block."),
    (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
    (r"^decoder\.up_blocks\.(\d+)\.resnets\.", r"decoder.up.{\1}.block."),
    (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", r"decoder.up.{\1}.upsample."),
    (r"\.mid_block\.resnets\.0\.", ".mid.block_1."),
    (r"\.mid_block\.resnets\.1\.", ".mid.block_2."),
    (r"\.mid_block\.attentions\.0\.group_norm\.", ".mid.attn_1.norm."),
    (r"\.mid_block\.attentions\.0\.to_(q|k|v)\.", r".mid.attn_1.\1."),
    (r"\.mid_block\.attentions\.0\.to_out\.0\.", ".mid.attn_1.proj_out."),
    (r"\.conv_shortcut\.", ".nin_shortcut."),
    (r"\.conv_norm_out\.", ".norm_out."),
]  # conv_in, conv_out, quant_conv, post_quant_conv and the resnets' norm1/conv1/norm2/conv2 keep their names


SAMPLE_ORIGINAL_KEYS = {  # as in the original files (4 levels: the decoder's up.3 is the highest resolution)
    "encoder.down.0.block.0.norm1.weight", "encoder.down.2.block.0.nin_shortcut.weight", "encoder.mid.attn_1.q.weight",
    "quant_conv.weight", "post_quant_conv.weight", "decoder.up.1.block.0.nin_shortcut.weight",
    "decoder.up.3.block.2.conv2.weight", "decoder.up.3.upsample.conv.weight"}


def original_vae_file(vae_folder: Path, path: Path) -> Path:
    """The VAE of `vae_folder` as one .safetensors file in the original LDM names (`ORIGINAL_NAMES`), its attention
    projections 1×1 convolutions as in the original files."""
    state = load_file(str(vae_folder / "diffusion_pytorch_model.safetensors"))
    levels = len(SD1_VAE["block_out_channels"])
    tensors = {}
    for key, value in state.items():
        for pattern, name in ORIGINAL_NAMES:
            key = re.sub(pattern, name, key)
        key = re.sub(r"^decoder\.up\.\{(\d+)\}", lambda m: f"decoder.up.{levels - 1 - int(m[1])}", key)
        if re.search(r"\.attn_1\.(q|k|v|proj_out)\.weight$", key):
            value = value[:, :, None, None]
        tensors[key] = value.contiguous()
    assert SAMPLE_ORIGINAL_KEYS <= tensors.keys() and "decoder.up.0.upsample.conv.weight" not in tensors
    assert tensors["encoder.mid.attn_1.q.weight"].shape == (64, 64, 1, 1)
    save_file(tensors, str(path))
    return path


def diffusers_vae(source: Path, dtype: torch.dtype = torch.float32):
    """diffusers' AutoencoderKL of a vae/ folder, or of an original-layout file (`from_single_file`, the config of
    the folder the file was written from)."""
    from diffusers import AutoencoderKL

    if source.is_dir():
        return AutoencoderKL.from_pretrained(source, torch_dtype=dtype)
    return AutoencoderKL.from_single_file(str(source), config=str(source.parent / "other"), subfolder="vae",
                                          torch_dtype=dtype)


# ------------------------------------------------------------------------------------------------------- SD 1.x

PROMPT = "a tile"


def cli_image(folder: Path, out: Path, *flags: str) -> np.ndarray:
    """`ldm generate` on `folder`: 2 Euler steps, seed 3, 64×64, no safety checker."""
    assert main(["generate", PROMPT, "--model", str(folder), "--device", "cpu", "--steps", "2", "--seed", "3",
                 "--sampler", "euler", "--no-safety-checker", "-o", str(out), *flags]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def diffusers_sd1_image(folder: Path, vae=None) -> np.ndarray:
    """StableDiffusionPipeline on `folder` (with `vae` in place of its own where given), as `cli_image` runs."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None,
                                                   requires_safety_checker=False, **({"vae": vae} if vae else {}))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = diffusers_scheduler("euler", pipe.scheduler.config)
    images = pipe(PROMPT, num_inference_steps=2, height=64, width=64, generator=torch.Generator("cpu").manual_seed(3),
                  output_type="np").images
    assert images[0].std() > 0.04  # a real image
    return (images[0] * 255).round().astype(np.int16)


@pytest.fixture(scope="module")
def other_sd1_file(other_sd1_vae, tmp_path_factory) -> Path:
    """The other SD 1.x VAE as an original-layout single file, beside a copy of the folder it was written from."""
    root = tmp_path_factory.mktemp("other-sd1-file")
    shutil.copytree(other_sd1_vae, root / "other" / "vae")
    return original_vae_file(other_sd1_vae, root / "vae-other-sd1.safetensors")


@pytest.mark.parametrize("form", ["folder", "original-file"])
def test_another_vae_gives_diffusers_image_with_that_vae(sd1_folder, other_sd1_vae, other_sd1_file, tmp_path, form):
    """`--vae` with a VAE of other random weights, as a diffusers vae/ folder and as a single file in the original
    LDM names, equals StableDiffusionPipeline given that VAE (`AutoencoderKL.from_pretrained` of the folder,
    `AutoencoderKL.from_single_file` of the file); the PNG records `VAE: NAME`. The control
    (`test_the_other_vae_moves_the_image`) shows that the model's own VAE gives an image far from this one."""
    source = other_sd1_vae if form == "folder" else other_sd1_file
    reference = diffusers_vae(source)
    if form == "original-file":  # the file holds the folder's weights, as diffusers reads the original layout
        folder_state = load_file(str(other_sd1_vae / "diffusion_pytorch_model.safetensors"))
        assert reference.state_dict().keys() == folder_state.keys()
        assert all(torch.equal(v, folder_state[k]) for k, v in reference.state_dict().items())
    actual = cli_image(sd1_folder, tmp_path / "out.png", "--vae", str(source))
    expected = diffusers_sd1_image(sd1_folder, vae=reference)
    print(f"--vae {form}: max pixel difference {np.abs(actual - expected).max()}")
    assert np.abs(actual - expected).max() <= MAX_PIXEL_DIFF
    assert f"VAE: {source.stem if form == 'original-file' else 'vae'}" in Image.open(tmp_path / "out.png").text[
        "parameters"]


def test_the_other_vae_moves_the_image(sd1_folder, other_sd1_vae):
    """Control for `test_another_vae_gives_diffusers_image_with_that_vae`: in diffusers, the model's own VAE and the
    other VAE give images far apart, so an ldm that ignored `--vae` would fail there."""
    moved = np.abs(diffusers_sd1_image(sd1_folder) - diffusers_sd1_image(sd1_folder, diffusers_vae(other_sd1_vae)))
    print(f"own VAE → other VAE: max pixel difference {moved.max()}")
    assert moved.max() > MOVED


def test_a_vae_of_another_family_is_refused(sd1_folder, sdxl_folder, tmp_path):
    from ldm.networks.vae import VAE, VAEConfig

    with pytest.raises(LoadError, match=r"SDXL \(scaling factor 0.13025.*SD 1.x model.*SD 1.x/2.x \(scaling"):
        load(sd1_folder, device="cpu", safety_checker=False, vae=sdxl_folder / "vae")
    wide = VAE(VAEConfig(latent_channels=8, block_out_channels=(32, 32, 64, 64), layers_per_block=2))
    single = tmp_path / "vae-8ch.safetensors"
    save_file(to_single_file(vae_rules(wide.config, prefix=""), wide.state_dict()), single)
    with pytest.raises(LoadError, match="8 latent channels.*4 latent channels"):
        load(sd1_folder, device="cpu", safety_checker=False, vae=single)


def test_batch_and_serve_take_the_vae_and_tiling_options(sd1_folder, other_sd1_vae, tmp_path, capsys, monkeypatch):
    """--tiling and --vae (the other VAE) are model options: `ldm batch` gives the PNG `ldm generate` gives (pixels
    and parameters), and its resume fingerprint holds them; `ldm serve` loads the other VAE's weights, seamless,
    and refuses a bad combination in one line."""
    import ldm.serving.server
    from ldm.pipelines.setup import prepare_pipeline

    flags = ["--tiling", "--vae", str(other_sd1_vae)]
    cli_image(sd1_folder, tmp_path / "cli.png", *flags)
    rows = tmp_path / "rows.jsonl"
    rows.write_text(f'"{PROMPT}"\n')
    batch = ["batch", "--model", str(sd1_folder), "--device", "cpu", "--no-safety-checker", "--input", str(rows),
             "--output", str(tmp_path / "out"), "--seed", "3",
             "--parameters", '{"num_inference_steps": 2, "scheduler": "euler", "prompt_syntax": "a1111"}']
    assert main([*batch, *flags]) == 0, capsys.readouterr().err
    cli, batched = Image.open(tmp_path / "cli.png"), Image.open(tmp_path / "out" / "00000.png")
    assert np.array_equal(np.asarray(batched), np.asarray(cli))
    assert batched.text["parameters"] == cli.text["parameters"]
    assert "VAE: vae" in cli.text["parameters"] and "Tiling: True" in cli.text["parameters"]
    capsys.readouterr()
    assert main(batch) == 2  # the same folder without --tiling: another job
    assert "tiling" in capsys.readouterr().err

    started = []
    monkeypatch.setattr(ldm.serving.server, "serve", lambda settings, *args, **kwargs: started.append(settings))
    assert main(["serve", "--model", str(sd1_folder), "--device", "cpu", "--no-safety-checker", *flags]) == 0
    served = prepare_pipeline(started[0])  # what the server's worker loads
    other = load_file(str(other_sd1_vae / "diffusion_pytorch_model.safetensors"))
    assert served.vae.state_dict().keys() == other.keys()
    assert all(torch.equal(v, other[k]) for k, v in served.vae.state_dict().items())
    assert served.vae_name == "vae" and served.seamless
    capsys.readouterr()
    assert main(["serve", "--model", str(sd1_folder), "--tiling", "--vae-tiling"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--tiling does not combine with --vae-tiling" in err[0], err


# --------------------------------------------------------------------------------------------- SDXL and refiner

XL_PROMPT = "a lighthouse on a cliff at dawn"
LOADED = {}  # (pipeline class, folder, vae folder or None) → diffusers' pipeline, loaded once


def diffusers_xl(cls_name: str, folder: Path, vae: Path | None):
    """diffusers' SDXL pipeline `cls_name` on `folder`, with the VAE of `vae` in place of its own where given, its
    scheduler fresh from the folder's config."""
    import diffusers

    if (cls_name, folder, vae) not in LOADED:
        pipe = getattr(diffusers, cls_name).from_pretrained(folder, add_watermarker=False,
                                                            **({"vae": diffusers_vae(vae)} if vae else {}))
        pipe.set_progress_bar_config(disable=True)
        LOADED[cls_name, folder, vae] = pipe
    pipe = LOADED[cls_name, folder, vae]
    pipe.scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    return pipe


def as_pixels(images) -> np.ndarray:
    assert images[0].std() > 0.04  # a real image, not a flat one that any output would match
    return (images[0] * 255).round().astype(np.int16)


def generate(out: Path, *args: str) -> np.ndarray:
    assert main(["generate", XL_PROMPT, "--device", "cpu", "-o", str(out), *args]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


def base_with_diffusers(folder: Path, vae: Path | None) -> np.ndarray:
    return as_pixels(diffusers_xl("StableDiffusionXLPipeline", folder, vae)(
        XL_PROMPT, num_inference_steps=4, guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(12),
        output_type="np").images)


def refine_with_diffusers(folder: Path, vae: Path | None, init: Image.Image) -> np.ndarray:
    return as_pixels(diffusers_xl("StableDiffusionXLImg2ImgPipeline", folder, vae)(
        XL_PROMPT, image=init, num_inference_steps=10, guidance_scale=7.5,
        generator=torch.Generator("cpu").manual_seed(7), output_type="np").images)


def hand_off_with_diffusers(base: Path, refiner: Path, vae: Path | None) -> np.ndarray:
    generator = torch.Generator("cpu").manual_seed(3)  # one generator for both, as diffusers documents
    latents = diffusers_xl("StableDiffusionXLPipeline", base, vae)(
        XL_PROMPT, num_inference_steps=6, guidance_scale=7.5, denoising_end=0.8, generator=generator,
        output_type="latent").images
    return as_pixels(diffusers_xl("StableDiffusionXLImg2ImgPipeline", refiner, vae)(
        XL_PROMPT, image=latents, num_inference_steps=6, guidance_scale=7.5, denoising_start=0.8, generator=generator,
        output_type="np").images)


def assert_swapped(name: str, actual: np.ndarray, expected: np.ndarray, own: np.ndarray) -> None:
    """ldm with the other VAE within the tolerance of diffusers with it, and diffusers with the model's own VAE (the
    control) far from it."""
    diff, moved = np.abs(actual - expected).max(), np.abs(own - expected).max()
    print(f"{name}: max pixel difference {diff}; the model's own VAE moves it by {moved}")
    assert actual.shape == expected.shape and diff <= MAX_PIXEL_DIFF
    assert moved > MOVED


def test_another_vae_on_the_sdxl_base(sdxl_folder, other_xl_vae, tmp_path):
    """`--vae` (an SDXL VAE of other random weights) on the SDXL base equals StableDiffusionXLPipeline given it."""
    actual = generate(tmp_path / "out.png", "--model", str(sdxl_folder), "--steps", "4", "--seed", "12", "--vae",
                      str(other_xl_vae))
    assert_swapped("sdxl base --vae", actual, base_with_diffusers(sdxl_folder, other_xl_vae),
                   base_with_diffusers(sdxl_folder, None))
    assert "VAE: vae" in Image.open(tmp_path / "out.png").text["parameters"]


def test_another_vae_on_the_refiner(sdxl_refiner_folder, other_xl_vae, tmp_path):
    """`--vae` on the refiner alone (image-to-image: the VAE encodes the image and decodes the result) equals
    StableDiffusionXLImg2ImgPipeline given it."""
    init = picture(64, 72, seed=5)
    init.save(tmp_path / "init.png")
    actual = generate(tmp_path / "out.png", "--model", str(sdxl_refiner_folder), "--image", str(tmp_path / "init.png"),
                      "--steps", "10", "--seed", "7", "--vae", str(other_xl_vae))
    assert_swapped("sdxl refiner --vae", actual, refine_with_diffusers(sdxl_refiner_folder, other_xl_vae, init),
                   refine_with_diffusers(sdxl_refiner_folder, None, init))


def test_another_vae_on_the_base_to_refiner_hand_off(sdxl_folder, sdxl_refiner_folder, other_xl_vae, tmp_path):
    """`--vae` with `--refiner` ("both models use it"): the hand-off's latents are decoded by the other VAE, as
    diffusers' base (denoising_end) → refiner (denoising_start) both given it."""
    actual = generate(tmp_path / "out.png", "--model", str(sdxl_folder), "--refiner", str(sdxl_refiner_folder),
                      "--steps", "6", "--seed", "3", "--vae", str(other_xl_vae))
    assert_swapped("sdxl base → refiner --vae", actual,
                   hand_off_with_diffusers(sdxl_folder, sdxl_refiner_folder, other_xl_vae),
                   hand_off_with_diffusers(sdxl_folder, sdxl_refiner_folder, None))


# ------------------------------------------------------------------------------------- force_upcast, half precision

HALF = {"fp16": torch.float16, "bf16": torch.bfloat16}


def diffusers_rule(dtype: torch.dtype, force_upcast: bool) -> torch.dtype:
    """StableDiffusionXL(Img2Img)Pipeline.__call__ before decoding: `needs_upcasting = self.vae.dtype ==
    torch.float16 and self.vae.config.force_upcast`, then `upcast_vae()` (fp32); otherwise the VAE's own dtype."""
    return torch.float32 if dtype == torch.float16 and force_upcast else dtype


def with_force_upcast(vae_folder: Path, root: Path, force_upcast: bool) -> Path:
    """A copy of `vae_folder` whose config says `force_upcast` (false: an "fp16-fix" VAE)."""
    shutil.copytree(vae_folder, root / "vae")
    config = json.loads((root / "vae" / "config.json").read_text()) | {"force_upcast": force_upcast}
    (root / "vae" / "config.json").write_text(json.dumps(config))
    return root / "vae"


def recording(vae, method: str, seen: list) -> None:
    """Wrap `vae.<method>` to record the dtype of the VAE's weights at each call (the dtype it runs in)."""
    run = getattr(vae, method)

    def recorded(x, *args, **kwargs):
        seen.append(next(vae.parameters()).dtype)
        return run(x, *args, **kwargs)

    setattr(vae, method, recorded)


def ldm_vae_dtypes(folder: Path, dtype: str, vae: Path | None, image: Image.Image | None = None) -> dict:
    """The dtypes ldm's VAE runs in (encode where `image`, decode), one step on the CPU in `dtype`."""
    pipe = StableDiffusion.from_pretrained(folder, device="cpu", dtype=dtype, vae=vae)
    seen = {"encode": [], "decode": []}
    for method, calls in seen.items():
        recording(pipe.vae, method, calls)
    pipe(XL_PROMPT, steps=1 if image is None else 4, seed=0, **({"image": image} if image else {}))
    return {k: set(v) for k, v in seen.items() if v}


def diffusers_vae_dtypes(cls_name: str, folder: Path, dtype: str, vae: Path | None,
                         image: Image.Image | None = None) -> dict:
    """The dtypes diffusers' `cls_name` runs its VAE in (encode where `image`, decode), the pipeline and the VAE
    loaded in `dtype` (`torch_dtype`), one step on the CPU."""
    import diffusers

    extra = {"vae": diffusers_vae(vae, HALF[dtype])} if vae else {}
    pipe = getattr(diffusers, cls_name).from_pretrained(folder, add_watermarker=False, torch_dtype=HALF[dtype], **extra)
    pipe.set_progress_bar_config(disable=True)
    seen = {"encode": [], "decode": []}
    for method, calls in seen.items():
        recording(pipe.vae, method, calls)
    pipe(XL_PROMPT, num_inference_steps=1 if image is None else 4, generator=torch.Generator().manual_seed(0),
         output_type="np", **({"image": image} if image else {}))
    return {k: set(v) for k, v in seen.items() if v}


@pytest.fixture(scope="module")
def xl_with_fp16_fix_vae(sdxl_folder, tmp_path_factory) -> Path:
    """A copy of the tiny SDXL base whose own VAE config says force_upcast false."""
    root = tmp_path_factory.mktemp("xl-fp16-fix") / "tiny-sdxl-fp16-fix"
    shutil.copytree(sdxl_folder, root, ignore=shutil.ignore_patterns("vae"))
    with_force_upcast(sdxl_folder / "vae", root, False)
    return root


@pytest.mark.parametrize("force_upcast", [True, False])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_sdxl_decodes_in_the_dtype_force_upcast_decides(sdxl_folder, xl_with_fp16_fix_vae, other_xl_vae, tmp_path,
                                                        dtype, force_upcast):
    """In half precision the SDXL VAE decodes in fp32 where its config says force_upcast, and in the pipeline's
    dtype where it says false ("fp16-fix"): diffusers' rule (`diffusers_rule`: the upcast is for fp16 only, so a
    bf16 VAE stays bf16) and what StableDiffusionXLPipeline does, for the model's own VAE and for `--vae`."""
    own = sdxl_folder if force_upcast else xl_with_fp16_fix_vae
    swapped = with_force_upcast(other_xl_vae, tmp_path, force_upcast)
    expected = {"decode": {diffusers_rule(HALF[dtype], force_upcast)}}
    for folder, vae in ((own, None), (sdxl_folder, swapped)):
        assert diffusers_vae_dtypes("StableDiffusionXLPipeline", folder, dtype, vae) == expected
        assert ldm_vae_dtypes(folder, dtype, vae) == expected, (folder.name, vae)


@pytest.mark.parametrize("force_upcast", [True, False])
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_refiner_runs_its_vae_in_the_dtype_force_upcast_decides(sdxl_refiner_folder, other_xl_vae, tmp_path,
                                                               dtype, force_upcast):
    """The refiner's `--vae` in half precision: the decode as the base (`diffusers_rule`), and the image's encode as
    StableDiffusionXLImg2ImgPipeline.prepare_latents does it: fp32 whenever force_upcast, in any dtype."""
    init = picture(64, 72, seed=5)
    swapped = with_force_upcast(other_xl_vae, tmp_path, force_upcast)
    expected = {"encode": {torch.float32 if force_upcast else HALF[dtype]},
                "decode": {diffusers_rule(HALF[dtype], force_upcast)}}
    theirs = diffusers_vae_dtypes("StableDiffusionXLImg2ImgPipeline", sdxl_refiner_folder, dtype, swapped, init)
    assert theirs == expected
    ours = ldm_vae_dtypes(sdxl_refiner_folder, dtype, swapped, init)
    assert ours["decode"] == expected["decode"]
    assert ours["encode"] == expected["encode"]
