"""Files → components: a diffusers folder (or its Hub id) or an original single-file checkpoint → the loaded
networks, tokenizers and scheduler config of one model (`Components`), which `StableDiffusion.from_components`
turns into a pipeline.

Everything about files lives here: the folder's model_index.json and configs, the Hub file patterns, the device
and dtype policy (fp16 on CUDA, the SDXL VAE upcast), strict loading of each network (`ldm.loading.files`), the
single file's key tables (`ldm.loading.single_file`), the safety checker's folder and another VAE (`--vae`).
Nothing here imports a pipeline.
"""

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from ldm.errors import InputError, LoadError
from ldm.loading.families import SPECS, ModelSpec, lookup, prediction_type_override
from ldm.loading.files import (
    PICKLE_SUFFIXES,
    load_module,
    read_config,
    read_json,
    read_safetensors,
    refuse_pickle,
    resolve,
    weights_file,
)
from ldm.loading.single_file import read_single_file, take, vae_rules
from ldm.loading.tiny_vae import is_tiny_vae, load_tiny_vae
from ldm.loading.unets import load_unet
from ldm.networks.clip import CLIPTextConfig, CLIPTextModel
from ldm.networks.safety import FeatureExtractorConfig, Safety, SafetyChecker, SafetyCheckerConfig, checker_state
from ldm.networks.tokenizer import CLIPTokenizer, clip_bpe_vocab
from ldm.networks.unet import UNet, UNetConfig
from ldm.networks.vae import VAE, VAEConfig
from ldm.sampling.schedules import SchedulerConfig

# (SimianLuo/LCM_Dreamshaper_v7 names the LCM pipeline: an SD 1.5 folder whose UNet takes the guidance as an input)
SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline",
                "LatentConsistencyModelPipeline", "LatentConsistencyModelImg2ImgPipeline")
XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def resolve_device(device: str = "auto") -> torch.device:
    """auto, cpu, cuda or cuda:N; anything else is refused before it reaches torch."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        return torch.device("cpu")
    match = re.fullmatch(r"cuda(?::(\d+))?", device)
    if match is None:
        raise InputError(f"unknown device {device!r} (use auto, cpu, cuda or cuda:N)")
    if not torch.cuda.is_available():
        raise InputError(f"--device {device}: no CUDA device is available here (use --device cpu or auto)")
    index = int(match.group(1) or 0)
    if index >= torch.cuda.device_count():
        raise InputError(f"--device {device}: there are only {torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise InputError(f"unknown dtype {dtype!r} (use auto, {', '.join(DTYPES)})")
    return DTYPES[dtype]


def hub_files(variant: str | None) -> list[str]:
    """What a run needs from an official diffusers repo: configs, tokenizers, safetensors (and the SD 1.x safety
    checker's). `resolve` keeps those of the components the manifest lists for an official repo."""
    suffix = f".{variant}.safetensors" if variant else ".safetensors"
    patterns = ["scheduler/*.json", "tokenizer/*", "tokenizer_2/*", "unet/config.json",
                "vae/config.json", "text_encoder/config.json", "text_encoder_2/config.json",
                f"unet/diffusion_pytorch_model{suffix}", f"vae/diffusion_pytorch_model{suffix}",
                f"text_encoder/model{suffix}", f"text_encoder_2/model{suffix}",
                "safety_checker/config.json", f"safety_checker/model{suffix}", "feature_extractor/*.json"]
    return ["model_index.json", *patterns]


@dataclass
class Folder:
    """What a diffusers folder's model_index.json and config.json files say, before any weight is read."""

    index: dict
    listed: set[str]  # the components model_index.json names (not [null, null])
    towers: list[str]  # text_encoder, text_encoder_2
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: dict[str, CLIPTextConfig]
    spec: ModelSpec  # its family's, with what the configs state (`folder_spec`)


def read_folder(root: Path) -> Folder:
    """Read and check a folder's layout and configs (LoadError naming what is missing or malformed), and resolve
    it to its family's spec."""
    index = read_json(root / "model_index.json")
    pipeline_class = index.get("_class_name") if isinstance(index, dict) else None
    if pipeline_class not in SD_PIPELINES + XL_PIPELINES:
        raise LoadError(f"{root}: a {pipeline_class} folder is not supported yet (ldm loads "
                        f"{', '.join(SD_PIPELINES + XL_PIPELINES)} folders)")
    xl = pipeline_class in XL_PIPELINES
    listed = {k for k, v in index.items() if isinstance(v, list) and v and v[0] is not None}
    towers = [t for t in ("text_encoder", "text_encoder_2") if t in listed] if xl else ["text_encoder"]
    needed = ["unet", "vae", "scheduler"] + towers + [t.replace("text_encoder", "tokenizer") for t in towers]
    for part in needed:
        if not (root / part).is_dir():
            raise LoadError(f"{root}: the {part}/ folder is missing")
    unet = read_config(root / "unet" / "config.json", UNetConfig.from_diffusers)
    vae = read_config(root / "vae" / "config.json", VAEConfig.from_diffusers)
    text_encoders = {t: read_config(root / t / "config.json", CLIPTextConfig.from_transformers) for t in towers}
    return Folder(index, listed, towers, unet, vae, text_encoders, folder_spec(xl, index, unet, vae, text_encoders))


def folder_spec(xl: bool, index: dict, unet: UNetConfig, vae: VAEConfig,
                text_encoders: dict[str, CLIPTextConfig]) -> ModelSpec:
    """The family a folder's configs describe, with what they state in place of the family's values. The family:
    SD or SDXL by the pipeline class; SDXL base or refiner by its towers (the refiner has no CLIP-L); SD 1.x
    (CLIP-L, quick_gelu) or SD 2.x (OpenCLIP-H, gelu) by the text encoder's activation; inpainting by the UNet's
    inputs. SDXL's choices come from model_index.json, where it is silent its pipeline class's defaults (diffusers'
    rule: zeros for an empty negative prompt, no aesthetic score)."""
    if xl:
        key = "sdxl" if "text_encoder" in text_encoders else "sdxl-refiner"
    elif text_encoders["text_encoder"].hidden_act == "quick_gelu":
        key = "sd1"
    else:
        key = "sd2-inpaint" if unet.in_channels > vae.latent_channels else "sd2"
    choices = {"force_zeros_for_empty_prompt": index.get("force_zeros_for_empty_prompt", True),
               "requires_aesthetics_score": index.get("requires_aesthetics_score", False)} if xl else {}
    return SPECS[key].with_model(sample_size=unet.sample_size, unet_in_channels=unet.in_channels,
                                 latent_channels=vae.latent_channels, **choices)


def upcast_vae_dtype(spec: ModelSpec, dtype: torch.dtype, vae_cfg: VAEConfig) -> torch.dtype:
    """The SDXL pipelines run a half-precision VAE in fp32 when its config says force_upcast (the SDXL VAE
    overflows fp16); StableDiffusionPipeline does not (`ModelSpec.upcast_vae`)."""
    return torch.float32 if spec.upcast_vae and dtype == torch.float16 and vae_cfg.force_upcast else dtype


def text_encoder_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official transformers-4 names as they are; transformers-5 files (no `text_model.` prefix) renamed.

    The SD 1.x files also carry the `position_ids` buffer (0…76), which the model computes itself.
    """
    out = {}
    for key, value in state.items():
        if key.endswith("embeddings.position_ids"):
            continue
        if not key.startswith(("text_model.", "text_projection.")):
            key = "text_model." + key
        out[key] = value
    return out


@dataclass
class Components:
    """One model's loaded parts, before any pipeline: what `StableDiffusion.from_components` is built from."""

    spec: ModelSpec  # the model's family, with what its configs state (`ModelSpec.with_model`): `pipe.spec`
    unet: UNet
    vae: VAE
    encoders: dict[str, CLIPTextModel]  # by component: text_encoder, text_encoder_2
    tokenizers: dict[str, CLIPTokenizer]
    scheduler: SchedulerConfig
    device: torch.device
    dtype: torch.dtype
    name: str  # the infotext's Model
    safety: Safety | None = None  # the SD 1.x safety checker, where the folder lists it
    vae_name: str | None = None  # another VAE than the model's own (`vae=`): the infotext's VAE
    model_file: Path | None = None  # a single file: its sha256 is the infotext's Model hash
    notes: list[str] = field(default_factory=list)
    card: dict = field(default_factory=dict)  # the manifest's card defaults of a model loaded by name or Hub id


def load_safety(root: Path, device: torch.device, dtype: torch.dtype, variant: str | None = None) -> Safety:
    """The SD 1.x safety checker of a folder: `safety_checker/` and `feature_extractor/`."""
    cfg = read_config(root / "safety_checker" / "config.json", SafetyCheckerConfig.from_transformers)
    features = read_config(root / "feature_extractor" / "preprocessor_config.json",
                           FeatureExtractorConfig.from_transformers)
    path = weights_file(root / "safety_checker", "model", variant)
    checker = load_module(lambda: SafetyChecker(cfg), checker_state(read_safetensors(path, dtype)), path,
                          "SD 1.x safety checker", device)
    return Safety(checker, features)


def load_components(model: str | Path, device: str = "auto", dtype: str = "auto", variant: str | None = None,
                    revision: str | None = None, local_files_only: bool = False, prediction_type: str | None = None,
                    safety_checker: bool = True, vae: str | Path | None = None,
                    unet: str | Path | None = None) -> Components:
    """An official diffusers folder (or its Hub id), or an original single-file checkpoint → its `Components`.

    A folder: model_index.json, unet/, vae/, text_encoder/ (and text_encoder_2/ for SDXL), tokenizer(s),
    scheduler/; `variant="fp16"` reads the `*.fp16.safetensors` files. A `.safetensors` file: see
    `load_single_file_components`. `prediction_type` ("eps" or "v")
    overrides the scheduler's. A folder that lists a `safety_checker` (the SD 1.x repos) gets it loaded
    unless `safety_checker=False`. `vae` replaces the model's VAE (`load_vae`), `unet` its UNet
    (`ldm.loading.unets.load_unet`).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    override = prediction_type_override(prediction_type)  # (before anything is downloaded)
    root = resolve(str(model), hub_files(variant), revision, local_files_only)
    if root.is_file():
        if variant is not None:
            raise InputError(f"--variant {variant} selects files in a diffusers folder; {root} is a single file")
        return load_single_file_components(root, device, dtype, prediction_type, vae, unet)
    name = Path(str(model)).name if Path(str(model)).exists() else str(model)
    parts = load_folder_components(root, name, dev, dt, variant, override, safety_checker, vae, unet)
    entry = None if Path(str(model)).exists() else lookup(str(model))
    parts.card = dict(entry.card) if entry else {}
    return parts


def load_folder_components(root: Path, name: str, device: torch.device, dtype: torch.dtype, variant: str | None,
                           prediction_type: str | None, safety_checker: bool, vae: str | Path | None,
                           unet: str | Path | None = None) -> Components:
    """A diffusers folder's `Components` (`load_components`); `prediction_type`: the scheduler config's value in
    place of the folder's."""
    folder = read_folder(root)
    spec = folder.spec
    vae_name = None if vae is None else vae_label(vae)
    if vae is not None:  # first: a VAE that does not fit is refused before the rest is read
        vae = load_vae(vae, folder.vae, spec, device, dtype)

    def load_part(part, stem, build, dtype=dtype, rename=lambda state: state):
        path = weights_file(root / part, stem, variant)
        return load_module(build, rename(read_safetensors(path, dtype)), path, spec.label, device)

    if unet is not None:  # (its own or the folder's: only one is read)
        unet = load_unet(unet, folder.unet, spec, device, dtype)
    else:
        unet = load_part("unet", "diffusion_pytorch_model", lambda: UNet(folder.unet))
    if vae is None:
        vae = load_part("vae", "diffusion_pytorch_model", lambda: VAE(folder.vae),
                        upcast_vae_dtype(spec, dtype, folder.vae))
    encoders = {t: load_part(t, "model", lambda c=cfg: CLIPTextModel(c), rename=text_encoder_state)
                for t, cfg in folder.text_encoders.items()}
    tokenizers = {t: CLIPTokenizer.from_folder(root / t.replace("text_encoder", "tokenizer")) for t in folder.towers}
    scheduler = read_config(root / "scheduler" / "scheduler_config.json", SchedulerConfig.from_diffusers)
    if prediction_type is not None:
        scheduler = dataclasses.replace(scheduler, prediction_type=prediction_type)
    safety = None
    if safety_checker and "safety_checker" in folder.listed:
        for part in ("safety_checker", "feature_extractor"):
            if not (root / part).is_dir():
                raise LoadError(f"{root}: model_index.json lists a safety checker but the {part}/ folder is "
                                "missing (load with --no-safety-checker to go without it)")
        safety = load_safety(root, device, dtype, variant)
    return Components(spec, unet, vae, encoders, tokenizers, scheduler, device, dtype, name, safety=safety,
                      vae_name=vae_name)


def load_single_file_components(path: str | Path, device: str = "auto", dtype: str = "auto",
                                prediction_type: str | None = None, vae: str | Path | None = None,
                                unet: str | Path | None = None) -> Components:
    """An original single-file checkpoint (`v1-5-pruned-emaonly.safetensors`, `sd_xl_base_1.0.safetensors`…).

    The family is detected from the keys and the configs inferred from the tensor shapes
    (`ldm.loading.single_file`); the tokenizer is CLIP's BPE as open_clip ships it; the scheduler and the
    prediction type are the family's official ones (SD 2.x: v-prediction; pass `prediction_type="eps"`
    for a 512-px SD 2.x base file). `vae` replaces the file's VAE (`load_vae`), `unet` its UNet (`load_unet`).
    """
    dev = resolve_device(device)
    dt = resolve_dtype(dtype, dev)
    path = Path(path)
    if path.suffix in PICKLE_SUFFIXES:
        refuse_pickle(path)
    if path.suffix != ".safetensors":
        raise LoadError(f"{path}: ldm reads single-file checkpoints in the .safetensors format, and diffusers "
                        "folders")
    prediction_type_override(prediction_type)  # refused before the file is read
    tensors = read_safetensors(path)
    try:
        checkpoint = read_single_file(tensors, prediction_type)
    except LoadError as e:
        raise LoadError(f"{path}: {e}") from None
    spec = checkpoint.family
    unet_cfg = UNetConfig.from_diffusers(checkpoint.configs["unet"])
    vae_cfg = VAEConfig.from_diffusers(checkpoint.configs["vae"])

    def load_part(component, build, dtype=dt):
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint.states[component].items()}
        return load_module(build, state, path, spec.label, dev)

    if unet is not None:
        unet = load_unet(unet, unet_cfg, spec, dev, dt)
    else:
        unet = load_part("unet", lambda: UNet(unet_cfg))
    vae_name = None if vae is None else vae_label(vae)
    if vae is not None:
        vae = load_vae(vae, vae_cfg, spec, dev, dt)
    else:
        vae = load_part("vae", lambda: VAE(vae_cfg), upcast_vae_dtype(spec, dt, vae_cfg))
    encoders, tokenizers = {}, {}
    vocab, merges = clip_bpe_vocab()
    for tower in spec.towers:
        cfg = CLIPTextConfig.from_transformers(checkpoint.configs[tower.component])
        encoders[tower.component] = load_part(tower.component, lambda c=cfg: CLIPTextModel(c))
        tokenizers[tower.component] = CLIPTokenizer(vocab, merges, pad_token=tower.pad_token)
    scheduler = SchedulerConfig.from_diffusers(checkpoint.scheduler)
    return Components(spec, unet, vae, encoders, tokenizers, scheduler, dev, dt, path.stem, vae_name=vae_name,
                      model_file=path)


def vae_family(cfg: VAEConfig) -> str:
    """A VAE's latent space, as its scaling and shift factors tell it (`ModelSpec.latent_space`): SD 1.x/2.x and
    SDXL VAEs have the same shapes but different latent spaces."""
    spaces = dict.fromkeys(s.latent_space for s in SPECS.values()
                           if (s.vae_scaling_factor, s.vae_shift_factor) == (cfg.scaling_factor, cfg.shift_factor))
    name = "/".join(spaces) or "an unknown family"
    return f"{name} (scaling factor {cfg.scaling_factor}, {cfg.latent_channels} latent channels)"


def vae_shapes(t: dict[str, Tensor], diffusers_names: bool) -> dict:
    """The VAEConfig fields a VAE file's tensor shapes tell (LDM names, or diffusers' `down_blocks`)."""
    down, block, attn = (("encoder.down_blocks.", "resnets", "encoder.mid_block.attentions.0.to_q.weight")
                         if diffusers_names else ("encoder.down.", "block", "encoder.mid.attn_1.q.weight"))
    levels = sorted({int(k[len(down):].split(".")[0]) for k in t if k.startswith(down)})
    try:
        return {"in_channels": t["encoder.conv_in.weight"].shape[1],
                "out_channels": t["decoder.conv_out.weight"].shape[0],
                "latent_channels": t["decoder.conv_in.weight"].shape[1],
                "block_out_channels": tuple(t[f"{down}{i}.{block}.0.conv1.weight"].shape[0] for i in levels),
                "layers_per_block": len({k.split(".")[4] for k in t if k.startswith(f"{down}0.{block}.")}),
                "mid_block_add_attention": attn in t}
    except KeyError as e:
        raise LoadError(f"{e.args[0]} is missing, and the VAE's configuration is read from it") from None


def vae_label(source: str | Path) -> str:
    """The infotext's `VAE` for a VAE given by path: a file's stem, a folder's name (as A1111 names them)."""
    path = Path(source)
    return path.stem if path.is_file() else path.name


def load_vae(source: str | Path, model: VAEConfig, spec: ModelSpec, device: torch.device, dtype: torch.dtype) -> VAE:
    """The VAE of `source` in place of a model's (`--vae`): a diffusers `vae/` folder (config.json and
    diffusion_pytorch_model.safetensors; a model folder holding one works too), or one .safetensors file in the
    original LDM layout (`sdxl_vae.safetensors`, `vae-ft-mse-840000-ema-pruned.safetensors`; also a full
    checkpoint's `first_stage_model.*`) or in diffusers' names.

    Families: a VAE fits when its latent channels, scaling factor and shift factor are the model's. A folder's
    config.json states them, so an SD 1.x/2.x VAE folder given to SDXL (or the reverse) is refused, naming
    both. A single file holds no config: its shapes are read (different latent channels are refused) and it
    takes the model's scaling factor and tile size, as AUTOMATIC1111 does; an SD VAE file given to SDXL cannot
    be told apart by its shapes. The VAE's own `force_upcast` decides the SDXL fp16 upcast (a "fp16-fix" VAE
    runs in fp16).
    """
    path = Path(source).expanduser()
    if path.is_dir() and (path / "vae" / "config.json").is_file() and not (path / "config.json").is_file():
        path = path / "vae"
    if is_tiny_vae(path):  # TAESD (`ldm.loading.tiny_vae`)
        return load_tiny_vae(path, spec, device, dtype)
    if path.is_dir():
        cfg = read_config(path / "config.json", VAEConfig.from_diffusers)
        weights = weights_file(path, "diffusion_pytorch_model")
        state = read_safetensors(weights, upcast_vae_dtype(spec, dtype, cfg))
    elif path.is_file():
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise LoadError(f"--vae {source}: give a diffusers vae/ folder or a .safetensors VAE file")
        tensors = read_safetensors(path)
        prefix = "first_stage_model." if any(k.startswith("first_stage_model.") for k in tensors) else ""
        tensors = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
        if "decoder.conv_in.weight" not in tensors:
            raise LoadError(f"--vae {source}: not a VAE (no decoder.conv_in.weight among its "
                            f"{len(tensors)} tensors)")
        diffusers_names = any(k.startswith("decoder.up_blocks.") for k in tensors)
        cfg = dataclasses.replace(model, **vae_shapes(tensors, diffusers_names))
        if not diffusers_names:
            try:
                tensors = take(tensors, vae_rules(cfg, prefix=""))
            except LoadError as e:
                raise LoadError(f"--vae {source}: {e}") from None
        target = upcast_vae_dtype(spec, dtype, cfg)
        state = {k: v.to(target) for k, v in tensors.items() if not k.startswith(("loss.", "model_ema."))}
        weights = path
    else:
        raise LoadError(f"--vae {source}: no such file or folder")
    if (cfg.latent_channels, cfg.scaling_factor, cfg.shift_factor) != (
            model.latent_channels, model.scaling_factor, model.shift_factor):
        raise LoadError(f"--vae {source}: a VAE of {vae_family(cfg)} does not fit this {spec.label} model, whose "
                        f"VAE is {vae_family(model)}")
    return load_module(lambda: VAE(cfg), state, weights, spec.label, device)
