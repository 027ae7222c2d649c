"""Config: presets over base.yaml, typed CLI overrides, clear errors, data-dir precedence."""
from __future__ import annotations

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
])
def test_bad_overrides(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config("smoke", overrides=[override])


def test_unknown_preset_lists_the_available_ones():
    with pytest.raises(ConfigError, match="unknown preset 'fast'.*smoke"):
        load_config("fast")


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("NT_DATA_DIR", str(tmp_path / "env"))
    assert resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"
    assert resolve_data_dir(None) == tmp_path / "env"
    monkeypatch.delenv("NT_DATA_DIR")
    assert resolve_data_dir(None).name == "input"
