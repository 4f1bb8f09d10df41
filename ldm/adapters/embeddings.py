"""Textual-inversion embeddings: the files people share (EasyNegative, badhandv4, …), read as A1111 reads them.

Follows AUTOMATIC1111/stable-diffusion-webui v1.10 `modules/textual_inversion/textual_inversion.py`
(`create_embedding_from_data`): a file holds the vectors of one trigger word, its stem.

- `.safetensors` with `emb_params` [n, width] (SD 1.x: 768, SD 2.x: 1024), or any single tensor (the diffusers
  concept layout, keyed by its token);
- `.safetensors` with `clip_l` [n, 768] and `clip_g` [n, 1280] (SDXL: one set of vectors per text tower);
- A1111 `.pt` files (`string_to_param` → `{"*": [n, width]}`) through `torch.load(weights_only=True)` only, which
  rebuilds tensors, dicts, strings and numbers and nothing else: a file that needs more (arbitrary classes) is
  refused with a message, never unpickled.

The vectors replace the token embeddings of the trigger word's tokens before the text transformer
(`ldm.pipelines.prompts`), one token slot per vector. The infotext names them with A1111's short hash (the first 12
hex digits of the file's sha256).
"""

import pickle
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from ldm.errors import LoadError
from ldm.loading.families import weights_dir
from ldm.loading.files import PICKLE_SUFFIXES, read_safetensors, refuse_pickle
from ldm.loading.hashes import sha256

SUFFIXES = (".safetensors", ".pt")


@dataclass
class Embedding:
    name: str  # the trigger word: the file's stem
    path: Path
    vectors: dict[str, Tensor]  # per text tower of the model: "text_encoder", "text_encoder_2" → (n, width) fp32
    hash: str  # sha256 of the file, first 12 hex digits (A1111's short hash)


def embeddings_dir() -> Path:
    """`weights/embeddings` (or `$LDM_WEIGHTS/embeddings`): every file in it is loaded with the model."""
    return weights_dir() / "embeddings"


def read_vectors(path: Path) -> dict[str, Tensor]:
    """The tensors of an embedding file by role: {"": vectors} for one tower, {"clip_l", "clip_g"} for SDXL."""
    if path.suffix == ".pt":
        data = _load_pt(path)
        params = data.get("string_to_param") if isinstance(data, dict) else None
        if not isinstance(params, dict) or len(params) != 1 or not torch.is_tensor(next(iter(params.values()))):
            raise LoadError(f"{path}: not an A1111 textual-inversion file (no string_to_param with one tensor)")
        return {"": next(iter(params.values())).detach()}
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise LoadError(f"{path}: embeddings are read from .safetensors (or A1111 .pt) files")
    tensors = read_safetensors(path)
    if "clip_l" in tensors and "clip_g" in tensors and len(tensors) == 2:
        return {"clip_l": tensors["clip_l"], "clip_g": tensors["clip_g"]}
    if len(tensors) == 1:  # emb_params, or a diffusers concept keyed by its token
        return {"": next(iter(tensors.values()))}
    raise LoadError(f"{path}: not a textual-inversion file (expected emb_params, or clip_l and clip_g; found "
                    f"{', '.join(sorted(tensors)[:6])})")


def _load_pt(path: Path):
    if not path.is_file():
        raise LoadError(f"{path} is missing")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else "it holds objects other than tensors"
        raise LoadError(f"{path}: this .pt file needs arbitrary unpickling, which ldm never does ({first}); "
                        "convert it to .safetensors in a trusted environment") from None
    except Exception as e:  # a damaged or truncated zip/pickle stream
        raise LoadError(f"{path} is not a readable .pt embedding ({e})") from None


def load_embedding(path: str | Path, towers: dict[str, int]) -> Embedding:
    """Read an embedding for a model whose text towers have the given widths ({"text_encoder": 768, …}).

    A file that does not fit (an SD 1.x embedding on SD 2.x or SDXL, say) is a LoadError naming the file and
    both widths."""
    path = Path(path)
    found = read_vectors(path)
    xl = "text_encoder_2" in towers
    wanted = {"text_encoder": "clip_l", "text_encoder_2": "clip_g"} if xl else {"text_encoder": ""}
    if set(found) != {wanted[t] for t in towers} | ({"clip_l"} if xl else set()):
        kind = "a single-tower (SD 1.x/2.x)" if xl else "an SDXL (clip_l + clip_g)"
        widths = " + ".join(str(v.shape[-1]) for v in found.values())
        raise LoadError(f"{path}: {kind} embedding of width {widths} does not fit this model's text towers "
                        f"(width {' + '.join(str(w) for w in towers.values())})")
    vectors = {}
    for tower, width in towers.items():
        v = found[wanted[tower]].float()
        v = v[None] if v.ndim == 1 else v
        if v.ndim != 2 or v.shape[1] != width or len(v) == 0:
            raise LoadError(f"{path}: embedding vectors of shape {tuple(v.shape)} (width {v.shape[-1]}) do not fit "
                            f"the {tower} of this model (width {width})")
        vectors[tower] = v
    if len({len(v) for v in vectors.values()}) > 1:
        raise LoadError(f"{path}: clip_l and clip_g hold different numbers of vectors")
    return Embedding(path.stem, path, vectors, sha256(path)[:12])


def folder_embeddings(towers: dict[str, int], folder: Path | None = None) -> tuple[list[Embedding], list[str]]:
    """Every embedding in `weights/embeddings` that fits the model, and a note for each file skipped (as A1111
    skips the embeddings of other families that share its folder)."""
    folder = embeddings_dir() if folder is None else folder
    if not folder.is_dir():
        return [], []
    loaded, skipped = [], []
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.suffix not in SUFFIXES:
            continue
        try:
            loaded.append(load_embedding(path, towers))
        except LoadError as e:
            skipped.append(f"embedding {path.name} skipped: {e}")
    return loaded, skipped
