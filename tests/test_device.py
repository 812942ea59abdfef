"""The GPU paths of device.py, train.py and the CLI without a GPU: each device query is replaced by
what that torch version or device returns (read in the torch sources of each version, cited in
device.py), and the test checks what the user gets: placement, precision, optimizer, compile
decision, memory plan, or the one-line error. One test per defect of issue 17."""

import re
import shutil
from contextlib import nullcontext
from pathlib import Path

import pytest
import torch
import torch.utils._triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from scaling_suite import compiling
from scaling_suite import data as data_lib
from scaling_suite import device
from scaling_suite import train as train_mod
from scaling_suite.config import make_config
from scaling_suite.errors import SuiteError
from scaling_suite.model import GPT, ModelShape

REPO = Path(__file__).resolve().parents[1]
SMALL = dict(depth=1, context=32, batch_tokens=1024, D=8 * 1024, eval_tokens=2048, eval_every=4,
             warmup_tokens=2048, precision="fp32", device="cpu")
SHAPE = ModelShape.from_dial(4, 64, 64, 256, 128)        # d_model 256, 4 heads of 64


@pytest.fixture(scope="module")
def stdlib(token_cache):
    return data_lib.load_data("stdlib")


def fake_cuda(monkeypatch, capability=(8, 0), free=80 * 2**30):
    """A one-GPU CUDA machine as torch 2.4.0 answers: mem_get_info refuses a device without an
    index (2.4.0's _get_device_index(device) without optional=True); is_bf16_supported counts
    emulation unless including_emulation=False (torch/cuda/__init__.py: capability >= 8, else
    whether a bf16 tensor can be created, which it can on every CUDA >= 10 card)."""
    def mem_get_info(dev=None):
        if isinstance(dev, torch.device) and dev.index is None:
            raise ValueError(f"Expected a torch.device with a specified index or an integer, but got:{dev}")
        return free, 2 * free

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported",
                        lambda including_emulation=True: capability >= (8, 0) or including_emulation)


def fake_mps(monkeypatch, built=True, available=True, macos14=True, recommended=16 * 2**30, held=2 * 2**30):
    monkeypatch.setattr(torch.backends.mps, "is_built", lambda: built)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: available)
    monkeypatch.setattr(torch.backends.mps, "is_macos_or_newer", lambda major, minor: macos14 or major < 14)
    monkeypatch.setattr(torch.mps, "recommended_max_memory", lambda: recommended)
    monkeypatch.setattr(torch.mps, "driver_allocated_memory", lambda: held)


# 1. compile on a torch without dynamo's recompile_limit (2.4-2.6) ------------------------------

def test_compiling_without_recompile_limit_is_a_one_line_error(monkeypatch, stdlib):
    """torch 2.4-2.6 name it cache_size_limit: setting recompile_limit raised AttributeError, which
    the sweep recorded as an interruption. Now it is a SuiteError before the first step."""
    monkeypatch.delattr(torch._dynamo.config, "recompile_limit")
    with pytest.raises(SuiteError, match=r"recompile_limit.*torch>=2\.7"):
        device.compile_support(torch.device("cpu"))
    with pytest.raises(SuiteError, match="recompile_limit"):
        compiling.compile_model(GPT(SHAPE))
    steps = []
    monkeypatch.setattr(data_lib, "train_batch", lambda *a: steps.append(a) or pytest.fail("a step ran"))
    with pytest.raises(SuiteError, match="recompile_limit"):
        train_mod.train(make_config(**SMALL, compile="auto"), data=stdlib, progress=False)
    assert steps == []


@pytest.mark.parametrize("version,ok", [("2.4.0", False), ("2.6.0+cu124", False), ("2.7.0", True),
                                        ("2.7.0a0+7c8ec84dab.nv25.03", True), ("2.13.0+cpu", True)])
def test_the_torch_floor_is_checked_before_anything_runs(monkeypatch, version, ok):
    monkeypatch.setattr(torch, "__version__", version)
    with nullcontext() if ok else pytest.raises(SuiteError, match=r"older than this suite supports \(torch>=2\.7\)"):
        assert device.pick_device("cpu") == torch.device("cpu")


# 2. CUDA placement on torch 2.4.0 --------------------------------------------------------------

def test_cuda_placement_asks_free_memory_by_index(monkeypatch):
    fake_cuda(monkeypatch, free=4 * 2**30)
    pl = device.place("cuda", "auto", 0, SHAPE, 512)
    assert pl.device == torch.device("cuda") and pl.precision == "bf16"
    assert pl.free_bytes == 4 * 2**30 and pl.micro_batch * pl.accumulation == 512
    assert device.estimate_bytes(SHAPE, pl.micro_batch, "bf16", "cuda") <= 0.5 * pl.free_bytes


# 3. autocast on MPS before torch 2.5 -----------------------------------------------------------

def test_fp32_steps_never_enter_autocast(monkeypatch):
    """torch 2.4 raised "unsupported autocast device_type 'mps'" even for enabled=False, in every
    micro-step and evaluation. An fp32 step now opens no autocast context at all."""
    real = torch.autocast

    def autocast_2_4(device_type, *a, **k):
        if device_type == "mps":
            raise RuntimeError("User specified an unsupported autocast device_type 'mps'")
        return real(device_type, *a, **k)

    monkeypatch.setattr(torch, "autocast", autocast_2_4)
    with device.autocast(torch.device("mps"), "fp32"):
        pass
    cpu = torch.device("cpu")
    with device.autocast(cpu, "fp32"):
        assert not torch.is_autocast_enabled("cpu")
    with device.autocast(cpu, "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16


# 4. emulated bf16 on pre-Ampere CUDA -----------------------------------------------------------

@pytest.mark.parametrize("capability,auto", [((7, 5), "fp32"), ((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_cuda_bf16_only_where_native(monkeypatch, capability, auto):
    fake_cuda(monkeypatch, capability=capability)
    cuda = torch.device("cuda")
    assert device.pick_precision(cuda, "auto", SHAPE) == auto
    if auto == "fp32":   # T4 (7.5), V100 (7.0): bf16 would be emulated, slower than fp32
        with pytest.raises(SuiteError, match="no native bf16"):
            device.pick_precision(cuda, "bf16", SHAPE)
    else:
        assert device.pick_precision(cuda, "bf16", SHAPE) == "bf16"


# 5. triton without a C compiler ----------------------------------------------------------------

@pytest.mark.parametrize("on_path,cc,supported", [
    ({}, None, False),                                   # no gcc, no clang, no $CC: triton cannot build
    ({"gcc": "/usr/bin/gcc"}, None, True),
    ({"clang": "/usr/bin/clang"}, None, True),
    ({}, "/opt/cc", False),                              # $CC names a compiler that is not there
    ({"/opt/cc": "/opt/cc"}, "/opt/cc", True),
])
def test_cuda_compile_needs_a_c_compiler_for_triton(monkeypatch, on_path, cc, supported):
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: True)
    monkeypatch.setattr(shutil, "which", lambda name: on_path.get(name))
    if cc:
        monkeypatch.setenv("CC", cc)
    else:
        monkeypatch.delenv("CC", raising=False)
    why = device.compile_support(torch.device("cuda"))
    assert (why is None) == supported
    if not supported:
        assert "no C compiler for triton" in why
    monkeypatch.setattr(torch.utils._triton, "has_triton", lambda: False)
    assert device.compile_support(torch.device("cuda")) == "triton is not installed"


# 6. bf16 on MPS --------------------------------------------------------------------------------

def test_mps_bf16_needs_macos_14(monkeypatch):
    mps = torch.device("mps")
    fake_mps(monkeypatch, macos14=False)
    with pytest.raises(SuiteError, match="macOS 14"):
        device.pick_precision(mps, "bf16", SHAPE)
    assert device.pick_precision(mps, "auto", SHAPE) == device.pick_precision(mps, "fp32", SHAPE) == "fp32"
    fake_mps(monkeypatch, macos14=True)
    assert device.pick_precision(mps, "bf16", SHAPE) == "bf16"


# 7. the optimizer on MPS -----------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["cpu", "cuda", "mps"])
def test_training_builds_a_fused_adamw_on_every_device(monkeypatch, stdlib, kind):
    """train() on DEVICE (placement replaced; the model stays on this CPU) asks for the fused
    AdamW: MPS has it from torch 2.5, and the for-loop one was the only one it got."""
    class Built(Exception):
        pass

    seen = {}

    def adamw(params, **kw):
        seen.update(kw)
        raise Built

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    monkeypatch.setattr(train_mod, "place",
                        lambda *a: device.Placement(torch.device(kind), "fp32", 32, 1, 2**30))
    monkeypatch.setattr(torch.nn.Module, "to", lambda self, *a, **k: self)
    with pytest.raises(Built):
        train_mod.train(make_config(**SMALL), data=stdlib, progress=False)
    assert seen["fused"] is True and device.fused_adamw(torch.device(kind))


# 8. memory planning ----------------------------------------------------------------------------

def saved_activation_bytes(model: GPT, x: torch.Tensor, precision: str) -> int:
    """Bytes of the tensors autograd keeps for backward in one forward on this CPU (each storage
    once), leaving out the weights and autocast's copies of them (the parameter term)."""
    own = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    weight_shapes = {s for p in model.parameters() for s in (tuple(p.shape), tuple(p.shape)[::-1])}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in own and tuple(t.shape) not in weight_shapes:
            kept[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with device.autocast(torch.device("cpu"), precision):
            model(x[:, :-1], x[:, 1:])
    return sum(kept.values())


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("attention", ["fused", "math"])
@pytest.mark.parametrize("shape", [SHAPE, ModelShape.from_dial(3, 16, 8, 256, 64)])
def test_activation_estimate_matches_what_autograd_keeps(precision, attention, shape):
    """The estimate is what autograd saves plus the logits' gradient and one transient copy
    (2·T·V·4 bytes per sequence), on fused attention (CPU, CUDA) and on the math path (MPS
    trains through it; forced here with sdpa_kernel). a7e3e38's estimate was 2-3x this."""
    torch.manual_seed(0)
    model, micro = GPT(shape), 8
    x = torch.randint(0, shape.vocab_size, (micro, shape.context + 1))
    with sdpa_kernel(SDPBackend.MATH) if attention == "math" else nullcontext():
        saved = saved_activation_bytes(model, x, precision)
    kind = ("mps",) if attention == "math" else ()       # the device whose attention this is; CPU by default
    estimate = device.estimate_bytes(shape, micro, precision, *kind) - device.estimate_bytes(shape, 0, precision, *kind)
    logits_copies = 2 * micro * shape.context * shape.vocab_size * 4
    assert saved <= estimate <= 1.02 * (saved + logits_copies)


def test_mps_memory_is_metal_s_not_the_process_s(monkeypatch):
    """MPS: free = recommended working set less what the driver holds; mem_gb = the driver's
    allocation (a7e3e38: system RAM and the process's RSS)."""
    fake_mps(monkeypatch, recommended=12 * 2**30, held=3 * 2**30)
    mps = torch.device("mps")
    assert device.available_memory(mps) == 9 * 2**30
    assert device.process_memory(mps) == 3 * 2**30
    pl = device.place("mps", "auto", 0, SHAPE, 512)
    assert (pl.device, pl.precision, pl.free_bytes) == (mps, "fp32", 9 * 2**30)
    assert pl.micro_batch * pl.accumulation == 512    # memory changes the split only, never the batch
    assert device.estimate_bytes(SHAPE, pl.micro_batch, "fp32", "mps") <= 0.5 * pl.free_bytes
    assert pl.micro_batch == 512 or device.estimate_bytes(SHAPE, 2 * pl.micro_batch, "fp32", "mps") > 0.5 * pl.free_bytes


# 9. which MPS problem ----------------------------------------------------------------------------

@pytest.mark.parametrize("built,available,match", [
    (False, False, "not built: this torch was compiled without MPS"),
    (True, False, "built but unavailable"),
])
def test_mps_says_whether_it_is_unbuilt_or_unavailable(monkeypatch, built, available, match):
    fake_mps(monkeypatch, built=built, available=available)
    with pytest.raises(SuiteError, match=match):
        device.pick_device("mps")
    assert device.pick_device("auto") == torch.device("cpu")
    fake_mps(monkeypatch)
    assert device.pick_device("mps") == torch.device("mps")


# 10. the supported torch, stated once everywhere ---------------------------------------------------

def test_supported_torch_is_the_same_in_pyproject_device_and_readme():
    (floor,) = re.findall(r'^\s*"torch>=(\d+)\.(\d+)",$', (REPO / "pyproject.toml").read_text(), re.M)
    assert tuple(map(int, floor)) == device.TORCH_MIN
    readme = (REPO / "README.md").read_text()
    assert f"torch ≥ {floor[0]}.{floor[1]}" in readme and "35% MFU of an H100" not in readme
