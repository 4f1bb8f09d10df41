"""kernels/: the fused GroupNorm+SiLU Triton kernel against the reference op, on the CPU under Triton's
interpreter (TRITON_INTERPRET=1, read when the kernel is defined: so in a fresh process)."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent("""
    import numpy as np, torch
    from ldm_kernels.group_norm_silu import group_norm_silu, reference, supported

    torch.manual_seed(0)
    checked = 0
    for shape, groups in (((2, 64, 8, 8), 32), ((1, 96, 5, 7), 8), ((2, 32, 33, 17), 4)):  # > one block, odd sizes
        x = torch.randn(shape) * 3 + 1  # a mean far from 0: the variance must be computed centred
        w, b = torch.randn(shape[1]), torch.randn(shape[1])
        for layout in (torch.contiguous_format, torch.channels_last):
            xi = x.contiguous(memory_format=layout)
            assert supported(xi, w, b, groups)
            y = group_norm_silu(xi, w, b, groups, 1e-5)
            err = ((y - reference(x, w, b, groups, 1e-5)).abs().max() / reference(x, w, b, groups, 1e-5).abs().max())
            assert err < 1e-5, (shape, layout, err.item())
            assert y.is_contiguous(memory_format=layout)
            checked += 1
    # channels_last takes the tiled path (partial statistics over pixel blocks, then tiles of contiguous rows)
    import ldm_kernels.group_norm_silu as module
    calls, tiled = [], module._nhwc
    module._nhwc = lambda *args: calls.append(args[0].shape) or tiled(*args)
    x = torch.randn(2, 96, 40, 30).contiguous(memory_format=torch.channels_last) * 2 - 3  # many pixel blocks
    w, b = torch.randn(96), torch.randn(96)
    y = group_norm_silu(x, w, b, 32, 1e-6)
    module._nhwc = tiled
    expected = reference(x.contiguous(), w, b, 32, 1e-6)
    assert calls == [x.shape] and ((y - expected).abs().max() / expected.abs().max()) < 1e-5
    assert y.is_contiguous(memory_format=torch.channels_last)
    half = torch.randn(2, 64, 8, 8).half()
    ones, zeros = torch.ones(64, dtype=torch.half), torch.zeros(64, dtype=torch.half)
    y = group_norm_silu(half, ones, zeros, 32, 1e-5)
    assert y.dtype == torch.half and (y.float() - reference(half.float(), ones.float(), zeros.float(), 32, 1e-5)
                                      ).abs().max() < 2e-3
    # the guard: what the kernel does not handle runs the reference
    odd = torch.randn(2, 64, 8, 8)[:, :, ::2]
    assert not supported(odd, torch.ones(64), torch.zeros(64), 32)
    assert torch.equal(group_norm_silu(odd, torch.ones(64), torch.zeros(64), 32, 1e-5),
                       reference(odd, torch.ones(64), torch.zeros(64), 32, 1e-5))
    # the fake implementation lets torch.compile trace the op in one graph
    compiled = torch.compile(lambda t: group_norm_silu(t, torch.ones(64), torch.zeros(64), 32, 1e-5) * 2,
                             fullgraph=True, backend="aot_eager")
    assert torch.allclose(compiled(half.float()), 2 * reference(half.float(), torch.ones(64), torch.zeros(64), 32,
                                                                 1e-5), atol=1e-5)
    print("checked", checked)
""")

PIPELINE = textwrap.dedent("""
    import sys, torch
    from ldm.speed.accelerate import use_kernels, KernelResnetBlock
    from ldm.pipelines.stable_diffusion import StableDiffusion

    unet = StableDiffusion.from_pretrained(sys.argv[1]).unet
    torch.manual_seed(0)
    x, context = torch.randn(1, 4, 8, 8), torch.randn(1, 77, unet.config.cross_attention_dim)
    with torch.no_grad():
        expected = unet(x, 500, context)
        n = use_kernels(unet)
        actual = unet(x, 500, context)
    assert n == sum(isinstance(m, KernelResnetBlock) for m in unet.modules()) > 0
    err = ((actual - expected).abs().max() / expected.abs().max()).item()
    assert err < 1e-5, err
    print("resnets", n)
""")


def run(script: str, *args: str) -> str:
    env = os.environ | {"TRITON_INTERPRET": "1"}
    proc = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_group_norm_silu_matches_the_reference_op():
    assert "checked 6" in run(SCRIPT)


@pytest.mark.slow  # a whole UNet under Triton's interpreter; the op itself is checked in the default run
def test_a_unet_on_the_kernel_matches_the_reference_unet(sd1_folder):
    assert "resnets" in run(PIPELINE, str(sd1_folder))
