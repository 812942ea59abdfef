"""Parameter and FLOP counts: against sum(p.numel()) and against a count done by hand."""

import pytest
import torch
import torch.nn.functional as F

from scaling_suite.model import GPT, ModelShape, count_params, flops_per_token


@pytest.mark.parametrize("depth,aspect,head_dim,vocab,context", [(1, 32, 16, 256, 64), (3, 32, 16, 256, 128),
                                                                 (2, 48, 32, 1000, 32)])
def test_counts_match_the_module(depth, aspect, head_dim, vocab, context):
    shape = ModelShape.from_dial(depth, aspect, head_dim, vocab, context)
    model = GPT(shape)
    counts = model.count_params()
    assert counts["N_total"] == sum(p.numel() for p in model.parameters())
    emb = model.embed.weight.numel()
    head = model.head.weight.numel()
    assert counts["N_nonembed"] == counts["N_total"] - emb - head
    assert counts["N"] == counts["N_total"] - emb


def test_hand_count_depth2_width64():
    # depth 2, aspect 32 -> d_model 64, 4 heads of 16; SwiGLU hidden ceil(8*64/3/16)*16 = 176.
    shape = ModelShape.from_dial(2, 32, 16, 256, 64)
    assert (shape.d_model, shape.n_head, shape.d_mlp) == (64, 4, 176)
    per_layer = 4 * 64 * 64 + 3 * 64 * 176 + 2 * 64   # 16384 + 33792 + 128 = 50304
    assert per_layer == 50304
    nonembed = 2 * 50304 + 64                          # 100672
    assert count_params(shape) == {"N_nonembed": 100672, "N": 100672 + 16384, "N_total": 100672 + 32768}
    # Kaplan et al. 2020 Table 1: 6N + 6 * n_layer * n_ctx * d_model.
    assert flops_per_token(shape) == 6 * 117056 + 6 * 2 * 64 * 64


def test_forward_shapes_and_causality():
    torch.manual_seed(0)
    model = GPT(ModelShape.from_dial(2, 32, 16, 256, 16))
    x = torch.randint(0, 256, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, 256)
    x2 = x.clone()
    x2[:, 10:] = (x2[:, 10:] + 1) % 256      # changing the future must not change the past
    assert torch.allclose(model(x2)[:, :10], logits[:, :10], atol=1e-6)
    loss = model(x, x)
    assert abs(loss.item() - torch.log(torch.tensor(256.0)).item()) < 0.5  # near-uniform at init


def _digest(model):
    import hashlib

    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        h.update(k.encode())
        h.update(v.numpy().tobytes())
    return h.hexdigest()[:32]


@pytest.mark.parametrize("dial, digest, loss", [
    ((2, 16, 8, 256, 32), "9905ae33c7e882e78c38e98c77cefbef", 5.563812732696533),
    ((3, 32, 16, 256, 64), "7bf18dac01a6b44765ca9558f64d26e6", 5.571849346160889)])
def test_standard_parametrization_is_bitwise_unchanged(dial, digest, loss):
    # Losses recorded with model.py before μP and before q,k,v and gate,up were fused (commit 1746b48),
    # seed 0: the fused matrices draw the same numbers in the same order, so the loss is bitwise the
    # same. Digests (names and values) re-recorded after the fusion renamed the parameters.
    for kw in ({}, {"parametrization": "standard"}):
        torch.manual_seed(0)
        model = GPT(ModelShape.from_dial(*dial), **kw)
        assert _digest(model) == digest
        x = torch.randint(0, 256, (2, dial[4]), generator=torch.Generator().manual_seed(1))
        assert model(x, x).item() == loss
        groups = model.param_groups(0.1)
        assert len(groups) == 2 and all(g.get("lr_scale", 1.0) == 1.0 for g in groups)


def test_mup_scales_init_output_attention_and_lr_groups():
    """Yang et al. 2022 Table 3 (Adam), relative to a base width: hidden init std / sqrt(m), hidden
    lr / m, logits / m, attention 1/head_dim; embedding, head weights and gains as standard."""
    shape = ModelShape.from_dial(2, 32, 8, 256, 32)          # d_model 64
    torch.manual_seed(0)
    sp = GPT(shape)
    torch.manual_seed(0)
    mp = GPT(shape, "mup", base_width=16)                     # m = 4
    assert mp.width_mult == 4.0
    spn, mpn = dict(sp.named_parameters()), dict(mp.named_parameters())
    for name, p in mpn.items():
        factor = 0.5 if any(name.endswith(h) for h in ("q.weight", "k.weight", "v.weight", "o.weight",
                                                       "gate.weight", "up.weight", "down.weight")) else 1.0
        assert torch.equal(p, spn[name] * factor), name
    groups = mp.param_groups(0.1)
    hidden = next(g for g in groups if g["lr_scale"] != 1.0)
    assert hidden["lr_scale"] == 0.25 and len(hidden["params"]) == 2 * 4   # qkv, o, gate_up, down per layer
    ids = {id(p) for p in hidden["params"]}
    assert id(mp.head.weight) not in ids and id(mp.embed.weight) not in ids
    assert sum(len(g["params"]) for g in groups) == len(mpn)
    assert all(b.attn.scale == 1 / 8 for b in mp.blocks) and all(b.attn.scale is None for b in sp.blocks)
    # the output multiplier: mup logits = head(norm(x)) / m (same weights otherwise)
    mp2 = GPT(shape, "mup", base_width=16)
    mp2.load_state_dict(sp.state_dict())
    for b in mp2.blocks:
        b.attn.scale = None
    x = torch.randint(0, 256, (2, 16))
    assert torch.allclose(mp2(x), sp(x) / 4, atol=1e-6)
    with pytest.raises(ValueError):
        GPT(shape, "mup")                                     # no base width


def test_mup_lr_groups_reach_the_optimizer(monkeypatch, token_cache):
    """train() multiplies the scheduled lr by each group's lr_scale."""
    import torch.optim

    from scaling_suite.config import make_config
    from scaling_suite.schedule import lr_at
    from scaling_suite.train import train

    seen = []
    real = torch.optim.AdamW.step

    def spy(self, *a, **kw):
        seen.append([g["lr"] for g in self.param_groups])
        return real(self, *a, **kw)

    monkeypatch.setattr(torch.optim.AdamW, "step", spy)
    cfg = make_config(depth=2, aspect=16, head_dim=8, context=16, batch_tokens=256, eval_tokens=256, D=3 * 256,
                      parametrization="mup", mup_base_width=8, device="cpu", precision="fp32", eval_every=100)
    train(cfg, progress=False)
    d = cfg.derived()
    assert seen and all(lrs == pytest.approx([lr_at(i, cfg, d) / 4, lr_at(i, cfg, d), lr_at(i, cfg, d)])
                        for i, lrs in enumerate(seen))


@pytest.mark.parametrize("dial, attention_dtype", [((2, 16, 8, 256, 32), torch.float32),   # heads 8 wide
                                                   ((1, 64, 64, 256, 32), torch.bfloat16)])  # 64 wide
def test_cpu_bf16_autocast_attends_in_fp32_below_64_wide_heads(monkeypatch, dial, attention_dtype):
    """Under CPU bf16 autocast the projections and the head run in bf16; the attention core of heads
    under 64 wide runs in fp32 (model.Attention, device.py's precision rule). The loss stays within
    bf16 rounding of the fp32 loss."""
    seen, sdpa = [], F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, k, v, **kw: seen.append(q.dtype) or sdpa(q, k, v, **kw))
    torch.manual_seed(0)
    model = GPT(ModelShape.from_dial(*dial))
    x = torch.randint(0, 256, (4, dial[4]), generator=torch.Generator().manual_seed(1))
    fp32 = model(x, x).item()
    seen.clear()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, bf16 = model(x), model(x, x).item()
    assert logits.dtype == torch.bfloat16
    assert seen == [attention_dtype] * (2 * dial[0])
    assert bf16 == pytest.approx(fp32, rel=1e-2) and bf16 != fp32
