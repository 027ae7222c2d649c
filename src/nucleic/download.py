"""Fetch the data a run needs and does not find: OpenVaccine through the Kaggle API (the user's
credentials), the promoter, viral and mirna sets from the public repositories of their papers, each file
verified by SHA-256 and written atomically into input/<task>/ in the layout the stages read.

    python -m nucleic.download [--preset P] [--data-dir DIR] [--set KEY=VALUE] [TASK ...]

run_all.sh calls it for the tasks of the stages it is about to run. Without network or credentials it
stops with one line saying what to put where (exit 2) and writes nothing.
"""
from __future__ import annotations

import base64
import hashlib
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from .config import Config, ConfigError, Paths, load_config, stage_argparser
from .stage import InputError

GITHUB_RAW = "https://raw.githubusercontent.com"
NT_REPO = f"{GITHUB_RAW}/Shujun-He/Nucleic-Transformer/043b96013480ae0c6091af8ff224ebd697fd4088"
VIRAMINER_REPO = f"{GITHUB_RAW}/NeuroCSUT/ViraMiner/4c4bf96714baf701e3a4fce1fa59e1d57aa6c2e2"
MIRTRON_REPOS = (f"{GITHUB_RAW}/zhengxueming/cnnMirtronPred/master",  # seed 000's repository
                 f"{GITHUB_RAW}/ChiquittoBioinfo/cnnMirtronPred/a1a4072d5889f52ddadc5967f65e91ad1cfef3d7")
KAGGLE_COMPETITION = "stanford-covid-vaccine"
TASKS = ("openvaccine", "promoter", "viral", "mirna")


@dataclass(frozen=True)
class RemoteFile:
    task: str
    name: str  # file name under input/<task>/
    urls: tuple[str, ...]  # tried in order
    sha256: str  # of the file as written (after `drop_header`)
    drop_header: bool = False  # the source has a header line the stages' layout does not


def _viral(name: str, sha256: str) -> RemoteFile:
    return RemoteFile("viral", name, (f"{VIRAMINER_REPO}/data/DNA_data/{name}",), sha256)


def _mirna(name: str, sha256: str) -> RemoteFile:
    return RemoteFile("mirna", name, tuple(f"{repo}/data/{name}" for repo in MIRTRON_REPOS), sha256, True)


PUBLIC_FILES = (
    RemoteFile("promoter", "v9d3.csv", (f"{NT_REPO}/src/Ecoli_Promoter_classification/v9d3.csv",),
               "5d2ba3e08be7085222c2cabde32266e06c52d38d5307a903c678b36eeb4964a5"),
    _viral("exp1_2011_N19.csv", "d0a307e52b12e3b4014ad175c2ef2f8344e45343890475bee4bb4eae67978050"),
    _viral("exp2_2013_E2_SCC.csv", "cea3fce4d69b153021062460a41813fb993bde8e332dd15b9a21a44769b3c249"),
    _viral("exp3_2013_H4.csv", "2bf9fc4af2366201a6ff14a0ed9215b2c2836544482cd094b239931c621b21ff"),
    _viral("exp5_2014_D3.csv", "ee62b95b056a524a94b72c59b5a582ef23e025ead59dc9bfde2cab9239618a6d"),
    _viral("exp11_2014_G7.csv", "cbd57bde27f6f6afe7993429c162dfae63e0e53e843da351f366cbff0b652315"),
    _viral("exp13_2014_N1.csv", "3e1e4cc39e67524a9936ada46be70f489e9a8ee5b63d5f7150c2e8054eb0bf8f"),
    _viral("exp17_2015_F2.csv", "d17cd86b65f6e76644aec1c7d80183f841f4e821cc734b5d3aaf1a1ac8de8b5f"),
    _mirna("miRBase_set.csv", "8090fffe5bf679764efa3efe38f8b090ba8d552223fedfc7ee6e39465e7da854"),
    _mirna("putative_mirtrons_set.csv", "2e0978612670291ce579c2cebf068ca1146573aa709ff18c15dc0bf37b3b6bc0"),
)


class DownloadError(InputError):
    """What could not be fetched, and what to put where instead (one line)."""

    def __init__(self, problem: str):
        Exception.__init__(self, problem)


# ---------------------------------------------------------------- what is there

def task_present(cfg: Config, task: str, files=None) -> bool:
    """Whether the stages will find `task`'s data: in the data folder (any supported layout) or in input/."""
    from .data import locate_openvaccine

    for folder in _search_folders(cfg):
        if task == "openvaccine":
            try:
                locate_openvaccine(folder)
                return True
            except InputError:
                continue
        elif task == "viral" and any((folder / task).glob("exp*.csv")):  # any experiments: the user's own too
            return True
        elif task != "viral" and all((folder / task / f.name).is_file() for f in files or PUBLIC_FILES
                                     if f.task == task):
            return True
    return False


def _search_folders(cfg: Config) -> list[Path]:
    folders = [Path(cfg.data_dir), Paths(cfg).input]
    return [f for i, f in enumerate(folders) if f not in folders[:i]]


# ---------------------------------------------------------------- public files

def fetch_public(cfg: Config, task: str, files=None) -> list[Path]:
    """Every missing file of `task` into input/<task>/, checksum-verified; nothing is written for a file
    that fails. Returns the files written."""
    written = []
    from .io_utils import write_bytes

    for remote in (f for f in files or PUBLIC_FILES if f.task == task):
        target = Paths(cfg).input / task / remote.name
        if target.is_file():
            continue
        write_bytes(target, _download_first(cfg, remote, target))
        written.append(target)
    return written


def _download_first(cfg: Config, remote: RemoteFile, target: Path) -> bytes:
    """The file's verified bytes from the first of its URLs that answers."""
    failures = []
    for url in (mirrored(u, cfg.download.mirror) for u in remote.urls):
        try:
            raw = _get(url, cfg.download.timeout_s)
        except (urllib.error.URLError, OSError, ValueError) as err:
            failures.append(f"{url}: {_describe(err)}")
            continue
        data = _without_header(raw) if remote.drop_header else raw
        digest = hashlib.sha256(data).hexdigest()
        if digest != remote.sha256:
            failures.append(f"{url}: SHA-256 {digest[:12]}... is not the expected {remote.sha256[:12]}...")
            continue
        return data
    raise DownloadError(f"cannot fetch {remote.task}/{remote.name} ({'; '.join(failures)}): put the file at "
                        f"{target} (SHA-256 {remote.sha256}) or point NT_DATA_DIR / --data-dir at a folder "
                        f"holding {remote.task}/{remote.name}")


def mirrored(url: str, mirror: str | None) -> str:
    """`url` with its GitHub raw host replaced by `mirror` (a local copy of the same paths), when set."""
    if mirror and url.startswith(GITHUB_RAW):
        return mirror.rstrip("/") + url[len(GITHUB_RAW):]
    return url


def _get(url: str, timeout: float, headers: dict | None = None) -> bytes:
    request = urllib.request.Request(url, headers={"User-Agent": "nucleic-transformer-data", **(headers or {})})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return response.read()


def _describe(err: Exception) -> str:
    if isinstance(err, urllib.error.HTTPError):
        return f"HTTP {err.code} {err.reason}"
    return str(getattr(err, "reason", err))


def _without_header(raw: bytes) -> bytes:
    """Drop a first line that is a header (its last field is not a TRUE/FALSE label)."""
    first, _, rest = raw.partition(b"\n")
    label = first.rstrip(b"\r").rsplit(b",", 1)[-1].strip().upper()
    return rest if label not in (b"TRUE", b"FALSE") else raw


# ---------------------------------------------------------------- OpenVaccine (Kaggle)

def kaggle_credentials() -> tuple[str, str] | None:
    """(username, key) from $KAGGLE_USERNAME/$KAGGLE_KEY or kaggle.json ($KAGGLE_CONFIG_DIR or ~/.kaggle)."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return os.environ["KAGGLE_USERNAME"], os.environ["KAGGLE_KEY"]
    folder = Path(os.environ.get("KAGGLE_CONFIG_DIR") or Path.home() / ".kaggle")
    try:
        saved = json.loads((folder / "kaggle.json").read_text())
        return str(saved["username"]), str(saved["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def fetch_openvaccine(cfg: Config) -> list[Path]:
    """train.json and test.json through the Kaggle API into input/openvaccine/, each parsed and validated
    before it is written; train.json keeps the rows with signal_to_noise >= download.min_signal_to_noise
    (our bundle's subset; null keeps all 2,400)."""
    from .data import parse_json_lines, validate_records
    from .io_utils import write_bytes

    where = f"{Paths(cfg).input / 'openvaccine'}/ (or {KAGGLE_COMPETITION}.zip into {Paths(cfg).input}/)"
    credentials = kaggle_credentials()
    if credentials is None:
        raise DownloadError(f"OpenVaccine: no Kaggle credentials (~/.kaggle/kaggle.json or KAGGLE_USERNAME/"
                            f"KAGGLE_KEY; kaggle.com > Settings > Create New Token, and accept the competition's "
                            f"rules): or put train.json and test.json from kaggle.com/c/{KAGGLE_COMPETITION}/data "
                            f"into {where}")
    contents = {}
    for split in ("train", "test"):
        name = f"{split}.json"
        raw = _kaggle_file(cfg, name, credentials, where)
        if split == "train" and cfg.download.min_signal_to_noise is not None:
            raw = _keep_signal(raw, cfg.download.min_signal_to_noise)
        validate_records(parse_json_lines(raw, f"{KAGGLE_COMPETITION}/{name}"), f"{KAGGLE_COMPETITION}/{name}", split)
        contents[name] = raw
    targets = []
    for name, raw in contents.items():  # both checked before either is written
        target = Paths(cfg).input / "openvaccine" / name
        write_bytes(target, raw)
        targets.append(target)
    return targets


def _kaggle_file(cfg: Config, name: str, credentials: tuple[str, str], where: str) -> bytes:
    """One competition file's bytes: the `kaggle` command when installed, else the Kaggle REST API."""
    command = shlex.split(cfg.download.kaggle_command or "")
    if command and shutil.which(command[0]):
        with tempfile.TemporaryDirectory() as folder:
            result = subprocess.run([*command, "competitions", "download", "-c", KAGGLE_COMPETITION, "-f", name,
                                     "-p", folder, "--quiet"], capture_output=True, text=True)
            got = sorted(Path(folder).iterdir())
            if result.returncode != 0 or not got:
                reason = (result.stderr or result.stdout).strip().splitlines()[-1:] or ["no file"]
                raise DownloadError(f"OpenVaccine: `{command[0]} competitions download` failed ({reason[0]}): "
                                    f"accept the rules at kaggle.com/c/{KAGGLE_COMPETITION}, or put {name} into {where}")
            return _unzipped(got[0].read_bytes(), name)
    url = f"{cfg.download.kaggle_api.rstrip('/')}/competitions/data/download/{KAGGLE_COMPETITION}/{name}"
    token = base64.b64encode(":".join(credentials).encode()).decode()
    try:
        raw = _get(url, cfg.download.timeout_s, {"Authorization": f"Basic {token}"})
    except (urllib.error.URLError, OSError, ValueError) as err:
        raise DownloadError(f"OpenVaccine: cannot fetch {name} from the Kaggle API ({url}: "
                            f"{_describe(err)}; accepted the competition's rules?): put {name} "
                            f"into {where}") from None
    return _unzipped(raw, name)


def _unzipped(raw: bytes, name: str) -> bytes:
    """Kaggle may send a file zipped: its member `name` (or the only member)."""
    if not raw.startswith(b"PK"):
        return raw
    with zipfile.ZipFile(io.BytesIO(raw)) as archive:
        members = [m for m in archive.namelist() if m.rsplit("/", 1)[-1] == name] or archive.namelist()
        return archive.read(members[0])


def _keep_signal(raw: bytes, minimum: float) -> bytes:
    """The JSON lines whose signal_to_noise >= minimum, byte for byte."""
    kept = [line for line in raw.splitlines(keepends=True)
            if line.strip() and float(json.loads(line).get("signal_to_noise", 0.0)) >= minimum]
    return b"".join(kept)


# ---------------------------------------------------------------- entry points

def ensure_data(cfg: Config, tasks=TASKS) -> dict[str, list[Path]]:
    """Fetch every task in `tasks` whose data the stages would not find; {task: files written}."""
    fetched = {}
    for task in tasks:
        if task_present(cfg, task):
            continue
        looked = " nor ".join(str(f) for f in _search_folders(cfg))
        print(f"[download] {task}: not found in {looked}; fetching", flush=True)
        fetched[task] = fetch_openvaccine(cfg) if task == "openvaccine" else fetch_public(cfg, task)
        print(f"[download] {task}: {len(fetched[task])} file(s) written to {Paths(cfg).input / task}", flush=True)
    return fetched


def tasks_of_stages(names: list[str]) -> list[str]:
    """The data each stage needs: 00-07 OpenVaccine, 10 promoter, 11 viral, 12 mirna."""
    needed = []
    for name in names:
        number = int(name[:2])
        task = {10: "promoter", 11: "viral", 12: "mirna"}.get(number, "openvaccine" if number < 10 else None)
        if task and task not in needed:
            needed.append(task)
    return needed


def main(argv: list[str] | None = None) -> int:
    parser = stage_argparser(__doc__.splitlines()[0])
    parser.add_argument("items", nargs="*", metavar="TASK_OR_STAGE",
                        help=f"tasks ({', '.join(TASKS)}) or stage names (default: every task)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.preset, args.overrides, args.data_dir)
        items = args.items or list(TASKS)
        unknown = [i for i in items if i not in TASKS and not i[:2].isdigit()]
        if unknown:
            raise ConfigError(f"unknown task '{unknown[0]}' (tasks: {', '.join(TASKS)}, or stage names)")
        tasks = [i for i in items if i in TASKS] + tasks_of_stages([i for i in items if i not in TASKS])
        ensure_data(cfg, list(dict.fromkeys(tasks)))
    except (InputError, ConfigError) as err:
        print(f"ERROR [download] {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
