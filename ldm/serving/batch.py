"""`ldm batch`: a file of rows → one PNG per image and `results.jsonl`, resumable after a kill, on one process or
on the ranks of a torchrun job.

Input: a scoring request (`.json`, as `ldm serve` takes it), JSON lines (`.jsonl`: one row a line, a prompt
string or an object with `prompt` and optionally `image`, `mask`/`mask_image`, `control_image`, `ip_image`), or
CSV (`.csv` with a `prompt` column and optionally those); `ldm.serving.azure` reads a folder of CSV files (Azure
ML's batch layout). Images are base64 or file paths (relative to the input file's folder; in a JSON list of control
or reference images too). Parameters come from the request file, or `parameters` for JSONL/CSV.

Row i gets seed `seed + i`; the seed (given, or drawn once) is kept in `batch.json` in the output folder,
with a fingerprint of the input, so that a resumed run makes the same images. Each row's PNGs are written
atomically (temporary file, then rename) before its line is appended to the results file and synced, so a
run killed at any point resumes with no row missing and none twice.

Ranks (`ldm.serving.distributed`): rank r of n runs the rows whose unit of work (the row itself, or a mini-batch of
files) is r mod n, and appends to its own `results.rank{r}.jsonl` (one process appends to `results.jsonl`).
A run reads every results file to know which rows are done, so a job killed on n ranks resumes on any number.
At the end, once every rank is through, rank 0 merges all the files into `results.jsonl` in row order. Each
row is run alone from its own seed, so its image does not depend on how many ranks there are.
"""

import base64
import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import InputError
from ldm.pipelines.images import is_url, load_image
from ldm.pipelines.setup import RunSettings, prepare_pipeline
from ldm.serving.distributed import ONE, Ranks
from ldm.serving.limits import Limits
from ldm.serving.runner import run_row
from ldm.serving.schema import COLUMNS, PATH_LIKE, Request, RequestError, Row, parse

NO_LIMITS = Limits(max_rows=10**9, max_steps=1000, max_pixels=4096 * 4096, max_images_per_prompt=64)


PROMPTS = ("prompt", "text_prompt")
PANDAS_INDEX = re.compile(r"(Unnamed: \d+)?")  # the index column pandas writes: no name, or "Unnamed: 0" re-read
RESULTS = "results.jsonl"


@dataclass
class BatchInput:
    """An input read, before the scoring adapter parses its body."""

    name: str  # for messages: the file or folder
    body: dict  # the scoring request body
    identity: bytes  # what the input is (its bytes): with the parameters and settings, the batch's fingerprint
    errors: dict[int, RequestError] = field(default_factory=dict)  # rows malformed in the file, reported in place
    units: list[int] | None = None  # per row: the unit of work a rank takes whole (None: each row its own)
    origins: list[tuple[str, int]] | None = None  # per row: its file and its number there (a folder of files)


def image_cell(value, folder: Path):
    """A file path (relative to the input's folder: what `schema.PATH_LIKE` tells from base64, a name with an image
    suffix or a path starting as one) becomes the image, or the error that says why it cannot; base64 and data URLs
    stay as they are (the adapter decodes them); a list (several control or reference images) cell by cell."""
    if isinstance(value, list):
        return [image_cell(cell, folder) for cell in value]
    if not isinstance(value, str) or len(value) > 4096 or is_url(value) or not PATH_LIKE.search(value.strip()):
        return value
    try:
        return load_image((folder / value).expanduser())
    except InputError as e:
        return e


def read_csv(text: str, where: str, folder: Path, first: int = 0) -> tuple[list[dict], dict[int, RequestError]]:
    """The rows of a CSV file with a header line (`prompt` or `text_prompt`; `negative_prompt`, `image`, `mask`
    or `mask_image`; pandas' index column is ignored), and the rows that have not as many fields as the header:
    each is reported in its place (row `first` + its number) while the others run. Blank lines are skipped, as
    pandas skips them."""
    reader = csv.reader(io.StringIO(text.removeprefix("\ufeff"), newline=""))
    header = next(reader, None)
    if not header or not any(name in PROMPTS for name in header):
        raise InputError(f"{where}: the CSV needs a header line with a 'prompt' column")
    for name in header:
        if name not in COLUMNS and not PANDAS_INDEX.fullmatch(name):
            raise InputError(f"{where}: unknown column {name!r} (known: {', '.join(COLUMNS)})")
    rows, errors = [], {}
    for values in reader:
        if not values:
            continue
        cells = {COLUMNS[k]: v for k, v in zip(header, values, strict=False) if k in COLUMNS}
        position = first + len(rows)
        if len(values) != len(header):
            fields = f"{len(values)} field{'s' if len(values) != 1 else ''}"
            errors[position] = RequestError(f"data[{position}]", f"line {reader.line_num}: {fields} for the header's "
                                                                 f"{len(header)} columns")
            rows.append({"prompt": cells.get("prompt")})  # (its images are not read)
            continue
        rows.append({k: csv_cell(k, v, folder) for k, v in cells.items()})
    return rows, errors


def csv_cell(column: str, value: str, folder: Path):
    """A CSV cell as the adapter takes it: the prompt as written; an empty cell as none (the request's negative
    prompt, no image); an image's file read."""
    if column == "prompt":
        return value
    if not value:
        return None
    return value if column == "negative_prompt" else image_cell(value, folder)


def read_input(path: Path, parameters: dict | None) -> BatchInput:
    """The input file read (its images too): a scoring request body, and its malformed CSV lines."""
    if path.is_dir():
        raise InputError(f"--input {path} is a folder: a folder of CSV files is read with --format azure")
    if not path.is_file():
        raise InputError(f"--input {path}: no such file")
    folder = path.parent
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(f"--input {path}: not UTF-8 text") from None
    errors = {}
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
                    row.update({k: image_cell(v, folder) for k, v in row.items() if k not in PROMPTS})
                elif isinstance(row, list) and isinstance(columns, list):
                    row[:] = [v if c in PROMPTS else image_cell(v, folder)
                              for c, v in zip(columns, row, strict=False)]
        return BatchInput(str(path), body, raw)
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
                row = {k: v if k in PROMPTS else image_cell(v, folder) for k, v in row.items()}
            rows.append(row)
    elif path.suffix == ".csv":
        rows, errors = read_csv(text, f"--input {path}", folder)
    else:
        raise InputError(f"--input {path}: expected a .json request, .jsonl rows or a .csv file")
    return BatchInput(str(path), request_body(rows, parameters), raw, errors)


def request_body(rows: list, parameters: dict | None) -> dict:
    """Rows (strings or objects) and parameters as a scoring request body."""
    columns = sorted({k for r in rows if isinstance(r, dict) for k in r}, key=lambda c: (c != "prompt", c))
    return {"input_data": {"columns": columns or ["prompt"], "data": rows, "parameters": parameters or {}}}


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def complete_rows(results: Path, truncate: bool = False) -> dict[int, bytes]:
    """The lines of every row whose every line is in a results file (each line says how many its row has: `of`),
    by row. What a kill left behind — a torn line, or the first lines of a row — is not counted (that row runs
    again), and with `truncate` (the file's own writer, before appending) cut off."""
    if not results.exists():
        return {}
    rows, good, offset, current, lines = {}, 0, 0, None, []
    with open(results, "rb") as f:
        for line in f:
            try:
                obj = json.loads(line)
                row, of = obj["row"], obj["of"]
            except (ValueError, KeyError, TypeError):
                break
            if row != current:
                if lines:
                    break  # an earlier row stopped short: nothing after it can be complete
                current = row
            lines.append(line)
            offset += len(line)
            if len(lines) == of:
                rows[row], lines, good = b"".join(lines), [], offset
    if truncate and good != results.stat().st_size:
        with open(results, "r+b") as f:
            f.truncate(good)
    return rows


def results_files(output: Path) -> list[Path]:
    """results.jsonl, then the ranks' files in rank order (of this run's ranks, and of a run on more ranks)."""
    ranked = {int(m.group(1)): p for p in output.glob("results.rank*.jsonl")
              if (m := re.fullmatch(r"results\.rank(\d+)\.jsonl", p.name))}
    return [output / RESULTS, *(ranked[r] for r in sorted(ranked))]


def log_path(output: Path, ranks: Ranks) -> Path:
    """The results file this process appends to."""
    return output / (RESULTS if ranks.world == 1 else f"results.rank{ranks.rank}.jsonl")


def merge_results(output: Path) -> None:
    """Every complete row of results.jsonl and the ranks' files, once each (a kill between the rename and the
    removals below leaves a row in two files) and in row order, into results.jsonl — written whole, then renamed
    over it; then the ranks' files go."""
    results, *ranked = results_files(output)
    rows = {}
    for path in (results, *ranked):
        for row, lines in complete_rows(path).items():
            rows.setdefault(row, lines)
    merged = b"".join(rows[row] for row in sorted(rows))
    if not results.exists() or results.read_bytes() != merged:
        atomic_write(results, merged)
    for path in ranked:
        path.unlink()


@dataclass
class Batch:
    """A batch read and checked, its output folder claimed; the model is loaded after this."""

    request: Request
    output: Path
    done: set[int]  # rows complete in any results file
    ranks: Ranks = ONE
    input: BatchInput | None = None

    def owner(self, position: int) -> int:
        """The rank that runs row `position`: its unit of work (the row, or its mini-batch) mod the ranks."""
        units = self.input.units if self.input is not None else None
        return (position if units is None else units[position]) % self.ranks.world

    def mine(self) -> list[Row]:
        """The rows of this rank."""
        return [row for row in self.request.rows if self.owner(row.position) == self.ranks.rank]

    def left(self) -> int:
        """How many rows this rank has still to run."""
        return sum(row.position not in self.done for row in self.mine())


def claim(output: Path, fingerprint: str, seed: int | None, drawn: int, settings: dict | None) -> dict:
    """The state of the batch in `output` (batch.json): written now for a new batch, checked for a resumed one."""
    state_path = output / "batch.json"
    if not state_path.exists():
        # drawn: the input's own seed, or one drawn now and kept for a resumed run
        state = {"input": fingerprint, "seed": seed if seed is not None else drawn, "settings": settings}
        atomic_write(state_path, json.dumps(state, indent=2).encode())
        return state
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
    return state


def recorded_settings(settings: RunSettings) -> dict:
    """What batch.json keeps of the model and how it loads (and the batch's fingerprint holds): the options that
    change the images, named as the command line names them. A refiner and the VAE and tiling options appear
    only when given, so that a folder started before they existed resumes as it was."""
    record = {"model": settings.model, "variant": settings.variant, "revision": settings.revision,
              "prediction_type": settings.prediction_type, "no_safety_checker": not settings.safety_checker,
              "dtype": settings.dtype}
    if settings.refiner:
        record |= {"refiner": settings.refiner, "refiner_start": settings.refiner_start}
    given = {"vae": settings.vae, "tiling": settings.seamless, "vae_tiling": settings.vae_tiling,
             "vae_tile_size": settings.vae_tile_size}
    return record | {name: value for name, value in given.items() if value}


def prepare_batch(source: Path | BatchInput, output: Path, parameters: dict | None = None, seed: int | None = None,
                  settings: RunSettings | dict | None = None, ranks: Ranks = ONE) -> Batch:
    """Read and check the input (a file, or a `BatchInput` already read), then claim or resume `output` (rank 0
    does, and every rank takes its seed). `settings` (the model and how it is loaded: a `RunSettings`, or its
    `recorded_settings` as a batch.json holds them) must be those the folder was started with: a resumed run may
    not mix two models' images."""
    if isinstance(settings, RunSettings):
        settings = recorded_settings(settings)
    read = read_input(source, parameters) if isinstance(source, Path) else source
    try:
        request = parse(read.body, NO_LIMITS, prompt_syntax="a1111")  # batch files are read as the CLI reads prompts
    except RequestError as e:
        raise InputError(f"--input {read.name}: {e}") from None
    for position, error in read.errors.items():
        request.rows[position].error = error
    fingerprint = hashlib.sha256(read.identity + json.dumps([parameters, settings], sort_keys=True).encode())
    output.mkdir(parents=True, exist_ok=True)
    state = ranks.from_rank0(lambda: claim(output, fingerprint.hexdigest(), seed, request.seed, settings))
    request.seed = state["seed"]  # row i: seed + i
    own = log_path(output, ranks)
    done = set().union(*(complete_rows(path, truncate=path == own) for path in results_files(output)))
    return Batch(request, output, done, ranks, read)


def load_pipeline(batch: Batch, settings: RunSettings):
    """The pipeline that runs this rank's rows (`ldm.pipelines.setup.prepare_pipeline`), or None when none is left
    to run (a finished batch run again: its outputs are written again)."""
    return prepare_pipeline(settings) if batch.left() else None


def run_batch(pipe, batch: Batch, progress: Callable[[int, int], None] | None = None,
              base64_in_results: bool = False) -> tuple[int, int, int]:
    """Run this rank's rows that are not done yet; then, once every rank is through, rank 0 merges the results
    files into results.jsonl. Returns (rows run now, rows skipped as done, rows that failed), over all the ranks.
    A row's line names its PNG (`file`); the image's base64 is repeated there only with `base64_in_results`.
    `progress(done, total)`: this rank's rows. `pipe` may be None when `batch.left()` is 0."""
    request, output, done, ranks = batch.request, batch.output, batch.done, batch.ranks
    mine = batch.mine()
    skipped = sum(row.position in done for row in mine)
    ran = failed = 0
    with open(log_path(output, ranks), "ab") as log:
        for row in mine:
            if row.position in done:
                continue
            objects = run_row(pipe, request, row)
            lines = []
            for k, obj in enumerate(objects):
                obj = {"row": row.position, "of": len(objects), **obj}
                if "generated_image" in obj:
                    name = f"{row.position:05d}" + (f"-{k}" if len(objects) > 1 else "") + ".png"
                    atomic_write(output / name, base64.b64decode(obj["generated_image"]))
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
                progress(skipped + ran, len(mine))
    totals = ranks.sum((ran, skipped, failed))  # (every rank waits here for the others)
    if ranks.rank == 0:
        merge_results(output)
    return totals
