"""What every numbered kernel shares: argument parsing, skip-if-complete, manifests, clean errors."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from .config import Config, ConfigError, Paths, config_hash, git_commit, parse_stage_args
from .io_utils import write_json


class InputError(Exception):
    """Bad user input: the message names the file, the row and the field."""

    def __init__(self, file, problem: str, row=None, field: str | None = None, record: str | None = None):
        where = [str(file)]
        if row is not None:
            where.append(f"row {row}")
        if record is not None:
            where.append(f"record '{record}'")
        if field is not None:
            where.append(f"field '{field}'")
        super().__init__(f"{': '.join(where)}: {problem}")


def manifest_path(cfg: Config, stage: str) -> Path:
    return Paths(cfg).manifests / f"{stage}.json"


def artifact_meta(cfg: Config) -> dict:
    """What every artifact records about how it was made."""
    return {"preset": cfg.preset, "git_commit": git_commit(), "config": cfg.to_dict()}


def is_complete(cfg: Config, stage: str, key: dict) -> bool:
    import json

    path = manifest_path(cfg, stage)
    if not path.exists():
        return False
    manifest = json.loads(path.read_text())
    if manifest.get("key_hash") != config_hash(key):
        return False
    return all(Path(p).exists() for p in manifest.get("outputs", []))


def write_manifest(cfg: Config, stage: str, key: dict, outputs: list, elapsed_s: float, summary: dict) -> None:
    write_json(manifest_path(cfg, stage), {
        "stage": stage, "key": key, "key_hash": config_hash(key), "elapsed_s": round(elapsed_s, 2),
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"), "outputs": [str(p) for p in outputs],
        "summary": summary, **artifact_meta(cfg),
    })


def run_stage(stage: str, description: str, key_fn: Callable[[Config], dict],
              run_fn: Callable[[Config, bool], tuple[list, dict]], argv: list[str] | None = None) -> int:
    """Parse args, skip when outputs are complete, run, record a manifest. Returns an exit code.

    key_fn(cfg) describes the inputs and settings the outputs depend on; run_fn(cfg, force) does
    the work and returns (output paths, summary dict).
    """
    git_commit()  # the code this stage runs, before anyone edits the tree
    try:
        cfg, args = parse_stage_args(description, argv)
        key = key_fn(cfg)
        if not args.force and is_complete(cfg, stage, key):
            print(f"[{stage}] outputs complete for preset '{cfg.preset}': skipped (--force to redo)")
            return 0
        start = time.time()
        outputs, summary = run_fn(cfg, args.force)
        elapsed = time.time() - start
        write_manifest(cfg, stage, key, outputs, elapsed, summary)
        print(f"[{stage}] done in {elapsed:.1f} s: {summary}")
        return 0
    except (InputError, ConfigError) as err:
        print(f"ERROR [{stage}] {err}", file=sys.stderr)
        return 2
