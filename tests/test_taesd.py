"""TAESD (ldm.networks.taesd, ldm.loading.tiny_vae) against diffusers' AutoencoderTiny: the network, the files people
use (an AutoencoderTiny folder as madebyollin/taesd ships it, and the original taesd_encoder/decoder.safetensors),
whole images with it as `--vae` against StableDiffusionPipeline(vae=AutoencoderTiny), and previews decoded by it."""

import numpy as np
import pytest
import torch
from conftest import MAX_PIXEL_DIFF, max_rel_err
from diffusers import AutoencoderTiny, StableDiffusionImg2ImgPipeline, StableDiffusionPipeline
from official import diffusers_scheduler
from PIL import Image
from safetensors.torch import save_file

from ldm.errors import LdmError
from ldm.loading.families import SPECS
from ldm.loading.tiny_vae import load_tiny_vae
from ldm_cli.main import main

PROMPT = "a watercolour fox in the snow"

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py) ldm and diffusers compared in one process


@pytest.fixture(scope="module")
def taesd(tmp_path_factory):
    """A random TAESD in madebyollin/taesd's layout (the class defaults are its config), saved as diffusers saves it,
    and the same weights as the original halves, written by the conversion rule of diffusers'
    scripts/convert_tiny_autoencoder_to_diffusers.py run backwards (encoder: `encoder.layers.` dropped; decoder:
    also index + 1, its layer 0 being the original's clamp)."""
    torch.manual_seed(0)
    reference = AutoencoderTiny().eval()
    with torch.no_grad():  # livelier than the default init, so that a wrong layer shows
        for p in reference.parameters():
            p.mul_(1.5)
    root = tmp_path_factory.mktemp("taesd")
    reference.save_pretrained(root / "taesd")
    state = reference.state_dict()
    encoder = {k.removeprefix("encoder.layers."): v for k, v in state.items() if k.startswith("encoder.")}
    decoder = {}
    for key, value in state.items():
        if key.startswith("decoder.layers."):
            index, rest = key.removeprefix("decoder.layers.").split(".", 1)
            decoder[f"{int(index) + 1}.{rest}"] = value
    (root / "original").mkdir()
    save_file(encoder, str(root / "original" / "taesd_encoder.safetensors"))
    save_file(decoder, str(root / "original" / "taesd_decoder.safetensors"))
    return reference, root


@pytest.mark.parametrize("layout", ["folder", "original-decoder-file", "original-folder"])
def test_decode_and_encode_equal_autoencoder_tiny(taesd, layout):
    reference, root = taesd
    path = {"folder": root / "taesd", "original-decoder-file": root / "original" / "taesd_decoder.safetensors",
            "original-folder": root / "original"}[layout]
    ours = load_tiny_vae(path, SPECS["sd1"], torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(1)
    z, images = torch.randn(2, 4, 8, 8, generator=g) * 2, torch.rand(2, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        assert max_rel_err(ours.decode(z), reference.decode(z).sample) < 1e-4
        latents, nothing = ours.encode(images)
        assert nothing is None and max_rel_err(latents, reference.encode(images).latents) < 1e-4
        assert ours.sample(latents, None, g) is latents  # deterministic: no draw


def test_taesd_runs_channels_last_on_the_cpu(taesd):
    """The layout chosen for the CPU (`ldm.loading.tiny_vae`): every convolution's weight NHWC, the decode's output
    NHWC, the numbers those of diffusers' NCHW module."""
    reference, root = taesd
    ours = load_tiny_vae(root / "taesd", SPECS["sd1"], torch.device("cpu"), torch.float32)
    convolutions = [m for m in ours.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convolutions and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convolutions
                                if m.kernel_size != (1, 1))
    z = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        decoded = ours.decode(z)
        assert decoded.is_contiguous(memory_format=torch.channels_last)
        assert max_rel_err(decoded, reference.decode(z).sample) < 1e-6


def test_a_lone_decoder_file_cannot_encode(taesd, tmp_path):
    _, root = taesd
    lone = tmp_path / "taesd_decoder.safetensors"
    lone.write_bytes((root / "original" / "taesd_decoder.safetensors").read_bytes())
    ours = load_tiny_vae(lone, SPECS["sd1"], torch.device("cpu"), torch.float32)
    with pytest.raises(LdmError, match="no encoder"):
        ours.encode(torch.zeros(1, 3, 64, 64))


def load_reference(cls, folder, vae):
    pipe = cls.from_pretrained(folder, vae=vae, safety_checker=None, feature_extractor=None,
                               requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def as_pixels(image) -> np.ndarray:
    return (np.asarray(image) * 255).round().astype(np.int16) if image.dtype != np.uint8 else image.astype(np.int16)


def generate(tmp_path, *args) -> np.ndarray:
    out = tmp_path / "out.png"
    assert main(["generate", PROMPT, "-o", str(out), *args]) == 0
    return np.asarray(Image.open(out).convert("RGB")).astype(np.int16)


@pytest.mark.parametrize("layout", ["folder", "original-decoder-file"])
def test_text_to_image_with_taesd_equals_diffusers(sd1_folder, taesd, tmp_path, layout):
    reference, root = taesd
    vae = root / "taesd" if layout == "folder" else root / "original" / "taesd_decoder.safetensors"
    actual = generate(tmp_path, "--model", str(sd1_folder), "--vae", str(vae), "--steps", "4", "--seed", "2",
                      "--sampler", "euler")
    pipe = load_reference(StableDiffusionPipeline, sd1_folder, reference)
    pipe.scheduler = diffusers_scheduler("euler", dict(pipe.scheduler.config))
    expected = pipe(PROMPT, num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(2),
                    output_type="np").images[0]
    diff = np.abs(actual - as_pixels(expected)).max()
    print(f"taesd {layout}: max pixel difference {diff}")
    assert diff <= MAX_PIXEL_DIFF
    own = generate(tmp_path, "--model", str(sd1_folder), "--steps", "4", "--seed", "2", "--sampler", "euler")
    assert np.abs(own - actual).max() > 30  # control: the model's own VAE gives another image


def test_image_to_image_with_taesd_draws_no_vae_noise(sd1_folder, taesd, tmp_path):
    """TAESD encodes deterministically, so nothing is drawn from the generator before the noise (diffusers'
    `retrieve_latents` takes `.latents`): the image equals StableDiffusionImg2ImgPipeline's with the same seed."""
    reference, root = taesd
    image = Image.fromarray((np.random.default_rng(3).random((64, 64, 3)) * 255).astype(np.uint8))
    image.save(tmp_path / "init.png")
    actual = generate(tmp_path, "--model", str(sd1_folder), "--vae", str(root / "original"), "--steps", "5",
                      "--seed", "7", "--sampler", "ddim", "--image", str(tmp_path / "init.png"), "--strength", "0.6")
    pipe = load_reference(StableDiffusionImg2ImgPipeline, sd1_folder, reference)
    pipe.scheduler = diffusers_scheduler("ddim", dict(pipe.scheduler.config))
    expected = pipe(PROMPT, image=image, strength=0.6, num_inference_steps=5,
                    generator=torch.Generator().manual_seed(7), output_type="np").images[0]
    diff = np.abs(actual - as_pixels(expected)).max()
    print(f"taesd img2img: max pixel difference {diff}")
    assert diff <= MAX_PIXEL_DIFF


def test_previews_decoded_by_taesd(sd1_folder, taesd, tmp_path):
    """`--preview-vae`: each preview is TAESD's decode of that step's x0 estimate; the final image stays the model
    VAE's (byte for byte the run without previews)."""
    from ldm.pipelines.stable_diffusion import StableDiffusion

    reference, root = taesd
    out = tmp_path / "p.png"
    args = ["generate", PROMPT, "--model", str(sd1_folder), "--steps", "2", "--seed", "4", "--sampler", "euler"]
    assert main([*args, "-o", str(out), "--preview-every", "1", "--preview-vae", str(root / "taesd")]) == 0
    assert main([*args, "-o", str(tmp_path / "plain.png")]) == 0
    assert np.array_equal(np.asarray(Image.open(out)), np.asarray(Image.open(tmp_path / "plain.png")))

    pipe = StableDiffusion.from_pretrained(sd1_folder)
    estimates = []
    pipe(PROMPT, steps=2, seed=4, sampler="euler", callbacks=[lambda step: estimates.append(step.denoised)])
    for i, x0 in enumerate(estimates, start=1):
        with torch.no_grad():
            expected = ((reference.decode(x0).sample / 2 + 0.5).clamp(0, 1) * 255).round()[0].permute(1, 2, 0)
        preview = np.asarray(Image.open(tmp_path / f"p-step{i:03d}.png").convert("RGB")).astype(np.int16)
        assert np.abs(preview - expected.numpy().astype(np.int16)).max() <= MAX_PIXEL_DIFF


@pytest.mark.parametrize("args, message", [
    (["--preview-vae", "X"], "give --preview-every N too"),
    (["--vae-tiling"], "--vae-tiling: TAESD"),
])
def test_bad_input(sd1_folder, taesd, tmp_path, capsys, args, message):
    _, root = taesd
    code = main(["generate", PROMPT, "--model", str(sd1_folder), "--vae", str(root / "taesd"), "--steps", "1",
                 "-o", str(tmp_path / "x.png"), *args])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err, err


def test_taesd_of_other_latent_channels_is_refused(tmp_path):
    AutoencoderTiny(latent_channels=16).save_pretrained(tmp_path / "taesd3")
    with pytest.raises(LdmError, match="16 latent channels does not fit this SD 1.x model"):
        load_tiny_vae(tmp_path / "taesd3", SPECS["sd1"], torch.device("cpu"), torch.float32)
