"""Tiny random LoRA / LyCORIS files in the layouts people actually have, for the models of tests/official.py.

A LoRA is first drawn as a `Spec`: per (component, diffusers/transformers module name), its factors and alpha.
Writers then lay the same spec out as a kohya/A1111 file (diffusers-named or LDM/SGM-named UNet keys), a
diffusers/PEFT file (`lora_A`/`lora_B` with diffusers' `lora_adapter_metadata` header, or the older
`lora.down`/`lora.up`), or, for LyCORIS, LoHa and LoKr files (kohya names, LyCORIS's factor layouts).
"""

import json
import re
from collections import Counter
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

# kohya's default LoRA targets: the Transformer2DModel's linears (and proj_in/proj_out, 1×1 convs in SD 1.x)
# and the text towers' attention and MLP; LoCon adds the resnets' convolutions and the resamplers.
ATTENTION = r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)" \
            r"|ff\.net\.(0\.proj|2)))"
CONVS = r".*(resnets\.\d+\.(conv1|conv2|conv_shortcut|time_emb_proj)|(down|up)samplers\.0\.conv)"
TEXT = r"text_model\.encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.(fc1|fc2))"

KOHYA_TOWERS = {("text_encoder", False): "lora_te_", ("text_encoder", True): "lora_te1_",
                ("text_encoder_2", True): "lora_te2_"}


def modules(model: nn.Module, pattern: str) -> dict[str, tuple[int, ...]]:
    """Name → weight shape of the Linear/Conv2d modules of a diffusers/transformers model matching `pattern`."""
    return {name: tuple(m.weight.shape) for name, m in model.named_modules()
            if isinstance(m, nn.Linear | nn.Conv2d) and re.fullmatch(pattern, name)}


def draw(targets: dict[str, dict[str, tuple[int, ...]]], rank: int = 4, alpha: float = 2.5, conv_rank: int = 3,
         conv_alpha: float = 1.5, std: float = 0.15, seed: int = 0) -> dict:
    """A LoRA spec: {(component, module): {"lora_down", "lora_up", "alpha"}}. Linear modules and 1×1 convs get
    `rank`/`alpha`, kh×kw convolutions (LoCon) `conv_rank`/`conv_alpha`: down is a kh×kw conv, up a 1×1 one."""
    g = torch.Generator().manual_seed(seed)
    spec = {}
    for component, shapes in targets.items():
        for name, shape in shapes.items():
            conv3 = len(shape) == 4 and shape[2:] != (1, 1)
            r, a = (conv_rank, conv_alpha) if conv3 else (rank, alpha)
            kernel, unit = (shape[2:], (1, 1)) if len(shape) == 4 else ((), ())
            spec[component, name] = {"lora_down": torch.randn(r, shape[1], *kernel, generator=g) * std,
                                     "lora_up": torch.randn(shape[0], r, *unit, generator=g) * std, "alpha": a}
    return spec


def kohya_key(component: str, name: str, xl: bool, ldm_names: dict[str, str] | None = None) -> str:
    if component == "unet":
        return "lora_unet_" + (ldm_names or {}).get(name, name).replace(".", "_")
    return KOHYA_TOWERS[component, xl] + name.replace(".", "_")


def save_kohya(path: Path, spec: dict, xl: bool, ldm_names: dict[str, str] | None = None,
               dtype=torch.float16) -> Path:
    """kohya-ss/sd-scripts' layout (fp16 factors, fp16 alpha scalars); `ldm_names` renames UNet modules to their
    LDM/SGM names (diffusers name → LDM module name), as kohya's SDXL trainer writes them."""
    tensors = {}
    for (component, name), f in spec.items():
        key = kohya_key(component, name, xl, ldm_names)
        tensors[f"{key}.lora_down.weight"] = f["lora_down"].to(dtype)
        tensors[f"{key}.lora_up.weight"] = f["lora_up"].to(dtype)
        tensors[f"{key}.alpha"] = torch.tensor(f["alpha"], dtype=dtype)
    save_file(tensors, str(path), metadata={"ss_network_module": "networks.lora"})
    return path


def save_peft(path: Path, spec: dict, old: bool = False) -> Path:
    """diffusers' layout: `<component>.<module>.lora_A.weight` / `lora_B.weight` with the LoraConfig fields
    (r, lora_alpha, rank_pattern, alpha_pattern, target_modules: the leaf names, as diffusers' training scripts
    set them) in the header's `lora_adapter_metadata`, prefixed by component as diffusers' save_lora_weights
    packs them. `old`: diffusers 0.21's names, `lora.down`/`lora.up` in the UNet and `lora_linear_layer.down`/
    `.up` in the text towers, without metadata (alpha = rank then: use a spec drawn with alpha = rank)."""
    tensors, metadata = {}, {}
    for component in sorted({c for c, _ in spec}):
        entries = {name: f for (c, name), f in spec.items() if c == component}
        down, up = ("lora_A.weight", "lora_B.weight") if not old else \
            ("lora.down.weight", "lora.up.weight") if component == "unet" else \
            ("lora_linear_layer.down.weight", "lora_linear_layer.up.weight")
        for name, f in entries.items():
            tensors[f"{component}.{name}.{down}"] = f["lora_down"].contiguous()
            tensors[f"{component}.{name}.{up}"] = f["lora_up"].contiguous()
        ranks = {name: f["lora_down"].shape[0] for name, f in entries.items()}
        alphas = {name: f["alpha"] for name, f in entries.items()}
        r = Counter(ranks.values()).most_common(1)[0][0]
        alpha = Counter(alphas.values()).most_common(1)[0][0]
        metadata |= {f"{component}.r": r, f"{component}.lora_alpha": alpha,
                     f"{component}.target_modules": sorted({n.split(".")[-1] for n in entries}),
                     f"{component}.rank_pattern": {n: v for n, v in ranks.items() if v != r},
                     f"{component}.alpha_pattern": {n: v for n, v in alphas.items() if v != alpha}}
    if old:
        assert all(f["alpha"] == f["lora_down"].shape[0] for f in spec.values()), "the old format has no alphas"
    header = {"format": "pt"} | ({} if old else {"lora_adapter_metadata": json.dumps(metadata)})
    save_file(tensors, str(path), metadata=header)
    return path


# ----------------------------------------------------------------------------------------- LyCORIS


def loha_factors(shape: tuple[int, ...], rank: int, g: torch.Generator, tucker: bool = False,
                 std: float = 0.4) -> dict[str, torch.Tensor]:
    """LyCORIS LoHa factors for a weight of `shape`: w1_a [out, r], w1_b [r, in·kh·kw] (conv: flattened, as
    LyCORIS stores it), or with Tucker cores t [r, r, kh, kw], w_a [r, out], w_b [r, in]."""
    out, cin, *kernel = shape

    def rnd(*s):
        return torch.randn(*s, generator=g) * std

    if tucker:
        return {"hada_t1": rnd(rank, rank, *kernel), "hada_w1_a": rnd(rank, out), "hada_w1_b": rnd(rank, cin),
                "hada_t2": rnd(rank, rank, *kernel), "hada_w2_a": rnd(rank, out), "hada_w2_b": rnd(rank, cin)}
    flat = cin * (kernel[0] * kernel[1] if kernel else 1)
    return {"hada_w1_a": rnd(out, rank), "hada_w1_b": rnd(rank, flat),
            "hada_w2_a": rnd(out, rank), "hada_w2_b": rnd(rank, flat)}


def lokr_factors(shape: tuple[int, ...], factor: int, g: torch.Generator, w1: str = "full", w2: str = "full",
                 rank: int = 2, std: float = 0.3) -> dict[str, torch.Tensor]:
    """LyCORIS LoKr factors: out = factor·(out/factor), in likewise; w1 [factor, factor] full or w1_a @ w1_b,
    w2 [out/f, in/f(, kh, kw)] full, w2_a @ w2_b (w2_b flattened over the kernel), or Tucker (w2_a [r, out/f],
    w2_b [r, in/f], t2 [r, r, kh, kw])."""
    out, cin, *kernel = shape
    o2, i2 = out // factor, cin // factor

    def rnd(*s):
        return torch.randn(*s, generator=g) * std

    f = {}
    if w1 == "full":
        f["lokr_w1"] = rnd(factor, factor)
    else:
        f["lokr_w1_a"], f["lokr_w1_b"] = rnd(factor, rank), rnd(rank, factor)
    if w2 == "full":
        f["lokr_w2"] = rnd(o2, i2, *kernel)
    elif w2 == "tucker":
        f["lokr_t2"], f["lokr_w2_a"], f["lokr_w2_b"] = rnd(rank, rank, *kernel), rnd(rank, o2), rnd(rank, i2)
    else:
        f["lokr_w2_a"] = rnd(o2, rank)
        f["lokr_w2_b"] = rnd(rank, i2 * (kernel[0] * kernel[1] if kernel else 1))
    return f


def save_lycoris(path: Path, modules: dict[str, dict[str, torch.Tensor]], alphas: dict[str, float | None]) -> Path:
    """kohya-named LyCORIS keys: `<kohya module key>.<factor>` (LoCon's `lora_*` factors as `.lora_up.weight` …)
    and `.alpha` where one is given."""
    tensors = {}
    for key, factors in modules.items():
        tensors |= {f"{key}.{part}{'.weight' if part.startswith('lora_') else ''}": t.contiguous()
                    for part, t in factors.items()}
        if alphas.get(key) is not None:
            tensors[f"{key}.alpha"] = torch.tensor(float(alphas[key]))
    save_file(tensors, str(path), metadata={"ss_network_module": "lycoris.kohya"})
    return path
