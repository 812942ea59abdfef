"""A run's checkpoint on disk: what it holds, how it is written (atomically) and read (without
running code), and when it is refused.

A checkpoint holds model, optimizer, step and RNG state, and the run's history (validation curve,
per-step training losses, final-loss predictions), so a resumed run retraces the uninterrupted one
exactly (train.py).
"""

from __future__ import annotations

import pickle
import re
import shutil
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np
import torch

from .config import RunConfig, make_config
from .errors import SuiteError
from .schedule import branch_problem

CHECKPOINT_KEYS = ("model", "optimizer", "step", "config", "curve", "train_losses", "predictions", "torch_rng")


def save_checkpoint(path: Path, model, opt, step: int, cfg: RunConfig, curve, train_losses, predictions,
                    branched_at: int = 0, run_id: str | None = None) -> None:
    """Tensors and plain Python values only (dicts, lists, str, int, float, bool, None), so that
    load_checkpoint can read it with torch.load(weights_only=True): numpy scalars (earlystop's
    fits return np.float64) are turned into floats, the RNG state is a uint8 tensor already and the
    config is its params dict. RUN_ID names the MLflow run the checkpoint belongs to."""
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": int(step),
             "config": cfg.to_params(), "run_id": run_id or "",
             "curve": [[int(t), float(v)] for t, v in curve], "train_losses": [float(x) for x in train_losses],
             "predictions": [_plain(asdict(p)) for p in predictions], "torch_rng": torch.get_rng_state(),
             "branched_at": int(branched_at)}
    tmp = path.with_suffix(".tmp")
    try:
        torch.save(state, tmp)
        tmp.replace(path)  # atomic: a kill mid-write never leaves a truncated checkpoint
    except (OSError, RuntimeError) as e:
        # torch's zip writer reports a full disk as "file write failed", without the errno.
        try:
            tmp.unlink(missing_ok=True)
            free = f"{shutil.disk_usage(path.parent).free / 2**20:,.0f} MB free there"
        except OSError:
            free = "free space unknown"
        raise SuiteError(f"cannot write the checkpoint {path}: {type(e).__name__}: {e} "
                         f"(is the disk full? {free})") from None


def _plain(d: dict) -> dict:
    return {k: (int(v) if isinstance(v, (int, np.integer)) else float(v)) for k, v in d.items()}


def load_checkpoint(path: Path, cfg: RunConfig, branch: bool = False, run_id: str | None = None) -> dict:
    """Read a checkpoint without running code, and refuse one that is not RUN_ID's own (or, for a
    branch, the trunk's) or does not fit CFG.

    weights_only=True: a checkpoint comes from the tracking store, which anyone who can log
    artifacts can write to; a full unpickle would run whatever a forged file asks for."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        what = f" ({found.group(1).rstrip('.')})" if found else ""
        raise SuiteError(f"refused checkpoint {path}: it holds objects other than tensors and plain values{what}, "
                         "which could run code when loaded") from None
    except Exception as e:  # noqa: BLE001
        raise SuiteError(f"cannot read checkpoint {path}: {type(e).__name__}: {e}") from None
    missing = [k for k in CHECKPOINT_KEYS if not isinstance(state, dict) or k not in state]
    if missing:
        raise SuiteError(f"checkpoint {path} is not a scaling-suite checkpoint: it lacks {', '.join(missing)}")
    owner = state.get("run_id") or ""
    # Checkpoints written before run ids were recorded have none; their config is still checked.
    if run_id and owner and owner != run_id:
        raise SuiteError(f"checkpoint {path} belongs to run {owner}, not {run_id}; refused")
    if branch:
        check_branch(state, cfg, path)
    else:
        # Compared as configs, not as strings: a preset's D=1_000_000 is written "1000000", and
        # the same value rebuilt from MLflow's params (--resume) is the float 1000000.0.
        made = config_from_params(state["config"])
        diff = [f.name for f in fields(RunConfig) if getattr(made, f.name) != getattr(cfg, f.name)]
        if diff:
            raise SuiteError(f"checkpoint {path} was made with a different config ({', '.join(diff)})")
    return state


def check_branch(state: dict, cfg: RunConfig, path) -> None:
    """Refuse a checkpoint that cannot start CFG as a branch (branch_problem)."""
    problem = branch_problem(config_from_params(state["config"]), cfg, state["step"])
    if problem:
        raise SuiteError(f"checkpoint {path} cannot start a branch: {problem}")


def config_from_params(params: dict) -> RunConfig:
    """Rebuild a RunConfig from an MLflow run's params (for --resume). It equals the logged config
    (dataclass equality: 1000000 == 1000000.0), though its to_params may spell a number otherwise."""
    names = {f.name for f in fields(RunConfig)}
    return make_config(**{k: v for k, v in params.items() if k in names})
