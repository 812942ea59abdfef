"""Training-step speed of the suite against a classic nanoGPT step, per model size of a mode, with MFU.

    python benchmarks/throughput.py [--modes quick dev] [--seconds 3] [--device auto]

For every size of each mode (its width, depth, context, global batch and vocabulary):
- ``reference``: a step written here in the classic GPT-2 style of nanoGPT (Karpathy's model.py):
  LayerNorm with biases, learned positions, GELU MLP of 4·d, fused QKV, tied embedding, plain
  (non-fused) AdamW, fp32, eager — the same head width as the suite, so the same number of heads;
- ``eager``: the suite's model in fp32 without compile;
- ``suite``: the suite's step as `train` runs it: its precision rule (device.pick_precision: bf16
  for a compiled step on an AMX CPU at d_model >= 32, else fp32), fused AdamW, and compile when its `auto`
  rule would compile a typical run of that size in the mode (compiling.compile_pays) when the graph
  is expected to load in COMPILE_WARM_S (compiled before); where a fresh machine's cold warm-up
  changes that choice, the row says so.
Model FLOP/s = flops_per_token × tokens/s, each model counted by the suite's convention
(6N + 6·depth·context·d_model, N = non-embedding + output head). MFU divides by the matmul peak
of the step's precision (32: fp32, 16: bf16; square matmuls, 2·n³ FLOPs each, n the best of 512,
1024, 2048): a bf16 step's elementwise work, attention and optimizer stay fp32, so at these widths
its MFU against the bf16 peak is small however fast the step; the suite's compiled fp32 step is
shown beside it. The figure of merit is suite/reference in model FLOP/s. The steps of a size and
the two peaks are timed in alternating windows (`rates`), so a drift of the machine's speed hits
all alike.
`warm-up` is the first compiled step (trace + codegen; less when inductor's on-disk cache has the
kernels from an earlier run).

Then the logging overhead: the cost of one logged point of the training curve (5 metrics, buffered
and flushed with log_batch to a fresh SQLite MLflow store), and its share of the training time of
a typical run of each size, which logs a point every `log_every` steps (config.derive).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from scaling_suite.compiling import COMPILE_WARM_S, compile_cold_s, compile_gain, compile_model
from scaling_suite.device import autocast, compile_support, fused_adamw, pick_device, pick_precision
from scaling_suite.model import GPT, ModelShape, flops_per_token
from scaling_suite.plan import MODES, make_plan


# --- the reference: nanoGPT's GPT-2 block, written out ----------------------------------------------

class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.ln_1, self.ln_2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.c_attn, self.attn_proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.c_fc, self.mlp_proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).contiguous().view(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class RefGPT(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(s.vocab_size, s.d_model), nn.Embedding(s.context, s.d_model)
        self.blocks = nn.ModuleList(RefBlock(s.d_model, s.n_head) for _ in range(s.depth))
        self.ln_f = nn.LayerNorm(s.d_model)
        self.lm_head = nn.Linear(s.d_model, s.vocab_size, bias=False)
        self.wte.weight = self.lm_head.weight        # weight tying, as nanoGPT
        self.shape = s

    def forward(self, idx, targets):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for b in self.blocks:
            x = b(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))

    def flops_per_token(self) -> int:
        # The suite's convention: N = every parameter but the input embeddings (tokens, positions);
        # the tied matrix counts once, as the output head.
        s = self.shape
        N = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * N + 6 * s.depth * s.context * s.d_model


# --- timing ---------------------------------------------------------------------------------------

def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def matmul_peak(device, dtype, seconds: float) -> tuple[float, int]:
    """The best FLOP/s of square matmuls (2·n³ FLOPs each), and the n that reached it."""
    return max((2 * n ** 3 * rate(matmul(device, dtype, n), device, seconds / 3), n) for n in (512, 1024, 2048))


def matmul(device, dtype, n: int):
    """One n×n matmul, as a function to time."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    return lambda: a @ b


def rate(fn, device, seconds: float) -> float:
    """Calls per second: the best of several short windows (robust to a busy neighbour)."""
    return rates({"fn": fn}, device, seconds)["fn"]


def rates(fns: dict, device, seconds: float, rounds: int = 3) -> dict:
    """Calls per second of each function, timed in alternating short windows, best window each. The
    speed of the reference machine drifts by +-25% over minutes (clocks, neighbours); alternating
    makes every variant see the same drift, so their ratios hold where back-to-back timings did not."""
    for fn in fns.values():
        fn()
    sync(device)
    best, t_end, done = dict.fromkeys(fns, 0.0), time.perf_counter() + seconds, 0
    window = seconds / (rounds * len(fns))
    while done < rounds or time.perf_counter() < t_end:
        for name, fn in fns.items():
            t0, n = time.perf_counter(), 0
            while n < 2 or time.perf_counter() - t0 < window:
                fn()
                n += 1
            sync(device)
            best[name] = max(best[name], n / (time.perf_counter() - t0))
        done += 1
    return best


def make_step(model, opt, x, precision, device):
    def step():
        with autocast(device, precision):
            loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def measure(shape: ModelShape, batch: int, device, seconds: float, steps_typical: int, peak_n: dict) -> dict:
    """Model FLOP/s of the reference, the suite's eager fp32 step, its compiled fp32 step and its own
    step (its precision and compile choices for a typical run of this size), with the matmul peaks
    (square matmuls of PEAK_N[dtype]), all timed in the same alternating windows."""
    x = torch.randint(0, shape.vocab_size, (batch, shape.context + 1), device=device)
    tokens, fpt = batch * shape.context, flops_per_token(shape)
    torch.manual_seed(0)
    ref = RefGPT(shape).to(device)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=0.1)   # plain: no fused/foreach

    def suite_step(precision, compiled):
        torch.manual_seed(0)
        model = GPT(shape).to(device)
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-3, fused=fused_adamw(device))
        return make_step(compile_model(model) if compiled else model, opt, x, precision, device)

    # As train.py: eager steps in the eager precision, compiled ones in the compiled precision.
    why_not = compile_support(device)
    prec_eager = pick_precision(device, "auto", shape)
    prec = pick_precision(device, "auto", shape, compiled=True)
    steps = {"ref": make_step(ref, ref_opt, x, "fp32", device), "eager": suite_step("fp32", False)}
    if prec_eager != "fp32":
        steps["eager_prec"] = suite_step(prec_eager, False)
    warmup = {}
    if why_not is None:
        for p in dict.fromkeys(["fp32", prec]):
            steps[f"compiled_{p}"] = suite_step(p, True)
            t0 = time.perf_counter()
            steps[f"compiled_{p}"]()
            sync(device)
            warmup[p] = time.perf_counter() - t0
    for dtype, n in peak_n.items():
        steps[f"peak_{dtype}"] = matmul(device, torch.float32 if dtype == "fp32" else torch.bfloat16, n)
    r = rates(steps, device, seconds * len(steps))
    gf = {k: v * tokens * fpt for k, v in r.items()}
    out = {"ref": r["ref"] * tokens * ref.flops_per_token(), "eager": gf["eager"],
           "peaks": {dtype: r[f"peak_{dtype}"] * 2 * n ** 3 for dtype, n in peak_n.items()},
           "fp32_compiled": gf.get("compiled_fp32", float("nan")), "warmup": warmup.get(prec, float("nan")),
           "compiled": gf.get(f"compiled_{prec}", float("nan")), "eager_prec": gf.get("eager_prec", gf["eager"])}
    # The suite's `auto` choice for a typical run of this size (compiling.compile_pays, from the eager
    # step as train times it): with the graph compiled before (COMPILE_WARM_S) and cold.
    saved = steps_typical * tokens * fpt / out["eager_prec"] * compile_gain(shape, prec)
    out["compile"] = why_not is None and saved > COMPILE_WARM_S
    out["compile_cold"] = why_not is None and saved > compile_cold_s(shape)
    out["suite"] = out["compiled"] if out["compile"] else out["eager_prec"]
    out["prec"] = prec if out["compile"] else prec_eager
    out["step_s"] = tokens * fpt / out["suite"]
    return out


def logging_cost_per_point(n_steps: int = 3000) -> float:
    """Seconds per logged point of the curve (buffer + amortized log_batch flush), as train logs it."""
    import os

    from scaling_suite import tracking
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"
        tracking.init_store()
        tracker = tracking.start_run("logging-benchmark", run_name="logging", tags={})
        tracker._monitor and tracker._monitor.finish()   # system metrics run on their own thread
        t0 = time.perf_counter()
        for step in range(n_steps):
            tokens = (step + 1) * 8192
            tracker.log_metrics({"train_loss": 2.0, "lr": 1e-3, "tokens": tokens, "flops": tokens * 1e6,
                                 "tokens_per_second": 1e5}, step=tokens)
        tracker.flush()
        per_step = (time.perf_counter() - t0) / n_steps
        tracker.finish("FINISHED")
    return per_step


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", nargs="+", default=["quick", "dev"], choices=list(MODES))
    ap.add_argument("--seconds", type=float, default=3.0, help="timing per variant and size")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    device = pick_device(args.device)
    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, "
          f"compile: {compile_support(device) or 'available'}")
    peak_n = {"fp32": matmul_peak(device, torch.float32, args.seconds)[1]}
    if device.type != "mps":
        peak_n["bf16"] = matmul_peak(device, torch.bfloat16, args.seconds)[1]
    print("matmul peaks are timed with each size, in the same windows: square matmuls of n = "
          + ", ".join(f"{n} ({k})" for k, n in peak_n.items()))
    print(f"{'':>25} | {'reference':^14} | {'eager':>6} | {'fp32 compiled':^13} | {'the suite':^38} |")
    print(f"{'mode':>5} {'depth':>5} {'d':>4} {'N':>9} | {'GF/s':>6} {'MFU32':>7} | {'GF/s':>6} | {'GF/s':>6} "
          f"{'MFU32':>6} | {'prec':>4} {'compile':>7} {'warm-up':>7} {'GF/s':>6} {'MFU':>9} | {'suite/ref':>9}")
    step_s = {}
    for mode in args.modes:
        plan = make_plan(mode)
        for depth in sorted({p.config.depth for p in plan.points}):
            cfgs = [p.config for p in plan.points if p.config.depth == depth]
            steps = int(statistics.median(c.derived().steps for c in cfgs))
            shape, batch = cfgs[0].shape(), cfgs[0].batch_tokens // cfgs[0].context
            r = measure(shape, batch, device, args.seconds, steps, peak_n)
            step_s[(mode, depth)] = r["step_s"] * int(statistics.median(c.derived().log_every for c in cfgs))
            pk = r["peaks"]
            mfu = f"{r['suite'] / pk[r['prec']]:.0%} ({'16' if r['prec'] == 'bf16' else '32'})"
            print(f"{mode:>5} {depth:>5} {shape.d_model:>4} {cfgs[0].derived().N:>9,} | {r['ref'] / 1e9:>6.1f} "
                  f"{r['ref'] / pk['fp32']:>7.0%} | {r['eager'] / 1e9:>6.1f} | {r['fp32_compiled'] / 1e9:>6.1f} "
                  f"{r['fp32_compiled'] / pk['fp32']:>6.0%} | {r['prec']:>4} {'yes' if r['compile'] else 'no':>7} "
                  f"{r['warmup']:>6.0f}s {r['suite'] / 1e9:>6.1f} {mfu:>9} | {r['suite'] / r['ref']:>8.2f}x"
                  + ("" if r["compile"] else f"   (compiled: {r['compiled'] / 1e9:.1f} GF/s)")
                  + ("" if r["compile_cold"] == r["compile"] else
                     f"   (cold cache: eager {r['eager_prec'] / r['ref']:.2f}x)")
                  + f"   peaks {pk['fp32'] / 1e9:.0f}" + (f"/{pk['bf16'] / 1e9:.0f}" if "bf16" in pk else ""),
                  flush=True)
    per_point = logging_cost_per_point()
    print(f"logging: {per_point * 1e6:.0f} µs per point of the curve (5 metrics, buffered, log_batch to SQLite); "
          "share of the training time: " + ", ".join(f"{m} {d}: {per_point / s:.2%}" for (m, d), s in step_s.items()))


if __name__ == "__main__":
    main()
