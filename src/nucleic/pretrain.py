"""Stage 02: unsupervised pretraining of the Nucleic Transformer (paper 2.3.3, 3.3.1, 3.3.4).

Every sequence of train + test (and optionally random sequences of the same lengths) is shown with one
of its structure predictions and corrupted tokens: half the batches by random mutation, half by
masking with the NULL token. Cross-entropy heads recover the true sequence, structure and loop type
at every position. Stage 03 starts from the encoder weights when `pretrain.enabled` is true.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, Paths
from .dataset import RNATensors, collate, length_batches, load_rna_tensors, token_inputs
from .engine import (
    Trainer,
    barrier,
    batch_share,
    flat_then_cosine,
    is_main,
    make_optimizer,
    read_checkpoint,
    save_checkpoint,
    seed_torch,
    setup_device,
    to_device,
    world,
)
from .features import LOOP_TOKENS, NULL_TOKEN, SEQUENCE_TOKENS, STRUCTURE_TOKENS
from .io_utils import read_pickle, write_json
from .models.nucleic_transformer import NucleicTransformer
from .stage import InputError, artifact_meta, claim_work_dir
from .structures import StructureStore
from .train import build_model

STREAMS = (("sequence", SEQUENCE_TOKENS), ("structure", STRUCTURE_TOKENS), ("loop", LOOP_TOKENS))


def corrupt(tokens: torch.Tensor, vocab_size: int, rate: float, mode: str,
            generator: torch.Generator) -> torch.Tensor:
    """A corrupted copy of `tokens` (ids 1..vocab_size): each position is picked with probability
    `rate` and masked with NULL (mode "mask") or replaced by a random letter (mode "mutate", which,
    as in the paper, may draw the same letter: about 3/4 of picks change)."""
    if mode not in ("mask", "mutate"):
        raise ValueError(f"mode must be 'mask' or 'mutate', got {mode!r}")
    picked = torch.rand(tokens.shape, generator=generator) < rate
    if mode == "mask":
        replacement = torch.full_like(tokens, NULL_TOKEN)
    else:
        replacement = torch.randint(1, vocab_size + 1, tokens.shape, generator=generator)
    return torch.where(picked, replacement, tokens)


class PretrainModel(nn.Module):
    """The Nucleic Transformer encoder with one classification head per token stream."""

    def __init__(self, model: NucleicTransformer):
        super().__init__()
        self.model = model
        d = model.cfg.d_model
        self.heads = nn.ModuleDict({name: nn.Linear(d, len(vocab)) for name, vocab in STREAMS})

    def forward(self, sequence, structure, loop, pair_features) -> dict[str, torch.Tensor]:
        hidden, _ = self.model.encode(sequence, structure, loop, pair_features)
        return {name: head(hidden) for name, head in self.heads.items()}


def reconstruction_loss(logits: dict[str, torch.Tensor], truth: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over the three streams of the cross-entropy at every position (token ids 1.. -> classes 0..)."""
    return sum(F.cross_entropy(logits[name].flatten(0, 1).float(), truth[name].flatten() - 1) for name, _ in STREAMS)


def pretraining_sequences(cfg: Config) -> list[str]:
    """Unique train + test sequences, plus random_multiplier x random ones of the same lengths."""
    paths = Paths(cfg)
    frames = []
    for split in ("train", "test"):
        path = paths.prepared / f"{split}.pkl"
        if not path.exists():
            raise InputError(path, "not found: run stage 00 (prepare_input) first")
        frames.append(read_pickle(path))
    real = sorted(set(frames[0].sequence) | set(frames[1].sequence))
    rng = np.random.default_rng(cfg.seed)
    letters = np.array(list(SEQUENCE_TOKENS))
    extra = ["".join(rng.choice(letters, len(s))) for _ in range(cfg.pretrain.random_multiplier) for s in real]
    return real + extra


def pretrain_checkpoint(cfg: Config) -> Path:
    return Paths(cfg).run / "pretrain" / f"{cfg.model.name}.pt"


def pretrain_settings(cfg: Config) -> dict:
    return {"model": dict(cfg.model), "pretrain": dict(cfg.pretrain), "seed": cfg.seed,
            "fold": {k: v for k, v in dict(cfg.fold).items() if k != "n_jobs"}}


def pretrain_key(cfg: Config) -> dict:
    prepared = Paths(cfg).prepared / "meta.json"
    return {**pretrain_settings(cfg), "prepared": prepared.read_text() if prepared.exists() else None}


def run_pretraining(cfg: Config, force: bool = False) -> tuple[list[Path], dict]:
    from .plots import plot_pretraining

    paths, pc = Paths(cfg), cfg.pretrain
    if not pc.enabled:
        return [], {"skipped": "pretrain.enabled is false"}
    device = setup_device(cfg.train)
    sequences = pretraining_sequences(cfg)
    store = StructureStore(paths.structures, cfg.fold)
    work_dir = pretrain_checkpoint(cfg).parent / cfg.model.name
    frame = pd.DataFrame({"id": [f"seq{i}" for i in range(len(sequences))], "sequence": sequences,
                          "seq_scored": [len(s) for s in sequences]})
    pairs = paths.run / "pairs"  # 100k+ sequences' matrices do not fit in memory: read per sample
    if is_main():  # under torchrun, rank 0 folds, claims and writes the pair file; the others wait for it
        store.fold_all(sequences, meta={"stage": "02_pretrain"}, n_jobs=cfg.fold.n_jobs)  # random ones, if any
        claim_work_dir(work_dir, pretrain_settings(cfg), force)
        data = load_rna_tensors(frame, store, pairs_folder=pairs)
    barrier()
    if not is_main():
        data = load_rna_tensors(frame, store, pairs_folder=pairs)
    history = pretrain_loop(cfg, data, work_dir, device)
    output = pretrain_checkpoint(cfg)
    summary = {"sequences": len(sequences), "final_loss": round(history[-1]["train_loss"], 4),
               "processes": world()[1]}
    figure, history_json = paths.figures / f"{cfg.model.name}_pretraining.png", work_dir / "history.json"
    if not is_main():
        return [output, figure, history_json], summary
    encoder = read_checkpoint(work_dir / "last.pt", torch.device("cpu"), weights_only=False)["model"]
    save_checkpoint(output, {"model": {k.removeprefix("model."): v for k, v in encoder.items() if k.startswith("model.")},
                   "settings": pretrain_settings(cfg)})
    plot_pretraining(figure, cfg.model.name, history)
    write_json(history_json, {"history": history, **artifact_meta(cfg)})
    return [output, figure, history_json], summary


def pretrain_loop(cfg: Config, data: RNATensors, work_dir: Path, device: torch.device) -> list[dict]:
    """Resumable pretraining through the engine; each epoch's randomness comes from (seed, epoch)."""
    pc, tc = cfg.pretrain, cfg.train
    torch.manual_seed(cfg.seed)
    model = PretrainModel(build_model(cfg.model)).to(device)
    optimizer = make_optimizer(model, pc)
    everything = np.arange(len(data))
    steps = len(length_batches(data.lengths, everything, pc.batch_size))
    scheduler = flat_then_cosine(optimizer, pc.epochs * steps, pc.flat_fraction)
    trainer = Trainer(model, optimizer, scheduler, work_dir, pc.epochs, device, seed=cfg.seed, stream=-1,
                      bf16=tc.bf16, grad_clip=pc.grad_clip, name="pretrain")
    generator = torch.Generator()

    def epoch_batches(rng):
        generator.manual_seed(int(rng.integers(2**31)))  # corruption
        seed_torch(rng)  # dropout
        return list(enumerate(length_batches(data.lengths, everything, pc.batch_size, rng)))

    def batch_loss(step_batch, rng):
        step, batch = step_batch
        # The randomness of the whole global batch is drawn in every process, so any number of processes
        # trains on the same corrupted batch; each then computes its share (torchrun; else all of it).
        slots = rng.integers(0, data.n_slots, size=len(batch))
        tokens = token_inputs(data, batch, slots)
        mode = "mask" if step % 2 == 0 else "mutate"  # half the batches masked, half mutated
        corrupted = {name: corrupt(tokens[name], len(vocab), pc.corrupt_rate, mode, generator)
                     for name, vocab in STREAMS}
        mine, weight = batch_share(len(batch))
        inputs = collate(data, batch[mine], slots[mine], device, channels_last=tc.channels_last)
        truth = {name: inputs[name] for name, _ in STREAMS}
        inputs.update({name: to_device(corrupted[name][mine], device) for name, _ in STREAMS})
        loss = reconstruction_loss(trainer.net(**inputs), truth)
        return loss if weight == 1.0 else loss * weight

    return trainer.fit(epoch_batches, batch_loss)["history"]
