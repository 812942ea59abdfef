"""A decoder-only transformer of current practice, and the arithmetic that counts it.

Pre-norm RMSNorm, rotary position embeddings, SwiGLU MLP, causal scaled-dot-product attention,
no biases, untied input embedding and output head (as nanochat). This file only models and counts
itself: no I/O, no logging, no training.

The shape comes from one dial, ``depth`` (number of layers): width = depth * aspect, rounded up to
a whole number of heads of ``head_dim``. Sweeping depth at a fixed aspect ratio scales width and
depth together, the way Kaplan et al. 2020 (§3.1) found loss to depend on N and only weakly on shape.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass(frozen=True)
class ModelShape:
    depth: int          # n_layer
    d_model: int
    n_head: int
    d_mlp: int          # SwiGLU hidden width
    vocab_size: int
    context: int

    @staticmethod
    def from_dial(depth: int, aspect: int, head_dim: int, vocab_size: int, context: int) -> "ModelShape":
        d_model = math.ceil(depth * aspect / head_dim) * head_dim
        # SwiGLU keeps the MLP's parameter count at the classic 8·d² by using 2/3 of 4·d
        # (Shazeer 2020, "GLU Variants Improve Transformer", §2), rounded up to a multiple of 16.
        d_mlp = math.ceil(8 * d_model / 3 / 16) * 16
        return ModelShape(depth, d_model, d_model // head_dim, d_mlp, vocab_size, context)


# --- counting (pure functions of the shape, so a budget can be planned before a model exists) ----

def count_params(s: ModelShape) -> dict[str, int]:
    """Parameters in the three conventions, logged side by side; analysis chooses.

    - ``N_nonembed``: Kaplan et al. 2020 §2.1 — every weight except the embedding and the
      unembedding (output head).
    - ``N``: non-embedding plus the output head, the convention of Porian et al. 2024
      ("Resolving Discrepancies in Compute-Optimal Scaling of Language Models", §3.1), which
      removes most of the Kaplan/Chinchilla discrepancy at small scale. The suite's default N.
    - ``N_total``: every parameter (adds the input embedding), what ``sum(p.numel())`` gives.
    """
    d, h, L, V = s.d_model, s.d_mlp, s.depth, s.vocab_size
    per_layer = 4 * d * d + 3 * d * h + 2 * d   # q,k,v,o + SwiGLU (gate, up, down) + 2 RMSNorm gains
    nonembed = L * per_layer + d                 # + final RMSNorm gain
    head = V * d
    return {"N_nonembed": nonembed, "N": nonembed + head, "N_total": nonembed + 2 * head}


def flops_per_token(s: ModelShape) -> int:
    """Training FLOPs per token: 6N + 6·n_layer·n_ctx·d_model.

    Kaplan et al. 2020 Table 1: a forward pass costs 2N plus 2·n_layer·n_ctx·d_attn for the
    attention scores and their weighted sum; backward costs twice forward, hence the factor 3.
    N here includes the output head (its matmul is real compute, Porian et al. 2024 §3.1); the
    embedding lookup is not a matmul and is not counted. The attention term is counted over the
    full context (Kaplan's convention), not halved for the causal mask.
    """
    N = count_params(s)["N"]
    return 6 * N + 6 * s.depth * s.context * s.d_model


# --- the model ------------------------------------------------------------------------------------

def rope_tables(context: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    # Rotary embeddings, Su et al. 2021 ("RoFormer", §3.4.2): rotate pairs of channels by
    # position-dependent angles so attention scores depend on relative position only.
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (B, H, T, hd); rotate the two halves of each head (the "neox" layout).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class Attention(nn.Module):
    def __init__(self, s: ModelShape, scale: float | None = None):
        super().__init__()
        self.n_head = s.n_head
        self.scale = scale          # None: SDPA's 1/sqrt(head_dim); μP passes 1/head_dim
        # q, k and v in one matmul (as nanoGPT's c_attn): the same function and the same init
        # distribution as three projections, but one larger GEMM, which is what small widths on a
        # CPU are short of (benchmarks/throughput.py).
        self.qkv = nn.Linear(s.d_model, 3 * s.d_model, bias=False)
        self.o = nn.Linear(s.d_model, s.d_model, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        qkv = self.qkv(x).view(B, T, 3, self.n_head, C // self.n_head)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))      # (B, H, T, hd) each
        # CPU bf16 autocast: the projections run in bf16 (AMX GEMMs, 4-5x fp32 at these widths) but
        # the attention core of heads under 64 wide in fp32, where PyTorch's CPU attention kernel is
        # 3-4x faster than in bf16 (measured, device.py's precision rule).
        fp32_core = x.device.type == "cpu" and torch.is_autocast_enabled("cpu") and C // self.n_head < 64
        if fp32_core:
            q, k, v = q.float(), k.float(), v.float()
        with torch.autocast("cpu", enabled=False) if fp32_core else nullcontext():
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, s: ModelShape):
        super().__init__()
        self.gate_up = nn.Linear(s.d_model, 2 * s.d_mlp, bias=False)   # gate and up in one GEMM
        self.down = nn.Linear(s.d_mlp, s.d_model, bias=False)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, s: ModelShape, attn_scale: float | None = None):
        super().__init__()
        self.norm1 = nn.RMSNorm(s.d_model)
        self.attn = Attention(s, attn_scale)
        self.norm2 = nn.RMSNorm(s.d_model)
        self.mlp = SwiGLU(s)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        return x + self.mlp(self.norm2(x))


PARAMETRIZATIONS = ("standard", "mup")
HIDDEN = ("attn.qkv.weight", "attn.o.weight", "mlp.gate_up.weight",
          "mlp.down.weight")   # matrices whose fan-in and fan-out both grow with width


class GPT(nn.Module):
    """parametrization="standard" (the default) or "mup": maximal update parametrization (Yang et
    al. 2022, "Tensor Programs V", Table 3 for Adam, in the relative form of their `mup` package,
    App. B/J), with width multiplier m = d_model / base_width:

    - hidden matrices: init std divided by sqrt(m) (variance 1/fan_in), Adam lr divided by m;
    - output head: logits multiplied by 1/m (the MuReadout multiplier; with Adam this gives Table
      3's init variance 1/fan_in^2 and lr/fan_in for the effective weight), lr unchanged;
    - embedding and norm gains: unchanged (their fan-in does not grow with width);
    - attention logits scaled by 1/head_dim instead of 1/sqrt(head_dim) (§4, "attention logit").

    At m = 1 μP differs from standard only in the attention scale, so a learning rate tuned at the
    base width under μP transfers to other widths (TP5 §1, Figure 1). Width only: depth changes
    (our dial moves both) are not covered by μP's guarantee.
    """

    def __init__(self, shape: ModelShape, parametrization: str = "standard", base_width: int = 0):
        super().__init__()
        if parametrization not in PARAMETRIZATIONS:
            raise ValueError(f"unknown parametrization {parametrization!r}")
        mup = parametrization == "mup"
        if mup and base_width < 1:
            raise ValueError("parametrization='mup' needs a base width")
        self.shape = shape
        self.parametrization = parametrization
        self.width_mult = shape.d_model / base_width if mup else 1.0
        head_dim = shape.d_model // shape.n_head
        self.embed = nn.Embedding(shape.vocab_size, shape.d_model)
        self.blocks = nn.ModuleList(Block(shape, 1.0 / head_dim if mup else None) for _ in range(shape.depth))
        self.norm = nn.RMSNorm(shape.d_model)
        self.head = nn.Linear(shape.d_model, shape.vocab_size, bias=False)
        cos, sin = rope_tables(shape.context, shape.d_model // shape.n_head)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.apply(self._init)
        # GPT-2 (Radford et al. 2019, §2.3): scale the residual-branch output projections by
        # 1/sqrt(2·n_layer) so the residual stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("attn.o.weight") or name.endswith("mlp.down.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * shape.depth))
        if mup:
            # Rescaling after the standard draws keeps the RNG stream, so the same seed gives the
            # same weights up to the μP factors (and standard stays bitwise as it was).
            with torch.no_grad():
                for name, p in self.named_parameters():
                    if name.endswith(HIDDEN):
                        p.mul_(self.width_mult ** -0.5)

    @staticmethod
    def _init(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        T = idx.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        x = self.embed(idx)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits = self.head(self.norm(x))
        if self.width_mult != 1.0:
            logits = logits / self.width_mult      # μP output multiplier (TP5 Table 3, MuReadout)
        if targets is None:
            return logits
        # Mean cross-entropy in nats per token, computed in fp32 for stability under autocast.
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1))

    def count_params(self) -> dict[str, int]:
        return count_params(self.shape)

    def flops_per_token(self) -> int:
        return flops_per_token(self.shape)

    def param_groups(self, weight_decay: float) -> list[dict]:
        # Decay matrices only; gains of RMSNorm and (by convention, nanoGPT) nothing else.
        # `lr_scale` multiplies the scheduled lr of a group (train.py): 1 everywhere under standard;
        # under μP the hidden matrices get 1/m (TP5 Table 3, Adam column: lr/fan_in for hidden
        # weights, relative to the base width). AdamW's decoupled decay scales with it, as in `mup`.
        if self.parametrization == "standard":
            decay = [p for p in self.parameters() if p.dim() >= 2]
            no_decay = [p for p in self.parameters() if p.dim() < 2]
            return [{"params": decay, "weight_decay": weight_decay},
                    {"params": no_decay, "weight_decay": 0.0}]
        named = list(self.named_parameters())
        hidden = [p for n, p in named if n.endswith(HIDDEN)]
        other = [p for n, p in named if not n.endswith(HIDDEN) and p.dim() >= 2]
        no_decay = [p for n, p in named if p.dim() < 2]
        return [{"params": hidden, "weight_decay": weight_decay, "lr_scale": 1.0 / self.width_mult},
                {"params": other, "weight_decay": weight_decay, "lr_scale": 1.0},
                {"params": no_decay, "weight_decay": 0.0, "lr_scale": 1.0}]
