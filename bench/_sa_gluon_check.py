"""Temporary: the Gluon sparse attention against the reference and the tl kernel (not committed)."""
import os, sys, time
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch
from triton.testing import do_bench
from kernels import csa_select as cs
from kernels import sparse_attention_hopper as sah
N_H, C, WINDOW, TOPK = 64, 512, 128, 512
LOG2E = 1.4426950408889634

def inputs(T, S, L, seed=0, holes=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, N_H, C, device="cuda", generator=g).bfloat16()
    kv = torch.randn(1, L, C, device="cuda", generator=g).bfloat16()
    entries = torch.randn(1, S, C, device="cuda", generator=g).bfloat16()
    idx = torch.stack([torch.randperm(S, device="cuda", generator=g)[:TOPK] for _ in range(T)])[None].int()
    if holes:
        idx[..., ::7] = -1
    sink = torch.randn(N_H, device="cuda", generator=g)
    return q, kv, entries, idx, sink

VARIANTS = [dict(sum_late=True, bn=64), dict(sum_late=False, bn=64), dict(sum_late=True, bn=32)]
def gluon(q, kv, entries, idx, sink, **kw):
    o = torch.empty_like(q); lse = torch.empty(q.shape[:3], device="cuda")
    assert sah.supported(q, kv, entries, idx, WINDOW)
    return sah.launch(q, kv, entries, idx, sink, 0, WINDOW, C ** -0.5 * LOG2E, o, lse, **kw)

for T, S, L, holes in [(64, 1000, 64 + WINDOW - 1, False), (100, 2000, 100, True), (256, 16384, 256 + WINDOW - 1, True)]:
    q, kv, entries, idx, sink = inputs(T, S, L, holes=holes)
    ro, rl = cs.sparse_attention_reference(q, kv, entries, idx, sink, 10 ** 6, WINDOW, return_lse=True)
    for kw in VARIANTS:
        o, lse = gluon(q, kv, entries, idx, sink, **kw)
        e_o = ((o.float() - ro.float()).norm() / ro.float().norm()).item()
        e_l = (lse - rl).abs().max().item()
        print(f"{kw} T={T} S={S} L={L} holes={holes}: o rel err {e_o:.2e}, lse max abs err {e_l:.2e} -> "
              f"{'ok' if e_o < 1e-2 and e_l < 1e-2 else 'FAILED'}", flush=True)

for T in (4096, 16384):
    q, kv, entries, idx, sink = inputs(T, 16384, T + WINDOW - 1)
    flops = 4 * T * N_H * C * (TOPK + WINDOW)
    t_tl = do_bench(lambda: cs._sparse_attention_triton(q, kv, entries, idx, sink, 0, WINDOW, C ** -0.5), warmup=50, rep=300)
    print(f"T={T}: tl {flops / t_tl / 1e9:.0f} TFLOP/s", flush=True)
    for kw in VARIANTS:
        t_gl = do_bench(lambda: gluon(q, kv, entries, idx, sink, **kw), warmup=50, rep=300)
        print(f"T={T}: gluon {kw} {flops / t_gl / 1e9:.0f} TFLOP/s", flush=True)
