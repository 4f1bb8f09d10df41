"""The SD 1.x safety checker against diffusers' StableDiffusionSafetyChecker (and transformers'
CLIPImageProcessor) on tiny random weights, with thresholds set so that some images are flagged."""

import shutil

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from official import SD1_FEATURE_EXTRACTOR as SD1_FEATURES
from official import SD1_SAFETY_CHECKER as SD1_CONFIG
from official import make_safety_checker, official_safety_checker_state, write_safety_checker
from PIL import Image
from transformers import CLIPImageProcessor

from ldm.networks.safety import FeatureExtractorConfig, SafetyChecker, SafetyCheckerConfig, checker_state, preprocess
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm_cli.main import main

# (conftest.py) every comparison here is within this process: ldm and the references at one thread
pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = ["a cat on a sofa", "a bowl of fruit", "a city street at night", "a mountain lake"]


def random_pictures(sizes, seed=0):
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def test_preprocessing_matches_clip_image_processor():
    images = random_pictures([(64, 64), (96, 40), (300, 200), (200, 301), (224, 224), (100, 500)])
    reference = CLIPImageProcessor.from_dict(dict(SD1_FEATURES))
    expected = reference(images, return_tensors="pt").pixel_values
    actual = preprocess(images, FeatureExtractorConfig.from_transformers(SD1_FEATURES))
    assert actual.shape == expected.shape == (6, 3, 224, 224)
    assert torch.equal(actual, expected)


def test_embeddings_and_flags_match_diffusers():
    images = random_pictures([(64, 64)] * 8, seed=1)
    pixels = preprocess(images, FeatureExtractorConfig())
    probe = make_safety_checker(seed=3)
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(probe.visual_projection(probe.vision_model(pixels)[1]))
        concept_cos = embeds @ torch.nn.functional.normalize(probe.concept_embeds).T
        special_cos = embeds @ torch.nn.functional.normalize(probe.special_care_embeds).T
    # thresholds that split the images: concept 0 at its median, concept 1 just above the similarity of the
    # image that hits special-care concept 0 (hit by that image only), so that only its 0.01 adjustment flags it
    special_hit = int(special_cos[:, 0].argmax())
    concept = torch.full((17,), 1.0)
    concept[0] = concept_cos[:, 0].median() + 0.005
    concept[1] = concept_cos[special_hit, 1] + 0.005
    special = torch.full((3,), 1.0)
    top2 = special_cos[:, 0].topk(2).values
    special[0] = (top2[0] + top2[1]) / 2
    reference = make_safety_checker(seed=3, concept_thresholds=concept, special_thresholds=special)
    ours = SafetyChecker(SafetyCheckerConfig.from_transformers(SD1_CONFIG))
    ours.load_state_dict(checker_state(official_safety_checker_state(reference)))

    with torch.no_grad():
        expected_embeds = reference.visual_projection(reference.vision_model(pixels)[1])
        actual_embeds = ours(pixels)
    assert torch.equal(actual_embeds, expected_embeds)
    _, expected_flags = reference(pixels, [np.ones((4, 4, 3)) for _ in images])
    results = ours.check(pixels)
    assert [r.nsfw for r in results] == expected_flags
    assert 0 < sum(expected_flags) < len(images)  # some flagged, some not
    assert results[special_hit].special_scores[0] > 0 and results[special_hit].concept_scores[1] > 0


@pytest.fixture(scope="module")
def flagging_folder(sd1_folder, tmp_path_factory):
    """The tiny SD 1.5 folder with a checker whose thresholds flag some of the images of PROMPTS."""
    folder = tmp_path_factory.mktemp("safety") / "tiny-sd1-checked"
    shutil.copytree(sd1_folder, folder)
    pipe = StableDiffusion.from_pretrained(folder)
    images = pipe(PROMPTS, steps=3, seed=5, width=64, height=64).images
    probe = make_safety_checker(seed=9)
    pixels = preprocess(images, FeatureExtractorConfig())
    with torch.no_grad():
        embeds = torch.nn.functional.normalize(probe.visual_projection(probe.vision_model(pixels)[1]))
        cos = embeds @ torch.nn.functional.normalize(probe.concept_embeds).T
    thresholds = torch.full((17,), 1.0)
    ranked = cos[:, 0].sort(descending=True).values
    thresholds[0] = (ranked[1] + ranked[2]) / 2  # concept 0 flags exactly the two closest images
    write_safety_checker(folder, make_safety_checker(seed=9, concept_thresholds=thresholds))
    return folder


def test_generation_flags_and_blackens_like_diffusers(flagging_folder):
    reference = StableDiffusionPipeline.from_pretrained(flagging_folder)
    reference.set_progress_bar_config(disable=True)
    expected = reference(PROMPTS, num_inference_steps=3, height=64, width=64, output_type="np",
                         generator=torch.Generator("cpu").manual_seed(5))
    result = StableDiffusion.from_pretrained(flagging_folder)(PROMPTS, steps=3, seed=5, width=64, height=64)
    assert result.nsfw == expected.nsfw_content_detected
    assert sum(result.nsfw) == 2
    for image, flagged, reference_image in zip(result.images, result.nsfw, expected.images, strict=True):
        actual = np.asarray(image).astype(np.int16)
        assert (actual == 0).all() == flagged
        assert np.abs(actual - (reference_image * 255).round()).max() <= 2


def test_cli_reports_flags_and_can_disable_the_checker(flagging_folder, tmp_path, capsys):
    out = tmp_path / "out.png"
    args = ["generate", PROMPTS[0], "--model", str(flagging_folder), "--steps", "3", "--seed", "5",
            "--width", "64", "--height", "64", "-o", str(out)]
    for prompt in PROMPTS:
        args[1] = prompt
        assert main(args) == 0
        black = (np.asarray(Image.open(out)) == 0).all()
        err = capsys.readouterr().err
        assert ("flagged by the safety checker" in err) == black
        assert main([*args, "--no-safety-checker"]) == 0
        assert not (np.asarray(Image.open(out)) == 0).all()
    assert StableDiffusion.from_pretrained(flagging_folder, safety_checker=False).safety_checker is None


def test_models_without_a_checker_report_none(sd21_folder):
    result = StableDiffusion.from_pretrained(sd21_folder)("a cat", steps=2, seed=1, width=64, height=64)
    assert result.nsfw == [None]


def test_listed_checker_folder_missing_is_named(sd1_folder, tmp_path, capsys):
    folder = tmp_path / "no-checker"
    shutil.copytree(sd1_folder, folder)
    shutil.rmtree(folder / "safety_checker")
    code = main(["generate", "x", "--model", str(folder), "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert code == 2 and "the safety_checker/ folder is missing" in err and "--no-safety-checker" in err
    assert main(["generate", "x", "--model", str(folder), "--steps", "1", "--width", "64", "--height", "64",
                 "--no-safety-checker", "-o", str(tmp_path / "x.png")]) == 0
