"""TAESD files → a `TinyVAE` (`ldm.networks.taesd`): what `--vae` and `--preview-vae` load when given one.

The files people use: a diffusers `AutoencoderTiny` folder (madebyollin/taesd, madebyollin/taesdxl: config.json and
diffusion_pytorch_model.safetensors), one .safetensors file in those names, or the original halves
`taesd_encoder.safetensors` / `taesd_decoder.safetensors` (also `taesdxl_…`), given as either file (the other is
taken from beside it when it is there) or as the folder holding them. TAESD and TAESDXL have the same shapes: which
one fits which model cannot be read from the files, only from their names.
"""

import dataclasses
import json
from pathlib import Path

import torch
from torch import Tensor

from ldm.errors import LoadError
from ldm.loading.families import ModelSpec
from ldm.loading.files import load_module, read_config, read_safetensors, safetensors_header, weights_file
from ldm.networks.taesd import TinyVAE, TinyVAEConfig, original_keys

HALVES = ("encoder", "decoder")


def _config_class(folder: Path) -> str | None:
    config = folder / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("_class_name")
    except (ValueError, AttributeError, UnicodeDecodeError):
        return None


def _half_of(keys: set[str]) -> str | None:
    """Which half an original TAESD file holds, by its first layer: the encoder's conv is layer 0, the decoder's
    layer 1 (after its clamp); None when the keys are not an original TAESD's."""
    if not keys or not all(k.split(".", 1)[0].isdigit() for k in keys):
        return None
    return "encoder" if "0.weight" in keys else "decoder" if "1.weight" in keys else None


def original_halves(path: Path) -> dict[str, Path]:
    """The original TAESD files `path` stands for, by half: the file itself and its sibling, or a folder's pair."""
    candidates = sorted(path.glob("*.safetensors")) if path.is_dir() else [path] + [
        path.with_name(path.name.replace(a, b)) for a, b in (("encoder", "decoder"), ("decoder", "encoder"))
        if a in path.name]
    found = {}
    for candidate in candidates:
        if candidate.is_file():
            half = _half_of(set(safetensors_header(candidate)))
            if half is not None:
                found.setdefault(half, candidate)
    return found


def is_tiny_vae(path: Path) -> bool:
    """An AutoencoderTiny folder or file, or original TAESD halves."""
    if path.is_dir() and _config_class(path) == "AutoencoderTiny":
        return True
    if path.is_file() and path.suffix == ".safetensors":
        keys = set(safetensors_header(path))
        return _half_of(keys) is not None or any(k.startswith(("decoder.layers.", "encoder.layers.")) for k in keys)
    return path.is_dir() and bool(original_halves(path))


def load_tiny_vae(path: Path, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> TinyVAE:
    """The TinyVAE of `path` for a model of `spec` (its latent channels must match)."""
    cfg = TinyVAEConfig()
    if path.is_dir() and _config_class(path) == "AutoencoderTiny":
        cfg = read_config(path / "config.json", TinyVAEConfig.from_diffusers)
        weights = weights_file(path, "diffusion_pytorch_model")
        state = read_safetensors(weights, dtype)
    elif (halves := original_halves(path)):
        state: dict[str, Tensor] = {}
        for half, file in halves.items():
            state |= original_keys(half, read_safetensors(file, dtype))
        weights = halves.get("decoder", path)
    else:
        weights, state = path, read_safetensors(path, dtype)
    has = {half: any(k.startswith(f"{half}.") for k in state) for half in HALVES}
    if not any(has.values()):
        raise LoadError(f"--vae {path}: not a TAESD (no encoder.layers.* or decoder.layers.* tensors)")
    latent = state["decoder.layers.0.weight"].shape[1] if has["decoder"] else state[
        f"encoder.layers.{len(cfg.num_encoder_blocks) + sum(cfg.num_encoder_blocks)}.weight"].shape[0]
    cfg = dataclasses.replace(cfg, latent_channels=latent)
    if latent != spec.latent_channels:
        raise LoadError(f"--vae {path}: a TAESD of {latent} latent channels does not fit this {spec.label} model "
                        f"({spec.latent_channels})")
    vae = load_module(lambda: TinyVAE(cfg, **has), state, weights, "TAESD", device)
    # On the CPU TAESD runs channels_last: oneDNN's convolutions are faster in NHWC, the copy of its 2.4 M weights
    # costs nothing, and the numbers stay the NCHW module's (within 3e-7, fp32). Measured (BENCHMARKS.md, "Few-step
    # models"): a 512² decode 0.79 → 0.54 s in fp32 on a 2-core AVX-512 VM, and about 3× faster in bf16 on an AMX one.
    return vae.to(memory_format=torch.channels_last) if device.type == "cpu" else vae
