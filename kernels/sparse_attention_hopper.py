"""CSA's sparse attention (kernels/csa_select.py, kernel 3) written in Gluon for Hopper (sm_90) with warp roles.

Same contract as `_sparse_attention_kernel` (read that one first): for each query t and head h,

    o[t, h] = sum_j p_j kv_j,   p_j = exp(l_j) / (sum_i exp(l_i) + exp(attn_sink[h])),   l_j = q_h . kv_j * scale

j over the entries entry_idx[t] selects (-1: none) and the window's rows, one K == V head shared by
all query heads; and the log-sum-exp (natural log, sink included).

Why a second version. V4's CSA shape is 64 query heads of dimension 512 against one 512-wide K == V
head: a program takes one query's 64 heads (the MMA's M) and blocks of 64 gathered rows. The `tl`
kernel reaches ~260 TFLOP/s on an H200 at this shape: every 64-row block is gathered, S = Q K^T
computed, the softmax run and P V accumulated one after the other, by all warps together, with two
shared-memory stages of [64, 512] beside the query's [64, 512] (64 + 128 KB: a third stage does not fit),
so the gather's latency and the MMAs' waits add up. Here each step has its own warps:

    loader    4 warps  gathers block j's 64 rows into stage j % 2 with cp.async (32 rows at a time:
                       few registers), once both warpgroups below have released the stage; signals
                       "ready". The first rows' index loads are issued before it waits for the stage.
    leader    4 warps  (one warpgroup) S = Q K^T for the whole block (an m64n64 wgmma over K = 512:
                       the query and the block are each read once from shared memory), the softmax on
                       whole rows (no cross-warpgroup maximum), P and the rescale factor alpha to shared
                       memory for the follower, then O[:, :256] += P V[:, :256] with P from registers,
                       and S of the next block issued behind it (asynchronous wgmma)
    follower  4 warps  O[:, 256:] *= alpha, O[:, 256:] += P V[:, 256:] with P from shared memory

The O accumulator [64, 512] fp32 is split by columns between the two warpgroups (128 registers a
thread each). `bench/exp_sparse_attention_gluon.py` holds the other schedules measured on the way
(both warpgroups computing halves of S, a loader with the same math schedule, split-K, P V overlapped
with the next S): this one was the fastest: 324-332 TFLOP/s against 259-268 for `tl` (RESULTS.md).

Limits (`supported` says which inputs qualify; kernels/csa_select.py uses the `tl` kernel for the rest):
CUDA capability 9.x, a Triton with Gluon's Hopper modules (written for 3.6), bf16, head dim 512, a head
count that is a multiple of 64, k and the window multiples of 64, unit-stride rows 16-byte aligned.
The CPU interpreter cannot run Gluon: this kernel is tested on the GPU (tests/test_csa_select.py).
"""

from __future__ import annotations

import torch

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.ampere import async_copy
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, warpgroup_mma,
                                                                  warpgroup_mma_wait)
    HAS_GLUON = True
except ImportError:  # an older Triton, or none: the `tl` kernel serves every shape
    HAS_GLUON = False

HEADS = 64            # query heads a program (the wgmma's M)
HEAD_DIM = 512        # c: V4's CSA head dimension
BN = 64               # gathered rows a block
CHUNK = 32            # rows the loader gathers at a time
LOADER_REGS, FOLLOWER_REGS = 96, 160      # registers a thread (the leader takes the rest: 256)
LOG2E = 1.4426950408889634                # the kernel's softmax runs in base 2


if HAS_GLUON:

    _LOG2E = gl.constexpr(LOG2E)                         # (kernels read globals only as constexprs)

    @gluon.jit
    def _rows(idx_row, t, blk, T, L, S, si_k, se_s, skv_t, N_SEL: gl.constexpr, WINDOW: gl.constexpr,
              BN: gl.constexpr, layout: gl.constexpr, R0: gl.constexpr, ROWS: gl.constexpr):
        """Rows R0 .. R0+ROWS-1 of block blk (1-D, `layout`): (their offset from their tensor's base,
        valid?, from the entries?). Blocks 0 .. N_SEL-1 are the selected entries, the rest the window:
        window slot w of query t is kv row t + L - T - WINDOW + 1 + w (the rows before the first are
        missing: not valid)."""
        j = R0 + gl.arange(0, ROWS, layout=layout)
        from_entries = blk < N_SEL
        sel = gl.load(idx_row + (blk * BN + j) * si_k, mask=(j >= 0) & from_entries, other=-1)
        w = (blk - N_SEL) * BN + j
        r = t + L - T - WINDOW + 1 + w
        ok = gl.where(from_entries, (sel >= 0) & (sel < S), (r >= 0) & (w < WINDOW))
        off = gl.where(from_entries, gl.where(ok, sel, 0).to(gl.int64) * se_s,
                       gl.where(ok, r, 0).to(gl.int64) * skv_t)
        return off, ok, from_entries

    @gluon.jit
    def _gather(dst, rows, ent_base, kv_base, C: gl.constexpr, layout: gl.constexpr):
        """Start copying rows [ROWS, C] into dst (cp.async, 16 bytes a copy; zeros where not valid)."""
        off, ok, from_entries = rows
        c = gl.arange(0, C, layout=gl.SliceLayout(0, layout))
        ptrs = gl.where(from_entries, ent_base, kv_base) + off[:, None] + c[None, :]
        async_copy.async_copy_global_to_shared(dst, ptrs, mask=ok[:, None])

    @gluon.jit
    def _loader(q_ptr, kv_ptr, ent_ptr, idx_ptr, q_smem, kv_bufs, ready, empty, T, L, S,
                sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k,
                C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr, CHUNK: gl.constexpr):
        t = gl.program_id(0).to(gl.int64)
        b = gl.program_id(1).to(gl.int64)
        ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[1, 32],
                                                   warps_per_cta=[4, 1], order=[1, 0])
        rows_g: gl.constexpr = gl.SliceLayout(1, ld_layout)
        c = gl.arange(0, C, layout=gl.SliceLayout(0, ld_layout))
        idx_row = idx_ptr + b * si_b + t * si_t
        ent_base = ent_ptr + b * se_b
        kv_base = kv_ptr + b * skv_b
        N_SEL: gl.constexpr = TOPK // BN
        n_blk: gl.constexpr = N_SEL + WINDOW // BN
        # the query's 64 heads, in the copy group of block 0
        for r0 in gl.static_range(0, 64, CHUNK):
            h = r0 + gl.arange(0, CHUNK, layout=rows_g)
            async_copy.async_copy_global_to_shared(q_smem.slice(r0, CHUNK),
                                                   q_ptr + b * sq_b + t * sq_t + h[:, None] * sq_h + c[None, :])
        for blk in range(n_blk):
            st = blk % 2
            # the first chunk's rows before the wait: their index loads' latency hides behind it
            rows = _rows(idx_row, t, blk, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, rows_g, 0, CHUNK)
            mbarrier.wait(empty.index(st), ((blk // 2) & 1) ^ 1)     # the first pass goes straight on
            _gather(kv_bufs.index(st).slice(0, CHUNK), rows, ent_base, kv_base, C, ld_layout)
            for r0 in gl.static_range(CHUNK, BN, CHUNK):
                rows = _rows(idx_row, t, blk, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, rows_g, r0, CHUNK)
                _gather(kv_bufs.index(st).slice(r0, CHUNK), rows, ent_base, kv_base, C, ld_layout)
            async_copy.commit_group()
            async_copy.wait_group(0)
            fence_async_shared()                                     # before the warpgroups' wgmma reads
            gl.thread_barrier()                                      # every loader thread's copies
            mbarrier.arrive(ready.index(st), count=1)

    @gluon.jit
    def _finish(o, l_i, o_ptr, b, t, so_b, so_t, so_h, o_layout: gl.constexpr, C0: gl.constexpr):
        """o / l into columns C0.. of o (bf16); l_i in the rows layout of o_layout."""
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        o = o / l_i[:, None]
        h = gl.arange(0, 64, layout=rows_o)
        c = C0 + gl.arange(0, o.shape[1], layout=gl.SliceLayout(0, o_layout))
        gl.store(o_ptr + b * so_b + t * so_t + h[:, None] * so_h + c[None, :], o.to(o_ptr.dtype.element_ty))

    @gluon.jit
    def _leader(idx_ptr, sink_ptr, o_ptr, lse_ptr, q_smem, kv_bufs, p_smem, a_smem, l_smem, ready, empty,
                pready, pfree, done, T, L, S, N_H, qk_scale, skv_t, se_s, si_b, si_t, si_k, so_b, so_t, so_h,
                C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr):
        CH: gl.constexpr = C // 2
        dtype: gl.constexpr = q_smem.dtype
        t = gl.program_id(0).to(gl.int64)
        b = gl.program_id(1).to(gl.int64)
        # S [64, BN]: the warpgroup's wgmma result, whole rows in each warp; O [64, C/2] likewise
        s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, BN, 16])
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, CH, 16])
        p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
        rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        idx_row = idx_ptr + b * si_b + t * si_t
        N_SEL: gl.constexpr = TOPK // BN
        n_blk: gl.constexpr = N_SEL + WINDOW // BN
        _, ok, _ = _rows(idx_row, t, 0, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, gl.SliceLayout(0, s_layout),
                         0, BN)
        # the online softmax (log2 units) starts at the sink: running max = sink, denominator 1
        m_i = gl.load(sink_ptr + gl.arange(0, 64, layout=rows_s)).to(gl.float32) * _LOG2E
        l_i = gl.full([64], 1.0, gl.float32, rows_s)
        o = gl.zeros([64, CH], gl.float32, o_layout)
        s = gl.zeros([64, BN], gl.float32, s_layout)
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_smem, kv_bufs.index(0).permute((1, 0)), s, use_acc=False)
        for blk in range(n_blk):
            st = blk % 2
            _, next_ok, _ = _rows(idx_row, t, blk + 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN,
                                  gl.SliceLayout(0, s_layout), 0, BN)
            s = gl.where(ok[None, :], s * qk_scale, float("-inf"))
            m_new = gl.maximum(m_i, gl.max(s, axis=1))
            alpha = gl.exp2(m_i - m_new)
            p = gl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + gl.sum(p, axis=1)
            m_i = m_new
            pb = p.to(dtype)
            # hand P and alpha over (the follower is done with this buffer's block blk - 2)
            mbarrier.wait(pfree.index(st), ((blk // 2) & 1) ^ 1)
            p_smem.index(st).store(pb)
            a_smem.index(st).store(alpha)
            fence_async_shared()
            mbarrier.arrive(pready.index(st), count=1)
            o = o * gl.convert_layout(alpha, rows_o)[:, None]
            o_tok = warpgroup_mma(gl.convert_layout(pb, p_layout), kv_bufs.index(st).slice(0, CH, dim=1), o,
                                  is_async=True)
            if blk + 1 < n_blk:
                # S of the next block behind this P V; wgmma groups retire in order
                mbarrier.wait(ready.index(1 - st), ((blk + 1) // 2) & 1)
                s_tok = warpgroup_mma(q_smem, kv_bufs.index(1 - st).permute((1, 0)), s, use_acc=False,
                                      is_async=True)
                o = warpgroup_mma_wait(1, deps=(o_tok, ))
                mbarrier.arrive(empty.index(st), count=1)
                s = warpgroup_mma_wait(0, deps=(s_tok, ))
            else:
                o = warpgroup_mma_wait(0, deps=(o_tok, ))
                mbarrier.arrive(empty.index(st), count=1)
            ok = next_ok
        l_smem.store(l_i)
        mbarrier.arrive(done, count=1)
        _finish(o, gl.convert_layout(l_i, rows_o), o_ptr, b, t, so_b, so_t, so_h, o_layout, 0)
        gl.store(lse_ptr + (b * T + t) * N_H + gl.arange(0, 64, layout=rows_s), (m_i + gl.log2(l_i)) / _LOG2E)

    @gluon.jit
    def _follower(o_ptr, kv_bufs, p_smem, a_smem, l_smem, empty, pready, pfree, done, so_b, so_t, so_h,
                  C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr):
        CH: gl.constexpr = C // 2
        t = gl.program_id(0).to(gl.int64)
        b = gl.program_id(1).to(gl.int64)
        o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                           instr_shape=[16, CH, 16])
        rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
        n_blk: gl.constexpr = TOPK // BN + WINDOW // BN
        o = gl.zeros([64, CH], gl.float32, o_layout)
        for blk in range(n_blk):
            st = blk % 2
            mbarrier.wait(pready.index(st), (blk // 2) & 1)
            o = o * a_smem.index(st).load(rows_o)[:, None]
            o = warpgroup_mma(p_smem.index(st), kv_bufs.index(st).slice(CH, CH, dim=1), o)
            mbarrier.arrive(pfree.index(st), count=1)
            mbarrier.arrive(empty.index(st), count=1)
        mbarrier.wait(done, 0)
        _finish(o, l_smem.load(rows_o), o_ptr, b, t, so_b, so_t, so_h, o_layout, CH)

    @gluon.jit
    def _sparse_attention_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr, T, L, S, N_H, qk_scale,
                                 sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k, so_b, so_t, so_h,
                                 C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr,
                                 CHUNK: gl.constexpr, LOADER_REGS: gl.constexpr, FOLLOWER_REGS: gl.constexpr,
                                 num_warps: gl.constexpr):
        dtype: gl.constexpr = q_ptr.dtype.element_ty
        q_smem = gl.allocate_shared_memory(dtype, [64, C], gl.NVMMASharedLayout.get_default_for([64, C], dtype))
        kv_bufs = gl.allocate_shared_memory(dtype, [2, BN, C], gl.NVMMASharedLayout.get_default_for([BN, C], dtype))
        p_smem = gl.allocate_shared_memory(dtype, [2, 64, BN], gl.NVMMASharedLayout.get_default_for([64, BN], dtype))
        vec: gl.constexpr = gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[0])
        a_smem = gl.allocate_shared_memory(gl.float32, [2, 64], vec)   # alpha per buffer (the layout of one)
        l_smem = gl.allocate_shared_memory(gl.float32, [64], vec)      # the final denominators
        ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # stage landed
        empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # stage released
        pready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())  # P, alpha written
        pfree = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())   # P, alpha read
        done = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())       # l written
        for i in gl.static_range(2):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=2)                   # the leader and the follower
            mbarrier.init(pready.index(i), count=1)
            mbarrier.init(pfree.index(i), count=1)
        mbarrier.init(done, count=1)
        # (the argument tuples are written out in the call: a tuple held in a variable turns its
        # constexprs into tensors)
        gl.warp_specialize([
            (_leader, (idx_ptr, sink_ptr, o_ptr, lse_ptr, q_smem, kv_bufs, p_smem, a_smem, l_smem, ready, empty,
                       pready, pfree, done, T, L, S, N_H, qk_scale, skv_t, se_s, si_b, si_t, si_k, so_b, so_t,
                       so_h, C, TOPK, WINDOW, BN)),
            (_follower, (o_ptr, kv_bufs, p_smem, a_smem, l_smem, empty, pready, pfree, done, so_b, so_t, so_h,
                         C, TOPK, WINDOW, BN)),
            (_loader, (q_ptr, kv_ptr, ent_ptr, idx_ptr, q_smem, kv_bufs, ready, empty, T, L, S,
                       sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k, C, TOPK, WINDOW, BN, CHUNK)),
        ], [4, 4], [FOLLOWER_REGS, LOADER_REGS])


def supported(q: torch.Tensor, kv: torch.Tensor, entries: torch.Tensor, entry_idx: torch.Tensor,
              window_size: int) -> bool:
    """Whether this kernel can run these inputs (else use the `tl` kernel)."""
    if not (HAS_GLUON and q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9):
        return False
    B, T, n_h, c = q.shape
    rows_ok = all(x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(s % 8 == 0 for s in x.stride()[:-1])
                  for x in (q, kv, entries))
    return (rows_ok and q.dtype == torch.bfloat16 and c == HEAD_DIM and n_h % HEADS == 0 and T > 0
            and entry_idx.shape[-1] % BN == 0 and window_size % BN == 0)


def launch(q, kv, entries, entry_idx, attn_sink, o, lse, window_size: int, scale: float) -> None:
    """Writes o [B, T, n_h, c] (bf16) and lse [B, T, n_h] (fp32, contiguous). Check `supported` first.
    One launch per group of 64 heads (V4-Flash has one, V4-Pro two), on views of q, o, the sink and lse:
    the group as a third grid axis made ptxas spill in the loader's loop, 296 against 324 TFLOP/s."""
    B, T, n_h, c = q.shape
    for h0 in range(0, n_h, HEADS):
        qg, og = q[:, :, h0:h0 + HEADS], o[:, :, h0:h0 + HEADS]
        _sparse_attention_kernel[(T, B)](
            qg, kv, entries, entry_idx, attn_sink[h0:h0 + HEADS], og, lse[:, :, h0:], T, kv.shape[1], entries.shape[1],
            n_h, scale * LOG2E, qg.stride(0), qg.stride(1), qg.stride(2), kv.stride(0), kv.stride(1),
            entries.stride(0), entries.stride(1), *entry_idx.stride(), og.stride(0), og.stride(1), og.stride(2),
            C=c, TOPK=entry_idx.shape[-1], WINDOW=window_size, BN=BN, CHUNK=CHUNK, LOADER_REGS=LOADER_REGS,
            FOLLOWER_REGS=FOLLOWER_REGS, num_warps=4)
