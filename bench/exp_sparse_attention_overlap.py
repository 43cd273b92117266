"""An experiment, not yet measured on a GPU: the CSA sparse attention with the next block's QK^T in flight
while the current block's softmax runs (FlashAttention-3's overlap within a warpgroup), against
kernels/csa_select.py's kernel. Promote it into kernels/csa_select.py only if it is faster there.

Why (offline compiles for sm_90 with Triton 3.9, the fourth session): in `_sparse_attention_kernel`
Triton waits for every MMA right after issuing it, so the tensor cores idle during the softmax; and
since S = QK^T feeds the PV product of both warpgroups (64 heads x 512 dims: the fp32 accumulator needs
two), both compute all of S, 1.5x the MMA work. The kernel below
  - runs one loop over blocks j = -1 .. NB (selected entries, then window rows; the first and last are
    empty), carrying S_j (in flight), p_{j-1} and alpha_{j-1};
  - per iteration: PV of block j-1 (synchronous, its wait also retires S_j), the logits read from S_j,
    then S_{j+1} issued and left in flight (Triton keeps an MMA asynchronous only when nothing in the
    loop reads its result before the next iteration), then the softmax on the logits, which overlaps it;
  - rescales the accumulator inside the PV product (`tl.dot(p, kv, acc * alpha)`): after it, Triton
    moved the accumulator through shared memory every iteration.
Offline at 64 heads, BN = 32, 8 warps, 2 stages: the PTX loop issues S_{j+1}, then the exp2 / max / sum
with no wait before the back edge; 255 registers, no spills, no ptxas C7514 (which would serialise
every MMA), 196 KiB of shared memory (BN = 64 needs 328: it cannot launch); S is split between the
warpgroups instead of computed twice. Costs: each kv block is loaded twice (for QK^T one iteration
early, then for PV), p goes through shared memory, and two iterations are empty.

    TRITON_INTERPRET=1 python bench/exp_sparse_attention_overlap.py    # CPU: correctness only
    python bench/exp_sparse_attention_overlap.py                       # GPU: correctness, then TFLOP/s
"""

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import csa_select as cs  # noqa: E402
from kernels.csa_select import _finish_heads, _start_heads  # noqa: E402


@triton.jit
def _block(j, idx_row, ent_b, kv_b, first_row, S, se_s, se_c, skv_t, skv_c, si_k, jn, c,
           TOPK: tl.constexpr, WINDOW: tl.constexpr, BN: tl.constexpr, NB_SEL: tl.constexpr):
    """Block j of the keys: j < NB_SEL the selected entries idx[j BN ..], else the window rows from
    (j - NB_SEL) BN; outside [0, NB) none. Returns (pointers [BN, C_PAD], ok [BN]). Whole pointer
    tensors are selected, not offsets: a select of offsets lost the 16-byte loads and their pipelining."""
    kk = j * BN + jn
    in_sel = j < NB_SEL
    sel = tl.load(idx_row + kk * si_k, mask=in_sel & (kk >= 0) & (kk < TOPK), other=-1)
    w = (j - NB_SEL) * BN + jn
    r = first_row + w
    ok = tl.where(in_sel, (sel >= 0) & (sel < S), (r >= 0) & (w >= 0) & (w < WINDOW))
    from_entries = ent_b + tl.where(ok, sel, 0).to(tl.int64)[:, None] * se_s + c[None, :] * se_c
    from_window = kv_b + tl.where(ok, r, 0)[:, None] * skv_t + c[None, :] * skv_c
    return tl.where(in_sel, from_entries, from_window), ok


@triton.jit
def _overlap_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr,
                    T, L, S, t0, qk_scale,
                    sq_b, sq_t, sq_h, sq_c, skv_b, skv_t, skv_c, se_b, se_s, se_c,
                    si_b, si_t, si_k, so_b, so_t, so_h, so_c,
                    N_H: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, TOPK: tl.constexpr,
                    WINDOW: tl.constexpr, HB: tl.constexpr, BN: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """The same arguments and results as csa_select._sparse_attention_kernel."""
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    b = tl.program_id(2).to(tl.int64)
    c = tl.arange(0, C_PAD)
    h_ok = h < N_H
    c_ok = c < C
    qb, m_i, l_i, acc = _start_heads(q_ptr, sink_ptr, b, t, h, c, h_ok, c_ok, sq_b, sq_t, sq_h, sq_c, HB, C_PAD)
    jn = tl.arange(0, BN)
    NB_SEL: tl.constexpr = (TOPK + BN - 1) // BN
    NB: tl.constexpr = NB_SEL + (WINDOW + BN - 1) // BN
    idx_row = idx_ptr + b * si_b + t * si_t
    ent_b = ent_ptr + b * se_b
    kv_b = kv_ptr + b * skv_b
    first_row = t + L - T - WINDOW + 1                  # kv row of position t0 + t - WINDOW + 1
    s = tl.zeros([HB, BN], dtype=tl.float32)            # S_{-1}: an empty block
    ok_cur = jn < 0
    p = tl.zeros([HB, BN], dtype=q_ptr.dtype.element_ty)
    alpha = tl.full([HB], 1.0, tl.float32)
    for j in range(-1, NB + 1):
        ptr, ok_prev = _block(j - 1, idx_row, ent_b, kv_b, first_row, S, se_s, se_c, skv_t, skv_c, si_k, jn, c,
                              TOPK, WINDOW, BN, NB_SEL)
        kv_prev = tl.load(ptr, mask=ok_prev[:, None] & c_ok[None, :], other=0.0)          # [BN, C_PAD]
        acc = tl.dot(p, kv_prev, acc * alpha[:, None], input_precision=DOT_PRECISION)   # waits: retires s
        logits = tl.where(ok_cur[None, :], s * qk_scale, float("-inf"))                  # last read of S_j
        ptr, ok_next = _block(j + 1, idx_row, ent_b, kv_b, first_row, S, se_s, se_c, skv_t, skv_c, si_k, jn, c,
                              TOPK, WINDOW, BN, NB_SEL)
        kv_next = tl.load(ptr, mask=ok_next[:, None] & c_ok[None, :], other=0.0)
        s = tl.dot(qb, tl.trans(kv_next), input_precision=DOT_PRECISION)                # in flight
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))                                 # overlaps it
        alpha = tl.exp2(m_i - m_new)
        p_f32 = tl.exp2(logits - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p_f32, axis=1)
        m_i = m_new
        p = p_f32.to(q_ptr.dtype.element_ty)
        ok_cur = ok_next
    _finish_heads(o_ptr, lse_ptr, acc, m_i, l_i, b, t, h, c, h_ok, c_ok, T, so_b, so_t, so_h, so_c, N_H)


def overlap_attention(q, kv, entries, entry_idx, sink, t0, window, scale, HB=64, BN=32, warps=8, stages=2):
    """o [B, T, n_h, c], lse [B, T, n_h] as csa_select._sparse_attention_triton returns them."""
    B, T, n_h, c = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, T, n_h, dtype=torch.float32, device=q.device)
    HB = min(HB, max(16, triton.next_power_of_2(n_h)))
    _overlap_kernel[(T, triton.cdiv(n_h, HB), B)](
        q, kv, entries, entry_idx, sink, o, lse, T, kv.shape[1], entries.shape[1], t0, scale * cs._LOG2E,
        *q.stride(), *kv.stride(), *entries.stride(), *entry_idx.stride(), *o.stride(),
        N_H=n_h, C=c, C_PAD=max(16, triton.next_power_of_2(c)), TOPK=entry_idx.shape[-1], WINDOW=window,
        HB=HB, BN=BN, DOT_PRECISION=cs._dot_precision(q.dtype), num_warps=warps, num_stages=stages)
    return o, lse


def inputs(B, T, n_h, c, S, topk, window, t0, L, device, dtype, seed=0):
    """Random inputs with empty (-1) selections, a query with none, windows starting before row 0."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, n_h, c, generator=g)
    kv = torch.randn(B, L, c, generator=g)
    entries = torch.randn(B, S, c, generator=g)
    idx = torch.stack([torch.randperm(S, generator=g)[:topk] for _ in range(B * T)]).view(B, T, topk).int()
    idx[torch.rand(B, T, topk, generator=g) < 0.2] = -1
    idx[0, 0] = -1
    sink = torch.randn(n_h, generator=g)
    to = dict(device=device)
    return (q.to(dtype=dtype, **to), kv.to(dtype=dtype, **to), entries.to(dtype=dtype, **to), idx.to(**to),
            sink.to(**to))


def check(device, dtype, cases, BN, bound):
    for case in cases:
        q, kv, entries, idx, sink = inputs(**case, device=device, dtype=dtype)
        scale = q.shape[-1] ** -0.5
        o, lse = overlap_attention(q, kv, entries, idx, sink, case["t0"], case["window"], scale, BN=BN)
        ro, rl = cs.sparse_attention_reference(q, kv, entries, idx, sink, case["t0"], case["window"], scale,
                                               return_lse=True)
        err = ((o.float() - ro.float()).norm() / ro.float().norm()).item()
        err_lse = (lse - rl).abs().max().item()
        verdict = "ok" if err < bound and err_lse < bound * 10 else "FAILED"
        print(f"check BN={BN} {case}: relative error {err:.1e}, lse {err_lse:.1e} -> {verdict}")
        if verdict != "ok":
            raise SystemExit("the overlap kernel differs from the reference")


def main():
    small = [dict(B=1, T=5, n_h=16, c=32, S=40, topk=16, window=8, t0=20, L=12),
             dict(B=1, T=5, n_h=16, c=32, S=40, topk=12, window=5, t0=2, L=6),
             dict(B=2, T=3, n_h=20, c=32, S=40, topk=24, window=16, t0=40, L=10)]
    if not torch.cuda.is_available():
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("needs a GPU, or TRITON_INTERPRET=1 for the correctness check on the CPU")
        for bn in (8, 16):
            check("cpu", torch.float32, small, bn, 1e-5)
        return
    from triton.testing import do_bench
    check("cuda", torch.float32, small, 16, 1e-4)
    N_H, C, TOPK, WINDOW, T, S = 64, 512, 512, 128, 4096, 16384              # V4-Flash CSA, as bench_csa_select
    q, kv, entries, idx, sink = inputs(1, T, N_H, C, S, TOPK, WINDOW, 4 * S, T + WINDOW - 1, "cuda", torch.bfloat16)
    scale, flops = C ** -0.5, 4 * T * N_H * C * (TOPK + WINDOW)
    ref = cs.sparse_attention(q, kv, entries, idx, sink, 4 * S, WINDOW)
    ms = do_bench(lambda: cs.sparse_attention(q, kv, entries, idx, sink, 4 * S, WINDOW), warmup=50, rep=300)
    print(f"kernels/csa_select.py: {flops / ms / 1e9:.0f} TFLOP/s ({cs._sparse_attention_tuned.best_config})")
    for bn, warps, stages in [(32, 8, 2), (16, 8, 2), (32, 8, 3), (16, 8, 3)]:
        try:
            o, _ = overlap_attention(q, kv, entries, idx, sink, 4 * S, WINDOW, scale, BN=bn, warps=warps, stages=stages)
            err = ((o.float() - ref.float()).norm() / ref.float().norm()).item()
            ms = do_bench(lambda: overlap_attention(q, kv, entries, idx, sink, 4 * S, WINDOW, scale, BN=bn,
                                                    warps=warps, stages=stages), warmup=50, rep=300)
            print(f"overlap BN={bn} warps={warps} stages={stages}: {flops / ms / 1e9:.0f} TFLOP/s "
                  f"(relative difference from the kernel {err:.1e})")
        except Exception as e:  # noqa: BLE001 -- a configuration this GPU cannot run
            print(f"overlap BN={bn} warps={warps} stages={stages}: failed ({type(e).__name__}: {str(e)[:120]})")


if __name__ == "__main__":
    main()
