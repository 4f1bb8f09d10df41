"""`ldm.speed.accelerate.accelerate`: fused projections, channels_last and torch.compile applied from outside, checked
against the reference path (fp32 on the CPU here; the CUDA path is marked `gpu`)."""

import functools

import numpy as np
import pytest
import torch
from conftest import max_rel_err

from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.speed.accelerate import (
    FusedCrossAttention,
    FusedSelfAttention,
    TensorTimestep,
    WinogradConv2d,
    accelerate,
    fuse_projections,
    use_winograd,
)

PROMPT = "a small house by a lake"


def image(pipe, **kwargs) -> np.ndarray:
    args = {"steps": 3, "seed": 1, "width": 64, "height": 64} | kwargs
    return np.asarray(pipe(PROMPT, **args).images[0]).astype(np.int16)


@pytest.mark.parametrize("fixture", ["sd1_folder", "sdxl_folder"])
def test_fused_projections_match_the_reference_unet(request, fixture):
    pipe = StableDiffusion.from_pretrained(request.getfixturevalue(fixture))
    cfg = pipe.unet.config
    torch.manual_seed(0)
    x = torch.randn(2, cfg.in_channels, 8, 8)
    kwargs = {"context": torch.randn(2, 77, cfg.cross_attention_dim)}
    if cfg.addition_embed_type:
        kwargs |= {"text_embeds": torch.randn(2, 128), "time_ids": torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)}
    with torch.no_grad():
        expected = pipe.unet(x, 500, **kwargs)
        n = fuse_projections(pipe.unet)
        actual = pipe.unet(x, 500, **kwargs)
    blocks = [m for m in pipe.unet.modules() if isinstance(m, FusedSelfAttention | FusedCrossAttention)]
    assert n == len(blocks) > 0 and not any(hasattr(b, "to_k") for b in blocks)
    assert max_rel_err(actual, expected) < 1e-5  # the same sums, grouped into fewer matmuls


def test_accelerated_images_match_without_compile(sd1_folder):
    reference = image(StableDiffusion.from_pretrained(sd1_folder))
    fast = accelerate(StableDiffusion.from_pretrained(sd1_folder), compile=False)
    assert np.abs(image(fast) - reference).max() <= 2


def winograd_everywhere(pipe, monkeypatch) -> int:
    """The tiny fixtures are narrower than the 256 channels from which Winograd pays: convert every 3×3
    convolution and take the Winograd path at every shape, to check it inside the networks."""
    from ldm_kernels import winograd

    monkeypatch.setattr(winograd, "pays", lambda *shape: True)
    return use_winograd(pipe.unet, pipe.vae, min_channels=1)


def test_winograd_images_match_the_reference(sd1_folder, monkeypatch):
    reference = image(StableDiffusion.from_pretrained(sd1_folder))
    fast = StableDiffusion.from_pretrained(sd1_folder)
    n = winograd_everywhere(fast, monkeypatch)
    assert n == sum(isinstance(m, WinogradConv2d) for m in [*fast.unet.modules(), *fast.vae.modules()]) > 10
    assert np.abs(image(fast) - reference).max() <= 2
    assert np.abs(image(accelerate(fast, compile=False)) - reference).max() <= 2


def test_compiled_graphs_have_no_breaks_and_no_recompiles(sd1_folder, monkeypatch):
    """fullgraph=True fails on any graph break; error_on_recompile fails if a later step or call (another
    prompt, seed, step count or sampler of the same shape) would compile again. aot_eager traces the same
    graphs as inductor without generating code, which takes minutes on two cores (BENCHMARKS.md). The
    Winograd convolutions are in the graphs too."""
    import torch._dynamo

    torch._dynamo.reset()
    reference = StableDiffusion.from_pretrained(sd1_folder)
    fast = StableDiffusion.from_pretrained(sd1_folder)
    assert winograd_everywhere(fast, monkeypatch) > 0
    fast = accelerate(fast, backend="aot_eager")
    assert isinstance(fast.unet, TensorTimestep)
    first = image(fast)
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    for kwargs in ({"seed": 2, "steps": 4}, {"sampler": "euler_a", "seed": 3}, {"sampler": "dpmpp_2m"}):
        assert np.abs(image(fast, **kwargs) - image(reference, **kwargs)).max() <= 2
    assert np.abs(first - image(reference)).max() <= 2
    torch._dynamo.reset()


def test_compiling_with_freezing_keeps_the_loaded_weights(sd1_folder, monkeypatch):
    """On the CPU, inductor's freezing packs the weights itself: `accelerate` leaves the compiled networks'
    weights as loaded (memory-mapped, no channels_last copy, no Winograd filters beside them: folded in the graph)
    and has `MAPPED` page them out around compiles. Nothing is compiled here (torch.compile is lazy)."""
    import torch._inductor.config as inductor

    from ldm.loading.files import mapped_pages
    from ldm.speed import accelerate as fast

    monkeypatch.setattr(fast, "use_winograd", functools.partial(use_winograd, min_channels=1))  # tiny widths
    pipe = StableDiffusion.from_pretrained(sd1_folder)
    unet, decoder = pipe.unet, pipe.vae.decoder
    loaded = {p.data_ptr() for p in [*unet.parameters(), *decoder.parameters()]}
    assert len(mapped_pages([*unet.parameters(), *decoder.parameters()])) > 0  # views of the files
    with inductor.patch(freezing=False):  # accelerate sets it process-wide: restored after
        accelerate(pipe)
        assert inductor.freezing
    assert pipe.unet.unet is unet
    assert unet in fast.MAPPED.modules and decoder in fast.MAPPED.modules
    assert sum(isinstance(m, WinogradConv2d) for m in [*unet.modules(), *decoder.modules()]) > 10
    assert not any(hasattr(m, "winograd_weight") for m in [*unet.modules(), *decoder.modules()])
    copied = [name for name, p in [*unet.named_parameters(), *decoder.named_parameters()] if p.data_ptr() not in loaded]
    assert copied and all(name.endswith(("to_qkv.weight", "to_kv.weight")) for name in copied)  # only the fused


def test_accelerate_without_freezing_precomputes_and_lays_out(sd1_folder, monkeypatch):
    """Eager (and the compile backends that read the parameters): channels_last weights and precomputed Winograd
    filters, since nothing would fold them."""
    from ldm.speed import accelerate as fast

    monkeypatch.setattr(fast, "use_winograd", functools.partial(use_winograd, min_channels=1))
    pipe = accelerate(StableDiffusion.from_pretrained(sd1_folder), compile=False)
    convs = [m for m in pipe.unet.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    assert all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert all(hasattr(m, "winograd_weight") for m in convs if isinstance(m, WinogradConv2d))


def test_page_out_drops_the_mapped_pages_and_keeps_every_write(tmp_path):
    """`page_out` (MADV_PAGEOUT) takes a memory-mapped file's pages out of the resident set; the tensor reads the
    same afterwards, and a value written into the copy-on-write map (as a LoRA merges) is kept, not reverted to
    the file's. Anonymous tensors are never advised."""
    from safetensors.torch import save_file

    from ldm.loading.files import mapped_pages, page_out, read_safetensors

    def resident_file_mib() -> float:
        status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
        return int(status["RssFile"].split()[0]) / 1024

    save_file({"w": torch.randn(64, 1024, 256)}, str(tmp_path / "w.safetensors"))  # 64 MiB
    w = read_safetensors(tmp_path / "w.safetensors")["w"]
    assert mapped_pages([torch.randn(4096)]) == [] and len(mapped_pages([w])) == 1
    expected = w.clone()
    w[3, 5, :7] = 42.0  # a write: its page becomes the process's own
    expected[3, 5, :7] = 42.0
    before = resident_file_mib()
    if page_out(mapped_pages([w])) == 0:
        pytest.skip("this kernel has no MADV_PAGEOUT")
    assert before - resident_file_mib() > 48
    assert torch.equal(w, expected)


@pytest.mark.gpu
def test_cuda_half_precision_compiled_matches_fp32_reference(sd1_folder):
    reference = image(StableDiffusion.from_pretrained(sd1_folder, device="cpu", dtype="fp32"))
    fast = accelerate(StableDiffusion.from_pretrained(sd1_folder, device="cuda", dtype="fp16"))
    for _ in range(2):
        # fp16 on CUDA vs the fp32 CPU reference: the project's fp16 target is 2/255 (BENCHMARKS.md)
        assert np.abs(image(fast) - reference).max() <= 2


def test_bench_runs_each_mode_against_diffusers_counterpart():
    from ldm.tools.bench import check_mode, configurations

    assert configurations(["eager", "graph", "compile"], diffusers=True) == [
        ("ldm", "eager"), ("diffusers", "eager"), ("ldm", "graph"), ("ldm", "compile"), ("diffusers", "compile")]
    assert configurations(["max"], diffusers=False) == [("ldm", "max")]
    with pytest.raises(ValueError, match="needs --device cuda"):
        check_mode("graph", "cpu")
    with pytest.raises(ValueError, match="one of eager, graph, compile, max"):
        check_mode("fast", "cuda")


def test_bench_table_pairs_modes_and_leaves_out_what_was_not_measured():
    from ldm.tools.bench import table

    def row(impl, mode, step, gpu=None):
        return {"impl": impl, "mode": mode, "unet_step_s": step, "unet_step_gpu_s": gpu, "load_s": 1.0}

    cpu = table([row("ldm", "eager", 0.5), row("diffusers", "eager", 1.0)])
    assert cpu.splitlines()[0] == "| metric | ldm eager | diffusers eager | ldm eager / diffusers eager |"
    assert "| UNet step (s) | 0.500 | 1.000 | 0.50 |" in cpu and "GPU" not in cpu
    cuda = table([row("ldm", "eager", 0.024, 0.012), row("diffusers", "eager", 0.025),
                  row("ldm", "graph", 0.013, 0.012)])
    assert cuda.splitlines()[0] == ("| metric | ldm eager | diffusers eager | ldm graph | ldm eager / diffusers eager "
                                    "| ldm graph / diffusers eager |")
    assert "| UNet step (s) | 0.024 | 0.025 | 0.013 | 0.96 | 0.52 |" in cuda
    assert "| UNet step GPU (s) | 0.012 | - | 0.012 | - | - |" in cuda
    assert "to first step" not in cuda  # measured by none of them


def test_bench_and_model_options(sd1_folder, capsys):
    from ldm.pipelines.setup import prepare_pipeline
    from ldm_cli.main import main, parse_args
    from ldm_cli.options import run_settings

    args = parse_args(["bench", "--mode", "eager", "max", "--compile", "--timeout", "60"])
    assert args.mode == ["eager", "max"] and args.compile and args.timeout == 60
    assert parse_args(["bench"]).mode is None
    assert main(["bench", "--mode", "graph", "--device", "cpu"]) == 2  # refused before anything runs
    assert "needs a CUDA device" in capsys.readouterr().err
    args = parse_args(["generate", "a house", "--compile-mode", "max", "--no-cuda-graph"])
    assert (args.compile, args.compile_mode, args.no_cuda_graph) == (False, "max", True)
    args = parse_args(["generate", "--compile", "a house"])  # a bare --compile leaves the prompt alone
    assert args.compile and args.prompt == "a house" and args.compile_mode is None
    args = parse_args(["generate", "a house", "--model", str(sd1_folder), "--device", "cpu", "--no-safety-checker"])
    pipe = prepare_pipeline(run_settings(args))
    assert not isinstance(pipe.unet, TensorTimestep)  # the CPU's default path: the reference networks


def test_bench_decodes_in_the_vae_dtype(sdxl_folder):
    """The SDXL VAE is upcast to fp32 under an fp16 UNet: the timed decode casts the fp16 latents (the crash
    of `ldm bench --arch sdxl --device cuda`, issue 13)."""
    from ldm.tools.bench import ldm_vae_decode

    pipe = StableDiffusion.from_pretrained(sdxl_folder, dtype="fp16", safety_checker=False)
    assert next(pipe.vae.parameters()).dtype == torch.float32
    with torch.no_grad():
        assert ldm_vae_decode(pipe)(torch.randn(1, 4, 8, 8, dtype=torch.float16)).dtype == torch.float32


@pytest.mark.slow  # fresh processes of ldm bench
def test_bench_times_ldm_and_diffusers_on_a_folder(sd1_folder, capsys):
    from ldm_cli.main import main

    assert main(["bench", "--model", str(sd1_folder), "--size", "64", "--steps", "2", "--repeats", "1"]) == 0
    out = capsys.readouterr().out
    assert "| metric | ldm eager | diffusers eager | ldm eager / diffusers eager |" in out
    for label in ("load (s)", "to first step (s)", "first step (s)", "to first image (s)", "UNet step (s)",
                  "VAE decode (s)", "end to end (s)", "peak RSS"):
        row = next(line for line in out.splitlines() if line.startswith(f"| {label}"))
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert len(cells) == 4 and all(float(c) > 0 for c in cells[1:]), row
    assert "| compile/capture (s) |" in out and "GPU" not in out


@pytest.mark.slow  # ldm and diffusers on the tiny SDXL in fp16 on the CPU, in this process
def test_bench_runs_sdxl_in_half_precision(sdxl_folder):
    from ldm.tools.bench import run_one

    for impl in ("ldm", "diffusers"):
        row = run_one(impl, str(sdxl_folder), 64, 2, "euler", "eager", "cpu", "fp16", 1)
        assert row["vae_decode_s"] > 0 and row["unet_step_gpu_s"] is None, row


@pytest.mark.parametrize("linear", [False, True])
def test_channels_last_stays_through_the_spatial_transformer(linear):
    """A channels_last input comes out channels_last (issue 33: the `.contiguous()` after the blocks copied it
    back to NCHW, and the next convolution copied it forward again), with the NCHW path's values."""
    from ldm.networks.unet import SpatialTransformer

    torch.manual_seed(0)
    block = SpatialTransformer(64, 2, 1, 16, linear, upcast=False).eval()
    x, context = torch.randn(2, 64, 6, 5), torch.randn(2, 7, 16)
    fed = []
    block.proj_out.register_forward_pre_hook(lambda _module, args: fed.append(args[0]))
    with torch.no_grad():
        expected = block(x, context)
        block.to(memory_format=torch.channels_last)
        actual = block(x.contiguous(memory_format=torch.channels_last), context)
    assert actual.is_contiguous(memory_format=torch.channels_last) and not actual.is_contiguous()
    if not linear:  # the 1×1 convolution after the blocks reads channels_last
        assert fed[-1].is_contiguous(memory_format=torch.channels_last)
    assert max_rel_err(actual, expected) < 1e-5
