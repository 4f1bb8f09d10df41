"""Cross-attention maps per text token: where in the image each word of the prompt was looked at.

DAAM (Tang et al. 2022, "What the DAAM: Interpreting Stable Diffusion Using Cross Attention"; castorini/daam
`daam/trace.py` and `daam/heatmap.py`): the UNet's cross-attention probabilities softmax(q·kᵀ/√d) of every
layer and step, one map per text token at each layer's resolution, averaged over the heads; each
resolution's map upsampled (bicubic) to one size and averaged with every layer weighing the same; each
token's map scaled to [0, 1] for display.

    with AttentionMaps.for_pipeline(pipe, width=512, height=512, guidance=7.5) as maps:
        image = pipe(prompt, width=512, height=512, guidance=7.5).images[0]
    save_attention_maps(maps, image, prompt_tokens(pipe, prompt), Path("maps"))

The recorder is an observer of `ldm.networks.attention.attention` (the one dispatch point), so the networks do not
know about it and the images come out bit-identical with and without it. It picks the UNet's
cross-attention calls by their shapes (see `ldm.networks.attention`): no mask, h·w latent pixels attending to the
77·k tokens of the text context (all of them: the start token, the words, the end and padding tokens, so
that each pixel's probabilities sum to 1).
"""

import json
import re
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from ldm.networks.attention import add_attention_observer, remove_attention_observer
from ldm.pipelines.plan import DEFAULT_GUIDANCE
from ldm.pipelines.prompts import EmbeddingLookup, prompt_chunks

CHUNK = 77  # context tokens per chunk: start token, 75 tokens, end token
KEEP = ("cond", "uncond", "all")


class AttentionMaps:
    """Records the UNet's cross-attention probabilities while used as a context manager.

    `height` × `width` is the latent size (the image's divided by the VAE's factor, 8); the UNet's levels
    halve it (rounding up) down to 1×1. `guided`: the UNet's batch is the classifier-free-guidance layout
    [unconditional; conditional] (`ldm.sampling.denoisers.guided`, used when guidance > 1) rather than the
    conditional rows alone; `keep` says which rows to record: "cond" (the prompts, DAAM's choice), "uncond"
    (the negative prompts) or "all". Maps accumulate over every step and every call made inside the block,
    on the device of the UNet, in float32.
    """

    def __init__(self, height: int, width: int, *, guided: bool, keep: str = "cond"):
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {', '.join(KEEP)}, got {keep!r}")
        if keep == "uncond" and not guided:
            raise ValueError("keep='uncond' needs the guided layout: without guidance there are no unconditional rows")
        self.guided, self.keep = guided, keep
        self.levels: dict[int, tuple[int, int]] = {}  # h·w → (h, w)
        h, w = height, width
        while True:
            if h * w % CHUNK == 0:
                raise ValueError(f"attention maps: the UNet level of {h}×{w} latent pixels is as long as a text "
                                 f"context of 77·k tokens, so its self- and cross-attention have the same shapes; "
                                 f"pick another size")
            self.levels[h * w] = (h, w)
            if h == w == 1:
                break
            h, w = -(-h // 2), -(-w // 2)
        self.sums: dict[tuple[int, int], Tensor] = {}  # (h, w) → (batch, h·w, tokens), summed over calls
        self.counts: dict[tuple[int, int], int] = {}  # (h, w) → calls (layers × steps)

    @classmethod
    def for_pipeline(cls, pipe, width: int | None = None, height: int | None = None, guidance: float | None = None,
                     keep: str = "cond") -> "AttentionMaps":
        """The recorder for `pipe(…, width=width, height=height, guidance=guidance)` (None: the model's defaults,
        `pipe.defaults` or its native size and 7.5); guidance is on when it exceeds 1 and the UNet does not take it
        as an input (an LCM UNet), as the pipelines decide."""
        card = pipe.defaults
        width, height = width or card.get("width", pipe.native_size), height or card.get("height", pipe.native_size)
        guidance = card.get("guidance", DEFAULT_GUIDANCE) if guidance is None else guidance
        guided = guidance > 1 and not pipe.embeds_guidance
        return cls(height // pipe.vae_scale, width // pipe.vae_scale, guided=guided, keep=keep)

    def __enter__(self) -> "AttentionMaps":
        add_attention_observer(self)
        return self

    def __exit__(self, *exc) -> None:
        remove_attention_observer(self)

    def clear(self) -> None:
        self.sums.clear()
        self.counts.clear()

    @torch.no_grad()
    def __call__(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> None:
        """The observer: q, k (batch, heads, tokens, head_dim) as the attention backend receives them."""
        n, m = q.shape[-2], k.shape[-2]
        if mask is not None or n == m or m % CHUNK or n not in self.levels:
            return  # not the UNet's cross-attention
        if self.guided and self.keep != "all":
            if q.shape[0] % 2:
                raise RuntimeError(f"attention maps: a guided UNet batch has [unconditional; conditional] rows, "
                                   f"got an odd batch of {q.shape[0]}; is guidance really on?")
            half = q.shape[0] // 2
            rows = slice(half, None) if self.keep == "cond" else slice(None, half)
            q, k = q[rows], k[rows]
        scores = q.float() @ k.float().transpose(-1, -2) * q.shape[-1] ** -0.5
        probs = scores.softmax(dim=-1).mean(dim=1)  # (batch, h·w, tokens), averaged over the heads
        level = self.levels[n]
        if level in self.sums:
            if self.sums[level].shape != probs.shape:
                raise RuntimeError(f"attention maps: {tuple(probs.shape)} after {tuple(self.sums[level].shape)} at "
                                   f"{level}; a recorder holds one batch and one prompt length (clear() it)")
            self.sums[level] += probs
            self.counts[level] += 1
        else:
            self.sums[level], self.counts[level] = probs, 1

    def per_resolution(self) -> dict[tuple[int, int], Tensor]:
        """{(h, w): (batch, tokens, h, w)} the mean over the layers and steps at that resolution (on the CPU)."""
        out = {}
        for (h, w), total in sorted(self.sums.items(), reverse=True):
            mean = total / self.counts[(h, w)]
            out[(h, w)] = mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], h, w).cpu()
        return out

    def heat_maps(self, size: tuple[int, int] | None = None,
                  resolutions: set[tuple[int, int]] | None = None) -> Tensor:
        """(batch, tokens, H, W): DAAM's aggregate at `size` (default: the latent size). Each resolution's
        maps are upsampled bicubically and clamped at 0 (bicubic overshoots), then averaged with each layer's
        map weighing the same. `resolutions` keeps only those (h, w) (DAAM leaves out SD's 8×8 maps)."""
        size = size or self.levels[max(self.levels)]
        total, count = None, 0
        for level, mean in self.per_resolution().items():
            if resolutions is not None and level not in resolutions:
                continue
            up = F.interpolate(mean, size=size, mode="bicubic", align_corners=False).clamp_(min=0)
            total = up * self.counts[level] if total is None else total + up * self.counts[level]
            count += self.counts[level]
        if total is None:
            raise RuntimeError("no cross-attention was recorded: run the pipeline inside `with maps:` (and "
                               "without torch.compile)")
        return total / count


# ------------------------------------------------------------------------------------- the prompt's tokens


class PromptToken(NamedTuple):
    position: int  # in the UNet's text context: chunk·77 + offset (the start token at offset 0)
    text: str


def prompt_tokens(pipe, prompt: str, prompt_syntax: str = "a1111", emphasis: str = "original") -> list[PromptToken]:
    """The prompt's tokens (no start, end or padding tokens) with their positions in the text context, read as
    the pipeline reads the prompt (`ldm.pipelines.prompts.prompt_chunks`: emphasis brackets, BREAK, <lora:…> tags and
    what the plain syntax drops are not tokens). A textual-inversion embedding's slots are named after it."""
    name, tokenizer = pipe.text_towers()[0][:2]
    vectors = {n: e.vectors[name] for n, e in getattr(pipe, "embeddings", {}).items()}
    names = {id(v): n for n, v in vectors.items()}
    chunks, _ = prompt_chunks(tokenizer, prompt, prompt_syntax, emphasis, EmbeddingLookup(tokenizer, vectors))
    tokens = []
    for c, chunk in enumerate(chunks):
        embedded = {}
        for first, vecs in chunk.fixes:
            for j in range(len(vecs)):
                label = names.get(id(vecs), "embedding")
                embedded[first + j] = label if len(vecs) == 1 else f"{label}#{j}"
        for offset in range(1, len(chunk.ids)):
            if offset in embedded:
                tokens.append(PromptToken(c * CHUNK + offset, embedded[offset]))
            elif chunk.ids[offset] == tokenizer.eos_id:  # the first end token closes the words
                break
            else:
                tokens.append(PromptToken(c * CHUNK + offset, tokenizer.decode([chunk.ids[offset]])))
    return tokens


# ------------------------------------------------------------------------------------------------ the writer


def normalized(maps: Tensor) -> Tensor:
    """Each map (…, H, W) scaled to [0, 1] by its own minimum and maximum, as DAAM shows them."""
    lo = maps.amin(dim=(-2, -1), keepdim=True)
    hi = maps.amax(dim=(-2, -1), keepdim=True)
    return (maps - lo) / (hi - lo + 1e-8)


def jet(x: np.ndarray) -> np.ndarray:
    """The 'jet' colormap (blue → cyan → yellow → red) of values in [0, 1] → (…, 3) RGB in [0, 1]."""
    return np.clip(1.5 - np.abs(4 * x[..., None] - np.array([3.0, 2.0, 1.0])), 0, 1)


def safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "", text)


def save_attention_maps(maps: AttentionMaps, image: Image.Image, tokens: list[PromptToken], folder: Path,
                        row: int = 0) -> list[Path]:
    """One PNG per token (`03-astronaut.png`: its index among `tokens`, its text made safe for file names):
    the heat map of batch row `row` upsampled to the image's size, scaled to [0, 1] and laid over the image
    in the jet colormap (the image shows through where the map is cold, DAAM's overlay); and `tokens.json`,
    a list of {index, position, token, file}. Returns the PNGs' paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    heat = maps.heat_maps()[row]
    if any(t.position >= heat.shape[0] for t in tokens):
        raise ValueError(f"token positions {[t.position for t in tokens]} past the context's {heat.shape[0]} tokens")
    width, height = image.size
    picked = heat[[t.position for t in tokens]][None]
    picked = F.interpolate(picked, size=(height, width), mode="bicubic", align_corners=False).clamp_(min=0)[0]
    alpha = normalized(picked).numpy()[..., None]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32) / 255
    digits = max(2, len(str(len(tokens) - 1)))
    paths, entries = [], []
    for i, (token, a) in enumerate(zip(tokens, alpha, strict=True)):
        stem = safe_name(token.text)
        file = f"{i:0{digits}d}-{stem}.png" if stem else f"{i:0{digits}d}.png"
        overlay = rgb * (1 - a) + jet(a[..., 0]) * a
        Image.fromarray((overlay * 255).round().astype(np.uint8)).save(folder / file)
        paths.append(folder / file)
        entries.append({"index": i, "position": token.position, "token": token.text, "file": file})
    (folder / "tokens.json").write_text(json.dumps(entries, indent=1, ensure_ascii=False) + "\n")
    return paths
