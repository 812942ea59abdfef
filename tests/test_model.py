"""Parameter and FLOP counts: against sum(p.numel()) and against a count done by hand."""

import pytest
import torch

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
