"""Tests for moe.py: dispatch against the per-token definition, routing, balancing, hash table, clamp,
checkpoint layout and the dense twin. Small shapes, CPU, fp32."""

import os
import sys

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelConfig  # noqa: E402
from moe import MoE, Expert, clamped_glu, expert_dispatch, hash_table, moe_reference  # noqa: E402


def make_cfg(**overrides):
    base = dict(dim=32, n_routed_experts=8, n_activated_experts=2, moe_inter_dim=16,
                n_shared_experts=1, n_hash_layers=1, vocab_size=64, route_scale=1.5, swiglu_limit=10.0)
    return ModelConfig.from_preset("nano", **{**base, **overrides})


def grouped_mm_on_cpu() -> bool:
    """torch._grouped_mm has a CPU fallback in recent torch (2.13 here); older ones may lack it."""
    try:
        a, b = torch.randn(4, 8), torch.randn(2, 8, 8)
        torch._grouped_mm(a, b, offs=torch.tensor([2, 4], dtype=torch.int32))
        return True
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


IMPLS = ["loop", pytest.param("grouped", marks=pytest.mark.skipif(
    not grouped_mm_on_cpu(), reason="torch._grouped_mm has no CPU path in this torch"))]


@pytest.mark.parametrize("impl", IMPLS)
def test_dispatch_matches_per_token_reference(impl):
    """Outputs and gradients (x, gate, all expert weights) of the dispatch equal the per-token sum,
    including an expert that receives no token (its bias pushes it out of every top-k)."""
    torch.manual_seed(0)
    moe = MoE(make_cfg(swiglu_limit=3.0), layer_id=1)       # a routed layer
    with torch.no_grad():                                   # O(1) activations, some beyond the clamp
        for w in (moe.w1, moe.w2, moe.w3):
            w.normal_(std=0.5)
    moe.gate.bias[5] = -100.0                               # expert 5 is never chosen
    x = torch.randn(20, 32, requires_grad=True)
    tok = torch.randint(0, 64, (20,))
    params = [x, moe.gate.weight, moe.w1, moe.w2, moe.w3]

    def run(fn):
        weights, indices, _ = moe.gate(x, tok)
        y = fn(x, weights, indices, moe.w1, moe.w2, moe.w3, moe.swiglu_limit)
        grads = torch.autograd.grad((y * torch.linspace(-1, 1, 32)).sum(), params)
        return y, grads, indices

    y_ref, g_ref, indices = run(moe_reference)
    y, g, _ = run(lambda *a: expert_dispatch(*a, impl=impl))
    assert (indices != 5).all() and torch.bincount(indices.flatten(), minlength=8)[5] == 0
    assert y_ref.abs().max() > 1.0                          # a real signal, not zeros
    torch.testing.assert_close(y, y_ref, rtol=1e-4, atol=1e-5)
    for name, a, b in zip(["x", "gate.weight", "w1", "w2", "w3"], g, g_ref):
        assert b.abs().max() > 0, name
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=name)
    assert g[3][5].abs().max() == 0                         # the empty expert gets no gradient


def test_fp8_dispatch_is_per_expert_fp8_and_close_to_the_reference():
    """--fp8's routed experts (the grouped FP8 GEMM; its PyTorch reference on the CPU): the output is
    exactly each expert's FP8 GEMM chain (1x128 activation and 128x128 weight blocks, as Fp8Linear
    computes it) summed with the routing weights, and outputs and gradients are within FP8 rounding of
    the per-token fp32 reference; the empty expert gets no gradient."""
    from kernels.fp8_gemm import act_quant_ref, fp8_gemm_ref, weight_quant_ref
    torch.manual_seed(0)
    moe = MoE(make_cfg(), layer_id=1)
    with torch.no_grad():
        for w in (moe.w1, moe.w2, moe.w3):
            w.normal_(std=0.2)
    moe.gate.bias[5] = -100.0
    x = torch.randn(150, 32, requires_grad=True)            # 300 pairs: several 128-row blocks
    tok = torch.randint(0, 64, (150,))
    params = [x, moe.w1, moe.w2, moe.w3]
    impl = "fp8" if torch.cuda.is_available() else "fp8-reference"

    def run(fn):
        weights, indices, _ = moe.gate(x, tok)
        y = fn(x, weights, indices, moe.w1, moe.w2, moe.w3, moe.swiglu_limit)
        return y, torch.autograd.grad((y * torch.linspace(-1, 1, 32)).sum(), params), weights, indices

    y_ref, g_ref, weights, indices = run(moe_reference)
    y, g, _, _ = run(lambda *a: expert_dispatch(*a, impl=impl))

    def fp8_linear(h, w):
        return fp8_gemm_ref(*act_quant_ref(h), *weight_quant_ref(w)).float()
    expected = torch.zeros(150, 32)
    with torch.no_grad():
        for e in indices.unique().tolist():
            t, j = (indices == e).nonzero(as_tuple=True)
            h = clamped_glu(fp8_linear(x[t], moe.w1[e]), fp8_linear(x[t], moe.w3[e]), moe.swiglu_limit)
            expected.index_add_(0, t, weights[t, j, None] * fp8_linear(h, moe.w2[e]))
    torch.testing.assert_close(y.detach(), expected, rtol=1e-5, atol=1e-5)

    def rel(a, b):
        return ((a - b).norm() / b.norm()).item()
    # measured: output 0.068, gradients 0.050-0.056 (e4m3 keeps 3 mantissa bits; a GEMM, the clamped
    # GLU of two of them, and another GEMM in a chain)
    assert rel(y, y_ref) < 0.1
    for name, a, b in zip(["x", "w1", "w2", "w3"], g, g_ref):
        assert rel(a, b) < 0.08, name
    assert g[2][5].abs().max() == 0


def test_moe_forward_shapes_and_shared_expert():
    """MoE(x) = routed dispatch + shared expert, [B, T, dim] in and out; bad shapes raise."""
    torch.manual_seed(1)
    moe = MoE(make_cfg(), layer_id=1).eval()
    x, tok = torch.randn(2, 5, 32), torch.randint(0, 64, (2, 5))
    y = moe(x, tok)
    flat = x.view(10, 32)
    weights, indices, _ = moe.gate(flat, tok.view(10))
    expect = moe_reference(flat, weights, indices, moe.w1, moe.w2, moe.w3, 10.0) + moe.shared_experts(flat)
    assert y.shape == (2, 5, 32)
    torch.testing.assert_close(y, expect.view(2, 5, 32), rtol=1e-5, atol=1e-6)
    assert moe.aux_loss is None and moe.load.sum() == 0     # eval: no balance loss, no counting
    with pytest.raises(ValueError, match="token_ids"):
        moe(x, tok[:, :4])


def test_bias_selects_but_never_weights():
    """A bias changes which experts are chosen, but the weights are always the chosen experts' own
    scores sqrt(softplus(x W^T)), normalised and times route_scale; the bias value never enters."""
    torch.manual_seed(2)
    moe = MoE(make_cfg(), layer_id=1)
    x, tok = torch.randn(64, 32), torch.randint(0, 64, (64,))
    scores = torch.sqrt(F.softplus(x @ moe.gate.weight.T))             # independent recomputation

    def check(bias):
        moe.gate.bias.copy_(bias)
        w, idx, _ = moe.gate(x, tok)
        s = scores.gather(1, idx)
        torch.testing.assert_close(w, s / s.sum(1, keepdim=True) * 1.5)
        assert torch.equal(idx, (scores + bias).topk(2, dim=1).indices)
        return idx

    idx0 = check(torch.zeros(8))
    idx1 = check(torch.tensor([0.0, 0, 0, 0, 0, 0, 0.5, 0.5]))
    assert (idx0 != idx1).any()                               # the bias moved the choice
    assert (idx1 >= 6).any(dim=1).float().mean() > (idx0 >= 6).any(dim=1).float().mean()


def test_bias_update_reduces_imbalance_on_skewed_router():
    """Every token prefers the low-numbered experts (a shared direction in x and graded gate rows);
    repeated bias updates bring the load's coefficient of variation down."""
    torch.manual_seed(3)
    moe = MoE(make_cfg(), layer_id=1).train()
    u = F.normalize(torch.randn(32), dim=0)
    with torch.no_grad():
        moe.gate.weight.copy_(0.05 * torch.randn(8, 32) + torch.linspace(1.0, -1.0, 8)[:, None] * u)
    x = torch.randn(4, 64, 32) + 2.0 * u                      # [B, T, dim]
    tok = torch.randint(0, 64, (4, 64))
    cvs = []
    for _ in range(120):
        with torch.no_grad():
            moe(x, tok)
        assert moe.load.sum() == 4 * 64 * 2                   # every (token, slot) counted once
        cvs.append(moe.load_stats()["cv"])
        moe.update_bias(gamma=0.01)
    assert moe.load.sum() == 0                                # counts reset by the update
    assert cvs[0] > 1.0                                       # the router really is skewed
    assert max(cvs[-10:]) < 0.3 * cvs[0]
    assert moe.gate.bias[0] < 0 < moe.gate.bias[-1]           # popular experts pushed down


def test_balance_loss_and_load_stats():
    """The V3 sequence-wise loss is alpha * sum_i f_i P_i per sequence (f = 1 and P = 1/E when
    balanced), has a gradient into the gate, and is zero in hash layers."""
    torch.manual_seed(4)
    moe = MoE(make_cfg(), layer_id=1).train()
    x, tok = torch.randn(3, 10, 32), torch.randint(0, 64, (3, 10))
    moe(x, tok)
    _, idx, s = moe.gate(x.view(30, 32), tok.view(30))
    f = torch.stack([torch.bincount(idx.view(3, 20)[b], minlength=8) for b in range(3)]) * 8 / 20
    p = (s / s.sum(1, keepdim=True)).view(3, 10, 8).mean(1)
    torch.testing.assert_close(moe.aux_loss, 1e-4 * (f * p).sum(1).mean())
    assert torch.autograd.grad(moe.aux_loss, moe.gate.weight)[0].abs().max() > 0
    stats = moe.load_stats()
    load = torch.bincount(idx.flatten(), minlength=8).float()
    assert stats["tokens"] == 60
    assert stats["max_over_mean"] == pytest.approx((load.max() / load.mean()).item())
    assert stats["cv"] == pytest.approx((load.std(unbiased=False) / load.mean()).item())
    hashed = MoE(make_cfg(), layer_id=0).train()
    hashed(x, tok)
    assert hashed.aux_loss.item() == 0 and hashed.load.sum() == 60


def test_hash_table_deterministic_balanced_distinct():
    """Same seed, same table; other seed, other table; every expert within 1 of the same number of
    entries; no expert twice in a row. Also with k == E and k not dividing E."""
    for vocab, n_exp, k in [(1000, 8, 2), (257, 6, 4), (50, 3, 3), (129, 16, 6)]:
        t = hash_table(vocab, n_exp, k, seed=7)
        assert t.shape == (vocab, k) and t.dtype == torch.long
        assert torch.equal(t, hash_table(vocab, n_exp, k, seed=7))
        assert not torch.equal(t, hash_table(vocab, n_exp, k, seed=8))
        counts = torch.bincount(t.flatten(), minlength=n_exp)
        assert counts.max() - counts.min() <= 1
        assert all(len(set(row)) == k for row in t.tolist())
    with pytest.raises(ValueError, match="k"):
        hash_table(10, 4, 5, seed=0)


def test_hash_layer_routes_by_token_id_only():
    """In a hash layer the experts depend only on the token id (the table), not on x; layers built
    from the same config get the same table; the layer has no bias, and the MTP override works."""
    torch.manual_seed(5)
    cfg = make_cfg(n_layers=4, compress_ratios=(0, 4, 16, 4), n_hash_layers=2)
    a, b = MoE(cfg, layer_id=1), MoE(cfg, layer_id=1)
    assert a.gate.hash and not hasattr(a.gate, "bias") and "gate.tid2eid" in a.state_dict()
    assert torch.equal(a.gate.tid2eid, b.gate.tid2eid)
    assert not torch.equal(a.gate.tid2eid, MoE(cfg, layer_id=0).gate.tid2eid)
    assert not MoE(cfg, layer_id=2).gate.hash and not MoE(cfg, layer_id=0, hash_routing=False).gate.hash
    tok = torch.randint(0, 64, (16,))
    _, idx1, _ = a.gate(torch.randn(16, 32), tok)
    _, idx2, _ = a.gate(torch.randn(16, 32), tok)
    assert torch.equal(idx1, idx2) and torch.equal(idx1, a.gate.tid2eid[tok])


def test_clamp_acts():
    """Pre-activations beyond swiglu_limit are clamped: gate branch from above, linear branch both ways."""
    L = 1.0
    e = Expert(2, 2, swiglu_limit=L)
    with torch.no_grad():
        e.w1.weight.copy_(torch.tensor([[3.0, 0.0], [0.0, -3.0]]))   # gate: [3x0, -3x1]
        e.w3.weight.copy_(torch.tensor([[0.0, 4.0], [-4.0, 0.0]]))   # up:   [4x1, -4x0]
        e.w2.weight.copy_(torch.eye(2))
    x = torch.tensor([[1.0, 1.0]])                                      # gate [3, -3], up [4, -4]
    expect = torch.stack([F.silu(torch.tensor(1.0)) * 1.0, F.silu(torch.tensor(-3.0)) * -1.0])
    torch.testing.assert_close(e(x), expect[None])
    unclamped = F.silu(torch.tensor([3.0, -3.0])) * torch.tensor([4.0, -4.0])
    assert (e(x) - unclamped).abs().min() > 0.1
    small = torch.tensor([[0.1, -0.2]])                                 # inside the limit: plain SwiGLU
    torch.testing.assert_close(e(small), (F.silu(small @ e.w1.weight.T) * (small @ e.w3.weight.T)))


def test_export_import_round_trip():
    """Stacked experts -> official per-expert names -> stacked, exactly; bad input names the key."""
    torch.manual_seed(6)
    cfg = make_cfg()
    src, dst = MoE(cfg, layer_id=1), MoE(cfg, layer_id=1)
    sd = src.export_experts()
    assert len(sd) == 3 * 8 and sd["experts.3.w2.weight"].shape == (32, 16)
    assert torch.equal(sd["experts.3.w1.weight"], src.w1[3])
    dst.import_experts({**sd, "gate.weight": torch.zeros(1)})          # non-expert keys ignored
    for name in ("w1", "w2", "w3"):
        assert torch.equal(getattr(dst, name), getattr(src, name))
    assert {k for k in src.state_dict() if not k.startswith("w")} >= {
        "gate.weight", "gate.bias", "shared_experts.w1.weight", "shared_experts.w2.weight",
        "shared_experts.w3.weight"}
    with pytest.raises(ValueError, match=r"experts\.7\.w3\.weight"):
        dst.import_experts({k: v for k, v in sd.items() if k != "experts.7.w3.weight"})
    with pytest.raises(ValueError, match=r"experts\.2\.w1\.weight has shape \(16, 31\)"):
        dst.import_experts({**sd, "experts.2.w1.weight": torch.zeros(16, 31)})
    with pytest.raises(ValueError, match=r"experts\.8\.w1\.weight"):
        dst.import_experts({**sd, "experts.8.w1.weight": torch.zeros(16, 32)})


def test_dense_twin_matches_active_parameters():
    """The dense twin's parameters equal the MoE's active path: k routed experts + the shared one."""
    for preset in ("nano", "small", "flash"):
        cfg = ModelConfig.from_preset(preset)
        with torch.device("meta"):
            moe = MoE(cfg, layer_id=cfg.n_layers - 1)
            dense = Expert(cfg.dim, cfg.dense_inter_dim, cfg.swiglu_limit)
        per_expert = moe.w1[0].numel() + moe.w2[0].numel() + moe.w3[0].numel()
        shared = sum(p.numel() for p in moe.shared_experts.parameters())
        active = cfg.n_activated_experts * per_expert + shared
        assert sum(p.numel() for p in dense.parameters()) == active


def test_init_scales():
    """Gate, w1, w3 at init_std; w2 (and the shared expert's w2) at init_std / sqrt(2 n_layers)."""
    torch.manual_seed(7)
    cfg = make_cfg(dim=64, moe_inter_dim=64, init_std=0.02)
    moe = MoE(cfg, layer_id=1)
    out = 0.02 / (2 * cfg.n_layers) ** 0.5
    for t, std in [(moe.w1, 0.02), (moe.w3, 0.02), (moe.gate.weight, 0.02), (moe.w2, out),
                   (moe.shared_experts.w2.weight, out)]:
        assert t.std().item() == pytest.approx(std, rel=0.1)
    assert moe.gate.bias.dtype == torch.float32 and not any(
        t is moe.gate.bias for t in moe.parameters())          # a buffer, never seen by an optimizer
