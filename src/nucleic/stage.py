"""What every numbered kernel shares: argument parsing, skip-if-complete, manifests, clean errors."""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from .config import Config, ConfigError, Paths, config_hash, git_commit, load_config, parse_stage_args
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


def decode_text(raw: bytes, file) -> str:
    """A file's bytes as UTF-8 text (a BOM is fine), or one line saying what the file seems to be."""
    if raw[:2] == b"\x1f\x8b":
        raise InputError(file, "gzip-compressed: unpack it first (gunzip)")
    if raw[:4] == b"PK\x03\x04":
        raise InputError(file, "a zip archive: unpack it first")
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff"):
        raise InputError(file, "UTF-16 text: save it as UTF-8")
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(file, f"not UTF-8 text (byte {err.start} is {raw[err.start:err.start + 1]!r}): "
                               "a binary file? save it as UTF-8 text") from None


def read_text(path: Path) -> str:
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found" if not path.exists() else "not a file")
    return decode_text(path.read_bytes(), path)


def manifest_path(cfg: Config, stage: str) -> Path:
    return Paths(cfg).manifests / f"{stage}.json"


def artifact_meta(cfg: Config) -> dict:
    """What every artifact records about how it was made."""
    return {"preset": cfg.preset, "git_commit": git_commit(), "config": cfg.to_dict()}


def is_complete(cfg: Config, stage: str, key: dict) -> bool:
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


def ensure_stage(cfg: Config, name: str, key_fn: Callable[[Config], dict],
                 run_fn: Callable[[Config, bool], tuple[list, dict]]) -> None:
    """Another stage's work that this stage needs (e.g. stage 04's depth models: stage 03 and 06 for
    another model), through the runner: skipped when its manifest `name` is complete, else run and
    recorded under that name, so every artifact has a manifest."""
    key = key_fn(cfg)
    if is_complete(cfg, name, key):
        return
    start = time.time()
    outputs, summary = run_fn(cfg, False)
    write_manifest(cfg, name, key, outputs, time.time() - start, summary)


def claim_work_dir(folder: Path, settings: dict, force: bool) -> Path:
    """The one stale-result rule for a folder of resumable work (checkpoints, per-fold results): work
    stamped with other settings, or --force, is removed (and said so) and redone from scratch; work
    stamped with the same settings resumes. Never reused silently under changed settings."""
    stamp, wanted = folder / "settings.json", config_hash(settings)
    found = json.loads(stamp.read_text()).get("hash") if stamp.exists() else None
    if folder.exists() and any(folder.iterdir()) and (force or found != wanted):
        reason = "--force" if force else ("trained with other settings" if found else "not stamped")
        print(f"{folder}: {reason}; retraining from scratch", flush=True)
        shutil.rmtree(folder)
    write_json(stamp, {"hash": wanted, **settings})
    return folder


def lock_path(cfg: Config) -> Path:
    """The run lock of cfg's work folder. It lives in the system's temporary folder, keyed by the work
    folder's path, so taking it writes nothing into a workspace (a refused or failed stage leaves none)."""
    digest = hashlib.sha1(str(Paths(cfg).run).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"nucleic-run-{digest}.lock"


@contextlib.contextmanager
def run_lock(cfg: Config) -> Iterator[None]:
    """One run at a time per work folder (work/<preset>): an exclusive flock on its lock_path. run_all.sh
    takes it for the whole run and names it in $NT_RUN_LOCK, so its own stages go on under it."""
    path = lock_path(cfg)
    if os.environ.get("NT_RUN_LOCK") == str(path):
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            raise RunLocked(f"{Paths(cfg).run}: another run is using this work folder ({holder}); "
                            "wait for it to finish or stop it") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}, since {time.strftime('%H:%M:%S')}\n")
        handle.flush()
        try:
            yield
        finally:
            handle.seek(0)
            handle.truncate()


class RunLocked(Exception):
    pass


def upstream_key(cfg: Config, upstream: tuple[str, ...]) -> dict:
    """The key hashes of the upstream stages' manifests (None where one has not run)."""
    hashes = {}
    for name in upstream:
        path = manifest_path(cfg, name)
        hashes[name] = json.loads(path.read_text()).get("key_hash") if path.exists() else None
    return hashes


def run_stage(stage: str, description: str, key_fn: Callable[[Config], dict],
              run_fn: Callable[[Config, bool], tuple[list, dict]], argv: list[str] | None = None,
              upstream: tuple[str, ...] = (), verify: Callable[[Config], bool] | None = None) -> int:
    """Parse args, skip when outputs are complete, run, record a manifest. Returns an exit code.

    key_fn(cfg) describes the settings and input files the outputs depend on; `upstream` names the
    stages whose outputs this one reads: their manifests' keys join the key, so a stage redone
    upstream under other settings makes this one stale. verify(cfg), when given, checks the outputs'
    contents beyond their existence (False: redo). run_fn(cfg, force) does the work and returns
    (output paths, summary dict).
    """
    git_commit()  # the code this stage runs, before anyone edits the tree
    try:
        cfg, args = parse_stage_args(description, argv)
        with run_lock(cfg):
            key = {**key_fn(cfg), "upstream": upstream_key(cfg, upstream)} if upstream else key_fn(cfg)
            if not args.force and is_complete(cfg, stage, key) and (verify is None or verify(cfg)):
                print(f"[{stage}] outputs complete for preset '{cfg.preset}': skipped (--force to redo)")
                return 0
            start = time.time()
            outputs, summary = run_fn(cfg, args.force)
            elapsed = time.time() - start
            write_manifest(cfg, stage, key, outputs, elapsed, summary)
        print(f"[{stage}] done in {elapsed:.1f} s: {summary}")
        return 0
    except (InputError, ConfigError, RunLocked) as err:
        print(f"ERROR [{stage}] {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """`python -m nucleic.stage lock-path [stage options]`: where run_all.sh takes the run lock."""
    from .config import stage_argparser

    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] != "lock-path":
        print("usage: python -m nucleic.stage lock-path [--preset P] [--set K=V]...", file=sys.stderr)
        return 2
    parser = stage_argparser("print the run lock's path")
    try:
        args = parser.parse_args(argv[1:])
        cfg = load_config(args.preset, args.overrides, args.data_dir)
    except ConfigError as err:
        print(f"ERROR {err}", file=sys.stderr)
        return 2
    print(lock_path(cfg))
    return 0


if __name__ == "__main__":
    sys.exit(main())
