"""Tests for mhc.py: Sinkhorn, the pre / post / res mixing, the head collapse, the initialisation and the
composite-gain diagnostic, each against a per-token loop or a property that could fail.

The functions read only hc_mult, dim, hc_sinkhorn_iters, hc_eps and norm_eps from the config, so a
small namespace stands in for ModelConfig and these tests do not depend on the rest of the model.
"""

import math
from types import SimpleNamespace

import pytest
import torch

from mhc import (RES_MIX_INIT, composite_gain, expand_streams, hc_head, hc_head_init, hc_init, hc_post,
                 hc_pre, sinkhorn)


def make_cfg(n=4, dim=16, iters=20, eps=1e-6):
    return SimpleNamespace(hc_mult=n, dim=dim, hc_sinkhorn_iters=iters, hc_eps=eps, norm_eps=1e-6)


def rms_norm(v):
    return v * torch.rsqrt(v.square().mean(-1, keepdim=True) + 1e-6)


def random_params(cfg, rows, n_scale, gen):
    """Parameters well away from the initialisation, so every term of the formulas matters."""
    fn = torch.randn(rows, cfg.hc_mult * cfg.dim, generator=gen) * 3 / math.sqrt(cfg.hc_mult * cfg.dim)
    scale = torch.rand(n_scale, generator=gen) + 0.5
    base = torch.randn(rows, generator=gen)
    return fn, scale, base


# ------------------------------------------------------------------------------------------------
# A per-token reference in plain Python floats: loops over tokens, streams and entries.
# ------------------------------------------------------------------------------------------------

def ref_sinkhorn(logits, iters, eps):
    n = len(logits)
    m = []
    for row in logits:
        top = max(row)
        e = [math.exp(v - top) for v in row]
        m.append([v / sum(e) + eps for v in e])

    def columns():
        for j in range(n):
            s = sum(m[i][j] for i in range(n)) + eps
            for i in range(n):
                m[i][j] /= s

    def rows():
        for i in range(n):
            s = sum(m[i]) + eps
            m[i] = [v / s for v in m[i]]

    columns()
    for _ in range(iters - 1):
        rows()
        columns()
    return m


def ref_mix(streams, fn, norm_eps):
    flat = [v for stream in streams for v in stream]
    inv_rms = 1.0 / math.sqrt(sum(v * v for v in flat) / len(flat) + norm_eps)
    return [sum(w * v for w, v in zip(row, flat)) * inv_rms for row in fn]


def sigmoid(v):
    return 1.0 / (1.0 + math.exp(-v))


def ref_pre(x, fn, scale, base, cfg):
    n, d = cfg.hc_mult, cfg.dim
    B, T = x.shape[:2]
    u, post, res = torch.zeros(B, T, d), torch.zeros(B, T, n), torch.zeros(B, T, n, n)
    fn, scale, base = fn.tolist(), scale.tolist(), base.tolist()
    for b in range(B):
        for t in range(T):
            streams = x[b, t].tolist()
            mix = ref_mix(streams, fn, cfg.norm_eps)
            pre = [sigmoid(scale[0] * mix[i] + base[i]) + cfg.hc_eps for i in range(n)]
            for j in range(n):
                post[b, t, j] = 2 * sigmoid(scale[1] * mix[n + j] + base[n + j])
            logits = [[scale[2] * mix[2 * n + i * n + j] + base[2 * n + i * n + j] for j in range(n)]
                      for i in range(n)]
            res[b, t] = torch.tensor(ref_sinkhorn(logits, cfg.hc_sinkhorn_iters, cfg.hc_eps))
            for k in range(d):
                u[b, t, k] = sum(pre[i] * streams[i][k] for i in range(n))
    return u, post, res


def ref_post(y, x, post, res):
    B, T, n, d = x.shape
    out = torch.zeros(B, T, n, d)
    for b in range(B):
        for t in range(T):
            for j in range(n):
                for k in range(d):
                    carried = sum(float(res[b, t, i, j]) * float(x[b, t, i, k]) for i in range(n))
                    out[b, t, j, k] = float(post[b, t, j]) * float(y[b, t, k]) + carried
    return out


def ref_head(x, fn, scale, base, cfg):
    B, T, n, d = x.shape
    h = torch.zeros(B, T, d)
    for b in range(B):
        for t in range(T):
            streams = x[b, t].tolist()
            mix = ref_mix(streams, fn.tolist(), cfg.norm_eps)
            w = [sigmoid(float(scale[0]) * mix[i] + float(base[i])) + cfg.hc_eps for i in range(n)]
            for k in range(d):
                h[b, t, k] = sum(w[i] * streams[i][k] for i in range(n))
    return h


# ------------------------------------------------------------------------------------------------
# A toy stack: blocks of two linear sublayers, in mHC form and as the plain residual twin.
# ------------------------------------------------------------------------------------------------

def make_stack(cfg, n_sublayers, seed):
    torch.manual_seed(seed)
    hcs = [hc_init(cfg) for _ in range(n_sublayers)]
    sublayers = [torch.nn.Linear(cfg.dim, cfg.dim, bias=False) for _ in range(n_sublayers)]
    for lin in sublayers:  # output about as large as its input, so post's errors are not hidden
        torch.nn.init.normal_(lin.weight, std=1 / math.sqrt(cfg.dim))
    return hcs, sublayers, hc_head_init(cfg)


def run_mhc(x, hcs, sublayers, head, cfg, record=None):
    for (fn, base, scale), sublayer in zip(hcs, sublayers):
        u, post, res = hc_pre(x, fn, scale, base, cfg)
        x = hc_post(sublayer(rms_norm(u)), x, post, res)
        if record is not None:
            record.append(res.detach())
    fn, base, scale = head
    return hc_head(x, fn, scale, base, cfg), x


def run_plain(h, sublayers):
    for sublayer in sublayers:
        h = h + sublayer(rms_norm(h))
    return h


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


# ------------------------------------------------------------------------------------------------
# Sinkhorn
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [2, 4, 6])
def test_sinkhorn_doubly_stochastic_for_ordinary_inputs(n):
    logits = torch.randn(512, n, n, generator=torch.Generator().manual_seed(n))
    m = sinkhorn(logits, 20, 1e-6)
    assert m.dtype == torch.float32 and (m >= 0).all()
    assert (m.sum(-2) - 1).abs().max() < 1e-5      # columns: normalised last
    assert (m.sum(-1) - 1).abs().max() < 1e-2      # rows: approximately


def test_sinkhorn_rows_converge_with_more_rounds_for_peaked_inputs():
    logits = 3 * torch.randn(512, 4, 4, generator=torch.Generator().manual_seed(1))
    row_err = [float((sinkhorn(logits, iters, 1e-6).sum(-1) - 1).abs().max()) for iters in (5, 20, 100)]
    assert row_err[0] > row_err[1] > row_err[2]
    assert row_err[2] < 2e-2


def test_sinkhorn_finite_and_non_negative_for_extreme_inputs():
    gen = torch.Generator().manual_seed(2)
    row_scales = 10.0 ** torch.randint(-4, 5, (64, 4, 1), generator=gen)
    mixed_scales = torch.randn(64, 4, 4, generator=gen) * row_scales
    cases = [1e4 * torch.randn(64, 4, 4, generator=gen),               # logits of 1e4
             mixed_scales,                                              # rows from 1e-4 to 1e4
             torch.full((2, 4, 4), 1e4), torch.full((2, 4, 4), -1e4),   # constant huge logits
             torch.tensor([[1e4, 0, 0, 0]] * 4).unsqueeze(0),          # every row peaked on one column
             (100 * torch.randn(8, 4, 4, generator=gen)).bfloat16()]   # bf16 input
    for logits in cases:
        m = sinkhorn(logits, 20, 1e-6)
        assert m.dtype == torch.float32
        assert torch.isfinite(m).all() and (m >= 0).all() and (m <= 1).all()
        assert (m.sum(-2) <= 1 + 1e-5).all()


def test_sinkhorn_leaves_the_initial_res_unchanged():
    n = 4
    target = (1 - RES_MIX_INIT) * torch.eye(n) + RES_MIX_INIT / n
    fn, base, scale = hc_init(make_cfg(n=n))
    res0 = sinkhorn(base.detach()[2 * n:].view(n, n), 20, 1e-6)
    assert torch.allclose(res0, target, atol=1e-5)


# ------------------------------------------------------------------------------------------------
# pre / post / res, the head, against the per-token loop
# ------------------------------------------------------------------------------------------------

def test_against_per_token_reference():
    cfg = make_cfg(n=4, dim=8)
    n, gen = cfg.hc_mult, torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, n, cfg.dim, generator=gen) * torch.rand(2, 3, n, 1, generator=gen) * 3
    y = torch.randn(2, 3, cfg.dim, generator=gen)
    fn, scale, base = random_params(cfg, (2 + n) * n, 3, gen)
    u, post, res = hc_pre(x, fn, scale, base, cfg)
    u_ref, post_ref, res_ref = ref_pre(x, fn, scale, base, cfg)
    assert torch.allclose(u, u_ref, atol=1e-5, rtol=1e-5)
    assert torch.allclose(post, post_ref, atol=1e-6)
    assert torch.allclose(res, res_ref, atol=1e-6)
    assert torch.allclose(hc_post(y, x, post, res), ref_post(y, x, post, res), atol=1e-5, rtol=1e-5)
    head_fn, head_scale, head_base = random_params(cfg, n, 1, gen)
    assert torch.allclose(hc_head(x, head_fn, head_scale, head_base, cfg),
                          ref_head(x, head_fn, head_scale, head_base, cfg), atol=1e-5, rtol=1e-5)


def test_res_is_applied_transposed():
    # one token, res moves all of stream 0 into stream 1 (res[0, 1] = 1): X'_1 = X_0
    x = torch.randn(1, 1, 2, 3)
    res = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).view(1, 1, 2, 2)
    out = hc_post(torch.zeros(1, 1, 3), x, torch.zeros(1, 1, 2), res)
    assert torch.equal(out[0, 0, 1], x[0, 0, 0]) and torch.equal(out[0, 0, 0], torch.zeros(3))


def test_pre_post_ranges_for_large_and_badly_scaled_inputs():
    cfg = make_cfg(n=4, dim=16)
    n, eps, gen = cfg.hc_mult, cfg.hc_eps, torch.Generator().manual_seed(4)
    magnitudes = 10.0 ** torch.randint(-4, 5, (4, 8, n), generator=gen).float()        # 1e-4 .. 1e4
    general = torch.randn(4, 8, n, cfg.dim, generator=gen) * magnitudes.unsqueeze(-1)
    # pre is folded into u; with stream i nonzero only in coordinate i, u[..., i] = pre_i * c_i
    c = magnitudes * torch.randn(4, 8, n, generator=gen).sign()
    one_hot = torch.diag_embed(c, dim1=-2, dim2=-1)                                      # [4, 8, n, n]
    one_hot = torch.cat([one_hot, torch.zeros(4, 8, n, cfg.dim - n)], dim=-1)            # [4, 8, n, d]
    for factor in (1.0, 1e3):  # ordinary, then saturating every sigmoid
        fn, scale, base = random_params(cfg, (2 + n) * n, 3, gen)
        scale, base = factor * scale, factor * base
        for x in (general, one_hot):
            u, post, res = hc_pre(x, fn, scale, base, cfg)
            assert all(torch.isfinite(t).all() for t in (u, post, res))
            assert (post >= 0).all() and (post <= 2).all()
            assert (res >= 0).all() and (res.sum(-2) <= 1 + 1e-5).all()
        pre = u[..., :n] / c
        assert (pre >= eps * (1 - 1e-4)).all() and (pre <= (1 + eps) * (1 + 1e-6)).all()
        if factor == 1.0:
            assert (pre > 1.01 * eps).all()
        else:
            assert pre.min() < 2 * eps and pre.max() > 1 - 1e-3   # the extremes are reached


def test_all_fp32_under_bf16_autocast():
    cfg = make_cfg(n=4, dim=32)
    n, gen = cfg.hc_mult, torch.Generator().manual_seed(5)
    x = torch.randn(2, 8, n, cfg.dim, generator=gen)
    y = torch.randn(2, 8, cfg.dim, generator=gen)
    fn, scale, base = random_params(cfg, (2 + n) * n, 3, gen)
    head = random_params(cfg, n, 1, gen)
    u, post, res = hc_pre(x, fn, scale, base, cfg)
    out, h = hc_post(y, x, post, res), hc_head(x, *head, cfg)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        u_a, post_a, res_a = hc_pre(x, fn, scale, base, cfg)
        out_a, h_a = hc_post(y, x, post_a, res_a), hc_head(x, *head, cfg)
        u_b, post_b, res_b = hc_pre(x.bfloat16(), fn, scale, base, cfg)
    # bf16 matmuls would be off by about 1e-2 here
    for got, want in ((u_a, u), (post_a, post), (res_a, res), (out_a, out), (h_a, h)):
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=1e-6, rtol=1e-6)
    assert u_b.dtype == torch.bfloat16 and post_b.dtype == res_b.dtype == torch.float32
    assert torch.allclose(u_b.float(), u, atol=5e-2, rtol=2e-2)


# ------------------------------------------------------------------------------------------------
# Initialisation, gradients, the plain-residual equivalence and the composite gain
# ------------------------------------------------------------------------------------------------

def test_init_shapes_values_and_meta_device():
    cfg = make_cfg(n=4, dim=16)
    n, nd = cfg.hc_mult, cfg.hc_mult * cfg.dim
    torch.manual_seed(0)
    fn, base, scale = hc_init(cfg)
    assert fn.shape == ((2 + n) * n, nd) and base.shape == ((2 + n) * n,) and scale.shape == (3,)
    assert all(isinstance(p, torch.nn.Parameter) and p.dtype == torch.float32 for p in (fn, base, scale))
    assert torch.allclose(torch.sigmoid(base[:n]) + cfg.hc_eps, torch.full((n,), 1 / n))
    assert torch.allclose(2 * torch.sigmoid(base[n:2 * n]), torch.ones(n))
    assert torch.equal(scale, torch.full((3,), 0.01))
    assert abs(float(fn.detach().std()) * math.sqrt(nd) - 1) < 0.1
    head_fn, head_base, head_scale = hc_head_init(cfg)
    assert head_fn.shape == (n, nd) and head_base.shape == (n,) and head_scale.shape == (1,)
    with torch.device("meta"):
        assert all(p.is_meta for p in hc_init(cfg) + hc_head_init(cfg))


def test_gradients_finite_and_reaching_every_parameter():
    cfg = make_cfg(n=4, dim=16)
    hcs, sublayers, head = make_stack(cfg, 2, seed=6)
    x = torch.randn(2, 5, cfg.hc_mult, cfg.dim, requires_grad=True)  # streams that differ
    h, _ = run_mhc(x, hcs, sublayers, head, cfg)
    (h * torch.randn_like(h)).sum().backward()
    params = [p for hc in hcs for p in hc] + list(head) + [x] + [lin.weight for lin in sublayers]
    for p in params:
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


def test_res_gets_no_gradient_while_the_streams_are_copies():
    cfg = make_cfg(n=4, dim=16)
    n = cfg.hc_mult
    hcs, sublayers, head = make_stack(cfg, 1, seed=7)
    x = expand_streams(torch.randn(2, 5, cfg.dim), n)
    h, _ = run_mhc(x, hcs, sublayers, head, cfg)
    (h * torch.randn_like(h)).sum().backward()
    base_grad, scale_grad = hcs[0][1].grad, hcs[0][2].grad
    assert base_grad[2 * n:].abs().max() < 1e-6 * base_grad[:2 * n].abs().max()
    assert scale_grad[2].abs() < 1e-6 * scale_grad[:2].abs().max()


def test_fresh_block_is_a_plain_residual_block():
    # Promise: with the fresh scale of 0.01 a block stays within 2% (relative, Frobenius) of the plain
    # block; with the dynamic term switched off (scale = 0) it IS the plain block (fp32 rounding).
    cfg = make_cfg(n=4, dim=64)
    hcs, sublayers, head = make_stack(cfg, 2, seed=8)
    h0 = torch.randn(4, 16, cfg.dim)
    with torch.no_grad():
        plain = run_plain(h0, sublayers)
        fresh, streams = run_mhc(expand_streams(h0, cfg.hc_mult), hcs, sublayers, head, cfg)
        for _, _, scale in hcs + [head]:
            scale.zero_()
        static, static_streams = run_mhc(expand_streams(h0, cfg.hc_mult), hcs, sublayers, head, cfg)
    assert rel_err(static, plain) < 1e-5
    assert rel_err(static_streams, plain.unsqueeze(-2).expand_as(static_streams)) < 1e-5
    assert 0 < rel_err(fresh, plain) < 2e-2
    assert (streams - streams.mean(-2, keepdim=True)).abs().max() > 0   # the streams have drifted apart


def test_composite_gain_of_a_deep_fresh_stack_stays_bounded():
    cfg = make_cfg(n=4, dim=32)
    n_sublayers = 128                                   # 64 layers of attention + FFN
    hcs, sublayers, head = make_stack(cfg, n_sublayers, seed=9)
    for lin in sublayers:                               # a gentle sublayer so 128 of them stay O(1)
        lin.weight.data.mul_(0.1)
    h0 = torch.randn(2, 8, cfg.dim)
    record = []
    with torch.no_grad():
        h, _ = run_mhc(expand_streams(h0, cfg.hc_mult), hcs, sublayers, head, cfg, record)
        plain = run_plain(h0, sublayers)
    assert len(record) == n_sublayers
    assert 0.99 < composite_gain(record) < 1.001
    assert rel_err(h, plain) < 5e-2
    # Instructive contrast: Sinkhorn keeps even strongly mixing random maps near 1, while unconstrained
    # hyper-connection maps (identity plus a small drift) compound across the same depth.
    gen = torch.Generator().manual_seed(10)
    projected = [sinkhorn(10 * torch.randn(2, 8, 4, 4, generator=gen), 20, 1e-6) for _ in range(n_sublayers)]
    unconstrained = [torch.eye(4) + 0.1 * torch.randn(2, 8, 4, 4, generator=gen) for _ in range(n_sublayers)]
    assert composite_gain(projected) < 1.2
    assert composite_gain(unconstrained) > 10


def test_composite_gain_on_known_matrices():
    eye = torch.eye(3).expand(5, 3, 3)
    assert composite_gain([eye] * 4) == pytest.approx(1.0)
    perm = torch.eye(3)[[2, 0, 1]].expand(5, 3, 3)
    assert composite_gain([perm] * 7) == pytest.approx(1.0)
    one_token_grows = eye.clone()
    one_token_grows[3] = torch.diag(torch.tensor([2.0, 1.0, 1.0]))
    assert composite_gain([one_token_grows] * 3) == pytest.approx(8.0)    # the worst token, not the mean
    column_heavy = torch.tensor([[1.0, 0, 0], [1.0, 0, 0], [1.0, 0, 0]]).expand(5, 3, 3)
    # res^T has row sums 3, 0, 0 and column sums 1, 1, 1: the forward gain is 3
    assert composite_gain([column_heavy]) == pytest.approx(3.0)
    assert composite_gain([column_heavy.transpose(-1, -2)]) == pytest.approx(3.0)  # the backward gain


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------

def test_bad_inputs_raise_clear_errors():
    cfg = make_cfg(n=4, dim=16)
    fn, base, scale = hc_init(cfg)
    x = torch.randn(2, 3, 4, 16)
    with pytest.raises(ValueError, match="hc_mult=4"):
        hc_pre(torch.randn(2, 3, 3, 16), fn, scale, base, cfg)
    with pytest.raises(ValueError, match="fn must have shape"):
        hc_pre(x, fn[:, :-1], scale, base, cfg)
    with pytest.raises(ValueError, match="scale must have shape"):
        hc_pre(x, fn, scale[:1], base, cfg)
    with pytest.raises(ValueError, match="base must have shape"):
        hc_head(x, *hc_head_init(cfg)[:1], scale[:1], base, cfg)
    with pytest.raises(ValueError, match="res"):
        hc_post(torch.randn(2, 3, 16), x, torch.rand(2, 3, 4), torch.rand(2, 3, 4, 3))
    with pytest.raises(ValueError, match="h must be"):
        expand_streams(torch.randn(3, 16), 4)
    with pytest.raises(ValueError, match="logits must be"):
        sinkhorn(torch.randn(2, 3, 4), 20, 1e-6)
    with pytest.raises(ValueError, match="iters"):
        sinkhorn(torch.randn(2, 4, 4), 0, 1e-6)
    with pytest.raises(ValueError, match="empty"):
        composite_gain([])
    with pytest.raises(ValueError, match="one shape"):
        composite_gain([torch.rand(2, 4, 4), torch.rand(3, 4, 4)])


# ------------------------------------------------------------------------------------------------
# The fused Sinkhorn kernel (kernels/sinkhorn.py; Triton's interpreter on the CPU)
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("n, iters, spread", [(4, 20, 1.0), (4, 20, 6.0), (3, 5, 2.0), (4, 1, 1.0)])
def test_sinkhorn_kernel_matches_the_loop_forward_and_backward(n, iters, spread):
    """Outputs and gradients against the loop in fp64, on tokens that do not fill the last program
    (and n = 3, padded to 4 inside the kernel); peaked logits (spread 6) included."""
    from kernels.sinkhorn import sinkhorn as fused
    device = "cuda" if torch.cuda.is_available() else "cpu"
    g = torch.Generator().manual_seed(n * 100 + iters)
    x = (torch.randn(2, 37, n, n, generator=g) * spread).to(device).requires_grad_()
    grad = torch.randn(2, 37, n, n, generator=g).to(device)
    y = fused(x, iters, 1e-6)
    (dx,) = torch.autograd.grad(y, x, grad)
    x64 = x.detach().double().requires_grad_()
    y64 = sinkhorn(x64, iters, 1e-6)
    (dx64,) = torch.autograd.grad(y64, x64, grad.double())
    assert dx64.abs().max() > 0.1                        # a real gradient to compare
    torch.testing.assert_close(y.double(), y64, rtol=0, atol=2e-6)
    torch.testing.assert_close(dx.double(), dx64, rtol=0, atol=5e-6)


def test_sinkhorn_kernel_is_chosen_on_cuda_only_and_refuses_bad_input():
    from kernels.sinkhorn import sinkhorn as fused
    from mhc import sinkhorn_for
    cfg, reference = make_cfg(), SimpleNamespace(**vars(make_cfg()), kernels="reference")
    assert sinkhorn_for(torch.zeros(1), cfg) is sinkhorn                  # CPU: the loop
    if torch.cuda.is_available():
        assert sinkhorn_for(torch.zeros(1, device="cuda"), cfg) is fused
        assert sinkhorn_for(torch.zeros(1, device="cuda"), reference) is sinkhorn
    with pytest.raises(ValueError, match="fp32"):
        fused(torch.zeros(2, 4, 4, dtype=torch.float64), 3, 1e-6)
    with pytest.raises(ValueError, match="n, n"):
        fused(torch.zeros(2, 4, 3), 3, 1e-6)
