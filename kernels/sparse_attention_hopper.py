"""CSA's sparse attention (kernels/csa_select.py, kernel 3) written in Gluon for Hopper (sm_90).

Same contract as `_sparse_attention_kernel` there (read that one first): for each query t, its 64 heads
attend to the K == V rows it selected among the compressed entries plus its window of the last WINDOW
rows, one online softmax (log2 units) started at the attention sink; out o [B, T, 64, C] and the
log-sum-exp [B, T, 64].

Why a second version. With 64 heads the query block is one wgmma tall (M = 64), and in `tl` the 8 warps
of a program (two warpgroups) split the [64, C] output between them, so each needs all of the
probabilities P and both compute all of S = Q K^T: 1.5x the tensor-core work. Here the split is written
out: S [64, BN] is cut along its columns, each warpgroup computes S for its BN / 2 rows of the block
(warps_per_cta [4, 2]), the softmax's row maxima and sums are combined across the two, P goes through
shared memory, and each warpgroup multiplies all of P by its half of the C columns of V. No product is
computed twice.

Per program (one query, all 64 heads; 8 warps), blocks of BN gathered rows, two stages:
    q_smem  [64, C]         the query's heads, loaded once
    kv      [2, BN, C]      block j + 1 is gathered (cp.async, one 16-byte copy per thread and slot)
                            while block j is multiplied
    p_smem  [64, BN]        the block's probabilities in bf16, the A operand of P V
Shared memory at C = 512, BN = 64: 64 + 128 + 8 KB.

Limits (`supported`): Hopper, a Triton with Gluon (3.5+), 64 heads, C a multiple of 64 up to 512, bf16
or fp16, TOPK and WINDOW multiples of BN. The CPU interpreter cannot run Gluon: this kernel is tested on
the GPU (tests/test_csa_select.py, CUDA only) against `sparse_attention_reference`.
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, warpgroup_mma
    HAS_GLUON = True
except ImportError:  # an older Triton, or none: the `tl` kernel serves every shape
    HAS_GLUON = False

N_HEADS = 64
BN = 64                       # gathered rows per block: TOPK and WINDOW must be multiples


if HAS_GLUON:

    @gluon.jit
    def _block_rows(idx_ptr, ent_base, kv_base, t, blk, T, L, S, si_k, se_s, skv_t,
                    N_SEL: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr):
        """Block blk's BN rows (as `layout`, a 1-D slice layout): (offset of each row from its tensor's
        base pointer, valid?, from the entries?). Blocks 0 .. N_SEL-1 are the selected entries (-1 or
        out of range: invalid), the rest the window (rows before the cache's first: invalid)."""
        j = gl.arange(0, BN, layout=layout)
        from_entries = blk < N_SEL
        sel = gl.load(idx_ptr + (blk * BN + j) * si_k, mask=(j >= 0) & from_entries, other=-1)
        w = (blk - N_SEL) * BN + j                                  # window slot 0 .. WINDOW-1
        r = t + L - T - WINDOW + 1 + w                              # its kv row
        ok = gl.where(from_entries, (sel >= 0) & (sel < S), (r >= 0) & (w < WINDOW))
        off = gl.where(from_entries, gl.where(ok, sel, 0).to(gl.int64) * se_s,
                       gl.where(ok, r, 0).to(gl.int64) * skv_t)
        return off, ok, from_entries

    @gluon.jit
    def _gather(dst, rows, ent_base, kv_base, C: gl.constexpr, layout: gl.constexpr):
        """Start copying a block's rows [BN, C] into dst (cp.async; zeros for invalid rows). rows:
        `_block_rows` in the slice layout of `layout`, loaded an iteration earlier."""
        off, ok, from_entries = rows
        c = gl.arange(0, C, layout=gl.SliceLayout(0, layout))
        ptrs = gl.where(from_entries, ent_base, kv_base) + off[:, None] + c[None, :]           # [BN, C]
        async_copy.async_copy_global_to_shared(dst, ptrs, mask=ok[:, None])

    @gluon.jit
    def _sparse_attention_hopper_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr,
                                        T, L, S, qk_scale,
                                        sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s,
                                        si_b, si_t, si_k, so_b, so_t, so_h,
                                        C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr,
                                        BN: gl.constexpr, SUM_LATE: gl.constexpr, num_warps: gl.constexpr):
        gl.static_assert(num_warps == 8, "two warpgroups")
        H: gl.constexpr = 64
        dtype: gl.constexpr = q_ptr.dtype.element_ty
        t = gl.program_id(0).to(gl.int64)
        b = gl.program_id(1).to(gl.int64)
        # S [H, BN]: each warpgroup the columns of its BN / 2 rows; O [H, C]: each its C / 2 columns
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, BN // 2, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                           instr_shape=[16, C // 2, 16])
        # the gathers: 16 bytes (8 elements) a copy, a warp along a row
        ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[1, 32],
                                                   warps_per_cta=[8, 1], order=[1, 0])
        q_smem = gl.allocate_shared_memory(dtype, [H, C], gl.NVMMASharedLayout.get_default_for([H, C], dtype))
        kv_bufs = gl.allocate_shared_memory(dtype, [2, BN, C],
                                            gl.NVMMASharedLayout.get_default_for([BN, C], dtype))
        p_smem = gl.allocate_shared_memory(dtype, [H, BN], gl.NVMMASharedLayout.get_default_for([H, BN], dtype))

        idx_row = idx_ptr + b * si_b + t * si_t
        ent_base = ent_ptr + b * se_b
        kv_base = kv_ptr + b * skv_b
        N_SEL: gl.constexpr = TOPK // BN
        n_blk: gl.constexpr = N_SEL + WINDOW // BN
        # the query's heads and block 0, one copy group
        h = gl.arange(0, H, layout=gl.SliceLayout(1, ld_layout))
        c = gl.arange(0, C, layout=gl.SliceLayout(0, ld_layout))
        async_copy.async_copy_global_to_shared(q_smem, q_ptr + b * sq_b + t * sq_t + h[:, None] * sq_h
                                               + c[None, :])
        # the rows of each block are looked up (entry_idx read) an iteration before they are needed,
        # so that the index loads' latency never stalls the gathers or the masking
        gather_rows: gl.constexpr = gl.SliceLayout(1, ld_layout)
        cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
        _gather(kv_bufs.index(0), _block_rows(idx_row, ent_base, kv_base, t, 0, T, L, S, si_k, se_s, skv_t,
                                              N_SEL, WINDOW, BN, gather_rows), ent_base, kv_base, C, ld_layout)
        async_copy.commit_group()
        next_rows = _block_rows(idx_row, ent_base, kv_base, t, 1, T, L, S, si_k, se_s, skv_t,
                                N_SEL, WINDOW, BN, gather_rows)
        _, ok, _ = _block_rows(idx_row, ent_base, kv_base, t, 0, T, L, S, si_k, se_s, skv_t,
                               N_SEL, WINDOW, BN, cols_s)

        # online softmax in log2 units, started at the sink: max = sink, denominator exp(0) = 1
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        m_i = gl.load(sink_ptr + gl.arange(0, H, layout=rows_s)).to(gl.float32) * 1.4426950408889634
        l_i = gl.full([H], 1.0, gl.float32, rows_s)
        l_part = gl.zeros([H, BN], gl.float32, s_layout)      # SUM_LATE: each thread's share of the sums
        o = gl.zeros([H, C], gl.float32, o_layout)
        s_zero = gl.zeros([H, BN], gl.float32, s_layout)
        for blk in range(n_blk):
            # block blk has landed (every thread's copies) and both warpgroups are done with block
            # blk - 1, whose stage the next gather overwrites and whose P the next store overwrites
            async_copy.wait_group(0)
            fence_async_shared()                      # cp.async wrote through the generic proxy
            gl.thread_barrier()
            if blk + 1 < n_blk:
                _gather(kv_bufs.index((blk + 1) % 2), next_rows, ent_base, kv_base, C, ld_layout)
            async_copy.commit_group()
            next_rows = _block_rows(idx_row, ent_base, kv_base, t, blk + 2, T, L, S, si_k, se_s, skv_t,
                                    N_SEL, WINDOW, BN, gather_rows)
            _, next_ok, _ = _block_rows(idx_row, ent_base, kv_base, t, blk + 1, T, L, S, si_k, se_s, skv_t,
                                        N_SEL, WINDOW, BN, cols_s)
            kv = kv_bufs.index(blk % 2)                                                   # [BN, C]
            s = warpgroup_mma(q_smem, kv.permute((1, 0)), s_zero, use_acc=False)          # [H, BN]
            s = gl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))                  # both halves' rows combined
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            if SUM_LATE:
                l_i = l_i * alpha
                l_part = l_part * alpha[:, None] + p
            else:
                l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()                                          # all of P is written
            o = o * gl.convert_layout(alpha, rows_o)[:, None]
            o = warpgroup_mma(p_smem, kv, o)                                              # [H, C]
            ok = next_ok
        async_copy.wait_group(0)
        if SUM_LATE:
            l_i += gl.sum(l_part, axis=1)
        o = o / gl.convert_layout(l_i, rows_o)[:, None]
        ho = gl.arange(0, H, layout=rows_o)
        co = gl.arange(0, C, layout=gl.SliceLayout(0, o_layout))
        gl.store(o_ptr + b * so_b + t * so_t + ho[:, None] * so_h + co[None, :], o.to(dtype))
        hs = gl.arange(0, H, layout=rows_s)
        gl.store(lse_ptr + (b * T + t) * H + hs, (m_i + gl.log2(l_i)) * 0.6931471805599453)


def supported(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor, entry_idx: torch.Tensor,
              window_size: int) -> bool:
    """Whether this kernel can run these operands (else use the `tl` kernel)."""
    if not (HAS_GLUON and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    B, T, n_h, c = q.shape
    return (n_h == N_HEADS and c % 64 == 0 and c <= 512 and q.dtype in (torch.bfloat16, torch.float16)
            and kv.dtype == q.dtype and entries.dtype == q.dtype and entry_idx.shape[-1] % BN == 0
            and window_size % BN == 0 and all(x.stride(-1) == 1 for x in (q, kv, entries))
            and all(x.data_ptr() % 16 == 0 for x in (q, kv, entries))
            and all(s % 8 == 0 for x in (q, kv, entries) for s in x.stride()[:-1]))


def launch(q, kv, entries, entry_idx, attn_sink, t0: int, window_size: int, qk_scale: float, o, lse,
           sum_late: bool = True, bn: int = BN):
    """o [B, T, 64, C] and lse [B, T, 64] (written); qk_scale in log2 units (scale * log2 e). Check
    `supported` first. (t0 is not needed: positions enter only through kv's last T rows.)"""
    B, T, n_h, c = q.shape
    _sparse_attention_hopper_kernel[(T, B)](
        q, kv, entries, entry_idx, attn_sink, o, lse, T, kv.shape[1], entries.shape[1], qk_scale,
        q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), entries.stride(0), entries.stride(1),
        *entry_idx.stride(), o.stride(0), o.stride(1), o.stride(2),
        C=c, TOPK=entry_idx.shape[-1], WINDOW=window_size, BN=bn, SUM_LATE=sum_late, num_warps=8)
    return o, lse
