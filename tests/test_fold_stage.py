"""Stage 01 end to end: store contents, resume after a kill, identical files."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import REPO, isolated, load_kernel

from nucleic.config import load_config
from nucleic.io_utils import read_npz, read_pickle
from nucleic.structures import StructureStore, sequence_key

prepare = load_kernel("00_prepare_input")


def prepared_workspace(data_dir, workspace):
    assert prepare.main(["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace)]) == 0


def fold_command(workspace):
    """Stage 01 on `workspace`, reading the data stage 00 copied there (so its upstream check agrees)."""
    return [sys.executable, str(REPO / "kernels" / "01_fold_structures.py"), "--preset", "smoke",
            "--data-dir", str(workspace / "input"), *isolated(workspace), "--set", "fold.n_jobs=2"]


def shard_files(workspace):
    return sorted((workspace / "structures").rglob("*.npz"))


def store_for(workspace):
    cfg = load_config("smoke", overrides=[f"paths.structures={workspace / 'structures'}"])
    return StructureStore(workspace / "structures", cfg.fold)


@pytest.mark.slow
def test_interrupted_fold_resumes_to_identical_files(tiny_data_dir, tmp_path):
    interrupted, clean = tmp_path / "interrupted", tmp_path / "clean"
    for workspace in (interrupted, clean):
        prepared_workspace(tiny_data_dir, workspace)

    proc = subprocess.Popen(fold_command(interrupted), cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while len(shard_files(interrupted)) < 60 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in shard_files(interrupted)}
    assert 60 <= len(done_before) < 250, "the kill should land mid-way"
    for path in done_before:
        assert store_for(interrupted).shard_keys(path), f"{path} is not a readable shard"

    for workspace in (interrupted, clean):
        subprocess.run(fold_command(workspace), cwd=REPO, check=True, capture_output=True)

    for path, stamp in done_before.items():
        assert (path.stat().st_ino, path.stat().st_mtime_ns) == stamp, f"{path} was recomputed"
    finished = shard_files(interrupted)
    assert [p.relative_to(interrupted) for p in finished] == [p.relative_to(clean) for p in shard_files(clean)]
    for path in finished:
        assert path.read_bytes() == (clean / path.relative_to(interrupted)).read_bytes(), path
    assert not list((interrupted / "structures").rglob("*.tmp"))


@pytest.mark.slow
def test_store_holds_twelve_predictions_per_sequence(tiny_data_dir, tmp_path):
    workspace = tmp_path / "ws"
    prepared_workspace(tiny_data_dir, workspace)
    fold = load_kernel("01_fold_structures")
    assert fold.main(["--preset", "smoke", *isolated(workspace)]) == 0
    test = read_pickle(workspace / "work" / "smoke" / "prepared" / "test.pkl")
    store = store_for(workspace)
    record = store.load(list(test.sequence))[sequence_key(test.sequence[7])]
    length = len(test.sequence[7])
    assert record["bpp"].shape == (12, length, length) and record["bpp"].dtype == np.float16
    assert len(record["structure"]) == 12 and all(len(s) == length for s in record["loop"])
    assert set("".join(record["loop"])) <= set("SHBIMXE")
    assert (workspace / "figures" / "01_structure_predictions.png").stat().st_size > 10_000
    assert store.pending(list(test.sequence)) == []


def test_unreadable_shard_is_refolded(tiny_data_dir, tmp_path):
    workspace = tmp_path / "ws"
    prepared_workspace(tiny_data_dir, workspace)
    subprocess.run(fold_command(workspace), cwd=REPO, check=True, capture_output=True)
    store = store_for(workspace)
    prepared = workspace / "work" / "smoke" / "prepared"
    sequences = [s for split in ("train", "test") for s in read_pickle(prepared / f"{split}.pkl").sequence]
    victim = shard_files(workspace)[5]
    original = read_npz(victim)
    victim.write_bytes(b"not a zip file")
    pending = store.pending(sequences)
    assert [store.shard_path(slot, bucket) for slot, bucket, _ in pending] == [victim]
    store.fold_all(sequences, meta=json.loads(str(original["__meta__"])), n_jobs=1)
    refolded = read_npz(victim)
    assert sorted(refolded) == sorted(original)
    for name in original:
        assert np.array_equal(refolded[name], original[name]), name


@pytest.mark.slow
def test_a_truncated_shard_makes_stage_01_redo_just_that_shard(tiny_data_dir, tmp_path):
    """truncate -s 100 on a shard: stage 01 is no longer 'complete', refolds only that shard, and a reader
    of a damaged shard names it in one line."""
    workspace = tmp_path / "ws"
    prepared_workspace(tiny_data_dir, workspace)
    subprocess.run(fold_command(workspace), cwd=REPO, check=True, capture_output=True)
    shards = shard_files(workspace)
    victim = shards[7]
    original = victim.read_bytes()
    before = {p: p.stat().st_mtime_ns for p in shards if p != victim}
    with open(victim, "r+b") as f:
        f.truncate(100)
    prepared = workspace / "work" / "smoke" / "prepared"
    sequences = [s for split in ("train", "test") for s in read_pickle(prepared / f"{split}.pkl").sequence]
    from nucleic.stage import InputError
    with pytest.raises(InputError, match=f"{victim}: damaged structure shard .*removed: run stage 01"):
        store_for(workspace).load(sequences)
    victim.write_bytes(original[:100])  # damaged again, as on disk after the truncation
    rerun = subprocess.run(fold_command(workspace), cwd=REPO, capture_output=True, text=True)
    assert rerun.returncode == 0 and "skipped" not in rerun.stdout, rerun.stdout + rerun.stderr
    assert victim.read_bytes() == original, "refolded to the same bytes"
    assert {p: p.stat().st_mtime_ns for p in shards if p != victim} == before, "other shards untouched"


def test_a_stage_run_alone_on_a_fresh_workspace_runs_its_upstream_first(tiny_data_dir, tmp_path):
    workspace = tmp_path / "ws"
    command = [sys.executable, str(REPO / "kernels" / "01_fold_structures.py"), "--preset", "smoke",
               "--data-dir", str(tiny_data_dir), *isolated(workspace), "--set", "fold.n_jobs=2"]
    result = subprocess.run(command, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "upstream stage 00_prepare_input is missing or stale: running it first" in result.stdout
    assert (workspace / "work" / "smoke" / "manifests" / "00_prepare_input.json").exists()
    assert store_for(workspace).pending(list(read_pickle(workspace / "work" / "smoke" / "prepared"
                                                             / "test.pkl").sequence)) == []


def test_a_local_dask_cluster_writes_byte_identical_shards(tiny_data_dir, tmp_path):
    """cluster.address=local: stage 01 folds through joblib's Dask backend on 2 single-threaded workers and
    writes the same bytes as the default single-process path."""
    two_sources = ["--set", "fold.native_sources=[vienna_turner2004,vienna_langdon2018]"]
    plain, on_cluster = tmp_path / "plain", tmp_path / "cluster"
    for workspace in (plain, on_cluster):
        prepared_workspace(tiny_data_dir, workspace)
    subprocess.run(fold_command(plain) + two_sources, cwd=REPO, check=True, capture_output=True)
    result = subprocess.run(fold_command(on_cluster) + two_sources + [
        "--set", "cluster.address=local", "--set", "cluster.local_workers=2"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
    files = [p.relative_to(plain) for p in shard_files(plain)]
    assert len(files) > 10 and files == [p.relative_to(on_cluster) for p in shard_files(on_cluster)]
    assert all((plain / f).read_bytes() == (on_cluster / f).read_bytes() for f in files)


def test_no_cluster_address_starts_nothing_and_imports_no_dask():
    code = ("import sys; from nucleic import cluster; from nucleic.config import load_config\n"
            "with cluster.session(load_config('smoke').cluster) as client: assert client is None\n"
            "assert cluster.map_units(pow, [(2, 3), (3, 2)]) == [8, 9]\n"
            "assert not {'dask', 'distributed'} & set(sys.modules), 'imported dask'")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)
