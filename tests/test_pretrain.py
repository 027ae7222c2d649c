"""Stage 02: corruption functions, and a smoke pretraining whose encoder stage 03 starts from."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, copy_of, isolated, load_kernel

from nucleic.config import load_config
from nucleic.features import NULL_TOKEN
from nucleic.pretrain import PretrainModel, corrupt, reconstruction_loss
from nucleic.train import build_model


def tokens(shape=(64, 500), vocab=4, seed=0):
    return torch.randint(1, vocab + 1, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("rate", [0.05, 0.15, 0.5])
def test_mask_rate_and_null_token(rate):
    original = tokens()
    kept = original.clone()
    masked = corrupt(original, 4, rate, "mask", torch.Generator().manual_seed(1))
    assert torch.equal(original, kept), "labels must stay untouched"
    picked = masked != original
    assert torch.all(masked[picked] == NULL_TOKEN)
    assert abs(picked.float().mean().item() - rate) < 0.01


@pytest.mark.parametrize("vocab", [3, 4, 7])
def test_mutation_rate_and_alphabet(vocab):
    original = tokens(vocab=vocab)
    mutated = corrupt(original, vocab, 0.2, "mutate", torch.Generator().manual_seed(2))
    assert int(mutated.min()) >= 1 and int(mutated.max()) <= vocab, "no NULL, no foreign letter"
    changed = (mutated != original).float().mean().item()
    assert abs(changed - 0.2 * (vocab - 1) / vocab) < 0.01  # a pick may redraw the same letter


def test_corruption_is_reproducible_and_rejects_unknown_modes():
    a = corrupt(tokens(), 4, 0.3, "mutate", torch.Generator().manual_seed(5))
    b = corrupt(tokens(), 4, 0.3, "mutate", torch.Generator().manual_seed(5))
    assert torch.equal(a, b)
    with pytest.raises(ValueError, match="mode must be"):
        corrupt(tokens(), 4, 0.3, "shuffle", torch.Generator())


def test_reconstruction_loss_is_low_for_a_perfect_guess():
    truth = {"sequence": tokens((2, 10), 4), "structure": tokens((2, 10), 3), "loop": tokens((2, 10), 7)}
    perfect = {k: torch.nn.functional.one_hot(v - 1, n).float() * 50 for (k, v), n in zip(truth.items(), (4, 3, 7))}
    assert reconstruction_loss(perfect, truth).item() < 1e-6
    uniform = {k: torch.zeros_like(v) for k, v in perfect.items()}
    expected = sum(torch.log(torch.tensor(float(n))) for n in (4, 3, 7))
    assert reconstruction_loss(uniform, truth).item() == pytest.approx(expected.item(), rel=1e-5)


def test_pretrain_model_heads_sit_beside_the_regression_model():
    cfg = load_config("smoke")
    model = PretrainModel(build_model(cfg.model))
    names = {k.removeprefix("model.") for k in model.state_dict() if k.startswith("model.")}
    assert names == set(build_model(cfg.model).state_dict())


@pytest.mark.slow
def test_smoke_pretraining_then_training_starts_from_it(data_dir, tmp_path):
    workspace = tmp_path / "ws"
    args = ["--preset", "smoke", "--data-dir", str(data_dir), *isolated(workspace), "--set", "pretrain.enabled=true",
            "--set", "pretrain.epochs=3", "--set", "train.threads=1"]
    assert load_kernel("00_prepare_input").main(args) == 0
    assert load_kernel("01_fold_structures").main(args) == 0
    assert load_kernel("02_pretrain").main(args) == 0
    history = json.loads((workspace / "work" / "smoke" / "pretrain" / "nt" / "history.json").read_text())["history"]
    assert len(history) == 3 and history[-1]["train_loss"] < history[0]["train_loss"]
    encoder = torch.load(workspace / "work" / "smoke" / "pretrain" / "nt.pt", weights_only=False)["model"]
    assert set(encoder) == set(build_model(load_config("smoke").model).state_dict())
    # with 0 epochs, each fold's model is exactly where stage 03 starts: the pretrained encoder
    result = subprocess.run([sys.executable, str(REPO / "kernels" / "03_train_folds.py"), *args[:2], *args[4:],
                             "--set", "train.epochs=0"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    models = workspace / "work" / "smoke" / "models" / "nt"
    assert json.loads((models / "settings.json").read_text())["pretrain"]["epochs"] == 3
    for fold in range(3):
        start = torch.load(models / f"fold{fold}" / "model.pt", weights_only=True)["model"]
        assert all(torch.equal(start[k], encoder[k]) for k in encoder), f"fold {fold} did not start from stage 02"
    # stage 02's encoder gone: stage 03 alone runs stage 02 again first (the runner keeps upstream current)
    shutil.rmtree(workspace / "work" / "smoke" / "pretrain")
    again = subprocess.run([sys.executable, str(REPO / "kernels" / "03_train_folds.py"), *args,
                            "--set", "train.epochs=0", "--force"], cwd=REPO, capture_output=True, text=True)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "upstream stage 02_pretrain is missing or stale: running it first" in again.stdout
    assert (workspace / "work" / "smoke" / "pretrain" / "nt.pt").exists()


@pytest.mark.slow
def test_each_pseudo_label_depth_starts_from_its_own_pretrained_encoder(folded_workspace, tmp_path):
    """With pretraining on, stage 04 pretrains every other depth model (stage 02 under its own manifest)
    before training it, rather than failing on a missing encoder."""
    workspace = copy_of(folded_workspace, tmp_path / "ws")
    args = ["--preset", "smoke", *isolated(workspace)]
    for setting in ("pretrain.enabled=true", "pretrain.epochs=1", "train.epochs=0", "train.threads=1",
                    "pseudo.depths=[1,2]", "train.only_folds=[0]"):
        args += ["--set", setting]
    assert load_kernel("04_pseudo_label").main(args) == 0
    run = workspace / "work" / "smoke"
    manifest = json.loads((run / "manifests" / "02_pretrain.nt_k1.json").read_text())
    assert manifest["config"]["model"]["nlayer"] == 1
    encoder = torch.load(run / "pretrain" / "nt_k1.pt", weights_only=False)["model"]
    start = torch.load(run / "models" / "nt_k1" / "fold0" / "model.pt", weights_only=True)["model"]
    assert set(start) == set(encoder) and all(torch.equal(start[k], encoder[k]) for k in encoder)
    assert (run / "pretrain" / "nt.pt").exists()


@pytest.mark.slow
def test_two_torchrun_processes_pretrain_like_one_with_the_whole_batch(folded_workspace, tmp_path):
    """Stage 02 under torchrun (gloo, 2 CPU processes, each taking half of every batch of 8), killed after
    its first epoch and run again, resumes and follows the loss trajectory to the weights of one process
    taking whole batches (dropout 0); rank 0 alone writes the checkpoints and the manifest."""
    sets = [arg for s in ("pretrain.enabled=true", "pretrain.epochs=3", "pretrain.batch_size=8", "model.dropout=0",
                          "train.threads=1") for arg in ("--set", s)]
    kernel = [str(REPO / "kernels" / "02_pretrain.py"), "--preset", "smoke"]
    one, two = copy_of(folded_workspace, tmp_path / "one"), copy_of(folded_workspace, tmp_path / "two")
    plain = subprocess.run([sys.executable, *kernel, *isolated(one), *sets], cwd=REPO, capture_output=True, text=True)
    assert plain.returncode == 0, plain.stderr[-3000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *kernel,
                *isolated(two), *sets]
    run = ("work", "smoke", "pretrain")
    last = two.joinpath(*run, "nt", "last.pt")
    proc = subprocess.Popen(torchrun, cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not last.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)  # torchrun's agent and, by their arguments, the 2 processes it started
    subprocess.run(["pkill", "-KILL", "-f", f"paths.work={two / 'work'}"], check=False)
    proc.wait()
    time.sleep(0.5)
    assert torch.load(last, weights_only=False)["state"]["epoch"] < 3, "the kill should land mid-run"
    assert not (two / "work" / "smoke" / "manifests" / "02_pretrain.json").exists()
    resumed = subprocess.run(torchrun, cwd=REPO, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "pretrain: resuming at epoch" in resumed.stdout
    losses = [[h["train_loss"] for h in json.loads(w.joinpath(*run, "nt", "history.json").read_text())["history"]]
              for w in (one, two)]
    assert len(losses[0]) == 3 and torch.allclose(torch.tensor(losses[0]), torch.tensor(losses[1]), rtol=1e-4)
    weights = [torch.load(w.joinpath(*run, "nt.pt"), weights_only=True)["model"] for w in (one, two)]
    assert all(torch.allclose(weights[0][k], weights[1][k], atol=1e-4) for k in weights[0])
    manifest = json.loads((two / "work" / "smoke" / "manifests" / "02_pretrain.json").read_text())
    assert manifest["summary"]["processes"] == 2


def test_a_stage_other_than_pretraining_refuses_torchrun(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert load_kernel("03_train_folds").main(["--preset", "smoke", *isolated(tmp_path)]) == 2
    assert "03_train_folds does not run under torchrun (only 02_pretrain)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_pair_file_reads_back_the_stored_matrices_per_sample(folded_workspace, tmp_path, monkeypatch):
    """Stage 02 keeps pairing matrices on disk (one pair file, read per sample): collate gives exactly the
    tensors of the in-memory path; the file is written once per set of sequences, reading each shard once."""
    from collections import Counter

    import numpy as np

    from nucleic.dataset import collate, load_rna_tensors
    from nucleic.io_utils import read_pickle
    from nucleic.structures import StructureStore

    cfg = load_config("smoke", overrides=[f"paths.structures={folded_workspace / 'structures'}"])
    store = StructureStore(folded_workspace / "structures", cfg.fold)
    frame = read_pickle(folded_workspace / "work" / "smoke" / "prepared" / "test.pkl")
    in_memory = load_rna_tensors(frame, store)
    opened, real_load = Counter(), np.load
    monkeypatch.setattr(np, "load", lambda path, **kw: (opened.update([str(path)]), real_load(path, **kw))[1])
    on_disk = load_rna_tensors(frame, store, pairs_folder=tmp_path)
    monkeypatch.undo()
    assert set(opened) == {str(p) for p in store.shard_paths(list(frame.sequence))} and set(opened.values()) == {1}
    assert on_disk.n_slots == in_memory.n_slots == 12 and not isinstance(on_disk.bpp[0], np.ndarray)
    lengths, slots = on_disk.lengths, np.arange(len(frame)) % 12
    for length in (107, 130):
        batch = np.flatnonzero(lengths == length)
        assert len(batch) == 10
        a, b = (collate(d, batch, slots[batch], torch.device("cpu")) for d in (in_memory, on_disk))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    (pair_file,) = tmp_path.glob("*.f16")
    written = pair_file.stat().st_mtime_ns
    again = load_rna_tensors(frame, store, pairs_folder=tmp_path)
    assert pair_file.stat().st_mtime_ns == written
    assert all(np.array_equal(a, b) for a, b in zip(again.structure + again.loop, on_disk.structure + on_disk.loop))
    load_rna_tensors(frame.iloc[:5], store, pairs_folder=tmp_path)  # other sequences: a new file, the old one gone
    assert [p.name for p in tmp_path.glob("*.f16")] != [pair_file.name] and len(list(tmp_path.glob("*.f16"))) == 1
