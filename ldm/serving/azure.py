"""The batch layout of Azure ML's text-to-image batch endpoints (azureml-examples,
sdk/python/foundation-models/system/inference/text-to-image: text-to-image-batch-endpoint.ipynb and
text-to-image-inpainting-batch-endpoint.ipynb): a folder of CSV files in, `predictions.csv` out.

Input: every `*.csv` of the folder, in name order, each with a header line: `prompt` (text-to-image), or
`image`, `mask_image` and `prompt` (inpainting), and optionally `negative_prompt`. The index column that
pandas' `to_csv` writes (the notebooks split their data so) is ignored. Images are base64 (with line breaks,
as `base64.encodebytes` writes them) or file paths relative to the folder. A row without as many fields as its
header is reported in its place; the other rows run.

Output: `predictions.csv`, no header line, one line per image in input order, the columns the notebooks name
when they read it back (`pd.read_csv(predictions_file, header=None, names=[...])`):

    row_number_per_file, prompt, generated_image, nsfw_content_detected, input_csv_name

`row_number_per_file` counts from 0 in each file; `generated_image` is the base64 PNG, or with
`images="files"` the PNG's file name in the output folder; a row that could not run has `error: ...` there
and nothing under `nsfw_content_detected`. The PNGs and `results.jsonl` are kept beside it (they are what
a resumed run reads), and `predictions.csv` is written whole from `results.jsonl` at the end.

Mini-batches: the endpoint hands `mini_batch_size` files at a time to a worker; here the ranks of a torchrun
job take whole mini-batches (mini-batch k goes to rank k mod n). Row i of the whole folder gets seed + i, as
in any batch, whatever the split.
"""

import base64
import csv
import hashlib
import io
import json
import re
from pathlib import Path

from ldm.errors import InputError
from ldm.serving.batch import RESULTS, Batch, BatchInput, atomic_write, read_csv, request_body

PREDICTION_COLUMNS = ("row_number_per_file", "prompt", "generated_image", "nsfw_content_detected", "input_csv_name")
PREDICTIONS = "predictions.csv"


def read_azure_input(path: Path, parameters: dict | None = None, mini_batch_size: int = 1) -> BatchInput:
    """A folder of CSV files (or one CSV file) as one batch input: its rows in file-name order, each with its
    file and number there, and its mini-batch (`mini_batch_size` files) as the unit a rank takes."""
    if mini_batch_size < 1:
        raise InputError(f"--mini-batch-size must be at least 1, got {mini_batch_size}")
    if path.is_dir():
        files = sorted(p for p in path.glob("*.csv") if p.is_file())
        if not files:
            raise InputError(f"--input {path}: no .csv files in this folder")
    elif path.is_file() and path.suffix == ".csv":
        files = [path]
    else:
        raise InputError(f"--input {path}: expected a folder of .csv files")
    rows, errors, units, origins = [], {}, [], []
    identity = hashlib.sha256(b"azure")
    for k, file in enumerate(files):
        raw = file.read_bytes()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(f"--input {file}: not UTF-8 text") from None
        file_rows, file_errors = read_csv(text, f"--input {file}", file.parent, first=len(rows))
        rows += file_rows
        errors |= file_errors
        units += [k // mini_batch_size] * len(file_rows)
        origins += [(file.name, n) for n in range(len(file_rows))]
        identity.update(json.dumps(file.name).encode() + hashlib.sha256(raw).digest())
    return BatchInput(str(path), request_body(rows, parameters), identity.digest(), errors, units, origins)


def prediction_row(obj: dict, origin: tuple[str, int], output: Path, images: str) -> list:
    """One results.jsonl object as a line of predictions.csv."""
    name, number = origin
    if "error" in obj:
        where = re.sub(r"^data\[\d+\]\.?", "", obj["error"]["field"])  # (the file and row are in the line)
        image, nsfw = f"error: {where + ': ' if where else ''}{obj['error']['message']}", ""
    else:
        image = obj["file"] if images == "files" else base64.b64encode((output / obj["file"]).read_bytes()).decode()
        nsfw = "" if obj["nsfw_content_detected"] is None else str(obj["nsfw_content_detected"])
    return [number, obj["prompt"] or "", image, nsfw, name]


def write_predictions(batch: Batch, images: str = "base64") -> Path:
    """predictions.csv from the merged results.jsonl of a finished batch read by `read_azure_input` (rank 0's job)."""
    if images not in ("base64", "files"):
        raise ValueError(f"images must be 'base64' or 'files', not {images!r}")
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    with open(batch.output / RESULTS, encoding="utf-8") as results:
        for line in results:
            obj = json.loads(line)
            writer.writerow(prediction_row(obj, batch.input.origins[obj["row"]], batch.output, images))
    path = batch.output / PREDICTIONS
    atomic_write(path, text.getvalue().encode())
    return path
