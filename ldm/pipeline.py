"""Stable Diffusion: prompt → text embeddings → sampled latents → VAE decode → PIL images.

    pipe = StableDiffusion.from_pretrained("stable-diffusion-v1-5/stable-diffusion-v1-5")
    result = pipe("a photograph of an astronaut riding a horse", seed=1)
    result.images[0].save("astronaut.png")

Image-to-image (SDEdit) starts from a noised encoding of `image`; inpainting adds a `mask`, fed to a
9-channel UNet as extra channels, or pasted back after every step for a 4-channel one.

`pipe.unet`, `pipe.vae`, `pipe.text_encoder` and `pipe.tokenizer` are plain attributes: swap them,
hook them, or call them directly.
"""

import dataclasses
import math
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from .clip import CLIPTextConfig, CLIPTextModel
from .denoisers import Denoiser, guided, with_channels
from .embeddings import Embedding, folder_embeddings, load_embedding
from .errors import InputError, LdmError, LoadError
from .families import PREDICTION_TYPES
from .hashes import sha256
from .images import fit_size, image_to_tensor, infotext, mask_to_tensor, to_pil
from .loading import (
    PICKLE_SUFFIXES,
    load_module,
    read_config,
    read_json,
    read_safetensors,
    refuse_pickle,
    resolve,
    weights_file,
)
from .lora import LoadedLora, find_lora
from .lora import load_lora as merge_lora
from .lora import unload_loras as unmerge_loras
from .options import EMPHASES, SYNTAXES
from .prompts import EmbeddingLookup, empty_chunk, encode_chunks, extract_extra_networks, prompt_chunks
from .safety import Safety
from .samplers import SAMPLERS, randn, sampler_for
from .schedules import Schedule, SchedulerConfig
from .single_file import TOWERS, read_single_file
from .tokenizer import EOS, CLIPTokenizer, clip_bpe_vocab
from .unet import UNet, UNetConfig
from .vae import VAE, VAEConfig

SD_PIPELINES = ("StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline", "StableDiffusionInpaintPipeline")
XL_PIPELINES = ("StableDiffusionXLPipeline", "StableDiffusionXLImg2ImgPipeline")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
MAX_SEED = 2**64 - 1
MAX_CLIP_SKIP = 12  # A1111's range; a model with fewer text layers refuses what it cannot skip


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
    xl: bool
    listed: set[str]  # the components model_index.json names (not [null, null])
    towers: list[str]  # text_encoder, text_encoder_2
    unet: UNetConfig
    vae: VAEConfig
    text_encoders: dict[str, CLIPTextConfig]
    family: str  # for messages and `ldm info`


def read_folder(root: Path) -> Folder:
    """Read and check a folder's layout and configs (LoadError naming what is missing or malformed)."""
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
    if xl:
        family = "SDXL refiner" if "text_encoder" not in text_encoders else "SDXL base"
    else:  # CLIP-L or OpenCLIP-H
        family = "SD 1.x" if text_encoders["text_encoder"].hidden_act == "quick_gelu" else "SD 2.x"
    family += " inpainting" if unet.in_channels > vae.latent_channels else ""
    return Folder(index, xl, listed, towers, unet, vae, text_encoders, family)


def upcast_vae_dtype(xl: bool, dtype: torch.dtype, vae_cfg: VAEConfig) -> torch.dtype:
    """The SDXL pipelines run a half-precision VAE in fp32 when its config says force_upcast (the SDXL VAE
    overflows fp16); StableDiffusionPipeline does not."""
    return torch.float32 if xl and dtype == torch.float16 and vae_cfg.force_upcast else dtype


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


def check_request(steps: int, width: int | None, height: int | None, guidance: float, num_images: int,
                  seed: int | None, sampler: str | None, eta: float, size_multiple: int = 8, karras: bool = False,
                  guidance_rescale: float = 0.0, strength: float | None = None,
                  denoising_start: float | None = None, denoising_end: float | None = None,
                  max_steps: int = 1000, image: bool = False, mask: bool = False, clip_skip: int = 1,
                  prompt_syntax: str = "a1111", emphasis: str = "original") -> None:
    """Reject out-of-range generation parameters with a message that says what to pass instead.

    `strength` is the one asked for (None: the default); `image`/`mask`: whether one is given."""
    if prompt_syntax not in SYNTAXES:
        raise InputError(f"unknown prompt syntax {prompt_syntax!r} (use {' or '.join(SYNTAXES)})")
    if emphasis not in EMPHASES:
        raise InputError(f"unknown emphasis {emphasis!r} (use {', '.join(EMPHASES)})")
    if not isinstance(clip_skip, int) or not 1 <= clip_skip <= MAX_CLIP_SKIP:
        raise InputError(f"clip skip must be a whole number from 1 (the last layer) to {MAX_CLIP_SKIP}, "
                         f"got {clip_skip!r}")
    if mask and not image:
        raise InputError("--mask needs the image it applies to (--image)")
    if strength is not None and not image:
        raise InputError("--strength applies to image-to-image and inpainting: give an --image")
    if sampler is not None and sampler not in SAMPLERS:
        raise InputError(f"unknown sampler {sampler!r}; choose one of: {', '.join(SAMPLERS)}")
    if karras and sampler is not None and not SAMPLERS[sampler].karras:
        raise InputError(f"--karras applies to {', '.join(n for n, s in SAMPLERS.items() if s.karras)}, "
                         f"not to {sampler}")
    if not isinstance(steps, int) or not 1 <= steps <= max_steps:
        raise InputError(f"steps must be a whole number from 1 to {max_steps} (the training timesteps), got {steps!r}")
    for name, value in (("width", width), ("height", height)):
        if value is not None and (not isinstance(value, int) or value < size_multiple or value % size_multiple):
            raise InputError(f"{name} must be a positive multiple of {size_multiple}, got {value!r}")
    if not math.isfinite(guidance) or guidance < 0:
        raise InputError(f"guidance must be a number ≥ 0, got {guidance}")
    if not isinstance(num_images, int) or num_images < 1:
        raise InputError(f"the number of images must be ≥ 1, got {num_images!r}")
    if seed is not None and not 0 <= seed <= MAX_SEED:
        raise InputError(f"seed must be between 0 and {MAX_SEED}, got {seed}")
    if not 0 <= eta <= 1:
        raise InputError(f"eta must be between 0 and 1, got {eta}")
    if not 0 <= guidance_rescale <= 1:
        raise InputError(f"guidance rescale must be between 0 and 1, got {guidance_rescale}")
    if strength is not None and not 0 < strength <= 1:
        raise InputError(f"strength must be in (0, 1], got {strength}")
    for name, value in (("denoising start", denoising_start), ("denoising end", denoising_end)):
        if value is not None and not 0 < value < 1:
            raise InputError(f"{name} must be strictly between 0 and 1, got {value}")


@dataclass
class Generation:
    images: list[Image.Image]
    seed: int
    infotexts: list[str] = field(default_factory=list)  # AUTOMATIC1111 `parameters`, one per image
    latents: Tensor | None = None  # σ-space latents, from a run stopped early with denoising_end
    nsfw: list[bool | None] = field(default_factory=list)  # per image: the safety checker's flag; None: no checker
    notes: list[str] = field(default_factory=list)  # what the user should know (a prompt cut at 77 tokens, …)
    params: dict = field(default_factory=dict)  # the infotext's parameters (before each image's seed and position)
    evaluations: int = 0  # UNet evaluations (with guidance, each runs both branches): Heun takes two a step


class StableDiffusion:
    """SD 1.x/2.x text-to-image, image-to-image and inpainting on the official diffusers folder layout."""

    default_strength = 0.8  # image-to-image, as StableDiffusionImg2ImgPipeline

    def __init__(self, unet: UNet, vae: VAE, text_encoder: CLIPTextModel, tokenizer: CLIPTokenizer,
                 scheduler: SchedulerConfig, device: torch.device, dtype: torch.dtype, name: str = "model"):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.scheduler, self.device, self.dtype, self.name = scheduler, device, dtype, name
        self.default_sampler = sampler_for(scheduler)  # None: the folder's scheduler is not one ldm has
        self.vae_scale = 2 ** (len(vae.config.block_out_channels) - 1)
        self.safety_checker: Safety | None = None  # set: every image is checked, flagged ones come back black
        self.embeddings: dict[str, Embedding] = {}  # textual inversion, by trigger word (`load_embedding`)
        self.notes: list[str] = []  # said once, at load: embeddings of the folder that do not fit, …
        self.model_file: Path | None = None  # a single-file checkpoint: its sha256 is the infotext's Model hash
        self.loras: list[LoadedLora] = []  # merged adapters, in load order (`load_lora`)

    # ---------------------------------------------------------------------------------- loading

    @classmethod
    def from_pretrained(cls, model: str | Path, device: str = "auto", dtype: str = "auto",
                        variant: str | None = None, revision: str | None = None,
                        local_files_only: bool = False, prediction_type: str | None = None,
                        safety_checker: bool = True) -> "StableDiffusion":
        """Load an official diffusers folder (or its Hub id), or an original single-file checkpoint.

        A folder: model_index.json, unet/, vae/, text_encoder/ (and text_encoder_2/ for SDXL), tokenizer(s),
        scheduler/; `variant="fp16"` reads the `*.fp16.safetensors` files. A `.safetensors` file: see
        `from_single_file`. Returns a `StableDiffusionXL` for SDXL models. `prediction_type` ("eps" or "v")
        overrides the scheduler's. A folder that lists a `safety_checker` (the SD 1.x repos) gets it loaded
        unless `safety_checker=False`.
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise InputError(f"unknown prediction type {prediction_type!r} (use {' or '.join(PREDICTION_TYPES)})")
        root = resolve(str(model), hub_files(variant), revision, local_files_only)
        if root.is_file():
            if variant is not None:
                raise InputError(f"--variant {variant} selects files in a diffusers folder; {root} is a single file")
            return cls.from_single_file(root, device, dtype, prediction_type)
        folder = read_folder(root)
        index, xl, listed, towers = folder.index, folder.xl, folder.listed, folder.towers
        unet_cfg, vae_cfg, te_cfgs, family = folder.unet, folder.vae, folder.text_encoders, folder.family
        vae_dtype = upcast_vae_dtype(xl, dt, vae_cfg)

        def load(part, stem, build, dtype=dt, rename=lambda state: state):
            path = weights_file(root / part, stem, variant)
            return load_module(build, rename(read_safetensors(path, dtype)), path, family, dev)

        unet = load("unet", "diffusion_pytorch_model", lambda: UNet(unet_cfg))
        vae = load("vae", "diffusion_pytorch_model", lambda: VAE(vae_cfg), vae_dtype)
        encoders = {t: load(t, "model", lambda c=cfg: CLIPTextModel(c), rename=text_encoder_state)
                    for t, cfg in te_cfgs.items()}
        tokenizers = {t: CLIPTokenizer.from_folder(root / t.replace("text_encoder", "tokenizer")) for t in towers}
        scheduler = read_config(root / "scheduler" / "scheduler_config.json", SchedulerConfig.from_diffusers)
        if prediction_type is not None:
            scheduler = dataclasses.replace(scheduler, prediction_type=PREDICTION_TYPES[prediction_type])
        name = Path(str(model)).name if Path(str(model)).exists() else str(model)
        pipe = cls._assemble(xl, unet, vae, encoders, tokenizers, scheduler, dev, dt, name,
                             force_zeros_for_empty_prompt=index.get("force_zeros_for_empty_prompt", True),
                             requires_aesthetics_score=index.get("requires_aesthetics_score", False))
        if safety_checker and "safety_checker" in listed:
            for part in ("safety_checker", "feature_extractor"):
                if not (root / part).is_dir():
                    raise LoadError(f"{root}: model_index.json lists a safety checker but the {part}/ folder is "
                                    "missing (load with --no-safety-checker to go without it)")
            pipe.safety_checker = Safety.from_folder(root, dev, dt, variant)
        return pipe

    @classmethod
    def from_single_file(cls, path: str | Path, device: str = "auto", dtype: str = "auto",
                         prediction_type: str | None = None) -> "StableDiffusion":
        """Load an original single-file checkpoint (`v1-5-pruned-emaonly.safetensors`, `sd_xl_base_1.0.safetensors`…).

        The family is detected from the keys and the configs inferred from the tensor shapes
        (`ldm.single_file`); the tokenizer is CLIP's BPE as open_clip ships it; the scheduler and the
        prediction type are the family's official ones (SD 2.x: v-prediction; pass `prediction_type="eps"`
        for a 512-px SD 2.x base file).
        """
        dev = resolve_device(device)
        dt = resolve_dtype(dtype, dev)
        path = Path(path)
        if path.suffix in PICKLE_SUFFIXES:
            refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise LoadError(f"{path}: ldm reads single-file checkpoints in the .safetensors format, and diffusers "
                            "folders")
        if prediction_type not in (None, *PREDICTION_TYPES):
            raise InputError(f"unknown prediction type {prediction_type!r} (use {' or '.join(PREDICTION_TYPES)})")
        tensors = read_safetensors(path)
        try:
            checkpoint = read_single_file(tensors, prediction_type)
        except LoadError as e:
            raise LoadError(f"{path}: {e}") from None
        family = checkpoint.family
        unet_cfg = UNetConfig.from_diffusers(checkpoint.configs["unet"])
        vae_cfg = VAEConfig.from_diffusers(checkpoint.configs["vae"])

        def load(component, build, dtype=dt):
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in checkpoint.states[component].items()}
            return load_module(build, state, path, family.label, dev)

        unet = load("unet", lambda: UNet(unet_cfg))
        vae = load("vae", lambda: VAE(vae_cfg), upcast_vae_dtype(family.xl, dt, vae_cfg))
        encoders, tokenizers = {}, {}
        vocab, merges = clip_bpe_vocab()
        for component, _, kind in TOWERS[family.key]:
            cfg = CLIPTextConfig.from_transformers(checkpoint.configs[component])
            encoders[component] = load(component, lambda c=cfg: CLIPTextModel(c))
            tokenizers[component] = CLIPTokenizer(vocab, merges, pad_token=EOS if kind == "clip" else "!")
        scheduler = SchedulerConfig.from_diffusers(checkpoint.scheduler)
        pipe = cls._assemble(family.xl, unet, vae, encoders, tokenizers, scheduler, dev, dt, path.stem,
                             force_zeros_for_empty_prompt=not family.refiner,
                             requires_aesthetics_score=family.refiner)
        pipe.model_file = path
        return pipe

    @classmethod
    def _assemble(cls, xl: bool, unet: UNet, vae: VAE, encoders: dict, tokenizers: dict, scheduler: SchedulerConfig,
                  device: torch.device, dtype: torch.dtype, name: str, force_zeros_for_empty_prompt: bool,
                  requires_aesthetics_score: bool) -> "StableDiffusion":
        if not xl:
            pipe = StableDiffusion(unet, vae, encoders["text_encoder"], tokenizers["text_encoder"], scheduler,
                                   device, dtype, name)
        else:
            pipe = StableDiffusionXL(unet, vae, encoders.get("text_encoder"), tokenizers.get("text_encoder"),
                                     scheduler, device, dtype, name, encoders["text_encoder_2"],
                                     tokenizers["text_encoder_2"], force_zeros_for_empty_prompt,
                                     requires_aesthetics_score)
        found, pipe.notes = folder_embeddings(pipe.tower_widths())
        pipe.embeddings = {e.name: e for e in found}
        return pipe

    # ------------------------------------------------------------------------------- generation

    # --------------------------------------------------------------------------------- prompts

    def text_towers(self, clip_skip: int = 1) -> list[tuple[str, CLIPTokenizer, CLIPTextModel, int, bool]]:
        """(component, tokenizer, encoder, hidden layer, final LayerNorm) of each text tower. SD 1.x/2.x read
        the last layer through the final LayerNorm; clip skip N reads layer -N instead (A1111's meaning; SD
        2.x folders already dropped OpenCLIP's last layer, so N counts from the penultimate there)."""
        return [self._tower("text_encoder", self.tokenizer, self.text_encoder, -clip_skip, True)]

    def _tower(self, name: str, tokenizer, encoder, layer: int, final_norm: bool):
        depth = encoder.config.num_hidden_layers
        if -layer > depth:
            raise InputError(f"clip skip {-layer if final_norm else -layer - 1} is more than the {depth} layers of "
                             f"{self.name}'s {name}")
        return name, tokenizer, encoder, layer, final_norm

    def load_lora(self, path: str | Path, weight: float = 1.0) -> LoadedLora:
        """Merge a LoRA/LyCORIS file (a path, or a name in weights/loras) into the UNet and text towers
        (`ldm.lora`): it applies to every later call, at no cost per step, until `unload_loras()`."""
        return merge_lora(self, find_lora(str(path)), weight)

    def unload_loras(self) -> None:
        """Restore every weight a LoRA touched, bit for bit."""
        unmerge_loras(self)

    def identity(self) -> dict:
        """The infotext's description of the weights: Model hash (single files), Model, Lora hashes."""
        return {"Model hash": sha256(self.model_file)[:10] if self.model_file else None, "Model": self.name,
                "Lora hashes": ", ".join(f"{lora.name}: {lora.hash}" for lora in self.loras) or None}

    def tower_widths(self) -> dict[str, int]:
        return {name: enc.config.hidden_size for name, _, enc, _, _ in self.text_towers()}

    def load_embedding(self, path: str | Path) -> Embedding:
        """Add a textual-inversion embedding (`ldm.embeddings`); its trigger word is the file's stem."""
        embedding = load_embedding(path, self.tower_widths())
        self.embeddings[embedding.name] = embedding
        return embedding

    def chunk_count(self, text: str, prompt_syntax: str = "a1111") -> int:
        """How many chunks of 75 tokens `text` takes (the prompts of one batch are padded to the most)."""
        name, tokenizer = self.text_towers()[0][:2]
        return len(prompt_chunks(tokenizer, text, prompt_syntax, "original", self._lookup(name, tokenizer))[0])

    def _lookup(self, tower: str, tokenizer: CLIPTokenizer) -> EmbeddingLookup:
        return EmbeddingLookup(tokenizer, {n: e.vectors[tower] for n, e in self.embeddings.items()})

    @torch.no_grad()
    def encode_text(self, groups: list[list[str]], prompt_syntax: str = "a1111", emphasis: str = "original",
                    clip_skip: int = 1, notes: list[str] | None = None,
                    used: set[str] | None = None) -> list[tuple[Tensor, Tensor]]:
        """Each group of texts (the prompts; the negatives) → (hidden (texts, 77·k, width), pooled (texts,
        width)), every text padded with empty chunks to the same number of chunks k (`ldm.prompts`). The
        towers' hidden states are concatenated along the width; the pooled embedding is the last tower's.
        `notes` receives what the plain syntax cut off; `used` the embeddings the texts name."""
        towers = self.text_towers(clip_skip)
        chunked = []  # [tower][group][text] → chunks
        for name, tokenizer, _, _, _ in towers:
            lookup = self._lookup(name, tokenizer)
            per_group = []
            for texts in groups:
                rows = []
                for text in texts:
                    chunks, dropped = prompt_chunks(tokenizer, text, prompt_syntax, emphasis, lookup)
                    if dropped and notes is not None and name == towers[0][0]:
                        notes.append(f"the prompt {text[:30]!r}… was cut at 77 tokens, as diffusers cuts it (plain "
                                     f"syntax; A1111's reads it all): dropped {dropped!r}")
                    rows.append(chunks)
                per_group.append(rows)
            chunked.append(per_group)
            if used is not None:
                used |= lookup.used
        k = max(len(chunks) for tower in chunked for rows in tower for chunks in rows)
        encoded = []
        for g in range(len(groups)):
            hidden, pooled = [], None
            for (_, tokenizer, encoder, layer, final_norm), tower in zip(towers, chunked, strict=True):
                rows = [chunks + [empty_chunk(tokenizer)] * (k - len(chunks)) for chunks in tower[g]]
                out = encode_chunks(encoder, rows, layer, final_norm, emphasis)
                hidden.append(out.hidden)
                pooled = out.pooled
            encoded.append((torch.cat(hidden, dim=-1), pooled))
        return encoded

    def conditioning(self, prompts: list[str], negatives: list[str] | None, num_images: int, guide: bool,
                     size: tuple[int, int], micro: dict, **text) -> tuple[dict, dict | None]:
        """The UNet's conditioning keyword arguments for the prompts and, with guidance, the negatives
        (None: no negative prompt given; SD encodes the empty prompt then, as diffusers does). `text`: the
        keyword arguments of `encode_text`."""
        if micro:
            raise InputError(f"{', '.join(micro)}: SDXL micro-conditioning, and {self.name} is not an SDXL model")
        groups = [prompts] + ([negatives or [""] * len(prompts)] if guide else [])
        encoded = [hidden.repeat_interleave(num_images, dim=0) for hidden, _ in self.encode_text(groups, **text)]
        return {"context": encoded[0]}, ({"context": encoded[1]} if guide else None)

    def __call__(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 loras: list[tuple[str, float]] | None = None, prompt_loras: bool = True, **options) -> Generation:
        """Generate `num_images` images per prompt.

        Text-to-image by default; image-to-image (SDEdit) with `image`; inpainting with `image` and
        `mask` (white = repaint). Defaults: the model's native size (the image's, rounded down to a
        multiple of 8, when there is one), its folder's sampler, 50 steps, guidance 7.5, strength 0.8
        (0.3 for SDXL, 1.0 with a mask), a random seed (returned in the result).

        SDXL only: `original_size`, `crop_coords`, `target_size` as (height, width) / (top, left) pairs,
        the refiner's `aesthetic_score` / `negative_aesthetic_score`. Base → refiner hand-off:
        `denoising_end=f` stops after the first fraction f of the schedule and returns σ-space
        `latents` (no images); `latents=…, denoising_start=f` finishes them (diffusers' rule for the cut).

        Prompts are read as AUTOMATIC1111 reads them (`ldm.prompts`): `(word:1.3)` emphasis, any length in
        chunks of 75 tokens, `BREAK`, textual-inversion trigger words (`load_embedding`, weights/embeddings);
        `prompt_syntax="plain"` reads them literally and truncates at 77 tokens as diffusers does. `emphasis`:
        "original" (A1111's default), "no-norm" or "none". `clip_skip` N > 1 conditions on the text tower's
        N-th layer from the end (A1111's meaning for SD 1.x).

        LoRA/LyCORIS adapters: those merged with `load_lora` apply to every call; `<lora:NAME:WEIGHT>` in a
        prompt (A1111's syntax; NAME a file in weights/loras) and `loras=[(NAME, WEIGHT), …]` are merged for this
        call only (the tags stay in the infotext's prompt and are left out of the text encoded;
        `prompt_loras=False` ignores them, as a refiner does that finishes a base's run).

        `callback(i, x)` sees the σ-space latents after step i and may return replacements;
        `progress(done, total)` is told (0, total) at the start and each finished step (the steps asked for:
        PNDM's doubled step counts once; `Generation.evaluations` counts UNet calls); `generator` replaces the one
        seeded from `seed`.
        Text-to-image also takes one seed per prompt or per image (`seed=[…]`): each prompt's (each image's)
        images then come out as they would from a call of their own with that seed, while the batch runs through
        the networks together, and each PNG records its own seed.
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        tagged: dict[str, float] = {}  # the prompts' tags, each LoRA once (a batch of prompts shares them)
        for text in prompts if prompt_loras else []:
            for name, args in extract_extra_networks(text)[1]:
                try:
                    weight = float(args[0]) if args else 1.0
                except ValueError:
                    raise InputError(f"<lora:{name}:{':'.join(args)}>: the weight must be a number") from None
                if tagged.setdefault(name, weight) != weight:
                    raise InputError(f"the prompts of one call ask for LoRA {name!r} at {tagged[name]} and {weight}")
        wanted = list(loras or []) + list(tagged.items())
        if not wanted:
            return self._generate(prompt, negative_prompt, **options)
        kept = [(lora.path, lora.weight) for lora in self.loras]
        try:
            for name, weight in wanted:  # names in the LoRA folder only: prompts and requests may not name paths
                merge_lora(self, find_lora(name, allow_paths=False), weight)
            return self._generate(prompt, negative_prompt, **options)
        finally:  # back to the LoRAs merged before the call, bit for bit
            unmerge_loras(self)
            for path, weight in kept:
                merge_lora(self, path, weight)

    @torch.no_grad()
    def _generate(self, prompt: str | list[str], negative_prompt: str | list[str] | None = None, *,
                 steps: int = 50, guidance: float = 7.5, guidance_rescale: float = 0.0,
                 seed: int | list[int] | None = None,
                 width: int | None = None, height: int | None = None, sampler: str | None = None,
                 karras: bool = False, num_images: int = 1, eta: float = 0.0, image: Image.Image | None = None,
                 mask: Image.Image | None = None, strength: float | None = None,
                 original_size: tuple[int, int] | None = None, crop_coords: tuple[int, int] | None = None,
                 target_size: tuple[int, int] | None = None, aesthetic_score: float | None = None,
                 negative_aesthetic_score: float | None = None, denoising_end: float | None = None,
                 denoising_start: float | None = None, latents: Tensor | None = None,
                 prompt_syntax: str = "a1111", emphasis: str = "original", clip_skip: int = 1,
                 generator: torch.Generator | list[torch.Generator] | None = None,
                 callback: Callable[[int, Tensor], Tensor | None] | None = None,
                 progress: Callable[[int, int], None] | None = None,
                 describe: dict | None = None) -> Generation:
        """Generate images (see `__call__`; `describe`: infotext keys that replace or extend its own)."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        negatives = None
        if negative_prompt is not None:
            negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt] * len(prompts)
            if len(negatives) != len(prompts):
                raise InputError(f"{len(negatives)} negative prompts for {len(prompts)} prompts")
        sampler = sampler or self.default_sampler
        if sampler is None:
            raise InputError(f"{self.name}'s scheduler ({self.scheduler.class_name}) is not one ldm implements; "
                             f"pick a sampler: {', '.join(SAMPLERS)}")
        seeds = seed if isinstance(seed, list) else None
        per_image = seeds is not None and len(seeds) == len(prompts) * num_images
        if seeds is not None:
            if len(seeds) != len(prompts) and not per_image or image is not None:
                raise InputError("a list of seeds is for text-to-image: one per prompt or one per image")
            for s in seeds[1:]:
                check_request(steps, width, height, guidance, num_images, s, sampler, eta)
            seed = seeds[0]
        check_request(steps, width, height, guidance, num_images, seed, sampler, eta, self.vae_scale, karras,
                      guidance_rescale, strength, denoising_start, denoising_end, self.scheduler.num_train_timesteps,
                      image is not None, mask is not None, clip_skip, prompt_syntax, emphasis)
        if self.inpainting and mask is None:
            raise InputError(f"{self.name} is an inpainting model (9-channel UNet): give it an image and a mask")
        if (latents is None) != (denoising_start is None) or (latents is not None and image is not None):
            raise InputError("denoising_start goes with latents (from a run with denoising_end), without an image")
        strength = (1.0 if mask is not None else self.default_strength) if strength is None else strength
        native = self.unet.config.sample_size * self.vae_scale
        if latents is not None:
            native_w, native_h = latents.shape[-1] * self.vae_scale, latents.shape[-2] * self.vae_scale
        else:
            native_w, native_h = fit_size(image, self.vae_scale) if image is not None else (native, native)
        width, height = width or native_w, height or native_h
        if latents is not None and latents.shape[:2] != (len(prompts) * num_images, self.vae.config.latent_channels):
            raise InputError(f"latents of shape {tuple(latents.shape)} do not fit {len(prompts) * num_images} images "
                             f"of {self.vae.config.latent_channels} latent channels")
        cut_or_pasted = denoising_start or denoising_end or (mask is not None and not self.inpainting)
        if SAMPLERS[sampler].two_calls_per_step and cut_or_pasted:
            raise InputError(f"{sampler}: diffusers cuts the schedule (refiner hand-off) or pastes the known region "
                             "(inpainting with a 4-channel model) between the two halves of its steps, which ldm "
                             "does not imitate; pick another sampler for this")
        seed = secrets.randbits(32) if seed is None else seed
        spec = SAMPLERS[sampler]
        karras = karras or (self.scheduler.use_karras_sigmas and spec.karras)
        schedule = spec.schedule(self.scheduler, steps, karras)
        T = self.scheduler.num_train_timesteps
        if image is not None:
            schedule = schedule.from_strength(strength)
        if denoising_start is not None:
            schedule = schedule.since(denoising_start, T)
        if denoising_end is not None:
            schedule = schedule.until(denoising_end, T)
        if generator is None and seeds is not None:  # one generator per prompt (for all its images) or per image
            generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
        generator = generator or torch.Generator("cpu").manual_seed(seed)
        batch = len(prompts) * num_images
        if isinstance(generator, list) and (batch % len(generator) or image is not None):
            raise InputError(f"a list of generators is for text-to-image: one per image ({batch}) or per prompt")

        micro = {k: v for k, v in (("original_size", original_size), ("crop_coords", crop_coords),
                                   ("target_size", target_size), ("aesthetic_score", aesthetic_score),
                                   ("negative_aesthetic_score", negative_aesthetic_score)) if v is not None}
        notes, used = [], set()
        cond, uncond = self.conditioning(prompts, negatives, num_images, guidance > 1, (height, width), micro,
                                         prompt_syntax=prompt_syntax, emphasis=emphasis, clip_skip=clip_skip,
                                         notes=notes, used=used)
        shape = (batch, self.vae.config.latent_channels, height // self.vae_scale, width // self.vae_scale)
        # progress counts the steps asked for: PNDM's doubled second step is one step (its σ comes twice)
        seen, done_at = set(), []
        for sigma in schedule.sigmas[:-1]:
            seen.add(sigma)
            done_at.append(len(seen))

        def step_end(i: int, x: Tensor) -> Tensor | None:
            if progress is not None:
                progress(done_at[i], done_at[-1])
            return None if callback is None else callback(i, x)

        if latents is not None:
            unet, x = self.unet, latents.to(self.device, torch.float32)
        else:
            unet, x, step_end = self.prepare(shape, schedule, generator, image, mask, strength, step_end)
        # diffusers' rule: guidance is on when the scale exceeds 1
        denoiser = Denoiser(guided(unet, cond, uncond, guidance, guidance_rescale), schedule,
                            self.scheduler.prediction_type, self.dtype)
        evaluations = 0

        def counted(x: Tensor, sigma: float) -> Tensor:
            nonlocal evaluations
            evaluations += 1
            return denoiser(x, sigma)

        if progress is not None:
            progress(0, done_at[-1])
        x = spec.sample(counted, x, schedule, step_end, eta=eta, generator=generator,
                        output=self.scheduler.prediction_type)
        # A1111's keys, in A1111's order
        params = {"Steps": steps, "Sampler": spec.label, "Schedule type": "Karras" if karras else None,
                  "CFG scale": guidance, "Seed": seed, "Size": f"{width}x{height}", "Model hash": None,
                  "Model": None, "Denoising strength": strength if image is not None else None,
                  "Clip skip": clip_skip if clip_skip > 1 else None,
                  "Eta": eta if "eta" in spec.options and eta else None,
                  "CFG rescale": guidance_rescale or None,
                  "Lora hashes": None,
                  "TI hashes": ", ".join(f"{n}: {self.embeddings[n].hash}" for n in sorted(used)) or None,
                  "Emphasis": EMPHASES[emphasis] if emphasis != "original" else None,
                  "Prompt syntax": prompt_syntax if prompt_syntax != "a1111" else None}
        params |= self.identity() | (describe or {})  # (the keys above hold A1111's order)
        if denoising_end is not None:
            return Generation([], seed, [], latents=x, notes=notes, params=params, evaluations=evaluations)
        images = self.decode(schedule.to_latents(x))
        nsfw: list[bool | None] = [None] * len(images)
        if self.safety_checker is not None:
            images, nsfw = self.safety_checker(images)
        texts = []
        for i in range(len(images)):
            extra = {"Batch size": len(images), "Batch pos": i} if len(images) > 1 else {}
            negative = negatives[i // num_images] if negatives else ""
            own_seed = {"Seed": seeds[i if per_image else i // num_images]} if seeds else {}
            texts.append(infotext(prompts[i // num_images], negative, params | own_seed | extra))
        return Generation(images, seed, texts, nsfw=nsfw, notes=notes, params=params, evaluations=evaluations)

    @property
    def inpainting(self) -> bool:
        """A UNet that takes mask and masked-image latents besides the noisy latents (9 channels)."""
        return self.unet.config.in_channels > self.vae.config.latent_channels

    def encode_image(self, image: Tensor, generator: torch.Generator) -> Tensor:
        """Scaled float32 latents of an image in [-1, 1]: a sample of the VAE posterior, noise from
        `generator`."""
        vae_dtype = next(self.vae.parameters()).dtype
        mean, logvar = self.vae.encode(image.to(self.device, vae_dtype))
        return (self.vae.sample(mean, logvar, generator) * self.vae.config.scaling_factor).float()

    def prepare(self, shape, schedule: Schedule, generator: torch.Generator, image: Image.Image | None,
                mask: Image.Image | None, strength: float, callback):
        """The UNet to call, the initial σ-space latents (float32) and the per-step callback, for each task.

        Random draws come in diffusers' order: text-to-image: noise. Image-to-image: the image's latent
        sample, then noise. Inpainting: the image's latent sample (4-channel UNet, or strength < 1),
        noise, then the masked image's latent sample.
        """
        batch, _, h, w = shape

        def noise() -> Tensor:
            return randn(shape, generator).to(self.device)

        if image is None:
            return self.unet, noise() * schedule.init_noise_sigma, callback
        pixels = image_to_tensor(image, w * self.vae_scale, h * self.vae_scale)
        if mask is None:  # image-to-image: the init latents noised to the first σ kept
            init = self.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
            return self.unet, init + noise() * schedule.sigmas[0], callback

        repaint = mask_to_tensor(mask, w * self.vae_scale, h * self.vae_scale)
        init = None
        if not self.inpainting or strength < 1:
            init = self.encode_image(pixels, generator).repeat(batch, 1, 1, 1)
        eps = noise()
        x = eps * schedule.init_noise_sigma if strength == 1 else init + eps * schedule.sigmas[0]
        latent_mask = F.interpolate(repaint, size=(h, w)).to(self.device)
        if self.inpainting:
            masked = self.encode_image(pixels * (repaint < 0.5), generator)
            return with_channels(self.unet, torch.cat([latent_mask, masked], dim=1)), x, callback

        # A 4-channel UNet. diffusers encodes the masked image here too (unused): draw what its latent
        # sample draws, so that later random draws (ancestral samplers) stay in step.
        torch.randn((1, *shape[1:]), generator=generator, dtype=torch.float32)
        sigmas = schedule.sigmas

        def paste_known(i: int, x: Tensor) -> Tensor:
            """After every step, paste the known region back noised to the new σ with the starting noise;
            after the last step, clean (scaled so that it is clean once `to_latents` has run)."""
            sigma = sigmas[i + 1]
            known = init * (1 + sigma**2) ** 0.5 if i + 2 == len(sigmas) else init + eps * sigma
            x = (1 - latent_mask) * known + latent_mask * x
            replaced = None if callback is None else callback(i, x)
            return x if replaced is None else replaced

        return self.unet, x, paste_known

    @torch.no_grad()
    def decode(self, latents: Tensor) -> list[Image.Image]:
        vae_dtype = next(self.vae.parameters()).dtype
        images = self.vae.decode(latents.to(vae_dtype) / self.vae.config.scaling_factor)
        if not torch.isfinite(images).all():
            raise LdmError(f"the VAE decode produced NaN/inf values ({vae_dtype} overflow): run again with "
                           "--dtype fp32, or bf16 where the device supports it")
        return to_pil(images)

    def to(self, device: torch.device | str) -> "StableDiffusion":
        """Move every network to `device` (to park an idle model on the CPU, say)."""
        for module in self.modules():
            module.to(device)
        if self.safety_checker is not None:
            self.safety_checker.to(device)
        self.device = torch.device(device)
        return self

    def modules(self) -> list[torch.nn.Module]:
        return [self.unet, self.vae, self.text_encoder]


class StableDiffusionXL(StableDiffusion):
    """SDXL base 1.0 and refiner 1.0: two text towers (the refiner has only OpenCLIP-bigG), penultimate
    hidden states, the pooled bigG embedding and size (or aesthetic-score) micro-conditioning."""

    default_strength = 0.3  # image-to-image, as StableDiffusionXLImg2ImgPipeline

    def __init__(self, unet: UNet, vae: VAE, text_encoder: CLIPTextModel | None, tokenizer: CLIPTokenizer | None,
                 scheduler: SchedulerConfig, device: torch.device, dtype: torch.dtype, name: str,
                 text_encoder_2: CLIPTextModel, tokenizer_2: CLIPTokenizer, force_zeros_for_empty_prompt: bool = True,
                 requires_aesthetics_score: bool = False):
        super().__init__(unet, vae, text_encoder, tokenizer, scheduler, device, dtype, name)
        self.text_encoder_2, self.tokenizer_2 = text_encoder_2, tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt
        self.requires_aesthetics_score = requires_aesthetics_score

    def modules(self) -> list[torch.nn.Module]:
        return [m for m in (self.unet, self.vae, self.text_encoder, self.text_encoder_2) if m is not None]

    def text_towers(self, clip_skip: int = 1) -> list[tuple[str, CLIPTokenizer, CLIPTextModel, int, bool]]:
        """Each tower's penultimate hidden state, without the final LayerNorm; clip skip N reads layer -(N+1)
        (diffusers' `clip_skip=N-1`). The pooled embedding is the last tower's (OpenCLIP-bigG)."""
        towers = (("text_encoder", self.tokenizer, self.text_encoder), ("text_encoder_2", self.tokenizer_2,
                                                                          self.text_encoder_2))
        return [self._tower(name, tok, enc, -1 - clip_skip, False) for name, tok, enc in towers if enc is not None]

    def conditioning(self, prompts: list[str], negatives: list[str] | None, num_images: int, guide: bool,
                     size: tuple[int, int], micro: dict, **text) -> tuple[dict, dict | None]:
        """context, text_embeds and time_ids. time_ids: original size, crop top-left, then the target size
        (base) or the aesthetic score (refiner); sizes as (height, width), defaulting to the output size."""
        unknown = {"aesthetic_score", "negative_aesthetic_score"} if not self.requires_aesthetics_score \
            else {"target_size"}
        if unknown & set(micro):
            kind = "refiner" if self.requires_aesthetics_score else "base"
            raise InputError(f"{', '.join(sorted(unknown & set(micro)))} does not apply to an SDXL {kind} model")
        original, crop = micro.get("original_size", size), micro.get("crop_coords", (0, 0))
        if self.requires_aesthetics_score:
            ids = [(*original, *crop, micro.get("aesthetic_score", 6.0)),
                   (*original, *crop, micro.get("negative_aesthetic_score", 2.5))]
        else:
            ids = [(*original, *crop, *micro.get("target_size", size))] * 2
        batch = len(prompts) * num_images

        def time_ids(values: tuple) -> Tensor:
            return torch.tensor([values] * batch, dtype=self.dtype, device=self.device)

        zeros = negatives is None and self.force_zeros_for_empty_prompt  # the folder's choice for no negative
        groups = [prompts] + ([negatives or [""] * len(prompts)] if guide and not zeros else [])
        embeds = [{"context": context.repeat_interleave(num_images, dim=0),
                   "text_embeds": pooled.repeat_interleave(num_images, dim=0)}
                  for context, pooled in self.encode_text(groups, **text)]
        cond = embeds[0] | {"time_ids": time_ids(ids[0])}
        if not guide:
            return cond, None
        uncond = {k: torch.zeros_like(v) for k, v in embeds[0].items()} if zeros else embeds[1]
        return cond, uncond | {"time_ids": time_ids(ids[1])}
