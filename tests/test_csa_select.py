"""kernels/csa_select.py: the Triton kernels against their PyTorch references, on fresh random inputs.

On a CPU the kernels run under TRITON_INTERPRET=1 (tests/conftest.py), with small shapes and fp32."""

import os

import pytest
import torch

from kernels import csa_select, sparse_attention_hopper
from kernels.csa_select import (csa_topk, csa_topk_reference, indexer_scores, indexer_scores_reference,
                                quantize_rows, sparse_attention, sparse_attention_reference, visible_counts)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def indexer_inputs(B, T, H, D, S, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, H, D, generator=g)
    w = torch.randn(B, T, H, generator=g) * (D ** -0.5 * H ** -0.5)
    k = torch.randn(B, S, D, generator=g)
    return q.to(DEVICE), w.to(DEVICE), k.to(DEVICE)


@pytest.mark.parametrize("t0", [0, 45])
def test_scores_equal_reference(t0):
    q, w, k = indexer_inputs(B=2, T=5, H=4, D=16, S=40, seed=t0)
    got = indexer_scores(q, w, k, m=4, t0=t0, use_kernel=True)
    want = indexer_scores_reference(q, w, k, m=4, t0=t0)
    assert torch.equal(got == float("-inf"), want == float("-inf"))              # same visibility
    assert (want > float("-inf")).any() and (want == float("-inf")).any()
    finite = want > float("-inf")
    torch.testing.assert_close(got[finite], want[finite], rtol=1e-5, atol=1e-5)


def check_selection(q, w, k, m, t0, topk, idx, val):
    """The kernel's choice against the reference: same selected scores, nothing invisible, -1 padding."""
    want_idx, want_val = csa_topk_reference(q, w, k, m, t0, topk)
    scores = indexer_scores_reference(q, w, k, m, t0)                            # [B, T, S]
    n_vis = visible_counts(q.shape[1], t0, m, k.shape[1], q.device)              # [T]
    n_sel = n_vis.clamp(max=topk)
    slot = torch.arange(topk, device=q.device)
    chosen = slot[None, None, :] < n_sel[None, :, None]                          # [1, T, topk]
    assert idx.dtype == torch.int32 and idx.shape == want_idx.shape
    assert torch.equal(idx == -1, ~chosen.expand_as(idx))                        # -1 exactly past n_sel
    assert torch.equal(want_idx == -1, idx == -1)
    assert (idx < n_vis[None, :, None]).all()                                    # nothing invisible
    for row in idx.reshape(-1, topk):                                            # no entry twice
        picked = row[row >= 0]
        assert picked.unique().numel() == picked.numel()
    # the selected scores equal the reference's (sorted by value, so ties do not matter) ...
    torch.testing.assert_close(val.sort(-1, descending=True).values, want_val.sort(-1, descending=True).values,
                               rtol=1e-5, atol=1e-5)
    # ... and are the scores of the returned indices, which come in index order
    own = scores.gather(-1, idx.clamp(min=0).long()).masked_fill(idx < 0, float("-inf"))
    torch.testing.assert_close(val, own, rtol=1e-5, atol=1e-5)
    picked = idx.masked_fill(idx < 0, 1 << 30)
    assert ((picked[..., :-1] < picked[..., 1:]) | (picked[..., 1:] == 1 << 30)).all()


@pytest.mark.parametrize("B,T,S,t0,topk", [
    (2, 24, 80, 0, 8),        # prefill from the start: early rows see fewer than topk entries
    (1, 6, 300, 1000, 16),    # every row sees all 300 entries, several tiles each
    (1, 5, 10, 30, 16),       # topk > S: padding everywhere
])
def test_topk_selects_reference_set(B, T, S, t0, topk):
    q, w, k = indexer_inputs(B, T, H=4, D=16, S=S, seed=S + t0)
    idx, val = csa_topk(q, w, k, m=4, t0=t0, topk=topk, use_kernel=True)
    check_selection(q, w, k, 4, t0, topk, idx, val)


def test_topk_ties_go_to_the_earlier_entry():
    """relu makes exact ties (score 0) common: the kernel breaks them as the stable sort does (the 12 zeros
    taken are entries 0..11, first in index order)."""
    q, w, k = indexer_inputs(B=1, T=3, H=4, D=16, S=60, seed=7)
    q, w, k = q.abs(), w.abs(), k.abs()
    k[:, :40] = -k[:, :40]                                       # entries 0..39 score exactly 0, the rest > 0
    idx, val = csa_topk(q, w, k, m=1, t0=100, topk=32, use_kernel=True)
    want_idx, want_val = csa_topk_reference(q, w, k, 1, 100, 32)
    assert (want_val == 0).sum() == 3 * 12 and torch.equal(want_idx[..., :12],
                                                       torch.arange(12, dtype=torch.int32, device=k.device).expand(1, 3, 12))
    assert torch.equal(idx, want_idx)


def test_decode_splits_rows_and_agrees_with_prefill():
    """One query per sequence over many entries (the row is cut into segments, then merged) gives the
    prefill's row for that position."""
    B, T, S, m, topk = 2, 1, 700, 2, 16
    q, w, k = indexer_inputs(B, 4, H=4, D=16, S=S, seed=3)
    t0 = 1396                                                                    # the last row sees all 700
    idx, val = csa_topk(q, w, k, m, t0, topk, use_kernel=True)
    check_selection(q, w, k, m, t0, topk, idx, val)
    for t in [1, 3]:
        idx_t, val_t = csa_topk(q[:, t:t + T], w[:, t:t + T], k, m, t0 + t, topk, use_kernel=True)
        check_selection(q[:, t:t + T], w[:, t:t + T], k, m, t0 + t, topk, idx_t, val_t)
        torch.testing.assert_close(val_t, val[:, t:t + T], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["tree", "grid"])
@pytest.mark.parametrize("pattern", ["ties", "rising", "random"])
def test_decode_topk_is_exact(pattern, method, monkeypatch):
    """A decode row over 600 entries, in 64-entry tiles on a GPU too: through several merge levels
    ('tree'), or the row-wide radix select in one launch ('grid': 10 programs a row meeting at barriers
    on a GPU; one program a row under the interpreter, which runs programs one after another).
    'ties': 10 positive scores scattered among exact zeros, so 22 of the top 32 are zeros, which must be
    the earliest ones; 'rising': scores grow with the index, so every pick sits in the last tiles;
    'random': plain random scores."""
    monkeypatch.setattr(csa_select, "_TOPK_TILE", 64)
    monkeypatch.setattr(csa_select, "_TOPK_TILE_FEW_ROWS", 64)
    monkeypatch.setattr(csa_select, "_DECODE_TOPK", method)
    monkeypatch.setattr(csa_select, "_GRID_TILES", (64,) if DEVICE == "cuda" else (1024,))
    calls = []                                                   # the grid path ran (and the tree's did not)
    real = csa_select._topk_grid_triton
    monkeypatch.setattr(csa_select, "_topk_grid_triton", lambda *a: calls.append(a[-1]) or real(*a))
    B, S, topk = 2, 600, 32
    q, w, k = indexer_inputs(B, 1, H=4, D=16, S=S, seed=9)
    q, w, k = q.abs(), w.abs(), k.abs()
    if pattern == "ties":
        positive = torch.randperm(S, generator=torch.Generator().manual_seed(1))[:10].to(k.device)
        sign = torch.full((S,), -1.0, device=k.device).index_fill(0, positive, 1.0)
        k = k * sign[None, :, None]                                  # negative keys score exactly 0
    elif pattern == "rising":
        k = k[:, :1] * (1 + torch.arange(S, device=k.device) / S)[None, :, None]
    else:
        q, w, k = indexer_inputs(B, 1, H=4, D=16, S=S, seed=10)
    idx, val = csa_topk(q, w, k, m=4, t0=4 * S, topk=topk, use_kernel=True)
    assert calls == ([] if method == "tree" else [csa_select._GRID_TILES[0]])
    want_idx, want_val = csa_topk_reference(q, w, k, 4, 4 * S, topk)
    if pattern == "ties":
        assert (want_val == 0).sum() == B * 22
    elif pattern == "rising":
        assert torch.equal(want_idx.sort(-1).values[0, 0], torch.arange(S - topk, S, dtype=torch.int32, device=k.device))
    assert torch.equal(idx, want_idx)
    torch.testing.assert_close(val, want_val, rtol=1e-5, atol=1e-6)


def test_decode_topk_falls_back_to_the_tree(monkeypatch):
    """A refused cooperative launch (another process holding SMs) warns and leaves the tree's answer."""
    monkeypatch.setattr(csa_select, "_DECODE_TOPK", "grid")
    monkeypatch.setattr(csa_select, "_TOPK_TILE_FEW_ROWS", 64)

    def refused(*args):
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")
    monkeypatch.setattr(csa_select, "_topk_grid_triton", refused)
    q, w, k = indexer_inputs(B=1, T=1, H=4, D=16, S=300, seed=4)
    with pytest.warns(UserWarning, match="merge tree"):
        idx, val = csa_topk(q, w, k, m=4, t0=1200, topk=16, use_kernel=True)
    assert csa_select._DECODE_TOPK == "tree"
    want_idx, _ = csa_topk_reference(q, w, k, 4, 1200, 16)
    assert torch.equal(idx, want_idx)


def attention_inputs(B, T, n_h, c, S, topk, L, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, n_h, c, generator=g)
    kv = torch.randn(B, L, c, generator=g)
    entries = torch.randn(B, S, c, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g)[:topk] for _ in range(B * T)]).view(B, T, topk)
    idx = idx.masked_fill(torch.rand(B, T, topk, generator=g) < 0.3, -1)        # some slots empty
    idx[0, 0] = -1                                                               # a query with no entry
    sink = torch.randn(n_h, generator=g)
    return [x.to(DEVICE) for x in (q, kv, entries, idx.int(), sink)]


@pytest.mark.parametrize("t0,L", [(40, 6 + 9), (2, 2 + 6)])   # full window / window reaching position 0
def test_sparse_attention_equals_reference(t0, L):
    q, kv, entries, idx, sink = attention_inputs(B=2, T=6, n_h=4, c=32, S=24, topk=20, L=L, seed=t0)
    o, lse = sparse_attention(q, kv, entries, idx, sink, t0, window_size=10, use_kernel=True, return_lse=True)
    want_o, want_lse = sparse_attention_reference(q, kv, entries, idx, sink, t0, 10, return_lse=True)
    torch.testing.assert_close(o, want_o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-5)
    # the sink takes part: without it the output would differ
    without = sparse_attention_reference(q, kv, entries, idx, sink - 1e4, t0, 10)
    assert (without - want_o).abs().max() > 1e-3


def test_sparse_attention_large_logits_move_the_running_maximum():
    """Logits that keep growing along the selection (entries scaled up with their index, selected in
    index order) move the online softmax's running maximum by large steps, many times."""
    q, kv, entries, idx, sink = attention_inputs(B=2, T=6, n_h=4, c=32, S=64, topk=48, L=15, seed=4)
    q = q * 4
    entries = entries * torch.linspace(0.1, 3.0, 64, device=entries.device)[None, :, None]
    idx = idx.masked_fill(idx < 0, 1 << 20).sort(dim=-1).values     # ascending, empty slots last
    idx = idx.masked_fill(idx == 1 << 20, -1)
    o, lse = sparse_attention(q, kv, entries, idx, sink, 40, window_size=10, use_kernel=True, return_lse=True)
    want_o, want_lse = sparse_attention_reference(q, kv, entries, idx, sink, 40, 10, return_lse=True)
    logits = torch.einsum("bthc,bsc->bths", q, entries) * 32 ** -0.5 * 1.4426950408889634   # log2 units
    assert logits.amax() - sink.amax() > 3 * 8                    # the maximum grows by > 2^24 overall
    torch.testing.assert_close(o, want_o, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-4, atol=1e-4)


HOPPER = (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9
          and sparse_attention_hopper.HAS_GLUON)


@pytest.mark.skipif(not HOPPER, reason="Gluon kernel: Hopper GPU only")
@pytest.mark.parametrize("B,T,n_h,S,topk,t0,L,idx_dtype", [
    (2, 37, 64, 300, 128, 500, 37 + 127, torch.int32),     # full window
    (1, 70, 128, 200, 64, 20, 70 + 20, torch.int64),       # two head groups; window reaching position 0
])
def test_gluon_sparse_attention_equals_reference(B, T, n_h, S, topk, t0, L, idx_dtype, monkeypatch):
    """kernels/sparse_attention_hopper.py (V4's shape: head dim 512, 64 heads a program, window 128, bf16)
    against the fp32 reference and the `tl` kernel, with empty slots and a query with no entry."""
    q, kv, entries, idx, sink = attention_inputs(B=B, T=T, n_h=n_h, c=512, S=S, topk=topk, L=L, seed=T)
    q, kv, entries = (x.bfloat16() for x in (q, kv, entries))
    idx = idx.to(idx_dtype)
    assert sparse_attention_hopper.supported(q, kv, entries, idx, 128)
    o, lse = sparse_attention(q, kv, entries, idx, sink, t0, 128, use_kernel=True, return_lse=True)
    want_o, want_lse = sparse_attention_reference(q, kv, entries, idx, sink, t0, 128, return_lse=True)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=2e-3)
    err = (o.float() - want_o.float()).norm() / want_o.float().norm()
    assert err < 8e-3, err                                                       # bf16 P and output
    monkeypatch.setattr(csa_select, "_ATTENTION_GLUON", False)                  # the `tl` kernel
    tl_o, tl_lse = sparse_attention(q, kv, entries, idx, sink, t0, 128, use_kernel=True, return_lse=True)
    torch.testing.assert_close(lse, tl_lse, rtol=0, atol=2e-3)
    assert (o.float() - tl_o.float()).norm() / tl_o.float().norm() < 8e-3


def test_sparse_attention_gradient_through_fallback():
    inputs = attention_inputs(B=1, T=4, n_h=4, c=32, S=16, topk=8, L=4 + 5, seed=11)
    q, kv, entries, idx, sink = inputs
    grad_o = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    grads = []
    for use_kernel in (True, False):
        leaves = [x.clone().requires_grad_() for x in (q, kv, entries, sink)]
        o = sparse_attention(leaves[0], leaves[1], leaves[2], idx, leaves[3], 30, 6, use_kernel=use_kernel)
        (o * grad_o).sum().backward()
        grads.append([x.grad for x in leaves])
    for got, want in zip(*grads):
        assert want.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_sparse_attention_decode_agrees_with_prefill():
    T, t0, W = 5, 20, 8
    q, kv, entries, idx, sink = attention_inputs(B=2, T=T, n_h=4, c=32, S=16, topk=8, L=T + W - 1, seed=2)
    full = sparse_attention(q, kv, entries, idx, sink, t0, W, use_kernel=True)
    for t in range(T):                          # the cached W-1 rows before t0+t, then its own row
        rows = kv[:, t:t + W]
        one = sparse_attention(q[:, t:t + 1], rows, entries, idx[:, t:t + 1], sink, t0 + t, W, use_kernel=True)
        torch.testing.assert_close(one, full[:, t:t + 1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("T,S,t0", [(6, 300, 1000), (24, 80, 0)])
def test_fp8_indexer_equals_its_reference(T, S, t0):
    """FP8 keys (e4m3, a power-of-two scale per row) and queries quantised inside: the kernel's scores
    equal the reference's on the same e4m3 values (exact products, fp32 sums), and the selections agree."""
    q, w, k = indexer_inputs(B=2, T=T, H=4, D=16, S=S, seed=S + t0)
    k8, k_scale = quantize_rows(k)
    assert k8.dtype == torch.float8_e4m3fn and k_scale.shape == (2, S)
    assert torch.equal(k_scale.log2(), k_scale.log2().round())                    # powers of two
    assert ((k8.float() * k_scale[..., None] - k).abs() <= k.abs() * 2 ** -4 + 1e-6 * k_scale[..., None]).all()
    got = indexer_scores(q, w, k8, m=4, t0=t0, use_kernel=True, k_scale=k_scale)
    want = indexer_scores_reference(q, w, k8, 4, t0, k_scale)
    assert torch.equal(got == float("-inf"), want == float("-inf"))
    finite = want > float("-inf")
    # bound: the sum of |products| behind each score. On the CPU only the order of fp32 sums differs;
    # Hopper's FP8 tensor cores accumulate with ~14 bits (the DeepSeek-V3 report), hence 2^-12 there
    q8, w8 = csa_select.fp8_queries(q, w, impl="reference")
    size = (torch.einsum("bthd,bsd->btsh", q8.float().abs(), k8.float().abs()) * w8.abs()[:, :, None, :]).sum(-1)
    size = size * k_scale[:, None, :]
    tol = 2.0 ** -12 if got.is_cuda else 1e-5
    assert ((got - want).abs() <= tol * size + 1e-7)[finite].all()
    # queries quantised beforehand (q8, w8) give the kernel's own quantisation's scores
    pre = torch.full_like(got, float("-inf"))
    csa_select._scores_triton(q8.to(DEVICE), w8.to(DEVICE), k8, 4, t0, pre, k_scale)
    assert torch.equal(pre == float("-inf"), got == float("-inf"))
    assert ((pre - got).abs() <= tol * size + 1e-7)[finite].all()
    # FP8 moves the scores by a few percent of their size, not more
    plain = indexer_scores_reference(q, w, k, 4, t0)
    assert ((want - plain)[finite].abs().max() < 0.15 * plain[finite].abs().max())
    idx, val = csa_topk(q, w, k8, 4, t0, 16, use_kernel=True, k_scale=k_scale)
    want_idx, want_val = csa_topk_reference(q, w, k8, 4, t0, 16, k_scale=k_scale)
    assert torch.equal(idx == -1, want_idx == -1)
    if got.is_cuda:   # near ties may go the other way: the same scores, as sets
        torch.testing.assert_close(val.sort(-1).values, want_val.sort(-1).values, rtol=0, atol=tol * size.max().item())
    else:
        assert torch.equal(idx, want_idx)
        torch.testing.assert_close(val, want_val, rtol=1e-5, atol=1e-6)


def test_bad_inputs_name_the_problem():
    q, w, k = indexer_inputs(B=1, T=2, H=4, D=16, S=8, seed=0)
    with pytest.raises(ValueError, match="w must be"):
        csa_topk(q, w[:, :, :2], k, 4, 0, 4)
    with pytest.raises(ValueError, match="topk"):
        csa_topk(q, w, k, 4, 0, 0)
    k8, k_scale = quantize_rows(k)
    with pytest.raises(ValueError, match="k_scale"):
        csa_topk(q, w, k8, 4, 0, 4)                                       # FP8 keys without scales
    with pytest.raises(ValueError, match="k_scale"):
        csa_topk(q, w, k, 4, 0, 4, k_scale=k_scale)                       # scales for bf16/fp32 keys
    with pytest.raises(ValueError, match="k_scale must be"):
        csa_topk(q, w, k8, 4, 0, 4, k_scale=k_scale[:, :3])
    with pytest.raises(ValueError, match="head dim"):
        quantize_rows(torch.randn(3, 130))
    q, kv, entries, idx, sink = attention_inputs(B=1, T=3, n_h=4, c=32, S=8, topk=4, L=3, seed=0)
    with pytest.raises(ValueError, match="kv must be"):
        sparse_attention(q, kv[:, :2], entries, idx, sink, 5, 4)
    with pytest.raises(ValueError, match="attn_sink"):
        sparse_attention(q, kv, entries, idx, sink[:2], 5, 4)
