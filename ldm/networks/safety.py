"""The SD 1.x safety checker (diffusers' `StableDiffusionSafetyChecker`); `ldm.loading.components.load_safety`
reads it from the official folders.

`safety_checker/` holds a CLIP ViT-L/14 vision tower, a projection to CLIP's joint space and 17 concept
and 3 "special care" embeddings with a threshold each; `feature_extractor/preprocessor_config.json` says
how an image becomes the tower's input. An image is flagged when its cosine similarity to a concept
exceeds that concept's threshold (rounded to 3 decimals, as the reference does); a special-care hit
first lowers every later threshold by 0.01. Flagged images are replaced by black ones.
"""

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from ldm.errors import ConfigError
from ldm.networks.clip import CLIPVisionConfig, CLIPVisionModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BICUBIC = 3  # PIL's resample code, the only one the official feature extractor uses


def _square(value, name: str) -> tuple[int, int]:
    """transformers writes sizes as an int, {"shortest_edge": n} or {"height": h, "width": w}."""
    if isinstance(value, int):
        return value, value
    if isinstance(value, dict) and "height" in value and "width" in value:
        return value["height"], value["width"]
    if isinstance(value, dict) and "shortest_edge" in value:
        return value["shortest_edge"], value["shortest_edge"]
    raise ConfigError(f"feature extractor config: {name}={value!r} is not a size")


@dataclass(frozen=True)
class FeatureExtractorConfig:
    """`feature_extractor/preprocessor_config.json` (transformers' CLIPImageProcessor)."""

    shortest_edge: int = 224
    crop_size: tuple[int, int] = (224, 224)
    do_resize: bool = True
    do_center_crop: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    @classmethod
    def from_transformers(cls, cfg: dict) -> "FeatureExtractorConfig":
        if cfg.get("resample", BICUBIC) != BICUBIC:
            raise ConfigError(f"feature extractor config: resample={cfg['resample']} is not supported (bicubic only)")
        size = cfg.get("size", 224)
        if isinstance(size, dict) and "shortest_edge" not in size:
            raise ConfigError(f"feature extractor config: size={size!r} is not supported (shortest_edge only)")
        fields = {k: cfg[k] for k in ("do_resize", "do_center_crop", "do_rescale", "rescale_factor", "do_normalize")
                  if k in cfg}
        return cls(shortest_edge=_square(size, "size")[0], crop_size=_square(cfg.get("crop_size", 224), "crop_size"),
                   image_mean=tuple(cfg.get("image_mean", CLIP_MEAN)), image_std=tuple(cfg.get("image_std", CLIP_STD)),
                   **fields)


def preprocess(images: list[Image.Image], cfg: FeatureExtractorConfig) -> Tensor:
    """What CLIPImageProcessor (transformers 5, torchvision backend) computes: bicubic antialiased resize
    of the uint8 image so the short side is `shortest_edge`, center crop, then the fused rescale+normalize
    (x - 255·mean) / (255·std)."""
    out = []
    for image in images:
        x = torch.from_numpy(np.array(image.convert("RGB"))).permute(2, 0, 1)[None]  # uint8 (1, 3, H, W)
        if cfg.do_resize:
            h, w = x.shape[-2:]
            short, long = (w, h) if w <= h else (h, w)
            new_short, new_long = cfg.shortest_edge, int(cfg.shortest_edge * long / short)
            size = (new_long, new_short) if w <= h else (new_short, new_long)
            x = F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False)
        if cfg.do_center_crop:
            ch, cw = cfg.crop_size
            h, w = x.shape[-2:]
            if ch > h or cw > w:  # pad with zeros, as torchvision does, when the crop is larger
                x = F.pad(x, [(cw - w) // 2 if cw > w else 0, (cw - w + 1) // 2 if cw > w else 0,
                              (ch - h) // 2 if ch > h else 0, (ch - h + 1) // 2 if ch > h else 0])
                h, w = x.shape[-2:]
            top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
            x = x[..., top:top + ch, left:left + cw]
        x = x.float()
        scale = 1 / cfg.rescale_factor if cfg.do_rescale else 1.0
        if cfg.do_normalize:
            mean = torch.tensor(cfg.image_mean) * scale
            std = torch.tensor(cfg.image_std) * scale
            x = (x - mean[:, None, None]) / std[:, None, None]
        elif cfg.do_rescale:
            x = x * cfg.rescale_factor
        out.append(x)
    return torch.cat(out)


@dataclass(frozen=True)
class SafetyCheckerConfig:
    vision: CLIPVisionConfig
    projection_dim: int = 768

    @classmethod
    def from_transformers(cls, cfg: dict) -> "SafetyCheckerConfig":
        arch = (cfg.get("architectures") or ["StableDiffusionSafetyChecker"])[0]
        if arch != "StableDiffusionSafetyChecker":
            raise ConfigError(f"safety checker config: architecture {arch!r} is not StableDiffusionSafetyChecker")
        # transformers-4 configs carry both the full `vision_config` and the overrides in `vision_config_dict`,
        # which win (transformers' rule)
        vision = dict(cfg.get("vision_config") or {}) | dict(cfg.get("vision_config_dict") or {})
        return cls(CLIPVisionConfig.from_transformers(vision), cfg.get("projection_dim", 512))


@dataclass
class SafetyResult:
    nsfw: bool
    concept_scores: list[float] = field(default_factory=list)  # rounded cos − threshold (+ adjustment)
    special_scores: list[float] = field(default_factory=list)


class SafetyChecker(nn.Module):
    """`checker(pixels)` → projected image embeddings; `checker.check(pixels)` → one `SafetyResult` per image."""

    def __init__(self, cfg: SafetyCheckerConfig):
        super().__init__()
        self.config = cfg
        self.vision_model = CLIPVisionModel(cfg.vision)
        self.visual_projection = nn.Linear(cfg.vision.hidden_size, cfg.projection_dim, bias=False)
        self.concept_embeds = nn.Parameter(torch.empty(17, cfg.projection_dim))
        self.special_care_embeds = nn.Parameter(torch.empty(3, cfg.projection_dim))
        self.concept_embeds_weights = nn.Parameter(torch.empty(17))  # the thresholds
        self.special_care_embeds_weights = nn.Parameter(torch.empty(3))

    def forward(self, pixels: Tensor) -> Tensor:
        return self.visual_projection(self.vision_model(pixels))

    @torch.no_grad()
    def check(self, pixels: Tensor) -> list[SafetyResult]:
        embeds = F.normalize(self(pixels))

        def cosine(concepts: Tensor) -> np.ndarray:
            return (embeds @ F.normalize(concepts).T).float().cpu().numpy()

        special, concepts = cosine(self.special_care_embeds), cosine(self.concept_embeds)
        special_thresholds = self.special_care_embeds_weights.float().cpu().tolist()
        concept_thresholds = self.concept_embeds_weights.float().cpu().tolist()
        results = []
        for i in range(len(embeds)):
            adjustment, result = 0.0, SafetyResult(False)
            for score, threshold in zip(special[i], special_thresholds, strict=True):
                result.special_scores.append(round(score - threshold + adjustment, 3))
                if result.special_scores[-1] > 0:
                    adjustment = 0.01  # a special-care concept makes the rest stricter
            for score, threshold in zip(concepts[i], concept_thresholds, strict=True):
                result.concept_scores.append(round(score - threshold + adjustment, 3))
            result.nsfw = any(s > 0 for s in result.concept_scores)
            results.append(result)
        return results


def checker_state(state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Official transformers-4 names (`vision_model.vision_model.…`) as they are; transformers-5 saves
    (`vision_model.embeddings…`) renamed; the `position_ids` buffer dropped (the model needs none)."""
    out = {}
    for key, value in state.items():
        if key.endswith("position_ids"):
            continue
        if key.startswith("vision_model.") and not key.startswith("vision_model.vision_model."):
            key = "vision_model." + key
        out[key] = value
    return out


class Safety:
    """The checker with its preprocessing: `safety(images)` → (images, flags), flagged images made black."""

    def __init__(self, checker: SafetyChecker, features: FeatureExtractorConfig):
        self.checker, self.features = checker, features

    @torch.no_grad()
    def __call__(self, images: list[Image.Image]) -> tuple[list[Image.Image], list[bool]]:
        param = self.checker.visual_projection.weight
        pixels = preprocess(images, self.features).to(param.device, param.dtype)
        flags = [r.nsfw for r in self.checker.check(pixels)]
        return [Image.new("RGB", im.size) if bad else im for im, bad in zip(images, flags, strict=True)], flags

    def to(self, device) -> "Safety":
        self.checker.to(device)
        return self
