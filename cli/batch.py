"""`ldm batch`: a file of prompts → PNGs and results.jsonl (`ldm.serving.batch`), on one process or on the ranks
of a torchrun job (`ldm.serving.distributed`)."""

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from ldm.errors import LdmError
from ldm_cli.options import add_model_options, run_settings


def json_object(text: str) -> dict:
    """--parameters: a JSON object, or argparse's one-line error saying where the text stops being JSON."""
    try:
        value = json.loads(text)
    except ValueError as e:
        where = f" at line {e.lineno}, column {e.colno}" if isinstance(e, json.JSONDecodeError) else ""
        raise argparse.ArgumentTypeError(f"not JSON{where}: {getattr(e, 'msg', e)} (keys and strings take double "
                                         f"quotes: '{{\"steps\": 2}}')") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"a JSON object of scoring parameters, not {type(value).__name__}")
    return value


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register `batch` on the `ldm` command's subparsers."""
    bat = subparsers.add_parser(
        "batch", help="run a file of prompts (JSON request, JSONL or CSV) into PNGs and results.jsonl",
        description="Generate one PNG per row (per image) into --output, with results.jsonl in the scoring "
                    "response form. Row i gets seed + i; a killed run resumes where it stopped. Under torchrun "
                    "(torchrun --nproc-per-node N -m ldm_cli.main batch ...) the ranks share the rows, one device "
                    "each.")
    add_model_options(bat)
    bat.add_argument("--input", required=True, type=Path,
                     help="a scoring request (.json), one row a line (.jsonl: a prompt string or an object with "
                          "prompt/image/mask), or .csv with a prompt column (image/mask: file paths or base64)")
    bat.add_argument("--output", required=True, type=Path, help="folder for the PNGs, results.jsonl and batch.json")
    bat.add_argument("--parameters", default=None, type=json_object, metavar="JSON",
                     help='scoring parameters for every row, e.g. \'{"num_inference_steps": 30, "width": 512}\'')
    bat.add_argument("--seed", type=int, default=None, help="seed of row 0 (default: the input's, else random)")
    bat.add_argument("--base64-in-results", action="store_true",
                     help="repeat each image's base64 PNG in its results.jsonl line (by default the line names the "
                          "PNG file only)")
    bat.add_argument("--format", default="rows", choices=("rows", "azure"),
                     help="rows: --input is one file as above (default); azure: --input is a folder of CSV files "
                          "(prompt; image, mask_image, prompt) as Azure ML batch endpoints take it, and "
                          "predictions.csv is written too")
    bat.add_argument("--images", default=None, choices=("base64", "files"),
                     help="--format azure: predictions.csv's generated_image is the base64 PNG (default) or the "
                          "PNG's file name")
    bat.add_argument("--mini-batch-size", type=int, default=None, metavar="FILES",
                     help="--format azure: CSV files per mini-batch, the unit a torchrun rank takes (default: 1)")
    return bat


def run(args: argparse.Namespace) -> int:
    """One process, or one rank of a torchrun job (its rows, its device); rank 0 speaks for the job."""
    from ldm.serving.batch import load_pipeline, prepare_batch, run_batch
    from ldm.serving.distributed import Ranks

    if args.parameters is not None and not isinstance(args.parameters, dict):
        raise LdmError("--parameters must be a JSON object")
    if args.format != "azure" and (args.images or args.mini_batch_size):
        raise LdmError("--images and --mini-batch-size go with --format azure")
    settings = run_settings(args).check()
    ranks = Ranks.from_env()
    settings = replace(settings, device=ranks.device(settings.device))  # under torchrun: cuda:LOCAL_RANK, or the CPU
    ranks.start(settings.device)
    try:
        try:  # before the model loads; every rank reads the same and takes rank 0's word on the state
            job = prepare_batch(read_source(args), args.output, args.parameters, args.seed, settings, ranks)
        except LdmError:
            if ranks.rank > 0:
                return 2  # rank 0 says why
            raise
        ran, skipped, failed = run_batch(load_pipeline(job, settings), job, progress=progress(ranks),
                                         base64_in_results=args.base64_in_results)
        if ranks.rank == 0:
            report(args, job, ranks, ran, skipped, failed)
    finally:
        ranks.stop()
    return 1 if failed else 0


def read_source(args: argparse.Namespace):
    """--input: the file's path (`prepare_batch` reads it), or with --format azure the folder of CSV files read."""
    if args.format != "azure":
        return args.input
    from ldm.serving.azure import read_azure_input

    return read_azure_input(args.input, args.parameters, args.mini_batch_size or 1)


def progress(ranks):
    """Rank 0's bar of its rows (the other ranks run silent)."""
    from ldm.hooks.progress import ProgressBar

    return ProgressBar(unit="rows").show if ranks.rank == 0 else None


def report(args: argparse.Namespace, job, ranks, ran: int, skipped: int, failed: int) -> None:
    """Write predictions.csv (--format azure) and say what the job did."""
    written = "results.jsonl"
    if args.format == "azure":
        from ldm.serving.azure import write_predictions

        written = write_predictions(job, args.images or "base64").name + " and results.jsonl"
    on = f" on {ranks.world} ranks" if ranks.world > 1 else ""
    print(f"{args.output}: {ran} rows run{on}, {skipped} already done, {failed} failed (see {written})",
          file=sys.stderr)
