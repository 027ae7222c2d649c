#!/usr/bin/env python
"""One attention layer through the C++ kernel (models/cpu_attention.py) and through torch, per head shape:
ms for an inference pass, a training forward pass (attention dropout 0.1) and its backward pass.

    python benchmarks/attention_kernel.py                       # 32 x 8 (paper config), 16 x 16, 8 x 16 (cpu config)
    python benchmarks/attention_kernel.py --shapes 32x8 --batch 24

Torch's side: the fused kernel (scaled_dot_product_attention) at inference; in training the model's
explicit path (scores, softmax, dropout, product), as KmerAttention trains on a CPU with dropout. The bias
is in channels_last memory, as the pair path leaves it. Minimum over rounds that alternate the two.
Synthetic inputs; prints figures, asserts nothing.
"""
import argparse
import time

import torch
import torch.nn.functional as F

from nucleic.models import cpu_attention
from nucleic.models.nucleic_transformer import explicit_attention


def best_ms(run, rounds: int, repeats: int = 3) -> float:
    run()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(repeats):
            run()
        best = min(best, (time.perf_counter() - start) / repeats)
    return 1e3 * best


def time_shape(heads: int, dim: int, batch: int, length: int, dtype, rounds: int) -> dict[str, float]:
    torch.manual_seed(0)
    qkv = torch.randn(batch, length, 3, heads, dim, dtype=dtype)
    bias = torch.randn(batch, heads, length, length, dtype=dtype).contiguous(memory_format=torch.channels_last)
    upstream = torch.randn(batch, length, heads, dim, dtype=dtype)
    q, k, v = qkv.permute(2, 0, 3, 1, 4)

    def kernel_train():
        qkv_, bias_ = qkv.detach().requires_grad_(), bias.detach().requires_grad_()
        return cpu_attention.biased_attention_with_grad(qkv_, bias_, 0.1), upstream

    def torch_train():
        qkv_, bias_ = qkv.detach().requires_grad_(), bias.detach().requires_grad_()
        q_, k_, v_ = qkv_.permute(2, 0, 3, 1, 4)
        return explicit_attention(q_, k_, v_, bias_, 0.1)[0], upstream.transpose(1, 2)

    def backward_only(forward):
        out, grad = forward()
        return lambda: out.backward(grad, retain_graph=True)

    with torch.inference_mode():
        figures = {"inference: kernel": best_ms(lambda: cpu_attention.biased_attention(qkv, bias), rounds),
                   "inference: torch": best_ms(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=bias),
                                               rounds)}
    figures["training forward: kernel"] = best_ms(kernel_train, rounds)
    figures["training forward: torch"] = best_ms(torch_train, rounds)
    figures["backward: kernel"] = best_ms(backward_only(kernel_train), rounds)
    figures["backward: torch"] = best_ms(backward_only(torch_train), rounds)
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=["32x8", "16x16", "8x16"], help="HEADSxDIM")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--length", type=int, default=107)
    parser.add_argument("--bf16", action="store_true", help="bfloat16 inputs (as under autocast)")
    parser.add_argument("--rounds", type=int, default=8)
    args = parser.parse_args()
    if not cpu_attention.available():
        raise SystemExit("the C++ attention kernel is not available here (no compiler, or NT_CPU_KERNEL=0)")
    dtype = torch.bfloat16 if args.bf16 else torch.float32
    print(f"CPU capability {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads, "
          f"batch {args.batch}, L = {args.length}, {dtype}; ms, minimum over {args.rounds} rounds")
    for shape in args.shapes:
        heads, dim = (int(x) for x in shape.split("x"))
        figures = time_shape(heads, dim, args.batch, args.length, dtype, args.rounds)
        print(f"  {heads} heads x {dim}: " + ", ".join(
            f"{part} {figures[part + ': kernel']:.2f} / {figures[part + ': torch']:.2f}"
            for part in ("inference", "training forward", "backward")) + "  (kernel / torch)")


if __name__ == "__main__":
    main()
