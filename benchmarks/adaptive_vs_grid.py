"""The old fixed IsoFLOP grid against the adaptive study, on one machine, interleaved.

    python benchmarks/adaptive_vs_grid.py --mode quick              # grid, adaptive (each in a fresh store)
    python benchmarks/adaptive_vs_grid.py --repeats 2               # grid, adaptive, grid, adaptive
    python benchmarks/adaptive_vs_grid.py --study sqlite:////tmp/a/mlflow.db ...   # only read finished studies
    (--study reads each store's newest study; its wall time is the study's own wall_seconds metric)

For each study: wall time of the whole command, FLOPs its runs computed and FLOPs per wall second,
runs, budgets with a bracketed minimum (approach 2), and a (N_opt ∝ C^a) with its 95% interval, read
back from the study's parent run in MLflow (report.json, the same numbers the summary prints).
Run it on an otherwise idle machine: two studies at once share the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow


def run_study(mode: str, design: str, extra: list[str]) -> tuple[str, float]:
    """Train one study in a fresh store; (tracking URI, wall seconds of the command)."""
    folder = Path(tempfile.mkdtemp(prefix=f"bench-{design}-"))
    uri = f"sqlite:///{folder}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "SCALING_SUITE_STORAGE": f"sqlite:///{folder}/optuna.db"}
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "scaling_suite.cli", "sweep", "--mode", mode, "--design", design, "--quiet",
                    *extra], env=env, cwd=folder, check=True, stdout=subprocess.DEVNULL)
    return uri, time.perf_counter() - t


def read_study(uri: str, wall: float | None = None) -> dict:
    """The newest study parent in the store URI: its figures."""
    client = mlflow.MlflowClient(uri)
    exps = [e.experiment_id for e in client.search_experiments()]
    parent = client.search_runs(exps, "tags.role = 'study'", max_results=1, order_by=["attributes.start_time DESC"])[0]
    kids = client.search_runs(exps, f"tags.mlflow.parentRunId = '{parent.info.run_id}' and attributes.status = "
                                    "'FINISHED'", max_results=1000)
    train = [k for k in kids if k.data.tags.get("role") == "train"]
    flops = sum(k.data.metrics.get("C_spent", k.data.metrics.get("C", 0.0)) for k in kids)
    with tempfile.TemporaryDirectory() as tmp:
        rep = json.loads(Path(client.download_artifacts(parent.info.run_id, "analysis/report.json", tmp)).read_text())
    iso = rep.get("sections", {}).get("allocation_isoflop", {})
    wall = wall or parent.data.metrics.get("wall_seconds", float("nan"))
    return {"design": parent.data.tags.get("design"), "wall_s": wall, "flops": flops, "flops_per_s": flops / wall,
            "runs": len(train), "validation_runs": len(kids) - len(train),
            "bracketed_budgets": len(iso.get("table", [])), "a": iso.get("a"), "a_interval": iso.get("a_interval"),
            "validation_error": parent.data.metrics.get("validation_rel_error")}


def line(r: dict) -> str:
    iv = r["a_interval"]
    a = "-" if r["a"] is None else f"{r['a']:.3f}"
    a += f" [{iv[0]:.3f}, {iv[1]:.3f}]" if iv and all(v is not None for v in iv) else " (no interval)"
    v = r["validation_error"]
    return (f"{r['design']:9s} wall {r['wall_s']:6.0f}s  {r['flops']:.3g} FLOPs  {r['flops_per_s']:.3g} FLOP/s  "
            f"{r['runs']:3d} runs (+{r['validation_runs']} validation)  bracketed budgets {r['bracketed_budgets']}  "
            f"a = {a}" + (f"  validation error {v:+.2%}" if v is not None else ""))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="quick")
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--designs", nargs="+", default=["isoflop", "adaptive"], help="the order to train them in")
    p.add_argument("--study", nargs="*", default=None, help="tracking URIs of finished studies: only read them")
    a = p.parse_args()
    rows = []
    if a.study:
        rows = [read_study(uri) for uri in a.study]
    else:
        for _ in range(a.repeats):
            for design in a.designs:
                uri, wall = run_study(a.mode, design, [])
                rows.append(read_study(uri, wall))
                print(line(rows[-1]) + f"  ({uri})", flush=True)
    print(f"\n{a.mode}: fixed grid vs adaptive study, this machine ({os.cpu_count()} cores)")
    for r in rows:
        print(line(r))


if __name__ == "__main__":
    main()
