"""Training and inference of the OpenVaccine Nucleic Transformer: one fold through the engine
(engine.Trainer), and predictions averaged over the structure predictions."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .data import SCORED_COLUMNS, TARGETS
from .dataset import RNATensors, collate, length_batches
from .engine import (
    Trainer,
    autocast,
    epoch_seed,
    flat_then_cosine,
    make_optimizer,
    read_checkpoint,
    save_checkpoint,
    seed_torch,
)
from .io_utils import intact, read_cache, write_pickle
from .losses import error_weighted_mse
from .metrics import mcrmse
from .models.nucleic_transformer import NTConfig, NucleicTransformer


def build_model(model_cfg) -> NucleicTransformer:
    fields = NTConfig.__dataclass_fields__
    return NucleicTransformer(NTConfig(**{k: v for k, v in dict(model_cfg).items() if k in fields}))


@torch.inference_mode()
def predict(model: NucleicTransformer, data: RNATensors, indices: np.ndarray, device: torch.device, tc,
            desc: str = "predict", slots: list[int] | None = None, moments: bool = False) -> dict[int, np.ndarray]:
    """{index: (L, 5) prediction averaged over the structure predictions} (paper 2.3.4), in the
    inference settings of train config `tc` (eval_batch_size, bf16, channels_last).

    slots: which structure predictions to average (default: all). moments: return (2, L, 5) per
    index instead, the mean and the standard deviation across those structure predictions.
    """
    model.eval()
    bf16, channels_last = tc.bf16, tc.channels_last
    runner = compiled_for_inference(model) if tc.compile_inference else model
    slots = list(range(data.n_slots)) if slots is None else list(slots)
    per_batch = max(1, tc.eval_batch_size // len(slots))
    indices, all_lengths = np.asarray(indices), data.lengths  # data.lengths is computed on every access
    lengths = all_lengths[indices]
    # The outputs go into buffers made before the loop, one per length: small arrays kept from every
    # batch would sit between the batches' large temporaries in malloc's heap and fragment it (stage 06
    # grew to 23 GB on 2 cores; README "Stage 06 memory").
    buffers = {int(length): np.zeros((count, *((2,) if moments else ()), length, len(TARGETS)), np.float32)
               for length, count in zip(*np.unique(lengths, return_counts=True))}
    place = {}  # index: (its length, its row in that length's buffer)
    for length in buffers:
        place.update((index, (length, r)) for r, index in enumerate(indices[lengths == length].tolist()))
    for batch in tqdm(length_batches(all_lengths, indices, per_batch), desc=desc, leave=False):
        repeated = np.repeat(batch, len(slots))
        inputs = collate(data, repeated, np.tile(slots, len(batch)), device, channels_last=channels_last)
        with autocast(device, bf16):
            pred = runner(**inputs).float()
        pred = pred.view(len(batch), len(slots), *pred.shape[1:])
        if moments:
            pred = torch.stack([pred.mean(dim=1), pred.std(dim=1, unbiased=False)], dim=1)
        else:
            pred = pred.mean(dim=1)
        length = place[int(batch[0])][0]
        buffers[length][[place[index][1] for index in batch.tolist()]] = pred.cpu().numpy()
    return {index: buffers[length][r] for index, (length, r) in place.items()}


def compile_model(model: NucleicTransformer) -> torch.nn.Module:
    """torch.compile with static shapes: one graph per input shape, compiled once each (about 30 s on a
    CPU) and then reused from inductor's on-disk cache, also by other models of the same config (the
    weights are graph inputs). One graph per layer (kernel sizes) x train/eval x shape is more than
    dynamo's default recompile limit of 8."""
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    return torch.compile(model, dynamic=False)


def compiled_for_inference(model: NucleicTransformer) -> torch.nn.Module:
    """compile_model(model) for predict(), made once per model object."""
    compiled = model.__dict__.get("_compiled_for_inference")
    if compiled is None:
        compiled = compile_model(model)
        model.__dict__["_compiled_for_inference"] = compiled  # a plain attribute: not a submodule, not saved
    return compiled


def validation_slots(tc, n_slots: int) -> list[int]:
    """Structure predictions averaged when validating during training: train.val_structures of them,
    spread evenly over the slots (null: all). OOF and test predictions always use all of them."""
    wanted = tc.val_structures
    if not wanted or wanted >= n_slots:
        return list(range(n_slots))
    return sorted({int(round(x)) for x in np.linspace(0, n_slots - 1, wanted)})


def score_rows(data: RNATensors, predictions: dict[int, np.ndarray], indices: np.ndarray) -> dict:
    """MCRMSE over the scored positions of `indices`: 3 scored columns and all 5."""
    truth = np.concatenate([data.targets[i] for i in indices])
    pred = np.concatenate([predictions[i][:data.seq_scored[i]] for i in indices])
    return {"mcrmse_scored": mcrmse(truth[:, SCORED_COLUMNS], pred[:, SCORED_COLUMNS]),
            "mcrmse_all5": mcrmse(truth, pred)}


def final_model_path(fold_dir: Path) -> Path:
    """The fold's model used for OOF, test predictions and warm starts: the average of its best
    checkpoints (train.average_top_k), or its best checkpoint."""
    return fold_dir / "model.pt"


def finished_fold(fold_dir: Path) -> dict | None:
    """The fold record of a finished fold; None while its training is not complete (train_fold then
    resumes: a finished run's last.pt makes missing pieces again)."""
    result = read_cache(fold_dir / "result.pkl")
    return result if result is not None and intact(final_model_path(fold_dir)) else None


def epoch_rows(train_idx: np.ndarray, sampled: tuple[np.ndarray, int] | None, rng: np.random.Generator) -> np.ndarray:
    """The rows of one epoch: train_idx, plus `count` rows drawn afresh from `pool` when sampled=(pool, count)."""
    if not sampled:
        return train_idx
    pool, count = sampled
    return np.concatenate([train_idx, rng.choice(pool, min(count, len(pool)), replace=False)])


def train_fold(cfg, data: RNATensors, fold: int, train_idx: np.ndarray, val_idx: np.ndarray,
               fold_dir: Path, device: torch.device, init_weights: Path | None = None,
               sampled: tuple[np.ndarray, int] | None = None) -> dict:
    """Train one fold; resumes from fold_dir/last.pt. Returns the fold record (also fold_dir/result.pkl).
    sampled=(pool, count): every epoch also trains on `count` rows drawn from `pool` (e.g. pseudo-labels)."""
    result = finished_fold(fold_dir)
    if result is not None:
        return result
    tc = cfg.train
    torch.manual_seed(epoch_seed(cfg.seed, fold, 0) + 1)  # initial weights
    model = build_model(cfg.model).to(device)
    if init_weights is not None:
        model.load_state_dict(read_checkpoint(init_weights, device)["model"])
    optimizer = make_optimizer(model, tc)
    first_epoch = epoch_rows(train_idx, sampled, np.random.default_rng(epoch_seed(cfg.seed, fold, 0)))
    steps_per_epoch = len(length_batches(data.batch_groups, first_epoch, tc.batch_size))
    scheduler = flat_then_cosine(optimizer, tc.epochs * steps_per_epoch, tc.flat_fraction)
    trainer = Trainer(model, optimizer, scheduler, fold_dir, tc.epochs, device, seed=cfg.seed, stream=fold,
                      bf16=tc.bf16, grad_clip=tc.grad_clip, select="mcrmse_scored", top_k=tc.average_top_k,
                      name=f"fold {fold}")
    scored_val = val_idx[data.sn_filter[val_idx] == 1]
    val_slots = validation_slots(tc, data.n_slots)

    def validate(desc: str) -> dict:
        return score_rows(data, predict(model, data, scored_val, device, tc, desc=desc, slots=val_slots),
                          scored_val)

    def epoch_batches(rng):
        rows = epoch_rows(train_idx, sampled, rng)
        seed_torch(rng)  # dropout
        return length_batches(data.batch_groups, rows, tc.batch_size, rng)

    def batch_loss(batch, rng):
        slots = rng.integers(0, data.n_slots, size=len(batch))  # one random structure per sample
        inputs = collate(data, batch, slots, device, with_labels=True, channels_last=tc.channels_last)
        targets, errors = inputs.pop("targets"), inputs.pop("errors")
        pred = model(**inputs)[:, :targets.shape[1]].float()
        return error_weighted_mse(pred, targets, errors, tc.loss_alpha, tc.loss_beta, tc.column_weights)

    def evaluate(done: int) -> dict | None:
        if done == 0:
            return validate("validate start")
        return validate("validate") if _validate_after(done - 1, tc) else None

    state = trainer.fit(epoch_batches, batch_loss, evaluate, warm_start=init_weights is not None,
                        describe=lambda s: f"val MCRMSE {s['mcrmse_scored']:.4f} (all 5: {s['mcrmse_all5']:.4f})")
    weights, record = trainer.final_weights(lambda: validate("validate average"))
    save_checkpoint(final_model_path(fold_dir), {"model": weights, "averaged_epochs": record["averaged_epochs"],
                                                 "best_epoch": state["best_epoch"]})
    model.load_state_dict(weights)
    oof = predict(model, data, val_idx, device, tc, desc="oof")
    result = {"fold": fold, "history": state["history"], **record, "val_idx": val_idx,
              "oof": {i: oof[i] for i in val_idx.tolist()}}
    write_pickle(fold_dir / "result.pkl", result)
    return result


def _validate_after(epoch: int, tc) -> bool:
    """Every eval_every epochs while the learning rate is flat, every epoch once it anneals."""
    annealing = epoch + 1 > int(tc.epochs * tc.flat_fraction)
    return annealing or (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs
