"""kernels/winograd.py: Winograd F(4×4, 3×3) convolution against the float64 direct convolution, and
`ldm.speed.accelerate.use_winograd`, which converts a network's 3×3 convolutions to it."""

import pytest
import torch
import torch.nn.functional as F
from conftest import max_rel_err
from torch import nn

from ldm.speed.accelerate import WinogradConv2d, use_winograd
from ldm_kernels import winograd


def reference(x, weight, bias):
    return F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), padding=1)


@pytest.mark.parametrize("n, c, k, h, w", [(2, 256, 320, 16, 16), (1, 64, 48, 13, 22), (1, 8, 8, 1, 1),
                                           (3, 16, 32, 5, 4), (1, 32, 16, 9, 31)])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_winograd_matches_the_direct_convolution(n, c, k, h, w, layout):
    torch.manual_seed(0)
    x = torch.randn(n, c, h, w).contiguous(memory_format=layout)
    weight, bias = torch.randn(k, c, 3, 3) / (9 * c) ** 0.5, torch.randn(k)
    u = winograd.transform_weight(weight)
    assert u.shape == (36, c, k) and u.dtype == torch.float32
    for b in (bias, None):
        y = winograd.conv2d(x, u, b)
        assert y.shape == (n, k, h, w) and y.is_contiguous(memory_format=torch.channels_last)
        err = max_rel_err(y.double(), reference(x, weight, b))
        # F(4, 3) in fp32: ~1e-5 (about 3× the direct fp32 convolution's own error), under the 1e-4 bar
        assert err < 5e-5, err


def test_winograd_refuses_other_filters():
    with pytest.raises(ValueError, match="3×3"):
        winograd.transform_weight(torch.randn(4, 4, 5, 5))


def test_the_rule_follows_the_measurements():
    assert winograd.pays(2, 320, 320, 32, 32)  # SD 1.5 at 256², first level: 2.4× measured
    assert winograd.pays(1, 512, 512, 64, 64)  # VAE decoder, 512 wide
    assert not winograd.pays(2, 1280, 1280, 8, 8)  # too few tiles: the filters' reads dominate
    assert not winograd.pays(1, 128, 128, 256, 256)  # too few channels: the transforms dominate


def test_use_winograd_converts_only_what_it_can_and_keeps_the_results():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(256, 320, 3, padding=1), nn.SiLU(), nn.Conv2d(320, 320, 3, stride=2, padding=1),
                        nn.Conv2d(320, 256, 1), nn.Conv2d(256, 256, 3, padding=1), nn.Conv2d(256, 64, 3, padding=1),
                        nn.Upsample(scale_factor=2), nn.Conv2d(64, 1280, 3, padding=1),
                        nn.Conv2d(1280, 1280, 3, padding=1)).eval()
    x = torch.randn(1, 256, 32, 32)
    with torch.no_grad():
        expected = net(x)
        assert use_winograd(net) == 2  # not the stride-2 or 1×1, not < 256 channels, not 1280 × 1280 filters
        kinds = [type(m) for m in net]
        assert kinds[0] is WinogradConv2d and kinds[4] is WinogradConv2d and kinds[8] is nn.Conv2d
        assert max_rel_err(net(x), expected) < 5e-5
        small = torch.randn(1, 256, 4, 4)  # one tile: runs direct, so exactly the reference
        assert winograd.pays(1, 256, 320, 4, 4) is False
        assert torch.equal(net[0](small), F.conv2d(small, net[0].weight, net[0].bias, padding=1))


def test_filters_transformed_in_the_forward_give_the_same_results_and_no_second_copy():
    """`precompute=False` (what `accelerate` uses under inductor's freezing, which folds the transform into a
    constant): the module keeps only its own weights, and computes exactly what the precomputed filters do."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.Conv2d(256, 320, 3, padding=1)).eval()
    x = torch.randn(2, 256, 16, 16)
    names = set(net.state_dict())
    with torch.no_grad():
        expected = net(x)
        assert use_winograd(net, precompute=False) == 2
        assert set(net.state_dict()) == names and not any(hasattr(m, "winograd_weight") for m in net)
        lazy = net(x)
        precomputed = [winograd.transform_weight(m.weight) for m in net]
        assert torch.equal(lazy, winograd.conv2d(winograd.conv2d(x, precomputed[0], net[0].bias), precomputed[1],
                                                 net[1].bias))
    assert max_rel_err(lazy, expected) < 5e-5


def test_inductor_freezing_folds_the_transform_into_one_constant():
    """Compiled with inductor's freezing (as `accelerate` does on the CPU), a `precompute=False` convolution's
    filter transform must fold into a [36, C, K] constant, not run at every call: with the map as a module-level
    tensor it was a graph input, and inductor ran the transform as a matmul per call."""
    import torch._dynamo
    import torch._inductor.config as inductor
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1), nn.SiLU(), nn.Conv2d(256, 256, 3, padding=1)).eval()
    x = torch.randn(2, 256, 16, 16)
    assert winograd.pays(2, 256, 256, 16, 16)
    with torch.no_grad(), inductor.patch(freezing=True):
        expected = net(x)
        use_winograd(net, precompute=False)
        actual, (code, *_) = run_and_get_code(torch.compile(net, fullgraph=True, dynamic=False), x)
    torch._dynamo.reset()
    assert max_rel_err(actual, expected) < 5e-5
    constants = [line for line in code.splitlines() if line.startswith("_frozen_param")]
    assert sum("(36, 256, 256)" in line for line in constants) == 2  # the two folded filter sets
    assert "_mkl_linear" not in code and code.count("extern_kernels.bmm") == 2
