"""`ldm.networks.attention`: causal attention (the CLIP text towers) reaches SDPA as `is_causal=True` on the
reference path — the form PyTorch's flash kernel takes, where an additive mask rules it out — with the numbers of the
additive mask it stands for; backends and observers still receive that mask."""

import pytest
import torch

from ldm.networks import attention as dispatch
from ldm.networks.attention import add_attention_observer, attention, remove_attention_observer

HEADS, TOKENS, WIDTH = 4, 77, 32


@pytest.fixture
def qkv():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(2, TOKENS, WIDTH, generator=g) for _ in range(3)]


def reference(q, k, v):
    """Causal multi-head attention written out: softmax(q·kᵀ/√d + M)·v, M = −inf above the diagonal."""
    q, k, v = (t.unflatten(-1, (HEADS, -1)).transpose(1, 2) for t in (q, k, v))
    scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5
    scores = scores + torch.full((TOKENS, TOKENS), float("-inf")).triu(1)
    return (scores.softmax(-1) @ v).transpose(1, 2).flatten(2)


def test_causal_attention_equals_the_additive_mask(qkv):
    assert (attention(*qkv, HEADS, causal=True) - reference(*qkv)).abs().max() < 1e-6


def test_the_reference_path_asks_sdpa_for_its_causal_kernel(qkv, monkeypatch):
    calls = []
    real = dispatch.F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append((kwargs.get("is_causal", False), kwargs.get("attn_mask")))
        return real(*args, **kwargs)

    monkeypatch.setattr(dispatch.F, "scaled_dot_product_attention", spy)
    attention(*qkv, HEADS, causal=True)
    assert calls == [(True, None)]


def test_observers_and_backends_still_receive_the_additive_mask(qkv):
    seen = []

    def observe(q, k, v, mask):
        seen.append(mask)

    add_attention_observer(observe)
    try:
        out = attention(*qkv, HEADS, causal=True)
    finally:
        remove_attention_observer(observe)
    assert len(seen) == 1 and torch.equal(seen[0], torch.full((TOKENS, TOKENS), float("-inf")).triu(1))
    assert (out - reference(*qkv)).abs().max() < 1e-6
