"""`ldm batch`: a file of rows → one PNG per image and `results.jsonl`, resumable after a kill.

Input: a scoring request (`.json`, as `ldm serve` takes it), JSON lines (`.jsonl`: one row a line, a prompt
string or an object with `prompt` and optionally `image`, `mask`/`mask_image`), or CSV (`.csv` with a
`prompt` column and optionally `image`, `mask`). Images are base64 or file paths (relative to the input
file's folder). Parameters come from the request file, or `parameters` for JSONL/CSV.

Row i gets seed `seed + i`; the seed (given, or drawn once) is kept in `batch.json` in the output folder,
with a fingerprint of the input, so that a resumed run makes the same images. Each row's PNGs are written
atomically (temporary file, then rename) before its line is appended to `results.jsonl` and synced, so a
run killed at any point resumes with no row missing and none twice.
"""

import base64
import csv
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import InputError
from .images import load_image
from .scoring import Limits, Request, RequestError, parse, run_row

NO_LIMITS = Limits(max_rows=10**9, max_steps=1000, max_pixels=4096 * 4096, max_images_per_prompt=64)


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROMPTS = ("prompt", "text_prompt")


def _image_cell(value, folder: Path):
    """A file path (relative to the input's folder) becomes the image, or the error that says why it cannot;
    base64 and data URLs stay as they are (the adapter decodes them)."""
    if not isinstance(value, str) or not value.lower().endswith(IMAGE_SUFFIXES) or len(value) > 4096:
        return value
    try:
        return load_image((folder / value).expanduser())
    except InputError as e:
        return e


def read_input(path: Path, parameters: dict | None) -> dict:
    """The input file as a scoring request body."""
    if not path.is_file():
        raise InputError(f"--input {path}: no such file")
    folder = path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--input {path}: not UTF-8 text") from None
    if path.suffix == ".json":
        try:
            body = json.loads(text)
        except (ValueError, RecursionError) as e:
            raise InputError(f"--input {path}: not valid JSON ({e})") from None
        data_in = body.get("input_data") if isinstance(body, dict) else None
        if isinstance(data_in, dict):  # otherwise the adapter names what is wrong with it
            if parameters:
                given = data_in.get("parameters")
                data_in["parameters"] = (given if isinstance(given, dict) else {}) | parameters
            columns = data_in.get("columns", ["prompt"])
            for row in data_in.get("data") if isinstance(data_in.get("data"), list) else []:
                if isinstance(row, dict):
                    row.update({k: _image_cell(v, folder) for k, v in row.items() if k not in PROMPTS})
                elif isinstance(row, list) and isinstance(columns, list):
                    row[:] = [v if c in PROMPTS else _image_cell(v, folder)
                              for c, v in zip(columns, row, strict=False)]
        return body
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except (ValueError, RecursionError) as e:
                raise InputError(f"--input {path}, line {n}: not valid JSON ({e})") from None
            if isinstance(row, str):
                row = {"prompt": row}
            if isinstance(row, dict):
                row = {k: v if k in PROMPTS else _image_cell(v, folder) for k, v in row.items()}
            rows.append(row)
    elif path.suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or "prompt" not in reader.fieldnames:
            raise InputError(f"--input {path}: the CSV needs a header line with a 'prompt' column")
        rows = [{k: v if k == "prompt" else _image_cell(v or None, folder) for k, v in r.items() if k}
                for r in reader]
    else:
        raise InputError(f"--input {path}: expected a .json request, .jsonl rows or a .csv file")
    columns = sorted({k for r in rows if isinstance(r, dict) for k in r}, key=lambda c: c != "prompt")
    return {"input_data": {"columns": columns or ["prompt"], "data": rows, "parameters": parameters or {}}}


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _done_rows(results: Path) -> set[int]:
    """Rows whose every line is in results.jsonl (each line says how many its row has: `of`). What a kill
    left behind — a torn line, or the first lines of a row — is cut off, and that row runs again."""
    if not results.exists():
        return set()
    done, good, offset, current, seen = set(), 0, 0, None, 0
    with open(results, "rb") as f:
        for line in f:
            try:
                obj = json.loads(line)
                row, of = obj["row"], obj["of"]
            except (ValueError, KeyError, TypeError):
                break
            if row != current:
                if current is not None and current not in done:
                    break  # an earlier row stopped short: nothing after it can be complete
                current, seen = row, 0
            seen += 1
            offset += len(line)
            if seen == of:
                done.add(row)
                good = offset
    if good != results.stat().st_size:
        with open(results, "r+b") as f:
            f.truncate(good)
    return done


@dataclass
class Batch:
    """A batch read and checked, its output folder claimed; the model is loaded after this."""

    request: Request
    output: Path
    done: set[int]


def prepare_batch(input_path: Path, output: Path, parameters: dict | None = None, seed: int | None = None,
                  settings: dict | None = None) -> Batch:
    """Read and check the input, then claim or resume `output`. `settings` (the model and how it is loaded)
    must be those the folder was started with: a resumed run may not mix two models' images."""
    body = read_input(input_path, parameters)
    try:
        request = parse(body, NO_LIMITS, prompt_syntax="a1111")  # batch files are read as the CLI reads prompts
    except RequestError as e:
        raise InputError(f"--input {input_path}: {e}") from None
    fingerprint = hashlib.sha256(input_path.read_bytes() + json.dumps([parameters, settings], sort_keys=True)
                                 .encode()).hexdigest()
    output.mkdir(parents=True, exist_ok=True)
    state_path = output / "batch.json"
    if state_path.exists():
        try:
            state = json.loads(state_path.read_text())
        except (ValueError, OSError):
            raise InputError(f"{state_path} is unreadable; remove it to start the batch again") from None
        if state.get("input") != fingerprint:
            started = state.get("settings")
            raise InputError(f"--output {output} holds a batch of another input, parameters or model (started with "
                             f"{started}); resume with the same ones, or choose a new output folder")
        if seed is not None and seed != state["seed"]:
            raise InputError(f"--output {output} was started with seed {state['seed']}; resume without --seed")
    else:
        # request.seed: the input's own seed, or one drawn now and kept for a resumed run
        state = {"input": fingerprint, "seed": seed if seed is not None else request.seed, "settings": settings}
        _atomic_write(state_path, json.dumps(state, indent=2).encode())
    request.seed = state["seed"]  # row i: seed + i
    return Batch(request, output, _done_rows(output / "results.jsonl"))


def run_batch(pipe, batch: Batch, progress: Callable[[int, int], None] | None = None,
              base64_in_results: bool = False) -> tuple[int, int, int]:
    """Run every row not done yet. Returns (rows run now, rows skipped as done, rows that failed). A row's line
    in results.jsonl names its PNG (`file`); the image's base64 is repeated there only with `base64_in_results`."""
    request, output, done = batch.request, batch.output, batch.done
    ran = failed = 0
    total = len(request.rows)
    with open(output / "results.jsonl", "ab") as log:
        for row in request.rows:
            if row.position in done:
                continue
            objects = run_row(pipe, request, row)
            lines = []
            for k, obj in enumerate(objects):
                obj = {"row": row.position, "of": len(objects), **obj}
                if "generated_image" in obj:
                    name = f"{row.position:05d}" + (f"-{k}" if len(objects) > 1 else "") + ".png"
                    _atomic_write(output / name, base64.b64decode(obj["generated_image"]))
                    obj["file"] = name
                    if not base64_in_results:
                        del obj["generated_image"]
                else:
                    failed += 1
                lines.append(json.dumps(obj) + "\n")
            log.write("".join(lines).encode())
            log.flush()
            os.fsync(log.fileno())
            ran += 1
            if progress is not None:
                progress(len(done) + ran, total)
    return ran, len(done), failed
