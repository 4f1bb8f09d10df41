"""Cross-attention maps (ldm.hooks.attention_maps): an observer on the attention dispatch point that leaves the images
bit-identical, records probabilities that sum to 1 over the context, and writes one overlay per prompt token."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import MODULE_TOL, max_rel_err
from PIL import Image

from ldm.hooks.attention_maps import AttentionMaps, prompt_tokens, save_attention_maps
from ldm.networks import attention
from ldm.pipelines.stable_diffusion import StableDiffusion

PROMPT = "a photograph of an astronaut riding a horse"

# (conftest.py) every comparison here is within this process: ldm and the references at one thread
pytestmark = pytest.mark.usefixtures("one_thread")
WIDTH, HEIGHT = 40, 64  # latent 5 wide, 8 high: not square (a swapped height and width shows), odd (levels round up)


@pytest.fixture(scope="module")
def sd1(sd1_folder):
    pipe = StableDiffusion.from_pretrained(sd1_folder, device="cpu")
    pipe.safety_checker = None  # it runs after the maps are made; leaving it out saves time
    return pipe


@pytest.fixture(scope="module")
def recorded(sd1):
    """A plain run, then the same run inside three recorders of the guided batch."""
    run = dict(steps=2, seed=1, width=WIDTH, height=HEIGHT, guidance=7.5)
    before = np.asarray(sd1(PROMPT, **run).images[0])
    recorders = {keep: AttentionMaps.for_pipeline(sd1, WIDTH, HEIGHT, guidance=7.5, keep=keep)
                 for keep in ("cond", "uncond", "all")}
    with recorders["cond"], recorders["uncond"], recorders["all"]:
        out = sd1(PROMPT, **run)
    return before, out.images[0], recorders, out.evaluations


def test_images_are_bit_identical_with_and_without_the_recorder(recorded):
    before, image = recorded[:2]
    assert not attention._observers  # the recorders removed themselves: later runs are plain runs again
    np.testing.assert_array_equal(np.asarray(image), before)


def test_maps_per_resolution(recorded):
    maps = recorded[2]["cond"]
    levels = maps.per_resolution()
    # SD 1.x: cross-attention at the three upper levels and in the middle block (1×1)
    assert list(levels) == [(8, 5), (4, 3), (2, 2), (1, 1)]
    for (h, w), m in levels.items():
        assert m.shape == (1, 77, h, w)
        assert torch.isfinite(m).all() and (m >= 0).all()
        torch.testing.assert_close(m.sum(dim=1), torch.ones(1, h, w), atol=1e-5, rtol=0)
    # per UNet evaluation: 2 + 3 transformers at each upper level (down, up), 1 in the middle block
    e = recorded[3]
    assert maps.counts == {(8, 5): 5 * e, (4, 3): 5 * e, (2, 2): 5 * e, (1, 1): e}
    heat = maps.heat_maps()
    assert heat.shape == (1, 77, 8, 5) and torch.isfinite(heat).all() and (heat >= 0).all()
    assert maps.heat_maps((32, 20)).shape == (1, 77, 32, 20)


def test_guided_batch_rows(recorded):
    cond, uncond, both = (recorded[2][k].per_resolution() for k in ("cond", "uncond", "all"))
    for level, m in both.items():
        assert m.shape[0] == 2  # [unconditional; conditional]
        torch.testing.assert_close(cond[level], m[1:], atol=1e-7, rtol=0)
        torch.testing.assert_close(uncond[level], m[:1], atol=1e-7, rtol=0)
    assert not torch.equal(cond[(8, 5)], uncond[(8, 5)])


def test_probabilities_equal_a_direct_softmax(sd1):
    """One cross-attention layer called on its own: softmax(q kᵀ/√d) from its to_q/to_k weights, head mean."""
    attn = sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn2
    x = torch.randn(2, 4 * 2, attn.to_q.in_features, generator=torch.Generator().manual_seed(0))
    context = torch.randn(2, 77, attn.to_k.in_features, generator=torch.Generator().manual_seed(1))
    with torch.no_grad(), AttentionMaps(4, 2, guided=True) as maps:
        attn(x, context)
        q = attn.to_q(x[1:]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)  # the conditional row
        k = attn.to_k(context[1:]).unflatten(-1, (attn.heads, -1)).transpose(1, 2)
    expected = (q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5).softmax(-1).mean(1)  # (1, 8, 77)
    got = maps.per_resolution()[(4, 2)]
    assert list(maps.per_resolution()) == [(4, 2)] and maps.counts[(4, 2)] == 1
    assert (got - expected.transpose(1, 2).reshape(1, 77, 4, 2)).abs().max() <= 1e-5


def test_self_attention_and_text_towers_are_not_recorded(sd1):
    with AttentionMaps(8, 8, guided=False) as maps:
        sd1.encode_text([[PROMPT]])  # CLIP: causal self-attention
        attn1 = sd1.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1
        with torch.no_grad():
            attn1(torch.randn(1, 64, attn1.to_q.in_features))
    assert not maps.sums


def test_sizes_whose_level_is_as_long_as_the_context_are_refused():
    with pytest.raises(ValueError, match="same shapes"):
        AttentionMaps(14, 22, guided=True)  # 14×22 → 7×11 = 77
    with pytest.raises(ValueError, match="keep"):
        AttentionMaps(8, 8, guided=False, keep="uncond")


def test_save_attention_maps(sd1, recorded, tmp_path):
    image, maps = recorded[1], recorded[2]["cond"]
    tokens = prompt_tokens(sd1, PROMPT)
    ids = sd1.tokenizer.tokenize(PROMPT)
    assert [t.position for t in tokens] == list(range(1, len(ids) + 1))
    assert [t.text for t in tokens] == [sd1.tokenizer.decode([i]) for i in ids]
    assert " ".join(t.text for t in tokens) == PROMPT  # whole words in CLIP's vocabulary
    paths = save_attention_maps(maps, image, tokens, tmp_path / "maps")
    entries = json.loads((tmp_path / "maps" / "tokens.json").read_text())
    assert [e["token"] for e in entries] == PROMPT.split()
    assert [e["file"] for e in entries] == [p.name for p in paths] == \
        [f"{i:02d}-{word}.png" for i, word in enumerate(PROMPT.split())]
    assert sorted(p.name for p in (tmp_path / "maps").glob("*.png")) == sorted(p.name for p in paths)
    for p in paths:
        with Image.open(p) as png:
            assert png.size == image.size and png.mode == "RGB"
    overlays = [np.asarray(Image.open(p)) for p in paths]
    assert any(not np.array_equal(overlays[0], o) for o in overlays[1:])


def test_prompt_tokens_follow_the_prompt_syntax(sd1):
    tokens = prompt_tokens(sd1, "a (photo:1.3) of [an astronaut] BREAK riding <lora:x:0.5>a horse")
    assert [(t.position, t.text) for t in tokens] == [
        (1, "a"), (2, "photo"), (3, "of"), (4, "an"), (5, "astronaut"), (78, "riding"), (79, "a"), (80, "horse")]
    plain = prompt_tokens(sd1, "a (photo:1.3) horse", prompt_syntax="plain")
    assert [t.text for t in plain] == ["a", "(", "photo", ":", "1", ".", "3", ")", "horse"]
    long = prompt_tokens(sd1, " ".join(["horse"] * 80))
    assert [t.position for t in long] == list(range(1, 76)) + list(range(78, 83))
    assert len(prompt_tokens(sd1, " ".join(["horse"] * 80), prompt_syntax="plain")) == 75


def test_sdxl_two_chunk_prompt(sdxl_folder, tmp_path):
    pipe = StableDiffusion.from_pretrained(sdxl_folder, device="cpu")
    prompt = ", ".join(["an astronaut riding a horse"] * 16)  # past 75 tokens: two chunks, 154 context tokens
    run = dict(steps=1, seed=3, width=64, height=64, guidance=5.0)
    before = np.asarray(pipe(prompt, **run).images[0])
    with AttentionMaps.for_pipeline(pipe, 64, 64, guidance=5.0) as maps:
        image = pipe(prompt, **run).images[0]
    np.testing.assert_array_equal(np.asarray(image), before)
    levels = maps.per_resolution()
    assert list(levels) == [(4, 4), (2, 2)]  # SDXL: no attention at the top level
    for (h, w), m in levels.items():
        assert m.shape == (1, 154, h, w)
        torch.testing.assert_close(m.sum(dim=1), torch.ones(1, h, w), atol=1e-5, rtol=0)
    tokens = prompt_tokens(pipe, prompt)
    assert tokens[-1].position > 77 and {t.text for t in tokens} == {"an", "astronaut", "riding", "a", "horse", ","}
    paths = save_attention_maps(maps, image, tokens, tmp_path)
    assert len(paths) == len(tokens) and paths[5].name == "05.png"  # the comma: no safe characters


# DAAM's aggregation written out here from its description (README "Attention maps"; Tang et al. 2022): each
# resolution's mean map upsampled bicubically (and clamped at 0: bicubic undershoots, DAAM's `clamp_(min=0)`) to one
# size, then averaged with every cross-attention layer weighing the same. SD 1.x has 2 transformers in the down
# block and 3 in the up block at each of the three upper levels, and 1 in the middle block: the layers per level.
SD1_LAYERS = {(8, 5): 5, (4, 3): 5, (2, 2): 5, (1, 1): 1}


def daam_aggregate(levels: dict, size: tuple[int, int], keep=None) -> torch.Tensor:
    total, layers = 0, 0
    for level, mean in levels.items():
        if keep is None or level in keep:
            up = F.interpolate(mean.double(), size=size, mode="bicubic", align_corners=False).clamp(min=0)
            total, layers = total + SD1_LAYERS[level] * up, layers + SD1_LAYERS[level]
    return total / layers


def test_heat_maps_are_daams_aggregate_of_the_per_resolution_maps(recorded):
    """heat_maps() at the latent size and at another size, and with `resolutions=`, against the aggregate computed
    here from per_resolution() by DAAM's rule (layers weighing the same: the 1×1 middle block counts 1/16)."""
    maps = recorded[2]["cond"]
    levels = maps.per_resolution()
    for size, keep in (((8, 5), None), ((32, 20), None), ((8, 5), {(8, 5), (4, 3)}), ((16, 10), {(2, 2), (1, 1)})):
        got = maps.heat_maps(size) if keep is None else maps.heat_maps(size, resolutions=keep)
        expected = daam_aggregate(levels, size, keep)
        assert got.shape == expected.shape == (1, 77) + size
        assert max_rel_err(got, expected) <= MODULE_TOL, (size, keep)
    assert maps.heat_maps().shape == (1, 77, 8, 5)  # the default size is the latent size
    # the rule is not degenerate here: each resolution weighing the same, or one level alone, gives another map
    even = sum(F.interpolate(m, size=(8, 5), mode="bicubic").clamp(min=0) for m in levels.values()) / len(levels)
    assert max_rel_err(maps.heat_maps(), even) > 1e-3
    assert max_rel_err(maps.heat_maps(), levels[(8, 5)]) > 1e-3


def jet_reference(x: np.ndarray) -> np.ndarray:
    """MATLAB's 'jet' from its control points (dark blue at 0, blue at 1/8, cyan at 3/8, yellow at 5/8, red at
    7/8, dark red at 1), linear between them: (…,) in [0, 1] → (…, 3) RGB in [0, 1]."""
    red = np.interp(x, [0, 3 / 8, 5 / 8, 7 / 8, 1], [0, 0, 1, 1, 0.5])
    green = np.interp(x, [0, 1 / 8, 3 / 8, 5 / 8, 7 / 8, 1], [0, 0, 1, 1, 0, 0])
    blue = np.interp(x, [0, 1 / 8, 3 / 8, 5 / 8, 1], [0.5, 1, 1, 0, 0])
    return np.stack([red, green, blue], axis=-1)


def test_an_overlays_pixels_are_the_scaled_heat_map_in_jet_over_the_image(sd1, recorded, tmp_path):
    """One written PNG against the overlay computed here: the token's DAAM heat map (the aggregate above)
    upsampled bicubically to the image's size, scaled to [0, 1] by its own minimum and maximum, coloured with jet
    and laid over the image with that value as the opacity (image · (1 − a) + jet(a) · a, DAAM's overlay)."""
    image, maps = recorded[1], recorded[2]["cond"]
    tokens = prompt_tokens(sd1, PROMPT)
    paths = save_attention_maps(maps, image, tokens, tmp_path)
    heat = daam_aggregate(maps.per_resolution(), (8, 5))[0]
    rgb = np.asarray(image.convert("RGB"), dtype=np.float64) / 255
    for index in (4, 6):  # "astronaut", "a"
        token = tokens[index]
        up = F.interpolate(heat[token.position][None, None], size=(HEIGHT, WIDTH), mode="bicubic")[0, 0]
        up = up.clamp(min=0).numpy()
        a = (up - up.min()) / (up.max() - up.min())
        assert a.min() == 0 and a.max() == 1
        expected = np.round(255 * (rgb * (1 - a[..., None]) + jet_reference(a) * a[..., None]))
        got = np.asarray(Image.open(paths[index])).astype(np.float64)
        assert got.shape == expected.shape == (HEIGHT, WIDTH, 3)
        assert np.abs(got - expected).max() <= 1, (token, np.abs(got - expected).max())
        # the hottest pixel is dark red over nothing of the image; the coldest is the image itself
        hot, cold = np.unravel_index(a.argmax(), a.shape), np.unravel_index(a.argmin(), a.shape)
        assert np.abs(got[hot] - [128, 0, 0]).max() <= 1 and np.abs(got[cold] - 255 * rgb[cold]).max() <= 1
