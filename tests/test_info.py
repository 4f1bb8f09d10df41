"""`ldm info` on a folder and on a single file; the weights/ store; --variant and --prediction-type checks."""

import shutil

import pytest

from ldm.loading.families import SPECS, manifest, weights_dir
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm_cli.main import main


def test_info_on_a_folder(sd1_folder, capsys):
    assert main(["info", str(sd1_folder)]) == 0
    out = capsys.readouterr().out
    assert "kind:       diffusers folder" in out and "family:     SD 1.x" in out
    assert "PNDMScheduler (epsilon)" in out
    assert str(sd1_folder / "unet" / "diffusion_pytorch_model.safetensors") in out
    unet = StableDiffusion.from_pretrained(sd1_folder).unet
    assert f"{sum(p.numel() for p in unet.parameters()):,} parameters  float32" in out


def test_info_on_a_single_file(single_file, capsys):
    assert main(["info", str(single_file("sd21"))]) == 0
    out = capsys.readouterr().out
    assert "kind:       single file" in out and "family:     SD 2.x (768, v-prediction)" in out
    assert "DDIMScheduler (v_prediction)" in out and "'use_linear_projection': True" in out
    assert "conditions on OpenCLIP-H's penultimate layer" in out and "--prediction-type eps" in out
    pipe = StableDiffusion.from_pretrained(single_file("sd21"))
    for name, module in (("unet", pipe.unet), ("vae", pipe.vae), ("text_encoder", pipe.text_encoder)):
        assert f"{name:<15} {sum(p.numel() for p in module.parameters()):>15,} parameters" in out


def test_info_variant_reads_the_fp16_files(sd1_folder, capsys):
    assert main(["info", str(sd1_folder), "--variant", "fp16"]) == 0
    out = capsys.readouterr().out
    assert "float16" in out and "diffusion_pytorch_model.fp16.safetensors" in out


def test_a_file_name_in_the_weights_store(single_file, tmp_path, monkeypatch, capsys):
    repo_manifest = weights_dir() / "manifest.json"
    monkeypatch.setenv("LDM_WEIGHTS", str(tmp_path / "store"))
    (tmp_path / "store").mkdir()
    shutil.copy(repo_manifest, tmp_path / "store" / "manifest.json")
    shutil.copy(single_file("sd1"), tmp_path / "store" / "v1-5-pruned-emaonly.safetensors")
    monkeypatch.chdir(tmp_path)
    assert main(["info", "v1-5-pruned-emaonly.safetensors"]) == 0
    assert str(tmp_path / "store" / "v1-5-pruned-emaonly.safetensors") in capsys.readouterr().out


def test_manifest_lists_every_family():
    entries = manifest()
    assert {e.family for e in entries.values()} == set(SPECS)
    assert entries["sd15"].aliases == ("runwayml/stable-diffusion-v1-5",)
    assert all(e.single_file is None or e.single_file.endswith(".safetensors") for e in entries.values())


def test_single_file_option_errors(single_file, tmp_path, capsys):
    code = main(["generate", "x", "--model", str(single_file("sd1")), "-o", str(tmp_path / "x.png"),
                 "--variant", "fp16"])
    assert code == 2 and "--variant fp16 selects files in a diffusers folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["generate", "x", "--prediction-type", "x0"])
    assert "invalid choice: 'x0'" in capsys.readouterr().err


def test_unknown_model_names_the_options(tmp_path, capsys):
    assert main(["info", "no-such-model"]) == 2
    err = capsys.readouterr().err
    assert "no-such-model: no such file or folder" in err and "sd15" in err
    assert main(["download", "no-such-model"]) == 2
    assert main(["download", "sd14", "--single-file"]) == 2
    assert "no safetensors single file is known" in capsys.readouterr().err


@pytest.mark.parametrize("flags, native", [("fpu sse avx512f", False), ("fpu avx512f avx512_bf16 amx_bf16", True)])
def test_info_says_the_threads_and_whether_bf16_pays(sd1_folder, capsys, monkeypatch, tmp_path, flags, native):
    """The machine's lines (issue 27: threads on a busy machine; native bf16 where --dtype bf16 pays): the threads
    torch will use as set, and the bf16 hint only on a CPU whose flags name native bf16."""
    import torch

    from ldm_cli import models

    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor : 0\nflags : {flags}\n")
    monkeypatch.setattr(models, "CPUINFO", cpuinfo)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(["info", str(sd1_folder)]) == 0
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert ", 1 thread (OMP_NUM_THREADS sets them" in out
    assert ("--dtype bf16 runs about 3× faster" in out) is native
