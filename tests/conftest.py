"""Shared fixtures: real slices of the data bundle, isolated workspaces, kernel runners."""
from __future__ import annotations

import importlib.util
import json
import os
import pickle
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# scripts the tests start import this checkout's package too (pyproject's pythonpath covers this process)
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # pytest -n N: N workers share the cores, so each (and every stage it starts) computes on one thread;
    # two torch jobs of 2 threads each on 2 cores wait on each other and run many times slower
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"


def find_data_dir() -> Path | None:
    """The real data bundle: $NT_DATA_DIR, else ../shared/data beside the checkout, else input/ (or None)."""
    candidates = [os.environ.get("NT_DATA_DIR"), REPO.parent / "shared" / "data", REPO / "input"]
    for candidate in filter(None, candidates):
        if (Path(candidate) / "openvaccine" / "train.json").exists():
            return Path(candidate)
    return None


DATA_FIXTURES = {"data_dir", "real_data_dir"}  # every test that reads a data file uses one, directly or not


def pytest_addoption(parser):
    parser.addoption("--data-tests-only", action="store_true",
                     help="run only the tests that use a data fixture (what changes without the real bundle)")


def pytest_collection_modifyitems(config, items):
    if not config.getoption("--data-tests-only"):
        return
    kept, dropped = [], []
    for item in items:
        (kept if DATA_FIXTURES & set(getattr(item, "fixturenames", ())) else dropped).append(item)
    config.hook.pytest_deselected(items=dropped)
    items[:] = kept


def pytest_report_header(config) -> str:
    found = find_data_dir()
    if found:
        return f"data: the real bundle at {found} (tests on real slices run too)"
    return "data: no bundle found (NT_DATA_DIR, ../shared/data, input/): tests run on a generated one"


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    """The real bundle, for tests of facts about the real files; skipped (with the reason) without it."""
    found = find_data_dir()
    if found is None:
        pytest.skip("needs the real data bundle (set NT_DATA_DIR; see README): checks facts of the real files")
    return found


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """The real bundle when it is at hand, else a small generated one in the same layout."""
    from synthetic_data import write_synthetic_bundle

    return find_data_dir() or write_synthetic_bundle(tmp_path_factory.mktemp("generated_data"))


def read_rows(data_dir: Path, split: str, n: int | None = None) -> list[dict]:
    rows = []
    with open(data_dir / "openvaccine" / f"{split}.json") as f:
        for line in f:
            rows.append(json.loads(line))
            if n is not None and len(rows) == n:
                break
    return rows


@pytest.fixture(scope="session")
def train_rows(data_dir) -> list[dict]:
    return read_rows(data_dir, "train", 12)


@pytest.fixture(scope="session")
def test_rows(data_dir) -> list[dict]:
    """Six public (107 nt) and six private (130 nt) test rows."""
    rows = read_rows(data_dir, "test")
    return [r for r in rows if r["seq_length"] == 107][:6] + [r for r in rows if r["seq_length"] == 130][:6]


def write_json_lines(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def tiny_data_dir(tmp_path, train_rows, test_rows) -> Path:
    """A data folder in our bundle layout holding a dozen real train and test rows."""
    folder = tmp_path / "data"
    write_json_lines(folder / "openvaccine" / "train.json", train_rows)
    write_json_lines(folder / "openvaccine" / "test.json", test_rows)
    return folder


def isolated(workspace: Path) -> list[str]:
    """--set overrides that send every artifact of a stage into `workspace`."""
    sets = []
    for key in ("input", "work", "structures", "oof", "submissions", "figures"):
        sets += ["--set", f"paths.{key}={workspace / key}"]
    return sets


def built_once(tmp_path_factory, name: str, build):
    """A session fixture's value, build(empty folder), made once per test run: here, or under pytest -n by
    the first worker that needs it while the others wait and then share it (read-only: tests copy it).
    Two workers building the smoke pipeline side by side would each take twice as long."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not worker:
        return build(tmp_path_factory.mktemp(name))
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp().parent  # this run's folder, common to its workers
    saved = shared / f"{name}.pickle"
    with FileLock(str(shared / f"{name}.lock")):
        if not saved.exists():
            folder = shared / f"{name}_{worker}"  # a failed build leaves its folder; a retry takes its own
            folder.mkdir()
            saved.write_bytes(pickle.dumps(build(folder)))
    return pickle.loads(saved.read_bytes())


@pytest.fixture(scope="session")
def folded_workspace(data_dir, tmp_path_factory):
    """Stages 00 and 01 (smoke) done once per test run; tests copy it (copy_of)."""
    def build(workspace):
        args = ["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace)]
        assert load_kernel("00_prepare_input").main(args) == 0
        assert load_kernel("01_fold_structures").main(args) == 0
        return workspace

    return built_once(tmp_path_factory, "folded", build)


def copy_of(workspace: Path, target: Path) -> Path:
    shutil.copytree(workspace, target)
    return target


def load_kernel(name: str):
    spec = importlib.util.spec_from_file_location(f"kernel_{name}", REPO / "kernels" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_script(args: list[str], env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, cwd=REPO, env=full_env, capture_output=True, text=True, **kwargs)


def run_all(workspace: Path, *args: str) -> subprocess.CompletedProcess:
    """bash run_all.sh on the smoke preset, every artifact inside `workspace`."""
    return run_script(["bash", "run_all.sh", "--preset", "smoke", *isolated(workspace), *args],
                      env={"NT_LOG_DIR": str(workspace / "logs")}, timeout=1200)


@pytest.fixture(scope="session")
def smoke_run(data_dir, tmp_path_factory):
    """The whole smoke pipeline, run once per test run: (workspace, run_all.sh's result). Read-only: tests
    that change files work on relocated_copy(workspace, ...)."""
    def build(workspace):
        result = run_all(workspace, "--data-dir", str(data_dir))
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return workspace, result

    return built_once(tmp_path_factory, "run_all", build)


def relocated_copy(workspace: Path, target: Path) -> Path:
    """A copy of a finished workspace whose manifests name the copy's files, so stages run on the copy
    see its outputs as their own."""
    import shutil

    shutil.copytree(workspace, target)
    for manifest in (target / "work").rglob("manifests/*.json"):
        manifest.write_text(manifest.read_text().replace(str(workspace), str(target)))
    return target
