"""ControlNets by Hub id (`--controlnet lllyasviel/control_v11p_sd15_canny`): fetched into the Hugging Face cache as ldm
fetches a model's repo (`ldm.loading.controlnets.hub_controlnet`), from the mock Hub of tests/hub_server.py, then
read offline from that cache; never a .bin; the server takes none (names in its weights/controlnet/ only).

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at import; here the same settings are set on its
`constants` for the test (the module attributes its downloads read at each call), so that the command line runs in
this process. The mock repos hold what the official ControlNet repos hold beside the two files ldm reads: the
pickled weights (.bin, .fp16.bin), the fp16 variant, a README."""

import numpy as np
import pytest
from hub_server import serving
from PIL import Image
from test_controlnet import PROMPT, hint, make_controlnet

import ldm.loading.controlnets
from ldm.errors import LoadError
from ldm.loading.controlnets import find_controlnet
from ldm.pipelines.request import Control
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm_cli.main import main

CANNY = "lllyasviel/control_v11p_sd15_canny"
FP16_ONLY = "someone/controlnet-fp16-only"  # (as diffusers/controlnet-canny-sdxl-1.0-small's older revisions)
BIN_ONLY = "someone/controlnet-bin-only"
READ = ["config.json", "diffusion_pytorch_model.safetensors"]


@pytest.fixture(scope="module")
def repos(sd1_folder, tmp_path_factory):
    """The mock Hub's repos: the official layout (full, fp16, pickles, README), one with only the fp16 safetensors,
    one with only pickles."""
    root = tmp_path_factory.mktemp("controlnet-hub")
    canny = make_controlnet(sd1_folder, root / "canny", seed=1)
    (canny / "diffusion_pytorch_model.fp16.safetensors").write_bytes(b"not what ldm reads without a variant")
    for name in ("diffusion_pytorch_model.bin", "diffusion_pytorch_model.fp16.bin"):
        (canny / name).write_bytes(b"\x80\x04\x95fake pickle")
    (canny / "README.md").write_text("---\nlicense: openrail\n---\n")
    fp16 = make_controlnet(sd1_folder, root / "fp16", seed=1)
    (fp16 / "diffusion_pytorch_model.safetensors").rename(fp16 / "diffusion_pytorch_model.fp16.safetensors")
    pickles = root / "pickles"
    pickles.mkdir()
    (pickles / "config.json").write_text((canny / "config.json").read_text())
    (pickles / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04\x95fake pickle")
    return {CANNY: canny, FP16_ONLY: fp16, BIN_ONLY: pickles}


@pytest.fixture()
def hub(repos, tmp_path, monkeypatch):
    """The mock Hub as huggingface_hub's endpoint, an empty cache, online; yields the server."""
    from huggingface_hub import constants

    with serving(repos) as server:
        monkeypatch.setattr(constants, "ENDPOINT", server.url)
        monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE",
                            server.url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(ldm.loading.controlnets, "_hub_folders", {})
        monkeypatch.setenv("LDM_WEIGHTS", str(tmp_path / "weights"))
        yield server


def offline(monkeypatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(ldm.loading.controlnets, "_hub_folders", {})  # (a new process: nothing resolved yet)


def test_generate_with_a_hub_id_then_offline(hub, repos, sd1_folder, tmp_path, monkeypatch):
    hint(1).save(tmp_path / "hint.png")

    def generate(out):
        return main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "3", "--seed", "3", "--sampler",
                     "euler", "--controlnet", CANNY, "--control-image", str(tmp_path / "hint.png"), "-o", str(out)])

    assert generate(tmp_path / "online.png") == 0
    assert sorted(hub.downloads()) == READ  # config.json and the full-precision safetensors only: no .bin, no fp16
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    want = pipe(PROMPT, steps=3, seed=3, sampler="euler", controls=[Control(str(repos[CANNY]), hint(1))]).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "online.png").convert("RGB")), np.asarray(want))
    assert f"Model: {CANNY}, " in Image.open(tmp_path / "online.png").text["parameters"]  # (--from-png fetches it)
    offline(monkeypatch)
    requests = len(hub.log())
    assert generate(tmp_path / "offline.png") == 0
    assert len(hub.log()) == requests  # nothing asked of the Hub
    assert np.array_equal(np.asarray(Image.open(tmp_path / "offline.png")),
                          np.asarray(Image.open(tmp_path / "online.png")))


def test_a_repo_with_only_the_fp16_file(hub, repos, sd1_folder):
    folder = find_controlnet(FP16_ONLY)
    assert sorted(hub.downloads()) == ["config.json", "diffusion_pytorch_model.fp16.safetensors"]
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    assert pipe.controlnet(FP16_ONLY) is pipe.controlnet(str(folder))  # one model, loaded once
    requests = len(hub.log())
    find_controlnet(FP16_ONLY)
    assert len(hub.log()) == requests  # resolved once a process


@pytest.mark.parametrize("repo, message", [
    (BIN_ONLY, "has no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.fp16.safetensors"),
    ("nobody/no-such-controlnet", "no such repository on the Hub"),
])
def test_hub_mistakes_are_one_line(hub, sd1_folder, tmp_path, capsys, repo, message):
    hint(1).save(tmp_path / "hint.png")
    code = main(["generate", PROMPT, "--model", str(sd1_folder), "--steps", "1", "--controlnet", repo,
                 "--control-image", str(tmp_path / "hint.png"), "-o", str(tmp_path / "out.png")])
    err = capsys.readouterr().err  # (after the model's line and huggingface_hub's progress bars)
    errors = [line for line in err.splitlines() if line.startswith("ldm: error:")]
    assert code == 2 and len(errors) == 1 and message in errors[0] and "Traceback" not in err, err
    assert "diffusion_pytorch_model.bin" not in hub.downloads()


def test_offline_without_the_cache_is_one_line(hub, monkeypatch):
    offline(monkeypatch)
    with pytest.raises(LoadError, match="the Hub cannot be reached"):
        find_controlnet(CANNY)
    assert not hub.log()


def test_the_server_takes_no_hub_id_unless_it_is_a_local_name(hub, repos, tmp_path):
    """A scoring request's `parameters.controlnet` (and the A1111 units', through the same `allow_paths=False`): a Hub
    id is a 400 naming the field, with nothing asked of the Hub; the same id as a folder of weights/controlnet/ is
    that folder."""
    import shutil

    from ldm.serving.schema import RequestError, parse

    def parsed():
        return parse({"input_data": {"columns": ["prompt"], "data": [PROMPT], "parameters": {"controlnet": CANNY}}})

    with pytest.raises(RequestError) as error:
        parsed()
    assert error.value.field == "parameters.controlnet" and "not a path or a Hub id" in error.value.message
    assert not hub.log()
    shutil.copytree(repos[CANNY], tmp_path / "weights" / "controlnet" / CANNY)
    assert parsed() is not None
    assert find_controlnet(CANNY, allow_paths=False) == tmp_path / "weights" / "controlnet" / CANNY
    assert not hub.log()
