"""`ldm batch` under torchrun: two gloo ranks on the CPU make byte for byte the PNGs and results.jsonl of one
process; a rank killed mid-run, then the same command again: no row lost, none twice; a job left by ranks
resumed on another number of them; every row has one owner however the rows are shared."""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ldm.errors import InputError
from ldm.pipelines.stable_diffusion import StableDiffusion
from ldm.serving.azure import read_azure_input
from ldm.serving.batch import Batch, prepare_batch, run_batch
from ldm.serving.distributed import Ranks
from ldm_cli.main import main

PARAMS = {"num_inference_steps": 2, "height": 64, "width": 64}
ROWS = 8


def batch_args(sd1_folder, src, out) -> list[str]:
    return ["batch", "--model", str(sd1_folder), "--input", str(src), "--output", str(out), "--parameters",
            json.dumps(PARAMS), "--seed", "5"]


def torchrun(sd1_folder, src, out) -> list[str]:
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(port),
            "-m", "ldm_cli.main", *batch_args(sd1_folder, src, out)]


ENV = os.environ | {"OMP_NUM_THREADS": "1"}  # (torchrun's own default for several ranks a node)


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    path = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    path.write_text("".join(json.dumps(f"prompt {i}") + "\n" for i in range(ROWS)))
    return path


@pytest.fixture(scope="module")
def one_process(sd1_folder, src, tmp_path_factory):
    """The batch on one process with one thread, as each rank runs (on a CPU the last bit of a float sum may
    depend on how many threads share it; on GPUs every rank is a whole device)."""
    out = tmp_path_factory.mktemp("one") / "out"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert main(batch_args(sd1_folder, src, out)) == 0
    finally:
        torch.set_num_threads(threads)
    return out


def assert_same_batch(out: Path, reference: Path):
    assert (out / "results.jsonl").read_bytes() == (reference / "results.jsonl").read_bytes()
    assert [json.loads(line)["row"] for line in (out / "results.jsonl").read_text().splitlines()] == list(range(ROWS))
    pngs = sorted(p.name for p in reference.glob("*.png"))
    assert len(pngs) == ROWS and sorted(p.name for p in out.glob("*.png")) == pngs
    for name in pngs:
        assert (out / name).read_bytes() == (reference / name).read_bytes(), name
    assert not list(out.glob("results.rank*.jsonl")) and not list(out.glob(".*.tmp"))


def test_two_gloo_ranks_make_what_one_process_makes(sd1_folder, src, one_process, tmp_path):
    out = tmp_path / "out"
    done = subprocess.run(torchrun(sd1_folder, src, out), env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"{ROWS} rows run on 2 ranks, 0 already done, 0 failed" in done.stderr
    assert_same_batch(out, one_process)
    assert (out / "batch.json").read_text() == (one_process / "batch.json").read_text()


def rank_pid(parent: int, rank: int) -> int | None:
    """The worker of torchrun `parent` that has RANK=`rank`."""
    for proc in Path("/proc").iterdir():
        try:
            if proc.name.isdigit() and int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent \
                    and f"\0RANK={rank}\0".encode() in b"\0" + (proc / "environ").read_bytes():
                return int(proc.name)
        except (OSError, ValueError, IndexError):
            continue  # gone, or not ours
    return None


def test_a_rank_killed_mid_run_then_the_same_command_again(sd1_folder, src, one_process, tmp_path):
    out, command = tmp_path / "out", torchrun(sd1_folder, src, tmp_path / "out")
    log = open(tmp_path / "first.log", "w")
    job = subprocess.Popen(command, env=ENV, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        rank1, deadline = out / "results.rank1.jsonl", time.monotonic() + 90
        while not (rank1.exists() and rank1.read_bytes().endswith(b"\n")):  # rank 1 has finished a row
            assert job.poll() is None and time.monotonic() < deadline, (tmp_path / "first.log").read_text()[-3000:]
            time.sleep(0.01)
        os.kill(rank_pid(job.pid, 1), signal.SIGKILL)
        assert job.wait(timeout=60) != 0  # torchrun stops the other rank and fails the job
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        log.close()
    lines = rank1.read_text().splitlines()
    assert 1 <= len(lines) < ROWS // 2  # killed mid-run: rank 1 owns rows 1, 3, 5, 7
    with open(rank1, "a") as f:  # and as if it was killed in the middle of a line
        f.write('{"row": 7, "of": 1, "prompt": "pro')

    again = subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert re.search(r"rows run on 2 ranks, [1-9]\d* already done, 0 failed", again.stderr)
    assert_same_batch(out, one_process)


def test_a_job_left_by_three_ranks_resumes_on_one_process(sd1_folder, one_process, src, tmp_path):
    """Rows done in any results file stay done; a row in two files (a kill after the merge's rename) is kept
    once; a torn line runs again; the merge puts them all in row order."""
    out = tmp_path / "out"
    out.mkdir()
    shutil.copy(one_process / "batch.json", out)
    lines = (one_process / "results.jsonl").read_text().splitlines(keepends=True)
    (out / "results.jsonl").write_text(lines[0] + lines[3])
    (out / "results.rank0.jsonl").write_text(lines[3] + lines[6])  # row 3 twice
    (out / "results.rank1.jsonl").write_text(lines[1] + lines[4][:30])  # row 4 torn
    (out / "results.rank2.jsonl").write_text(lines[5])
    for row in (0, 1, 3, 5, 6):
        shutil.copy(one_process / f"{row:05d}.png", out)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        pipe = StableDiffusion.from_pretrained(sd1_folder)
        settings = json.loads((one_process / "batch.json").read_text())["settings"]
        job = prepare_batch(src, out, PARAMS, None, settings)
        assert job.done == {0, 1, 3, 5, 6}
        assert run_batch(pipe, job) == (3, 5, 0)  # rows 2, 4, 7
    finally:
        torch.set_num_threads(threads)
    assert_same_batch(out, one_process)


def test_rows_are_shared_by_row_or_by_mini_batch_of_files(tmp_path):
    for name, count in (("a.csv", 3), ("b.csv", 1), ("c.csv", 4)):
        (tmp_path / name).write_text("prompt\n" + "".join(f"p{i}\n" for i in range(count)))
    by_row = Batch(None, tmp_path, set(), Ranks(0, 3))
    assert [by_row.owner(r) for r in range(8)] == [0, 1, 2, 0, 1, 2, 0, 1]
    by_file = Batch(None, tmp_path, set(), Ranks(0, 3), read_azure_input(tmp_path))  # a mini-batch: one file
    assert [by_file.owner(r) for r in range(8)] == [0, 0, 0, 1, 2, 2, 2, 2]
    assert read_azure_input(tmp_path, mini_batch_size=2).units == [0, 0, 0, 0, 1, 1, 1, 1]


def test_ranks_from_torchrun_environment():
    assert Ranks.from_env({}) == Ranks(0, 1, 0)
    assert Ranks.from_env({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == Ranks(3, 4, 1)
    with pytest.raises(InputError, match="outside WORLD_SIZE"):
        Ranks.from_env({"RANK": "4", "WORLD_SIZE": "4"})
    assert Ranks(1, 2, 1).device("cpu") == "cpu" and Ranks().device("cuda:1") == "cuda:1"
    with pytest.raises(InputError, match="each rank takes cuda:LOCAL_RANK"):
        Ranks(1, 2, 1).device("cuda:0")
    if not torch.cuda.is_available():
        assert Ranks(1, 2, 1).device("auto") == "cpu"
