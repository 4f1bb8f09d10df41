"""What a new user trips over (issue 27), tried as they try it: the `ldm` command as a subprocess, the server over
HTTP. `ldm tiny` writes models that load and run; a request too large for the memory here is refused in one line
before anything is allocated, and an allocator failure that still happens is one line on every entry point."""

import json
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from ldm.loading.components import load_components
from ldm.tools.tiny import FAMILIES

LDM = str(Path(sys.executable).with_name("ldm"))
HUGE = ["--width", "80000", "--height", "80000"]
ALLOCATOR = "DefaultCPUAllocator: can't allocate memory: you tried to allocate 25600000000 bytes. Error code 12"

ENV = {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}

pytestmark = pytest.mark.usefixtures("one_thread")


def ldm(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([LDM, *args], cwd=cwd, capture_output=True, text=True, timeout=300, env=ENV)


@pytest.fixture(scope="module")
def tiny_sd1(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("new-user")
    done = ldm("tiny", "sd1", "tiny-sd1", cwd=folder)
    assert done.returncode == 0, done.stderr
    assert "random" in done.stdout and "draws noise" in done.stdout  # said plainly
    return folder / "tiny-sd1"


def test_ldm_tiny_writes_each_family_in_its_official_layout(tiny_sd1, tmp_path):
    """Each family loads strictly (every key and shape) as the family it is named for; a model is never
    overwritten."""
    from ldm.tools.tiny import write_folder

    for family in FAMILIES:
        parts = load_components(write_folder(tmp_path / family, family), device="cpu")
        assert parts.spec.key == {"sd21": "sd2", "lcm-sd1": "sd1"}.get(family, family)
    again = ldm("tiny", "sd2", "tiny-sd1", cwd=tiny_sd1.parent)
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already exists" in again.stderr


def test_a_tiny_model_runs_and_matches_diffusers(tiny_sd1):
    """The README's parity command on it: ldm's random weights load in diffusers too, and the two agree."""
    done = ldm("parity", "--model", "tiny-sd1", "--steps", "2", "--device", "cpu", cwd=tiny_sd1.parent)
    assert done.returncode == 0 and done.stdout.rstrip().endswith("all within tolerance"), done.stdout + done.stderr


# The `ldm` script run as it is (runpy), its peak resident memory (VmHWM, kB) written at exit to the file named last
REPORT_PEAK = """import atexit, runpy, sys
out, sys.argv = sys.argv[-1], sys.argv[1:-1]  # (argv[0] is "-c")
def peak():
    with open("/proc/self/status") as status, open(out, "w") as f:
        f.write(next(line.split()[1] for line in status if line.startswith("VmHWM:")))
atexit.register(peak)
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def ldm_with_peak(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess, int]:
    """`ldm(...)` and the peak resident memory of that process in bytes, as the process reads its own (VmHWM of
    /proc/self/status, which counts from its exec). Not its rusage: a forked child's ru_maxrss starts at the
    parent's resident size, the test run's several GB."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "peak"
        done = subprocess.run([sys.executable, "-c", REPORT_PEAK, LDM, *args, str(out)], cwd=cwd,
                              capture_output=True, text=True, timeout=300, env=ENV)
        return done, int(out.read_text()) * 1024


def test_a_request_too_large_for_memory_is_refused_before_it_starts(tiny_sd1):
    done, peak_rss = ldm_with_peak("generate", "a cat", "--model", "tiny-sd1", *HUGE, "--steps", "1",
                                   cwd=tiny_sd1.parent)
    errors = [line for line in done.stderr.splitlines() if line.startswith("ldm: error:")]
    assert done.returncode == 2 and len(errors) == 1 and "Traceback" not in done.stderr, done.stderr
    assert "80000×80000" in errors[0] and "GiB" in errors[0] and "would fit" in errors[0], errors[0]
    assert peak_rss < 4 * 2**30, peak_rss  # nothing near the 25 GB the latents' first conv would take was allocated


def test_an_oversized_request_over_http_is_refused_with_a_message(tiny_sd1):
    from test_serve import Server

    from ldm.pipelines.stable_diffusion import StableDiffusion
    from ldm.serving.limits import Limits
    from ldm.serving.server import ServeConfig

    pipe = StableDiffusion.from_pretrained(tiny_sd1)
    server = Server(lambda: pipe, ServeConfig(limits=Limits(max_pixels=80000 * 80000)))
    try:
        status, _, out = server.request("POST", "/score", {"input_data": {"columns": ["prompt"], "data": ["a"],
                                        "parameters": {"width": 80000, "height": 80000, "num_inference_steps": 1}}})
    finally:
        server.close()
    assert status == 200 and "needs at least" in out[0]["error"]["message"], out
    assert out[0]["error"]["message"].count("\n") == 0


def test_an_allocator_failure_is_one_line_on_every_entry_point(tiny_sd1, tmp_path, monkeypatch, capsys):
    """The CPU allocator's RuntimeError (and torch.OutOfMemoryError) while running: exit 2 on the CLI, the row's
    error in batch and over HTTP."""
    from ldm.pipelines.stable_diffusion import StableDiffusion
    from ldm_cli.main import main

    def fail(*args, **kwargs):
        raise RuntimeError(ALLOCATOR)

    monkeypatch.setattr(StableDiffusion, "sample", fail)
    assert main(["generate", "a cat", "--model", str(tiny_sd1), "--steps", "1", "-o", str(tmp_path / "a.png")]) == 2
    err = capsys.readouterr().err
    assert "ldm: error: out of memory on cpu (an allocation of 25600000000 bytes)" in err and "Traceback" not in err
    (tmp_path / "rows.jsonl").write_text('"a lighthouse"\n')
    main(["batch", "--model", str(tiny_sd1), "--input", str(tmp_path / "rows.jsonl"), "--output",
          str(tmp_path / "out"), "--parameters", '{"num_inference_steps": 1}'])
    row = json.loads((tmp_path / "out" / "results.jsonl").read_text().splitlines()[0])
    assert "out of memory on cpu" in json.dumps(row), row


def test_lora_wording(tiny_sd1, tmp_path):
    """`--lora FILE:abc` says the weight is not a number; a corrupt LoRA is not sent to `ldm download`."""
    lora = tmp_path / "detail.safetensors"
    lora.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    bad_weight = ldm("generate", "a", "--model", str(tiny_sd1), "--steps", "1", "--lora", f"{lora}:abc",
                     cwd=tmp_path)
    assert bad_weight.returncode == 2 and "'abc', is not a number" in bad_weight.stderr, bad_weight.stderr
    corrupt = ldm("generate", "a", "--model", str(tiny_sd1), "--steps", "1", "--lora", str(lora), cwd=tmp_path)
    assert corrupt.returncode == 2 and "replace it with a whole copy" in corrupt.stderr, corrupt.stderr
    assert "ldm download" not in corrupt.stderr


def test_the_plain_truncation_note_quotes_the_prompt_as_written_and_short(tiny_sd1, tmp_path):
    prompt = " ".join(f"word{i}" for i in range(120))  # CLIP splits the digits: decoded, `word 2 8`
    done = ldm("generate", prompt, "--model", str(tiny_sd1), "--steps", "1", "--prompt-syntax", "plain", "-o",
               str(tmp_path / "a.png"), cwd=tmp_path)
    note = next(line for line in done.stderr.splitlines() if "was cut at 77 tokens" in line)
    dropped = note.split("dropped ", 1)[1]
    assert dropped.startswith("'word28 word29 word30 ") and "word 2" not in note and len(dropped) < 260, note
    assert dropped.endswith(f"… ({len(prompt[prompt.index('word28'):]):,} characters in all)'"), note


def test_a_download_with_the_hub_out_of_reach_is_one_line_for_a_single_file_too(tmp_path):
    """`ldm download sd15` and `ldm download sd15 --single-file` with nothing listening at the Hub's address: the
    same one line, no huggingface_hub retries."""
    closed = socket.socket()
    closed.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
    env = {"HF_HOME": str(tmp_path / "hf"), "HF_ENDPOINT": f"http://127.0.0.1:{closed.getsockname()[1]}"}
    try:
        answers = [subprocess.run([LDM, "download", "sd15", *flag], capture_output=True, text=True, timeout=120,
                                  env={"PATH": "/usr/bin:/bin"} | env) for flag in ([], ["--single-file"])]
    finally:
        closed.close()
    for done in answers:
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert "the Hub cannot be reached" in done.stderr and "Retrying" not in done.stderr
    assert answers[0].stderr == answers[1].stderr


def test_ldm_info_of_a_model_not_cached_says_so_not_that_the_hub_is_down(tmp_path):
    """`ldm info` reads only the cache: a model not there is not a Hub that cannot be reached."""
    done = subprocess.run([LDM, "info", "sd15"], capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf")})
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "not in the local Hugging Face cache" in done.stderr and "never downloads" in done.stderr
    assert "cannot be reached" not in done.stderr and "ldm download sd15" in done.stderr


@pytest.mark.parametrize("text, says", [("{steps: 2}", "not JSON at line 1, column 2"),
                                        ('{"steps": 2', "not JSON at line 1, column 12"),
                                        ("[1]", "a JSON object of scoring parameters, not list")])
def test_batch_parameters_that_are_not_a_json_object_say_where(tmp_path, text, says):
    done = ldm("batch", "--input", "rows.jsonl", "--output", "out", "--parameters", text, cwd=tmp_path)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and says in lines[0], done.stderr
