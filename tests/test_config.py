"""Config: presets over base.yaml, typed CLI overrides, clear errors, data-dir precedence."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from nucleic.config import ConfigError, available_presets, load_config, resolve_data_dir


def test_presets_exist_and_cpu_is_default():
    assert {"smoke", "cpu", "paper"} <= set(available_presets())
    assert load_config().preset == "cpu"


def test_preset_overrides_base_and_cli_overrides_preset():
    assert load_config("cpu").data.max_train is None
    assert load_config("smoke").data.max_train == 40
    cfg = load_config("smoke", overrides=["data.max_train=7", "fold.temperatures=[37]", "fold.backend=arnie"])
    assert cfg.data.max_train == 7 and cfg.fold.temperatures == [37] and cfg.fold.backend == "arnie"


@pytest.mark.parametrize("override, message", [
    ("fold.bogus=1", "unknown config key 'fold.bogus'"),
    ("nonsense=1", "unknown config key 'nonsense'"),
    ("fold.n_jobs", "is not KEY=VALUE"),
    ("train.epochs=abc", "config key 'train.epochs': expected an integer, got 'abc'"),
    ("train.epochs=true", "config key 'train.epochs': expected an integer, got True"),
    ("train.folds=1", "config key 'train.folds': must be at least 2, got 1"),
    ("train.lr=fast", "config key 'train.lr': expected a number, got 'fast'"),
    ("train.bf16=maybe", "config key 'train.bf16': expected true or false or auto, got 'maybe'"),
    ("viral.pos_weight=x", "config key 'viral.pos_weight': expected a number or balanced, got 'x'"),
    ("fold.temperatures=37", "config key 'fold.temperatures': expected a list, got 37"),
    ("model=3", "config key 'model': expected a section of settings, got 3"),
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides=[override])


@pytest.mark.parametrize("override", ["train.bf16=auto", "viral.pos_weight=3", "data.max_train=null",
                                      "train.lr=1", "train.grad_clip=null", "train.column_weights=[1, 1, 0.3, 1, 0.3]"])
def test_values_of_every_accepted_kind_load(override):
    load_config("smoke", overrides=[override])


def test_exponent_without_a_dot_is_a_number():
    """PyYAML alone reads 2e-3 as a string (YAML 1.1); a learning rate typed that way must load as 0.002."""
    cfg = load_config("smoke", overrides=["train.lr=2e-3", "pretrain.lr=1E-4", "train.weight_decay=1e+0"])
    assert (cfg.train.lr, cfg.pretrain.lr, cfg.train.weight_decay) == (0.002, 0.0001, 1.0)
    assert load_config("smoke", overrides=["model.name=e3"]).model.name == "e3"  # a name stays a string


def test_a_bad_value_stops_the_stage_before_force_deletes_anything(tmp_path):
    """--force with a bad value: one line naming the key, exit 2, and the model folder untouched."""
    from conftest import REPO, isolated, run_script

    sets = isolated(tmp_path / "ws")
    models = tmp_path / "ws" / "work" / "smoke" / "models" / "nt" / "fold0"
    models.mkdir(parents=True)
    (models / "best.pt").write_bytes(b"trained weights")
    result = run_script(["python3", str(REPO / "kernels" / "03_train_folds.py"), "--preset", "smoke", *sets,
                         "--force", "--set", "train.epochs=abc"])
    assert result.returncode == 2
    assert result.stderr.strip() == ("ERROR [03_train_folds] config key 'train.epochs': "
                                     "expected an integer, got 'abc'")
    assert (models / "best.pt").read_bytes() == b"trained weights"


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*smoke"):
        load_config("fast")


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("NT_DATA_DIR")
    assert resolve_data_dir(None).name == "input"


def test_a_second_clone_runs_and_writes_into_itself_not_into_the_installed_checkout(tiny_data_dir, tmp_path):
    """The editable install points at one checkout; a second clone's run_all.sh still runs its own package
    and fills its own input/ and work/, and its kernels run alone say so in one line and write nothing."""
    import os
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    clone = tmp_path / "clone"
    for part in ("src", "kernels", "configs"):  # what stage 00 and run_all.sh need (CI may run this on a non-git copy)
        shutil.copytree(repo / part, clone / part, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    shutil.copy2(repo / "run_all.sh", clone / "run_all.sh")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "NT_DATA_DIR")}
    env["PYTHONPATH"] = str(repo / "src")  # stands in for the first checkout's editable install
    stage = [str(clone / "kernels" / "00_prepare_input.py"), "--preset", "smoke", "--data-dir", str(tiny_data_dir)]

    alone = subprocess.run([sys.executable, *stage], cwd=clone, env=env, capture_output=True, text=True)
    assert alone.returncode == 2, alone.stdout + alone.stderr
    lines = [line for line in (alone.stdout + alone.stderr).splitlines() if line.strip()]
    assert len(lines) == 1 and f"kernels/00_prepare_input.py of {clone} imports the nucleic package of {repo}" in lines[0]
    assert not (clone / "input").exists() and not (clone / "work").exists()

    through = subprocess.run(["bash", str(clone / "run_all.sh"), "--preset", "smoke", "--only", "00_prepare_input",
                              "--data-dir", str(tiny_data_dir)], env=env, capture_output=True, text=True)
    assert through.returncode == 0, through.stdout[-2000:] + through.stderr[-2000:]
    manifest = clone / "work" / "smoke" / "manifests" / "00_prepare_input.json"
    assert manifest.exists() and (clone / "work" / "smoke" / "prepared" / "train.pkl").exists()
    assert str(clone) in manifest.read_text() and str(repo) + "/" not in manifest.read_text()
