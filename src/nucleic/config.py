"""One configuration system for every stage: `configs/base.yaml`, a preset on top, CLI overrides last.

    cfg = load_config("smoke", overrides=["fold.n_jobs=1"])
    cfg.fold.n_jobs  # -> 1
"""
from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]  # the checkout: configs/, input/, work/ (editable install)
CONFIG_DIR = REPO_ROOT / "configs"
DEFAULT_PRESET = "cpu"


class ConfigError(ValueError):
    pass


class Config(dict):
    """A dict whose keys also read as attributes (nested dicts included)."""

    def __init__(self, data=None):
        super().__init__()
        for key, value in (data or {}).items():
            self[key] = Config(value) if isinstance(value, dict) else value

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(f"config has no key {key!r}") from None

    def to_dict(self) -> dict:
        return json.loads(json.dumps(self))


def available_presets() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml") if p.stem != "base")


class _Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where a float needs a dot: 2e-3 would load as the string '2e-3'. Here it is
    the number, as in YAML 1.2 and as a user typing --set train.lr=2e-3 means it."""


_Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+$"),
                              list("-+0123456789"))


def _load_yaml(text):
    return yaml.load(text, Loader=_Loader)


def _read_yaml(path: Path) -> dict:
    with open(path) as f:
        return _load_yaml(f) or {}


# By hand rather than OmegaConf: the merge with unknown-key errors and the KEY=VALUE parser are 25 lines,
# and every stage hashes, JSON-dumps and dict()-copies config sections, which OmegaConf's DictConfig
# would turn into to_container calls everywhere; a dict subclass keeps them plain.
def _merge(base: dict, update: dict, where: str = "") -> dict:
    out = copy.deepcopy(base)
    for key, value in update.items():
        name = f"{where}{key}"
        if key not in out:
            raise ConfigError(f"unknown config key '{name}'")
        if isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value, f"{name}.")
        else:
            out[key] = value
    return out


def _parse_override(text: str) -> dict:
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not KEY=VALUE")
    dotted, raw = text.split("=", 1)
    value = _load_yaml(raw) if raw.strip() else None
    nested: dict = value
    for part in reversed(dotted.strip().split(".")):
        nested = {part: nested}
    return nested


# Every value is checked against its default's type when the config loads, before any stage touches a
# file. Keys whose default (null, or one of two kinds) does not tell the type say it here; "?" = or null.
KINDS = {
    "data.max_train": "int?", "data.max_test": "int?", "download.mirror": "str?",
    "download.kaggle_command": "str?", "download.min_signal_to_noise": "number?", "download.timeout_s": "number",
    "train.grad_clip": "number?", "pretrain.grad_clip": "number?", "train.init_weights": "str?", "train.val_structures": "int?",
    "train.column_weights": "list?", "train.only_folds": "list?",
    "cluster.address": "str?", "cluster.local_workers": "int?", "train.bf16": "bool|auto", "train.channels_last": "bool|auto",
    "promoter.linear": "dict?", "viral.run_context": "dict?",
    "*.kmer_branch": "dict?", "*.pos_weight": "number|balanced", "*.negatives_per_positive": "number?", "*.max_rows": "int?",
}
MINIMA = {"cluster.local_workers": 1, "train.folds": 2, "train.epochs": 0, "train.batch_size": 1, "train.eval_batch_size": 1,
          "train.eval_every": 1, "train.lr": 0, "pretrain.epochs": 0, "pretrain.batch_size": 1,
          "model.nlayer": 1, "model.d_model": 1, "model.nhead": 1, "semi.pseudo_epochs": 0,
          "semi.finetune_epochs": 0, "*.folds": 2, "*.epochs": 0, "*.batch_size": 1, "viral.run_context.min_run": 2}
KIND_NAMES = {"int": "an integer", "number": "a number", "bool": "true or false", "str": "a string",
              "list": "a list", "auto": "auto", "balanced": "balanced", "dict": "a section"}


def _kind_of(value) -> str | None:
    for kind, types in (("bool", bool), ("int", int), ("number", float), ("str", str), ("list", list), ("dict", dict)):
        if isinstance(value, types):
            return kind
    return None


def _accepts(kind: str, value) -> bool:
    if kind == "auto" or kind == "balanced":
        return value == kind
    if kind == "number":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    return _kind_of(value) == kind


def _lookup(table: dict, name: str):
    return table.get(name, table.get("*." + name.rsplit(".", 1)[-1]))


def check_types(merged: dict, base: dict, where: str = "") -> None:
    """ConfigError naming the first value whose type (or range) does not fit its key."""
    for key, default in base.items():
        name, value = f"{where}{key}", merged.get(key)
        if isinstance(default, dict):
            if value is None and (_lookup(KINDS, name) or "").endswith("?"):
                continue  # a section that may be switched off
            if not isinstance(value, dict):
                raise ConfigError(f"config key '{name}': expected a section of settings, got {value!r}")
            check_types(value, default, f"{name}.")
            continue
        spec = _lookup(KINDS, name) or (_kind_of(default) if default is not None else None)
        if spec is None:
            continue
        nullable, kinds = spec.endswith("?"), spec.rstrip("?").split("|")
        if not (value is None and nullable) and not any(_accepts(k, value) for k in kinds):
            expected = " or ".join(KIND_NAMES[k] for k in kinds) + (" or null" if nullable else "")
            raise ConfigError(f"config key '{name}': expected {expected}, got {value!r}")
        minimum = _lookup(MINIMA, name)
        if minimum is not None and isinstance(value, (int, float)) and not isinstance(value, bool) and value < minimum:
            raise ConfigError(f"config key '{name}': must be at least {minimum}, got {value!r}")


def load_config(preset: str = DEFAULT_PRESET, overrides: list[str] | None = None,
                data_dir: str | None = None) -> Config:
    path = CONFIG_DIR / f"{preset}.yaml"
    if not path.exists():
        raise ConfigError(f"unknown preset '{preset}' (available: {', '.join(available_presets())})")
    base = _read_yaml(CONFIG_DIR / "base.yaml")
    merged = _merge(base, _read_yaml(path))
    for text in overrides or []:
        merged = _merge(merged, _parse_override(text))
    check_types(merged, base)
    merged["preset"] = preset
    merged["data_dir"] = str(resolve_data_dir(data_dir, REPO_ROOT / merged["paths"]["input"]))
    return Config(merged)


def with_settings(cfg: Config, **dotted) -> Config:
    """A copy of cfg with some values replaced, e.g. with_settings(cfg, **{"model.nlayer": 3})."""
    merged = cfg.to_dict()
    for key, value in dotted.items():
        merged = _merge(merged, _parse_override(f"{key}={json.dumps(value)}"))
    return Config(merged)


def resolve_data_dir(data_dir: str | None, default: Path = REPO_ROOT / "input") -> Path:
    """--data-dir, else $NT_DATA_DIR, else the input folder (paths.input, where stage 00 copies the data)."""
    chosen = data_dir or os.environ.get("NT_DATA_DIR") or str(default)
    return Path(chosen).expanduser().resolve()


def config_hash(section) -> str:
    blob = json.dumps(section, sort_keys=True, default=str).encode()
    return hashlib.sha1(blob).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def git_commit() -> str:
    """HEAD commit of the repository, suffixed '-dirty' when the tree has changes. Read once per process
    (run_stage reads it first thing), so an artifact names the code its stage started with."""
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                               cwd=REPO_ROOT, capture_output=True, text=True).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def config_argparser(description: str) -> argparse.ArgumentParser:
    """The options every stage and benchmark takes to build its config: --preset, --data-dir, --set."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default=os.environ.get("NT_PRESET", DEFAULT_PRESET),
                        help=f"config preset from configs/ (default: $NT_PRESET, then {DEFAULT_PRESET})")
    parser.add_argument("--data-dir", default=None,
                        help="raw data folder (default: $NT_DATA_DIR, then input/)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set fold.n_jobs=1 (repeatable)")
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    check_own_checkout(sys.argv[0])
    return load_config(args.preset, args.overrides, args.data_dir)


def check_own_checkout(script: str) -> None:
    """A stage or benchmark script must run the package of its own checkout. With a second clone and the
    first one's editable install, the imported package (and so REPO_ROOT: configs/, input/, work/, oof/)
    would be the first clone's, and the second clone's run would write there."""
    path = Path(script).resolve()
    home = path.parents[1]
    if path.parent.name in ("kernels", "benchmarks") and (home / "src" / "nucleic").is_dir() and home != REPO_ROOT:
        raise ConfigError(f"{path.parent.name}/{path.name} of {home} imports the nucleic package of {REPO_ROOT} "
                          f"and would write into that checkout: run it through {home}/run_all.sh, or with "
                          f"PYTHONPATH={home}/src, or pip install -e {home} first")


def stage_argparser(description: str) -> argparse.ArgumentParser:
    parser = config_argparser(description)
    parser.add_argument("--force", action="store_true", help="redo the stage even if its outputs are complete")
    return parser


def parse_stage_args(description: str, argv: list[str] | None = None) -> tuple[Config, argparse.Namespace]:
    args = stage_argparser(description).parse_args(argv)
    return config_from_args(args), args


class Paths:
    """Where every stage reads and writes; relative config paths are under the repository root."""

    def __init__(self, cfg: Config):
        root = lambda p: (REPO_ROOT / p).resolve()  # absolute paths stay absolute
        self.input = root(cfg.paths.input)
        self.work = root(cfg.paths.work)
        self.run = self.work / cfg.preset  # per-preset caches and checkpoints
        self.prepared = self.run / "prepared"
        self.manifests = self.run / "manifests"
        self.structures = root(cfg.paths.structures)  # keyed by sequence: shared by presets
        self.oof = root(cfg.paths.oof)
        self.submissions = root(cfg.paths.submissions)
        self.figures = root(cfg.paths.figures)
