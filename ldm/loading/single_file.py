"""Original single-file checkpoints (`v1-5-pruned-emaonly.safetensors`, `sd_xl_base_1.0.safetensors`, …).

Three steps, each readable on its own:

1. `detect`: the family, from the key prefixes (`cond_stage_model.transformer.` CLIP-L → SD 1.x,
   `cond_stage_model.model.` OpenCLIP-H → SD 2.x, `conditioner.embedders.N.` → SDXL base or refiner)
   and the UNet's input channels (9: inpainting).
2. `infer_*`: diffusers-style config dicts from tensor shapes (widths, levels, resnets and transformer
   depth per level, context width, text widths and depths), plus the family's head convention, which
   no shape holds. Fine-tunes and merges of these families therefore load as well as the originals.
3. Key tables (`unet_rules`, `vae_rules`, `clip_rules`, `openclip_rules`), generated from those configs:
   one `Rule(ldm key, file key, op)` per ldm parameter. `take` applies them and accounts for every key
   in the file: used by exactly one rule's file key, or ignored by a named rule (`IGNORED`), or an error.
   `to_single_file` runs the same tables backwards (a diffusers-layout model → an original-layout file).
"""

import re
from dataclasses import dataclass

import torch
from torch import Tensor

from ldm.errors import LoadError
from ldm.loading.families import SPECS, TEXT_HEAD_DIM, ModelSpec, prediction_type_override
from ldm.networks.clip import CLIPTextConfig, CLIPTextModel
from ldm.networks.unet import UNet, UNetConfig
from ldm.networks.vae import VAE, VAEConfig

UNET, VAE_PREFIX = "model.diffusion_model.", "first_stage_model."

# Which text towers each family's file holds, (ldm component, file prefix, kind): `ModelSpec.towers` as tuples, as
# `ldm.tools.parity` reads them.
TOWERS = {key: [(t.component, t.prefix, t.kind) for t in spec.towers] for key, spec in SPECS.items()}

# Keys a file may hold that no ldm module reads, and why. Anything else unused is an error.
IGNORED = [
    (r"model_ema\..*", "EMA bookkeeping or EMA copies of the UNet (the file's model.diffusion_model is used)"),
    (r"(betas|alphas_cumprod|alphas_cumprod_prev|sqrt_alphas_cumprod|sqrt_one_minus_alphas_cumprod"
     r"|log_one_minus_alphas_cumprod|sqrt_recip_alphas_cumprod|sqrt_recipm1_alphas_cumprod|posterior_variance"
     r"|posterior_log_variance_clipped|posterior_mean_coef1|posterior_mean_coef2|logvar|denoiser\.sigmas)",
     "training-schedule buffers (ldm's schedule comes from the family's scheduler config)"),
    (r".*\.embeddings\.position_ids", "CLIP's position-id buffer (0…76, recomputed)"),
    (r".*\.logit_scale", "CLIP's contrastive temperature (unused for text conditioning)"),
]
SD2_UNUSED = "SD 2.x conditions on OpenCLIP-H's penultimate layer: its last block and text_projection are unused"


@dataclass(frozen=True)
class Rule:
    ours: str  # ldm (diffusers/transformers) key
    theirs: str  # key in the single file
    op: str | None = None  # None: same tensor; "conv1x1": 1×1 conv ↔ linear; "q"/"k"/"v": slice of in_proj; "T"


def _read(op: str | None, t: Tensor) -> Tensor:
    if op is None:
        return t
    if op == "conv1x1":
        return t.reshape(t.shape[0], -1)
    if op == "T":
        return t.T
    return t.chunk(3, dim=0)["qkv".index(op)]


def _write(op: str | None, parts: list[Tensor]) -> Tensor:
    if op in ("q", "k", "v"):
        return torch.cat(parts, dim=0)
    (t,) = parts
    if op == "conv1x1":
        return t[:, :, None, None]
    return t.T.contiguous() if op == "T" else t


# ------------------------------------------------------------------------------------------ tables


RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
          "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rules(keys, modules: dict[str, tuple[str, dict]], prefix: str, conv1x1: tuple[str, ...] = ()) -> list[Rule]:
    """One rule per key: the longest module path in `modules` it lies under, renamed, then its leaf renamed."""
    rules = []
    for key in keys:
        path = max((m for m in modules if key.startswith(m + ".")), key=len, default=None)
        if path is None:
            raise AssertionError(f"no table entry for {key}")  # a table bug, not a user error
        theirs, leaves = modules[path]
        rest = key[len(path) + 1:]
        leaf = next((lf for lf in leaves if rest.startswith(lf + ".")), None)
        if leaf is not None:
            rest = leaves[leaf] + rest[len(leaf):]
        op = "conv1x1" if leaf in conv1x1 and rest.endswith(".weight") else None
        rules.append(Rule(key, f"{prefix}{theirs}.{rest}", op))
    return rules


def _meta_keys(build) -> list[str]:
    with torch.device("meta"):
        return list(build().state_dict())


def unet_rules(cfg: UNetConfig, prefix: str = UNET) -> list[Rule]:
    """diffusers UNet2DConditionModel names ↔ LDM/SGM `input_blocks`/`middle_block`/`output_blocks` names."""
    return module_rules(lambda: UNet(cfg), unet_modules(cfg), prefix)


def module_rules(build, modules: dict[str, tuple[str, dict]], prefix: str) -> list[Rule]:
    """One rule per parameter of the network `build()` makes (built on the meta device), from a module table."""
    return _rules(_meta_keys(build), modules, prefix)


def unet_modules(cfg: UNetConfig) -> dict[str, tuple[str, dict]]:
    """`unet_rules`' module table (diffusers module path → (LDM module path, leaf renames)), which a ControlNet's
    table (`ldm.loading.controlnets`) extends: its encoder is the UNet's."""
    n = cfg.layers_per_block
    modules = {"conv_in": ("input_blocks.0.0", {}), "time_embedding.linear_1": ("time_embed.0", {}),
               "time_embedding.linear_2": ("time_embed.2", {}), "add_embedding.linear_1": ("label_emb.0.0", {}),
               "add_embedding.linear_2": ("label_emb.0.2", {}), "mid_block.resnets.0": ("middle_block.0", RESNET),
               "mid_block.attentions.0": ("middle_block.1", {}), "mid_block.resnets.1": ("middle_block.2", RESNET),
               "conv_norm_out": ("out.0", {}), "conv_out": ("out.2", {}),
               # LCM UNets' guidance projection: the files people share keep diffusers' name under the LDM prefix
               "time_embedding.cond_proj": ("time_embedding.cond_proj", {})}
    for level in range(len(cfg.block_out_channels)):
        kind = cfg.up_block_types[level]
        first_in, first_out = 1 + level * (n + 1), level * (n + 1)  # each level: its resnets, then a resampler
        for j in range(n):
            modules[f"down_blocks.{level}.resnets.{j}"] = (f"input_blocks.{first_in + j}.0", RESNET)
            modules[f"down_blocks.{level}.attentions.{j}"] = (f"input_blocks.{first_in + j}.1", {})
        modules[f"down_blocks.{level}.downsamplers.0.conv"] = (f"input_blocks.{first_in + n}.0.op", {})
        for j in range(n + 1):
            modules[f"up_blocks.{level}.resnets.{j}"] = (f"output_blocks.{first_out + j}.0", RESNET)
            modules[f"up_blocks.{level}.attentions.{j}"] = (f"output_blocks.{first_out + j}.1", {})
        upsampler = 2 if kind.startswith("CrossAttn") else 1  # after the attention, if the level has one
        modules[f"up_blocks.{level}.upsamplers.0.conv"] = (f"output_blocks.{first_out + n}.{upsampler}.conv", {})
    return modules


def vae_rules(cfg: VAEConfig, prefix: str = VAE_PREFIX) -> list[Rule]:
    """diffusers AutoencoderKL names ↔ LDM `encoder.down.N.block.M` / `decoder.up.N…` (levels in reverse)."""
    levels = len(cfg.block_out_channels)
    modules = {"quant_conv": ("quant_conv", {}), "post_quant_conv": ("post_quant_conv", {})}
    for part in ("encoder", "decoder"):
        modules |= {f"{part}.conv_in": (f"{part}.conv_in", {}), f"{part}.conv_out": (f"{part}.conv_out", {}),
                    f"{part}.conv_norm_out": (f"{part}.norm_out", {}),
                    f"{part}.mid_block.resnets.0": (f"{part}.mid.block_1", VAE_RESNET),
                    f"{part}.mid_block.resnets.1": (f"{part}.mid.block_2", VAE_RESNET),
                    f"{part}.mid_block.attentions.0": (f"{part}.mid.attn_1", VAE_ATTENTION)}
    for i in range(levels):
        for j in range(cfg.layers_per_block + 1):
            modules[f"encoder.down_blocks.{i}.resnets.{j}"] = (f"encoder.down.{i}.block.{j}", VAE_RESNET)
            modules[f"decoder.up_blocks.{i}.resnets.{j}"] = (f"decoder.up.{levels - 1 - i}.block.{j}", VAE_RESNET)
        modules[f"encoder.down_blocks.{i}.downsamplers.0"] = (f"encoder.down.{i}.downsample", {})
        modules[f"decoder.up_blocks.{i}.upsamplers.0"] = (f"decoder.up.{levels - 1 - i}.upsample", {})
    return _rules(_meta_keys(lambda: VAE(cfg)), modules, prefix, conv1x1=("to_q", "to_k", "to_v", "to_out.0"))


def clip_rules(cfg: CLIPTextConfig, prefix: str) -> list[Rule]:
    """CLIP-L: the file holds transformers' own names under `prefix` (`…transformer.text_model.*`; some
    older SD 1.x files lack the `text_model.` segment: pass the prefix with it appended then)."""
    return _rules(_meta_keys(lambda: CLIPTextModel(cfg)), {"text_model": ("text_model", {})}, prefix)


def openclip_rules(cfg: CLIPTextConfig, prefix: str) -> list[Rule]:
    """OpenCLIP (open_clip's `TextTransformer` names) ↔ transformers CLIP names: the fused attention
    `in_proj` split into q/k/v, `text_projection` (used as x @ P) transposed into a Linear weight."""
    rules = [Rule("text_model.embeddings.token_embedding.weight", "token_embedding.weight"),
             Rule("text_model.embeddings.position_embedding.weight", "positional_embedding"),
             Rule("text_model.final_layer_norm.weight", "ln_final.weight"),
             Rule("text_model.final_layer_norm.bias", "ln_final.bias")]
    if cfg.projection_dim is not None:
        rules.append(Rule("text_projection.weight", "text_projection", "T"))
    layer = {"layer_norm1": "ln_1", "self_attn.out_proj": "attn.out_proj", "layer_norm2": "ln_2",
             "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
    for i in range(cfg.num_hidden_layers):
        ours, theirs = f"text_model.encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for p in ("weight", "bias"):
            rules += [Rule(f"{ours}{a}.{p}", f"{theirs}{b}.{p}") for a, b in layer.items()]
            rules += [Rule(f"{ours}self_attn.{x}_proj.{p}", f"{theirs}attn.in_proj_{p}", x) for x in "qkv"]
    return [Rule(r.ours, prefix + r.theirs, r.op) for r in rules]


def take(tensors: dict[str, Tensor], rules: list[Rule]) -> dict[str, Tensor]:
    """ldm's state dict for one component; a missing file key is an error naming it."""
    missing = sorted({r.theirs for r in rules if r.theirs not in tensors})
    if missing:
        shown = ", ".join(missing[:6]) + (f" … ({len(missing)} in all)" if len(missing) > 6 else "")
        raise LoadError(f"missing keys: {shown}")
    return {r.ours: _read(r.op, tensors[r.theirs]) for r in rules}


def to_single_file(rules: list[Rule], state: dict[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of `take`: an ldm/diffusers state dict written under the single file's names."""
    grouped: dict[str, list[Rule]] = {}
    for rule in rules:
        grouped.setdefault(rule.theirs, []).append(rule)
    out = {}
    for theirs, group in grouped.items():
        group.sort(key=lambda r: "qkv".index(r.op) if r.op in ("q", "k", "v") else 0)
        out[theirs] = _write(group[0].op, [state[r.ours] for r in group]).contiguous()
    return out


# ---------------------------------------------------------------------------------------- detection


def _indices(keys, prefix: str) -> list[int]:
    """The distinct integers N in keys of the form `{prefix}N.…`, sorted."""
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := pattern.match(k))})


def detect(tensors: dict[str, Tensor]) -> str:
    """The family key of a single file's tensors; a LoadError when they match none."""
    has = {p: any(k.startswith(p) for k in tensors) for p in
           ("conditioner.embedders.1.model.", "conditioner.embedders.0.model.", "cond_stage_model.model.",
            "cond_stage_model.transformer.", UNET, VAE_PREFIX)}
    if not (has[UNET] and has[VAE_PREFIX]):
        prefixes = sorted({k.split(".")[0] for k in tensors})[:8]
        raise LoadError("its keys match no Stable Diffusion family: a full checkpoint holds model.diffusion_model.* "
                        f"(UNet) and first_stage_model.* (VAE); this file's top-level names are {prefixes}. "
                        "(A UNet-only or VAE-only file, a LoRA or a ControlNet is not a model ldm can load.)")
    if has["conditioner.embedders.1.model."]:
        return "sdxl"
    if has["conditioner.embedders.0.model."]:
        return "sdxl-refiner"
    if has["cond_stage_model.model."]:
        return "sd2-inpaint" if _unet_in_channels(tensors) > _latent_channels(tensors) else "sd2"
    if has["cond_stage_model.transformer."]:
        return "sd1"  # SD 1.x inpainting differs only in its 9 input channels, which the UNet config reads
    raise LoadError("its keys hold a UNet and a VAE but no text encoder ldm knows (cond_stage_model.transformer. "
                    "CLIP-L, cond_stage_model.model. OpenCLIP-H, conditioner.embedders.N. for SDXL)")


def _shape(tensors: dict[str, Tensor], key: str) -> tuple[int, ...]:
    if key not in tensors:
        raise LoadError(f"{key} is missing, and the configuration is read from it")
    return tuple(tensors[key].shape)


def _unet_in_channels(tensors) -> int:
    return _shape(tensors, f"{UNET}input_blocks.0.0.weight")[1]


def _latent_channels(tensors) -> int:
    return _shape(tensors, f"{VAE_PREFIX}decoder.conv_in.weight")[1]


# ------------------------------------------------------------------------------- config inference


def _heads(family: ModelSpec, width: int) -> int:
    if family.unet_heads is not None:
        return family.unet_heads
    if width % family.head_dim:
        raise LoadError(f"UNet width {width} is not a multiple of the {family.head_dim}-wide attention heads of "
                        f"{family.label}")
    return width // family.head_dim


def infer_unet(tensors: dict[str, Tensor], family: ModelSpec, towers: dict[str, dict]) -> dict:
    """A diffusers unet/config.json for the file's UNet: the layout from the shapes, heads by family rule."""
    t = {k[len(UNET):]: v for k, v in tensors.items() if k.startswith(UNET)}
    levels, level = [], []  # per level: (width, transformer depth) of each resnet
    for n in _indices(t, "input_blocks.")[1:]:
        if f"input_blocks.{n}.0.op.weight" in t:  # a downsampler closes the level
            levels.append(level)
            level = []
            continue
        width = _shape(t, f"input_blocks.{n}.0.out_layers.3.weight")[0]
        level.append((width, len(_indices(t, f"input_blocks.{n}.1.transformer_blocks."))))
    levels.append(level)
    per_level = {len(lv) for lv in levels}
    if len(per_level) != 1 or any(len(set(lv)) != 1 for lv in levels):
        raise LoadError("the UNet's levels differ in resnet count, or in width or depth within a level; "
                        "ldm's UNet does not build that layout")
    (n,) = per_level
    widths, depths = [lv[0][0] for lv in levels], [lv[0][1] for lv in levels]
    up_depths = [len(_indices(t, f"output_blocks.{i * (n + 1)}.1.transformer_blocks.")) for i in range(len(levels))]
    mid_depth = len(_indices(t, "middle_block.1.transformer_blocks."))
    attn_keys = [k for k in t if k.endswith("attn2.to_k.weight")]
    if not attn_keys or not mid_depth:
        raise LoadError("the UNet has no cross-attention (or no mid-block transformer); ldm's UNet needs both")
    # diffusers builds the mid block with the last level's depth, and ignores the depth of attention-less levels
    depth_cfg = [d or (mid_depth if i == len(levels) - 1 else 1) for i, d in enumerate(depths)]
    if depth_cfg[-1] != mid_depth:
        raise LoadError(f"the UNet's mid block has {mid_depth} transformer blocks and its last level "
                        f"{depth_cfg[-1]}; diffusers' layout (and ldm's) ties the two")
    used = {d for d in depths if d} | {mid_depth}
    cfg = {
        "in_channels": _shape(t, "input_blocks.0.0.weight")[1],
        "out_channels": _shape(t, "out.2.weight")[0],
        "sample_size": family.sample_size,
        "block_out_channels": widths,
        "layers_per_block": n,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in up_depths],
        "attention_head_dim": family.unet_heads or [_heads(family, w) for w in widths],
        "cross_attention_dim": _shape(t, attn_keys[0])[1],
        "transformer_layers_per_block": used.pop() if len(used) == 1 else depth_cfg,
        "use_linear_projection": len(_shape(t, next(k for k in t if k.endswith("proj_in.weight")))) == 2,
        "upcast_attention": family.upcast_attention,
    }
    if [d for d in up_depths if d] != [d for d in depths[::-1] if d]:
        cfg["reverse_transformer_layers_per_block"] = [d or 1 for d in up_depths]
    if "time_embedding.cond_proj.weight" in t:  # an LCM UNet
        cfg["time_cond_proj_dim"] = _shape(t, "time_embedding.cond_proj.weight")[1]
    return cfg | (_text_time(t, family, towers) if family.xl else {})


def _text_time(t: dict[str, Tensor], family: ModelSpec, towers: dict[str, dict]) -> dict:
    """SDXL's addition embedding (`text_time`): the pooled text embedding and the micro-conditioning's time ids,
    each id embedded at one width, which the width of `label_emb` and the count of ids tell."""
    adm = _shape(t, "label_emb.0.0.weight")[1]
    pooled = towers["text_encoder_2"]["projection_dim"]
    ids = 5 if family.requires_aesthetics_score else 6  # original size, crop, aesthetic score; or + target size
    if (adm - pooled) % ids:
        raise LoadError(f"label_emb takes {adm} features, which is not the {pooled}-wide pooled text embedding "
                        f"plus {ids} size embeddings of equal width")
    return {"addition_embed_type": "text_time", "addition_time_embed_dim": (adm - pooled) // ids,
            "projection_class_embeddings_input_dim": adm}


def infer_vae(tensors: dict[str, Tensor], family: ModelSpec) -> dict:
    t = {k[len(VAE_PREFIX):]: v for k, v in tensors.items() if k.startswith(VAE_PREFIX)}
    levels = _indices(t, "encoder.down.")
    return {
        "in_channels": _shape(t, "encoder.conv_in.weight")[1],
        "out_channels": _shape(t, "decoder.conv_out.weight")[0],
        "latent_channels": _shape(t, "decoder.conv_in.weight")[1],
        "block_out_channels": [_shape(t, f"encoder.down.{i}.block.0.conv1.weight")[0] for i in levels],
        "layers_per_block": len(_indices(t, "encoder.down.0.block.")),
        "down_block_types": ["DownEncoderBlock2D"] * len(levels),
        "up_block_types": ["UpDecoderBlock2D"] * len(levels),
        "sample_size": family.sample_size * 8,
        "scaling_factor": family.vae_scaling_factor,
        "force_upcast": True,
        "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in t,
    }


def infer_text_encoder(tensors: dict[str, Tensor], prefix: str, kind: str, drop_last: bool = False,
                       projected: bool = False) -> dict:
    """A transformers text_encoder/config.json for a CLIP-L (`clip`) or OpenCLIP (`openclip`) tower."""
    t = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    if kind == "clip":
        vocab, width = _shape(t, "embeddings.token_embedding.weight")
        layers = len(_indices(t, "encoder.layers."))
        positions = _shape(t, "embeddings.position_embedding.weight")[0]
        mlp = _shape(t, "encoder.layers.0.mlp.fc1.weight")[0]
        projection = None
    else:
        vocab, width = _shape(t, "token_embedding.weight")
        layers = len(_indices(t, "transformer.resblocks.")) - drop_last
        positions = _shape(t, "positional_embedding")[0]
        mlp = _shape(t, "transformer.resblocks.0.mlp.c_fc.weight")[0]
        projection = _shape(t, "text_projection")[1] if projected else None  # SDXL's bigG: the pooled embedding
    if width % TEXT_HEAD_DIM:
        raise LoadError(f"text encoder width {width} under {prefix} is not a multiple of CLIP's 64-wide heads")
    return {"architectures": ["CLIPTextModelWithProjection" if projection else "CLIPTextModel"],
            "hidden_act": "quick_gelu" if kind == "clip" else "gelu", "hidden_size": width,
            "intermediate_size": mlp, "num_attention_heads": width // TEXT_HEAD_DIM, "num_hidden_layers": layers,
            "max_position_embeddings": positions, "vocab_size": vocab, "layer_norm_eps": 1e-5,
            **({"projection_dim": projection} if projection else {})}


# --------------------------------------------------------------------------------------- reading


@dataclass
class SingleFile:
    """What a single file holds, in ldm's terms: family, configs (diffusers/transformers config.json dicts)
    and each component's state dict under ldm's names (views of the file's memory-mapped tensors)."""

    family: ModelSpec  # the family's, with the file's UNet and VAE channels and its rule's assumption in its label
    configs: dict[str, dict]  # "unet", "vae", "text_encoder", "text_encoder_2"
    states: dict[str, dict[str, Tensor]]
    scheduler: dict  # the family's official scheduler_config.json, with the prediction type asked for
    ignored: dict[str, str]  # file key → why no module reads it


def component_rules(family: ModelSpec, configs: dict[str, dict], legacy_clip: bool = False) -> dict[str, list[Rule]]:
    """Every component's key table, for a file of `family` whose configs are `configs`. `legacy_clip`: the
    CLIP-L keys lack the `text_model.` segment (`cond_stage_model.transformer.embeddings…`, older SD 1.x files)."""
    rules = {"unet": unet_rules(UNetConfig.from_diffusers(configs["unet"])),
             "vae": vae_rules(VAEConfig.from_diffusers(configs["vae"]))}
    for tower in family.towers:
        cfg, prefix = CLIPTextConfig.from_transformers(configs[tower.component]), tower.prefix
        if tower.kind == "openclip":
            rules[tower.component] = openclip_rules(cfg, prefix)
        elif not legacy_clip:
            rules[tower.component] = clip_rules(cfg, prefix)
        else:
            rules[tower.component] = [Rule(r.ours, prefix + r.theirs[len(prefix + "text_model."):], r.op)
                                      for r in clip_rules(cfg, prefix)]
    return rules


def sd2_drops_last_block(family: ModelSpec, tensors: dict[str, Tensor]) -> bool:
    """SD 2.x conditions on OpenCLIP-H's penultimate layer. The original files hold all 24 blocks (and the
    unused text_projection): the last is dropped. Files converted back from a diffusers folder (diffusers'
    convert_diffusers_to_original_stable_diffusion.py) hold only the 23 the folder keeps, and no projection."""
    return family.unused_last_text_block and f"{family.towers[0].prefix}text_projection" in tensors


def legacy_clip_keys(family: ModelSpec, tensors: dict[str, Tensor]) -> bool:
    """Older SD 1.x files keep CLIP-L's keys without transformers' `text_model.` segment
    (`cond_stage_model.transformer.embeddings…`)."""
    tower = family.towers[0]
    return (not family.xl and tower.kind == "clip"
            and not any(k.startswith(tower.prefix + "text_model.") for k in tensors))


def read_single_file(tensors: dict[str, Tensor], prediction_type: str | None = None) -> SingleFile:
    """Detect, infer and map a single file's tensors (LoadError with the reason when they do not fit)."""
    family = SPECS[detect(tensors)]
    legacy_clip = legacy_clip_keys(family, tensors)
    configs = {}
    for tower in family.towers:
        prefix = tower.prefix + ("text_model." if tower.kind == "clip" and not legacy_clip else "")
        configs[tower.component] = infer_text_encoder(tensors, prefix, tower.kind,
                                                      sd2_drops_last_block(family, tensors), projected=family.xl)
    configs["unet"] = infer_unet(tensors, family, configs)
    configs["vae"] = infer_vae(tensors, family)
    family = family.with_model(label=f"{family.label} ({family.assumed})" if family.assumed else family.label,
                               unet_in_channels=configs["unet"]["in_channels"],
                               latent_channels=configs["vae"]["latent_channels"])
    rules = component_rules(family, configs, legacy_clip)
    states = {}
    for component, table in rules.items():
        try:
            states[component] = take(tensors, table)
        except LoadError as e:
            raise LoadError(f"its {component} does not match the {family.label} layout inferred from it: {e}") from None

    used = {r.theirs for table in rules.values() for r in table}
    ignored, unexpected = {}, []
    sd2_unused = ()
    if sd2_drops_last_block(family, tensors):
        last = configs["text_encoder"]["num_hidden_layers"]
        sd2_unused = (f"cond_stage_model.model.transformer.resblocks.{last}.", "cond_stage_model.model.text_projection")
    for key in tensors:
        if key in used:
            continue
        reason = next((why for pattern, why in IGNORED if re.fullmatch(pattern, key)), None)
        if reason is None and key.startswith(sd2_unused):
            reason = SD2_UNUSED
        if reason is None:
            unexpected.append(key)
        else:
            ignored[key] = reason
    if unexpected:
        shown = ", ".join(unexpected[:6]) + (f" … ({len(unexpected)} in all)" if len(unexpected) > 6 else "")
        raise LoadError(f"it holds keys no {family.label} module reads: {shown}")

    override = prediction_type_override(prediction_type)
    scheduler = family.scheduler | ({"prediction_type": override} if override else {})
    return SingleFile(family, configs, states, scheduler, ignored)


def write_single_file_state(family: ModelSpec, configs: dict[str, dict],
                            states: dict[str, dict[str, Tensor]]) -> dict[str, Tensor]:
    """The original single-file tensors of a model given in ldm/diffusers names (the inverse of reading)."""
    out = {}
    for component, table in component_rules(family, configs).items():
        out |= to_single_file(table, states[component])
    return out
