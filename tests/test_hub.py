"""Hub ids: the runwayml alias, only the needed safetensors fetched, and a clear message when offline."""

import pytest

from ldm.errors import LoadError
from ldm.loading import files as loading
from ldm.loading.components import hub_files
from ldm.pipelines.stable_diffusion import StableDiffusion


def test_hub_id_alias_and_patterns(monkeypatch, sd1_folder):
    calls = []

    def fake_snapshot_download(repo_id, revision=None, allow_patterns=None, local_files_only=False,
                               force_download=False):
        calls.append((repo_id, revision, allow_patterns))
        return str(sd1_folder)

    monkeypatch.setattr("huggingface_hub.snapshot_download", fake_snapshot_download)
    pipe = StableDiffusion.from_pretrained("runwayml/stable-diffusion-v1-5", revision="main")
    assert pipe.name == "runwayml/stable-diffusion-v1-5"
    repo, revision, patterns = calls[0]
    assert repo == "stable-diffusion-v1-5/stable-diffusion-v1-5" and revision == "main"
    # the manifest's components of SD 1.5: no second text tower, the safety checker included
    assert patterns == [p for p in hub_files(None) if not p.startswith(("text_encoder_2/", "tokenizer_2/"))]
    assert "safety_checker/model.safetensors" in patterns
    StableDiffusion.from_pretrained("CompVis/stable-diffusion-v1-4", variant="fp16")
    assert calls[1][0] == "CompVis/stable-diffusion-v1-4"
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in calls[1][2]


def test_only_safetensors_are_requested():
    for variant in (None, "fp16"):
        patterns = hub_files(variant)
        weights = [p for p in patterns if "model" in p and not p.endswith((".json", "*"))]
        assert weights and all(p.endswith(".safetensors") for p in weights)
        assert not any(p.endswith((".bin", ".ckpt")) or p in ("*", "**") for p in patterns)


def test_offline_and_not_cached_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(LoadError, match="not in the local Hugging Face cache") as info:
        loading.resolve("stable-diffusion-v1-5/stable-diffusion-v1-5", hub_files(None))
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in str(info.value)


@pytest.mark.parametrize("model, is_id", [("owner/name", True), ("CompVis/stable-diffusion-v1-4", True),
                                          ("./rel/path", False), ("/abs/path", False), ("just-a-name", False),
                                          ("a/b/c", False)])
def test_hub_id_recognition(model, is_id):
    assert loading.is_hub_id(model) is is_id
