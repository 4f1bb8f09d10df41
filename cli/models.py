"""`ldm download` (a model into the Hugging Face cache) and `ldm info` (what a model is, without loading it)."""

import argparse
from pathlib import Path

from ldm.errors import LdmError


def add_parsers(subparsers) -> None:
    """Register `download` and `info` on the `ldm` command's subparsers."""
    dl = subparsers.add_parser(
        "download", help="fetch a model into the Hugging Face cache",
        description="Download an official model's diffusers folder (safetensors only) or, with --single-file, its "
                    "original single-file checkpoint into the Hugging Face cache ($HF_HOME/hub), and print where "
                    "it is. MODEL: a name from weights/manifest.json (" + ", ".join(manifest_names()) + "), a Hub "
                    "repo id, or an alias such as runwayml/stable-diffusion-v1-5.")
    dl.add_argument("model", metavar="MODEL", help="a manifest name (sd15, sdxl-base, …) or a Hub repo id")
    dl.add_argument("--single-file", action="store_true", help="the original single-file .safetensors checkpoint")
    dl.add_argument("--variant", default=None, help="weights variant, e.g. fp16 (*.fp16.safetensors)")
    dl.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")
    dl.add_argument("--force", action="store_true", help="download again even if cached (a damaged file)")

    info = subparsers.add_parser(
        "info", help="describe a model: family, configs, dtype, parameters, files",
        description="Describe a local folder, a single file, or a cached Hub model (nothing is downloaded or "
                    "loaded: configs and safetensors headers only).")
    info.add_argument("model", metavar="MODEL",
                      help="a diffusers folder, a single .safetensors file, a manifest name or a cached Hub repo id")
    info.add_argument("--variant", default=None, help="weights variant, e.g. fp16")
    info.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit)")


def manifest_names() -> list[str]:
    from ldm.loading.families import manifest

    try:
        return list(manifest())
    except LdmError:
        return []


def download(args: argparse.Namespace) -> None:
    from ldm.loading.families import lookup
    from ldm.loading.files import hub_file, is_hub_id, safetensors_header

    entry = lookup(args.model)
    if entry is None and not is_hub_id(args.model):
        raise LdmError(f"{args.model}: not a Hub repo id ('owner/name') or a manifest name "
                       f"({', '.join(manifest_names())})")
    if args.single_file:
        if entry is None or entry.single_file is None:
            known = [e.name for e in (lookup(n) for n in manifest_names()) if e and e.single_file]
            raise LdmError(f"{args.model}: no safetensors single file is known for it (known: {', '.join(known)})")
        if args.variant:
            raise LdmError("--variant selects files of a diffusers folder, not a single file")
        path = hub_file(entry.repo, entry.single_file, args.revision, force=args.force)
        files = [path]
    else:
        path, files = download_folder(args)
    for file in files:
        safetensors_header(file)  # a damaged or truncated file is reported now, not at generation time
    print(path)


def download_folder(args: argparse.Namespace):
    """The diffusers folder of --model (its --variant's weights), and the weight files this download asked for."""
    from huggingface_hub.utils import filter_repo_objects

    from ldm.loading.components import hub_files
    from ldm.loading.files import resolve

    patterns = hub_files(args.variant)
    path = resolve(args.model, patterns, args.revision, force_download=args.force, downloading=True)
    # the snapshot folder is shared with other variants and single files: check only what this download asked for
    names = [p.relative_to(path).as_posix() for p in path.rglob("*.safetensors")]
    files = sorted(path / name for name in filter_repo_objects(names, allow_patterns=patterns))
    if not files:
        raise LdmError(f"{args.model}: the repo has no {'.' + args.variant if args.variant else ''}"
                       ".safetensors weights ldm reads (it never loads .ckpt/.bin pickles)")
    return path, files


def info(args: argparse.Namespace) -> None:
    from ldm.loading.info import model_info

    print("\n".join(model_info(args.model, args.revision, args.variant).lines() + machine_lines()))


NATIVE_BF16 = ("amx_bf16", "avx512_bf16")  # CPUINFO flags of CPUs that compute in bf16 natively
CPUINFO = Path("/proc/cpuinfo")


def machine_lines() -> list[str]:
    """What this machine runs a model with: the threads torch will use (README, "What to expect": on a busy
    machine, fewer threads run faster), native bf16 on the CPU (where `--dtype bf16` pays), the GPU."""
    import os

    import torch

    threads = torch.get_num_threads()
    lines = [f"cpu:        {os.cpu_count()} cores, {threads} thread{'s' * (threads != 1)} (OMP_NUM_THREADS sets them: "
             "on a machine busy with other work, give the cores that are free)"]
    try:
        flags = set(CPUINFO.read_text(encoding="ascii", errors="replace").split())
    except OSError:
        flags = set()
    if native := [f for f in NATIVE_BF16 if f in flags]:
        lines.append(f"            native bf16 ({', '.join(native)}): --dtype bf16 runs about 3× faster than fp32 "
                     "on the CPU (BENCHMARKS.md, 'Few-step models')")
    if torch.cuda.is_available():
        lines.append(f"gpu:        {torch.cuda.get_device_name(0)}")
    return lines
