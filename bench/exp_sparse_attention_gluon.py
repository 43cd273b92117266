"""Experiment (sixth and seventh sessions, measured on an H200): CSA's sparse attention in Gluon.

Outcome. The "lead" schedule (322-331 TFLOP/s against 258-269 for `tl`) won and lives in
kernels/sparse_attention_hopper.py; every schedule's figures are in RESULTS.md (issue 10, seventh
session). This file stays as the record of what was measured and how, and to rerun it.

Why. The `tl` kernel (kernels/csa_select.py, kernel 3) stops at 259-268 TFLOP/s on an H200 against the
320 of issue 10. The sixth session measured a first Gluon version (git 57f963f): S = Q K^T split by
columns between the two warpgroups (no product computed twice, unlike `tl`), at 243-254 TFLOP/s. Both
spend about 8000 clocks a 64-row block where their tensor-core work is 2500-3000: something else holds
them, and this file is built to find out what, and to try the schedule that would hide it.

Per program: one query (b, t), its 64 heads, C = 512; blocks of BN = 64 gathered K == V rows (TOPK / BN
selected entries, then WINDOW / BN window blocks); two shared-memory stages of [BN, C] beside the query's
[64, C] (64 + 128 KB: a third stage does not fit, which is what constrains every schedule here).
    S layout  warps [4, 2]: each warpgroup the [64, BN/2] columns of its rows (an m64n32 wgmma)
    O layout  warps [4, 2]: each warpgroup its [64, C/2] columns, all of P from shared memory

MODE "sync"     (the measured version): per block a barrier, the next block's gather issued, S, the
                softmax (the row maximum combined across the warpgroups), P to shared memory, a barrier,
                P V; each MMA waited for at once.
MODE "overlap"  P V of block j is left in flight while block j+1 is awaited and its S issued, so the two
                MMAs run back to back; the gather of block j+2 starts once both warpgroups are done with
                block j (its stage), one block later than "sync" issues it.
MODE "ws"       warp roles (`attention_ws`): a loader partition of 4 warps gathers each block, CHUNK rows
                at a time (24 registers a thread: the consumers keep 240), once the consumers have
                released its stage (mbarrier "empty"), and signals it ("ready"); the two consumer
                warpgroups run the "sync" schedule without a copy or a CTA-wide wait on copies.
MODE "splitk"   (`attention_splitk`) each consumer warpgroup owns half of the 512 columns end to end: its
                partial S over its half of Q and K (a full m64n64 tile, K = 256), the partials swapped
                through shared memory with mbarriers, the softmax on the whole S done by both (no
                cross-warpgroup reduction), P kept in registers as the A operand of P V[:, its half];
                the "ws" loader. 224 KB of shared memory.
MODE "pipe"     "ws" with the consumers issuing the next block's S before this block's P V, so the
                softmax of block j + 1 runs while P V(j) is on the tensor cores (needs block j + 1 a
                step earlier: with two stages the gathers then stall it).
MODE "lead"     now kernels/sparse_attention_hopper.py (read its docstring): a leader warpgroup computes
                all of S, the softmax on whole rows and P V for half the columns; a follower the other
                half; the "ws" loader. Timed here from there. Its variants (chunks of 8 / 16 / 32 / 64
                rows, the indices prefetched into L1, without gathers) were measured with this file at
                git 4783277 (RESULTS.md).
Diagnostics (MODE "sync"): NO_MMA skips both MMAs (S stays zero, O unchanged): the gathers, barriers and
softmax alone. NO_GATHER gathers blocks 0 and 1 once and reuses them: the MMAs, barriers and softmax
alone. Their times against the full kernel's say whether the gather (its latency with two stages) or
the MMAs and their waits set the pace.

    python bench/exp_sparse_attention_gluon.py      # checks against the reference, then times every variant

Offline compile for sm_90 with Triton 3.6 (sixth session): "sync", "overlap" and the diagnostics without
spills (255 / 255 / 237 / 240 registers), "ws" with the consumers at 240 and 68 bytes spilled by the
loader (its loop-invariant values, stored once), "splitk" without spills (240 / 240 / 24 registers for
the two math warpgroups and the loader, 229,688 bytes of shared memory), no ptxas wgmma serialisation
warning.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from triton.experimental import gluon  # noqa: E402
from triton.experimental.gluon import language as gl  # noqa: E402
from triton.experimental.gluon.language.nvidia.ampere import async_copy  # noqa: E402
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier,  # noqa: E402
                                                              warpgroup_mma, warpgroup_mma_wait)

# the row lookup, the gather and the loader partition are the kernel's (kernels/sparse_attention_hopper.py)
from kernels.sparse_attention_hopper import _gather, _loader as _ws_loader, _rows  # noqa: E402

N_H, C, WINDOW, TOPK, BN = 64, 512, 128, 512, 64
LOG2E = 1.4426950408889634
LOG2E_C = gl.constexpr(LOG2E)                    # (kernels read globals only as constexprs)


@gluon.jit
def _block_rows(idx_ptr, t, blk, T, L, S, si_k, se_s, skv_t,
                N_SEL: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr, layout: gl.constexpr):
    """All BN rows of block blk, as `_rows`."""
    return _rows(idx_ptr, t, blk, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, layout, 0, BN)


@gluon.jit
def _softmax_step(s, ok, m_i, l_i, l_part, qk_scale):
    """One online-softmax step (log2 units) over S [64, BN]; the sums stay per thread until the end."""
    s = gl.where(ok[None, :], s * qk_scale, float("-inf"))
    m_new = gl.maximum(m_i, gl.max(s, axis=1))                  # the two warpgroups' halves combined
    alpha = gl.exp2(m_i - m_new)
    p = gl.exp2(s - m_new[:, None])
    return p, alpha, m_new, l_i * alpha, l_part * alpha[:, None] + p


@gluon.jit
def _finish(o, m_i, l_i, o_ptr, lse_ptr, b, t, T, so_b, so_t, so_h, o_layout: gl.constexpr,
            rows_s: gl.constexpr, C0: gl.constexpr, STORE_LSE: gl.constexpr):
    """o / l into columns C0.. of o [B, T, 64, C] (bf16), and (STORE_LSE) the log-sum-exp, natural log."""
    H: gl.constexpr = 64
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    o = o / gl.convert_layout(l_i, rows_o)[:, None]
    ho = gl.arange(0, H, layout=rows_o)
    co = C0 + gl.arange(0, o.shape[1], layout=gl.SliceLayout(0, o_layout))
    gl.store(o_ptr + b * so_b + t * so_t + ho[:, None] * so_h + co[None, :], o.to(o_ptr.dtype.element_ty))
    if STORE_LSE:
        gl.store(lse_ptr + (b * T + t) * H + gl.arange(0, H, layout=rows_s), (m_i + gl.log2(l_i)) / LOG2E_C)


@gluon.jit
def _attn_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr, T, L, S, qk_scale,
                 sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k, so_b, so_t, so_h,
                 C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr,
                 OVERLAP: gl.constexpr, NO_MMA: gl.constexpr, NO_GATHER: gl.constexpr,
                 num_warps: gl.constexpr):
    H: gl.constexpr = 64
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    t = gl.program_id(0).to(gl.int64)
    b = gl.program_id(1).to(gl.int64)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BN // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, C // 2, 16])
    ld_layout: gl.constexpr = gl.BlockedLayout(size_per_thread=[1, 8], threads_per_warp=[1, 32],
                                               warps_per_cta=[8, 1], order=[1, 0])
    rows_g: gl.constexpr = gl.SliceLayout(1, ld_layout)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    q_smem = gl.allocate_shared_memory(dtype, [H, C], gl.NVMMASharedLayout.get_default_for([H, C], dtype))
    kv_bufs = gl.allocate_shared_memory(dtype, [2, BN, C], gl.NVMMASharedLayout.get_default_for([BN, C], dtype))
    p_smem = gl.allocate_shared_memory(dtype, [H, BN], gl.NVMMASharedLayout.get_default_for([H, BN], dtype))
    idx_row = idx_ptr + b * si_b + t * si_t
    ent_base = ent_ptr + b * se_b
    kv_base = kv_ptr + b * skv_b
    N_SEL: gl.constexpr = TOPK // BN
    n_blk: gl.constexpr = N_SEL + WINDOW // BN

    # the query and blocks 0 and 1, two copy groups
    h = gl.arange(0, H, layout=rows_g)
    c = gl.arange(0, C, layout=gl.SliceLayout(0, ld_layout))
    async_copy.async_copy_global_to_shared(q_smem, q_ptr + b * sq_b + t * sq_t + h[:, None] * sq_h + c[None, :])
    _gather(kv_bufs.index(0), _block_rows(idx_row, t, 0, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, rows_g),
            ent_base, kv_base, C, ld_layout)
    async_copy.commit_group()
    _gather(kv_bufs.index(1), _block_rows(idx_row, t, 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, rows_g),
            ent_base, kv_base, C, ld_layout)
    async_copy.commit_group()
    next_rows = _block_rows(idx_row, t, 2, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, rows_g)
    _, ok, _ = _block_rows(idx_row, t, 0, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)

    m_i = gl.load(sink_ptr + gl.arange(0, H, layout=rows_s)).to(gl.float32) * LOG2E_C   # the sink
    l_i = gl.full([H], 1.0, gl.float32, rows_s)
    l_part = gl.zeros([H, BN], gl.float32, s_layout)
    o = gl.zeros([H, C], gl.float32, o_layout)
    s = gl.zeros([H, BN], gl.float32, s_layout)

    if OVERLAP:
        async_copy.wait_group(1)                                     # the query and block 0
        fence_async_shared()
        gl.thread_barrier()
        s = warpgroup_mma(q_smem, kv_bufs.index(0).permute((1, 0)), s, use_acc=False)
        for blk in range(n_blk):
            _, next_ok, _ = _block_rows(idx_row, t, blk + 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
            p, alpha, m_i, l_i, l_part = _softmax_step(s, ok, m_i, l_i, l_part, qk_scale)
            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()                                      # all of P is written
            o = o * gl.convert_layout(alpha, rows_o)[:, None]
            o_tok = warpgroup_mma(p_smem, kv_bufs.index(blk % 2), o, is_async=True)
            if blk + 1 < n_blk:
                async_copy.wait_group(0)                             # block blk + 1 has landed
                fence_async_shared()
                gl.thread_barrier()
                s_tok = warpgroup_mma(q_smem, kv_bufs.index((blk + 1) % 2).permute((1, 0)), s, use_acc=False,
                                      is_async=True)
                o, s = warpgroup_mma_wait(0, deps=(o_tok, s_tok))
                gl.thread_barrier()                                  # both are done with stage blk % 2
                if blk + 2 < n_blk:
                    _gather(kv_bufs.index(blk % 2), next_rows, ent_base, kv_base, C, ld_layout)
                async_copy.commit_group()
                next_rows = _block_rows(idx_row, t, blk + 3, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN,
                                        rows_g)
            else:
                o = warpgroup_mma_wait(0, deps=(o_tok, ))
            ok = next_ok
    else:
        for blk in range(n_blk):
            # block blk has landed and both warpgroups are done with block blk - 1
            if blk == 0:
                async_copy.wait_group(1)
            else:
                async_copy.wait_group(0)
            fence_async_shared()
            gl.thread_barrier()
            if not NO_GATHER:
                if (blk >= 1) & (blk + 1 < n_blk):
                    _gather(kv_bufs.index((blk + 1) % 2), next_rows, ent_base, kv_base, C, ld_layout)
            if blk >= 1:
                async_copy.commit_group()
                next_rows = _block_rows(idx_row, t, blk + 2, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN,
                                        rows_g)
            _, next_ok, _ = _block_rows(idx_row, t, blk + 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
            kv = kv_bufs.index(blk % 2)
            if not NO_MMA:
                s = warpgroup_mma(q_smem, kv.permute((1, 0)), s, use_acc=False)
            p, alpha, m_i, l_i, l_part = _softmax_step(s, ok, m_i, l_i, l_part, qk_scale)
            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()
            o = o * gl.convert_layout(alpha, rows_o)[:, None]
            if not NO_MMA:
                o = warpgroup_mma(p_smem, kv, o)
            ok = next_ok
    async_copy.wait_group(0)

    l_i += gl.sum(l_part, axis=1)
    _finish(o, m_i, l_i, o_ptr, lse_ptr, b, t, T, so_b, so_t, so_h, o_layout, rows_s, 0, True)



# MODE "ws": warp roles. A loader partition (4 warps) gathers each block into its stage once
# the consumers have released it, and signals it with an mbarrier; the two consumer warpgroups (the
# default partition) never issue a copy or wait on a copy group: per block they wait for "ready", run
# the "sync" schedule, and release the stage ("empty") after its P V.

@gluon.jit
def _ws_consumer(idx_ptr, sink_ptr, o_ptr, lse_ptr, q_smem, kv_bufs, p_smem, ready, empty, T, L, S, qk_scale,
                 skv_t, se_s, si_b, si_t, si_k, so_b, so_t, so_h,
                 C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr, PIPE: gl.constexpr):
    H: gl.constexpr = 64
    dtype: gl.constexpr = p_smem.dtype
    t = gl.program_id(0).to(gl.int64)
    b = gl.program_id(1).to(gl.int64)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, BN // 2, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 2],
                                                       instr_shape=[16, C // 2, 16])
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    idx_row = idx_ptr + b * si_b + t * si_t
    N_SEL: gl.constexpr = TOPK // BN
    n_blk: gl.constexpr = N_SEL + WINDOW // BN
    _, ok, _ = _block_rows(idx_row, t, 0, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
    m_i = gl.load(sink_ptr + gl.arange(0, H, layout=rows_s)).to(gl.float32) * LOG2E_C
    l_i = gl.full([H], 1.0, gl.float32, rows_s)
    l_part = gl.zeros([H, BN], gl.float32, s_layout)
    o = gl.zeros([H, C], gl.float32, o_layout)
    s = gl.zeros([H, BN], gl.float32, s_layout)
    if PIPE:
        # S(blk + 1) is issued before P V(blk) and waited for alone (wgmma groups retire in order), so the
        # softmax of block blk + 1 runs while P V(blk) is still on the tensor cores.
        mbarrier.wait(ready.index(0), 0)
        s = warpgroup_mma(q_smem, kv_bufs.index(0).permute((1, 0)), s, use_acc=False)
        # block 0 (peeled: the loop carries P V's accumulator token from it)
        _, next_ok, _ = _block_rows(idx_row, t, 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
        p, alpha, m_i, l_i, l_part = _softmax_step(s, ok, m_i, l_i, l_part, qk_scale)
        p_smem.store(p.to(dtype))
        fence_async_shared()
        gl.thread_barrier()
        mbarrier.wait(ready.index(1), 0)
        s_tok = warpgroup_mma(q_smem, kv_bufs.index(1).permute((1, 0)), s, use_acc=False, is_async=True)
        o_tok = warpgroup_mma(p_smem, kv_bufs.index(0), o, use_acc=False, is_async=True)
        s = warpgroup_mma_wait(1, deps=(s_tok, ))
        ok = next_ok
        for blk in range(1, n_blk):
            st = blk % 2
            _, next_ok, _ = _block_rows(idx_row, t, blk + 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
            p, alpha, m_i, l_i, l_part = _softmax_step(s, ok, m_i, l_i, l_part, qk_scale)   # beside P V(blk - 1)
            o = warpgroup_mma_wait(0, deps=(o_tok, ))
            mbarrier.arrive(empty.index(1 - st), count=1)            # block blk - 1 is done with
            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()                                      # all of P
            o = o * gl.convert_layout(alpha, rows_o)[:, None]
            if blk + 1 < n_blk:
                mbarrier.wait(ready.index(1 - st), ((blk + 1) // 2) & 1)
                s_tok = warpgroup_mma(q_smem, kv_bufs.index(1 - st).permute((1, 0)), s, use_acc=False,
                                      is_async=True)
                o_tok = warpgroup_mma(p_smem, kv_bufs.index(st), o, is_async=True)
                s = warpgroup_mma_wait(1, deps=(s_tok, ))
            else:
                o_tok = warpgroup_mma(p_smem, kv_bufs.index(st), o, is_async=True)
            ok = next_ok
        o = warpgroup_mma_wait(0, deps=(o_tok, ))
    else:
        for blk in range(n_blk):
            st = blk % 2
            _, next_ok, _ = _block_rows(idx_row, t, blk + 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
            mbarrier.wait(ready.index(st), (blk // 2) & 1)
            kv = kv_bufs.index(st)
            s = warpgroup_mma(q_smem, kv.permute((1, 0)), s, use_acc=False)
            p, alpha, m_i, l_i, l_part = _softmax_step(s, ok, m_i, l_i, l_part, qk_scale)
            p_smem.store(p.to(dtype))
            fence_async_shared()
            gl.thread_barrier()                                      # all of P (and the last P V's reads)
            o = o * gl.convert_layout(alpha, rows_o)[:, None]
            o = warpgroup_mma(p_smem, kv, o)
            mbarrier.arrive(empty.index(st), count=1)                # both warpgroups are done with it
            ok = next_ok
    l_i += gl.sum(l_part, axis=1)
    _finish(o, m_i, l_i, o_ptr, lse_ptr, b, t, T, so_b, so_t, so_h, o_layout, rows_s, 0, True)


@gluon.jit
def _attn_ws_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr, T, L, S, qk_scale,
                    sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k, so_b, so_t, so_h,
                    C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr,
                    LOADER_REGS: gl.constexpr, CHUNK: gl.constexpr,
                    PIPE: gl.constexpr, num_warps: gl.constexpr):
    H: gl.constexpr = 64
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_smem = gl.allocate_shared_memory(dtype, [H, C], gl.NVMMASharedLayout.get_default_for([H, C], dtype))
    kv_bufs = gl.allocate_shared_memory(dtype, [2, BN, C], gl.NVMMASharedLayout.get_default_for([BN, C], dtype))
    p_smem = gl.allocate_shared_memory(dtype, [H, BN], gl.NVMMASharedLayout.get_default_for([H, BN], dtype))
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    gl.warp_specialize([
        (_ws_consumer, (idx_ptr, sink_ptr, o_ptr, lse_ptr, q_smem, kv_bufs, p_smem, ready, empty, T, L, S, qk_scale,
                        skv_t, se_s, si_b, si_t, si_k, so_b, so_t, so_h, C, TOPK, WINDOW, BN, PIPE)),
        (_ws_loader, (q_ptr, kv_ptr, ent_ptr, idx_ptr, q_smem, kv_bufs, ready, empty, T, L, S,
                      sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k, C, TOPK, WINDOW, BN,
                      CHUNK)),
    ], [4], [LOADER_REGS])


def _launch(kernel, q, kv, entries, idx, sink, num_warps, **meta):
    """o [1, T, 64, C], lse [1, T, 64] for the bench's inputs (window WINDOW, all positions visible)."""
    B, T, n_h, c = q.shape
    o = torch.empty_like(q)
    lse = torch.empty(B, T, n_h, device=q.device)
    kernel[(T, B)](q, kv, entries, idx, sink, o, lse, T, kv.shape[1], entries.shape[1], c ** -0.5 * LOG2E,
                   q.stride(0), q.stride(1), q.stride(2), kv.stride(0), kv.stride(1), entries.stride(0),
                   entries.stride(1), *idx.stride(), o.stride(0), o.stride(1), o.stride(2),
                   C=c, TOPK=idx.shape[-1], WINDOW=WINDOW, BN=BN, num_warps=num_warps, **meta)
    return o, lse


def attention_ws(q, kv, entries, idx, sink, loader_regs=24, chunk=8, pipe=False):
    """MODE "ws" (warp roles: a 4-warp loader); pipe=True is MODE "pipe"."""
    return _launch(_attn_ws_kernel, q, kv, entries, idx, sink, 8, LOADER_REGS=loader_regs, CHUNK=chunk, PIPE=pipe)


# MODE "splitk": each consumer warpgroup owns one half of the C = 512 columns end to end. Warpgroup g
# computes the partial S_g = Q[:, half g] K[:, half g]^T (a full [64, BN] tile, m64n64 with K = 256:
# half of Q and of K read from shared memory, against all of Q for half the columns in "sync"), the two
# partials are exchanged through shared memory (16 KB each, an mbarrier each way), both add them and run
# the same softmax on the same S (no cross-warpgroup max or sum: the rows are the warpgroup's own), and
# P stays in registers as the A operand of P V[:, half g]. A warpgroup only ever reads its half of Q
# and of each stage. Shared memory: 64 + 128 + 32 KB, of the H200's 227.

@gluon.jit
def _sk_math(idx_ptr, sink_ptr, o_ptr, lse_ptr, q_smem, kv_bufs, xbuf, ready, empty, xready, xfree,
             T, L, S, qk_scale, skv_t, se_s, si_b, si_t, si_k, so_b, so_t, so_h,
             C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr, HALF: gl.constexpr):
    H: gl.constexpr = 64
    CH: gl.constexpr = C // 2
    dtype: gl.constexpr = q_smem.dtype
    t = gl.program_id(0).to(gl.int64)
    b = gl.program_id(1).to(gl.int64)
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, BN, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                       instr_shape=[16, CH, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    cols_s: gl.constexpr = gl.SliceLayout(0, s_layout)
    rows_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    rows_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    idx_row = idx_ptr + b * si_b + t * si_t
    N_SEL: gl.constexpr = TOPK // BN
    n_blk: gl.constexpr = N_SEL + WINDOW // BN
    START: gl.constexpr = HALF * CH
    q_half = q_smem.slice(START, CH, dim=1)                                      # [H, C/2]
    _, ok, _ = _block_rows(idx_row, t, 0, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
    m_i = gl.load(sink_ptr + gl.arange(0, H, layout=rows_s)).to(gl.float32) * LOG2E_C
    l_i = gl.full([H], 1.0, gl.float32, rows_s)
    o = gl.zeros([H, CH], gl.float32, o_layout)
    s = gl.zeros([H, BN], gl.float32, s_layout)
    for blk in range(n_blk):
        st = blk % 2
        _, next_ok, _ = _block_rows(idx_row, t, blk + 1, T, L, S, si_k, se_s, skv_t, N_SEL, WINDOW, BN, cols_s)
        mbarrier.wait(ready.index(st), (blk // 2) & 1)
        kv_half = kv_bufs.index(st).slice(HALF * CH, CH, dim=1)                 # [BN, C/2]
        s = warpgroup_mma(q_half, kv_half.permute((1, 0)), s, use_acc=False)    # this half's partial S
        # hand the partial over: our buffer must have been read by the other (block blk - 1) first
        mbarrier.wait(xfree.index(HALF), (blk & 1) ^ 1)
        xbuf.index(HALF).store(s)
        mbarrier.arrive(xready.index(HALF), count=1)
        mbarrier.wait(xready.index(1 - HALF), blk & 1)
        s = s + xbuf.index(1 - HALF).load(s_layout)                               # the whole S
        mbarrier.arrive(xfree.index(1 - HALF), count=1)
        s = gl.where(ok[None, :], s * qk_scale, float("-inf"))
        m_new = gl.maximum(m_i, gl.max(s, axis=1))
        alpha = gl.exp2(m_i - m_new)
        p = gl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + gl.sum(p, axis=1)
        m_i = m_new
        o = o * gl.convert_layout(alpha, rows_o)[:, None]
        o = warpgroup_mma(gl.convert_layout(p.to(dtype), p_layout), kv_half, o)  # P from registers
        mbarrier.arrive(empty.index(st), count=1)
        ok = next_ok
    _finish(o, m_i, l_i, o_ptr, lse_ptr, b, t, T, so_b, so_t, so_h, o_layout, rows_s, START, HALF == 0)


@gluon.jit
def _attn_sk_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr, T, L, S, qk_scale,
                    sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k, so_b, so_t, so_h,
                    C: gl.constexpr, TOPK: gl.constexpr, WINDOW: gl.constexpr, BN: gl.constexpr,
                    CHUNK: gl.constexpr, num_warps: gl.constexpr):
    H: gl.constexpr = 64
    dtype: gl.constexpr = q_ptr.dtype.element_ty
    q_smem = gl.allocate_shared_memory(dtype, [H, C], gl.NVMMASharedLayout.get_default_for([H, C], dtype))
    kv_bufs = gl.allocate_shared_memory(dtype, [2, BN, C], gl.NVMMASharedLayout.get_default_for([BN, C], dtype))
    xbuf = gl.allocate_shared_memory(gl.float32, [2, H, BN],
                                     gl.SwizzledSharedLayout(vec=1, per_phase=1, max_phase=1, order=[1, 0]))
    ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    xready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    xfree = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(2):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)                       # both math warpgroups
        mbarrier.init(xready.index(i), count=1)
        mbarrier.init(xfree.index(i), count=1)
    # (the argument tuples are written out in the call: a tuple held in a variable turns its constexprs
    # into tensors)
    gl.warp_specialize([
        (_sk_math, (idx_ptr, sink_ptr, o_ptr, lse_ptr, q_smem, kv_bufs, xbuf, ready, empty, xready, xfree,
                    T, L, S, qk_scale, skv_t, se_s, si_b, si_t, si_k, so_b, so_t, so_h, C, TOPK, WINDOW, BN, 0)),
        (_sk_math, (idx_ptr, sink_ptr, o_ptr, lse_ptr, q_smem, kv_bufs, xbuf, ready, empty, xready, xfree,
                    T, L, S, qk_scale, skv_t, se_s, si_b, si_t, si_k, so_b, so_t, so_h, C, TOPK, WINDOW, BN, 1)),
        (_ws_loader, (q_ptr, kv_ptr, ent_ptr, idx_ptr, q_smem, kv_bufs, ready, empty, T, L, S,
                      sq_b, sq_t, sq_h, skv_b, skv_t, se_b, se_s, si_b, si_t, si_k, C, TOPK, WINDOW, BN,
                      CHUNK)),
    ], [4, 4], [240, 24])


def attention_splitk(q, kv, entries, idx, sink, chunk=8):
    """MODE "splitk"."""
    return _launch(_attn_sk_kernel, q, kv, entries, idx, sink, 4, CHUNK=chunk)


def attention(q, kv, entries, idx, sink, overlap=False, no_mma=False, no_gather=False):
    """MODES "sync" and "overlap", and the diagnostics."""
    return _launch(_attn_kernel, q, kv, entries, idx, sink, 8, OVERLAP=overlap, NO_MMA=no_mma,
                   NO_GATHER=no_gather)


def inputs(T, S, L, seed=0, holes=False):
    g = torch.Generator(device="cuda").manual_seed(seed)
    q = torch.randn(1, T, N_H, C, device="cuda", generator=g).bfloat16()
    kv = torch.randn(1, L, C, device="cuda", generator=g).bfloat16()
    entries = torch.randn(1, S, C, device="cuda", generator=g).bfloat16()
    idx = torch.stack([torch.randperm(S, device="cuda", generator=g)[:TOPK] for _ in range(T)])[None].int()
    if holes:
        idx[..., ::7] = -1
    return q, kv, entries, idx, torch.randn(N_H, device="cuda", generator=g)


def main():
    from triton.testing import do_bench

    from kernels import csa_select as cs
    print(f"{torch.cuda.get_device_name()} | torch {torch.__version__}")
    from kernels import sparse_attention_hopper as sah

    def promoted(q, kv, entries, idx, sink):
        o, lse = torch.empty_like(q), torch.empty(q.shape[:3], device=q.device)
        sah.launch(q, kv, entries, idx, sink, o, lse, WINDOW, C ** -0.5)
        return o, lse

    for T, S, L, holes in [(64, 1000, 64 + WINDOW - 1, False), (100, 2000, 100, True), (256, 16384, 256 + WINDOW - 1, True)]:
        q, kv, entries, idx, sink = inputs(T, S, L, holes=holes)
        want_o, want_lse = cs.sparse_attention_reference(q, kv, entries, idx, sink, 10 ** 6, WINDOW, return_lse=True)
        for name, run in (("sync", attention), ("overlap", lambda *a: attention(*a, overlap=True)),
                          ("ws", attention_ws), ("pipe", lambda *a: attention_ws(*a, pipe=True, loader_regs=32)),
                          ("splitk", attention_splitk), ("lead (kernels/sparse_attention_hopper.py)", promoted)):
            o, lse = run(q, kv, entries, idx, sink)
            err_o = ((o.float() - want_o.float()).norm() / want_o.float().norm()).item()
            err_lse = (lse - want_lse).abs().max().item()
            verdict = "ok" if err_o < 1e-2 and err_lse < 1e-2 else "FAILED"
            print(f"check T={T} S={S} L={L} holes={holes} {name}: o {err_o:.2e}, lse {err_lse:.2e} -> {verdict}",
                  flush=True)
    variants = [("sync", attention, {}), ("overlap", attention, dict(overlap=True)),
                ("sync, no MMA", attention, dict(no_mma=True)), ("sync, no gather", attention, dict(no_gather=True)),
                ("ws, 4 loader warps, chunks of 8 rows", attention_ws, {}),
                ("pipe, 4 loader warps (32 regs), chunks of 8", attention_ws, dict(pipe=True, loader_regs=32)),
                ("splitk", attention_splitk, {}),
                ("lead (kernels/sparse_attention_hopper.py)", promoted, {})]
    for T in (4096, 16384):
        q, kv, entries, idx, sink = inputs(T, 16384, T + WINDOW - 1)
        flops = 4 * T * N_H * C * (TOPK + WINDOW)
        blocks = T * (TOPK + WINDOW) // BN
        cs._ATTENTION_GLUON = False                          # the `tl` kernel
        ms = do_bench(lambda: cs._sparse_attention_triton(q, kv, entries, idx, sink, 0, WINDOW, C ** -0.5),
                      warmup=50, rep=300)
        cs._ATTENTION_GLUON = True
        print(f"T={T}  tl kernel: {flops / ms / 1e9:.0f} TFLOP/s, {ms * 1e6 / blocks * 132:.0f} ns a block per SM",
              flush=True)
        for name, run, kw in variants:
            ms = do_bench(lambda: run(q, kv, entries, idx, sink, **kw), warmup=50, rep=300)
            print(f"T={T}  gluon {name}: {flops / ms / 1e9:.0f} TFLOP/s (as if full), "
                  f"{ms * 1e6 / blocks * 132:.0f} ns a block per SM", flush=True)


if __name__ == "__main__":
    if not torch.cuda.is_available():
        sys.exit("bench/exp_sparse_attention_gluon.py needs a CUDA GPU (Hopper)")
    main()
