"""Tests for attention.py: RoPE, the compressor, the indexer's selection, the banded core against a
per-query loop, causality and exact influence sets at every position, decode == chunked prefill == full
forward, the sink, the indexer's training stages, caches and accounting. Nano preset, CPU, fp32."""

import math

import pytest
import torch

from attention import (Attention, Compressor, apply_rope, csa_select, indexer_kl, indexer_scores,
                       rope_inv_freq, sink_softmax, sparse_attention)
from model import ModelConfig

T = 100   # nano: window 16 evicts; 6 HCA entries (m = 16); 25 CSA entries, top-4

LAYERS = {   # name -> (config overrides, layer id); nano compress_ratios = (0, 4, 16, 4)
    "swa": ({}, 0),
    "csa": ({}, 1),
    "csa_dense": ({"csa_stage": "dense"}, 1),
    "csa_warmup": ({"csa_stage": "warmup"}, 1),
    "csa_fp8": ({"index_fp8": True}, 1),
    "hca": ({}, 2),
    "full": ({"attention": "full"}, 1),
}


def make(name, seed=0, **overrides):
    torch.manual_seed(seed)
    extra, layer_id = LAYERS[name]
    cfg = ModelConfig.from_preset("nano", **{"init_std": 0.1, **extra, **overrides})   # outputs of order 1
    layer = Attention(cfg, layer_id).eval()
    with torch.no_grad():   # non-trivial sinks, gate biases and norms so that every path is exercised
        layer.attn_sink.normal_()
        for name_, p in layer.named_parameters():
            if name_.endswith("ape") or name_.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return cfg, layer


def rope_ref(x, positions, inv_freq, inverse=False):
    """Complex-number RoPE on the last r dims, in float64."""
    r = 2 * len(inv_freq)
    z = torch.view_as_complex(x[..., -r:].double().unflatten(-1, (r // 2, 2)).contiguous())
    angle = positions.double()[:, None] * torch.tensor(inv_freq, dtype=torch.float64)
    rot = torch.polar(torch.ones_like(angle), -angle if inverse else angle)
    z = z * rot.view(len(positions), *([1] * (x.dim() - 3)), r // 2)
    return torch.cat([x[..., :-r].double(), torch.view_as_real(z).flatten(-2)], -1)


# ---------------------------------------------------------------------------------------------- RoPE

def test_rope_matches_complex_reference_and_inverts():
    inv = rope_inv_freq(16, 160000.0, dict(factor=16.0, original_seq_len=65536, beta_fast=32, beta_slow=1))
    x = torch.randn(2, 9, 3, 32)
    pos = torch.arange(5, 14)
    y = apply_rope(x, pos, inv)
    torch.testing.assert_close(y.double(), rope_ref(x, pos, inv), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[..., :16], x[..., :16])                          # only the last r dims
    torch.testing.assert_close(apply_rope(y, pos, inv, inverse=True), x, atol=1e-5, rtol=0)
    # relative positions: <rope(q, t), rope(k, s)> depends on t - s only
    q, k = torch.randn(32), torch.randn(32)
    dot = lambda t, s: (apply_rope(q.view(1, 1, 32), torch.tensor([t]), inv) *
                        apply_rope(k.view(1, 1, 32), torch.tensor([s]), inv)).sum()
    torch.testing.assert_close(dot(7, 3), dot(104, 100), atol=1e-4, rtol=0)


def test_yarn_keeps_fast_pairs_and_slows_slow_ones():
    plain = rope_inv_freq(64, 160000.0)
    yarn = rope_inv_freq(64, 160000.0, dict(factor=16.0, original_seq_len=65536, beta_fast=32, beta_slow=1))
    assert plain[0] == yarn[0]
    assert math.isclose(yarn[-1], plain[-1] / 16, rel_tol=1e-12)
    assert all(p / 16 - 1e-15 <= y <= p + 1e-15 for p, y in zip(plain, yarn))


# ------------------------------------------------------------------------------------------ compressor

def compressor_loop(comp, x, inv_freq):
    """Entry by entry, from the definition: per channel softmax over the block's candidates."""
    m, c = comp.ratio, comp.head_dim
    kv = x.double() @ comp.wkv.weight.double().T
    score = x.double() @ comp.wgate.weight.double().T
    ape = comp.ape.double()
    entries = []
    for i in range(x.shape[1] // m):
        cand_kv, cand_score = [], []
        if comp.overlap:
            for j in range(max(i - 1, 0) * m, i * m):            # block i-1, first half of the channels
                cand_kv.append(kv[:, j, :c]); cand_score.append(score[:, j, :c] + ape[j % m, :c])
        for j in range(i * m, (i + 1) * m):                      # block i (second half for CSA)
            cand_kv.append(kv[:, j, -c:]); cand_score.append(score[:, j, -c:] + ape[j % m, -c:])
        w = torch.stack(cand_score, 1).softmax(1)
        e = (w * torch.stack(cand_kv, 1)).sum(1)
        e = e / torch.sqrt(e.pow(2).mean(-1, keepdim=True) + comp.norm.eps) * comp.norm.weight.double()
        entries.append(rope_ref(e[:, None], torch.tensor([i * m]), inv_freq)[:, 0])
    return torch.stack(entries, 1)


@pytest.mark.parametrize("ratio", [4, 16])
def test_compressor_matches_loop(ratio):
    torch.manual_seed(1)
    comp = Compressor(dim=24, head_dim=16, ratio=ratio, eps=1e-6)
    with torch.no_grad():
        comp.ape.normal_()
        comp.norm.weight.add_(0.3 * torch.randn(16))
    inv = rope_inv_freq(8, 10000.0)
    x = torch.randn(2, 4 * ratio + 3, 24)                       # a trailing incomplete block is dropped
    out = comp(x, 0, inv)
    assert out.shape == (2, 4, 16)
    torch.testing.assert_close(out.double(), compressor_loop(comp, x, inv), atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------- indexer selection

def test_csa_select_picks_visible_top_k_and_pads():
    torch.manual_seed(2)
    B, L, H, c, N, k, m = 2, 40, 3, 8, 10, 4, 4
    q, w, keys = torch.randn(B, L, H, c), torch.randn(B, L, H), torch.randn(B, N, c)
    pos = torch.arange(L)
    idx = csa_select(q, w, keys, pos, m, k)
    scores = indexer_scores(q, w, keys)                          # [B, L, N]
    for b in range(B):
        for t in range(L):
            n_vis = min((t + 1) // m, N)
            chosen = [s for s in idx[b, t].tolist() if s >= 0]
            assert idx[b, t, len(chosen):].eq(-1).all()          # -1 padding at the end
            assert len(chosen) == min(k, n_vis) and len(set(chosen)) == len(chosen)
            assert all(s < n_vis for s in chosen)                # never an invisible entry
            rest = [s for s in range(n_vis) if s not in chosen]
            if chosen and rest:
                assert scores[b, t, chosen].min() >= scores[b, t, rest].max()


@pytest.mark.parametrize("selected", [False, True])
def test_indexer_scores_in_checkpointed_chunks_equal_one_pass(selected, monkeypatch):
    """Long sequences score in query chunks, each checkpointed: same scores and same gradients."""
    import attention
    torch.manual_seed(3)
    B, L, H, c, N, k = 2, 37, 3, 8, 9, 4
    q, w, keys = torch.randn(B, L, H, c), torch.randn(B, L, H), torch.randn(B, N, c)
    idx = torch.randint(-1, N, (B, L, k)) if selected else None
    grads = []
    for elems in (2 ** 26, B * (k if selected else N) * H * 5):    # one pass; chunks of 5 queries
        monkeypatch.setattr(attention, "SCORE_CHUNK_ELEMS", elems)
        leaves = [t.clone().requires_grad_() for t in (q, w, keys)]
        scores = indexer_scores(*leaves, idx=idx)
        (scores * torch.linspace(-1, 1, scores.numel()).view_as(scores)).sum().backward()
        grads.append([scores.detach()] + [t.grad for t in leaves])
    for one, chunked in zip(*grads):
        torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)


def test_csa_select_breaks_ties_towards_earlier_entries():
    q, keys = torch.randn(1, 30, 2, 8), torch.randn(1, 7, 8)
    idx = csa_select(q, torch.zeros(1, 30, 2), keys, torch.arange(30), 4, 3)    # every score is 0
    assert idx[0, 29].tolist() == [0, 1, 2] and idx[0, 5].tolist() == [0, -1, -1]


# -------------------------------------------------------------------- core attention vs per-query loop

def attention_loop(q, kv, window, entries, entry_idx, ratio, pos0, sink, scale):
    B, L, H, c = q.shape
    P = kv.shape[1] - L
    out = torch.zeros(B, L, H, c, dtype=torch.float64)
    for b in range(B):
        for i in range(L):
            t = pos0 + i
            rows = [kv[b, P + i - d] for d in range(window) if P + i - d >= 0]   # kv starts at pos0-P
            if entries is not None:
                chosen = range((t + 1) // ratio) if entry_idx is None else \
                    [s for s in entry_idx[b, i].tolist() if s >= 0]
                rows += [entries[b, s] for s in chosen]
            keys = torch.stack(rows).double()                                      # [K, c]
            logits = q[b, i].double() @ keys.T * scale                             # [H, K]
            e = logits.exp()
            p = e / (e.sum(-1, keepdim=True) + sink.double().exp()[:, None])
            out[b, i] = p @ keys
    return out


def core_inputs(mode, B, L, H, c, m, pos0, P):
    """q, kv (P earlier rows), sink, entries (None for window only) and top-5 indices (mode "topk")."""
    q, kv, sink = torch.randn(B, L, H, c), torch.randn(B, P + L, c), torch.randn(H)
    N = (pos0 + L) // m
    entries = None if mode == "window" else torch.randn(B, N, c)
    idx = None
    if mode == "topk":
        idx = csa_select(torch.randn(B, L, 2, 4), torch.randn(B, L, 2), torch.randn(B, N, 4),
                         pos0 + torch.arange(L), m, 5)
    return q, kv, sink, entries, idx


@pytest.mark.parametrize("mode", ["window", "dense", "topk"])
@pytest.mark.parametrize("pos0,P", [(0, 0), (37, 7), (41, 3)])
def test_sparse_attention_matches_loop(mode, pos0, P):
    torch.manual_seed(3)
    B, L, H, c, window, m = 2, 23, 3, 8, 8, 4
    q, kv, sink, entries, idx = core_inputs(mode, B, L, H, c, m, pos0, P)
    o, p_entries = sparse_attention(q, kv, window, entries, idx, m, pos0, sink, c ** -0.5)
    ref = attention_loop(q, kv, window, entries, idx, m, pos0, sink, c ** -0.5)
    torch.testing.assert_close(o.double(), ref, atol=1e-5, rtol=0)
    if entries is not None:
        assert p_entries.shape[:3] == (B, L, H) and (p_entries >= 0).all()


@pytest.mark.parametrize("mode", ["window", "dense", "topk"])
def test_sparse_attention_in_checkpointed_chunks_equals_one_pass(mode, monkeypatch):
    """Training on long sequences runs the core in query chunks of ATTENTION_CHUNK (7 here, not a
    multiple of the window of 8): same outputs, probabilities and gradients as one pass."""
    import attention
    torch.manual_seed(4)
    B, L, H, c, window, m, pos0, P = 2, 30, 3, 8, 8, 4, 37, 7
    q, kv, sink, entries, idx = core_inputs(mode, B, L, H, c, m, pos0, P)
    results = []
    for chunk in (10 ** 9, 7):
        monkeypatch.setattr(attention, "ATTENTION_CHUNK", chunk)
        leaves = [None if t is None else t.clone().requires_grad_() for t in (q, kv, entries, sink)]
        o, p = sparse_attention(leaves[0], leaves[1], window, leaves[2], idx, m, pos0, leaves[3], c ** -0.5)
        (o * torch.linspace(-1, 1, o.numel()).view_as(o)).sum().backward()
        results.append([o.detach(), p.detach()] + [t.grad for t in leaves if t is not None])
    for one, chunked in zip(*results):
        torch.testing.assert_close(chunked, one, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------- causality, influence

def influence(layer, x):
    """changed[j, t]: does perturbing token j alone change the output at t? (one batched forward)"""
    L = x.shape[1]
    xs = x.repeat(L + 1, 1, 1)
    xs[torch.arange(L), torch.arange(L)] += torch.randn(L, x.shape[-1])
    with torch.no_grad():
        y = layer(xs)
    return (y[:L] - y[L]).abs().amax(-1) > 1e-5      # unaffected outputs are bit-identical here


def expected_influence(name, cfg, layer):
    j, t = torch.arange(T)[:, None], torch.arange(T)[None, :]
    if name == "full":
        return t >= j
    seen = (t >= j) & (t - j < cfg.window_size)
    m = layer.compress_ratio
    if m:   # the block holding j reaches t once complete: entry j//m is visible iff j//m < (t+1)//m
        seen |= (j // m) < (t + 1) // m
    return seen


@pytest.mark.parametrize("name,window", [("swa", 16), ("hca", 16), ("hca", 2), ("csa_dense", 2), ("full", 16)])
def test_influence_sets_exact(name, window):
    """Perturb each token in turn: exactly the outputs the definition allows change. With window 2 the
    compressed entries are the only path past the window, so the visibility rule is tested at every
    block boundary (s < (t + 1) // m, no earlier, no later)."""
    cfg, layer = make(name, window_size=window)
    changed = influence(layer, torch.randn(1, T, cfg.dim))
    assert torch.equal(changed, expected_influence(name, cfg, layer))


@pytest.mark.parametrize("training", [False, True])
def test_topk_csa_is_causal(training):
    """Perturb every token from position p on: outputs before p never change, for every p."""
    cfg, layer = make("csa")
    layer.train(training)
    x = torch.randn(1, T, cfg.dim)
    xs = x.repeat(T + 1, 1, 1)
    later = torch.arange(T)[None, :] >= torch.arange(T + 1)[:, None]             # [T+1, T]
    xs = torch.where(later[..., None], torch.randn_like(xs), xs)
    with torch.no_grad():
        y = layer(xs)
    for p in range(T + 1):
        torch.testing.assert_close(y[p, :p], y[T, :p], atol=1e-5, rtol=0)
    single = influence(layer.eval(), x)
    dense = expected_influence("csa_dense", cfg, layer)
    assert not (single & ~dense).any()                            # top-k sees a subset of the visible
    assert (single & ~(torch.arange(T)[None, :] - torch.arange(T)[:, None] < cfg.window_size)).any()


# ---------------------------------------------------------------------------- decode == prefill == full

@pytest.mark.parametrize("name", list(LAYERS))
def test_decode_equals_chunked_prefill_equals_forward(name):
    cfg, layer = make(name)
    x = torch.randn(2, T, cfg.dim)
    with torch.no_grad():
        full = layer(x)
        cache = layer.new_cache(2, "cpu", torch.float32)
        steps = torch.cat([layer(x[:, t:t + 1], cache) for t in range(T)], 1)
        cache, outs, start = layer.new_cache(2, "cpu", torch.float32), [], 0
        for size in [3, 7, 5, 13, 1, 30, 6, 35]:                   # not multiples of 4 or 16
            outs.append(layer(x[:, start:start + size], cache))
            start += size
        chunks = torch.cat(outs, 1)
    assert cache.pos == T
    torch.testing.assert_close(steps, full, atol=2e-5, rtol=0)
    torch.testing.assert_close(chunks, full, atol=2e-5, rtol=0)


def test_cache_sizes_and_bytes():
    for name in ["swa", "csa", "csa_fp8", "hca", "full"]:
        cfg, layer = make(name)
        cache = layer.new_cache(1, "cpu", torch.float32)
        with torch.no_grad():
            layer(torch.randn(1, 37, cfg.dim), cache)
            layer(torch.randn(1, 26, cfg.dim), cache)
        size = 4
        if name == "full":
            assert cache.kv.view().shape[1] == 63
            assert layer.cache_bytes(63, 1, torch.float32) == 63 * cfg.head_dim * size
            continue
        assert cache.ring.shape[1] == cfg.window_size                                   # fixed size
        comps = [cc for cc in (cache.compressor, cache.indexer) if cc is not None]
        assert len(comps) == {"swa": 0, "csa": 2, "csa_fp8": 2, "hca": 1}[name]
        per_entry = []
        for cc, comp in zip(comps, layer.compressors_cached()):
            assert cc.entries.view().shape[1] == 63 // comp.ratio                       # growing
            assert cc.kv_rows.shape[1] < (2 if comp.overlap else 1) * comp.ratio        # bounded state
            fp8 = name == "csa_fp8" and cc is cache.indexer                             # e4m3 + fp32 scale
            assert cc.entries.view().dtype == (torch.float8_e4m3fn if fp8 else torch.float32)
            assert (cc.scales is not None) == fp8
            per_entry.append(comp.head_dim + 4 if fp8 else comp.head_dim * size)
        grown = layer.cache_bytes(63 + 64, 1, torch.float32) - layer.cache_bytes(63, 1, torch.float32)
        assert grown == sum(64 // comp.ratio * b for comp, b in zip(layer.compressors_cached(), per_entry))


def test_bad_input_raises():
    cfg, layer = make("csa", max_seq_len=40)
    with pytest.raises(ValueError, match="shape"):
        layer(torch.randn(1, 5, cfg.dim + 1))
    cache = layer.new_cache(1, "cpu", torch.float32)
    layer(torch.randn(1, 38, cfg.dim), cache)
    with pytest.raises(ValueError, match="max_seq_len"):
        layer(torch.randn(1, 3, cfg.dim), cache)


# ----------------------------------------------------------------------------------------------- sink

def test_sink_takes_probability_mass():
    logits, sink = torch.randn(2, 5, 3, 7), torch.randn(3)
    p = sink_softmax(logits, sink)
    total = logits.exp().sum(-1)
    torch.testing.assert_close(p.sum(-1), total / (total + sink.exp().view(1, 1, 3)))
    assert (p.sum(-1) < 1).all()
    cfg, layer = make("hca")
    x = torch.randn(1, 40, cfg.dim)
    y = layer(x)
    y.square().sum().backward()
    assert layer.attn_sink.grad.abs().min() > 0
    with torch.no_grad():
        layer.attn_sink.fill_(40.0)                                 # the sink absorbs everything
        assert layer(x).abs().max() < 1e-8 * y.abs().max()


# ------------------------------------------------------------------------------------ indexer training

def grads(layer):
    main = {n: p.grad for n, p in layer.named_parameters() if not n.startswith("indexer.")}
    index = {n: p.grad for n, p in layer.named_parameters() if n.startswith("indexer.")}
    return main, index


@pytest.mark.parametrize("stage", ["warmup", "sparse"])
def test_indexer_learns_only_from_its_kl(stage):
    cfg, layer = make("csa", csa_stage=stage)
    layer.train()
    x = torch.randn(2, 60, cfg.dim, requires_grad=True)
    layer(x)
    kl = layer.indexer_loss
    assert kl.dim() == 0 and torch.isfinite(kl) and kl > 0
    kl.backward()
    main, index = grads(layer)
    assert all(g is None for g in main.values()) and x.grad is None       # nothing reaches the model
    assert all(g is not None and g.abs().sum() > 0 for g in index.values())
    layer.zero_grad(set_to_none=True)
    layer(x).square().sum().backward()                                     # the LM path
    main, index = grads(layer)
    assert all(g is None for g in index.values())                         # top-k passes no gradient
    assert all(g is not None for g in main.values())


def test_indexer_loss_off_when_not_trained():
    cfg, layer = make("csa_dense")
    layer.train()
    layer(torch.randn(1, 40, cfg.dim))
    assert layer.indexer_loss is None and layer.indexer is not None
    cfg, layer = make("csa")                                                # eval: no loss
    layer(torch.randn(1, 40, cfg.dim))
    assert layer.indexer_loss is None


def test_indexer_kl_is_zero_at_the_target():
    p = torch.rand(2, 6, 3, 5)
    valid = torch.rand(2, 6, 5) > 0.3
    valid[0, 0] = False                                                     # a query with no entry
    p = p * valid[:, :, None, :]
    target = p.sum(2) / p.sum(2).sum(-1, keepdim=True).clamp_min(1e-20)
    assert indexer_kl(p, target.clamp_min(1e-30).log(), valid).abs() < 1e-5
    assert indexer_kl(p, torch.randn(2, 6, 5), valid) > 1e-3


# ------------------------------------------------------------------------------------------ accounting

def test_attention_flops():
    _, full = make("full")
    _, swa = make("swa")
    _, csa = make("csa")
    _, dense = make("csa_dense")
    c = full.n_heads * full.head_dim
    assert full.attention_flops(10) == 4 * c * 11 / 2
    assert swa.attention_flops(16) == full.attention_flops(16)          # the window covers everything
    assert swa.attention_flops(1000) == pytest.approx(4 * c * 16, rel=0.01)
    assert csa.attention_flops(1000) < dense.attention_flops(1000) < full.attention_flops(1000)
