"""`ldm batch` with poison rows (issue 26, item 5): a row that cannot run is that row's error line, the rows after it
run, and a resumed run does not stop at it again — the real command, on the tiny model."""

import json

import numpy as np
import pytest
from PIL import Image

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.batch import prepare_batch, run_batch
from ldm_cli.main import main

PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64}

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


def results(folder):
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_poison_rows_are_their_error_lines_and_the_run_goes_on(sd1_folder, tmp_path, capsys):
    """A lone surrogate in a prompt or a negative prompt, a 5,000-character <lora:> tag, an image path longer than a
    file name, a LoRA weight of NaN: each crashed the run with a traceback, and every resume crashed at the same row,
    so the rows after it never ran. Each is now its row's error line; the good rows run (each the image it gets
    alone); started again, the run has nothing left to do."""
    rows = ["a red apple", "\ud800", {"prompt": "a pear", "negative_prompt": "\udfff blur"},
            f"a plum <lora:{'x' * 5000}:1>", {"prompt": "a fig", "image": "y" * 300 + ".png"}, "a kiwi <lora:x:nan>",
            "a lime"]
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(row) + "\n" for row in rows))  # (ensure_ascii: the surrogates as \ud800)
    command = ["batch", "--model", str(sd1_folder), "--input", str(src), "--output", str(tmp_path / "out"),
               "--parameters", json.dumps(PARAMS), "--seed", "3"]
    assert main(command) == 1  # rows failed; the others ran
    err = capsys.readouterr().err
    assert "7 rows run, 0 already done, 5 failed" in err and "Traceback" not in err, err
    out = results(tmp_path / "out")
    assert [o["row"] for o in out] == list(range(7))
    fields = {o["row"]: (o["error"]["field"], o["error"]["message"]) for o in out if "error" in o}
    assert {row: field for row, (field, _) in fields.items()} == {
        1: "data[1].prompt", 2: "data[2].negative_prompt", 3: "data[3].prompt", 4: "data[4].image",
        5: "data[5].prompt"}
    assert "lone surrogate" in fields[1][1] and "longer than a file name can be" in fields[3][1]
    assert "File name too long" in fields[4][1] and "must be a finite number" in fields[5][1]
    assert out[1]["prompt"] == "\\ud800"  # (written out: results.jsonl stays valid UTF-8)
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    for o in (out[0], out[6]):
        expected = pipe(o["prompt"], steps=2, seed=o["seed"], width=64, height=64).images[0]
        assert np.array_equal(np.asarray(Image.open(tmp_path / "out" / o["file"]).convert("RGB")), np.asarray(expected))
    assert main(command) == 0  # resumed: nothing left to run, no row stopped it
    assert "0 rows run, 7 already done, 0 failed" in capsys.readouterr().err


class FailsOn:
    """The pipeline, failing with an error nothing foresaw (a bug) for one prompt."""

    def __init__(self, pipe, prompt: str):
        self.pipe, self.prompt = pipe, prompt

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def __call__(self, request, **kwargs):
        if self.prompt in request.prompts:
            raise IndexError("index 1000 is out of bounds for dimension 0 with size 1000")
        return self.pipe(request, **kwargs)


def test_a_row_that_fails_for_any_other_reason_is_its_error_line(sd1_folder, tmp_path):
    """Anything a row's run raises (here a bug's IndexError) is that row's error line, naming it; the next row
    runs."""
    src = tmp_path / "rows.jsonl"
    src.write_text('"one"\n"two"\n"three"\n')
    batch = prepare_batch(src, tmp_path / "out", PARAMS, 5)
    assert run_batch(FailsOn(StableDiffusion.from_pretrained(sd1_folder), "two"), batch) == (3, 0, 1)
    out = results(tmp_path / "out")
    assert ["error" in o for o in out] == [False, True, False]
    assert out[1]["error"]["message"].startswith("internal error (IndexError: index 1000 is out of bounds")
