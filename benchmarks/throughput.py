"""Training-step throughput of the suite's model, and this machine's matmul peak, so MFU can be read off.

    python benchmarks/throughput.py [--depths 1 2 4] [--seconds 3] [--device auto]

For each size: tokens/s and model FLOP/s (flops_per_token × tokens/s, the same 6N + attention
convention the suite logs) of a full training step — forward, backward, AdamW — in fp32 and in
bf16 autocast, plus MFU against the measured matmul peak of each precision. The matmul peak is
the best of square matmuls of a few sizes (2·n³ FLOPs each).
"""

from __future__ import annotations

import argparse
import time

import torch

from scaling_suite.device import autocast, pick_device, pick_precision
from scaling_suite.model import GPT, ModelShape, count_params, flops_per_token


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def timed(fn, device, seconds: float) -> float:
    """Calls per second of FN, after two warm-up calls."""
    fn(), fn()
    sync(device)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        fn()
        n += 1
    sync(device)
    return n / (time.perf_counter() - t0)


def matmul_peak(device, dtype, seconds: float) -> float:
    best = 0.0
    for n in (512, 1024, 2048):
        a = torch.randn(n, n, device=device, dtype=dtype)
        b = torch.randn(n, n, device=device, dtype=dtype)
        best = max(best, 2 * n ** 3 * timed(lambda: a @ b, device, seconds / 3))
    return best


def step_rate(shape: ModelShape, batch: int, precision: str, device, seconds: float) -> float:
    torch.manual_seed(0)
    model = GPT(shape).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=device.type in ("cpu", "cuda"))
    x = torch.randint(0, shape.vocab_size, (batch, shape.context + 1), device=device)

    def step():
        with autocast(device, precision):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return timed(step, device, seconds) * batch * shape.context


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--depths", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--aspect", type=int, default=32)
    ap.add_argument("--head_dim", type=int, default=16)
    ap.add_argument("--context", type=int, default=64)
    ap.add_argument("--batch_tokens", type=int, default=8192)
    ap.add_argument("--seconds", type=float, default=3.0)
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}")
    peaks = {"fp32": matmul_peak(device, torch.float32, args.seconds)}
    if device.type != "mps":
        peaks["bf16"] = matmul_peak(device, torch.bfloat16, args.seconds)
    print("matmul peak: " + ", ".join(f"{k} {v / 1e9:.1f} GFLOP/s" for k, v in peaks.items()))
    print(f"{'depth':>5} {'d_model':>7} {'N':>10} {'prec':>5} {'tok/s':>10} {'GFLOP/s':>8} {'MFU':>6} {'auto':>5}")
    for depth in args.depths:
        shape = ModelShape.from_dial(depth, args.aspect, args.head_dim, 256, args.context)
        fpt = flops_per_token(shape)
        auto = pick_precision(device, "auto", shape)
        for prec in peaks:
            tok_s = step_rate(shape, args.batch_tokens // args.context, prec, device, args.seconds)
            flops = tok_s * fpt
            print(f"{depth:>5} {shape.d_model:>7} {count_params(shape)['N']:>10,} {prec:>5} {tok_s:>10,.0f} "
                  f"{flops / 1e9:>8.1f} {flops / peaks[prec]:>6.1%} {'*' if prec == auto else '':>5}")


if __name__ == "__main__":
    main()
