"""Images in and out: tensors ↔ PIL, and PNGs carrying AUTOMATIC1111's `parameters` text chunk."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin
from torch import Tensor


def to_pil(images: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] → 8-bit RGB images, rounding as diffusers does: round((x/2+0.5)·255)."""
    x = (images.float() / 2 + 0.5).clamp(0, 1)
    x = (x.cpu().permute(0, 2, 3, 1) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(np.ascontiguousarray(a)) for a in x]


def infotext(prompt: str, negative_prompt: str, params: dict) -> str:
    """AUTOMATIC1111's generation-parameters text: prompt, negative prompt, then `Key: value, …`."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{k}: {v}" for k, v in params.items() if v is not None))
    return "\n".join(lines)


def save_png(image: Image.Image, path: str | Path, parameters: str) -> None:
    info = PngImagePlugin.PngInfo()
    info.add_text("parameters", parameters)
    image.save(path, format="PNG", pnginfo=info)


def numbered_paths(path: str | Path, n: int) -> list[Path]:
    """`name.png`, `name-1.png`, `name-2.png`, … for n images."""
    path = Path(path)
    return [path] + [path.with_name(f"{path.stem}-{i}{path.suffix}") for i in range(1, n)]
