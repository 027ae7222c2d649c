#!/usr/bin/env python
"""Nucleic Transformer speed on this machine: training samples/s and inference sequences/s for the
`paper` and `cpu` model configs, and what threads, bf16 autocast, channels_last and torch.compile give.

    python benchmarks/train_benchmark.py                 # all variants (a few minutes on 2 cores)
    python benchmarks/train_benchmark.py --quick         # default settings only

Synthetic inputs (speed does not depend on values). Inference counts a sequence as 12 forward
passes, as stage 03/06 average over the 12 structure predictions. Prints figures; asserts nothing.
"""
import argparse
import time

import torch

from nucleic.config import load_config
from nucleic.engine import autocast, make_optimizer, native_bf16, use_bf16
from nucleic.losses import error_weighted_mse
from nucleic.train import build_model

N_STRUCTURES = 12


def inputs(batch: int, length: int, channels_last: bool):
    pair = torch.rand(batch, 4, length, length)
    if channels_last:
        pair = pair.contiguous(memory_format=torch.channels_last)
    return dict(sequence=torch.randint(1, 5, (batch, length)), structure=torch.randint(1, 4, (batch, length)),
                loop=torch.randint(1, 8, (batch, length)), pair_features=pair)


def train_rate(model, cfg, batch, length, bf16, channels_last, steps) -> float:
    optimizer = make_optimizer(model, cfg.train)
    x = inputs(batch, length, channels_last)
    target, errors = torch.rand(batch, 68, 5), torch.rand(batch, 68, 5) * 0.2
    model.train()

    def step():
        with autocast(torch.device("cpu"), bf16):
            pred = model(**x)[:, :68].float()
        loss = error_weighted_mse(pred, target, errors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    step()  # warm-up (and compilation)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return steps * batch / (time.perf_counter() - start)


@torch.no_grad()
def inference_rate(model, length, bf16, channels_last, steps, sequences_per_step=8) -> float:
    model.eval()
    x = inputs(sequences_per_step * N_STRUCTURES, length, channels_last)
    with autocast(torch.device("cpu"), bf16):
        model(**x)
        start = time.perf_counter()
        for _ in range(steps):
            model(**x)
    return steps * sequences_per_step / (time.perf_counter() - start)


def pair_path_share(model, batch, length) -> float:
    """Fraction of a training step's CPU time spent in the 2-D pair path (conv2d + transposed conv2d)."""
    from torch.profiler import ProfilerActivity, profile

    x = inputs(batch, length, False)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        model(**x)[:, :68].sum().backward()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    pair = sum(e.self_cpu_time_total for e in events
               if any(name in e.key for name in ("conv2d", "convolution_backward", "slow_conv_transpose2d",
                                                 "mkldnn_convolution", "_convolution")))
    one_d = sum(e.self_cpu_time_total for e in events if "conv1d" in e.key)
    return (pair - one_d) / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--steps", type=int, default=5)
    args = parser.parse_args()
    max_threads = torch.get_num_threads()
    cpu = torch.device("cpu")
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16(cpu)}, "
          f"{max_threads} threads")
    for preset in ("cpu", "paper"):
        cfg = load_config(preset)
        batch = cfg.train.batch_size
        params = sum(p.numel() for p in build_model(cfg.model).parameters()) / 1e6
        print(f"\n[{preset}] nlayer={cfg.model.nlayer} d_model={cfg.model.d_model} nhead={cfg.model.nhead} "
              f"ff={cfg.model.dim_ff} pair_channels={cfg.model.pair_channels} ({params:.2f} M parameters), batch {batch}")
        preset_bf16 = use_bf16(cpu, cfg.train.bf16)
        variants = [("default", max_threads, False, False, False),
                    (f"preset (bf16 {preset_bf16}, CL {cfg.train.channels_last})", max_threads, preset_bf16,
                     cfg.train.channels_last, False)]
        if not args.quick:
            variants += [("1 thread", 1, False, False, False), ("bf16 autocast", max_threads, True, False, False),
                         ("channels_last pair path", max_threads, False, True, False),
                         ("torch.compile", max_threads, False, False, True)]
        for name, threads, bf16, channels_last, compiled in variants:
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = build_model(cfg.model)
            if compiled:
                model = torch.compile(model)
            try:
                train = train_rate(model, cfg, batch, 107, bf16, channels_last, args.steps)
                infer = {n: inference_rate(model, n, bf16, channels_last, max(1, args.steps // 2)) for n in (107, 130)}
            except Exception as err:  # a variant that does not run here is a finding too
                print(f"  {name:26s} failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                continue
            print(f"  {name:26s} train {train:7.1f} samples/s (L=107) | inference {infer[107]:6.1f} seq/s (L=107), "
                  f"{infer[130]:6.1f} seq/s (L=130), x{N_STRUCTURES} structures")
        torch.set_num_threads(max_threads)
        print(f"  pair path (conv2d + deconv2d) share of a training step: "
              f"{100 * pair_path_share(build_model(cfg.model), batch, 107):.0f} %")


if __name__ == "__main__":
    main()
