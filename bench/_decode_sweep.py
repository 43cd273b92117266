"""Temporary (not committed): the decode score kernel's chunk / block / warps / stages at B = 1, S = 262144."""
import os, sys, itertools
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import torch, triton
from triton.testing import do_bench_cudagraph
from kernels import csa_select as cs
H, D, S, M = 64, 128, 262144, 4
g = torch.Generator(device="cuda").manual_seed(0)
q = torch.randn(1, 1, H, D, device="cuda", generator=g).bfloat16()
w = torch.randn(1, 1, H, device="cuda", generator=g).bfloat16()
k = torch.randn(1, S, D, device="cuda", generator=g).bfloat16()
t0 = M * S
out = torch.empty(1, 1, S, device="cuda")
ref = torch.empty_like(out); cs._scores_triton(q, w, k, M, t0, ref)
res = []
for chunk, (bs, nw, ns) in itertools.product((512, 1024, 2048, 4096),
                                           [(128, 4, 3), (128, 4, 4), (128, 8, 3), (128, 8, 4), (256, 8, 3), (64, 4, 4), (64, 4, 6), (256, 8, 2)]):
    args = (q, w, k, out, out, 1, S, t0, M, chunk, *q.stride(), *w.stride(), *k.stride(), out.stride(0), *out.stride())
    meta = dict(H=H, D=D, H_PAD=64, D_PAD=128, DOT_PRECISION=None, KEY_SCALE=False, QUANT_Q=False, ROUND_ON_GRID=False)
    fn = lambda: cs._indexer_scores_kernel[(1, triton.cdiv(S, chunk), 1)](*args, **meta, BT=1, BS=bs, num_warps=nw, num_stages=ns)
    try:
        fn(); torch.cuda.synchronize()
        ok = torch.equal(out, ref)
        us = do_bench_cudagraph(fn, rep=100) * 1e3
        res.append((us, chunk, bs, nw, ns, ok))
        print(f"chunk {chunk} BS {bs} w{nw} s{ns}: {us:.1f} us ({S * D * 2 / us / 1e6:.2f} TB/s) same as tuned: {ok}", flush=True)
    except Exception as e:
        print(f"chunk {chunk} BS {bs} w{nw} s{ns}: failed {str(e)[:80]}", flush=True)
print("best:", sorted(res)[:3])
scores = ref
tile = cs._grid_tile(1, S, scores.device)
f = lambda: cs._topk_grid_triton(scores, t0, M, 512, tile)
a = f(); b = cs._topk_triton.__wrapped__(scores, t0, M, 512) if hasattr(cs._topk_triton, "__wrapped__") else None
print(f"grid top-k (relaxed histogram atomics), tile {tile}: {do_bench_cudagraph(f, rep=200) * 1e3:.1f} us")
sel = lambda: cs.csa_topk(q, w, k, M, t0, 512)
print(f"csa_topk decode B=1 bf16: {do_bench_cudagraph(sel, rep=200) * 1e3:.1f} us")
