"""One run at a time per work folder: a second run stops with one clear line and touches nothing."""
from __future__ import annotations

import os
import subprocess
import sys

from conftest import REPO, isolated, run_script

from nucleic.config import load_config
from nucleic.stage import lock_path, run_lock


def test_a_second_run_on_the_same_work_folder_stops_with_a_clear_message(tmp_path):
    sets = isolated(tmp_path / "ws")
    cfg = load_config("smoke", [s for s in sets if s != "--set"])
    (tmp_path / "empty").mkdir()  # no data: once it has the lock, the stage stops at once (stage 00 upstream)
    kernel = [sys.executable, str(REPO / "kernels" / "07_ensemble.py"), "--preset", "smoke", *sets,
              "--data-dir", str(tmp_path / "empty")]
    with run_lock(cfg):
        alone = run_script(kernel)
        assert alone.returncode == 2
        work = tmp_path / "ws" / "work" / "smoke"
        assert f"{work}: another run is using this work folder (pid {os.getpid()}" in alone.stderr
        assert len(alone.stderr.strip().splitlines()) == 1
        whole = run_script(["bash", "run_all.sh", "--preset", "smoke", *sets])
        assert whole.returncode == 2 and "another run is using" in whole.stderr
        assert "==>" not in whole.stdout, "no stage started"
    assert not (tmp_path / "ws").exists(), "the refused runs wrote nothing"
    # once the first run is over, the same command runs (and stops only for want of data)
    after = run_script(kernel)
    assert after.returncode == 2 and "another run" not in after.stderr and "no OpenVaccine data" in after.stderr


def test_stages_of_one_run_all_go_on_under_its_lock(tmp_path):
    """run_all.sh holds the lock and names it in $NT_RUN_LOCK; its own stages do not refuse themselves."""
    sets = isolated(tmp_path / "ws")
    cfg = load_config("smoke", [s for s in sets if s != "--set"])
    path = lock_path(cfg)
    with open(path, "a") as held:
        import fcntl
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        (tmp_path / "empty").mkdir()
        result = subprocess.run([sys.executable, str(REPO / "kernels" / "07_ensemble.py"), "--preset", "smoke", *sets,
                                 "--data-dir", str(tmp_path / "empty")],
                                cwd=REPO, capture_output=True, text=True, env={**os.environ, "NT_RUN_LOCK": str(path)})
    assert "another run" not in result.stderr and "no OpenVaccine data" in result.stderr
