"""The one training engine: a run killed mid-epoch resumes to the same weights, for the engine itself and
for each of its callers (pretraining and the classifiers here; the supervised NT in test_training.py);
the classifiers learn a separable task; the schedules follow their formulas."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import nucleic.classify as classify
import nucleic.pretrain as pretrain
from nucleic.config import load_config
from nucleic.dataset import RNATensors
from nucleic.engine import Trainer, eq11_peak_lr, make_adam, seed_torch, warmup_inverse_sqrt
from nucleic.features import LOOP_TOKENS, SEQUENCE_TOKENS, STRUCTURE_TOKENS, tokenize

CPU = torch.device("cpu")


class Killed(Exception):
    """Stands in for a SIGKILL in the middle of an epoch."""


def killing(function, after_calls: int):
    """`function`, but the call number `after_calls` + 1 raises Killed."""
    calls = {"n": 0}

    def wrapped(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > after_calls:
            raise Killed
        return function(*args, **kwargs)

    return wrapped


def same_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def fit_regression(run_dir, loss_hook=lambda: None, epochs=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Dropout(0.2), torch.nn.Linear(8, 1))
    x = torch.randn(40, 3, generator=torch.Generator().manual_seed(1))
    y = x @ torch.tensor([[1.0], [-2.0], [0.5]])
    optimizer = make_adam(model, 1e-2)
    trainer = Trainer(model, optimizer, torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0), run_dir, epochs,
                      CPU, seed=3, select="val_mse", top_k=2)

    def batch_loss(batch, rng):
        loss_hook()
        return torch.nn.functional.mse_loss(model(x[batch]), y[batch])

    def evaluate(done):
        model.eval()
        with torch.no_grad():
            return {"val_mse": float(torch.nn.functional.mse_loss(model(x), y))}

    def epoch_batches(rng):
        seed_torch(rng)  # dropout
        return np.array_split(rng.permutation(40), 5)

    state = trainer.fit(epoch_batches, batch_loss, evaluate)
    return trainer, state


def test_engine_resumes_a_run_killed_mid_epoch_to_the_same_weights(tmp_path):
    clean, clean_state = fit_regression(tmp_path / "clean")
    calls = {"n": 0}

    def die_in_epoch_three():
        calls["n"] += 1
        if calls["n"] == 13:
            raise Killed

    with pytest.raises(Killed):
        fit_regression(tmp_path / "killed", die_in_epoch_three)
    assert torch.load(tmp_path / "killed" / "last.pt", weights_only=False)["state"]["epoch"] == 2
    resumed, resumed_state = fit_regression(tmp_path / "killed")
    assert same_weights(clean.model.state_dict(), resumed.model.state_dict())
    strip = lambda history: [{k: v for k, v in h.items() if k != "seconds"} for h in history]
    assert strip(clean_state["history"]) == strip(resumed_state["history"])
    assert clean_state["history"][-1]["val_mse"] < clean_state["history"][0]["val_mse"]
    assert sorted(p.name for p in (tmp_path / "clean" / "top").iterdir()) == sorted(
        f"epoch{e}.pt" for _, e in clean_state["top"]), "top/ keeps exactly the top_k epochs"


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_last_checkpoint_is_named_and_the_run_starts_over(damage, tmp_path, capsys):
    """torch.load accepts a checkpoint with a flipped byte in a tensor; the engine's CRC check does not."""
    clean, _ = fit_regression(tmp_path / "clean")
    with pytest.raises(Killed):
        fit_regression(tmp_path / "damaged", killing(lambda: None, after_calls=12))
    last = tmp_path / "damaged" / "last.pt"
    raw = bytearray(last.read_bytes())
    if damage == "truncated":
        raw = raw[: len(raw) // 2]
    else:
        raw[len(raw) // 3] ^= 0xFF
    last.write_bytes(bytes(raw))
    capsys.readouterr()
    resumed, _ = fit_regression(tmp_path / "damaged")
    out = capsys.readouterr().out
    assert f"{last}: damaged (" in out and "starting train over" in out and "resuming" not in out
    assert same_weights(clean.model.state_dict(), resumed.model.state_dict())


def test_damaged_pickles_and_stale_temporaries(tmp_path, capsys):
    from nucleic.io_utils import DamagedFile, read_cache, read_pickle, write_pickle

    path = tmp_path / "result.pkl"
    write_pickle(path, {"probs": np.arange(5.0)})
    assert np.array_equal(read_pickle(path)["probs"], np.arange(5.0))
    raw = path.read_bytes()
    path.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    with pytest.raises(DamagedFile, match="checksum mismatch"):
        read_pickle(path)
    assert read_cache(path) is None and not path.exists()
    assert "result.pkl: damaged (checksum mismatch: truncated or altered): removed; redoing it" in capsys.readouterr().out
    import pickle

    path.write_bytes(pickle.dumps({"a": 1}))  # a plain pickle (another program, an older version)
    with pytest.raises(DamagedFile, match="no checksum header"):
        read_pickle(path)
    stale = tmp_path / ".result.pkl.abc123.tmp"
    stale.write_bytes(b"half a pickle")
    write_pickle(path, {"a": 2})
    assert read_pickle(path) == {"a": 2} and not stale.exists()


def test_best_checkpoint_follows_the_direction_of_the_score(tmp_path):
    model = torch.nn.Linear(1, 1)
    optimizer = make_adam(model, 1e-3)
    scheduler = torch.optim.lr_scheduler.ConstantLR(optimizer, 1.0, 0)
    scores = iter([0.6, 0.9, 0.7])
    trainer = Trainer(model, optimizer, scheduler, tmp_path, 3, CPU, seed=0, select="auc", higher_is_better=True)
    state = trainer.fit(lambda rng: [0], lambda batch, rng: model(torch.ones(1, 1)).sum() * 0,
                        lambda done: {"auc": next(scores)})
    assert state["best_epoch"] == 2
    assert trainer.final_weights()[1]["best_single_score"] == pytest.approx(0.9)


def synthetic_rna(n: int = 24, length: int = 20, slots: int = 2, seed: int = 0) -> RNATensors:
    rng = np.random.default_rng(seed)
    pick = lambda letters, shape: "".join(rng.choice(list(letters), shape))
    return RNATensors(
        ids=[f"r{i}" for i in range(n)],
        sequence=[tokenize(pick(SEQUENCE_TOKENS, length), SEQUENCE_TOKENS) for _ in range(n)],
        structure=[np.stack([tokenize(pick(STRUCTURE_TOKENS, length), STRUCTURE_TOKENS) for _ in range(slots)])
                   for _ in range(n)],
        loop=[np.stack([tokenize(pick(LOOP_TOKENS, length), LOOP_TOKENS) for _ in range(slots)]) for _ in range(n)],
        bpp=[rng.random((slots, length, length)).astype(np.float16) for _ in range(n)],
        seq_scored=np.full(n, length))


def test_pretraining_resumes_a_run_killed_mid_epoch_to_the_same_weights(tmp_path, monkeypatch):
    cfg = load_config("smoke", overrides=["pretrain.epochs=2", "pretrain.batch_size=8", "train.channels_last=false"])
    data = synthetic_rna()
    clean = pretrain.pretrain_loop(cfg, data, tmp_path / "clean", CPU)
    # 3 batches per epoch, 3 corrupted streams per batch: die in the second batch of epoch 2
    monkeypatch.setattr(pretrain, "corrupt", killing(pretrain.corrupt, after_calls=3 * 3 + 4))
    with pytest.raises(Killed):
        pretrain.pretrain_loop(cfg, data, tmp_path / "killed", CPU)
    monkeypatch.undo()
    resumed = pretrain.pretrain_loop(cfg, data, tmp_path / "killed", CPU)
    assert [h["train_loss"] for h in resumed] == [h["train_loss"] for h in clean]
    load = lambda folder: torch.load(folder / "last.pt", weights_only=False)["model"]
    assert same_weights(load(tmp_path / "clean"), load(tmp_path / "killed"))


def separable_task(n: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """Random 40-nt DNA; the positives carry GATTACA somewhere, the negatives never do."""
    rng = np.random.default_rng(seed)
    sequences, labels = [], []
    while len(sequences) < n:
        sequence = "".join(rng.choice(list("ACGT"), 40))
        label = len(sequences) % 2
        if label:
            at = rng.integers(0, 33)
            sequence = sequence[:at] + "GATTACA" + sequence[at + 7:]
        elif "GATTACA" in sequence:
            continue
        sequences.append(sequence)
        labels.append(label)
    return classify.encode_sequences(sequences), np.array(labels, dtype=np.float32)


def classifier_settings(epochs: int):
    return load_config("smoke", overrides=[f"mirna.epochs={epochs}", "mirna.nmute=0", "mirna.batch_size=16",
                                           "mirna.negatives_per_positive=null"]).mirna


@pytest.mark.parametrize("kind", ["cnn", "nt"])
def test_a_classifier_learns_a_separable_motif(kind, tmp_path):
    tokens, labels = separable_task(256, seed=0)
    val_tokens, val_labels = separable_task(128, seed=1)
    tc = classifier_settings(epochs=12)
    settings = {"nt": {"k": 7, "nlayer": 1, "d_model": 32, "nhead": 4, "dim_ff": 64, "dropout": 0.0},
                "cnn": dict(load_config("smoke").mirna.cnn)}[kind]
    model, history = classify.fit_classifier(kind, settings, tc, tokens, labels, val_tokens, val_labels, seed=0,
                                             device=CPU, run_dir=tmp_path, select_best=True)
    assert max(h["val_auc"] for h in history) > 0.95, history
    probs = classify.predict_proba(model, val_tokens, CPU, 64)
    from nucleic.metrics import binary_classification_metrics
    assert binary_classification_metrics(val_labels, probs)["auc"] == pytest.approx(max(h["val_auc"] for h in history))


def test_a_classifier_keeps_the_mean_of_its_best_epochs_only_when_it_validates_better(tmp_path, capsys):
    import re

    from nucleic.metrics import binary_classification_metrics

    tokens, labels = separable_task(128, seed=0)
    val_tokens, val_labels = separable_task(48, seed=1)
    tc = load_config("smoke", overrides=["mirna.epochs=5", "mirna.nmute=3", "mirna.batch_size=16",
                                         "mirna.average_top_k=3"]).mirna
    model, history = classify.fit_classifier("cnn", dict(load_config("smoke").mirna.cnn), tc, tokens, labels,
                                             val_tokens, val_labels, seed=0, device=CPU, run_dir=tmp_path,
                                             select_best=True)
    assert len(list((tmp_path / "top").glob("epoch*.pt"))) == 3
    averaged = float(re.search(r"average of epochs \[.*\]: val_auc ([0-9.]+)", capsys.readouterr().out).group(1))
    got = binary_classification_metrics(val_labels, classify.predict_proba(model, val_tokens, CPU, 64))["auc"]
    assert got == pytest.approx(max(averaged, max(h["val_auc"] for h in history)), abs=1e-4)


def test_classifier_resumes_a_run_killed_mid_epoch_to_the_same_weights(tmp_path, monkeypatch):
    tokens, labels = separable_task(64, seed=0)
    tc = load_config("smoke", overrides=["mirna.epochs=3", "mirna.batch_size=16", "mirna.nmute=2"]).mirna
    settings = dict(load_config("smoke").mirna.cnn)
    fit = lambda folder: classify.fit_classifier("cnn", settings, tc, tokens, labels, tokens[:16], labels[:16],
                                                 seed=5, device=CPU, run_dir=folder, select_best=True)[0]
    clean = fit(tmp_path / "clean")
    monkeypatch.setattr(classify, "mutate", killing(classify.mutate, after_calls=4 + 2))  # epoch 2, third batch
    with pytest.raises(Killed):
        fit(tmp_path / "killed")
    monkeypatch.undo()
    assert same_weights(clean.state_dict(), fit(tmp_path / "killed").state_dict())


def test_eq11_schedule():
    model = torch.nn.Linear(1, 1)
    d_model, warmup, scale = 256, 3200, 0.1
    optimizer = make_adam(model, eq11_peak_lr(d_model, warmup, scale))
    factor = warmup_inverse_sqrt(optimizer, warmup).lr_lambdas[0]
    lr = lambda step: optimizer.defaults["lr"] * factor(step - 1)  # eq. 11 counts steps from 1
    for step in (1, 1600, 3200, 6400, 12800):
        assert lr(step) == pytest.approx(scale * d_model ** -0.5 * min(step ** -0.5, step * warmup ** -1.5))
    assert lr(3200) == pytest.approx(0.1 / 16 / math.sqrt(3200)) and lr(12800) == pytest.approx(lr(3200) / 2)


def test_length_batches_cover_every_row_once_with_one_length_per_batch():
    from nucleic.dataset import length_batches

    lengths = np.array([107, 130, 107, 68, 130, 107, 107, 68, 107])
    rows = np.array([0, 1, 2, 3, 4, 5, 6, 7, 8])
    for rng in (None, np.random.default_rng(0)):
        batches = length_batches(lengths, rows, 3, rng)
        assert sorted(np.concatenate(batches).tolist()) == rows.tolist()
        assert all(len(set(lengths[b])) == 1 and 1 <= len(b) <= 3 for b in batches)
    shuffled = [length_batches(lengths, rows, 3, np.random.default_rng(s)) for s in (1, 1, 2)]
    assert [b.tolist() for b in shuffled[0]] == [b.tolist() for b in shuffled[1]], "same seed, same batches"
    assert [b.tolist() for b in shuffled[0]] != [b.tolist() for b in shuffled[2]]


def test_collate_stacks_each_sample_with_its_own_structure_prediction():
    from nucleic.dataset import collate
    from nucleic.features import covalent_distance_features

    data = synthetic_rna(n=4, length=12, slots=3)
    rows, slots = np.array([2, 0]), np.array([1, 2])
    batch = collate(data, rows, slots, CPU, channels_last=True)
    assert batch["sequence"].shape == (2, 12) and torch.equal(batch["sequence"][0], torch.from_numpy(data.sequence[2]))
    assert torch.equal(batch["structure"][1], torch.from_numpy(data.structure[0][2]))
    assert torch.equal(batch["loop"][0], torch.from_numpy(data.loop[2][1]))
    pair = batch["pair_features"]
    assert pair.shape == (2, 4, 12, 12) and pair.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(pair[1, 0], torch.from_numpy(data.bpp[0][2].astype(np.float32)))
    assert torch.equal(pair[0, 1:], torch.from_numpy(covalent_distance_features(12)))
    auto = collate(data, rows, slots, CPU, channels_last="auto")["pair_features"]  # auto: on a CPU only
    assert auto.is_contiguous(memory_format=torch.channels_last) and torch.equal(auto, pair)
    plain = collate(data, rows, slots, CPU, channels_last=False)["pair_features"]
    assert torch.equal(plain, pair) and plain.stride() != pair.stride()


def test_resuming_ranger_prints_nothing(capsys):
    from nucleic.engine import make_optimizer

    model = torch.nn.Linear(2, 1)
    settings = load_config("smoke").train
    saved = make_optimizer(model, settings).state_dict()
    capsys.readouterr()
    make_optimizer(model, settings).load_state_dict(saved)
    assert capsys.readouterr().out == ""


def test_auto_precision_is_bf16_where_native_else_fp16_on_gpus_else_fp32(monkeypatch):
    from nucleic.engine import autocast_dtype

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert autocast_dtype(cuda, "auto") == torch.float16  # e.g. a V100 or T4: float16 + gradient scaling
    assert autocast_dtype(cuda, True) == torch.bfloat16 and autocast_dtype(cuda, False) is None
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert autocast_dtype(cuda, "auto") == torch.bfloat16
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    assert autocast_dtype(CPU, "auto") is None  # emulated bf16 is slower than fp32


def test_float16_training_goes_through_a_gradient_scaler_saved_for_resume(monkeypatch, tmp_path):
    """The float16 path (a GPU without bf16), run here on the CPU with the dtype forced: every step's loss is
    scaled, the scaler's state rides in last.pt, and the model learns like fp32."""
    import nucleic.engine as engine

    fp32 = fit_regression(tmp_path / "fp32")[1]
    monkeypatch.setattr(engine, "autocast_dtype", lambda device, bf16: torch.float16)
    scaled = []
    original = torch.amp.GradScaler.scale
    monkeypatch.setattr(torch.amp.GradScaler, "scale", lambda self, loss: scaled.append(1) or original(self, loss))
    fp16 = fit_regression(tmp_path / "fp16")[1]
    assert len(scaled) == 4 * 5  # every step of 4 epochs x 5 batches
    assert "scaler" in torch.load(tmp_path / "fp16" / "last.pt", weights_only=False)
    losses = [[h["train_loss"] for h in run["history"]] for run in (fp32, fp16)]
    assert losses[1][-1] < 0.7 * losses[1][0]
    assert np.allclose(losses[0], losses[1], rtol=0.15), losses  # (the scaler skips the first, overflowing steps)
