"""LoRA and LyCORIS adapters, merged into the weights from outside the networks.

    lora = load_lora(pipe, find_lora("detail-tweaker"), weight=0.8)  # merged once: no cost per step
    unload_loras(pipe)                                               # every touched tensor restored bit for bit

Formats (a file may mix LoRA, LoCon, LoHa and LoKr modules; every key is used, or the error names it):

- kohya / AUTOMATIC1111: `lora_unet_<module>`, `lora_te_<module>` (SD 1.x/2.x text tower), `lora_te1_` /
  `lora_te2_` (SDXL's CLIP-L / OpenCLIP-bigG), where <module> is the diffusers (UNet) or transformers (text
  towers) module path with dots as underscores, or, for the UNet, the LDM/SGM path that kohya's SDXL trainer
  and older SD 1.x files use (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`, `middle_block_1_…`,
  `output_blocks_…`, `…_0_in_layers_2` for a resnet's conv1), mapped by the tables
  `ldm.loading.single_file.unet_rules` generates (the full-checkpoint map: SD 1.x's `output_blocks_2_1_conv` is
  up block 0's upsampler).
  Factors `.lora_down.weight` [r, in(, kh, kw)], `.lora_up.weight` [out, r(, 1, 1)], optional `.lora_mid.weight`
  (LoCon's CP decomposition) and `.alpha`. LoCon is the same on convolutions (resnets, projections, resamplers).
- diffusers / PEFT: `unet.<module>.lora_A.weight` / `.lora_B.weight` (older: `.lora.down.weight` /
  `.lora.up.weight`, `.lora_linear_layer.down/up.weight`), `text_encoder.…`, `text_encoder_2.…`. Alpha: a
  `<module>.alpha` key if the file has one, else the `lora_adapter_metadata` that diffusers writes into the
  safetensors header (`<component>.lora_alpha`, `.alpha_pattern`, `.use_rslora`), else alpha = rank.
- LyCORIS LoHa (kohya names): `.hada_w1_a`, `.hada_w1_b`, `.hada_w2_a`, `.hada_w2_b` (and Tucker cores
  `.hada_t1`, `.hada_t2`): delta = (w1_a @ w1_b) ⊙ (w2_a @ w2_b).
- LyCORIS LoKr (kohya names): `.lokr_w1` or `.lokr_w1_a @ .lokr_w1_b`, `.lokr_w2` or `.lokr_w2_a @ .lokr_w2_b`
  (or a Tucker core `.lokr_t2`): delta = w1 ⊗ w2 (Kronecker product).

Scale: delta × weight × alpha / rank, where rank is the inner size of the factors (LoRA: lora_down's rows;
LoHa: hada_w1_b's rows; LoKr: the rows of lokr_w2_b if w2 is factorised, else of lokr_w1_b; a LoKr with
neither factorised ignores alpha). No alpha, or an alpha of 0, means alpha = rank (the trainers' rule: kohya's
networks/lora.py and LyCORIS take alpha 0 as "unset").

References followed (public sources, read for these rules): AUTOMATIC1111/stable-diffusion-webui
extensions-builtin/Lora/network.py (calc_scale, finalize_updown), network_lora.py, network_hada.py
(commit c302b3ab), network_lokr.py (commit fe89b098), lyco_helpers.py (make_weight_cp, rebuild_conventional,
rebuild_cp_decomposition); kohya-ss/sd-scripts networks/lora.py (key names, alpha); huggingface/diffusers
0.42 src/diffusers/loaders/lora_conversion_utils.py and utils/peft_utils.py (kohya → PEFT names, alphas),
which tests/test_lora.py runs as the reference (SD 1.x LDM names: module by module, since diffusers' SGM block
map confuses blocks 1 and 10/11 over a whole file, and up block 0's upsampler, which it sends to an attention
SD 1.x lacks, by kohya's rule).

Merging: deltas are computed in fp32 and added to the weights in place, merged = (orig.float() + delta) cast
back to the weight's dtype, so a LoRA costs nothing per denoising step. Each touched tensor's original is kept
at its first touch (once, however many LoRAs stack on it) under its reference name, e.g. `unet` /
`down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight`, and `unload_loras` copies it back: bit for
bit. A reference name is resolved at merge and unmerge time to wherever the tensor lives now: its own
parameter, or its rows of the fused `to_qkv` / `to_kv` projection that `ldm.speed.accelerate` builds. So a LoRA
loaded before or after `accelerate`, and unloaded after it, all work. Writes are in place (`copy_`, `addmm_`):
CUDA graphs and compiled code that read the parameters see the new values. A Winograd convolution's derived
filters (`winograd_weight`) are recomputed from its changed weight. Weights loaded without a cast are
safetensors' copy-on-write memory maps: writing one copies its pages into the process and never reaches the
file (tests/test_lora.py checks it).

Compiled pipelines: on the CPU `accelerate` compiles with inductor's freezing, which folds the weights into
the generated code as constants: a weight changed in place would not be seen. When the UNet is compiled and
freezing is on, merging and unloading therefore drop all compiled code (`torch._dynamo.reset()`, process-wide);
the next UNet and VAE calls compile again (seconds when inductor's on-disk cache already holds the graphs,
since frozen weights are not part of its key; minutes the first time). Without freezing (CUDA, or the
"aot_eager" backend the tests use) the compiled graphs read the parameters and nothing is recompiled.
"""

import json
import math
import re
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from torch import Tensor, nn

from ldm.errors import InputError, LoadError
from ldm.loading.families import weights_dir
from ldm.loading.files import read_safetensors
from ldm.loading.hashes import sha256
from ldm.loading.single_file import unet_rules
from ldm.networks.unet import UNetConfig

KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
PEFT_PREFIXES = {"unet.": "unet", "text_encoder.": "text_encoder", "text_encoder_2.": "text_encoder_2"}

# What each key suffix holds: kohya/LyCORIS suffixes (after the first dot), then PEFT/diffusers ones.
KOHYA_PARTS = {"lora_down.weight": "lora_down", "lora_up.weight": "lora_up", "lora_mid.weight": "lora_mid",
               "alpha": "alpha", **{p: p for p in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1",
                                                   "hada_t2", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2",
                                                   "lokr_w2_a", "lokr_w2_b", "lokr_t2")}}
PEFT_PARTS = {"lora_A.weight": "lora_down", "lora_B.weight": "lora_up", "lora.down.weight": "lora_down",
              "lora.up.weight": "lora_up", "lora_linear_layer.down.weight": "lora_down",
              "lora_linear_layer.up.weight": "lora_up", "alpha": "alpha"}
# Adapter kinds ldm recognises but does not merge, by a key suffix that marks them.
UNSUPPORTED = {"dora_scale": "DoRA", "lora_magnitude_vector": "DoRA", "diff": "LyCORIS full weight (diff)",
               "diff_b": "LyCORIS full weight (diff)", "on_input": "(IA)³", "oft_blocks": "OFT", "oft_diag": "OFT",
               "w_norm": "LyCORIS norm", "b_norm": "LyCORIS norm", "a1.weight": "GLoRA", "lora_B.bias": "LoRA bias",
               "scale": "a stored scale", "bias": "a bias delta"}
LDM_UNET_BLOCKS = ("input_blocks_", "middle_block_", "output_blocks_", "time_embed_", "label_emb_", "out_")
FUSED = {"to_qkv": ("to_q", "to_k", "to_v"), "to_kv": ("to_k", "to_v")}  # ldm.speed.accelerate's fused projections
FLOAT32_MAX = torch.finfo(torch.float32).max  # a scale beyond it cannot be applied (addmm_'s alpha is a float32)
MAX_WEIGHT = 100.0  # ComfyUI's LoraLoader range; far beyond it the merged model's activations overflow, in fp32 too
MAX_NAME_BYTES = 255  # of a file name, on the file systems ldm runs on


@dataclass
class LoadedLora:
    name: str  # the file's stem: the NAME of <lora:NAME:w> and of the infotext's "Lora hashes"
    path: Path
    weight: float
    hash: str  # lora_hash(path)
    keys: int  # modules the file adapts (merged unless weight is 0)


# --------------------------------------------------------------------------------------- files


def loras_dir() -> Path:
    """Where LoRA files are looked up by name: `$LDM_WEIGHTS/loras` (the checkout's weights/loras by default)."""
    return weights_dir() / "loras"


def lora_names() -> list[str]:
    """The LoRAs the LoRA folder holds, by name (their files' stems), sorted."""
    folder = loras_dir()
    return sorted(p.stem for p in folder.glob("*.safetensors")) if folder.is_dir() else []


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the file system, one it cannot encode
        return False


def find_lora(name: str, allow_paths: bool = True, show_folder: bool = True) -> Path:
    """The file `name` refers to: an existing path (only with `allow_paths`), else `loras_dir()/name` or
    `loras_dir()/name.safetensors`. With `allow_paths=False` (prompts, requests from the network) only a plain file
    name is accepted: a path separator, `..` or an absolute path is an InputError. A name not found is an InputError
    that names the folder and what it holds, unless `show_folder` is False (a server's answers: a client has no
    business knowing where the server keeps its files). A name no file system could hold is an InputError too."""
    shown = repr(name if len(name) <= 60 else f"{name[:60]}…")  # (repr: a lone surrogate written out)
    if allow_paths:
        path = Path(name).expanduser()
        if _is_file(path):
            return path
    elif not name or "/" in name or "\\" in name or ".." in name or Path(name).is_absolute() or "\0" in name:
        raise InputError(f"LoRA {shown}: give the name of a file in the LoRA folder, not a path")
    try:
        too_long = len(name.encode(sys.getfilesystemencoding(), "surrogateescape")) > MAX_NAME_BYTES
    except UnicodeEncodeError:
        raise InputError(f"LoRA {shown}: not a file name (it is not valid Unicode)") from None
    if too_long and not allow_paths:
        raise InputError(f"LoRA {shown}: a name of {len(name)} characters is longer than a file name can be")
    folder = loras_dir()
    for candidate in (folder / name, folder / f"{name}.safetensors"):
        if _is_file(candidate):
            return candidate
    if not show_folder:
        raise InputError(f"LoRA {shown}: not in the LoRA folder")
    there = lora_names()
    listing = f"it holds {', '.join(there)}" if there else "it holds no .safetensors files"
    where = "no such file, and not " if allow_paths else "not "
    head, colon, weight = name.rpartition(":")
    if allow_paths and colon and (_is_file(Path(head).expanduser()) or _is_file(folder / head)
                                  or _is_file(folder / f"{head}.safetensors")):  # FILE:WEIGHT with a bad weight
        raise InputError(f"LoRA {shown}: the weight after the colon, {weight!r}, is not a number (FILE:WEIGHT, "
                         "e.g. detail.safetensors:0.8)")
    raise InputError(f"LoRA {shown}: {where}in {folder} ({listing})")


def _header(path: Path) -> tuple[int, dict]:
    """The safetensors header's length and its `__metadata__` (the file was checked whole by read_safetensors)."""
    with open(path, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        return size, json.loads(f.read(size)).get("__metadata__") or {}


def lora_hash(path: str | Path) -> str:
    """AUTOMATIC1111's LoRA hash (infotext `Lora hashes`): sha256 of the bytes after the safetensors header
    (8 + header length), first 12 hex digits, cached (`ldm.loading.hashes`). Editing the metadata leaves it
    unchanged."""
    return sha256(path, after_header=True)[:12]


# ------------------------------------------------------------------------------------ modules


def _unet(pipe) -> nn.Module:
    return pipe.networks()["unet"]


def _components(pipe) -> dict[str, nn.Module]:
    return {name: network for name, network in pipe.networks().items()
            if name in ("unet", "text_encoder", "text_encoder_2")}


def _targets(root: nn.Module) -> dict[str, tuple[nn.Module, int, int]]:
    """Reference module name → (the module holding its weight now, parts, part index): a Linear or Conv2d of the
    reference network, or one of the row blocks of a fused projection (`…attn1.to_qkv` holds `to_q`, `to_k`,
    `to_v`)."""
    out = {}
    for name, module in root.named_modules():
        if not isinstance(module, nn.Linear | nn.Conv2d):
            continue
        parent, _, leaf = name.rpartition(".")
        if leaf in FUSED:
            for i, part in enumerate(FUSED[leaf]):
                out[f"{parent}.{part}"] = (module, len(FUSED[leaf]), i)
        else:
            out[name] = (module, 1, 0)
    return out


def _weight(target: tuple[nn.Module, int, int]) -> Tensor:
    """The live weight of a target: the module's own, or its rows of the fused one (a view: writes reach it)."""
    module, parts, i = target
    if parts == 1:
        return module.weight
    rows = module.weight.shape[0] // parts
    return module.weight[i * rows:(i + 1) * rows]


@lru_cache(maxsize=8)
def _ldm_unet_names(cfg: UNetConfig) -> dict[str, str]:
    """LDM/SGM module names with underscores (`input_blocks_4_1_proj_in`) → diffusers names, from the single-file
    tables (built once per UNet config)."""
    names = {}
    for rule in unet_rules(cfg, prefix=""):
        if rule.ours.endswith(".weight"):
            names[rule.theirs.removesuffix(".weight").replace(".", "_")] = rule.ours.removesuffix(".weight")
    return names


def _underscored(names, ldm: dict[str, str] | None = None) -> dict[str, str]:
    """kohya's names (dots as underscores) → module names (and the LDM names of those modules); an ambiguity
    would be a table bug, so it is asserted."""
    out = {k: v for k, v in (ldm or {}).items() if v in names}
    for name in names:
        key = name.replace(".", "_")
        if out.get(key, name) != name:
            raise AssertionError(f"{key} names both {out[key]} and {name}")
        out[key] = name
    return out


# ------------------------------------------------------------------------------------- parsing


@dataclass
class _Module:
    """One adapted module of a file: which network, which reference module, its factors."""

    component: str
    module: str  # reference module name, e.g. down_blocks.1.attentions.0.proj_in
    stem: str  # the file's name for it: its keys less the factor suffix, e.g. lora_unet_down_blocks_1_…_proj_in
    keys: dict[str, str]  # part (lora_down, hada_w1_a, …) → file key


def _split(key: str) -> tuple[str, str, str, bool] | None:
    """(component, module token, part, peft) of a file key; None when it follows no known naming."""
    for prefix, component in KOHYA_PREFIXES.items():
        if key.startswith(prefix):
            token, _, suffix = key[len(prefix):].partition(".")
            return component, token, suffix, False
    for prefix, component in PEFT_PREFIXES.items():
        if key.startswith(prefix):
            rest = key[len(prefix):]
            for suffix in (*PEFT_PARTS, *UNSUPPORTED):
                if rest.endswith("." + suffix):
                    return component, rest[:-len(suffix) - 1], suffix, True
            return component, rest, "", True
    return None


def _kind(parts) -> str | None:
    if {"lora_up", "lora_down"} <= parts:
        return "lora"
    if {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= parts:
        return "loha"
    if ("lokr_w1" in parts or {"lokr_w1_a", "lokr_w1_b"} <= parts) and \
            ("lokr_w2" in parts or {"lokr_w2_a", "lokr_w2_b"} <= parts):
        return "lokr"
    return None


KIND_PARTS = {"lora": {"lora_up", "lora_down", "lora_mid", "alpha"},
              "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", "alpha"},
              "lokr": {"lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2", "alpha"}}


def _show(items: list[str], n: int = 6) -> str:
    return "; ".join(items[:n]) + (f" … ({len(items)} in all)" if len(items) > n else "")


def _cp(core: Tensor, a: Tensor, b: Tensor) -> Tensor:
    """LyCORIS's Tucker rebuild (lyco_helpers.make_weight_cp): core [r1, r2, kh, kw], a [r1, out], b [r2, in]
    → [out, in, kh, kw]."""
    return torch.einsum("ijkl,ip,jq->pqkl", core, a, b)


def _product(up: Tensor, down: Tensor) -> Tensor:
    """`up @ down` with the kernel dims folded into down's columns ([out, r] @ [r, in·kh·kw])."""
    return up.reshape(up.shape[0], -1) @ down.reshape(down.shape[0], -1)


class _Factors:
    """A module's factors in fp32 on one device, with the delta's shape (for checking) and its scale."""

    def __init__(self, kind: str, t: dict[str, Tensor], alpha: float | None, rslora: bool = False):
        self.kind, self.t = kind, t
        rank = {"lora": self._read_lora, "loha": self._read_loha, "lokr": self._read_lokr}[kind]()
        use_alpha = alpha is not None and alpha != 0 and rank is not None
        self.scale = (alpha / (math.sqrt(rank) if rslora else rank)) if use_alpha else 1.0
        if self.low_rank() is None:  # check that the factors compose before anything is merged: on the meta device
            self._check_composes()

    def _read_lora(self) -> int:
        """LoRA and LoCon: the delta's shape (the kernel is lora_mid's, a CP core, or lora_down's); its rank,
        lora_down's rows."""
        up, down = self.t["lora_up"], self.t["lora_down"]
        rank = down.shape[0]
        if up.reshape(up.shape[0], -1).shape[1] != rank:
            raise ValueError(f"lora_up {tuple(up.shape)} and lora_down {tuple(down.shape)} differ in rank")
        kernel = self.t["lora_mid"].shape[2:] if "lora_mid" in self.t else down.shape[2:]
        self.shape = (up.shape[0], down.shape[1], *kernel)
        return rank

    def _read_loha(self) -> int:
        """LoHa: the delta's shape (both Hadamard factors must give it); its rank, hada_w1_b's rows."""
        t = self.t
        rank = t["hada_w1_b"].shape[0]
        self.shape = self._loha_shape(t["hada_w1_a"], t["hada_w1_b"], t.get("hada_t1"))
        other = self._loha_shape(t["hada_w2_a"], t["hada_w2_b"], t.get("hada_t2"))
        if math.prod(other) != math.prod(self.shape):
            raise ValueError(f"the two Hadamard factors differ in shape: {self.shape} vs {other}")
        return rank

    def _read_lokr(self) -> int | None:
        """LoKr: the Kronecker product's shape; its rank, the rows of lokr_w2_b if w2 is factorised, else of
        lokr_w1_b (None when neither is: alpha is then ignored)."""
        w1 = self._lokr_shape(self.t, "lokr_w1", None)
        w2 = self._lokr_shape(self.t, "lokr_w2", self.t.get("lokr_t2"))
        self.shape = (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
        return next((self.t[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in self.t), None)

    def _check_composes(self) -> None:
        """A ValueError unless the factors give a delta of `shape`, computed on the meta device (no arithmetic)."""
        meta = _Factors.__new__(_Factors)
        meta.kind, meta.shape = self.kind, self.shape
        meta.t = {k: torch.empty(v.shape, device="meta") for k, v in self.t.items()}
        try:
            numel = meta.delta().numel()
        except RuntimeError as e:
            raise ValueError(f"its factors do not compose ({e})") from None
        if numel != math.prod(self.shape):
            raise ValueError(f"its factors give {numel} values for a {self.shape} delta")

    @staticmethod
    def _loha_shape(a: Tensor, b: Tensor, core: Tensor | None) -> tuple[int, ...]:
        if core is not None:
            return (a.shape[1], b.shape[1], *core.shape[2:])
        return (a.shape[0], b.shape[1], *b.shape[2:])

    @staticmethod
    def _lokr_shape(t: dict[str, Tensor], name: str, core: Tensor | None) -> tuple[int, ...]:
        if name in t:
            return tuple(t[name].shape)
        a, b = t[f"{name}_a"], t[f"{name}_b"]
        if core is not None:
            return (a.shape[1], b.shape[1], *core.shape[2:])
        return (a.shape[0], b.shape[1], *b.shape[2:])

    def low_rank(self) -> tuple[Tensor, Tensor] | None:
        """(up, down) as 2-D matrices when the delta is their product (a LoRA without a CP core)."""
        if self.kind != "lora" or "lora_mid" in self.t:
            return None
        up, down = self.t["lora_up"], self.t["lora_down"]
        return up.reshape(up.shape[0], -1), down.reshape(down.shape[0], -1)

    def delta(self) -> Tensor:
        """The unscaled delta, in the shape the factors give (reshaped to the weight's by the caller)."""
        t = self.t
        if self.kind == "lora":
            up, down = t["lora_up"], t["lora_down"]
            if "lora_mid" in t:  # lyco_helpers.rebuild_cp_decomposition
                return torch.einsum("nmkl,in,mj->ijkl", t["lora_mid"], up.reshape(up.shape[0], -1),
                                    down.reshape(down.shape[0], -1))
            return _product(up, down)
        if self.kind == "loha":
            halves = []
            for i in (1, 2):
                a, b, core = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], t.get(f"hada_t{i}")
                halves.append((_cp(core, a, b) if core is not None else _product(a, b)).reshape(self.shape))
            return halves[0] * halves[1]
        w1 = t["lokr_w1"] if "lokr_w1" in t else _product(t["lokr_w1_a"], t["lokr_w1_b"])
        if "lokr_w2" in t:
            w2 = t["lokr_w2"]
        elif "lokr_t2" in t:
            w2 = _cp(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
        else:
            w2 = _product(t["lokr_w2_a"], t["lokr_w2_b"]).reshape(self._lokr_shape(t, "lokr_w2", None))
        if w2.dim() == 4:  # network_lokr.make_kron
            w1 = w1[:, :, None, None]
        return torch.kron(w1, w2.contiguous())


def _fits(delta: tuple[int, ...], weight: tuple[int, ...]) -> bool:
    """A delta fits a weight with the same rows and as many columns (A1111 reshapes: a 1×1 conv's factors fit a
    Linear and back, LyCORIS's 2-D conv factors fit a kh×kw conv)."""
    return delta[0] == weight[0] and math.prod(delta[1:]) == math.prod(weight[1:])


def _peft_alphas(metadata: dict, path: Path) -> dict[str, dict]:
    """Per component, the LoraConfig fields diffusers saved in the header (`lora_adapter_metadata`)."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        fields = json.loads(raw)
    except json.JSONDecodeError as e:
        raise LoadError(f"{path}: its lora_adapter_metadata is not valid JSON ({e})") from None
    out: dict[str, dict] = {}
    for key, value in fields.items():
        component, _, setting = key.partition(".")
        out.setdefault(component, {})[setting] = value
    return out


def _peft_alpha(config: dict, module: str) -> float | None:
    """PEFT's rule: the first `alpha_pattern` key that matches the module name's end, else `lora_alpha`."""
    for pattern, alpha in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return float(alpha)
    return float(config["lora_alpha"]) if "lora_alpha" in config else None


@dataclass
class _Problems:
    """What in a file does not fit, by kind, in file order: listed together in one LoadError."""

    wrong: list[str] = field(default_factory=list)  # deltas of another shape than the weight's
    absent: list[str] = field(default_factory=list)  # modules (or networks) this model lacks
    incomplete: list[str] = field(default_factory=list)  # parts missing, stray or inconsistent; a module twice
    unsupported: list[str] = field(default_factory=list)  # keys of adapter kinds ldm does not merge
    unknown: list[str] = field(default_factory=list)  # keys in no naming ldm knows

    def check(self, path: Path) -> None:
        """One LoadError naming them all, if there are any."""
        problems = []
        if self.wrong:
            problems.append(f"{len(self.wrong)} of its modules do not fit this model's shapes (a LoRA for another "
                            f"model family?): {_show(self.wrong, 3)}")
        if self.absent:
            problems.append(f"keys for modules this model lacks: {_show(self.absent)}")
        if self.incomplete:
            problems.append(f"incomplete or inconsistent modules: {_show(self.incomplete)}")
        if self.unsupported:
            problems.append(f"keys of adapter kinds ldm does not merge (it merges LoRA, LoCon, LoHa, LoKr): "
                            f"{_show(self.unsupported)}")
        if self.unknown:
            problems.append(f"keys in no LoRA naming ldm knows (kohya lora_unet_/lora_te_/lora_te1_/lora_te2_, "
                            f"diffusers unet./text_encoder./text_encoder_2.): {_show(self.unknown)}")
        if problems:
            raise LoadError(f"LoRA {path}: " + "; ".join(problems))


def _group(tensors: dict[str, Tensor], problems: _Problems) -> dict[tuple[str, str, bool], _Module]:
    """The file's keys grouped by module: (component, module token, peft) → its keys by part. A key in no known
    naming, or of an adapter kind ldm does not merge, goes to `problems`."""
    modules: dict[tuple[str, str, bool], _Module] = {}
    for key in tensors:
        split = _split(key)
        if split is None:
            problems.unknown.append(key)
            continue
        component, token, suffix, peft = split
        part = (PEFT_PARTS if peft else KOHYA_PARTS).get(suffix)
        if part is None:
            if suffix in UNSUPPORTED:
                problems.unsupported.append(f"{key} ({UNSUPPORTED[suffix]})")
            else:
                problems.unknown.append(key)
            continue
        stem = key[:len(key) - len(suffix) - 1] if suffix else key
        group = modules.setdefault((component, token, peft), _Module(component, token, stem, {}))
        group.keys[part] = key
    return modules


class _ModuleNames:
    """A file's module tokens → reference module names, per naming. diffusers/PEFT: the token is the module name.
    kohya: the module name with dots as underscores, or for the UNet the LDM/SGM name (when any UNet token of the
    file is one); its tables are built at the first kohya token of each component."""

    def __init__(self, targets: dict[str, dict], unet_config: UNetConfig, ldm_unet: bool):
        self.targets, self.unet_config, self.ldm_unet = targets, unet_config, ldm_unet
        self.underscored: dict[str, dict[str, str]] = {}

    def peft(self, component: str, token: str) -> str | None:
        return token if token in self.targets[component] else None

    def kohya(self, component: str, token: str) -> str | None:
        if component not in self.underscored:
            ldm = _ldm_unet_names(self.unet_config) if component == "unet" and self.ldm_unet else None
            self.underscored[component] = _underscored(self.targets[component], ldm)
        return self.underscored[component].get(token)


def _alpha(group: _Module, tensors: dict[str, Tensor], config: dict) -> float | None:
    """The module's alpha: its `alpha` key (one number), else PEFT's rule over the header's LoRA config (`config`,
    empty for a kohya file), else None (alpha = rank). A ValueError names a key holding more than one number."""
    key = group.keys.get("alpha")
    if key is None:
        return _peft_alpha(config, group.module)
    if tensors[key].numel() != 1:
        raise ValueError(f"{key} holds {tuple(tensors[key].shape)}, not one number")
    return float(tensors[key].float().reshape(-1)[0])


def _read_module(group: _Module, kind: str, tensors: dict[str, Tensor], config: dict, weight_shape: tuple[int, ...],
                 problems: _Problems) -> _Factors | None:
    """One module's factors, scaled by its alpha and checked against the weight it adapts (None: what is wrong
    went to `problems`)."""
    try:
        alpha = _alpha(group, tensors, config)
    except ValueError as e:
        problems.incomplete.append(str(e))
        return None
    t = {part: tensors[k] for part, k in group.keys.items() if part != "alpha"}
    try:
        factors = _Factors(kind, t, alpha, rslora=bool(config.get("use_rslora")))
    except (ValueError, IndexError) as e:  # IndexError: a factor with too few dimensions
        problems.incomplete.append(f"{group.stem}: {e}")
        return None
    if not _fits(factors.shape, weight_shape):
        problems.wrong.append(f"{group.stem}: LoRA {factors.shape} vs model {weight_shape} "
                              f"({group.component} {group.module})")
        return None
    return factors


def _parse(path: Path, tensors: dict[str, Tensor], metadata: dict, components: dict[str, nn.Module],
           unet_config: UNetConfig) -> list[tuple[_Module, dict, _Factors]]:
    """Group the file's keys by module, map each to a reference module, and check every shape; one LoadError
    listing what does not fit, before anything is merged."""
    problems = _Problems()
    modules = _group(tensors, problems)
    targets = {name: _targets(module) for name, module in components.items()}
    ldm_unet = any(t.startswith(LDM_UNET_BLOCKS) for (c, t, p) in modules if c == "unet")
    names = _ModuleNames(targets, unet_config, ldm_unet)
    configs = _peft_alphas(metadata, path)
    resolved: dict[tuple[str, str], str] = {}  # (component, module) → the stem of the file's keys for it
    result = []
    for (component, token, peft), group in modules.items():
        if component not in components:
            problems.absent.append(f"{group.stem} (this model has no {component})")
            continue
        module = names.peft(component, token) if peft else names.kohya(component, token)
        if module is None:
            problems.absent.append(f"{group.stem} (no {component} module {token})")
            continue
        kind = _kind(set(group.keys))
        if kind is None or set(group.keys) - KIND_PARTS[kind]:
            problems.incomplete.append(f"{component} {module}: {', '.join(sorted(group.keys.values()))}")
            continue
        if (component, module) in resolved:
            problems.incomplete.append(f"{group.stem} and {resolved[component, module]} both adapt {component} "
                                       f"{module}")
            continue
        resolved[component, module] = group.stem
        group.module = module
        config = configs.get(component, {}) if peft else {}
        weight_shape = tuple(_weight(targets[component][module]).shape)
        factors = _read_module(group, kind, tensors, config, weight_shape, problems)
        if factors is not None:
            result.append((group, targets[component], factors))
    problems.check(path)
    if not result:
        raise LoadError(f"LoRA {path} holds no tensors")
    return result


# ------------------------------------------------------------------------------------- merging


def _refresh_compiled(pipe) -> None:
    """Drop compiled code that froze the old weights (see the module docstring)."""
    inductor = sys.modules.get("torch._inductor.config")  # not imported: nothing was compiled with inductor
    if pipe.unet is not _unet(pipe) and inductor is not None and inductor.freezing:  # a speed wrapper
        torch._dynamo.reset()


def _refresh_winograd(modules) -> None:
    """Recompute the Winograd-domain filters of changed `WinogradConv2d`s (ldm.speed.accelerate), from a contiguous
    weight as `use_winograd` did, so that an unloaded model gets back the very same filters."""
    from ldm_kernels.winograd import transform_weight

    for module in modules:
        if hasattr(module, "winograd_weight"):
            module.winograd_weight.copy_(transform_weight(module.weight.contiguous()))


def _merge(weight: Tensor, factors: _Factors, scale: float, scratch: dict[torch.device, Tensor]) -> None:
    """weight ← weight + scale · delta in place, summed in fp32 and rounded once to the weight's dtype.

    A fp32 contiguous weight takes the delta straight into itself (a LoRA's product by `addmm_`: one read and one
    write of the weight). Any other (half precision, channels_last) is copied into a fp32 scratch buffer, summed
    there and copied back; the buffer is reused from module to module, since fresh memory for each would cost a
    page fault per 4 KiB page, more than the arithmetic. (Adding a fp32 delta to a half weight with one mixed
    `add_` was measured 3× slower than the copies.)"""
    if weight.dtype == torch.float32 and weight.is_contiguous():
        acc = weight
    else:
        buffer = scratch.get(weight.device)
        if buffer is None or buffer.numel() < weight.numel():
            buffer = scratch[weight.device] = torch.empty(weight.numel(), device=weight.device)
        acc = buffer[:weight.numel()].view(weight.shape)
        acc.copy_(weight)
    flat = acc.view(acc.shape[0], -1)
    low_rank = factors.low_rank()
    if low_rank is not None:
        flat.addmm_(*low_rank, alpha=scale)
    else:
        flat.add_(factors.delta().reshape(flat.shape), alpha=scale)
    if acc is not weight:
        weight.copy_(acc)


@torch.no_grad()
def load_lora(pipe, path: str | Path, weight: float = 1.0) -> LoadedLora:
    """Read a LoRA/LyCORIS file, check every key and shape against `pipe`'s UNet and text towers, merge it into
    their weights (× `weight`) and record it in `pipe.loras` (each weight it touches first keeps its original in
    `pipe.lora_originals`). A LoadError (naming the file and the keys) leaves the model untouched. Weight 0 checks
    the file and changes nothing; a weight beyond ±`MAX_WEIGHT` is an InputError."""
    path = Path(path)
    if not isinstance(weight, int | float) or not math.isfinite(weight):
        raise InputError(f"LoRA {path.name}: the weight must be a finite number, got {weight!r}")
    if abs(weight) > MAX_WEIGHT:
        raise InputError(f"LoRA {path.name}: the weight must be from {-MAX_WEIGHT:g} to {MAX_WEIGHT:g}, got {weight:g}")
    tensors = read_safetensors(path)  # refuses pickles and truncated files, by name
    _, metadata = _header(path)
    components = _components(pipe)
    modules = _parse(path, tensors, metadata, components, _unet(pipe).config)
    if any(not abs(factors.scale * weight) <= FLOAT32_MAX for _, _, factors in modules):  # (an absurd alpha)
        raise InputError(f"LoRA {path.name} at weight {weight:g}: its scale overflows 32-bit floats")
    if weight != 0:
        originals = pipe.lora_originals
        changed, scratch = [], {}
        for group, targets, factors in modules:
            target = targets[group.module]
            live = _weight(target)
            device = live.device
            factors.t = {k: v.to(device=device, dtype=torch.float32) for k, v in factors.t.items()}
            key = (group.component, f"{group.module}.weight")
            if key not in originals:
                originals[key] = live.detach().clone()
            _merge(live, factors, factors.scale * weight, scratch)
            changed.append(target[0])
        _refresh_winograd(changed)
        _refresh_compiled(pipe)
    lora = LoadedLora(path.stem, path, float(weight), lora_hash(path), len(modules))
    pipe.loras.append(lora)
    return lora


@torch.no_grad()
def unload_loras(pipe) -> None:
    """Undo every merged LoRA: each touched weight gets its original back, bit for bit (wherever it lives now:
    a plain parameter or rows of a fused projection), and Winograd filters are recomputed from it."""
    originals = pipe.lora_originals
    if originals:
        components = _components(pipe)
        targets = {name: _targets(module) for name, module in components.items()}
        changed = []
        for (component, name), original in originals.items():
            target = targets[component][name.removesuffix(".weight")]
            _weight(target).copy_(original)
            changed.append(target[0])
        _refresh_winograd(changed)
        originals.clear()
        _refresh_compiled(pipe)
    pipe.loras = []

