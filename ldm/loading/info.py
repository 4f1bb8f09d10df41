"""`ldm info`: what a model is and where its files are, from its configs and safetensors headers (no weights
are loaded, nothing is downloaded)."""

import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ldm.errors import LoadError
from ldm.loading.components import hub_files, read_folder
from ldm.loading.families import lookup
from ldm.loading.files import read_json, read_safetensors, resolve, safetensors_header, weights_file
from ldm.loading.single_file import read_single_file


@dataclass
class Component:
    name: str
    path: Path
    dtype: str
    parameters: int
    config: dict


@dataclass
class ModelInfo:
    model: str
    kind: str  # "diffusers folder" or "single file"
    location: Path
    family: str
    scheduler: dict
    components: list[Component] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        out = [f"model:      {self.model}", f"kind:       {self.kind}", f"location:   {self.location}",
               f"family:     {self.family}",
               f"scheduler:  {self.scheduler.get('_class_name')} "
               f"({self.scheduler.get('prediction_type', 'epsilon')})"]
        entry = lookup(self.model)
        if entry is not None:
            out.append(f"manifest:   {entry.name} ({entry.repo}"
                       + (f", single file {entry.single_file})" if entry.single_file else ")"))
            if entry.card:
                out.append("defaults:   " + ", ".join(f"{k} {v}" for k, v in entry.card.items()) + " (its card's)")
            if entry.note:
                out.append(f"how:        {entry.note}")
        for c in self.components:
            out.append(f"{c.name:<15} {c.parameters:>15,} parameters  {c.dtype:<9} {c.path}")
            out.append(f"    config: {c.config}")
        out.append(f"total           {sum(c.parameters for c in self.components):>15,} parameters")
        return out + [f"note: {n}" for n in self.notes]


HEADER_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64", "I64": "int64"}
FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


def _dtypes(dtypes) -> str:
    """The dtype the tensors mostly have (a file may keep a few buffers in another)."""
    names = [HEADER_DTYPES.get(d, d.replace("torch.", "")) for d in dtypes]
    return Counter(names).most_common(1)[0][0] if names else "-"


def model_info(model: str, revision: str | None = None, variant: str | None = None) -> ModelInfo:
    root = resolve(model, hub_files(variant), revision, local_files_only=True)
    if root.is_file():
        return _single_file_info(model, root)
    folder = read_folder(root)
    info = ModelInfo(model, "diffusers folder", root, folder.spec.label,
                     read_json(root / "scheduler" / "scheduler_config.json"))
    for part in ["unet", "vae", *folder.towers]:
        path = weights_file(root / part, "model" if part in folder.towers else "diffusion_pytorch_model", variant)
        header = {k: v for k, v in safetensors_header(path).items() if v[0] in FLOAT_DTYPES}  # not position_ids
        config = {k: v for k, v in read_json(root / part / "config.json").items() if not k.startswith("_")}
        info.components.append(Component(part, path, _dtypes([d for d, _ in header.values()]),
                                          sum(math.prod(shape) for _, shape in header.values()), config))
    return info


def _single_file_info(model: str, path: Path) -> ModelInfo:
    try:
        checkpoint = read_single_file(read_safetensors(path))  # memory-mapped: nothing is read but the header
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    info = ModelInfo(model, "single file", path, checkpoint.family.label, checkpoint.scheduler)
    for name, state in checkpoint.states.items():
        info.components.append(Component(name, path, _dtypes([str(t.dtype) for t in state.values()]),
                                         sum(t.numel() for t in state.values()), checkpoint.configs[name]))
    reasons = Counter(checkpoint.ignored.values())
    info.notes += [f"{n} key(s) unused: {why}" for why, n in reasons.items()]
    if checkpoint.family.file_note:
        info.notes.append(checkpoint.family.file_note)
    return info
