"""The file hashes AUTOMATIC1111 writes into infotexts, cached so that a 7 GB checkpoint is read once.

- `Model hash`: the first 10 hex digits of the sha256 of the whole checkpoint file;
- `TI hashes`: the first 12 of the embedding file's sha256;
- `Lora hashes`: the first 12 of the sha256 of a safetensors file's bytes after its header (kohya's
  "addnet" hash, which metadata edits do not change; `ldm.adapters.lora.lora_hash`).

The cache (`$LDM_CACHE/hashes.json`, default ~/.cache/ldm) keys each digest by path, size and mtime.
"""

import hashlib
import json
import os
from pathlib import Path


def cache_file() -> Path:
    return Path(os.environ.get("LDM_CACHE") or Path.home() / ".cache" / "ldm") / "hashes.json"


def sha256(path: str | Path, after_header: bool = False) -> str:
    """The hex sha256 of a file (of its bytes after the safetensors header with `after_header`), cached."""
    path = Path(path).resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{'addnet' if after_header else 'file'}"
    cache = _read_cache()
    if key in cache:
        return cache[key]
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if after_header:
            f.seek(8 + int.from_bytes(f.read(8), "little"))
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    value = digest.hexdigest()
    cache[key] = value
    _write_cache(cache)
    return value


def _read_cache() -> dict:
    try:
        data = json.loads(cache_file().read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, ValueError):
        return {}


def _write_cache(cache: dict) -> None:
    """Best effort (a read-only home is no reason to fail a generation); written atomically."""
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache))
        tmp.replace(target)
    except OSError:
        pass
