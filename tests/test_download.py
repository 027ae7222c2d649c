"""The data downloader against a local file server (never the internet): public files verified by
SHA-256 and laid out as the stages read them, OpenVaccine through the Kaggle API (REST or the `kaggle`
command), and one line saying what to put where when a source cannot be reached."""
from __future__ import annotations

import base64
import hashlib
import io
import json
import sys
import threading
import zipfile
from functools import partial
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from conftest import isolated, run_all, run_script

from nucleic import download
from nucleic.config import load_config
from nucleic.download import GITHUB_RAW, DownloadError, RemoteFile

USER, KEY = "tester", "secret-key"


class Handler(SimpleHTTPRequestHandler):
    """Static files from the served folder; /api/v1/... answers like Kaggle's download endpoint."""

    kaggle_folder: Path | None = None

    def do_GET(self):
        if self.path.startswith("/api/v1/competitions/data/download/"):
            token = base64.b64encode(f"{USER}:{KEY}".encode()).decode()
            if self.headers.get("Authorization") != f"Basic {token}":
                self.send_error(401, "Unauthorized")
                return
            file = self.kaggle_folder / self.path.rsplit("/", 1)[-1]
            if not file.exists():
                self.send_error(404)
                return
            body = file.read_bytes()
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
            return
        super().do_GET()

    def log_message(self, *args):
        pass


@pytest.fixture
def server(tmp_path):
    """(base URL, served folder, Kaggle folder) of an HTTP server on a free local port."""
    served, kaggle = tmp_path / "served", tmp_path / "kaggle"
    served.mkdir()
    kaggle.mkdir()
    handler = type("TestHandler", (Handler,), {"kaggle_folder": kaggle})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), partial(handler, directory=str(served)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", served, kaggle
    httpd.shutdown()
    httpd.server_close()


def serve(served: Path, url: str, data: bytes) -> None:
    """Put `data` where the mirror answers for `url` (a raw.githubusercontent.com address)."""
    target = served / url[len(GITHUB_RAW) + 1:]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)


def config(tmp_path, mirror=None, **settings):
    sets = [f"paths.input={tmp_path / 'input'}", f"download.mirror={mirror}"]
    sets += [f"download.{key}={value}" for key, value in settings.items()]
    return load_config("smoke", sets, data_dir=str(tmp_path / "empty"))


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def synthetic_files(data_dir: Path) -> tuple[list[RemoteFile], dict[str, bytes]]:
    """A source table over the generated bundle's promoter and mirna files (each mirna file served with
    a header line, at its second URL only), and the bytes each should end up as."""
    files, expected = [], {}
    promoter = (data_dir / "promoter" / "v9d3.csv").read_bytes()
    files.append(RemoteFile("promoter", "v9d3.csv", (f"{GITHUB_RAW}/lab/nt/abc/v9d3.csv",), sha(promoter)))
    expected["promoter/v9d3.csv"] = promoter
    for name in ("miRBase_set.csv", "putative_mirtrons_set.csv"):
        data = (data_dir / "mirna" / name).read_bytes()
        urls = (f"{GITHUB_RAW}/gone/repo/master/data/{name}", f"{GITHUB_RAW}/fork/repo/abc/data/{name}")
        files.append(RemoteFile("mirna", name, urls, sha(data), drop_header=True))
        expected[f"mirna/{name}"] = data
    return files, expected


def test_public_files_are_fetched_verified_and_laid_out(tmp_path, server, data_dir, monkeypatch):
    from nucleic.dna_data import read_mirna, read_promoter

    base, served, _ = server
    files, expected = synthetic_files(data_dir)
    monkeypatch.setattr(download, "PUBLIC_FILES", tuple(files))
    serve(served, files[0].urls[0], expected["promoter/v9d3.csv"])
    for remote in files[1:]:  # the first URL answers 404: the second one is used
        serve(served, remote.urls[1], b"id,seq,class\n" + expected[f"mirna/{remote.name}"])
    cfg = config(tmp_path, base)

    fetched = download.ensure_data(cfg, ["promoter", "mirna"])
    assert sorted(fetched) == ["mirna", "promoter"]
    for relative, data in expected.items():
        assert (tmp_path / "input" / relative).read_bytes() == data  # header dropped, bytes verified
    rows = expected["promoter/v9d3.csv"].count(b"\n") - 1  # below the header
    assert len(read_promoter(tmp_path / "input" / "promoter" / "v9d3.csv")) == rows
    assert set(read_mirna(tmp_path / "input" / "mirna").label) == {0, 1}
    assert download.ensure_data(cfg, ["promoter", "mirna"]) == {}  # present now: nothing fetched


def test_a_file_whose_checksum_differs_is_not_written(tmp_path, server, data_dir, monkeypatch):
    base, served, _ = server
    files, expected = synthetic_files(data_dir)
    monkeypatch.setattr(download, "PUBLIC_FILES", tuple(files))
    serve(served, files[0].urls[0], expected["promoter/v9d3.csv"].replace(b",1,1", b",0,1", 1))
    with pytest.raises(DownloadError) as err:
        download.ensure_data(config(tmp_path, base), ["promoter"])
    message = str(err.value)
    assert "\n" not in message and "promoter/v9d3.csv" in message and "SHA-256" in message
    assert str(tmp_path / "input" / "promoter" / "v9d3.csv") in message  # where to put it instead
    folder = tmp_path / "input" / "promoter"
    assert not folder.exists() or not any(folder.iterdir())


def test_the_real_sources_through_a_local_mirror(tmp_path, server, real_data_dir):
    """Every file of the source table, served at its real path (mirna with the fork's header line):
    the command writes files byte-identical to our bundle."""
    base, served, _ = server
    for remote in download.PUBLIC_FILES:
        data = (real_data_dir / remote.task / remote.name).read_bytes()
        serve(served, remote.urls[-1], (b"id,seq,class\n" if remote.drop_header else b"") + data)
    result = run_script([sys.executable, "-m", "nucleic.download", "--preset", "smoke", "--data-dir",
                         str(tmp_path / "empty"), *isolated(tmp_path), "--set", f"download.mirror={base}",
                         "promoter", "viral", "mirna"])
    assert result.returncode == 0, result.stderr
    for remote in download.PUBLIC_FILES:
        written = tmp_path / "input" / remote.task / remote.name
        assert written.read_bytes() == (real_data_dir / remote.task / remote.name).read_bytes()


def test_run_all_offline_stops_before_any_stage_with_one_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run_all(tmp_path / "ws", "--data-dir", str(tmp_path / "empty"), "--only", "10_promoter",
                     "--set", "download.mirror=http://127.0.0.1:9")  # nothing listens on port 9
    assert result.returncode == 2
    errors = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("ERROR [download] cannot fetch promoter/v9d3.csv")
    assert str(tmp_path / "ws" / "input" / "promoter" / "v9d3.csv") in errors[0]
    assert "==> 10_promoter" not in result.stdout
    assert not (tmp_path / "ws" / "input" / "promoter").exists()


def openvaccine_files(tmp_path) -> tuple[bytes, bytes]:
    """Kaggle-like train.json (10 rows, 4 with signal_to_noise < 1) and test.json (4 rows)."""
    from synthetic_data import openvaccine_row

    rng = np.random.default_rng(3)
    train = [openvaccine_row(rng, i, 107, 68, True) for i in range(10)]
    for row in train[::3]:
        row["signal_to_noise"], row["SN_filter"] = 0.4, 0
    test = [openvaccine_row(rng, 100 + i, 107, 68, False) for i in range(4)]
    lines = lambda rows: "".join(json.dumps(r) + "\n" for r in rows).encode()
    return lines(train), lines(test)


def zipped(name: str, data: bytes) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr(name, data)
    return buffer.getvalue()


def kept_rows(train: bytes) -> bytes:
    return b"".join(line for line in train.splitlines(keepends=True) if json.loads(line)["signal_to_noise"] >= 1)


def test_openvaccine_through_the_kaggle_rest_api(tmp_path, server, monkeypatch):
    from nucleic.data import find_openvaccine

    base, _, kaggle = server
    train, test = openvaccine_files(tmp_path)
    (kaggle / "train.json").write_bytes(zipped("train.json", train))  # Kaggle zips large files
    (kaggle / "test.json").write_bytes(test)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    cfg = config(tmp_path, kaggle_api=f"{base}/api/v1", kaggle_command="no-such-kaggle-client")

    download.ensure_data(cfg, ["openvaccine"])
    folder = tmp_path / "input" / "openvaccine"
    assert (folder / "train.json").read_bytes() == kept_rows(train)  # the bundle's subset, line for line
    assert len(kept_rows(train).splitlines()) == 6
    assert (folder / "test.json").read_bytes() == test
    assert find_openvaccine(cfg)["train"][0] == folder / "train.json"  # stage 00 finds it there

    monkeypatch.setenv("KAGGLE_KEY", "wrong")
    (folder / "train.json").unlink()
    (folder / "test.json").unlink()
    with pytest.raises(DownloadError) as err:
        download.ensure_data(cfg, ["openvaccine"])
    assert "401" in str(err.value) and "\n" not in str(err.value)
    assert not any(folder.iterdir())


def test_openvaccine_through_the_kaggle_command(tmp_path, monkeypatch):
    """The official client when installed: a stand-in `kaggle` that copies the files it is asked for."""
    train, test = openvaccine_files(tmp_path)
    source = tmp_path / "competition"
    source.mkdir()
    (source / "train.json.zip").write_bytes(zipped("train.json", train))
    (source / "test.json").write_bytes(test)
    client = tmp_path / "kaggle_client.py"
    client.write_text(
        "import shutil, sys\n"
        "args = sys.argv[1:]\n"
        "assert args[:4] == ['competitions', 'download', '-c', 'stanford-covid-vaccine'], args\n"
        "name, folder = args[args.index('-f') + 1], args[args.index('-p') + 1]\n"
        f"source = {str(source)!r}\n"
        "import os\n"
        "found = [f for f in os.listdir(source) if f.startswith(name)]\n"
        "shutil.copy(os.path.join(source, found[0]), folder)\n")
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    cfg = config(tmp_path, kaggle_command=f"{sys.executable} {client}", kaggle_api="http://127.0.0.1:9")
    download.ensure_data(cfg, ["openvaccine"])
    assert (tmp_path / "input" / "openvaccine" / "train.json").read_bytes() == kept_rows(train)
    assert (tmp_path / "input" / "openvaccine" / "test.json").read_bytes() == test


def test_openvaccine_without_credentials_says_what_to_put_where(tmp_path, monkeypatch):
    monkeypatch.delenv("KAGGLE_USERNAME", raising=False)
    monkeypatch.delenv("KAGGLE_KEY", raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "no_kaggle"))
    result = run_script([sys.executable, "-m", "nucleic.download", "--preset", "smoke", "--data-dir",
                         str(tmp_path / "empty"), *isolated(tmp_path), "openvaccine"],
                        env={"KAGGLE_CONFIG_DIR": str(tmp_path / "no_kaggle")})
    assert result.returncode == 2
    assert len(result.stderr.strip().splitlines()) == 1
    assert "kaggle.json" in result.stderr and str(tmp_path / "input" / "openvaccine") in result.stderr
    assert not (tmp_path / "input").exists()


def test_a_bad_kaggle_file_is_named_and_not_written(tmp_path, server, monkeypatch):
    base, _, kaggle = server
    train, test = openvaccine_files(tmp_path)
    rows = [json.loads(line) for line in train.splitlines()]
    del rows[1]["sequence"]
    (kaggle / "train.json").write_bytes("".join(json.dumps(r) + "\n" for r in rows).encode())
    (kaggle / "test.json").write_bytes(test)
    monkeypatch.setenv("KAGGLE_USERNAME", USER)
    monkeypatch.setenv("KAGGLE_KEY", KEY)
    cfg = config(tmp_path, kaggle_api=f"{base}/api/v1", kaggle_command="no-such-kaggle-client")
    with pytest.raises(Exception) as err:
        download.ensure_data(cfg, ["openvaccine"])
    assert "train.json" in str(err.value) and "sequence" in str(err.value)
    assert not (tmp_path / "input" / "openvaccine").exists()


def test_stages_map_to_the_data_they_need():
    assert download.tasks_of_stages(["00_prepare_input", "03_train_folds", "10_promoter", "12_mirna"]) == [
        "openvaccine", "promoter", "mirna"]
    assert download.tasks_of_stages(["11_viral"]) == ["viral"]


def test_run_all_fetches_nothing_when_the_data_folder_has_everything(data_dir):
    cfg = load_config("smoke", data_dir=str(data_dir))
    assert all(download.task_present(cfg, task) for task in download.TASKS)
    assert download.ensure_data(cfg) == {}


def test_a_viral_folder_of_other_experiments_counts_as_present(tmp_path):
    """Users bring their own sequencing runs: any exp*.csv makes the viral data present (nothing fetched)."""
    folder = tmp_path / "mine" / "viral"
    folder.mkdir(parents=True)
    cfg = load_config("smoke", [f"paths.input={tmp_path / 'input'}"], data_dir=str(tmp_path / "mine"))
    assert not download.task_present(cfg, "viral")
    (folder / "exp42_2025_ours.csv").write_text("seq1_ours,ACGT,0\n")
    assert download.task_present(cfg, "viral")
    assert not download.task_present(cfg, "promoter")
