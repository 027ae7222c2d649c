"""Atomic artifact writing: every file appears whole or not at all. Reading back: pickles carry a
SHA-256 of their bytes, checkpoints and shards (zip archives) the CRC-32 of every member, so a truncated
or altered artifact is found (DamagedFile) instead of being used."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it onto `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):  # left by a killed writer (runs hold the work lock)
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def copy_file(src: str | Path, dst: str | Path) -> None:
    with atomic_path(dst) as tmp:
        shutil.copyfile(src, tmp)


def write_csv(path: str | Path, frame, float_format: str | None = "%.6g") -> None:
    """A pandas DataFrame as CSV without its index (6 significant digits for floats)."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, index=False, float_format=float_format)


class DamagedFile(Exception):
    """An artifact of this project that fails its checksum or cannot be read back."""

    def __init__(self, path: str | Path, why: str):
        self.path, self.why = Path(path), why
        super().__init__(f"{path}: damaged ({why})")


_PICKLE_HEADER = b"NUCLEIC-PICKLE sha256="
_DIGEST_END = len(_PICKLE_HEADER) + 64


def write_pickle(path: str | Path, obj) -> None:
    """A pickle behind a one-line header holding the SHA-256 of its bytes (read_pickle checks it)."""
    import pickle

    payload = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    write_bytes(path, _PICKLE_HEADER + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)


def _checked_pickle_bytes(path: Path) -> bytes:
    raw = path.read_bytes()
    if not raw.startswith(_PICKLE_HEADER):
        raise DamagedFile(path, "no checksum header: not written by this version of the code")
    payload = raw[_DIGEST_END + 1:]
    if hashlib.sha256(payload).hexdigest().encode() != raw[len(_PICKLE_HEADER):_DIGEST_END]:
        raise DamagedFile(path, "checksum mismatch: truncated or altered")
    return payload


def read_pickle(path: str | Path):
    """What write_pickle wrote, after checking its checksum (DamagedFile if it fails)."""
    import pickle

    payload = _checked_pickle_bytes(Path(path))
    try:
        return pickle.loads(payload)
    except Exception as err:  # checksum fine but unreadable here, e.g. pickled by another pandas
        raise DamagedFile(path, f"cannot be unpickled: {type(err).__name__}") from None


def check_zip(path: str | Path) -> None:
    """DamagedFile unless `path` is a whole zip archive (checkpoints, shards) whose members match their CRC-32."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, EOFError, ValueError) as err:
        raise DamagedFile(path, f"not a readable zip archive: {err}") from None
    if bad is not None:
        raise DamagedFile(path, f"member {bad} fails its CRC-32 check: truncated or altered")


def check_artifact(path: str | Path) -> None:
    """DamagedFile if an artifact with a checksum (a .pkl or .pt this project wrote) fails its check."""
    path = Path(path)
    if path.suffix == ".pkl":
        _checked_pickle_bytes(path)
    elif path.suffix == ".pt":
        check_zip(path)


def read_cache(path: str | Path):
    """A cached piece of work (pickle), or None when it is missing or damaged; a damaged one is said and
    removed, so the caller redoes just that piece."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        return read_pickle(path)
    except DamagedFile as err:
        discard(err)
        return None


def intact(path: str | Path) -> bool:
    """The artifact exists and passes its check; a damaged one is said and removed."""
    path = Path(path)
    if not path.exists():
        return False
    try:
        check_artifact(path)
    except DamagedFile as err:
        discard(err)
        return False
    return True


def discard(err: DamagedFile) -> None:
    print(f"{err}: removed; redoing it", flush=True)
    err.path.unlink(missing_ok=True)


_FIXED_ZIP_TIME = (2020, 1, 1, 0, 0, 0)


def write_npz(path: str | Path, arrays: dict[str, np.ndarray]) -> None:
    """Like np.savez_compressed, but byte-reproducible: sorted members, fixed timestamps."""
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
        for name in sorted(arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_FIXED_ZIP_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            with zf.open(info, "w") as f:
                np.lib.format.write_array(f, np.asanyarray(arrays[name]), allow_pickle=False)


def read_npz(path: str | Path) -> dict[str, np.ndarray]:
    with np.load(path, allow_pickle=False) as npz:
        return {name: npz[name] for name in npz.files}
