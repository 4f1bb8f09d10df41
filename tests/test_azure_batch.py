"""`ldm batch --format azure`: a folder of CSV files as Azure ML's text-to-image batch endpoints take it (as the
azureml-examples notebooks write them with pandas, index column included) → predictions.csv with no header and
the columns the notebooks read back, for text-to-image and inpainting; a malformed row reported in its place
while the others run; a killed run resumed."""

import base64
import csv
import io
import json

import numpy as np
import pytest
from PIL import Image
from test_image_tasks import picture, rectangle_mask

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.azure import PREDICTION_COLUMNS, read_azure_input, write_predictions
from ldm.serving.batch import prepare_batch, run_batch
from ldm_cli.main import main

PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64}

pytestmark = pytest.mark.usefixtures("one_thread")  # (conftest.py)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two files as the notebook splits a dataframe (`df[i:j].to_csv(f"{i}batch_input.csv")`); the second has a
    row with one field too many."""
    path = tmp_path_factory.mktemp("azure") / "batch_data"
    path.mkdir()
    (path / "0batch_input.csv").write_text(',prompt\n0,a red apple\n1,"a green pear, ripe"\n')
    (path / "2batch_input.csv").write_text(",prompt\n2,a plum\n3,a kiwi,extra\n\n4,a fig\n")
    (path / "notes.txt").write_text("not a CSV file: not read")
    return path


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    return StableDiffusion.from_pretrained(sd1_folder)


def args(model, folder, out, *more):
    return ["batch", "--model", str(model), "--input", str(folder), "--output", str(out), "--format", "azure",
            "--parameters", json.dumps(PARAMS), "--seed", "40", *more]


def predictions(out) -> list[list[str]]:
    text = (out / "predictions.csv").read_text()
    return list(csv.reader(io.StringIO(text, newline="")))


@pytest.fixture(scope="module")
def whole(sd1_folder, folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("whole") / "out"
    assert main(args(sd1_folder, folder, out)) == 1  # the malformed row failed, the others ran
    return out


def test_text_to_image_folder_to_predictions_csv(sd1_folder, sd1, folder, whole, capsys):
    lines = predictions(whole)
    assert all(len(line) == len(PREDICTION_COLUMNS) for line in lines)  # and no header line
    assert [(line[0], line[1], line[4]) for line in lines] == [
        ("0", "a red apple", "0batch_input.csv"), ("1", "a green pear, ripe", "0batch_input.csv"),
        ("0", "a plum", "2batch_input.csv"), ("1", "a kiwi", "2batch_input.csv"), ("2", "a fig", "2batch_input.csv")]
    assert lines[3][2:4] == ["error: line 3: 3 fields for the header's 2 columns", ""]
    for position in (0, 1, 2, 4):  # row i of the folder (files in name order) has seed 40 + i
        row_number, prompt, image, nsfw, _ = lines[position]
        png = Image.open(io.BytesIO(base64.b64decode(image)))
        expected = sd1(prompt, steps=2, seed=40 + position, width=64, height=64).images[0]
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))
        assert nsfw == "False" and f"Seed: {40 + position}" in png.text["parameters"]

    # the same batch again, with file names in predictions.csv: nothing runs again
    assert main(args(sd1_folder, folder, whole, "--images", "files")) == 0
    assert "0 rows run, 5 already done" in capsys.readouterr().err
    named = predictions(whole)
    assert [line[2] for line in named] == ["00000.png", "00001.png", "00002.png", lines[3][2], "00004.png"]
    assert [line[:2] + line[3:] for line in named] == [line[:2] + line[3:] for line in lines]
    assert main(args(sd1_folder, folder, whole)) == 0 and predictions(whole) == lines


def test_a_killed_azure_batch_resumes(sd1, folder, whole, tmp_path):
    out = tmp_path / "out"
    settings = json.loads((whole / "batch.json").read_text())["settings"]

    def kill_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_batch(sd1, prepare_batch(read_azure_input(folder, PARAMS), out, PARAMS, 40, settings), kill_after_two)
    assert not (out / "predictions.csv").exists()
    batch = prepare_batch(read_azure_input(folder, PARAMS, mini_batch_size=2), out, PARAMS, None, settings)
    assert run_batch(sd1, batch) == (3, 2, 1)  # the malformed row is one of the three
    write_predictions(batch)
    assert (out / "predictions.csv").read_bytes() == (whole / "predictions.csv").read_bytes()


def test_inpainting_folder_with_base64_and_file_images(sd2_inpaint_folder, tmp_path):
    folder = tmp_path / "inpainting"
    folder.mkdir()
    room, hole = picture(64, 64, 7), rectangle_mask(64, 64, (8, 8, 40, 40))
    room.save(folder / "room.png")
    hole.save(folder / "hole.png")

    def b64(image):  # as the notebook encodes its files: base64.encodebytes, line breaks and all
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return base64.encodebytes(buffer.getvalue()).decode()

    with open(folder / "input1.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", "mask_image", "prompt"])
        writer.writerow([b64(room), b64(hole), "a window"])
        writer.writerow(["room.png", "hole.png", "a door"])
        writer.writerow(["bm90IGFuIGltYWdl", b64(hole), "a broken image"])
    out = tmp_path / "out"
    assert main(["batch", "--model", str(sd2_inpaint_folder), "--input", str(folder), "--output", str(out),
                 "--format", "azure", "--images", "files", "--parameters", '{"num_inference_steps": 2, "seed": 9}'
                 ]) == 1
    lines = predictions(out)
    assert [line[:2] + line[3:] for line in lines] == [
        ["0", "a window", "", "input1.csv"], ["1", "a door", "", "input1.csv"],  # (no safety checker: no flag)
        ["2", "a broken image", "", "input1.csv"]]
    assert lines[2][2].startswith("error: image: ")
    pipe = StableDiffusion.from_pretrained(sd2_inpaint_folder)
    for position in (0, 1):
        expected = pipe(lines[position][1], steps=2, seed=9 + position, image=room, mask=hole).images[0]
        png = Image.open(out / lines[position][2])
        assert np.array_equal(np.asarray(png.convert("RGB")), np.asarray(expected))


@pytest.mark.parametrize("files, message", [
    ({}, "no .csv files in this folder"),
    ({"a.csv": "text\nhello\n"}, "a.csv: the CSV needs a header line with a 'prompt' column"),
    ({"a.csv": "prompt,style\nhello,oil\n"}, "a.csv: unknown column 'style'"),
])
def test_a_folder_that_cannot_run_is_refused_before_anything_starts(sd1_folder, tmp_path, capsys, files, message):
    folder = tmp_path / "in"
    folder.mkdir()
    for name, text in files.items():
        (folder / name).write_text(text)
    assert main(args(sd1_folder, folder, tmp_path / "out")) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_needs_format_azure_and_azure_options_need_it(sd1_folder, tmp_path, capsys):
    base = ["batch", "--model", str(sd1_folder), "--input", str(tmp_path), "--output", str(tmp_path / "out")]
    assert main(base) == 2
    assert "is a folder: a folder of CSV files is read with --format azure" in capsys.readouterr().err
    assert main([*base, "--images", "files"]) == 2
    assert "--images and --mini-batch-size go with --format azure" in capsys.readouterr().err


def test_predictions_of_a_row_with_several_images(tmp_path):
    """One line per image, all with the row's number (write_predictions reads only results.jsonl and PNGs)."""
    (tmp_path / "a.csv").write_text("prompt\nx\n")
    batch = prepare_batch(read_azure_input(tmp_path), tmp_path / "out", seed=1)
    (tmp_path / "out" / "results.jsonl").write_text("".join(
        json.dumps({"row": 0, "of": 2, "prompt": "x", "nsfw_content_detected": None, "seed": 1,
                    "file": f"00000-{k}.png"}) + "\n" for k in range(2)))
    assert write_predictions(batch, "files").read_text() == "0,x,00000-0.png,,a.csv\n0,x,00000-1.png,,a.csv\n"
