"""CSA selection and sparse attention in Triton: the lightning indexer's scores, the top-k choice, and
the attention over the chosen compressed entries plus the sliding window (V4-REFERENCE section 1).

At long context these three steps dominate a CSA layer. For each query t at position p = t0 + t:

    I[t, s] = sum_h w[t, h] * relu(qI[t, h] . KI[s])        visible iff s < (p + 1) // m
    idx[t]  = the top-k visible s by I[t, s]                -1 where fewer than k are visible
    o[t, h] = sum_j p_j kv_j,  p_j = exp(l_j) / (sum_i exp(l_i) + exp(attn_sink[h])),  l_j = q_h . kv_j * c^-0.5
              j over the selected entries kv_comp[idx[t]] and the window rows at p - n_win + 1 .. p

The official code runs the indexer in FP4 after a Hadamard rotation, and V4 keeps the indexer keys in
FP4 in its KV cache. Here it runs in the input dtype (bf16 on a GPU), which the rotation would not change,
or, with keys given in FP8 e4m3 and a scale per key (`k_scale`, `quantize_rows`: one power-of-two scale
per 128-dim row, the activation format of kernels/fp8_gemm.py), in FP8 as V3.2's indexer does: the queries
are quantised the same way, their scales folded into w, and the dots run on the FP8 tensor cores. Every
product of two e4m3 values is exact in fp32, so the reference (the same quantised values in fp32) differs
only in the order of the sums (and, on Hopper, by the FP8 MMA's ~14-bit accumulation); the bytes read
per decode step halve (the score kernel quantises the queries itself). fp32 inputs (the tests) get
full-fp32 dots (`input_precision="ieee"`), not Triton's TF32 default. Each kernel has a plain PyTorch
reference next to it (`*_reference`), and the public functions `indexer_scores`, `csa_topk` and
`sparse_attention` pick the kernel on CUDA and the reference elsewhere (`use_kernel=False` forces the
reference).

Kernels:
- `_indexer_scores_kernel`: one program per (block of queries, chunk of entries). The queries' heads
  (all of them, for BT queries) are loaded once and stay put; entry blocks stream past them. The dot
  is K_block @ Q^T, so the entries sit on the MMA's M dimension and the heads on N, and the weighted
  sum over heads is a row reduction of the accumulator.
- `_tile_topk_kernel`: one program per tile of a row (4096 scores, held in registers). It finds the
  tile's k-th largest score as a radix select over order-preserving uint32 keys, 2 bits a pass (the
  three counts of a pass share one reduction), stopping once exactly k keys are at or above the
  threshold; and writes the keys above it and the first ties at it, in index order. The set is exactly
  that of "a stable sort, descending, first k" (attention.py's `csa_select`); it stays in index order,
  as attention does not care about the order (a final sort by score cost 2.6 of the 35 us of a decode
  top-k on an H200, `bench/bench_csa_select.py`). A row longer than a tile (a 64K-token prefill's
  16384 entries: 4 tiles) leaves one list per tile; further launches of the same kernel merge groups of
  lists that fill a tile (8 lists of 512) until one is left. Only reductions and scans: no atomics, so
  the result never depends on timing.
- `_grid_topk_kernel`: decode, one or two long rows (262144 entries at a 1M-token context). The merge
  tree would need three dependent levels there; instead the row is spread over up to one program per
  SM and one radix select, a byte a round, runs over the whole row in one launch, the programs meeting
  at grid-wide barriers (a cooperative launch). Same result as the tree, bit for bit.
- `_sparse_attention_kernel`: one program per (query, group of heads). All heads of the group share
  the one K == V head, so each gathered row is loaded once for all of them (heads on the MMA's M).
  The sink starts the online softmax: running max = sink, running denominator = exp(sink - max) = 1.
  On Hopper at V4's shapes (bf16, head dim 512, heads in groups of 64, k and window multiples of 64)
  `kernels/sparse_attention_hopper.py` runs instead: the same contract in Gluon with warp roles (a
  loader, a warpgroup for S, the softmax and half of P V, one for the other half), 324-332 against
  259-268 TFLOP/s on an H200 (RESULTS.md); `_ATTENTION_GLUON = False` keeps the `tl` kernel.

Backward: the sparse attention's gradient recomputes the reference under autograd (a documented
fallback: correct, but it materialises the reference's [B, T, n_h, k + n_win] tensors). The selection
has no gradient. Under TRITON_INTERPRET=1 (the CPU tests) tiles shrink so the tests cover many of
them; the tests feed fp32, since the interpreter's bf16 arithmetic is not trustworthy.
"""

from __future__ import annotations

import os
import warnings

import torch
import triton
import triton.language as tl

from kernels import sparse_attention_hopper
from kernels.fp8_gemm import BLOCK, FP8_DTYPE, _num_sms, _round_to_e4m3_grid, _ue8m0_scale, act_quant

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_LOG2E = 1.4426950408889634
_SCORE_BUFFER_ELEMS = 2 ** 28     # fp32 scores kept at once (1 GiB); longer prefills go in query chunks
_FEW_ROWS = 128                   # fewer query rows than this: the score kernel takes shorter entry chunks
_SCORE_CHUNK_FEW_ROWS = 1024      # entries per score program for few rows (4096 for many)
# scores one top-k program holds (tiny in the CPU tests: many tiles). For a few long rows (decode) a
# bigger tile means fewer merge levels but more serial work per program; on an H200 4096 was the fastest
# for one row of 262144 (37.7 us, against 47.1 / 54.8 / 82.8 us for 8192 / 16384 / 32768:
# bench/bench_csa_select.py sweeps it), so both default to 4096.
_TOPK_TILE = 64 if _INTERPRET else 4096
_TOPK_TILE_FEW_ROWS = 64 if _INTERPRET else 4096
# warps per top-k program: a tile / 256 (16 at 4096) for many rows; 8 for few rows, measured on an H200
# at 262144 entries: 33.4 us against 37.5 (16 warps) and 37.7 (4) at B = 1, 54.5 against 70.8 at B = 8
_TOPK_WARPS_FEW_ROWS = 8
# a few rows longer than a tile (decode): "grid", the row-wide radix select in one launch
# (`_grid_topk_kernel`) where the rows' programs fit one wave of the GPU, else the merge tree; "tree":
# the merge tree always
_DECODE_TOPK = "grid"
_ATTENTION_GLUON = True           # the sparse attention in Gluon on Hopper at V4's shapes (False: always `tl`)


def _dot_precision(dtype: torch.dtype):
    """tl.dot's input_precision: fp32 inputs in full fp32 ("ieee"; Triton's default on a GPU is TF32,
    ~1e-3 off), every other dtype Triton's default (None: the bf16 kernels stay as they were)."""
    return "ieee" if dtype == torch.float32 else None


# ----------------------------------------------------------------------------------------------------
# References (plain PyTorch): these define the semantics the kernels are held to
# ----------------------------------------------------------------------------------------------------

def visible_counts(T: int, t0: int, m: int, S: int, device) -> torch.Tensor:
    """[T] number of compressed entries each query sees: min(S, (t0 + t + 1) // m)."""
    return ((t0 + torch.arange(T, device=device) + 1) // m).clamp(max=S)


def quantize_rows(x: torch.Tensor, impl: str = "auto"):
    """x [..., D], D <= 128 -> (x8 [..., D] e4m3, scale [...] fp32), x ~ x8 * scale[..., None]: one
    power-of-two scale per row (kernels/fp8_gemm.py's 1x128 activation blocks; impl as there)."""
    D = x.shape[-1]
    if D > BLOCK:
        raise ValueError(f"FP8 indexer rows hold one 1x{BLOCK} block: need a head dim <= {BLOCK}, got {D}")
    x8, scale = act_quant(x.reshape(-1, D).contiguous(), impl)
    return x8.view(x.shape), scale[:, 0].contiguous().view(x.shape[:-1])


def fp8_queries(q, w, impl: str = "auto"):
    """The FP8 indexer's queries: q [B, T, H, D] in e4m3 and w [B, T, H] (fp32) times each row's scale."""
    q8, q_scale = quantize_rows(q, impl)
    return q8, w.float() * q_scale


def indexer_scores_reference(q, w, k, m: int, t0: int, k_scale=None) -> torch.Tensor:
    """I [B, T, S] in fp32, -inf where invisible. The dots run in the input dtype, as the model's do;
    with k in e4m3 and its scales k_scale [B, S], on the e4m3 values in fp32 (exact products)."""
    if k_scale is not None:
        q, w = fp8_queries(q, w, impl="reference")
        q, k = q.float(), k.float()
    dots = torch.einsum("bthd,bsd->btsh", q, k)                                   # [B, T, S, H]
    scores = (dots.float().relu() * w.float()[:, :, None, :]).sum(-1)             # [B, T, S]
    if k_scale is not None:
        scores = scores * k_scale.float()[:, None, :]
    s = torch.arange(k.shape[1], device=q.device)
    visible = s[None, :] < visible_counts(q.shape[1], t0, m, k.shape[1], q.device)[:, None]
    return scores.masked_fill(~visible, float("-inf"))


def csa_topk_reference(q, w, k, m: int, t0: int, topk: int, k_scale=None):
    """(idx int32 [B, T, topk], scores fp32 [B, T, topk]): the first topk of a stable descending sort, so
    ties go to the earlier entry, then put in index order; -1 and -inf in the last slots where fewer
    than topk entries are visible. FP8 keys (k_scale) as in `indexer_scores_reference`."""
    scores = indexer_scores_reference(q, w, k, m, t0, k_scale)
    value, idx = scores.sort(dim=-1, descending=True, stable=True)
    value, idx = value[..., :topk], idx[..., :topk]
    pad = topk - value.shape[-1]                                                  # when S < topk
    value = torch.nn.functional.pad(value, (0, pad), value=float("-inf"))
    idx = torch.nn.functional.pad(idx, (0, pad), value=-1)
    idx = idx.masked_fill(value == float("-inf"), -1)
    order = idx.masked_fill(idx < 0, 1 << 62).argsort(dim=-1)                    # by index, empty slots last
    return idx.gather(-1, order).int(), value.gather(-1, order)


def sparse_attention_reference(q, kv, entries, entry_idx, attn_sink, t0: int, window_size: int,
                               softmax_scale: float | None = None, return_lse: bool = False):
    """o [B, T, n_h, c] (and the log-sum-exp [B, T, n_h] in fp32, sink included), computed in fp32.

    q [B, T, n_h, c] at positions t0 .. t0+T-1; kv [B, L, c] the K == V rows at positions
    t0+T-L .. t0+T-1 (the window's earlier rows, then the T new ones); entries [B, S, c] the compressed
    entries, entry_idx [B, T, k] which of them each query attends (-1 = none); attn_sink [n_h].
    """
    B, T, n_h, c = q.shape
    L = kv.shape[1]
    scale = c ** -0.5 if softmax_scale is None else softmax_scale
    pos = t0 + torch.arange(T, device=q.device)
    win_pos = pos[:, None] - window_size + 1 + torch.arange(window_size, device=q.device)   # [T, W]
    win_row = win_pos - (t0 + T - L)
    win_ok = (win_row >= 0).expand(B, T, window_size)
    batch = torch.arange(B, device=q.device)[:, None, None]
    keys = torch.cat([entries[batch, entry_idx.clamp(min=0).long()],                # [B, T, k, c]
                      kv[batch, win_row.clamp(min=0)[None]]], dim=2).float()      # [B, T, k + W, c]
    ok = torch.cat([entry_idx >= 0, win_ok], dim=2)                               # [B, T, k + W]
    logits = torch.einsum("bthc,btjc->bthj", q.float(), keys) * scale             # [B, T, n_h, k + W]
    logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
    sink = attn_sink.float().view(1, 1, n_h, 1).expand(B, T, n_h, 1)
    lse = torch.logsumexp(torch.cat([logits, sink], dim=-1), dim=-1)              # [B, T, n_h]
    o = torch.einsum("bthj,btjc->bthc", torch.exp(logits - lse[..., None]), keys).to(q.dtype)
    return (o, lse) if return_lse else o


# ----------------------------------------------------------------------------------------------------
# Kernel 1: indexer scores, entries on the MMA's M dimension
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _indexer_scores_kernel(q_ptr, w_ptr, k_ptr, ks_ptr, out_ptr, T, S, t0, m, s_chunk,
                           sq_b, sq_t, sq_h, sq_d, sw_b, sw_t, sw_h, sk_b, sk_s, sk_d, sks_b,
                           so_b, so_t, so_s,
                           H: tl.constexpr, D: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
                           BT: tl.constexpr, BS: tl.constexpr, DOT_PRECISION: tl.constexpr,
                           KEY_SCALE: tl.constexpr, QUANT_Q: tl.constexpr, ROUND_ON_GRID: tl.constexpr):
    pid_t = tl.program_id(0)
    pid_s = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    tq = pid_t * BT + tl.arange(0, BT)
    n_vis = tl.minimum((t0 + tq + 1) // m, S)                                     # [BT]
    t_last = tl.minimum(pid_t * BT + BT, T) - 1                                   # sees the most entries
    s_start = pid_s * s_chunk
    s_end = tl.minimum(tl.minimum((t0 + t_last + 1) // m, S), s_start + s_chunk)
    # the BT queries' heads, (query, head) flattened with the head fastest, loaded once (not at all
    # when this chunk of entries is invisible to every one of them)
    n = tl.arange(0, BT * H_PAD)
    t_n = pid_t * BT + n // H_PAD
    h_n = n % H_PAD
    d = tl.arange(0, D_PAD)
    row_ok = (t_n < tl.where(s_start < s_end, T, 0)) & (h_n < H)
    qb = tl.load(q_ptr + b * sq_b + t_n[:, None].to(tl.int64) * sq_t + h_n[:, None] * sq_h + d[None, :] * sq_d,
                 mask=row_ok[:, None] & (d[None, :] < D), other=0.0)             # [BT*H_PAD, D_PAD]
    wb = tl.load(w_ptr + b * sw_b + t_n.to(tl.int64) * sw_t + h_n * sw_h, mask=row_ok, other=0.0)
    wb = wb.to(tl.float32)                                                        # [BT*H_PAD]
    if QUANT_Q:
        # the FP8 indexer's queries, quantised here as `fp8_queries` does (one power-of-two scale per
        # (query, head) row, kernels/fp8_gemm.py's 1x128 blocks), the scales folded into the weights
        qf = qb.to(tl.float32)
        q_scale, q_inv = _ue8m0_scale(tl.max(tl.abs(qf), axis=1))                # [BT*H_PAD]
        qf = qf * q_inv[:, None]
        if ROUND_ON_GRID:                                   # the interpreter's cast needs the grid first
            qf = _round_to_e4m3_grid(qf)
        qb = qf.to(k_ptr.dtype.element_ty)
        wb = wb * q_scale
    qT = tl.trans(qb)                                                             # [D_PAD, BT*H_PAD]
    for s0 in range(s_start, s_end, BS):
        s = s0 + tl.arange(0, BS)
        kb = tl.load(k_ptr + b * sk_b + s[:, None].to(tl.int64) * sk_s + d[None, :] * sk_d,
                     mask=(s[:, None] < S) & (d[None, :] < D), other=0.0)         # [BS, D_PAD]
        dots = tl.dot(kb, qT, input_precision=DOT_PRECISION)                      # [BS, BT*H_PAD]
        contrib = tl.maximum(dots, 0.0) * wb[None, :]
        scores = tl.sum(tl.reshape(contrib, [BS, BT, H_PAD]), axis=2)             # [BS, BT]
        if KEY_SCALE:                                   # FP8 keys: relu(c x) = c relu(x) for c > 0
            scores *= tl.load(ks_ptr + b * sks_b + s, mask=s < S, other=0.0)[:, None]
        scores = tl.where(s[:, None] < n_vis[None, :], scores, float("-inf"))
        tl.store(out_ptr + b * so_b + tq[None, :].to(tl.int64) * so_t + s[:, None] * so_s, scores,
                 mask=(s[:, None] < S) & (tq[None, :] < T))


_SCORE_CONFIGS = [triton.Config({"BT": bt, "BS": bs}, num_warps=nw, num_stages=ns)
                  for bt, bs, nw, ns in [(1, 128, 4, 3), (1, 64, 4, 3), (2, 128, 8, 3), (2, 64, 4, 3),
                                         (4, 64, 8, 2), (1, 256, 8, 3), (1, 128, 4, 5),
                                         (1, 64, 4, 4)]]
_indexer_scores_tuned = triton.autotune(_SCORE_CONFIGS, key=["T", "H", "D"])(_indexer_scores_kernel)


def _scores_triton(q, w, k, m: int, t0: int, out: torch.Tensor, k_scale=None):
    """Write I for queries q [B, T, H, D] into out [B, T, S] (fp32). Only entries below the last query's
    visible count are written; invisible ones among them get -inf. FP8: k in e4m3 with k_scale [B, S]
    the keys' scales, and q either in e4m3 with its scales already in w (`fp8_queries`) or in a wider
    dtype, quantised by the kernel the same way (saving two launches a decode step)."""
    B, T, H, D = q.shape
    S = k.shape[1]
    if S == 0 or T == 0:
        return
    # (an FP8 MMA on Hopper takes K in steps of 32: pad the head dim to at least that)
    H_PAD = max(16, triton.next_power_of_2(H))
    D_PAD = max(32 if k.dtype == FP8_DTYPE else 16, triton.next_power_of_2(D))
    s_chunk = 32 if _INTERPRET else (_SCORE_CHUNK_FEW_ROWS if B * T < _FEW_ROWS else 4096)   # multiple of every BS
    ks = out if k_scale is None else k_scale                                     # (not read without FP8)
    args = (q, w, k, ks, out, T, S, t0, m, s_chunk, *q.stride(), *w.stride(), *k.stride(), ks.stride(0),
            *out.stride())
    meta = dict(H=H, D=D, H_PAD=H_PAD, D_PAD=D_PAD, DOT_PRECISION=_dot_precision(k.dtype),
                KEY_SCALE=k_scale is not None, QUANT_Q=k_scale is not None and q.dtype != FP8_DTYPE,
                ROUND_ON_GRID=_INTERPRET)
    if _INTERPRET:
        _indexer_scores_kernel[(triton.cdiv(T, 2), triton.cdiv(S, s_chunk), B)](*args, **meta, BT=2, BS=16)
    else:
        grid = lambda cfg: (triton.cdiv(T, cfg["BT"]), triton.cdiv(S, s_chunk), B)
        _indexer_scores_tuned[grid](*args, **meta)


# ----------------------------------------------------------------------------------------------------
# Kernel 2: top-k by radix select over a tile held in registers, merged up a tree
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _float_to_key(x):
    """fp32 -> uint32 whose unsigned order is the float order (flip all bits of negatives, set the sign
    bit of the rest). -0.0 becomes +0.0 first: the reference's sort holds them equal."""
    bits = tl.where(x == 0.0, 0.0, x).to(tl.uint32, bitcast=True)
    return tl.where((bits >> 31) == 1, ~bits, bits | 0x80000000)


@triton.jit
def _key_to_float(key):
    bits = tl.where((key >> 31) == 1, key & 0x7FFFFFFF, ~key)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _add2(a0, a1, b0, b1):
    return a0 + b0, a1 + b1


@triton.jit
def _tile_topk_kernel(val_ptr, src_idx_ptr, out_idx_ptr, out_val_ptr, T, row_len, seg_len, t0, m,
                      stride_in, stride_out, K: tl.constexpr, K_PAD: tl.constexpr, TILE: tl.constexpr,
                      CAUSAL: tl.constexpr):
    """Top K of row[lo:hi], lo = segment * seg_len, hi <= lo + seg_len <= lo + TILE, held in registers.
    CAUSAL: the row holds query (row % T)'s scores, hi stops at its visible count, and the output
    indices are positions in the row. Otherwise the row holds candidate lists (-inf = empty slot) whose
    indices are src_idx. Writes K indices and scores in index order, then -1 / -inf in the empty slots."""
    row = tl.program_id(0).to(tl.int64)
    seg = tl.program_id(1)
    lo = seg * seg_len
    hi = tl.minimum(lo + seg_len, row_len)
    if CAUSAL:
        hi = tl.minimum(hi, (t0 + row % T + 1) // m).to(tl.int32)
    offs = lo + tl.arange(0, TILE)
    bound = tl.minimum((hi + 15) // 16 * 16, row_len)        # hi rounded up to 16: the mask allows vector loads
    v = tl.load(val_ptr + row * stride_in + offs, mask=offs < bound, other=float("-inf"))   # [TILE]
    ok = (offs < hi) & (v > float("-inf"))
    key = tl.where(ok, _float_to_key(v), 0)                 # every valid key is > 0
    n_ge = tl.sum(ok.to(tl.int32), axis=0)                  # keys >= thr
    n_sel = tl.minimum(n_ge, K)
    # the threshold thr: the largest key with n_ge >= n_sel keys at or above it, found 2 bits a pass
    # from the top. A pass counts the keys >= thr + j 2^shift for j = 1, 2, 3 in one reduction of two
    # int32s (counts 1 and 2 in 16-bit fields of the first: a tile holds < 2^16 keys). 32-bit arithmetic
    # on purpose: the pass is bound by instructions per key, and 64-bit packing doubled them. Stop
    # early once exactly n_sel keys are >= thr.
    tl.static_assert(TILE < 65536)
    thr = tl.full([], 0, tl.uint32)
    shift = 30
    while (n_ge > n_sel) & (shift >= 0):
        sh = shift.to(tl.uint32)
        lo = tl.where(key >= (thr | (1 << sh)), 1, 0) + tl.where(key >= (thr | (2 << sh)), 1 << 16, 0)
        hi = tl.where(key >= (thr | (3 << sh)), 1, 0)
        lo, hi = tl.reduce((lo, hi), 0, _add2)
        c1 = lo & 0xFFFF
        c2 = lo >> 16
        c3 = hi
        step = (c1 >= n_sel).to(tl.int32) + (c2 >= n_sel).to(tl.int32) + (c3 >= n_sel).to(tl.int32)
        n_ge = tl.where(step == 3, c3, tl.where(step == 2, c2, tl.where(step == 1, c1, n_ge)))
        thr = thr | (step.to(tl.uint32) << sh)
        shift -= 2
    # compaction in index order: the keys above thr and the first krem ties at it
    above = key > thr
    tie = ok & (key == thr)
    krem = n_sel - tl.sum(above.to(tl.int32), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= krem))
    pos = tl.cumsum(take.to(tl.int32), axis=0) - 1
    if CAUSAL:
        idx = offs
    else:
        idx = tl.load(src_idx_ptr + row * stride_in + offs, mask=take, other=-1)
    out_idx = out_idx_ptr + row * stride_out + seg * K
    out_val = out_val_ptr + row * stride_out + seg * K
    tl.store(out_idx + pos, idx, mask=take)
    tl.store(out_val + pos, v, mask=take)
    j = tl.arange(0, K_PAD)
    pad = (j >= n_sel) & (j < K)
    tl.store(out_idx + j, tl.full([K_PAD], -1, tl.int32), mask=pad)
    tl.store(out_val + j, tl.full([K_PAD], float("-inf"), tl.float32), mask=pad)


def _topk_triton(scores: torch.Tensor, t0: int, m: int, topk: int):
    """Top-k of each query's visible scores: scores [B, T, S] fp32 -> (idx int32, value fp32) [B, T, topk].

    A row longer than a tile is cut into tiles, each of which keeps its top-k in index order; the next
    launch merges groups of those lists, tile by tile, until one list is left: the answer, in index
    order. Each program's output depends only on its inputs, so the result is deterministic (ties: the
    earlier entry). A few long rows (decode) go to `_grid_topk_kernel` instead, one launch, where its
    programs fit one wave of the GPU; the same result."""
    global _DECODE_TOPK
    B, T, S = scores.shape
    rows = B * T
    K_PAD = max(2, triton.next_power_of_2(topk))
    few = rows < _FEW_ROWS
    tile_max = max(_TOPK_TILE_FEW_ROWS if few else _TOPK_TILE, 2 * K_PAD)   # a merge takes >= 2 lists
    grid_tile = _grid_tile(rows, S, scores.device) if few and S > tile_max and _DECODE_TOPK == "grid" else None
    if grid_tile:                                       # a few long rows: one launch (below)
        try:
            return _topk_grid_triton(scores, t0, m, topk, grid_tile)
        except (RuntimeError, TypeError) as e:   # the cooperative launch refused (SMs held by another
            # process) or not known to this Triton
            _DECODE_TOPK = "tree"
            warnings.warn(f"csa_select: the one-launch decode top-k failed ({str(e)[:200]}); using the merge "
                          "tree from now on")
    idx = torch.empty(rows, topk, dtype=torch.int32, device=scores.device)
    val = torch.empty(rows, topk, dtype=torch.float32, device=scores.device)
    src_val, src_idx, row_len, seg_len, causal = scores.view(rows, S), scores, S, tile_max, True
    while True:
        n_prog = max(1, triton.cdiv(row_len, seg_len))
        last = n_prog == 1
        out_idx = idx if last else torch.empty(rows, n_prog * topk, dtype=torch.int32, device=scores.device)
        out_val = val if last else torch.empty(rows, n_prog * topk, dtype=torch.float32, device=scores.device)
        tile = max(64, triton.next_power_of_2(min(seg_len, row_len)))
        warps = min(_TOPK_WARPS_FEW_ROWS if few else 16, max(1, tile // 256))
        _tile_topk_kernel[(rows, n_prog)](src_val, src_idx, out_idx, out_val, T, row_len, seg_len, t0, m,
                                          src_val.stride(0), out_idx.stride(0), K=topk, K_PAD=K_PAD,
                                          TILE=tile, CAUSAL=causal,
                                          num_warps=warps)
        if last:
            return idx.view(B, T, topk), val.view(B, T, topk)
        src_val, src_idx, row_len, causal = out_val, out_idx, n_prog * topk, False
        seg_len = (tile_max // topk) * topk                 # whole lists per merge tile


# The decode top-k: one row (or two) of up to S = 262144 scores (a 1M-token context). The merge tree
# above needs three dependent levels over 4096-score tiles (~10 us a level on an H200: a tile's radix
# passes are serial). Here the row is split over up to ~one program per SM, each holding its tile of
# keys in registers, and one radix select runs over the whole row, 8 bits a round, in one launch:
#   round r = 0..3   each program: a histogram (256 bins) of byte r of its keys whose higher bytes equal
#                    the threshold's so far, added into the row's histogram with integer atomics; a
#                    grid-wide barrier; then every program reads the row's histogram and takes the same
#                    byte r of the threshold: the largest value with >= k_remaining keys at or above it
#   then             each program publishes its count of keys above the threshold tau and of ties at it;
#                    a barrier; each writes its keys > tau and its share of the ties (the earlier programs'
#                    first, so ties go to the earlier entry) at the offset the programs before it took.
# The k come out in index order, the same as the tree's, bit for bit (bench/bench_csa_select.py checks).
# A barrier is a counter in global memory that every program of the row increments, then polls; all
# programs must be resident at once, so the kernel is launched as a cooperative grid (the driver refuses
# a grid that would not fit) and only where rows x programs <= SMs: more rows go to the tree. The
# integer atomics make the result independent of timing. Under TRITON_INTERPRET=1, which runs programs
# one after another, a barrier would wait forever: there a row is one program (the CPU tests); the
# multi-program path is tested on the GPU (tests/test_csa_select.py).
# Tiles tried in turn, the first whose programs fit one wave wins. On an H200, one row of 262144 scores
# (bench/bench_csa_select.py): 19.8-19.9 us in tiles of 2048 (128 programs), 24.0 in tiles of 4096,
# against 32.5 for the tree; 8 warps a program (4: 22.2 / 37.0 us, 16: 27.3 at 4096). The histogram
# atomics are relaxed (the barrier's release / acquire orders them): 22.1 us with the default acq_rel.
# A version with one launch a round (five launches, the rounds' histograms summed from per-program
# tables) took 29.9 us: each launch cost ~5.5 us, most of it the launch and reloading the tile. Scoring
# each program's own entries inside this launch (one launch for the whole decode selection) saved
# ~0.7 us with bf16 keys and lost 0.6 with FP8 keys: not kept (in git at 993ccd9).
_GRID_TILES = (1024,) if _INTERPRET else (2048, 4096)
_GRID_WARPS = 8


@triton.jit
def _grid_barrier(sync_ptr, n):
    """Every program of the row arrives once at this counter (zero at launch); return once all n have."""
    tl.debug_barrier()                                  # this program's earlier writes are issued
    tl.atomic_add(sync_ptr, 1, sem="release")
    arrived = tl.atomic_add(sync_ptr, 0, sem="acquire")
    while arrived < n:
        arrived = tl.atomic_add(sync_ptr, 0, sem="acquire")
    tl.debug_barrier()


@triton.jit
def _grid_topk_kernel(score_ptr, work_ptr, out_idx_ptr, out_val_ptr, T, S, t0, m, n_prog, stride_s,
                      K: tl.constexpr, K_PAD: tl.constexpr, TILE: tl.constexpr, P_PAD: tl.constexpr):
    """Top K of a row over n_prog programs of TILE keys each, one launch. work [rows, 8 + 1024 + 2 P_PAD]
    int32, zeroed: 5 barrier counters, the row's histogram of each round [4, 256], and each program's
    (keys above the threshold, ties at it) [P_PAD, 2]."""
    row = tl.program_id(0).to(tl.int64)
    p = tl.program_id(1)
    sync = work_ptr + row * (8 + 1024 + 2 * P_PAD)
    totals = sync + 8
    counts = totals + 1024
    n_vis = tl.minimum((t0 + row % T + 1) // m, S)
    offs = p * TILE + tl.arange(0, TILE)
    v = tl.load(score_ptr + row * stride_s + offs, mask=offs < n_vis, other=float("-inf"))
    key = _float_to_key(v)                                                        # [TILE]
    ok = (offs < n_vis) & (v > float("-inf"))
    bins = tl.arange(0, 256)
    prefix = tl.full([], 0, tl.uint32)                  # the threshold's bytes chosen so far
    krem = 0
    n_sel = 0
    for r in tl.static_range(4):                        # byte r of the threshold, from the top
        if r == 0:
            match = ok
        else:
            match = ok & ((key >> (32 - 8 * r)) == (prefix >> (32 - 8 * r)))
        h = tl.histogram(((key >> (24 - 8 * r)) & 255).to(tl.int32), 256, mask=match)
        tl.atomic_add(totals + r * 256 + bins, h, mask=h > 0, sem="relaxed")   # ordered by the barrier
        _grid_barrier(sync + r, n_prog)
        hist = tl.load(totals + r * 256 + bins, cache_modifier=".cg")             # the whole row's
        if r == 0:
            n_sel = tl.minimum(tl.sum(hist, axis=0), K)
            krem = n_sel
        at_or_above = tl.sum(hist, axis=0) - tl.cumsum(hist, axis=0) + hist
        digit = tl.sum((at_or_above >= krem).to(tl.int32), axis=0) - 1          # 255 when krem == 0
        krem = krem - tl.sum(tl.where(bins > digit, hist, 0), axis=0)
        prefix = prefix | (digit.to(tl.uint32) << (24 - 8 * r))
    # prefix is the threshold key tau, krem the ties at tau to take (the earliest first)
    above = ok & (key > prefix)
    tie = ok & (key == prefix)
    tl.store(counts + 2 * p, tl.sum(above.to(tl.int32), axis=0))
    tl.store(counts + 2 * p + 1, tl.sum(tie.to(tl.int32), axis=0))
    _grid_barrier(sync + 4, n_prog)
    progs = tl.arange(0, P_PAD)
    above_q = tl.load(counts + 2 * progs, mask=progs < n_prog, other=0, cache_modifier=".cg")
    ties_q = tl.load(counts + 2 * progs + 1, mask=progs < n_prog, other=0, cache_modifier=".cg")
    quota_q = tl.minimum(tl.maximum(krem - (tl.cumsum(ties_q, axis=0) - ties_q), 0), ties_q)
    base = tl.sum(tl.where(progs < p, above_q + quota_q, 0), axis=0)
    quota = tl.sum(tl.where(progs == p, quota_q, 0), axis=0)
    take = above | (tie & (tl.cumsum(tie.to(tl.int32), axis=0) <= quota))
    pos = base + tl.cumsum(take.to(tl.int32), axis=0) - 1
    tl.store(out_idx_ptr + row * K + pos, offs, mask=take)
    tl.store(out_val_ptr + row * K + pos, v, mask=take)
    if p == 0:
        slot = tl.arange(0, K_PAD)
        pad = (slot >= n_sel) & (slot < K)
        tl.store(out_idx_ptr + row * K + slot, tl.full([K_PAD], -1, tl.int32), mask=pad)
        tl.store(out_val_ptr + row * K + slot, tl.full([K_PAD], float("-inf"), tl.float32), mask=pad)


def _grid_tile(rows: int, S: int, device) -> int | None:
    """The grid top-k's tile for rows of S scores: the first of _GRID_TILES whose programs fit one wave
    (one program per SM), or None."""
    limit = _num_sms(device) if device.type == "cuda" else rows     # the interpreter: one program a row
    return next((tile for tile in _GRID_TILES if rows * triton.cdiv(S, tile) <= limit), None)


def _topk_grid_triton(scores: torch.Tensor, t0: int, m: int, topk: int, tile: int):
    """`_topk_triton`'s result for rows that `_grid_tile` fits: one cooperative launch."""
    B, T, S = scores.shape
    rows = B * T
    n_prog = triton.cdiv(S, tile)
    P_PAD = max(2, triton.next_power_of_2(n_prog))
    work = torch.zeros(rows, 8 + 1024 + 2 * P_PAD, dtype=torch.int32, device=scores.device)
    idx = torch.empty(rows, topk, dtype=torch.int32, device=scores.device)
    val = torch.empty(rows, topk, dtype=torch.float32, device=scores.device)
    src = scores.view(rows, S)
    coop = {} if _INTERPRET else {"launch_cooperative_grid": True}
    _grid_topk_kernel[(rows, n_prog)](src, work, idx, val, T, S, t0, m, n_prog, src.stride(0), K=topk,
                                      K_PAD=max(2, triton.next_power_of_2(topk)), TILE=tile,
                                      P_PAD=P_PAD, num_warps=_GRID_WARPS, **coop)
    return idx.view(B, T, topk), val.view(B, T, topk)


# ----------------------------------------------------------------------------------------------------
# Kernel 3: sparse attention over the selected entries and the window, with the sink
# ----------------------------------------------------------------------------------------------------

@triton.jit
def _attend(qb, kvb, ok, m_i, l_i, acc, qk_scale, DOT_PRECISION: tl.constexpr):
    """One online-softmax step (log2 units) of HB heads over BN gathered K == V rows kvb [BN, C]."""
    logits = tl.dot(qb, tl.trans(kvb), input_precision=DOT_PRECISION) * qk_scale  # [HB, BN]
    logits = tl.where(ok[None, :], logits, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(logits, axis=1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(logits - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(kvb.dtype), kvb, input_precision=DOT_PRECISION)   # [HB, C]
    return m_new, l_i, acc


@triton.jit
def _sparse_attention_kernel(q_ptr, kv_ptr, ent_ptr, idx_ptr, sink_ptr, o_ptr, lse_ptr,
                             T, L, S, t0, qk_scale,
                             sq_b, sq_t, sq_h, sq_c, skv_b, skv_t, skv_c, se_b, se_s, se_c,
                             si_b, si_t, si_k, so_b, so_t, so_h, so_c,
                             N_H: tl.constexpr, C: tl.constexpr, C_PAD: tl.constexpr, TOPK: tl.constexpr,
                             WINDOW: tl.constexpr, HB: tl.constexpr, BN: tl.constexpr,
                             DOT_PRECISION: tl.constexpr):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1) * HB + tl.arange(0, HB)
    b = tl.program_id(2).to(tl.int64)
    c = tl.arange(0, C_PAD)
    h_ok = h < N_H
    c_ok = c < C
    qb = tl.load(q_ptr + b * sq_b + t * sq_t + h[:, None] * sq_h + c[None, :] * sq_c,
                 mask=h_ok[:, None] & c_ok[None, :], other=0.0)                   # [HB, C_PAD]
    # the online softmax (log2 units) starts at the sink: running max = sink, denominator exp(0) = 1
    m_i = tl.load(sink_ptr + h, mask=h_ok, other=0.0).to(tl.float32) * 1.4426950408889634
    l_i = tl.full([HB], 1.0, tl.float32)
    acc = tl.zeros([HB, C_PAD], dtype=tl.float32)
    j = tl.arange(0, BN)
    for k0 in range(0, TOPK, BN):                       # the selected compressed entries
        sel = tl.load(idx_ptr + b * si_b + t * si_t + (k0 + j) * si_k, mask=k0 + j < TOPK, other=-1)
        ok = (sel >= 0) & (sel < S)
        rows = tl.where(ok, sel, 0).to(tl.int64)
        kvb = tl.load(ent_ptr + b * se_b + rows[:, None] * se_s + c[None, :] * se_c,
                      mask=ok[:, None] & c_ok[None, :], other=0.0)                # [BN, C_PAD]
        m_i, l_i, acc = _attend(qb, kvb, ok, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    first_row = t + L - T - WINDOW + 1                  # kv row of position t0 + t - WINDOW + 1
    for w0 in range(0, WINDOW, BN):                     # the window
        r = first_row + w0 + j
        ok = (r >= 0) & (w0 + j < WINDOW)
        kvb = tl.load(kv_ptr + b * skv_b + tl.where(ok, r, 0)[:, None] * skv_t + c[None, :] * skv_c,
                      mask=ok[:, None] & c_ok[None, :], other=0.0)
        m_i, l_i, acc = _attend(qb, kvb, ok, m_i, l_i, acc, qk_scale, DOT_PRECISION)
    o = acc / l_i[:, None]
    tl.store(o_ptr + b * so_b + t * so_t + h[:, None] * so_h + c[None, :] * so_c,
             o.to(o_ptr.dtype.element_ty), mask=h_ok[:, None] & c_ok[None, :])
    tl.store(lse_ptr + (b * T + t) * N_H + h, (m_i + tl.log2(l_i)) / 1.4426950408889634, mask=h_ok)   # sink included


def _prune_head_groups(configs, named_args, **kwargs):
    """Drop head groups larger than the (padded) head count."""
    most = max(16, triton.next_power_of_2(named_args["N_H"] if "N_H" in named_args else kwargs["N_H"]))
    return [cfg for cfg in configs if cfg.kwargs["HB"] <= most]


_ATTENTION_CONFIGS = [triton.Config({"HB": hb, "BN": bn}, num_warps=nw, num_stages=ns)
                      for hb, bn, nw, ns in [(64, 32, 8, 2), (64, 64, 8, 2), (64, 32, 8, 3), (32, 64, 4, 2),
                                             (16, 64, 4, 2), (64, 64, 8, 3), (64, 64, 4, 2), (64, 128, 8, 1),
                                             (64, 32, 4, 3), (64, 64, 8, 1)]]
_sparse_attention_tuned = triton.autotune(_ATTENTION_CONFIGS, key=["T", "N_H", "C", "TOPK", "WINDOW"],
                                          prune_configs_by={"early_config_prune": _prune_head_groups}
                                          )(_sparse_attention_kernel)


def _sparse_attention_triton(q, kv, entries, entry_idx, attn_sink, t0: int, window_size: int, scale: float):
    B, T, n_h, c = q.shape
    attn_sink = attn_sink.contiguous()
    o = torch.empty_like(q)
    lse = torch.empty(B, T, n_h, dtype=torch.float32, device=q.device)
    if T == 0:
        return o, lse
    if _ATTENTION_GLUON and not _INTERPRET and sparse_attention_hopper.supported(q, kv, entries, entry_idx,
                                                                                 window_size):
        sparse_attention_hopper.launch(q, kv, entries, entry_idx, attn_sink, o, lse, window_size, scale)
        return o, lse
    args = (q, kv, entries, entry_idx, attn_sink, o, lse, T, kv.shape[1], entries.shape[1], t0,
            scale * _LOG2E, *q.stride(), *kv.stride(), *entries.stride(), *entry_idx.stride(), *o.stride())
    meta = dict(N_H=n_h, C=c, C_PAD=max(16, triton.next_power_of_2(c)), TOPK=entry_idx.shape[-1],
                WINDOW=window_size, DOT_PRECISION=_dot_precision(q.dtype))
    if _INTERPRET:
        hb = min(64, max(16, triton.next_power_of_2(n_h)))
        _sparse_attention_kernel[(T, triton.cdiv(n_h, hb), B)](*args, **meta, HB=hb, BN=16)
    else:
        grid = lambda cfg: (T, triton.cdiv(n_h, cfg["HB"]), B)
        _sparse_attention_tuned[grid](*args, **meta)
    return o, lse


class _SparseAttention(torch.autograd.Function):
    """Forward in Triton; backward recomputes the reference under autograd (the documented fallback)."""

    @staticmethod
    def forward(ctx, q, kv, entries, attn_sink, entry_idx, t0, window_size, scale):
        ctx.save_for_backward(q, kv, entries, attn_sink, entry_idx)
        ctx.args = (t0, window_size, scale)
        return _sparse_attention_triton(q, kv, entries, entry_idx, attn_sink, t0, window_size, scale)

    @staticmethod
    def backward(ctx, grad_o, grad_lse):
        q, kv, entries, attn_sink, entry_idx = ctx.saved_tensors
        inputs = [x.detach().requires_grad_(need) for x, need in zip((q, kv, entries, attn_sink),
                                                                     ctx.needs_input_grad[:4])]
        with torch.enable_grad():
            o, lse = sparse_attention_reference(inputs[0], inputs[1], inputs[2], entry_idx, inputs[3],
                                                *ctx.args, return_lse=True)
            wanted = [x for x in inputs if x.requires_grad]
            outs, grads = [o], [grad_o]
            if grad_lse is not None:
                outs.append(lse)
                grads.append(grad_lse)
            found = iter(torch.autograd.grad(outs, wanted, grads, allow_unused=True))
        return (*[next(found) if x.requires_grad else None for x in inputs], None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------

def _want_kernel(use_kernel, *tensors) -> bool:
    if use_kernel is None:
        return all(x.is_cuda for x in tensors)
    if use_kernel and not _INTERPRET and not all(x.is_cuda for x in tensors):
        raise ValueError("use_kernel=True needs CUDA tensors, or TRITON_INTERPRET=1 set before triton is imported")
    return bool(use_kernel)


def _check_indexer(q, w, k, m, t0, k_scale=None):
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, H, D], got shape {tuple(q.shape)}")
    B, T, H, D = q.shape
    if tuple(w.shape) != (B, T, H):
        raise ValueError(f"w must be [B, T, H] = {(B, T, H)}, got {tuple(w.shape)}")
    if k.dim() != 3 or k.shape[0] != B or k.shape[2] != D:
        raise ValueError(f"k must be [B, S, D] with B = {B}, D = {D}, got {tuple(k.shape)}")
    if (k.dtype == FP8_DTYPE) != (k_scale is not None):
        raise ValueError(f"FP8 keys ({FP8_DTYPE}) come with k_scale [B, S], other keys without; got k "
                         f"{k.dtype}, k_scale {None if k_scale is None else tuple(k_scale.shape)}")
    if k_scale is not None:
        if tuple(k_scale.shape) != (B, k.shape[1]) or k_scale.dtype != torch.float32:
            raise ValueError(f"k_scale must be fp32 [B, S] = {(B, k.shape[1])}, got {k_scale.dtype} "
                             f"{tuple(k_scale.shape)}")
        if q.dtype not in (torch.bfloat16, torch.float16, torch.float32) or D > BLOCK:
            raise ValueError(f"the FP8 indexer quantises q (bf16/fp16/fp32, head dim <= {BLOCK}) itself; "
                             f"got {q.dtype}, head dim {D}")
    elif k.dtype != q.dtype:
        raise ValueError(f"k ({k.dtype}) and q ({q.dtype}) must have the same dtype")
    if m < 1 or t0 < 0:
        raise ValueError(f"need compression ratio m >= 1 and offset t0 >= 0, got m = {m}, t0 = {t0}")


def indexer_scores(q, w, k, m: int, t0: int = 0, use_kernel: bool | None = None,
                   k_scale=None) -> torch.Tensor:
    """I [B, T, S] fp32, -inf where invisible. q [B, T, H, D] RoPE'd indexer queries at positions
    t0 .. t0+T-1, w [B, T, H] weights (already scaled by D^-0.5 H^-0.5), k [B, S, D] compressed keys;
    FP8: k in e4m3 with k_scale [B, S] (`quantize_rows`), and q is quantised here."""
    _check_indexer(q, w, k, m, t0, k_scale)
    if not _want_kernel(use_kernel, q, w, k):
        return indexer_scores_reference(q, w, k, m, t0, k_scale)
    out = torch.full((q.shape[0], q.shape[1], k.shape[1]), float("-inf"), device=q.device)
    _scores_triton(q, w, k, m, t0, out, k_scale)
    return out


@torch.no_grad()
def csa_topk(q, w, k, m: int, t0: int, topk: int, use_kernel: bool | None = None, k_scale=None):
    """The lightning indexer's choice: (idx int32 [B, T, topk], scores fp32 [B, T, topk]), each query's
    top-k visible entries by score, ties to the earlier entry, in index order; -1 (score -inf)
    where fewer than topk are visible. Inputs as in `indexer_scores` (FP8 keys with k_scale). No gradient."""
    _check_indexer(q, w, k, m, t0, k_scale)
    if topk < 1:
        raise ValueError(f"topk must be >= 1, got {topk}")
    if not _want_kernel(use_kernel, q, w, k):
        return csa_topk_reference(q, w, k, m, t0, topk, k_scale)
    B, T = q.shape[:2]
    S = k.shape[1]
    chunk = max(1, _SCORE_BUFFER_ELEMS // max(1, B * S))          # queries whose scores fit the buffer
    parts = []
    for c0 in range(0, T, chunk):
        c1 = min(T, c0 + chunk)
        scores = torch.empty(B, c1 - c0, S, dtype=torch.float32, device=q.device)   # [B, chunk, S]
        _scores_triton(q[:, c0:c1], w[:, c0:c1], k, m, t0 + c0, scores, k_scale)
        parts.append(_topk_triton(scores, t0 + c0, m, topk))
    if len(parts) == 1:
        return parts[0]
    return torch.cat([p[0] for p in parts], dim=1), torch.cat([p[1] for p in parts], dim=1)


def sparse_attention(q, kv, entries, entry_idx, attn_sink, t0: int, window_size: int,
                     softmax_scale: float | None = None, use_kernel: bool | None = None, return_lse: bool = False):
    """CSA core attention: o [B, T, n_h, c] (before the inverse RoPE and the output projection), and with
    return_lse the log-sum-exp [B, T, n_h] (fp32, sink included: p_j = exp(l_j - lse)).

    q [B, T, n_h, c] at positions t0 .. t0+T-1; kv [B, L, c] the K == V rows at positions t0+T-L ..
    t0+T-1 (the cached window rows, then the T new ones: attention.py's `window_kv`); entries [B, S, c];
    entry_idx [B, T, k] int32/int64, -1 = none; attn_sink [n_h]; softmax_scale defaults to c^-0.5.
    Differentiable in q, kv, entries and attn_sink (the kernel's backward is the reference's).
    """
    if q.dim() != 4:
        raise ValueError(f"q must be [B, T, n_h, c], got shape {tuple(q.shape)}")
    B, T, n_h, c = q.shape
    if kv.dim() != 3 or kv.shape[0] != B or kv.shape[2] != c or not T <= kv.shape[1] <= t0 + T:
        raise ValueError(f"kv must be [B, L, c] with B = {B}, c = {c}, T = {T} <= L <= t0 + T = {t0 + T}, "
                         f"got {tuple(kv.shape)}")
    if entries.dim() != 3 or entries.shape[0] != B or entries.shape[2] != c:
        raise ValueError(f"entries must be [B, S, c] with B = {B}, c = {c}, got {tuple(entries.shape)}")
    if entry_idx.dim() != 3 or tuple(entry_idx.shape[:2]) != (B, T) or entry_idx.dtype.is_floating_point:
        raise ValueError(f"entry_idx must be an integer [B, T, k] with B, T = {B, T}, got "
                         f"{entry_idx.dtype} {tuple(entry_idx.shape)}")
    if tuple(attn_sink.shape) != (n_h,):
        raise ValueError(f"attn_sink must be [n_h] = [{n_h}], got {tuple(attn_sink.shape)}")
    if window_size < 1 or kv.dtype != q.dtype or entries.dtype != q.dtype:
        raise ValueError(f"need window_size >= 1 and q, kv, entries of one dtype, got window_size = "
                         f"{window_size}, dtypes {q.dtype}, {kv.dtype}, {entries.dtype}")
    scale = c ** -0.5 if softmax_scale is None else float(softmax_scale)
    if not _want_kernel(use_kernel, q, kv, entries, entry_idx, attn_sink):
        return sparse_attention_reference(q, kv, entries, entry_idx, attn_sink, t0, window_size, scale,
                                          return_lse)
    if torch.is_grad_enabled() and any(x.requires_grad for x in (q, kv, entries, attn_sink)):
        o, lse = _SparseAttention.apply(q, kv, entries, attn_sink, entry_idx, t0, window_size, scale)
    else:
        o, lse = _sparse_attention_triton(q, kv, entries, entry_idx, attn_sink, t0, window_size, scale)
    return (o, lse) if return_lse else o
