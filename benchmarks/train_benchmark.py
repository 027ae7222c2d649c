#!/usr/bin/env python
"""Nucleic Transformer speed on this machine: training samples/s and inference sequences/s for the
`paper` and `cpu` model configs, and what threads, bf16 autocast, channels_last and torch.compile give;
with the C++ attention kernel (models/cpu_attention.py) where the model uses it, and without;
then, for the variant each preset uses, where the time goes (embeddings, k-mer convolutions, pair path,
attention, feed-forward, optimizer, data collation) in a training step and in an inference batch.

    python benchmarks/train_benchmark.py                 # all variants (about 13 min on 2 AVX2 cores, 16 on A)
    python benchmarks/train_benchmark.py --quick         # plain fp32 and the preset's variant only
    python benchmarks/train_benchmark.py --presets paper # one model config only
    python benchmarks/train_benchmark.py --device cuda   # on a GPU: fp32, bf16, channels_last, torch.compile

Synthetic inputs (speed does not depend on values). Inference counts a sequence as 12 forward
passes, as stage 03/06 average over the 12 structure predictions. Prints figures; asserts nothing.
"""
import argparse
import time
import warnings

import numpy as np
import torch

from nucleic.config import load_config
from nucleic.dataset import RNATensors, collate, use_channels_last
from nucleic.engine import autocast, make_optimizer, native_bf16, use_bf16
from nucleic.losses import error_weighted_mse
from nucleic.models import cpu_attention
from nucleic.models.nucleic_transformer import KmerAttention, with_cpu_kernel
from nucleic.train import build_model, compile_model

N_STRUCTURES = 12
CPU = torch.device("cpu")


def inputs(batch: int, length: int, channels_last: bool, device=CPU):
    pair = torch.rand(batch, 4, length, length, device=device)
    if channels_last:
        pair = pair.contiguous(memory_format=torch.channels_last)
    return dict(sequence=torch.randint(1, 5, (batch, length), device=device),
                structure=torch.randint(1, 4, (batch, length), device=device),
                loop=torch.randint(1, 8, (batch, length), device=device), pair_features=pair)


def clock(device=CPU) -> float:
    """perf_counter once the device's queued work is done (GPU kernels run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def training_step(model, optimizer, batch, length, bf16, channels_last, device=CPU):
    """A function running one training step on fixed synthetic inputs and labels; it returns the
    seconds its optimizer step took."""
    x = inputs(batch, length, channels_last, device)
    target, errors = torch.rand(batch, 68, 5, device=device), torch.rand(batch, 68, 5, device=device) * 0.2

    def step() -> float:
        with autocast(device, bf16):
            pred = model(**x)[:, :68].float()
        loss = error_weighted_mse(pred, target, errors)
        optimizer.zero_grad()
        loss.backward()
        start = time.perf_counter()
        optimizer.step()
        return time.perf_counter() - start
    return step


def train_rate(model, cfg, batch, length, bf16, channels_last, steps, device=CPU) -> float:
    model.train()
    step = training_step(model, make_optimizer(model, cfg.train), batch, length, bf16, channels_last, device)
    step()  # warm-up (and compilation)
    start = clock(device)
    for _ in range(steps):
        step()
    return steps * batch / (clock(device) - start)


@torch.inference_mode()
def inference_rate(model, length, bf16, channels_last, steps, sequences_per_step=8, device=CPU) -> float:
    model.eval()
    x = inputs(sequences_per_step * N_STRUCTURES, length, channels_last, device)
    with autocast(device, bf16):
        model(**x)
        start = clock(device)
        for _ in range(steps):
            model(**x)
    return steps * sequences_per_step / (clock(device) - start)


def int8_linear_layers(model):
    """A copy of the model whose Linear layers compute in int8 (dynamic quantization: int8 weights,
    activations quantized per batch). Measured, not used by the presets: on B it gains 7 % at inference
    (cpu config) and moves the smoke OOF by 0.0011, past the 0.001 that fast paths must keep."""
    return torch.ao.quantization.quantize_dynamic(model.eval(), {torch.nn.Linear}, dtype=torch.qint8)


# Which modules make up each part of a training step (the optimizer and the collation are timed apart).
COMPONENTS = {
    "embeddings + head": lambda m: [m.sequence_embedding, m.structure_embedding, m.loop_embedding, m.project, m.head],
    "k-mer conv": lambda m: [x for layer in m.layers for x in (layer.kmer_conv, layer.kmer_norm, layer.deconv,
                                                                layer.out_norm)],
    "pair path": lambda m: [m.pair_in] + [x for layer in m.layers for x in (layer.pair_conv, layer.pair_to_bias,
                                                                             layer.pair_deconv)],
    "attention": lambda m: [x for layer in m.layers for x in (layer.encoder.attention, layer.encoder.dropout,
                                                               layer.encoder.attn_norm)],
    "feed-forward": lambda m: [x for layer in m.layers for x in (layer.encoder.feed_forward, layer.encoder.ff_norm)],
}


def part_timers(model, backward: bool) -> tuple[dict[str, float], list]:
    """Seconds spent in each part (COMPONENTS) inside real steps, summed by module hooks: forward, and
    with backward=True also each module's backward (from the gradient of its output to that of its
    input). Returns (totals, hooks); remove the hooks when done."""
    totals, started, hooks = dict.fromkeys(COMPONENTS, 0.0), {}, []
    for part, modules in COMPONENTS.items():
        for module in modules(model):
            def begin(mod, *_):
                started[mod] = time.perf_counter()

            def end(mod, *_, part=part):
                totals[part] += time.perf_counter() - started.pop(mod)
            hooks += [module.register_forward_pre_hook(begin), module.register_forward_hook(end)]
            if backward:
                hooks += [module.register_full_backward_pre_hook(begin), module.register_full_backward_hook(end)]
    return totals, hooks


def collate_ms(batch: int, length: int, channels_last: bool, repeats: int) -> float:
    """Median ms to collate one training batch from RNATensors (12 structure predictions per RNA)."""
    n, rng = 4 * batch, np.random.default_rng(0)
    data = RNATensors(ids=[str(i) for i in range(n)], sequence=[rng.integers(1, 5, length) for _ in range(n)],
                      structure=[rng.integers(1, 4, (N_STRUCTURES, length)) for _ in range(n)],
                      loop=[rng.integers(1, 8, (N_STRUCTURES, length)) for _ in range(n)],
                      bpp=[rng.random((N_STRUCTURES, length, length)).astype(np.float16) for _ in range(n)],
                      seq_scored=np.full(n, 68), targets=[rng.random((68, 5)) for _ in range(n)],
                      errors=[rng.random((68, 5)) for _ in range(n)])
    times = []
    for _ in range(repeats):
        indices, slots = rng.choice(n, batch, replace=False), rng.integers(0, N_STRUCTURES, batch)
        start = time.perf_counter()
        collate(data, indices, slots, CPU, with_labels=True, channels_last=channels_last)
        times.append(time.perf_counter() - start)
    return 1e3 * sorted(times)[len(times) // 2]


def profile_split(cfg, batch: int, length: int, bf16: bool, channels_last: bool, repeats: int = 5) -> dict[str, float]:
    """ms per training step of each part, timed inside real steps: forward + backward of every module
    group, the optimizer step and the batch collation; 'whole step' is a step without the timing hooks
    (the parts leave out autograd's glue between modules and the loss)."""
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    step = training_step(model, make_optimizer(model, cfg.train), batch, length, bf16, channels_last)
    optimizer_s = [step()]
    with warnings.catch_warnings():  # the first modules' inputs need no gradient: timed from their outputs'
        warnings.simplefilter("ignore", UserWarning)
        totals, hooks = part_timers(model, backward=True)
        optimizer_s += [step() for _ in range(repeats)]
    for hook in hooks:
        hook.remove()
    split = {name: 1e3 * seconds / repeats for name, seconds in totals.items()}
    split["optimizer"] = 1e3 * sorted(optimizer_s[1:])[repeats // 2]
    split["data collation"] = collate_ms(batch, length, channels_last, repeats)
    split["whole step"] = 1e3 * batch / train_rate(model, cfg, batch, length, bf16, channels_last, repeats)
    return split


@torch.inference_mode()
def inference_split(cfg, length: int, bf16: bool, channels_last: bool, repeats: int = 3,
                    sequences: int = 8) -> dict[str, float]:
    """ms of each part of one inference batch (`sequences` x 12 structures, forward only), timed inside
    real forward passes, and the whole forward pass without the hooks."""
    torch.manual_seed(0)
    model = build_model(cfg.model).eval()
    x = inputs(sequences * N_STRUCTURES, length, channels_last)
    with autocast(CPU, bf16):
        model(**x)
        totals, hooks = part_timers(model, backward=False)
        for _ in range(repeats):
            model(**x)
    for hook in hooks:
        hook.remove()
    split = {name: 1e3 * seconds / repeats for name, seconds in totals.items()}
    split["whole forward"] = 1e3 * sequences / inference_rate(model, length, bf16, channels_last, repeats, sequences)
    return split


def print_split(title: str, split: dict[str, float]) -> None:
    whole = list(split)[-1]
    print(f"  {title} (ms):")
    for name, ms in split.items():
        share = f"{100 * ms / split[whole]:5.1f} %" if name != whole else ""
        print(f"    {name:20s} {ms:8.1f} {share}")
    print(f"    {'(sum of parts)':20s} {sum(v for k, v in split.items() if k != whole):8.1f}")


def variants_for(preset: str, cfg, device, args) -> list[tuple]:
    """(name, threads, bf16, channels_last, torch.compile, int8 linear layers, C++ attention kernel) to
    time; the second is the variant the preset itself trains and predicts with (a preset with
    train.compile_inference predicts through the row named "PRESET'S inference: compiled"). The kernel
    attends where the model has KmerAttention.CPU_KERNEL_MIN_HEADS heads or more (the paper config); where
    it does, the preset's variant and its compiled inference are also timed with torch's attention."""
    threads = torch.get_num_threads()
    preset_bf16, preset_cl = use_bf16(device, cfg.train.bf16), use_channels_last(cfg.train.channels_last, device)
    kernel = device.type == "cpu" and cfg.model.nhead >= KmerAttention.CPU_KERNEL_MIN_HEADS and cpu_attention.available()
    variants = [("plain fp32", threads, False, False, False, False, kernel),
                (f"PRESET'S: bf16 {preset_bf16}, CL {preset_cl}", threads, preset_bf16, preset_cl, False, False, kernel)]
    if kernel:
        variants.append(("preset's, torch attention", threads, preset_bf16, preset_cl, False, False, False))
    if args.quick:
        return variants
    if device.type == "cuda":
        return variants + [("bf16 autocast", threads, True, False, False, False, False),
                           ("bf16 + channels_last", threads, True, True, False, False, False),
                           ("torch.compile + bf16", threads, True, False, True, False, False)]
    variants += [("1 thread", 1, False, False, False, False, kernel),
                 ("channels_last pair path", threads, False, True, False, False, kernel),
                 ("int8 linear + CL", threads, False, True, False, True, kernel),
                 ("torch.compile", threads, False, False, True, False, kernel),
                 ("torch.compile + CL", threads, False, True, True, False, kernel)]
    if native_bf16(device) or args.emulated_bf16:
        variants.insert(-3, ("bf16 autocast", threads, True, False, False, False, kernel))
        if not (preset_bf16 and preset_cl):  # else the preset's own row
            variants.insert(-3, ("bf16 + channels_last", threads, True, True, False, False, kernel))
        variants.append(("torch.compile + bf16 + CL", threads, True, True, True, False, kernel))
    elif preset == "cpu":
        print("  (bf16 autocast skipped: emulated on this CPU, 10-20x slower than fp32; --emulated-bf16 runs it)")
    if cfg.train.compile_inference:  # name the row the preset predicts with, or add it
        compiled = (threads, preset_bf16, preset_cl, True, False, kernel)
        rows = [i for i, variant in enumerate(variants) if variant[1:] == compiled]
        if rows:
            variants[rows[0]] = ("PRESET'S inference: compiled", *compiled)
        else:
            variants.append(("PRESET'S inference: compiled", *compiled))
        if kernel:
            variants.append(("compiled, torch attention", *compiled[:-1], False))
    return variants


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--emulated-bf16", action="store_true", help="also time bf16 where the CPU only emulates it")
    parser.add_argument("--steps", type=int, default=10, help="timed training steps (and inference batches) per variant")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (the parts' profile is timed on the CPU only)")
    parser.add_argument("--presets", nargs="+", default=["cpu", "paper"], choices=["cpu", "paper"],
                        help="model configs to time (default: both)")
    args = parser.parse_args()
    device = torch.device(args.device)
    max_threads = torch.get_num_threads()
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, native bf16: {native_bf16(CPU)}, "
          f"C++ attention kernel: {cpu_attention.available()}, {max_threads} threads"
          + (f"; timing on {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    for preset in args.presets:
        cfg = load_config(preset)
        batch = cfg.train.batch_size
        params = sum(p.numel() for p in build_model(cfg.model).parameters()) / 1e6
        print(f"\n[{preset}] nlayer={cfg.model.nlayer} d_model={cfg.model.d_model} nhead={cfg.model.nhead} "
              f"ff={cfg.model.dim_ff} pair_channels={cfg.model.pair_channels} ({params:.2f} M parameters), "
              f"batch {batch}, eval batch {cfg.train.eval_batch_size}")
        # sequences per inference batch; on a GPU 384 forward passes, as base.yaml advises
        eval_batch = 384 if device.type == "cuda" else cfg.train.eval_batch_size
        per_batch = max(1, eval_batch // N_STRUCTURES)
        for name, threads, bf16, channels_last, compiled, int8, kernel in variants_for(preset, cfg, device, args):
            torch.set_num_threads(threads)
            torch.manual_seed(0)
            model = with_cpu_kernel(build_model(cfg.model).to(device), kernel)
            if compiled:
                model = compile_model(model)  # as predict() compiles (train.compile_inference)
            try:
                train = None if int8 else train_rate(model, cfg, batch, 107, bf16, channels_last, args.steps, device)
                if int8:
                    model = int8_linear_layers(model)
                infer = {n: inference_rate(model, n, bf16, channels_last, args.steps, per_batch, device)
                         for n in (107, 130)}
            except Exception as err:  # a variant that does not run here is a finding too
                print(f"  {name:26s} failed: {type(err).__name__}: {str(err).splitlines()[0][:100]}")
                continue
            trained = "      (inference only)" if train is None else f"{train:7.1f} samples/s (L=107)"
            print(f"  {name:26s} train {trained} | inference {infer[107]:6.1f} seq/s (L=107), "
                  f"{infer[130]:6.1f} seq/s (L=130), x{N_STRUCTURES} structures")
        torch.set_num_threads(max_threads)
        if device.type != "cpu":
            continue
        preset_bf16, preset_cl = use_bf16(device, cfg.train.bf16), use_channels_last(cfg.train.channels_last, device)
        print_split("one training step of the preset's variant, forward + backward per part",
                    profile_split(cfg, batch, 107, preset_bf16, preset_cl))
        print_split(f"one inference batch of the preset's variant, {per_batch} sequences x {N_STRUCTURES} structures",
                    inference_split(cfg, 107, preset_bf16, preset_cl, sequences=per_batch))

if __name__ == "__main__":
    main()
