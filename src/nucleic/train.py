"""The training loop: one fold of the Nucleic Transformer, resumable epoch by epoch, and inference
averaged over the structure predictions."""
from __future__ import annotations

import contextlib
import io
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from ranger_adabelief import RangerAdaBelief
from tqdm.auto import tqdm

from .data import SCORED_COLUMNS
from .dataset import RNATensors, collate, length_batches
from .io_utils import atomic_path, read_pickle, write_pickle
from .losses import error_weighted_mse
from .metrics import mcrmse
from .models.nucleic_transformer import NTConfig, NucleicTransformer


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def configure_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def build_model(model_cfg) -> NucleicTransformer:
    fields = NTConfig.__dataclass_fields__
    return NucleicTransformer(NTConfig(**{k: v for k, v in dict(model_cfg).items() if k in fields}))


class Ranger(RangerAdaBelief):
    """Ranger (RAdam + Lookahead + gradient centralization, paper 2.3.1) with decoupled weight decay
    applied to the weights, p <- p * (1 - lr * wd), before each step.

    Why not the library's own weight_decay: in ranger-adabelief 0.1.0, during RAdam's first ~5 steps
    `G_grad` is `exp_avg` itself, so `G_grad.add_(p, alpha=wd)` writes wd * p into the momentum
    buffer; from step ~6 that buffer is divided by a tiny second-moment root, which shrinks every
    weight of a warm-started model. The library therefore always gets weight_decay=0.
    """

    def __init__(self, params, lr: float, weight_decay: float = 0.0, adabelief: bool = False):
        with contextlib.redirect_stdout(io.StringIO()):  # the library prints a banner per instance
            super().__init__(params, lr=lr, weight_decay=0.0, use_gc=True, adabelief=adabelief)
        for group in self.param_groups:
            group["decoupled_weight_decay"] = weight_decay

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            shrink = 1.0 - group["lr"] * group["decoupled_weight_decay"]
            if shrink != 1.0:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(shrink)
        return super().step(closure)


def make_optimizer(model: torch.nn.Module, train_cfg) -> Ranger:
    """Ranger from a config section with lr, weight_decay and adabelief (true: RangerAdaBelief)."""
    return Ranger(model.parameters(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay,
                  adabelief=bool(train_cfg.adabelief))


def optimizer_step(model: torch.nn.Module, optimizer, scheduler, loss: torch.Tensor, grad_clip: float | None) -> None:
    """Backward, clip the gradient norm (grad_clip: max norm; 0 or null: no clipping), step, schedule."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    optimizer.step()
    scheduler.step()


def flat_then_cosine(optimizer, total_steps: int, flat_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Flat learning rate, then cosine annealing to 0 over the last (1 - flat_fraction) of the steps."""
    flat_steps = int(total_steps * flat_fraction)

    def factor(step: int) -> float:
        if step < flat_steps:
            return 1.0
        progress = (step - flat_steps) / max(1, total_steps - flat_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes in bfloat16 natively; elsewhere bf16 is emulated and about 10x slower
    than fp32 (measured on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def use_bf16(device: torch.device, bf16: bool | str) -> bool:
    """train.bf16: true, false, or "auto" (on where the device has native bf16)."""
    if bf16 == "auto":
        return native_bf16(device)
    if isinstance(bf16, bool):
        return bf16
    raise ValueError(f"train.bf16 must be true, false or auto, not {bf16!r}")


def autocast(device: torch.device, bf16: bool | str):
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16(device, bf16) else nullcontext()


def _epoch_seed(seed: int, fold: int, epoch: int) -> int:
    """Each epoch draws from its own seed, so a run resumed at an epoch boundary matches an uninterrupted one."""
    return (seed * 1_000_003 + fold * 10_007 + epoch) % 2**31


@torch.no_grad()
def predict(model: NucleicTransformer, data: RNATensors, indices: np.ndarray, device: torch.device,
            batch_size: int, bf16: bool = False, channels_last: bool = False, desc: str = "predict",
            slots: list[int] | None = None, moments: bool = False) -> dict[int, np.ndarray]:
    """{index: (L, 5) prediction averaged over the structure predictions} (paper 2.3.4).

    slots: which structure predictions to average (default: all). moments: return (2, L, 5) per
    index instead, the mean and the standard deviation across those structure predictions.
    """
    model.eval()
    slots = list(range(data.n_slots)) if slots is None else list(slots)
    per_batch = max(1, batch_size // len(slots))
    out = {}
    for batch in tqdm(length_batches(data.lengths, np.asarray(indices), per_batch), desc=desc, leave=False):
        repeated = np.repeat(batch, len(slots))
        inputs = collate(data, repeated, np.tile(slots, len(batch)), device, channels_last=channels_last)
        with autocast(device, bf16):
            pred = model(**inputs).float()
        pred = pred.view(len(batch), len(slots), *pred.shape[1:])
        if moments:
            pred = torch.stack([pred.mean(dim=1), pred.std(dim=1, unbiased=False)], dim=1)
        else:
            pred = pred.mean(dim=1)
        out.update(zip(batch.tolist(), pred.cpu().numpy()))
    return out


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
    result_path = fold_dir / "result.pkl"
    if result_path.exists():
        return read_pickle(result_path)
    tc = cfg.train
    torch.manual_seed(_epoch_seed(cfg.seed, fold, 0) + 1)  # initial weights
    model = build_model(cfg.model).to(device)
    if init_weights is not None:
        model.load_state_dict(torch.load(init_weights, map_location=device, weights_only=True)["model"])
    optimizer = make_optimizer(model, tc)
    first_epoch = epoch_rows(train_idx, sampled, np.random.default_rng(_epoch_seed(cfg.seed, fold, 0)))
    steps_per_epoch = len(length_batches(data.batch_groups, first_epoch, tc.batch_size))
    scheduler = flat_then_cosine(optimizer, tc.epochs * steps_per_epoch, tc.flat_fraction)
    state = {"epoch": 0, "history": [], "best_score": float("inf"), "best_epoch": -1, "top": []}
    last_path = fold_dir / "last.pt"
    if last_path.exists():
        checkpoint = torch.load(last_path, map_location=device, weights_only=False)
        model.load_state_dict(checkpoint["model"])
        optimizer.load_state_dict(checkpoint["optimizer"])
        scheduler.load_state_dict(checkpoint["scheduler"])
        state = checkpoint["state"]
        print(f"fold {fold}: resuming at epoch {state['epoch']} from {last_path}")
    scored_val = val_idx[data.sn_filter[val_idx] == 1]
    val_slots = validation_slots(tc, data.n_slots)
    if init_weights is not None and not state["history"]:
        _validate_start(model, data, scored_val, device, tc, state, fold_dir, fold, val_slots)
    for epoch in range(state["epoch"], tc.epochs):
        start = time.time()
        rng = np.random.default_rng(_epoch_seed(cfg.seed, fold, epoch))
        train_loss = _train_epoch(model, optimizer, scheduler, data, epoch_rows(train_idx, sampled, rng), device, tc,
                                  rng, desc=f"fold {fold} epoch {epoch + 1}/{tc.epochs}")
        scores = {}
        if _validate_after(epoch, tc):
            val_pred = predict(model, data, scored_val, device, tc.eval_batch_size, tc.bf16, tc.channels_last,
                               desc="validate", slots=val_slots)
            scores = score_rows(data, val_pred, scored_val)
        state["history"].append({"epoch": epoch + 1, "train_loss": train_loss, **scores,
                                 "lr": scheduler.get_last_lr()[0], "seconds": round(time.time() - start, 2)})
        if scores:
            _keep_checkpoint(model, state, fold_dir, epoch + 1, scores["mcrmse_scored"], tc)
        state["epoch"] = epoch + 1
        _save(last_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                          "scheduler": scheduler.state_dict(), "state": state})
        _drop_stale_top(fold_dir, state)
        val_text = (f"val MCRMSE {scores['mcrmse_scored']:.4f} (all 5: {scores['mcrmse_all5']:.4f})"
                    if scores else "not validated")
        print(f"fold {fold} epoch {epoch + 1}: loss {train_loss:.4f} {val_text} {time.time() - start:.1f}s",
              flush=True)
    return _finish_fold(model, data, fold, val_idx, scored_val, val_slots, fold_dir, device, tc, state)


def _finish_fold(model, data, fold, val_idx, scored_val, val_slots, fold_dir, device, tc, state) -> dict:
    """Pick the fold's model (the average of its top checkpoints when that scores better than the best
    one alone, on the same validation), write it as model.pt and predict the fold's OOF rows."""
    best = torch.load(fold_dir / "best.pt", map_location=device, weights_only=True)["model"]
    result = {"fold": fold, "history": state["history"], "best_epoch": state["best_epoch"],
              "averaged_epochs": None, "best_single_score": state["best_score"]}
    top = sorted(state.get("top", []))
    chosen = best
    if len(top) >= 2:
        averaged = average_weights([_top_path(fold_dir, e) for _, e in top], device)
        model.load_state_dict(averaged)
        val_pred = predict(model, data, scored_val, device, tc.eval_batch_size, tc.bf16, tc.channels_last,
                           desc="validate average", slots=val_slots)
        score = score_rows(data, val_pred, scored_val)["mcrmse_scored"]
        result["averaged_score"] = score
        print(f"fold {fold}: average of epochs {[e for _, e in top]}: val MCRMSE {score:.4f} "
              f"(best single, epoch {state['best_epoch']}: {state['best_score']:.4f})", flush=True)
        if score < state["best_score"]:
            chosen, result["averaged_epochs"] = averaged, [e for _, e in top]
    _save(final_model_path(fold_dir), {"model": chosen, "averaged_epochs": result["averaged_epochs"],
                                       "best_epoch": state["best_epoch"]})
    model.load_state_dict(chosen)
    oof = predict(model, data, val_idx, device, tc.eval_batch_size, tc.bf16, tc.channels_last, desc="oof")
    result.update(val_idx=val_idx, oof={i: oof[i] for i in val_idx.tolist()})
    write_pickle(fold_dir / "result.pkl", result)
    return result


def average_weights(paths: list[Path], device: torch.device) -> dict:
    """Element-wise mean of the model weights stored in `paths` (integer buffers from the first)."""
    states = [torch.load(p, map_location=device, weights_only=True)["model"] for p in paths]
    averaged = {}
    for key, first in states[0].items():
        averaged[key] = (torch.stack([s[key].float() for s in states]).mean(dim=0).to(first.dtype)
                         if first.is_floating_point() else first.clone())
    return averaged


def _top_path(fold_dir: Path, epoch: int) -> Path:
    return fold_dir / "top" / f"epoch{epoch}.pt"


def _keep_checkpoint(model, state: dict, fold_dir: Path, epoch: int, score: float, tc) -> None:
    """best.pt when `score` beats the best so far; a copy in top/ while it is among the
    train.average_top_k best validated epochs (files of dropped epochs go after last.pt is saved)."""
    weights = {"model": model.state_dict(), "epoch": epoch, "score": score}
    if score < state["best_score"]:
        state["best_score"], state["best_epoch"] = score, epoch
        _save(fold_dir / "best.pt", weights)
    k = tc.average_top_k or 0
    if k >= 2:
        top = sorted(state.get("top", []) + [[score, epoch]])[:k]
        if [score, epoch] in top:
            _save(_top_path(fold_dir, epoch), weights)
        state["top"] = top


def _drop_stale_top(fold_dir: Path, state: dict) -> None:
    kept = {_top_path(fold_dir, e).name for _, e in state.get("top", [])}
    for path in (fold_dir / "top").glob("epoch*.pt"):
        if path.name not in kept:
            path.unlink()


def _validate_start(model, data, scored_val, device, tc, state: dict, fold_dir: Path, fold: int,
                    val_slots: list[int]) -> None:
    """A warm start (pretrained encoder, phase-1 model, teacher) is scored before epoch 1 and is the
    best.pt until an epoch beats it, so training can never end worse than where it started."""
    start = time.time()
    scores = score_rows(data, predict(model, data, scored_val, device, tc.eval_batch_size, tc.bf16,
                                      tc.channels_last, desc="validate start", slots=val_slots), scored_val)
    state["history"].append({"epoch": 0, "train_loss": float("nan"), **scores, "lr": 0.0,
                             "seconds": round(time.time() - start, 2)})
    _keep_checkpoint(model, state, fold_dir, 0, scores["mcrmse_scored"], tc)
    print(f"fold {fold} start: val MCRMSE {scores['mcrmse_scored']:.4f} (all 5: {scores['mcrmse_all5']:.4f})",
          flush=True)


def _validate_after(epoch: int, tc) -> bool:
    """Every eval_every epochs while the learning rate is flat, every epoch once it anneals."""
    annealing = epoch + 1 > int(tc.epochs * tc.flat_fraction)
    return annealing or (epoch + 1) % tc.eval_every == 0 or epoch + 1 == tc.epochs


def _train_epoch(model, optimizer, scheduler, data, train_idx, device, tc, rng, desc) -> float:
    model.train()
    torch.manual_seed(int(rng.integers(2**31)))  # dropout
    losses = []
    for batch in tqdm(length_batches(data.batch_groups, train_idx, tc.batch_size, rng), desc=desc, leave=False):
        slots = rng.integers(0, data.n_slots, size=len(batch))  # one random structure per sample
        inputs = collate(data, batch, slots, device, with_labels=True, channels_last=tc.channels_last)
        targets, errors = inputs.pop("targets"), inputs.pop("errors")
        with autocast(device, tc.bf16):
            pred = model(**inputs)[:, :targets.shape[1]].float()
        loss = error_weighted_mse(pred, targets, errors, tc.loss_alpha, tc.loss_beta, tc.column_weights)
        optimizer_step(model, optimizer, scheduler, loss, tc.grad_clip)
        losses.append(loss.item())
    return float(np.mean(losses))


def _save(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)
