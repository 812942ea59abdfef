"""μP learning-rate transfer: the best lr at three widths (spanning >= 4x) under μP and standard.

    python benchmarks/mup_transfer.py                       # ~5 minutes on one free CPU core
    python benchmarks/mup_transfer.py --widths 16 32 64 --tokens 524288 --lrs 3e-3 6e-3 ... 2e-1

Yang et al. 2022 ("Tensor Programs V", §1, Figure 1): under μP the optimal learning rate is stable
across widths, so one tuned at a small base width transfers; under standard parametrization it
drifts (typically down as width grows). Depth is fixed (μP's guarantee is about width); width is
d_model = depth x aspect at a fixed head size, so more heads, not wider heads. Each (width, lr) is
one training run at the same tokens, batch, schedule and seed; the best lr per width is the vertex
of a parabola in log10 lr through the best grid point and its neighbours (falling back to the best
grid point at an edge). Pass criterion (issue 7): under μP, max/min of the best lrs <= 2.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scaling_suite import data as data_lib  # noqa: E402
from scaling_suite.config import make_config  # noqa: E402
from analysis.minimum import profile_minimum  # noqa: E402
from scaling_suite.train import TrainingFailed, train  # noqa: E402


def best_lr(lrs, losses) -> tuple[float, str]:
    ok = [(lr, l) for lr, l in zip(lrs, losses) if math.isfinite(l)]
    if not ok:
        return math.nan, "all diverged"
    i = min(range(len(ok)), key=lambda j: ok[j][1])
    if 0 < i < len(ok) - 1:
        near = ok[i - 1:i + 2]
        f = profile_minimum([p[0] for p in near], [p[1] for p in near], decades=10, n_bootstrap=0)
        if f["status"] == "ok":
            return f["x_opt"], "parabola"
    return ok[i][0], "edge" if i in (0, len(ok) - 1) else "grid"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--widths", type=int, nargs="+", default=[16, 32, 64], help="d_model values (multiples of head_dim)")
    p.add_argument("--head_dim", type=int, default=8)
    p.add_argument("--base_width", type=int, default=16, help="μP base width (where μP equals standard but for attention)")
    p.add_argument("--lrs", type=float, nargs="+", default=[4e-3, 8e-3, 1.6e-2, 3.2e-2, 6.4e-2, 1.28e-1])
    p.add_argument("--tokens", type=float, default=393216, help="D per run (same for every width; 96 steps)")
    p.add_argument("--batch_tokens", type=int, default=4096)
    p.add_argument("--context", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--parametrizations", nargs="+", default=["standard", "mup"])
    args = p.parse_args(argv)
    if min(args.widths) * 4 > max(args.widths):
        print("note: the widths span less than 4x", file=sys.stderr)
    data = data_lib.load_data("stdlib")
    t0 = time.perf_counter()
    table = {}
    for par in args.parametrizations:
        for w in args.widths:
            losses = []
            for lr in args.lrs:
                aspect = w // args.depth   # d_model = ceil(depth * aspect / head_dim) * head_dim
                cfg = make_config(depth=args.depth, aspect=aspect, head_dim=args.head_dim, context=args.context,
                                  batch_tokens=args.batch_tokens, eval_tokens=16384, D=args.tokens, lr=lr,
                                  seed=args.seed, parametrization=par,
                                  mup_base_width=args.base_width if par == "mup" else 0,
                                  device="cpu", precision="fp32", eval_every=10**6, checkpoint_every=10**6)
                assert cfg.shape().d_model == w, (w, cfg.shape())
                try:
                    r = train(cfg, data=data, progress=False)
                    losses.append(r.final_val_loss)
                except TrainingFailed:
                    losses.append(math.nan)
                print(f"{par:8s} width {w:4d} (N={cfg.derived().N:,}) lr {lr:.3g}: final_val_loss {losses[-1]:.4f}"
                      f"  [{time.perf_counter() - t0:.0f}s]", flush=True)
            table[(par, w)] = losses
    print(f"\nD = {args.tokens:,.0f} tokens, batch {args.batch_tokens}, depth {args.depth}, head_dim {args.head_dim}, "
          f"μP base width {args.base_width}; {time.perf_counter() - t0:.0f}s")
    print("final val loss (nats/token); rows: parametrization, width; columns: lr")
    print(" " * 16 + "".join(f"{lr:>9.3g}" for lr in args.lrs))
    for (par, w), losses in table.items():
        print(f"{par:8s} {w:6d} " + "".join(f"{l:>9.4f}" for l in losses))
    verdict = 0
    for par in args.parametrizations:
        bests = [(w, *best_lr(args.lrs, table[(par, w)])) for w in args.widths]
        finite = [b for _, b, _ in bests if math.isfinite(b)]
        drift = max(finite) / min(finite) if finite else math.nan
        lr_at = ", ".join(f"width {w}: {b:.3g} ({how})" for w, b, how in bests)
        print(f"{par}: best lr {lr_at}; drift max/min = {drift:.2f}x")
        if par == "mup":
            edge = any(how == "edge" for _, _, how in bests)
            ok = drift <= 2 and not edge
            print(f"μP transfer within a factor of 2: {'yes' if ok else 'NO'}"
                  + (" (inconclusive: a best lr sits at the edge of the grid; widen --lrs)" if edge else ""))
            verdict = 0 if ok else 1
    return verdict


if __name__ == "__main__":
    sys.exit(main())
