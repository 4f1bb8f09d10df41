"""The Azure ML scoring-schema adapter: every request variant of the model cards, the response forms, and
bad requests reported by field (request-level) or by row (row-level), without tracebacks."""

import base64
import io

import numpy as np
import pytest
from PIL import Image
from test_image_tasks import picture, rectangle_mask

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.limits import Limits
from ldm.serving.runner import score
from ldm.serving.schema import RequestError, parse

FAST = {"num_inference_steps": 2, "height": 64, "width": 64}

# (conftest.py) every comparison here is within this process: the pipeline at one thread
pytestmark = pytest.mark.usefixtures("one_thread")


def b64(image: Image.Image, fmt="PNG", prefix="") -> str:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return prefix + base64.b64encode(buffer.getvalue()).decode()


def pixels(b64png: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64png))).convert("RGB"))


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


@pytest.fixture(scope="module")
def inpaint(sd2_inpaint_folder):
    return StableDiffusion.from_pretrained(sd2_inpaint_folder)


def test_prompt_rows_give_the_pipelines_images_with_per_row_seeds(sd1):
    body = {"input_data": {"columns": ["prompt"], "index": [0, 1], "data": ["a cat", "a dog"],
                           "parameters": FAST | {"seed": 40, "guidance_scale": 5.0}}}
    out = score(sd1, body)
    assert [o["prompt"] for o in out] == ["a cat", "a dog"] and [o["seed"] for o in out] == [40, 41]
    assert [o["nsfw_content_detected"] for o in out] == [False, False]  # the SD 1.5 folder ships a checker
    for o in out:
        expected = sd1(o["prompt"], steps=2, guidance=5.0, seed=o["seed"], width=64, height=64).images[0]
        assert np.array_equal(pixels(o["generated_image"]), np.asarray(expected))
        assert "Seed: " + str(o["seed"]) in Image.open(io.BytesIO(base64.b64decode(o["generated_image"]))).text[
            "parameters"]


def test_card_variants_are_accepted(sd1):
    # SD 1.4: text_prompt; SD 1.5: index shorter than data; rows as lists and as objects
    for data_in in ({"columns": ["text_prompt"], "data": ["a cat"]},
                    {"columns": ["prompt"], "index": [0], "data": ["a cat", "a dog"]},
                    {"columns": ["prompt"], "data": [["a cat"]]},
                    {"columns": ["prompt"], "data": [{"prompt": "a cat"}]}):
        request = parse({"input_data": data_in | {"parameters": FAST}})
        assert request.rows[0].prompt == "a cat" and all(r.error is None for r in request.rows)
    assert [r.label for r in parse({"input_data": {"columns": ["prompt"], "index": ["x"],
                                                   "data": ["a", "b"]}}).rows] == ["x", 1]
    # left to the model: 50 steps and guidance 7.5 (the cards' defaults) unless its own card says others
    assert parse({"input_data": {"data": ["a"]}}).parameters.num_inference_steps is None
    assert parse({"input_data": {"data": ["a"]}}).parameters.guidance_scale is None


def test_inpainting_rows_with_mask_image_and_data_urls(inpaint):
    image, mask = picture(64, 64, 2), rectangle_mask(64, 64, (16, 16, 48, 48))
    body = {"input_data": {"columns": ["prompt", "image", "mask"],
                           "data": [{"prompt": "a red door", "image": b64(image, "JPEG", "data:image/jpeg;base64,"),
                                     "mask_image": b64(mask)}],
                           "parameters": {"num_inference_steps": 2, "seed": 3}}}
    (out,) = score(inpaint, body)
    assert out["nsfw_content_detected"] is None  # SD 2 inpainting ships no checker
    decoded = parse(body).rows[0]
    expected = inpaint("a red door", steps=2, seed=3, image=decoded.image, mask=decoded.mask).images[0]
    assert np.array_equal(pixels(out["generated_image"]), np.asarray(expected))


def test_older_card_response_forms(sd1):
    body = {"input_data": {"columns": ["prompt"], "data": ["a", "b"], "parameters": FAST | {"seed": 1}}}
    (sd15,) = score(sd1, body, form="sd15")
    assert len(sd15["generated_image"]) == 2 and sd15["nsfw_content_detected"] == ["False", "False"]
    (sd14,) = score(sd1, body, form="sd14")
    assert sd14["generated_images"] == sd15["generated_image"]


@pytest.mark.parametrize("body, field, message", [
    ({}, "input_data", "missing"),
    ({"input_data": []}, "input_data", "expected an object"),
    ({"input_data": {"columns": ["prompt", "style"], "data": [["a", "b"]]}}, "input_data.columns", "unknown column"),
    ({"input_data": {"columns": ["prompt"], "data": []}}, "input_data.data", "non-empty"),
    ({"input_data": {"data": ["a"] * 17}}, "input_data.data", "at most 16"),
    ({"input_data": {"data": ["a"], "parameters": {"num_inference_steps": 151}}},
     "parameters.num_inference_steps", "from 1 to 150"),
    ({"input_data": {"data": ["a"], "parameters": {"num_inference_steps": "20"}}},
     "parameters.num_inference_steps", "expected an integer"),
    ({"input_data": {"data": ["a"], "parameters": {"sampler": "euler"}}}, "parameters.sampler", "unknown parameter"),
    ({"input_data": {"data": ["a"], "parameters": {"scheduler": "magic"}}}, "parameters.scheduler", "unknown"),
    ({"input_data": {"data": ["a"], "parameters": {"height": 512, "width": 4000}}}, "parameters.width", "pixels"),
    ({"input_data": {"data": ["a"], "parameters": {"height": 4000, "width": 512}}}, "parameters.height", "pixels"),
    ({"input_data": {"data": ["a"], "parameters": {"width": 100}}}, "parameters.width", "multiple of 8"),
    ({"input_data": {"data": ["a"], "parameters": {"prompt_syntax": "comfy"}}}, "parameters.prompt_syntax",
     "a1111 or plain"),
    ({"input_data": {"data": ["a"], "parameters": {"clip_skip": 0}}}, "parameters.clip_skip",
     "from 1 (the last layer) to 12"),
])
def test_bad_requests_name_the_field(body, field, message):
    with pytest.raises(RequestError) as info:
        parse(body, Limits())
    assert info.value.field == field and message in info.value.message
    assert info.value.as_dict() == {"error": {"field": field, "message": info.value.message}}


def test_bad_rows_are_reported_in_place_and_the_others_run(sd1):
    good = b64(picture(64, 64, 1))
    body = {"input_data": {"columns": ["prompt", "image", "mask"], "index": [10, 11, 12, 13, 14],
                           "data": [["a cat", None, None],
                                    ["a dog", good],
                                    ["a fox", "not base64!", None],
                                    ["a hen", good, b64(rectangle_mask(32, 32, (0, 0, 16, 16)))],
                                    ["an owl", base64.b64encode(b"not an image").decode(), None]],
                           "parameters": FAST | {"seed": 2, "scheduler": "EulerDiscreteScheduler"}}}
    out = score(sd1, body)
    assert "generated_image" in out[0]
    errors = {o["index"]: o["error"] for o in out[1:]}
    assert errors[11] == {"field": "data[1]", "message": "has 2 values for 3 columns ['prompt', 'image', 'mask']"}
    assert errors[12]["field"] == "data[2].image" and "not valid base64" in errors[12]["message"]
    assert errors[13]["field"] == "data[3].mask" and "must match" in errors[13]["message"]
    assert errors[14]["field"] == "data[4].image" and "not a readable image" in errors[14]["message"]


def test_default_size_over_the_pixel_limit_fails_the_row(sd1):
    out = score(sd1, {"input_data": {"data": ["a"], "parameters": {"num_inference_steps": 1}}},
                Limits(max_pixels=32 * 32))
    assert out[0]["error"]["field"] == "parameters.width" and "64x64" in out[0]["error"]["message"]


@pytest.mark.parametrize("size", [(64, 64), (72, 80)])  # 72x80: latents of 90 values, not a multiple of 16
def test_micro_batched_rows_match_rows_run_alone(sd1, size):
    body = {"input_data": {"data": ["a cat", "a dog", "a fox", "a hen", "an owl"],
                           "parameters": FAST | {"seed": 8, "num_images_per_prompt": 2, "scheduler": "euler_a",
                                                 "width": size[0], "height": size[1]}}}
    alone = score(sd1, body)
    batched = score(sd1, body, batch_size=8)  # rows 0-3 in one pass (8 images), row 4 alone
    assert [(o["prompt"], o["seed"]) for o in batched] == [(o["prompt"], o["seed"]) for o in alone]
    assert len(batched) == 10
    for a, b in zip(alone, batched, strict=True):
        diff = np.abs(pixels(a["generated_image"]).astype(int) - pixels(b["generated_image"]).astype(int)).max()
        assert diff <= 2  # the same noise (ancestral steps too); only the batched matmuls round differently
        text = Image.open(io.BytesIO(base64.b64decode(b["generated_image"]))).text["parameters"]
        assert f"Seed: {b['seed']}," in text


def test_one_seed_per_prompt_matches_diffusers_with_a_generator_per_image(sd1_folder, sd1):
    import torch
    from diffusers import StableDiffusionPipeline
    from official import diffusers_scheduler

    reference = StableDiffusionPipeline.from_pretrained(sd1_folder, safety_checker=None, feature_extractor=None,
                                                        requires_safety_checker=False)
    reference.set_progress_bar_config(disable=True)
    reference.scheduler = diffusers_scheduler("euler_a", reference.scheduler.config)
    expected = reference(["a cat", "a dog"], num_inference_steps=3, height=64, width=64, output_type="np",
                         generator=[torch.Generator().manual_seed(5), torch.Generator().manual_seed(9)]).images
    actual = sd1(["a cat", "a dog"], steps=3, seed=[5, 9], width=64, height=64, sampler="euler_a").images
    for a, e in zip(actual, expected, strict=True):
        assert np.abs(np.asarray(a).astype(int) - (e * 255).round()).max() <= 2


def test_prompt_syntax_plain_by_default_and_a1111_on_request(sd1):
    """The documented deployments are diffusers pipelines, which read brackets literally: so does a request,
    unless it asks for A1111's syntax. Rows of different chunk counts do not share a pass (the padding would
    change the shorter prompt's image)."""
    prompts = ["a (red:1.5) cat", "a [[quiet]] dog, " + "word " * 80]
    body = {"input_data": {"data": prompts, "parameters": FAST | {"seed": 3, "scheduler": "euler"}}}
    plain = score(sd1, body)
    a1111 = score(sd1, body | {"input_data": body["input_data"] | {
        "parameters": body["input_data"]["parameters"] | {"prompt_syntax": "a1111"}}}, batch_size=4)
    for i, prompt in enumerate(prompts):
        run = {"steps": 2, "width": 64, "height": 64, "sampler": "euler", "seed": 3 + i}
        expected_plain = np.asarray(sd1(prompt, prompt_syntax="plain", **run).images[0])
        expected_a1111 = np.asarray(sd1(prompt, **run).images[0])
        assert np.abs(pixels(plain[i]["generated_image"]).astype(int) - expected_plain).max() == 0
        assert np.abs(pixels(a1111[i]["generated_image"]).astype(int) - expected_a1111).max() <= 2
        assert np.abs(expected_plain.astype(int) - expected_a1111).max() > 10


# The documented example clients (azureml-examples' online-endpoint notebooks), their payloads as written there


def test_text_to_image_notebook_payload_with_a_negative_prompt_column(sd1):
    """Each row's negative prompt is its own (a row without one takes the parameter's); rows of different negative
    prompts do not share a pass, so each image is exactly the pipeline's for that negative prompt."""
    body = {"input_data": {"columns": ["prompt", "negative_prompt"],
                           "data": [{"prompt": "a photograph of an astronaut", "negative_prompt": "blurry; cartoonish"},
                                    {"prompt": "a lighthouse at night", "negative_prompt": "daylight"},
                                    {"prompt": "a lighthouse at dawn"}],
                           "parameters": {"num_inference_steps": 2, "guidance_scale": 7.5} | FAST
                           | {"seed": 7, "negative_prompt": "fog"}}}
    rows = body["input_data"]["data"]
    out = score(sd1, body, batch_size=4)
    assert [o["prompt"] for o in out] == [row["prompt"] for row in rows] and all("error" not in o for o in out)
    for i, (o, row) in enumerate(zip(out, rows, strict=True)):
        negative = row.get("negative_prompt", "fog")
        expected = sd1(row["prompt"], negative, steps=2, guidance=7.5, seed=7 + i, width=64, height=64,
                       prompt_syntax="plain").images[0]
        assert np.array_equal(pixels(o["generated_image"]), np.asarray(expected))
        text = Image.open(io.BytesIO(base64.b64decode(o["generated_image"]))).text["parameters"]
        assert f"Negative prompt: {negative}\n" in text
    bad = parse({"input_data": {"columns": ["prompt", "negative_prompt"], "data": [["a", 3]]}}).rows[0].error
    assert bad.field == "data[0].negative_prompt"


def test_inpainting_notebook_payload_with_encodebytes_images(inpaint):
    def encodebytes(image: Image.Image) -> str:  # as the notebook reads its files: a newline every 76 characters
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.encodebytes(buffer.getvalue()).decode("utf-8")

    image, mask = picture(64, 64, 2), rectangle_mask(64, 64, (16, 16, 48, 48))
    body = {"input_data": {"columns": ["prompt", "image", "mask_image", "negative_prompt"],
                           "data": [{"prompt": "a small white cottage", "image": encodebytes(image),
                                     "mask_image": encodebytes(mask), "negative_prompt": "blurry; cartoonish"}],
                           "parameters": {"num_inference_steps": 2, "guidance_scale": 7.5, "seed": 3}}}
    assert "\n" in body["input_data"]["data"][0]["image"]
    (out,) = score(inpaint, body)
    expected = inpaint("a small white cottage", "blurry; cartoonish", steps=2, guidance=7.5, seed=3, image=image,
                       mask=mask, prompt_syntax="plain").images[0]
    assert np.array_equal(pixels(out["generated_image"]), np.asarray(expected))


def test_base64_may_hold_line_breaks_but_not_other_characters():
    from ldm.errors import InputError
    from ldm.pipelines.images import decode_image

    buffer = io.BytesIO()
    picture(16, 16).save(buffer, format="PNG")
    lines = base64.encodebytes(buffer.getvalue()).decode()
    for text in (lines, lines.replace("\n", "\r\n"), "data:image/png;base64," + lines, " \t" + lines):
        assert decode_image(text).size == (16, 16)
    for garbage in (lines.replace("\n", "*", 1), lines[:40] + "é" + lines[40:], lines.replace("\n", "\\n")):
        with pytest.raises(InputError, match="not valid base64"):
            decode_image(garbage)


def test_image_urls_are_refused_unless_the_server_allows_them():
    request = parse({"input_data": {"columns": ["prompt", "image", "mask_image"],
                                    "data": [["a", "https://example.com/house.png", None],
                                             ["b", b64(picture(16, 16)), " HTTP://example.com/mask.png"],
                                             ["c", "ftp://example.com/house.png", None]]}})
    for row, field in zip(request.rows, ("data[0].image", "data[1].mask", "data[2].image"), strict=True):
        assert row.error.field == field
        assert row.error.message == ("image URLs are not fetched by this server (start it with --allow-image-urls "
                                     "to allow them)")


def test_a_plain_prompt_cut_at_77_tokens_says_what_was_dropped(sd1):
    long = "word " * 80 + "a red house"
    out = score(sd1, {"input_data": {"data": [long, "a cat"], "parameters": FAST | {"seed": 1}}}, batch_size=2)
    assert out[0]["notes"] == [f"the prompt {long[:30]!r}… was cut at 77 tokens, as diffusers cuts it (plain "
                               "syntax; A1111's reads it all): dropped 'word word word word word a red house'"]
    assert "notes" not in out[1]
