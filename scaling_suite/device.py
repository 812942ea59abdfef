"""Device, precision and memory: choose where and how to run, never *what* to optimize.

The micro-batch planner only splits the configured global batch into equal micro-batches with
gradient accumulation, so the number of tokens per optimizer step is the same on every device.
"""

from __future__ import annotations

import functools
import gc
import os
import re
import shutil
from contextlib import nullcontext
from dataclasses import dataclass

import psutil
import torch

from .cache import cache_root
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

# The oldest torch whose behaviour the suite relies on (pyproject.toml says the same), each checked
# in that version's own sources (the macOS arm64 wheels of 2.4.0, 2.5.0, 2.6.0, 2.7.0 from PyPI):
# - torch._dynamo.config.recompile_limit: 2.7 (2.4-2.6 name it cache_size_limit; an unknown config
#   name raises AttributeError);
# - torch.cuda.mem_get_info(torch.device("cuda")), a device without an index: 2.5 (2.4.0's
#   _get_device_index(device) raises ValueError without optional=True);
# - autocast on MPS: 2.5, fp16 only (2.4 raises "unsupported autocast device_type 'mps'"); bf16
#   from 2.6 (2.5 warns and disables autocast), and its MPS kernels need macOS 14;
# - fused AdamW on MPS and torch.mps.recommended_max_memory: 2.5
#   (torch/utils/_foreach_utils._get_fused_kernels_supported_devices lists "mps" from 2.5).
# Older torch is refused in one line (check_torch), and the names that may move again are checked
# by feature where they are used (recompile_limit_problem).
TORCH_MIN = (2, 7)


def check_torch() -> None:
    """Refuse a torch older than TORCH_MIN, by its release number (a source build of 2.7, e.g.
    "2.7.0a0+git...", counts as 2.7: the feature checks at the points of use catch what it lacks)."""
    m = re.match(r"(\d+)\.(\d+)", str(torch.__version__))
    if m and (int(m[1]), int(m[2])) < TORCH_MIN:
        need = ".".join(map(str, TORCH_MIN))
        raise SuiteError(f"torch {torch.__version__} is older than this suite supports (torch>={need}): "
                         f"pip install 'torch>={need}'")


def mps_state() -> str:
    """Why MPS can or cannot be used here, from torch.backends.mps.is_built() (this torch was
    compiled with MPS: the macOS arm64 wheels) and is_available() (and this machine can run it).
    The two reasons are PyTorch's own (docs, notes/mps: "not built with MPS enabled" vs "the MacOS
    version is not 12.3+ and/or you do not have an MPS-enabled device")."""
    if not torch.backends.mps.is_built():
        return "not built: this torch was compiled without MPS (torch.backends.mps.is_built() is False)"
    if not torch.backends.mps.is_available():
        return ("built but unavailable: this macOS is too old or the machine has no MPS-enabled GPU "
                "(torch.backends.mps.is_available() is False)")
    return "available"


def pick_device(name: str = "auto") -> torch.device:
    """cuda > mps > cpu, unless a device is named; a named device that is absent is an error."""
    check_torch()
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
        state = mps_state()
        if state != "available":
            raise SuiteError(f"device 'mps' requested but Apple MPS is {state}")
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
        if requested == "bf16" and device.type == "cuda" and not cuda_has_bf16():
            raise SuiteError("precision bf16 requested but this CUDA device has no native bf16 (compute capability "
                             "below 8.0: emulated bf16 is slower than fp32); use --precision fp32 or auto")
        if requested == "bf16" and device.type == "mps" and not torch.backends.mps.is_macos_or_newer(14, 0):
            # torch >= 2.6 autocasts MPS to bf16, but its MPS bf16 kernels raise "MPS BFloat16 is
            # only supported on MacOS 14 or newer" (libtorch_cpu of the 2.6.0 wheel) mid-step.
            raise SuiteError("precision bf16 requested but MPS runs bf16 only on macOS 14 or newer; "
                             "use --precision fp32 or auto")
        return requested
    if device.type == "cuda":
        return "bf16" if cuda_has_bf16() else "fp32"
    if device.type == "mps":
        return "fp32"  # no measurement of MPS bf16 speed here; fp32 is what was checked to run.
    if compiled and shape.d_model >= CPU_BF16_MIN_WIDTH_COMPILED and cpu_has_amx():
        return "bf16"
    head = shape.d_model // shape.n_head
    wide = shape.d_model >= CPU_BF16_MIN_WIDTH and head >= CPU_BF16_MIN_HEAD
    return "bf16" if wide and cpu_has_bf16() else "fp32"


def cuda_has_bf16() -> bool:
    """Native bf16 (compute capability >= 8.0, or ROCm). The default is_bf16_supported() also
    counts emulation (it returns True where a bf16 tensor can merely be created: T4, V100,
    RTX 20xx), and emulated bf16 is slower than fp32. including_emulation exists from torch 2.4."""
    return torch.cuda.is_bf16_supported(including_emulation=False)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for a bf16 step; no autocast context at all for fp32, so an fp32 step never
    depends on the device type having autocast (MPS has it only from torch 2.5)."""
    if precision != "bf16":
        return nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def fused_adamw(device: torch.device) -> bool:
    """AdamW's fused kernel (one kernel per step instead of a loop over parameters): on CPU and
    CUDA, and on MPS from torch 2.5 ("[MPS] Fused Adam & AdamW", pytorch#127242; the device list in
    torch/utils/_foreach_utils._get_fused_kernels_supported_devices)."""
    return device.type in ("cpu", "cuda", "mps")


def available_memory(device: torch.device) -> int:
    """Bytes this process may still allocate on DEVICE.

    CUDA: the device's free memory (mem_get_info with an index: torch 2.4.0 refused a device
    without one). MPS: Metal's recommended working set (torch.mps.recommended_max_memory(),
    device.recommendedMaxWorkingSetSize; the MPS allocator's hard limit is a ratio of it,
    PYTORCH_MPS_HIGH_WATERMARK_RATIO, default 1.7, PyTorch docs "MPS Environment Variables") less
    what the Metal driver already holds for this process (driver_allocated_memory: tensors and the
    allocator's cached pools). CPU: available RAM."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, _total = torch.cuda.mem_get_info(index)
        return int(free)
    if device.type == "mps":
        return max(0, int(torch.mps.recommended_max_memory()) - int(torch.mps.driver_allocated_memory()))
    return int(psutil.virtual_memory().available)


def process_memory(device: torch.device) -> int:
    """Bytes in use (`mem_gb`): peak allocated by tensors on CUDA; on MPS, what the Metal driver
    holds for the process (torch.mps.driver_allocated_memory(): tensors plus cached pools, which
    the caching allocator keeps, so it follows the peak; MPS keeps no peak statistic); on CPU the
    process's resident set."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    if device.type == "mps":
        return int(torch.mps.driver_allocated_memory())
    return int(psutil.Process(os.getpid()).memory_info().rss)


def sdpa_keeps_scores(device_type: str) -> bool:
    """Whether training attention keeps the T×T probabilities for backward. CUDA (flash or
    memory-efficient kernels) and CPU (flash kernel) keep only q, k, v, the output and a
    log-sum-exp per row. On MPS, scaled_dot_product_attention with inputs that require grad takes
    the math path (aten/src/ATen/native/transformers/attention.cpp: the MPS kernel is used only
    without grad), whose softmax output autograd keeps."""
    return device_type == "mps"


def estimate_bytes(shape: ModelShape, micro_batch: int, precision: str, device_type: str = "cpu") -> int:
    """Rough peak memory of one training micro-step, in bytes.

    Parameters: fp32 weights, gradients and AdamW's two moments (16 bytes each), plus autocast's
    cached bf16 copy of the weights under bf16 (2 bytes).

    Activations: what autograd keeps for backward, counted per layer and token the way Korthikanti
    et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models", §4.1) count a
    Megatron layer. Their eq. 1, s·b·h·(34 + 5·a·s/h), is already in bytes (16-bit activations,
    1-byte dropout masks), so it is not to be multiplied by an element size again; and this model's
    layer differs from theirs (model.py: RMSNorm, SwiGLU of width d_mlp, rotary, no dropout), so its
    own tensors are counted, in values per token:
      - each RMSNorm keeps its input (the residual stream) and the normalized x (for the gain's
        gradient), fp32 even under autocast: 4·d at 4 bytes, plus one fp32 per token;
      - the inputs of the qkv, o and gate_up projections, 3·d, and SwiGLU's gate_up output,
        silu(gate) and the product fed to down, 4·d_mlp: 3·d + 4·d_mlp at 2 bytes in bf16, 4 in fp32;
      - fused attention (CUDA, CPU): the qkv output (v is a view of it), the rotated q and k and
        the output, 6·d in the same precision, and a log-sum-exp per head in fp32. Where it is not
        fused (sdpa_keeps_scores: MPS) the math path keeps its own q, k, v, 3·d, and the T×T
        probabilities, a·T per token: eq. 1's 5·a·s/h term, the part their §5 (selective
        activation recomputation) recomputes rather than stores and fused attention never stores;
        both at 4 bytes (on this CPU the math path computes in fp32 even under bf16 autocast; on
        MPS under bf16 this overcounts them by at most 2x).
    Then the final norm and the head's input, and three copies of T·V at 4 bytes: the logits,
    cross-entropy's fp32 log-softmax and, in backward, the logits' gradient.
    Checked against the bytes autograd saves on this CPU (tests/test_device.py).
    """
    d, L, T, V, H = shape.d_model, shape.depth, shape.context, shape.vocab_size, shape.n_head
    n_params = L * (4 * d * d + 3 * d * shape.d_mlp) + 2 * V * d
    act = 2 if precision == "bf16" else 4
    per_token_layer = (4 * d + 2) * 4 + (3 * d + 4 * shape.d_mlp) * act
    if sdpa_keeps_scores(device_type):
        per_token_layer += (3 * d + H * T) * 4
    else:
        per_token_layer += 6 * d * act + 4 * H
    per_seq = L * T * per_token_layer + T * (2 * d * 4 + d * act) + 3 * T * V * 4
    return (16 + (2 if precision == "bf16" else 0)) * n_params + micro_batch * per_seq


def plan_micro_batch(shape: ModelShape, batch_size: int, precision: str, free_bytes: int,
                     fraction: float = 0.5, device_type: str = "cpu") -> int:
    """Largest divisor of the global batch (in sequences) whose estimate fits in a fraction of memory.
    Only the split changes: the global batch, the schedule and the tokens are the config's."""
    budget = fraction * free_bytes
    for m in sorted((m for m in range(1, batch_size + 1) if batch_size % m == 0), reverse=True):
        if estimate_bytes(shape, m, precision, device_type) <= budget:
            return m
    one = estimate_bytes(shape, 1, precision, device_type)
    raise SuiteError(
        f"not enough memory: one sequence needs about {one / 2**30:.1f} GiB "
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
    micro = micro_batch or plan_micro_batch(shape, batch_size, prec, free, device_type=device.type)
    return Placement(device, prec, micro, batch_size // micro, free)


# Whether torch.compile can run here (compile_support); when to compile, and compiling, are
# compiling.py's. Inductor's on-disk kernel cache defaults to /tmp, which a reboot empties. Its place
# is fixed when torch._dynamo is first imported, so it is set here, on import of this module (which
# every module that compiles imports first).
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(cache_root() / "inductor"))
def recompile_limit_problem() -> str | None:
    """Why compile_model cannot raise dynamo's graph limit on this torch, or None. The name is
    torch._dynamo.config.recompile_limit from torch 2.7 (2.4-2.6: cache_size_limit, kept as an alias
    through 2.13); a config name dynamo does not know raises AttributeError, which a sweep would
    record as an interruption, so a missing name is a one-line error before the first step."""
    if hasattr(torch._dynamo.config, "recompile_limit"):
        return None
    need = ".".join(map(str, TORCH_MIN))
    return (f"torch {torch.__version__} has no torch._dynamo.config.recompile_limit, which compiling needs "
            f"(torch>={need}); pip install 'torch>={need}' or use --compile false")


def c_compiler() -> str | None:
    """The C compiler triton will build its launcher with, as triton/runtime/build.py picks it: $CC
    when set, else gcc, else clang (its error otherwise: "Failed to find C compiler. Please specify
    via CC environment variable")."""
    cc = os.environ.get("CC")
    return shutil.which(cc) if cc else (shutil.which("gcc") or shutil.which("clang"))


def compile_support(device: torch.device) -> str | None:
    """None when torch.compile can run on DEVICE, else the reason it cannot (then compile=auto runs
    eager and compile=true is refused). A torch without the dynamo config the suite sets is an
    error (SuiteError): neither eager nor compiled is what the run asked for."""
    problem = recompile_limit_problem()
    if problem:
        raise SuiteError(problem)
    if device.type == "mps":
        return "inductor's MPS backend is experimental; eager on MPS"
    if device.type == "cuda":
        from torch.utils._triton import has_triton   # imports triton when present: only on CUDA
        if not has_triton():
            return "triton is not installed"
        if c_compiler() is None:
            return "no C compiler for triton (gcc or clang on PATH, or $CC)"
        return None
    if not (shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") or shutil.which("clang++")):
        return "no C++ compiler (g++/clang++) for inductor's CPU kernels"
    return None
