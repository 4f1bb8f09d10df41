"""`ldm_cli.allocator`: the `ldm` process keeps the memory a generation frees, so the next one does not fault it in
again. Measured in a fresh process as the memory still resident after a 64 MiB block (an activation's size, far above
glibc's mmap threshold) is written and freed: given back to the kernel by default, kept when asked. (Page-fault
counts would say the same but depend on transparent huge pages.)"""

import json
import subprocess
import sys

import pytest

PROBE = """
import json, os, sys
import numpy as np
from ldm_cli.allocator import keep_freed_memory
asked = keep_freed_memory() if sys.argv[1] == "keep" else False
def resident():
    return int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
before = resident()
block = np.ones(64 * 2**20 // 8)  # 64 MiB, every page written
del block
print(json.dumps({"asked": asked, "kept": resident() - before}))
"""
MIB = 2**20


def probe(mode: str, **env) -> dict:
    import os

    environment = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")} | env
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, env=environment,
                          timeout=60, check=True)
    return json.loads(done.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_kept_for_the_next_allocation():
    plain, kept = probe("plain"), probe("keep")
    assert plain["kept"] < 8 * MIB  # glibc gave the block back: the next one faults every page in again
    assert kept["asked"] and kept["kept"] > 56 * MIB


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
@pytest.mark.parametrize("env", [{"LDM_KEEP_FREED_MEMORY": "0"}, {"MALLOC_TRIM_THRESHOLD_": "131072"}])
def test_the_users_choice_is_left_alone(env):
    assert probe("keep", **env)["asked"] is False


def test_the_generating_commands_ask_for_it():
    from ldm_cli.main import GENERATING

    assert GENERATING == {"generate", "serve", "batch"}
