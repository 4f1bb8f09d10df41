"""`ldm batch`: JSONL, CSV (with image/mask files) and JSON request inputs; one PNG per image with its
`parameters`, results.jsonl in the response form, deterministic seeds, and a killed run that resumes with no
row missing and none twice."""

import base64
import json

import numpy as np
import pytest
import torch
from conftest import MODULE_TOL, max_rel_err
from PIL import Image
from test_image_tasks import picture, rectangle_mask
from test_prompts import reference_conditioning
from transformers import CLIPTextModel, CLIPTokenizer

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.batch import prepare_batch, run_batch
from ldm_cli.main import main

PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64}

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


def go(pipe, src, out, params, seed=None, progress=None, settings=None):
    return run_batch(pipe, prepare_batch(src, out, params, seed, settings), progress)


def results(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_jsonl_rows_to_pngs_and_results(sd1_folder, sd1, tmp_path, capsys):
    rows = ["a red apple", {"prompt": "a green pear"}, {"prompt": "a plum", "image": "missing.png"}, "a fig"]
    src = write_jsonl(tmp_path / "rows.jsonl", rows)
    code = main(["batch", "--model", str(sd1_folder), "--input", str(src), "--output", str(tmp_path / "out"),
                 "--parameters", json.dumps(PARAMS), "--seed", "70"])
    assert code == 1  # one row failed; the others ran
    assert "4 rows run, 0 already done, 1 failed" in capsys.readouterr().err
    out = results(tmp_path / "out")
    assert [o["row"] for o in out] == [0, 1, 2, 3]
    assert [o.get("seed") for o in out] == [70, 71, None, 73]
    assert out[2]["error"]["field"] == "data[2].image" and "missing.png: no such file" in out[2]["error"]["message"]
    for o in (out[0], out[1], out[3]):
        png = Image.open(tmp_path / "out" / o["file"])
        expected = sd1(o["prompt"], steps=2, seed=o["seed"], width=64, height=64).images[0]
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))
        assert f"Seed: {o['seed']}" in png.text["parameters"]
        assert "generated_image" not in o and o["nsfw_content_detected"] is False  # the PNG is named, not repeated
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["00000.png", "00001.png", "00003.png"]


def test_killed_run_resumes_without_gaps_or_duplicates(sd1, tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", [f"prompt {i}" for i in range(5)])
    whole = tmp_path / "whole"
    go(sd1, src, whole, PARAMS, seed=5)

    killed = tmp_path / "killed"

    def kill_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        go(sd1, src, killed, PARAMS, seed=5, progress=kill_after_two)
    assert [o["row"] for o in results(killed)] == [0, 1]
    with open(killed / "results.jsonl", "a") as f:  # and a line torn by the kill
        f.write('{"row": 2, "of": 1, "prompt": "prom')
    (killed / "00002.png").write_bytes(b"half a png")
    ran, skipped, failed = go(sd1, src, killed, PARAMS)  # the seed comes back from batch.json
    assert (ran, skipped, failed) == (3, 2, 0)
    assert [o["row"] for o in results(killed)] == [0, 1, 2, 3, 4]
    for i in range(5):
        assert (killed / f"{i:05d}.png").read_bytes() == (whole / f"{i:05d}.png").read_bytes()
    assert go(sd1, src, killed, PARAMS) == (0, 5, 0)  # nothing left to do
    assert not list(killed.glob(".*.tmp"))


@pytest.mark.parametrize("image_file, mask_file", [("room.png", "hole.png"), ("room.gif", "hole.tiff"),
                                                   ("./room", "./masks/hole")])
def test_csv_with_image_and_mask_files_for_inpainting(sd2_inpaint_folder, tmp_path, image_file, mask_file):
    """Files of every format a request's base64 may hold (GIF and TIFF too) are read from the input's folder, and
    paths without a suffix that start as one (`./room`: `masks/hole` alone could be base64, whose alphabet has `/`)."""
    (tmp_path / "masks").mkdir()
    image, mask = tmp_path / image_file, tmp_path / mask_file
    picture(64, 64, 7).save(image, format=None if image.suffix else "PNG")
    rectangle_mask(64, 64, (8, 8, 40, 40)).save(mask, format=None if mask.suffix else "PNG")
    (tmp_path / "jobs.csv").write_text(f"prompt,image,mask\na window,{image_file},{mask_file}\n")
    assert main(["batch", "--model", str(sd2_inpaint_folder), "--input", str(tmp_path / "jobs.csv"),
                 "--output", str(tmp_path / "out"), "--parameters", '{"num_inference_steps": 2, "seed": 9}']) == 0
    (o,) = results(tmp_path / "out")
    pipe = StableDiffusion.from_pretrained(sd2_inpaint_folder)
    expected = pipe("a window", steps=2, seed=9, image=Image.open(tmp_path / image_file),
                    mask=Image.open(tmp_path / mask_file)).images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / o["file"]).convert("RGB")), np.asarray(expected))


def test_json_request_input_and_a_different_input_in_the_same_folder(sd1_folder, tmp_path, capsys):
    request = {"input_data": {"columns": ["prompt"], "data": ["a boat", "a bridge"],
                              "parameters": PARAMS | {"seed": 11, "num_images_per_prompt": 2}}}
    (tmp_path / "req.json").write_text(json.dumps(request))
    args = ["batch", "--model", str(sd1_folder), "--output", str(tmp_path / "out")]
    assert main([*args, "--input", str(tmp_path / "req.json")]) == 0
    files = sorted(p.name for p in (tmp_path / "out").glob("*.png"))
    assert files == ["00000-0.png", "00000-1.png", "00001-0.png", "00001-1.png"]
    assert [o["seed"] for o in results(tmp_path / "out")] == [11, 11, 12, 12]
    write_jsonl(tmp_path / "other.jsonl", ["a tree"])
    assert main([*args, "--input", str(tmp_path / "other.jsonl")]) == 2
    assert "holds a batch of another input" in capsys.readouterr().err


@pytest.mark.parametrize("name, content, message", [
    ("rows.txt", "a", "expected a .json request, .jsonl rows or a .csv file"),
    ("rows.jsonl", "{oops\n", "line 1: not valid JSON"),
    ("rows.csv", "text\nhello\n", "needs a header line with a 'prompt' column"),
    ("req.json", '{"data": []}', "input_data: missing"),
])
def test_bad_inputs_are_named(sd1_folder, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_text(content)
    code = main(["batch", "--model", str(sd1_folder), "--input", str(tmp_path / name), "--output",
                 str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "out" / "batch.json").exists()  # nothing started: a corrected input may use the folder


def test_a_row_of_several_images_cut_short_runs_again(sd1, tmp_path):
    src = write_jsonl(tmp_path / "rows.jsonl", ["a", "b", "c"])
    params = PARAMS | {"num_images_per_prompt": 2}
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    go(sd1, src, whole, params, seed=1)
    go(sd1, src, cut, params, seed=1)
    lines = (cut / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 6 and all(json.loads(line)["of"] == 2 for line in lines)
    # killed after row 1's first image line: row 1 is not done, and its line goes
    (cut / "results.jsonl").write_text("".join(lines[:3]) + lines[3][:40])
    assert go(sd1, src, cut, params) == (2, 1, 0)
    assert (cut / "results.jsonl").read_text() == (whole / "results.jsonl").read_text()


def test_resuming_with_another_model_is_refused_and_bad_input_is_found_before_loading(sd1_folder, tmp_path,
                                                                                      capsys):
    src = write_jsonl(tmp_path / "rows.jsonl", ["a"])
    args = ["batch", "--input", str(src), "--output", str(tmp_path / "out"), "--parameters", json.dumps(PARAMS)]
    assert main([*args, "--model", str(sd1_folder)]) == 0
    assert main([*args, "--model", str(sd1_folder), "--no-safety-checker"]) == 2
    assert "another input, parameters or model" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text("{oops\n")
    code = main(["batch", "--input", str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o2"),
                 "--model", str(tmp_path / "no-such-model")])
    assert code == 2 and "not valid JSON" in capsys.readouterr().err  # not "no such model": the input came first


def test_a_csv_line_of_too_many_or_too_few_fields_is_that_rows_error(sd1, tmp_path):
    (tmp_path / "rows.csv").write_text('\ufeffprompt,negative_prompt\na cat,\n"a dog, sitting",blur,extra\na fox\n'
                                       "an owl,dark\n")  # (a byte-order mark, as Excel writes)
    out = tmp_path / "out"
    assert go(sd1, tmp_path / "rows.csv", out, PARAMS, seed=2) == (4, 0, 2)
    lines = results(out)
    assert [o["row"] for o in lines] == [0, 1, 2, 3] and "file" in lines[0] and "file" in lines[3]
    assert lines[1]["prompt"] == "a dog, sitting"
    assert lines[1]["error"] == {"field": "data[1]", "message": "line 3: 3 fields for the header's 2 columns"}
    assert lines[2]["error"] == {"field": "data[2]", "message": "line 4: 1 field for the header's 2 columns"}


def plain_conditioning(folder, text):
    """diffusers' rule (StableDiffusionPipeline.encode_prompt) on transformers: the text tokenized literally, padded
    and cut to 77 tokens, CLIPTextModel's last hidden state."""
    tok = CLIPTokenizer.from_pretrained(folder / "tokenizer")
    model = CLIPTextModel.from_pretrained(folder / "text_encoder").eval()
    ids = tok(text, padding="max_length", max_length=tok.model_max_length, truncation=True, return_tensors="pt")
    with torch.no_grad():
        return model(ids.input_ids)[0]


def recorded_prompt_conditioning(monkeypatch) -> list[torch.Tensor]:
    """Every prompt conditioning the pipelines of this test encode (the first group of `encode_text`: the prompts)."""
    seen, encode_text = [], StableDiffusion.encode_text

    def recording(self, groups, **kwargs):
        encoded = encode_text(self, groups, **kwargs)
        seen.append(encoded[0][0])
        return encoded

    monkeypatch.setattr(StableDiffusion, "encode_text", recording)
    return seen


EMPHASIS_ROW = "a (red:1.5) house by the [[river]], ((tall)) trees"


def test_rows_are_read_with_a1111s_rules_unless_the_parameters_say_plain(sd1_folder, tmp_path, monkeypatch):
    """README 'Prompts': `ldm batch` reads its rows with A1111's rules, `"prompt_syntax": "plain"` as diffusers does.
    The row's conditioning against A1111's emphasis rule on transformers' CLIPTextModel (test_prompts.py's
    reference), the plain one against diffusers' rule; the row's PNG is the one `ldm generate` (A1111's syntax by
    default) makes of the same prompt and seed, and the plain row's is not."""
    seen = recorded_prompt_conditioning(monkeypatch)
    src = write_jsonl(tmp_path / "rows.jsonl", [EMPHASIS_ROW])
    common = ["--model", str(sd1_folder), "--input", str(src), "--seed", "8"]
    assert main(["batch", *common, "--output", str(tmp_path / "a1111"), "--parameters", json.dumps(PARAMS)]) == 0
    assert main(["batch", *common, "--output", str(tmp_path / "plain"), "--parameters",
                 json.dumps(PARAMS | {"prompt_syntax": "plain"})]) == 0
    assert main(["generate", EMPHASIS_ROW, "--model", str(sd1_folder), "--steps", "2", "--seed", "8", "--width", "64",
                 "--height", "64", "-o", str(tmp_path / "generate.png")]) == 0
    a1111, plain, generate = seen
    assert max_rel_err(a1111, reference_conditioning(sd1_folder, EMPHASIS_ROW)) <= MODULE_TOL
    assert max_rel_err(plain, plain_conditioning(sd1_folder, EMPHASIS_ROW)) <= MODULE_TOL
    assert max_rel_err(plain, a1111) > 1e-3  # the weights move the conditioning far beyond the tolerance
    assert torch.equal(generate, a1111)

    def pixels(path):
        return np.asarray(Image.open(path).convert("RGB")).astype(int)

    expected = pixels(tmp_path / "generate.png")
    assert np.array_equal(pixels(tmp_path / "a1111" / "00000.png"), expected)
    assert np.abs(pixels(tmp_path / "plain" / "00000.png") - expected).max() > 10


def test_base64_in_results_repeats_the_written_png_and_only_then(sd1_folder, tmp_path):
    """README 'Batch runs': a results line names its PNG, without the image's base64 unless `--base64-in-results`;
    with it, the base64 is the very bytes of the file written."""
    src = write_jsonl(tmp_path / "rows.jsonl", ["a kite", "a drum"])
    common = ["batch", "--model", str(sd1_folder), "--input", str(src), "--seed", "3", "--parameters",
              json.dumps(PARAMS | {"num_inference_steps": 1})]
    assert main([*common, "--output", str(tmp_path / "named")]) == 0
    assert main([*common, "--output", str(tmp_path / "repeated"), "--base64-in-results"]) == 0
    named, repeated = tmp_path / "named", tmp_path / "repeated"
    png_in_base64 = base64.b64encode(b"\x89PNG\r\n").decode()[:8]  # every base64 PNG starts so
    assert png_in_base64 not in (named / "results.jsonl").read_text()
    assert all(set(o) == {"row", "of", "prompt", "nsfw_content_detected", "seed", "file"} for o in results(named))
    for o in results(repeated):
        assert base64.b64decode(o["generated_image"]) == (repeated / o["file"]).read_bytes()
        assert (repeated / o["file"]).read_bytes() == (named / o["file"]).read_bytes()
