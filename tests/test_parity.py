"""`ldm parity`: the per-component comparison with diffusers/transformers on the tiny official-layout models,
its verdicts (a perturbed UNet weight is caught and flagged), single files, SDXL's two towers, and the one-line
answer when diffusers is missing."""

import argparse
import subprocess
import sys

import pytest
import torch

from ldm.errors import LdmError
from ldm.tools import parity
from ldm_cli.parity import add_parser, run

STEPS = 2  # the tiny models' native size is 64×64


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The tiny models are too small for intra-op threads to pay: on a busy 2-core runner, handing each small
    conv to a second thread costs several times the work (a check takes 13 s with two threads, 2 s with one)."""
    kept = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(kept)


def cli(argv: list[str]) -> int:
    """`ldm parity …` as cli/main.py runs a subcommand: LdmError → one line on stderr, exit status 2."""
    parser = argparse.ArgumentParser(prog="ldm")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return run(args)
    except LdmError as e:
        print(f"ldm: error: {e}", file=sys.stderr)
        return 2


@pytest.fixture
def reports(monkeypatch):
    """The Report objects behind the tables `run` prints (optionally with ldm's pipeline adjusted first)."""
    made, check = [], parity.check

    def recording(*args, adjust=None, **kwargs):
        report = check(*args, adjust=adjust or recording.adjust, **kwargs)
        made.append(report)
        return report

    recording.adjust = None
    monkeypatch.setattr(parity, "check", recording)
    return recording, made


def test_sd15_folder_is_reported_within_tolerance(sd1_folder, reports, capsys):
    _, made = reports
    assert cli(["parity", "--model", str(sd1_folder), "--steps", str(STEPS), "--device", "cpu"]) == 0
    (report,) = made
    out = capsys.readouterr().out
    print(out)
    assert [row.component for row in report.rows] == ["tokenizer", "text_encoder", "unet", "vae decode", "image"]
    for row in report.rows[1:-1]:
        assert row.unit == "rel" and row.error <= 1e-6, row
    assert report.row("tokenizer").error == 0
    assert report.row("image").error <= 1  # of 255
    assert "pndm, 2 steps, 64x64, seed 0, cpu fp32" in report.title  # the folder's scheduler, native size
    lines = out.splitlines()
    assert lines[0] == report.title and lines[-1] == "all within tolerance"
    assert lines[1].split() == ["component", "max", "error", "tolerance", "verdict"]
    unet = next(line for line in lines if line.startswith("unet "))
    assert "within tolerance" in unet and unet.index("1e-04") == lines[1].index("tolerance")  # aligned


def test_a_perturbed_unet_weight_is_flagged(sd1_folder, reports, capsys):
    recording, made = reports

    def perturb(pipe):  # ldm's side only: the reference keeps the weights on disk
        weight = pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2.to_k.weight
        with torch.no_grad():
            weight.add_(torch.randn(weight.shape, generator=torch.Generator().manual_seed(0)) * weight.std())

    recording.adjust = perturb
    assert cli(["parity", "--model", str(sd1_folder), "--steps", str(STEPS), "--sampler", "euler",
                "--device", "cpu"]) == 1
    (report,) = made
    assert not report.row("unet").ok and report.row("unet").error > 1e-3
    for name in ("tokenizer", "text_encoder", "vae decode"):  # the rest of the model is still diffusers'
        assert report.row(name).ok
    out = capsys.readouterr().out
    unet = next(line for line in out.splitlines() if line.startswith("unet "))
    assert "OUT OF TOLERANCE" in unet
    assert out.splitlines()[-1].endswith("out of tolerance")


def test_sd15_single_file(single_file):
    """diffusers reads the file with its own key conversion, given the configs ldm inferred (offline)."""
    report = parity.check(single_file("sd1"), steps=STEPS, size=(64, 64), device="cpu")
    print(report.table())
    assert "single file" in report.title and report.ok
    assert all(row.error <= 1e-6 for row in report.rows if row.unit == "rel")
    assert report.row("image").error <= 1


def test_sdxl_folder_reports_both_towers(sdxl_folder):
    report = parity.check(sdxl_folder, steps=STEPS, device="cpu", prompt="a lighthouse at dusk, oil painting")
    print(report.table())
    assert [row.component for row in report.rows] == [
        "tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2", "text_encoder_2 pooled", "unet", "vae decode",
        "image"]
    assert report.ok and "SDXL base" in report.title and "euler" in report.title
    assert all(row.error <= 1e-6 for row in report.rows if row.unit == "rel")
    assert report.row("image").error <= 1


def test_missing_diffusers_is_one_line_and_status_2(sd1_folder, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    assert cli(["parity", "--model", str(sd1_folder), "--device", "cpu"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"ldm: error: {parity.MISSING_REFERENCE}\n"
    assert "not installed" in captured.err and "pip install diffusers transformers" in captured.err


def test_user_errors_are_status_2(sd1_folder, tmp_path, capsys):
    assert cli(["parity", "--model", str(tmp_path / "nowhere"), "--device", "cpu"]) == 2
    assert "no such file or folder" in capsys.readouterr().err
    assert cli(["parity", "--model", str(sd1_folder), "--size", "60", "64", "--device", "cpu"]) == 2
    assert "multiple of 8" in capsys.readouterr().err


def test_the_command_line_answers_without_torch():
    probe = ("import argparse, sys\nfrom ldm_cli.parity import add_parser\n"
             "parser = argparse.ArgumentParser(prog='ldm')\nadd_parser(parser.add_subparsers())\n"
             "text = parser._subparsers._group_actions[0].choices['parity'].format_help()\n"
             "assert '--model' in text and '--sampler' in text and '--size W H' in text, text\n"
             "assert 'torch' not in sys.modules\n")
    subprocess.run([sys.executable, "-c", probe], check=True)
