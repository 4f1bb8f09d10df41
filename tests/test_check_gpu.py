"""`ldm bench --check-gpu` (ldm.tools.check_gpu, issue 33): the GPU self-check's dry run (`--device cpu`, small
shapes) end to end as a user runs it, and how its runner reports a part that fails or runs out of time."""

import json
import subprocess
import sys

from ldm.tools import check_gpu


def test_the_dry_run_runs_every_part_end_to_end():
    proc = subprocess.run([sys.executable, "-m", "ldm_cli.main", "bench", "--check-gpu", "--device", "cpu"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert {row["part"] for row in rows} == set(check_gpu.PARTS)
    assert not [row for row in rows if "error" in row or row.get("ok") is False]
    assert proc.stdout.splitlines()[-1] == f"# {len(rows)} results, 0 failed"
    oom = next(row for row in rows if row["part"] == "oom_capture")
    assert oom["failed"] is None and oom["captured_after"] == 1  # the out-of-memory call ran eagerly, then captured
    memory = [row for row in rows if row["part"] == "graph_memory" and "graphs_kept" in row]
    assert [row["graphs_kept"] for row in memory] == [1, 2, 2]


def test_a_part_that_breaks_is_a_row_and_the_next_part_runs(monkeypatch):
    def broken(device, dtype, dry, report):
        report({"first": 1})
        raise RuntimeError("no kernel for this shape")

    monkeypatch.setitem(check_gpu.RUNS, "kernels", broken)
    monkeypatch.setitem(check_gpu.RUNS, "refiner", lambda device, dtype, dry, report: report({"ok": True}))
    logged = []
    rows = check_gpu.check_gpu("cpu", parts=("kernels", "refiner"), log=logged.append)
    assert rows == [{"part": "kernels", "first": 1},
                    {"part": "kernels", "error": "RuntimeError: no kernel for this shape"},
                    {"part": "refiner", "ok": True}]
    assert logged[0] == "# kernels (dry run)" and len(logged) == 5


def test_a_device_part_is_stopped_at_its_timeout_with_what_it_printed():
    logged, rows = [], []
    script = "import time; print('{\"part\": \"kernels\", \"n\": 1}', flush=True); time.sleep(30)"
    error = check_gpu.run_logged([sys.executable, "-c", script], 3, rows, logged.append)
    assert error == "timed out after 3 s" and rows == [{"part": "kernels", "n": 1}] and logged == [json.dumps(rows[0])]
