"""From a path or a Hub id to loaded modules: strict, loud, never unpickling.

Networks are built on the `meta` device and receive the tensors read from safetensors with
`load_state_dict(strict=True, assign=True)`: no random initialisation and no second copy. Every key
and shape is checked first, and a mismatch names the file, the missing and unexpected keys and the
family the config describes.
"""

import contextlib
import dataclasses
import json
import re
import types
import typing
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ldm.errors import LoadError
from ldm.loading.families import lookup, manifest, weights_dir

PICKLE_SUFFIXES = (".ckpt", ".bin", ".pt", ".pth", ".pkl")

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise LoadError(f"{path} is missing")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LoadError(f"{path} is not valid JSON: {e}") from None


def _has_type(value, annotation) -> bool:
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is type(None):
        return value is None
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, a) for a in args)
    if origin is tuple:
        return isinstance(value, tuple) and all(_has_type(v, args[0]) for v in value)
    return isinstance(value, origin or annotation)


def read_config(path: Path, parse):
    """`parse(dict)` of a config.json, as a LoadError naming the file when it is malformed or a field has
    the wrong type (a string where a number belongs, say)."""
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise LoadError(f"{path} is not a JSON object")
    try:
        config = parse(raw)
    except (TypeError, ValueError, KeyError) as e:
        raise LoadError(f"{path}: unusable config ({e})") from None
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if not _has_type(value, f.type):
            raise LoadError(f"{path}: {f.name} = {value!r} is not of the expected type ({f.type})")
    return config


def refuse_pickle(path: Path) -> None:
    raise LoadError(
        f"{path} is a pickle checkpoint; ldm never unpickles (it can run arbitrary code). "
        "Use the .safetensors file of the same model (the official repos ship one), or convert it once "
        "in a trusted environment.")


def weights_file(folder: Path, stem: str, variant: str | None = None) -> Path:
    """`{stem}.safetensors` in a component folder, or `{stem}.{variant}.safetensors`.

    Without a variant the full-precision file is preferred and a lone `*.fp16.safetensors` is accepted.
    """
    candidates = [f"{stem}.{variant}.safetensors"] if variant else [f"{stem}.safetensors", f"{stem}.fp16.safetensors"]
    for name in candidates:
        if (folder / name).is_file():
            return folder / name
    pickles = sorted(p.name for p in folder.glob("*") if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if pickles:
        refuse_pickle(folder / pickles[0])
    raise LoadError(f"{folder}: no weights found (looked for {', '.join(candidates)})")


SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                      "BOOL": torch.bool}


def read_safetensors(path: Path, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, cast to `dtype` if given.

    Without a cast the tensors are views of the memory-mapped file (no copy). With one, each tensor is read
    on its own and converted, so the memory peak is the converted weights plus one tensor, not plus the
    whole file's pages as a cast of the mapped tensors would hold."""
    header = safetensors_header(path)  # checks the file is whole and not a pickle
    unknown = sorted({d for d, _ in header.values()} - set(SAFETENSORS_DTYPES))
    if unknown:
        raise LoadError(f"{path}: tensors of type {', '.join(unknown)} are not supported (ldm reads float and "
                        "integer tensors)")
    if dtype is None or all(SAFETENSORS_DTYPES[d] == dtype or not SAFETENSORS_DTYPES[d].is_floating_point
                            for d, _ in header.values()):
        with _damaged(path), safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not a dict)
    tensors = {}
    with _damaged(path), open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(size))
        for key, info in meta.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            f.seek(8 + size + start)
            raw = bytearray(f.read(end - start))
            stored = SAFETENSORS_DTYPES[info["dtype"]]
            t = torch.frombuffer(raw, dtype=stored) if raw else torch.empty(0, dtype=stored)
            t = t.reshape(info["shape"])
            tensors[key] = t.to(dtype) if t.is_floating_point() else t.clone()
    return tensors


MADV_PAGEOUT = 21  # Linux ≥ 5.4: reclaim these pages now; their contents are kept


def _file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's file-backed memory mappings (a safetensors file read without a cast is
    one), from /proc/self/maps; none where there is no /proc."""
    spans = []
    with contextlib.suppress(OSError), open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].startswith("/"):  # a path: not [heap], [stack] or anonymous
                start, end = (int(a, 16) for a in fields[0].split("-"))
                spans.append((start, end))
    return spans


def mapped_pages(tensors) -> list[tuple[int, int]]:
    """The page-aligned address ranges of those `tensors` (CPU) that are views of a memory-mapped file: the
    weights `read_safetensors` returns without a cast. Copies and casts (anonymous memory) are left out."""
    import mmap

    spans, page, ranges = _file_mappings(), mmap.PAGESIZE, set()
    for t in tensors:
        storage = t.untyped_storage()
        start, end = storage.data_ptr(), storage.data_ptr() + storage.nbytes()
        if t.device.type == "cpu" and end > start and any(a <= start and end <= b for a, b in spans):
            ranges.add((start // page * page, -(-end // page) * page))
    return sorted(ranges)


def page_out(ranges: list[tuple[int, int]]) -> int:
    """Drop the pages of `ranges` (from `mapped_pages`) from this process's resident memory; returns the bytes
    advised (0 where the kernel lacks MADV_PAGEOUT, before Linux 5.4).

    The tensors stay valid: a page touched again is read back from the file (or the page cache). Nothing
    written is lost: MADV_PAGEOUT keeps every page's contents, and a page that a write made private to the
    process (a LoRA merged in place into safetensors' copy-on-write map, `ldm.adapters.lora`) is anonymous memory, which
    the kernel keeps where there is no swap and swaps out where there is.

    For compiled CPU pipelines (`ldm.speed.accelerate.accelerate`): inductor's freezing folds the weights into packed
    copies of its own, after which the mapped originals are read again only to compile another shape."""
    import ctypes

    if not ranges:
        return 0
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for start, end in ranges:
        if madvise(start, end - start, MADV_PAGEOUT) != 0:
            break  # EINVAL: no MADV_PAGEOUT here (or the mapping is gone)
        advised += end - start
    return advised


def safetensors_header(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """dtype and shape of every tensor in a safetensors file, from its header (no data read). safetensors
    checks that the header's offsets cover the file exactly, so a truncated file is reported here."""
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    with _damaged(path), safe_open(str(path), framework="pt", device="cpu") as f:
        return {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape())) for k in f.keys()}  # noqa: SIM118


@contextlib.contextmanager
def _damaged(path: Path):
    if not path.is_file():
        raise LoadError(f"{path} is missing")
    try:
        yield
    except Exception as e:  # safetensors raises its own error type, or OSError, for damaged files
        again = ("`ldm download MODEL --force` fetches it again" if "models--" in path.as_posix()  # the Hub cache
                 else "replace it with a whole copy")
        raise LoadError(f"{path} is not a readable safetensors file ({e}); it may be truncated or corrupt: "
                        f"{again}") from None


def load_module(build, state: dict[str, torch.Tensor], source: Path, family: str,
                device: torch.device | str = "cpu") -> nn.Module:
    """Build `build()` on the meta device and assign `state` into it after checking every key and shape."""
    with torch.device("meta"):
        module = build()
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
             for k in sorted(set(expected) & set(state)) if state[k].shape != expected[k].shape]
    if missing or unexpected or wrong:
        def show(keys):
            return ", ".join(keys[:8]) + (f" … ({len(keys)} in all)" if len(keys) > 8 else "")
        problems = [f"missing keys: {show(missing)}" if missing else "",
                    f"unexpected keys: {show(unexpected)}" if unexpected else "",
                    f"wrong shapes: {show(wrong)}" if wrong else ""]
        raise LoadError(f"{source} does not match the {family} {type(module).__name__} its config describes; "
                        + "; ".join(p for p in problems if p))
    module.load_state_dict(state, strict=True, assign=True)
    return module.to(device).eval().requires_grad_(False)


def is_hub_id(model: str) -> bool:
    return bool(HUB_ID.match(model)) and not model.startswith((".", "/"))


def resolve(model: str, allow_patterns: list[str], revision: str | None = None,
            local_files_only: bool = False, force_download: bool = False, downloading: bool = False) -> Path:
    """Where `model` is on disk: a local path as is; a file or folder name found in the weights/ store; a
    manifest name (`sd15`), Hub repo id or alias downloaded (only `allow_patterns`) into the Hugging Face
    cache, which honours HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE."""
    path = Path(model).expanduser()
    if path.exists():
        return path
    if not path.is_absolute() and (weights_dir() / model).exists():
        return weights_dir() / model
    entry = lookup(model)
    if entry is None and not is_hub_id(model):
        raise LoadError(f"{model}: no such file or folder, here or in {weights_dir()}, and not a Hub repo id like "
                        f"'owner/name' or an official checkpoint name ({', '.join(manifest())})")
    repo = entry.repo if entry else model
    if entry is not None:  # only the components the manifest lists for it
        allow_patterns = [p for p in allow_patterns if "/" not in p or p.split("/")[0] in entry.components]
    from huggingface_hub import constants, snapshot_download

    with hub_errors(repo, model, revision, downloading, cached_only=local_files_only):
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=allow_patterns,
                                        local_files_only=local_files_only, force_download=force_download))
    if not (folder / "model_index.json").is_file():
        if local_files_only or constants.HF_HUB_OFFLINE:  # a cache holding only the single file looks complete
            raise LoadError(f"{repo}: the cached copy in {folder} is not a whole diffusers folder (no "
                            f"model_index.json): run `ldm download {model}` where the Hub is reachable")
        raise LoadError(f"{repo} has no model_index.json: it is not a diffusers folder (for a single-file "
                        "checkpoint, download the .safetensors file and pass its path)")
    return folder


def hub_file(repo: str, filename: str, revision: str | None = None, local_files_only: bool = False,
             force: bool = False) -> Path:
    """One file of a Hub repo (an original single-file checkpoint), through the Hugging Face cache. Fetched as a
    folder is (`snapshot_download`, of that one file), so that a Hub out of reach is the same one line, at once:
    `hf_hub_download` retries its HEAD request five times with backoff, printing each retry and the URL."""
    from huggingface_hub import snapshot_download

    with hub_errors(repo, repo, revision, downloading=True):
        folder = Path(snapshot_download(repo, revision=revision, allow_patterns=[filename],
                                        local_files_only=local_files_only, force_download=force))
    if not (folder / filename).is_file():
        raise LoadError(f"{repo} has no file {filename}")
    return folder / filename


@contextlib.contextmanager
def hub_errors(repo: str, model: str, revision: str | None, downloading: bool = False, cached_only: bool = False):
    """huggingface-hub's exceptions as LoadErrors that say what to do; `cached_only`: the cache alone was asked
    (`ldm info`, `local_files_only`), so whether the Hub is reachable is not the matter."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise LoadError(f"{repo} is gated on the Hub: accept its licence on its page and log in "
                        "(`hf auth login`), then run again") from None
    except RepositoryNotFoundError:
        raise LoadError(f"{repo}: no such repository on the Hub (or it is private)") from None
    except RevisionNotFoundError:
        raise LoadError(f"{repo}: revision {revision!r} not found") from None
    except LocalEntryNotFoundError as e:
        if type(e).__name__ == "IncompleteSnapshotError":  # (newer huggingface-hub: its cached listing says so)
            raise LoadError(f"{repo}: the cached copy in {getattr(e, 'snapshot_path', 'the cache')} is not a whole "
                            f"diffusers folder (files are missing): run `ldm download {model}` where the Hub is "
                            "reachable") from None
        if cached_only:
            raise LoadError(f"{repo} is not in the local Hugging Face cache ($HF_HOME/hub), and only the cache is "
                            f"read here (`ldm info` never downloads): run `ldm download {model}` first, or pass a "
                            "local folder or file") from None
        if downloading:  # the advice below would send `ldm download` users to themselves
            raise LoadError(f"{repo}: the Hub cannot be reached (no network, or HF_HUB_OFFLINE=1 is set): connect, "
                            "unset HF_HUB_OFFLINE, and run the download again") from None
        raise LoadError(f"{repo} is not in the local Hugging Face cache and the Hub cannot be reached "
                        f"(offline, or HF_HUB_OFFLINE=1). Run `ldm download {model}` where the Hub is reachable "
                        "(the cache is $HF_HOME/hub), or pass a local folder or file") from None
    except EntryNotFoundError as e:
        raise LoadError(f"{repo}: {e}") from None
    except OSError as e:
        raise LoadError(f"downloading {repo} failed: {e}") from None
