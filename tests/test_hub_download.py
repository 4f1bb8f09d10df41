"""`ldm download`, `ldm info` and `ldm generate` against a mock Hub (tests/hub_server.py) and a Hugging Face cache
laid out by huggingface_hub itself, then offline from that cache.

The CLI runs in subprocesses so that huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE at import, as
it does for a user. The mock repo is the tiny SD 1.5 folder plus what the official repo also holds and ldm must
never fetch: pickles (.ckpt/.bin), the fp16 variant files (unless asked for), the single file (unless asked for),
and the files of the repo that no run reads (README.md, .gitattributes).
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hub_server import commit_of, serving
from PIL import Image

REPO = "stable-diffusion-v1-5/stable-diffusion-v1-5"
SINGLE = "v1-5-pruned-emaonly.safetensors"
COMMIT = commit_of(REPO)
PICKLES = {"v1-5-pruned-emaonly.ckpt": b"\x80\x04\x95fake pickle", "unet/diffusion_pytorch_model.bin": b"PK\x03\x04bin",
           "safety_checker/pytorch_model.bin": b"PK\x03\x04bin"}
UNUSED = {"README.md": b"---\nlicense: creativeml-openrail-m\n---\n", ".gitattributes": b"*.safetensors filter=lfs\n"}
# what a text-to-image run reads from an SD 1.x repo, at the least (the full list is the diffusers folder's files)
NEEDED = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "vae/config.json",
          "text_encoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt"]
WEIGHTS = ["unet/diffusion_pytorch_model", "vae/diffusion_pytorch_model", "text_encoder/model"]
GENERATE = ["--steps", "2", "--width", "64", "--height", "64", "--seed", "1", "--device", "cpu"]


def hub_env(hf_home: Path, endpoint: str, offline: bool = False) -> dict[str, str]:
    """The environment of a CLI run: this one without any Hugging Face setting of its own, plus ours."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("HF_", "HUGGINGFACE_")) and k != "TRANSFORMERS_OFFLINE"}
    env.update(HF_ENDPOINT=endpoint, HF_HOME=str(hf_home), HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_DISABLE_XET="1",
               HF_HUB_DISABLE_PROGRESS_BARS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    return env


def ldm(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return ldm_all([list(args)], env)[0]


def ldm_all(commands: list[list[str]], env: dict[str, str]) -> list[subprocess.CompletedProcess]:
    """Run several independent `ldm` commands at once (each spends most of its time importing torch)."""
    procs = [(cmd, subprocess.Popen([sys.executable, "-m", "ldm_cli.main", *cmd], env=env, text=True,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)) for cmd in commands]
    results = []
    for cmd, proc in procs:
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
        results.append(subprocess.CompletedProcess(cmd, proc.returncode, out, err))
    return results


def succeeded(result: subprocess.CompletedProcess) -> bool:
    return result.returncode == 0 and "Traceback" not in result.stderr


def user_error(result: subprocess.CompletedProcess) -> bool:
    """The CLI's one-line user error: exit 2, `ldm: error: ...`, no traceback."""
    return result.returncode == 2 and "ldm: error:" in result.stderr and "Traceback" not in result.stderr


def printed_path(result: subprocess.CompletedProcess) -> Path:
    return Path(result.stdout.strip().splitlines()[-1])


def folder_files(folder: Path, variant: str | None) -> set[str]:
    """The files of a diffusers folder a run reads: all of them, the weights in the full-precision or the variant
    version."""
    files = {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}
    fp16 = {f for f in files if f.endswith(".fp16.safetensors")}
    full = {f for f in files if f.endswith(".safetensors")} - fp16
    return files - (full if variant else fp16)


def snapshot_files(snapshot: Path) -> set[str]:
    return {p.relative_to(snapshot).as_posix() for p in snapshot.rglob("*") if p.is_file()}


def requests_for(log, names) -> list[tuple[str, str]]:
    return [(method, path) for method, path in log if any(path.endswith("/" + name) for name in names)]


@pytest.fixture(scope="module")
def hub_repo(tmp_path_factory, sd1_folder, single_file) -> Path:
    """The official SD 1.5 repo's layout, with the tiny model's files."""
    repo = tmp_path_factory.mktemp("hub") / "sd15"
    shutil.copytree(sd1_folder, repo)
    shutil.copyfile(single_file("sd1"), repo / SINGLE)
    for name, data in (PICKLES | UNUSED).items():
        assert not (repo / name).exists(), name
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_bytes(data)
    return repo


@pytest.fixture(scope="module")
def cache(tmp_path_factory, hub_repo):
    """Three downloads through the mock Hub into a fresh HF_HOME, each with the requests it made, the files it
    fetched and the snapshot's files after it; the server is shut down afterwards, so everything using the cache
    later is offline."""
    hf_home = tmp_path_factory.mktemp("hf") / "hf"
    storage = hf_home / "hub" / ("models--" + REPO.replace("/", "--"))
    runs = {}
    with serving({REPO: hub_repo}) as server:
        env = hub_env(hf_home, server.url)
        for key, args in {"fp32": ["download", "sd15"],
                          "fp16": ["download", "runwayml/stable-diffusion-v1-5", "--variant", "fp16"],
                          "single": ["download", "sd15", "--single-file"]}.items():
            start = len(server.log())
            result = ldm(*args, env=env)
            runs[key] = (result, server.log()[start:], server.downloads(start),
                         snapshot_files(storage / "snapshots" / COMMIT))
        dead_url = server.url
    return {"hf_home": hf_home, "storage": storage, "snapshot": storage / "snapshots" / COMMIT, "runs": runs,
            "dead_url": dead_url}


def test_download_fetches_the_fp32_safetensors_configs_and_tokenizer_only(cache, hub_repo, sd1_folder):
    result, log, downloads, files = cache["runs"]["fp32"]
    assert succeeded(result), result.stderr
    snapshot = cache["snapshot"]
    assert printed_path(result) == snapshot and snapshot.is_dir()
    assert (cache["storage"] / "refs" / "main").read_text() == COMMIT
    expected = folder_files(sd1_folder, None)
    assert {*NEEDED, *(f"{w}.safetensors" for w in WEIGHTS)} <= expected
    assert sorted(downloads) == sorted(expected)  # each file once
    never = [*PICKLES, *UNUSED, SINGLE, *(f"{w}.fp16.safetensors" for w in WEIGHTS)]
    assert requests_for(log, never) == []  # not even a HEAD
    assert not any(path.endswith((".bin", ".ckpt")) for _, path in log)
    assert files == expected
    for name in expected:  # huggingface_hub's layout: snapshot symlinks into blobs/, the repo's bytes
        link = snapshot / name
        assert link.is_symlink() and link.resolve().parent == (cache["storage"] / "blobs").resolve()
        assert link.read_bytes() == (hub_repo / name).read_bytes(), name


def test_download_variant_through_the_alias_fetches_the_fp16_files(cache, hub_repo, sd1_folder):
    result, log, downloads, files = cache["runs"]["fp16"]
    assert succeeded(result), result.stderr
    assert printed_path(result) == cache["snapshot"]  # the alias is the same repo, the same cache folder
    repo_requests = [path for _, path in log if path != "/api/agent-harnesses"]  # huggingface_hub's, not a repo's
    assert repo_requests and all(p.startswith((f"/api/models/{REPO}/", f"/{REPO}/resolve/")) for p in repo_requests)
    expected = folder_files(sd1_folder, "fp16")
    fp16 = {f for f in expected if f.endswith(".fp16.safetensors")}
    assert {f"{w}.fp16.safetensors" for w in WEIGHTS} <= fp16
    assert fp16 <= set(downloads) <= expected  # the configs and tokenizer are in the cache already
    assert len(downloads) == len(set(downloads))
    full = folder_files(sd1_folder, None) - expected
    assert requests_for(log, [*PICKLES, *UNUSED, SINGLE, *full]) == []
    assert files == folder_files(sd1_folder, None) | expected
    for name in expected:
        assert (cache["snapshot"] / name).read_bytes() == (hub_repo / name).read_bytes()


def test_download_single_file_fetches_that_file_only(cache, single_file):
    result, log, downloads, files = cache["runs"]["single"]
    assert succeeded(result), result.stderr
    path = printed_path(result)
    assert path == cache["snapshot"] / SINGLE
    assert downloads == [SINGLE]
    assert files == cache["runs"]["fp16"][3] | {SINGLE}
    resolved = [p for _, p in log if "/resolve/" in p]
    assert resolved and all(p.endswith("/" + SINGLE) for p in resolved)
    assert path.read_bytes() == single_file("sd1").read_bytes()


def test_offline_info_and_download_use_the_cache(cache):
    with serving({}) as sentinel:  # a Hub with no repos, to see that offline means no request at all
        env = hub_env(cache["hf_home"], sentinel.url, offline=True)
        info, single = ldm_all([["info", "sd15"], ["download", "sd15", "--single-file"]], env)
    assert sentinel.log() == []
    assert succeeded(info), info.stderr
    assert "SD 1.x" in info.stdout and str(cache["snapshot"]) in info.stdout
    assert "diffusers folder" in info.stdout and "unet/diffusion_pytorch_model.safetensors" in info.stdout
    assert succeeded(single), single.stderr
    assert printed_path(single) == cache["snapshot"] / SINGLE


def test_offline_generate_from_the_cached_folder_and_single_file(cache, tmp_path):
    env = hub_env(cache["hf_home"], cache["dead_url"], offline=True)
    folder_png, file_png = tmp_path / "folder.png", tmp_path / "file.png"
    folder, file = ldm_all([
        ["generate", "a cat", "--model", "runwayml/stable-diffusion-v1-5", *GENERATE, "-o", str(folder_png)],
        ["generate", "a cat", "--model", str(cache["snapshot"] / SINGLE), *GENERATE, "-o", str(file_png)]], env)
    assert succeeded(folder), folder.stderr
    assert succeeded(file), file.stderr
    a = np.asarray(Image.open(folder_png).convert("RGB")).astype(np.int16)
    b = np.asarray(Image.open(file_png).convert("RGB")).astype(np.int16)
    assert a.shape == b.shape == (64, 64, 3)
    assert np.abs(a - b).max() <= 1
    assert a.std() > 0  # a picture, not a blank


def test_offline_uncached_repo_says_to_download_it(cache, tmp_path):
    env = hub_env(cache["hf_home"], cache["dead_url"], offline=True)
    out = tmp_path / "out.png"
    results = ldm_all([["info", "stabilityai/stable-diffusion-2-1"], ["download", "sd21"],
                       ["generate", "a cat", "--model", "sd21", *GENERATE, "-o", str(out)]], env)
    for result, name in zip(results, ["stabilityai/stable-diffusion-2-1", None, "sd21"], strict=True):
        assert user_error(result), (result.args, result.returncode, result.stderr)
        if name is None:  # `ldm download` itself is not told to run `ldm download`
            assert "the Hub cannot be reached" in result.stderr and "ldm download" not in result.stderr
            continue
        assert "not in the local Hugging Face cache" in result.stderr, result.args
        suggested = re.search(r"`ldm download (\S+)`", result.stderr)
        assert suggested and suggested[1] == name, result.stderr  # the name the user gave
    assert not out.exists()


def test_a_variant_the_repo_lacks_is_refused_with_other_files_cached(cache, hub_repo, tmp_path):
    hf_home = tmp_path / "hf"
    shutil.copytree(cache["hf_home"], hf_home, symlinks=True)
    with serving({REPO: hub_repo}) as server:
        result = ldm("download", "sd15", "--variant", "bf16", env=hub_env(hf_home, server.url))
    assert user_error(result), (result.returncode, result.stdout, result.stderr)
    assert "no .bf16.safetensors weights" in result.stderr


def test_offline_with_only_the_single_file_cached_says_to_download_the_folder(hub_repo, tmp_path):
    hf_home = tmp_path / "hf"
    with serving({REPO: hub_repo}) as server:
        assert succeeded(ldm("download", "sd15", "--single-file", env=hub_env(hf_home, server.url)))
        url = server.url
    result = ldm("info", "sd15", env=hub_env(hf_home, url, offline=True))
    assert user_error(result), (result.returncode, result.stderr)
    assert "not a whole diffusers folder" in result.stderr and "`ldm download sd15`" in result.stderr


def test_truncated_blob_is_reported_and_download_force_repairs_it(cache, hub_repo, tmp_path):
    hf_home = tmp_path / "hf"
    shutil.copytree(cache["hf_home"], hf_home, symlinks=True)  # the snapshot's links are relative: they follow
    unet = hf_home / "hub" / cache["storage"].name / "snapshots" / COMMIT / "unet/diffusion_pytorch_model.safetensors"
    blob = unet.resolve()
    assert blob.parent == (hf_home / "hub" / cache["storage"].name / "blobs").resolve()
    whole = blob.read_bytes()
    blob.write_bytes(whole[: len(whole) // 2])

    offline = hub_env(hf_home, cache["dead_url"], offline=True)
    result = ldm("generate", "a cat", "--model", "sd15", *GENERATE, "-o", str(tmp_path / "out.png"), env=offline)
    assert user_error(result), (result.returncode, result.stderr)
    assert "truncated or corrupt" in result.stderr and str(unet) in result.stderr
    assert not (tmp_path / "out.png").exists()

    # online, huggingface_hub trusts the cached file; `ldm download` checks it, and --force fetches it again
    with serving({REPO: hub_repo}) as server:
        env = hub_env(hf_home, server.url)
        check = ldm("download", "sd15", env=env)
        assert user_error(check), (check.returncode, check.stderr)
        assert "truncated or corrupt" in check.stderr and "--force" in check.stderr
        assert server.downloads() == []
        start = len(server.log())
        repaired = ldm("download", "sd15", "--force", env=env)
        fetched = server.downloads(start)
    assert succeeded(repaired), repaired.stderr
    assert "unet/diffusion_pytorch_model.safetensors" in fetched
    assert blob.read_bytes() == whole == (hub_repo / "unet/diffusion_pytorch_model.safetensors").read_bytes()
