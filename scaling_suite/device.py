"""Device, precision and memory: choose where and how to run, never *what* to optimize.

The micro-batch planner only splits the configured global batch into equal micro-batches with
gradient accumulation, so the number of tokens per optimizer step is the same on every device.
"""

from __future__ import annotations

import functools
import gc
import json
import os
from dataclasses import dataclass

import psutil
import torch

from .data import cache_root
from .errors import SuiteError
from .model import ModelShape

# bf16 autocast on CPU, eager: pays only when the matmuls are big enough for the AMX/AVX-512-BF16
# kernels to beat the casts around them, and the attention heads wide enough: with 8-32-wide heads
# the bf16 attention path was 1.1-3x slower than fp32 at every width tried. Measured on the
# reference 2-core AVX-512-BF16/AMX machine with benchmarks/throughput.py (README, "Precision
# rule"): head_dim 64 gave bf16/fp32 = 1.2x at d_model 128-256, 1.6x at 384, 1.7x at 512.
CPU_BF16_MIN_WIDTH = 256
CPU_BF16_MIN_HEAD = 64
# Compiled, with AMX: inductor fuses the casts into the elementwise kernels, the projections run as
# AMX bf16 GEMMs (4-5x the fp32 GEMMs at d_model 80) and narrow heads' attention stays fp32
# (model.Attention). Compiled bf16 over compiled fp32, same machine, interleaved timing: 0.98x at
# d_model 16, 1.16x at 32, 1.17-1.38x at 48-80 (quick), 1.5-1.7x at 64-192 (dev).
CPU_BF16_MIN_WIDTH_COMPILED = 32


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu, unless a device is named; a named device that is absent is an error."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SuiteError(f"device {name!r} requested but CUDA is not available on this machine")
        idx = int(name.split(":")[1]) if ":" in name else 0
        if idx >= torch.cuda.device_count():
            raise SuiteError(f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist")
        return torch.device(name)
    if name == "mps":
        if not torch.backends.mps.is_available():
            raise SuiteError("device 'mps' requested but Apple MPS is not available on this machine")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise SuiteError(f"unknown device {name!r}; choose auto, cpu, cuda, cuda:<i> or mps")


@functools.cache
def cpu_flags() -> str:
    """/proc/cpuinfo, read once ("" where there is none)."""
    try:
        return open("/proc/cpuinfo").read()
    except OSError:
        return ""


def cpu_has_bf16() -> bool:
    flags = cpu_flags()
    return "avx512_bf16" in flags or "amx_bf16" in flags


def cpu_has_amx() -> bool:
    return "amx_bf16" in cpu_flags()


def pick_precision(device: torch.device, requested: str, shape: ModelShape, compiled: bool = False) -> str:
    """fp32 or bf16 (autocast; master weights and the loss stay fp32) for an eager step or, with
    COMPILED, a compiled one."""
    if requested != "auto":
        if requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise SuiteError("precision bf16 requested but this CUDA device does not support bf16")
        return requested
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if device.type == "mps":
        return "fp32"  # MPS autocast to bf16 is incomplete across macOS versions; fp32 is safe.
    if compiled and shape.d_model >= CPU_BF16_MIN_WIDTH_COMPILED and cpu_has_amx():
        return "bf16"
    head = shape.d_model // shape.n_head
    wide = shape.d_model >= CPU_BF16_MIN_WIDTH and head >= CPU_BF16_MIN_HEAD
    return "bf16" if wide and cpu_has_bf16() else "fp32"


def autocast(device: torch.device, precision: str):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def available_memory(device: torch.device) -> int:
    """Bytes free for this process: CUDA's free memory, or system RAM (also for MPS: unified memory)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return int(psutil.virtual_memory().available)


def process_memory(device: torch.device) -> int:
    """Bytes in use now: peak allocated on CUDA, resident set size elsewhere."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(psutil.Process(os.getpid()).memory_info().rss)


def estimate_bytes(shape: ModelShape, micro_batch: int, precision: str) -> int:
    """Rough peak memory of one training micro-step.

    Weights, gradients and two AdamW moments: 16 bytes per parameter in fp32. Activations kept for
    backward per layer and token: about 34·d + 5·heads·T values (Korthikanti et al. 2022,
    "Reducing Activation Recomputation", §4.1, eq. 1), 2 bytes each in bf16 and 4 in fp32; plus
    the logits and their gradient (fp32 cross-entropy: 3 copies of T·V).
    """
    d, L, T, V = shape.d_model, shape.depth, shape.context, shape.vocab_size
    n_params = L * (4 * d * d + 3 * d * shape.d_mlp) + 2 * V * d
    act_bytes = 2 if precision == "bf16" else 4
    per_seq = L * T * (34 * d + 5 * shape.n_head * T) * act_bytes + 3 * T * V * 4
    return 16 * n_params + micro_batch * per_seq


def plan_micro_batch(shape: ModelShape, batch_size: int, precision: str, free_bytes: int,
                     fraction: float = 0.5) -> int:
    """Largest divisor of the global batch (in sequences) whose estimate fits in a fraction of memory."""
    budget = fraction * free_bytes
    for m in sorted((m for m in range(1, batch_size + 1) if batch_size % m == 0), reverse=True):
        if estimate_bytes(shape, m, precision) <= budget:
            return m
    raise SuiteError(
        f"not enough memory: one sequence needs about {estimate_bytes(shape, 1, precision) / 2**30:.1f} GiB "
        f"but {free_bytes / 2**30:.1f} GiB is free; use a smaller model or context")


def release_memory(device: torch.device) -> None:
    """Give memory back between runs of a sweep (the caller drops its references first)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "mps":
        torch.mps.empty_cache()


@dataclass(frozen=True)
class Placement:
    device: torch.device
    precision: str
    micro_batch: int
    accumulation: int
    free_bytes: int

    def tags(self) -> dict[str, str]:
        return {"device": str(self.device), "precision": self.precision,
                "torch_version": torch.__version__, "threads": torch.get_num_threads()}


def place(device_name: str, precision: str, micro_batch: int, shape: ModelShape, batch_size: int) -> Placement:
    """Where and how the eager steps and evaluations run (train.py may compile later steps in
    pick_precision(..., compiled=True))."""
    device = pick_device(device_name)
    prec = pick_precision(device, precision, shape)
    free = available_memory(device)
    micro = micro_batch or plan_micro_batch(shape, batch_size, prec, free)
    return Placement(device, prec, micro, batch_size // micro, free)


# torch.compile (TorchInductor) fuses the elementwise work between the matmuls (norms, rotary
# embeddings, SwiGLU, residual adds) into a few generated kernels. At the widths a CPU trains
# (d_model 16-192) that work, not the matmuls, dominates an eager step: compiled steps were
# 1.2-2x faster on the reference 2-core CPU (benchmarks/throughput.py). The price is a warm-up:
# tracing plus C++ compilation of the kernels, paid once per model shape per process, and mostly
# once per machine: inductor keeps the compiled kernels on disk (under the suite's cache, so they
# survive a reboot), and a later process of the same graph warms up faster. compile_warmups.json
# records the last warm-up of each graph compiled here, which the rule then expects.
#
# Inductor's on-disk kernel cache defaults to /tmp, which a reboot empties. Its place is fixed when
# torch._dynamo is first imported, so it is set here, on import of this module.
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
COMPILE_WARM_S = 5.0    # a shape this process compiled before (guards, cache lookups); a floor
COMPILE_PROBE_STEPS = 8 # eager steps timed before an `auto` decision
_compiled_shapes: set = set()


def compile_support(device: torch.device) -> str | None:
    """None when torch.compile can run on DEVICE, else the reason it cannot."""
    import shutil

    if device.type == "mps":
        return "inductor's MPS backend is experimental; eager on MPS"
    if device.type == "cuda":
        from torch.utils._triton import has_triton
        return None if has_triton() else "triton is not installed"
    if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler (g++/clang++) for inductor's CPU kernels"
    return None


def compile_cold_s(shape: ModelShape) -> float:
    """Expected warm-up of a shape not compiled in this process: tracing and C++ codegen grow with
    the number of layers (measured 15-30 s for depths 1-5 on the reference CPU, cold cache)."""
    return 10.0 + 5.0 * shape.depth


def compile_gain(shape: ModelShape, precision: str = "fp32") -> float:
    """Share of an eager step a compiled step of PRECISION is assumed to save, on the low side of
    what was measured (benchmarks/throughput.py, reference CPU): fp32 45% at d_model 16-32, where
    elementwise work and dispatch dominate the step, 20-35% at 48-80; compiled bf16 (AMX GEMMs)
    against the eager fp32 step 45-60% at d_model 32-192."""
    if precision == "bf16":
        return 0.4
    return 0.4 if shape.d_model <= 32 else 0.2


def compiled_shapes() -> frozenset:
    """Shapes this process has compiled (their warm-up is guards and cache lookups)."""
    return frozenset(_compiled_shapes)


def compile_key(device: torch.device, shape: ModelShape, precision: str, micro_batch: int) -> str:
    """What a compiled training graph depends on, as a key of the warm-up record."""
    return f"torch {torch.__version__} | {device.type} | {precision} | micro_batch {micro_batch} | {shape}"


def _warmup_record():
    return cache_root() / "compile_warmups.json"


def known_warmups() -> dict:
    try:
        return json.loads(_warmup_record().read_text())
    except (OSError, ValueError):
        return {}


def record_warmup(key: str, seconds: float) -> None:
    """Remember a measured warm-up (best effort: an unwritable cache only loses the hint)."""
    path = _warmup_record()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({**known_warmups(), key: round(seconds, 2)}, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass


def compile_pays(shape: ModelShape, eager_step_s: float, steps_left: int, precision: str = "fp32",
                 key: str | None = None) -> tuple[bool, str]:
    """Whether compiling now is repaid within the run: saved time > expected warm-up (5 s for a
    shape compiled in this process, the last warm-up measured on this machine for graph KEY, else
    the cold estimate)."""
    if shape in _compiled_shapes:
        warm, source = COMPILE_WARM_S, "compiled in this process"
    elif key is not None and key in (known := known_warmups()):
        # Compiled on this machine before: its kernels are in inductor's disk cache, and the last
        # warm-up measured here is the estimate (a process's first compile still traces the model:
        # 11-19 s at depths 1-3 with the cache warm against 18-33 s cold, `make quick` here).
        warm, source = max(known[key], COMPILE_WARM_S), "as last measured on this machine"
    else:
        warm, source = compile_cold_s(shape), "cold"
    saved = steps_left * eager_step_s * compile_gain(shape, precision)
    why = (f"{steps_left} steps left at {eager_step_s * 1e3:.0f} ms: ~{saved:.0f}s saved vs ~{warm:.0f}s warm-up "
           f"({source})")
    return saved > warm, why


def compile_model(model: torch.nn.Module) -> torch.nn.Module:
    """The compiled training forward; parameters are shared with MODEL (evaluation stays eager)."""
    _compiled_shapes.add(model.shape)
    # A study or tuning process trains many shapes; past dynamo's default of 8 graphs per
    # function it would silently fall back to eager.
    torch._dynamo.config.recompile_limit = max(64, torch._dynamo.config.recompile_limit)
    # dynamic=False: every step has the same shapes; a size not seen before gets its own graph
    # rather than a slower shape-generic one.
    return torch.compile(model, dynamic=False)
