"""What every numbered kernel shares: argument parsing, skip-if-complete, manifests, clean errors."""
from __future__ import annotations

import contextlib
import errno
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
from .io_utils import DamagedFile, intact, write_json


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

    def __reduce__(self):  # raised on a cluster worker, re-raised here: the message travels whole
        return InputError, (self.args[0].split(": ", 1)[0], self.args[0].split(": ", 1)[1])


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


def read_manifest(cfg: Config, stage: str) -> dict | None:
    """The stage's manifest, or None when there is none or it is damaged (the stage then counts as not run)."""
    path = manifest_path(cfg, stage)
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def outputs_intact(manifest: dict) -> bool:
    """Every output the manifest lists exists and passes its checksum (pickles, checkpoints); a
    damaged one is said and removed, so the stage redoes it (and only what depends on it)."""
    return all([intact(p) for p in manifest.get("outputs", [])])  # a list: check (and remove) every one


def is_complete(cfg: Config, stage: str, key: dict) -> bool:
    manifest = read_manifest(cfg, stage)
    return manifest is not None and manifest.get("key_hash") == config_hash(key) and outputs_intact(manifest)


def recorded_complete(cfg: Config, stage: str) -> bool:
    """The stage has a manifest and all its outputs are intact (whatever its key was)."""
    manifest = read_manifest(cfg, stage)
    return manifest is not None and outputs_intact(manifest)


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
    from .pipeline import Stage, stages

    declared = stages()[name.split(".")[0]]  # e.g. 03_train_folds for 03_train_folds.nt_k1
    stage = Stage(name, key_fn, run_fn, declared.upstream)  # the same key as the runner's for that stage
    key = stage_key(cfg, stage)
    if not up_to_date(cfg, stage, key):
        execute(cfg, stage, False, key)


def stage_needed(cfg: Config, name: str, key_fn: Callable[[Config], dict]) -> bool:
    """Whether ensure_stage(cfg, name, key_fn, ...) would run the stage (its outputs missing or stale)."""
    from .pipeline import Stage, stages

    stage = Stage(name, key_fn, None, stages()[name.split(".")[0]].upstream)
    return not up_to_date(cfg, stage, stage_key(cfg, stage))


STAMP_FILE = "settings.json"  # a work folder's settings and their hash, written by claim_work_dir


def claim_work_dir(folder: Path, settings: dict, force: bool) -> Path:
    """The one stale-result rule for a folder of resumable work (checkpoints, per-fold results): work
    stamped with other settings, or --force, is removed (and said so) and redone from scratch; work
    stamped with the same settings resumes. Never reused silently under changed settings."""
    stamp, wanted = folder / STAMP_FILE, config_hash(settings)
    found = stamp_hash(folder)
    if folder.exists() and any(folder.iterdir()) and (force or found != wanted):
        reason = "--force" if force else ("trained with other settings" if found else "not stamped")
        print(f"{folder}: {reason}; retraining from scratch", flush=True)
        shutil.rmtree(folder)
    if not stamp.exists() or found != wanted:  # (removed above when forced)
        write_json(stamp, {"hash": wanted, **settings})
    return folder


def stamp_hash(folder: Path) -> str | None:
    """The settings hash claim_work_dir stamped `folder` with, or None where it holds no stamp."""
    stamp = folder / STAMP_FILE
    return json.loads(stamp.read_text()).get("hash") if stamp.exists() else None


def stamped_with(folder: Path, settings: dict) -> bool:
    """Whether claim_work_dir stamped `folder` with these settings (a reader's check before it uses work
    that it does not redo itself)."""
    return stamp_hash(folder) == config_hash(settings)


def lock_path(cfg: Config) -> Path:
    """The run lock of cfg's work folder. It lives in the system's temporary folder, keyed by the work
    folder's path, so taking it writes nothing into a workspace (a refused or failed stage leaves none)."""
    share = cfg.train.only_folds  # the jobs of an array, each training its own folds, run side by side
    digest = hashlib.sha1(f"{Paths(cfg).run}{'' if share is None else sorted(share)}".encode()).hexdigest()[:16]
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


def remove_temporaries(folder: Path) -> None:
    """Temporary files of atomic writes that a killed run left in the (locked) work folder."""
    for stale in folder.rglob(".*.tmp") if folder.exists() else ():
        stale.unlink(missing_ok=True)


# Stages that run under torchrun, each process taking its share of every batch (DistributedDataParallel).
DATA_PARALLEL_STAGES = ("02_pretrain",)

# The file system refused a write: no space, no permission, read-only. Not a bug: one line, exit 2.
WRITE_FAILURES = {errno.ENOSPC, errno.EACCES, errno.EPERM, errno.EROFS, errno.EDQUOT}


def upstream_key(cfg: Config, upstream: tuple[str, ...]) -> dict:
    """The key hashes of the upstream stages' manifests (None where one has not run)."""
    return {name: (read_manifest(cfg, name) or {}).get("key_hash") for name in upstream}


def stage_key(cfg: Config, stage) -> dict:
    """The stage's own key plus its upstream stages' keys: a stage redone upstream under other settings
    makes this one stale."""
    key = stage.key(cfg)
    return {**key, "upstream": upstream_key(cfg, stage.upstream)} if stage.upstream else key


def up_to_date(cfg: Config, stage, key: dict) -> bool:
    """The manifest matches `key` (stage_key, computed before the run) and the outputs pass verify."""
    return is_complete(cfg, stage.name, key) and (stage.verify is None or stage.verify(cfg))


def execute(cfg: Config, stage, force: bool, key: dict | None = None) -> tuple[float, dict]:
    """Run the stage and record its manifest under `key` (default: stage_key now); (seconds, summary)."""
    key = stage_key(cfg, stage) if key is None else key
    from .engine import is_main

    if force and is_main():  # redone from scratch: not complete until it finishes again, even if stopped half-way
        manifest_path(cfg, stage.name).unlink(missing_ok=True)
    start = time.time()
    outputs, summary = stage.run(cfg, force)
    elapsed = time.time() - start
    # a job array's share (train.only_folds) completes nothing on its own; under torchrun rank 0 records
    if not summary.get("partial") and is_main():
        write_manifest(cfg, stage.name, key, outputs, elapsed, summary)
    return elapsed, summary


def bring_upstream_up_to_date(cfg: Config, stage, registry: dict, checked: set[str]) -> None:
    """Run every upstream stage (depth first) whose outputs are missing or stale."""
    for name in stage.upstream:
        if name in checked:
            continue
        upstream = registry[name]
        bring_upstream_up_to_date(cfg, upstream, registry, checked)
        try:
            key = stage_key(cfg, upstream)
            current = up_to_date(cfg, upstream, key)
        except InputError:  # its inputs are not at hand now (e.g. no --data-dir): trust its recorded run
            key, current = None, recorded_complete(cfg, name)
        if not current:
            print(f"[{stage.name}] upstream stage {name} is missing or stale: running it first", flush=True)
            elapsed, summary = execute(cfg, upstream, False, key)
            print(f"[{name}] done in {elapsed:.1f} s: {summary}", flush=True)
        checked.add(name)


def run_stage(name: str, description: str, argv: list[str] | None = None) -> int:
    """A kernel's whole job: parse args, bring upstream stages up to date, skip when this stage's outputs
    are complete (else run it and record a manifest). The stage itself is declared in pipeline.py.
    Returns the exit code: 0 done, 2 bad input or config (one line)."""
    git_commit()  # the code this stage runs, before anyone edits the tree
    try:
        cfg, args = parse_stage_args(description, argv)
        from . import cluster, engine
        from .pipeline import stages

        registry = stages()
        stage = registry[name]
        if engine.launched_by_torchrun() and name not in DATA_PARALLEL_STAGES:
            raise ConfigError(f"{name} does not run under torchrun (only {', '.join(DATA_PARALLEL_STAGES)})")
        with engine.process_group(cfg.train.device):
            main = engine.is_main()  # under torchrun rank 0 takes the lock, brings upstream up to date, records
            with run_lock(cfg) if main else contextlib.nullcontext(), cluster.session(cfg.cluster):
                if main:
                    if cfg.train.only_folds is None:  # (beside an array's other jobs, their files are not stale)
                        remove_temporaries(Paths(cfg).run)
                    bring_upstream_up_to_date(cfg, stage, registry, set())
                key = engine.broadcast(stage_key(cfg, stage) if main else None)
                if engine.broadcast(not args.force and main and up_to_date(cfg, stage, key)):
                    if main:
                        print(f"[{name}] outputs complete for preset '{cfg.preset}': skipped (--force to redo)")
                    return 0
                elapsed, summary = execute(cfg, stage, args.force, key)
        if main:
            print(f"[{name}] done in {elapsed:.1f} s: {summary}")
        return 0
    except (InputError, ConfigError, RunLocked) as err:
        print(f"ERROR [{name}] {err}", file=sys.stderr)
        return 2
    except DamagedFile as err:
        err.path.unlink(missing_ok=True)
        print(f"ERROR [{name}] {err}: removed; run again to have it redone", file=sys.stderr)
        return 2
    except OSError as err:
        if err.errno not in WRITE_FAILURES:
            raise
        print(f"ERROR [{name}] {err.filename}: cannot write: {err.strerror} (check free space and permissions; "
              "the stage resumes where it stopped)", file=sys.stderr)
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
