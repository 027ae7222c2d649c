"""The one training engine. Every model of the repository (the supervised and semi-supervised Nucleic
Transformer, its pretraining, the three sequence classifiers) trains through `Trainer.fit`, which owns
the epoch loop, resume from last.pt, per-epoch seeding, autocast, gradient clipping and checkpoint
selection; a caller brings its model, its batches and its batch -> loss function.

    trainer = Trainer(model, make_ranger(model, cfg.train), scheduler, run_dir, epochs=30, device=device,
                      seed=cfg.seed, stream=fold, select="mcrmse_scored")
    trainer.fit(epoch_batches=lambda rng: batches, batch_loss=lambda batch, rng: loss, evaluate=score)
    weights, chosen = trainer.final_weights(score)
"""
from __future__ import annotations

import contextlib
import datetime
import io
import math
import os
import time
from collections.abc import Callable, Iterable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from ranger_adabelief import RangerAdaBelief
from tqdm.auto import tqdm

from .io_utils import DamagedFile, atomic_path, check_zip

# ---------------------------------------------------------------------------------------------- device


def resolve_device(name: str) -> torch.device:
    """train.device: auto = CUDA when available, else CPU. Under torchrun each process takes the GPU of
    its LOCAL_RANK."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def configure_threads(threads: int) -> None:
    if threads:
        torch.set_num_threads(threads)


def setup_device(tc) -> torch.device:
    """What every stage does first: torch's threads from train.threads, and the device train.device names."""
    configure_threads(tc.threads)
    return resolve_device(tc.device)


def native_bf16(device: torch.device) -> bool:
    """Whether this device computes in bfloat16 natively; elsewhere bf16 is emulated and about 10x slower
    than fp32 (measured on an AVX2-only CPU)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
    return False


def autocast_dtype(device: torch.device, bf16: bool | str) -> torch.dtype | None:
    """The mixed precision of a train.bf16 setting: true = bfloat16; auto = bfloat16 where the device
    computes it natively, float16 on a CUDA GPU without it (training then scales gradients), else none
    (fp32); false = none."""
    if bf16 == "auto":
        if native_bf16(device):
            return torch.bfloat16
        return torch.float16 if device.type == "cuda" else None
    if isinstance(bf16, bool):
        return torch.bfloat16 if bf16 else None
    raise ValueError(f"bf16 must be true, false or auto, not {bf16!r}")


def use_bf16(device: torch.device, bf16: bool | str) -> bool:
    return autocast_dtype(device, bf16) == torch.bfloat16


def autocast(device: torch.device, bf16: bool | str):
    dtype = autocast_dtype(device, bf16)
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def grad_scaler(device: torch.device, bf16: bool | str) -> torch.amp.GradScaler | None:
    """Gradient scaling for float16 training (its gradients underflow without it); none otherwise."""
    return torch.amp.GradScaler(device.type) if autocast_dtype(device, bf16) == torch.float16 else None


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device`; to a GPU through pinned memory, the copy overlapping the computation."""
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


# ------------------------------------------------------------------------- data parallel (torchrun)


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside torchrun."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """The process that writes files: rank 0, or the only one."""
    return world()[0] == 0


@contextlib.contextmanager
def process_group(device_name: str):
    """Under torchrun: join the processes' group for the duration (NCCL on GPUs, gloo on CPUs);
    elsewhere nothing."""
    if not launched_by_torchrun() or dist.is_initialized():
        yield
        return
    device = resolve_device(device_name)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # rank 0 may fold for hours (stage 02's random sequences) while the others wait at a barrier
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=datetime.timedelta(hours=24))
    try:
        yield
    finally:
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def broadcast(value):
    """Rank 0's `value` on every process."""
    if world()[1] == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def batch_share(size: int) -> tuple[slice, float]:
    """This process's rows of a global batch of `size` rows, and the weight of their mean loss: n_r * W / N,
    so that the gradient DDP averages over W processes is the gradient of the global batch's mean loss.
    A process left without rows computes one row's loss at weight 0 (DDP needs every process's backward)."""
    rank, size_of_world = world()
    bounds = np.linspace(0, size, size_of_world + 1).round().astype(int)
    start, stop = int(bounds[rank]), int(bounds[rank + 1])
    if start == stop:
        return slice(0, 1), 0.0
    return slice(start, stop), (stop - start) * size_of_world / size


# ------------------------------------------------------------------------------- optimizers, schedules


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

    def __setstate__(self, state):  # the library prints "set state called" at every load_state_dict
        with contextlib.redirect_stdout(io.StringIO()):
            super().__setstate__(state)

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            shrink = 1.0 - group["lr"] * group["decoupled_weight_decay"]
            if shrink != 1.0:
                for p in group["params"]:
                    if p.grad is not None:
                        p.mul_(shrink)
        return super().step(closure)


def make_optimizer(model: torch.nn.Module, section) -> Ranger:
    """Ranger from a config section with lr, weight_decay and adabelief (true: RangerAdaBelief)."""
    return Ranger(model.parameters(), lr=section.lr, weight_decay=section.weight_decay,
                  adabelief=bool(section.adabelief))


# The classifiers' Adam, as the NT paper trained them (2.3.5).
CLASSIFIER_ADAM = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 1e-5}


def make_adam(model: torch.nn.Module, lr: float) -> torch.optim.Adam:
    return torch.optim.Adam(model.parameters(), lr=lr, **CLASSIFIER_ADAM)


# Both schedules are torch's LambdaLR with a closed-form factor. Why not SequentialLR(ConstantLR,
# CosineAnnealingLR): CosineAnnealingLR steps by a recursive formula that drifts from the closed form
# (up to 6e-7 at lr 1e-3 over 1,000 steps), which would change every trained model's bytes.

def flat_then_cosine(optimizer, total_steps: int, flat_fraction: float) -> torch.optim.lr_scheduler.LambdaLR:
    """Flat learning rate, then cosine annealing to 0 over the last (1 - flat_fraction) of the steps."""
    flat_steps = int(total_steps * flat_fraction)

    def factor(step: int) -> float:
        if step < flat_steps:
            return 1.0
        progress = (step - flat_steps) / max(1, total_steps - flat_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def warmup_inverse_sqrt(optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up to the optimizer's lr at `warmup_steps`, then lr * sqrt(warmup / step) (eq. 11 with
    its peak, C * d_model^-0.5 * warmup^-0.5, as the optimizer's lr)."""
    def factor(step: int) -> float:
        step = step + 1
        return min(step / warmup_steps, math.sqrt(warmup_steps / step))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def eq11_peak_lr(d_model: int, warmup_steps: int, scale: float) -> float:
    """The largest learning rate of eq. 11, scale * d_model^-0.5 * warmup^-0.5 (reached at the warm-up's end)."""
    return scale * d_model ** -0.5 * warmup_steps ** -0.5


# --------------------------------------------------------------------------------------------- engine


def epoch_seed(seed: int, stream: int, epoch: int) -> int:
    """Each epoch of each run (stream: fold, or -1 for pretraining) draws from its own seed, so a run
    resumed at an epoch boundary matches an uninterrupted one."""
    return (seed * 1_000_003 + stream * 10_007 + epoch) % 2**31


def seed_torch(rng: np.random.Generator) -> None:
    """Seed torch's global generator (dropout) from the epoch's generator."""
    torch.manual_seed(int(rng.integers(2**31)))


def save_checkpoint(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def read_checkpoint(path: Path, device: torch.device, weights_only: bool = True) -> dict:
    """A checkpoint this project wrote, after its CRC-32 check (torch.load itself checks none): DamagedFile
    when truncated or altered."""
    check_zip(path)
    return torch.load(path, map_location=device, weights_only=weights_only)


def load_checkpoint(path: Path, device: torch.device) -> dict:
    """A checkpoint given by the user, loaded safely (weights_only: tensors and plain data only).
    A missing file, or one that is not such a checkpoint, is one InputError line."""
    from .stage import InputError

    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        checkpoint = read_checkpoint(path, device)
    except DamagedFile as err:
        raise InputError(path, f"not a checkpoint of this project, or a damaged one ({err.why[:120]})") from None
    except Exception as err:  # torch raises many kinds (pickle, zip, runtime) for a file that is no checkpoint
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise InputError(path, f"not a checkpoint of this project ({first[:120]})") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint:
        raise InputError(path, "not a checkpoint of this project (no 'model' weights in it)")
    return checkpoint


def average_weights(paths: list[Path], device: torch.device) -> dict:
    """Element-wise mean of the model weights stored in `paths` (integer buffers from the first)."""
    states = [read_checkpoint(p, device)["model"] for p in paths]
    averaged = {}
    for key, first in states[0].items():
        averaged[key] = (torch.stack([s[key].float() for s in states]).mean(dim=0).to(first.dtype)
                         if first.is_floating_point() else first.clone())
    return averaged


class Trainer:
    """Trains `model` for `epochs` epochs in `run_dir`: last.pt after every epoch (fit resumes from it),
    best.pt whenever the `select` score of an evaluated epoch beats the best so far, and top/ copies of
    the `top_k` best epochs (final_weights tries their average)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler, run_dir: Path,
                 epochs: int, device: torch.device, seed: int, stream: int = 0, bf16: bool | str = False,
                 grad_clip: float | None = None, select: str | None = None, higher_is_better: bool = False,
                 top_k: int = 0, name: str = "train"):
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.run_dir, self.epochs, self.device = Path(run_dir), epochs, device
        self.seed, self.stream, self.bf16, self.grad_clip = seed, stream, bf16, grad_clip
        self.select, self.sign, self.top_k, self.name = select, (-1.0 if higher_is_better else 1.0), top_k or 0, name
        # best_score and the top list hold sign * score, so lower is better either way
        self.state = {"epoch": 0, "history": [], "best_score": float("inf"), "best_epoch": -1, "top": []}
        # what batch_loss calls: the model itself, or under torchrun its DistributedDataParallel wrapper
        # (gradients averaged over the processes during backward); checkpoints hold the model's own keys
        self.scaler = grad_scaler(device, bf16)
        self.net = model
        if world()[1] > 1:
            ids = [device.index] if device.type == "cuda" else None
            # static graph: the same parameters take part every step (some never, e.g. the regression head
            # while pretraining), which DDP learns from the first step
            self.net = torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, static_graph=True)

    @property
    def last_path(self) -> Path:
        return self.run_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.run_dir / "best.pt"

    def epoch_rng(self, epoch: int) -> np.random.Generator:
        return np.random.default_rng(epoch_seed(self.seed, self.stream, epoch))

    def resume(self) -> bool:
        """Load last.pt when there is one (model, optimizer, scheduler, history and checkpoint state)."""
        if not self.last_path.exists():
            return False
        try:
            checkpoint = read_checkpoint(self.last_path, self.device, weights_only=False)
        except DamagedFile as err:
            print(f"{err}: starting {self.name} over", flush=True)
            return False
        if not {"model", "optimizer", "scheduler", "state"} <= set(checkpoint):
            print(f"{self.last_path}: written by an older version of this code; starting over", flush=True)
            return False
        self.model.load_state_dict(checkpoint["model"])
        self.optimizer.load_state_dict(checkpoint["optimizer"])
        self.scheduler.load_state_dict(checkpoint["scheduler"])
        if self.scaler is not None and "scaler" in checkpoint:
            self.scaler.load_state_dict(checkpoint["scaler"])
        self.state = checkpoint["state"]
        print(f"{self.name}: resuming at epoch {self.state['epoch']} from {self.last_path}", flush=True)
        return True

    def fit(self, epoch_batches: Callable[[np.random.Generator], Iterable],
            batch_loss: Callable[[object, np.random.Generator], torch.Tensor],
            evaluate: Callable[[int], dict | None] | None = None, warm_start: bool = False,
            describe: Callable[[dict], str] | None = None) -> dict:
        """Run the remaining epochs; returns the state (history, best epoch and score, top epochs).

        epoch_batches(rng): the epoch's batches, drawn from the epoch's generator (the caller also seeds
        dropout from it, seed_torch, where its order of draws wants it). batch_loss(batch, rng): the
        loss of one batch, computed under autocast. evaluate(done): scores after `done` epochs, or
        None to skip validation then. warm_start: the starting weights are evaluated (done=0) and are
        best.pt until an epoch beats them, so training never ends worse than where it started.
        """
        self.resume()
        describe = describe or (lambda scores: " ".join(f"{k} {v:.4f}" for k, v in scores.items()))
        if warm_start and evaluate is not None and not self.state["history"]:
            self._evaluate_start(evaluate, describe)
        for epoch in range(self.state["epoch"], self.epochs):
            start = time.time()
            rng = self.epoch_rng(epoch)
            self.model.train()
            batches = epoch_batches(rng)
            loss = self._train_epoch(batches, batch_loss, rng, desc=f"{self.name} epoch {epoch + 1}/{self.epochs}")
            scores = (evaluate(epoch + 1) if evaluate is not None else None) or {}
            self.state["history"].append({"epoch": epoch + 1, "train_loss": loss, **scores,
                                          "lr": self.scheduler.get_last_lr()[0],
                                          "seconds": round(time.time() - start, 2)})
            if scores and self.select:
                self._keep(epoch + 1, scores[self.select])
            self.state["epoch"] = epoch + 1
            if is_main():
                save_checkpoint(self.last_path, {"model": self.model.state_dict(),
                                                 "optimizer": self.optimizer.state_dict(),
                                                 "scheduler": self.scheduler.state_dict(), "state": self.state,
                                                 **({"scaler": self.scaler.state_dict()} if self.scaler else {})})
                self._drop_stale_top()
            barrier()
            text = describe(scores) if scores else ("not validated" if evaluate is not None else None)
            parts = [f"{self.name} epoch {epoch + 1}: loss {loss:.4f}", text, f"{time.time() - start:.1f}s"]
            if is_main():
                print(" ".join(p for p in parts if p), flush=True)
        return self.state

    def final_weights(self, evaluate: Callable[[], dict] | None = None) -> tuple[dict, dict]:
        """(weights, record): the average of the top_k best epochs when evaluate() scores it better than
        best.pt alone, else best.pt, else (nothing selected) the current weights."""
        state = self.state
        record = {"best_epoch": state["best_epoch"], "averaged_epochs": None,
                  "best_single_score": self.sign * state["best_score"] if self.select else None}
        if not self.select or not self.best_path.exists():
            return {k: v.detach().clone() for k, v in self.model.state_dict().items()}, record
        best = read_checkpoint(self.best_path, self.device)["model"]
        top = sorted(state.get("top", []))
        if len(top) < 2 or evaluate is None:
            return best, record
        averaged = average_weights([self._top_path(e) for _, e in top], self.device)
        self.model.load_state_dict(averaged)
        score = evaluate()[self.select]
        record["averaged_score"] = score
        best_score = self.sign * state["best_score"]
        print(f"{self.name}: average of epochs {[e for _, e in top]}: {self.select} {score:.4f} "
              f"(best single, epoch {state['best_epoch']}: {best_score:.4f})", flush=True)
        if self.sign * score < state["best_score"]:
            record["averaged_epochs"] = [e for _, e in top]
            return averaged, record
        return best, record

    def _train_epoch(self, batches, batch_loss, rng, desc: str) -> float:
        losses = []
        size_of_world = world()[1]
        for batch in tqdm(batches, desc=desc, leave=False, disable=not is_main()):
            with autocast(self.device, self.bf16):
                loss = batch_loss(batch, rng)
            self.optimizer.zero_grad(set_to_none=True)
            self._step(loss)
            self.scheduler.step()
            if size_of_world > 1:  # the global batch's loss: the processes' weighted shares, summed
                loss = loss.detach() / size_of_world
                dist.all_reduce(loss)
            losses.append(loss.item())
        return float(np.mean(losses))

    def _step(self, loss: torch.Tensor) -> None:
        """Backward, clipping and the optimizer step; in float16 through the gradient scaler, which skips
        a step whose gradients overflowed."""
        if self.scaler is None:
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            return
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()

    def _evaluate_start(self, evaluate, describe) -> None:
        start = time.time()
        scores = evaluate(0)
        self.state["history"].append({"epoch": 0, "train_loss": float("nan"), **scores, "lr": 0.0,
                                      "seconds": round(time.time() - start, 2)})
        if self.select:
            self._keep(0, scores[self.select])
        print(f"{self.name} start: {describe(scores)}", flush=True)

    def _top_path(self, epoch: int) -> Path:
        return self.run_dir / "top" / f"epoch{epoch}.pt"

    def _keep(self, epoch: int, score: float) -> None:
        """best.pt when `score` beats the best so far; a copy in top/ while it is among the top_k best
        evaluated epochs (files of dropped epochs go after last.pt is saved)."""
        state, ranked = self.state, self.sign * score
        weights = {"model": self.model.state_dict(), "epoch": epoch, "score": score}
        if ranked < state["best_score"]:
            state["best_score"], state["best_epoch"] = ranked, epoch
            if is_main():
                save_checkpoint(self.best_path, weights)
        if self.top_k >= 2:
            top = sorted(state.get("top", []) + [[ranked, epoch]])[:self.top_k]
            if [ranked, epoch] in top and is_main():
                save_checkpoint(self._top_path(epoch), weights)
            state["top"] = top

    def _drop_stale_top(self) -> None:
        kept = {self._top_path(e).name for _, e in self.state.get("top", [])}
        for path in (self.run_dir / "top").glob("epoch*.pt"):
            if path.name not in kept:
                path.unlink()
