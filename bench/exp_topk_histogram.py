"""An experiment, not yet measured on a GPU: the decode top-k by one global threshold instead of
kernels/csa_select.py's merge tree. Promote it only if it is faster there.

Why: the tree's three levels each cost 6.6-10.2 us on an H200 (16 dependent block-wide reductions and two
scans over a 4096-score tile), launched or not, so a 262144-score row takes ~33 us whatever the launch
count. Here the row is read twice by many programs and only the few candidates are reduced serially:
  1. `_hist_kernel`, a program per 4096 scores: a histogram of the keys' top 12 bits (sign, exponent,
     3 mantissa bits), added into the row's histogram with atomics (integer counts: exact);
  2. `_collect_kernel`, the same programs: each finds the bin b* where the count from the top reaches k,
     and appends its keys above b* ("sure", fewer than k) and in b* (candidates) to two lists of the row,
     at places reserved with one atomic per list (so the lists' order depends on timing);
  3. `_final_kernel`, a program per row: the k - n_sure best candidates by (score, then earlier index)
     by radix selection over the candidates (in tiles of 4096, however many there are), then the k
     chosen sorted by index: the same result as the tree, in the same order, whatever the timing.
Three launches and a memset; the serial part is the candidates of one bin (a few hundred for random
scores) instead of three tiles of 4096.

    TRITON_INTERPRET=1 python bench/exp_topk_histogram.py    # CPU: against the reference
    python bench/exp_topk_histogram.py                       # GPU: correctness, then us per decode step
"""

import os
import sys

import torch
import triton
import triton.language as tl

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from kernels import csa_select as cs  # noqa: E402
from kernels.csa_select import _float_to_key, _key_to_float  # noqa: E402

BITS = 12                  # histogram of the keys' top 12 bits
NBINS = 1 << BITS
CHUNK = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4096   # scores per program in 1. and 2.
CAP = 64 if os.environ.get("TRITON_INTERPRET") == "1" else 4096     # candidates per tile in 3.
STOP_AFTER = [None]        # the benchmark's stage timing: return after this stage


@triton.jit
def _row_keys(score_ptr, row, chunk, T, S, t0, m, CHUNK: tl.constexpr):
    """This program's keys (0 where invisible or -inf: bin 0, which no finite score reaches) and offsets."""
    n_vis = tl.minimum((t0 + row % T + 1) // m, S)
    offs = chunk * CHUNK + tl.arange(0, CHUNK)
    v = tl.load(score_ptr + row * S + offs, mask=offs < n_vis, other=float("-inf"))
    ok = (offs < n_vis) & (v > float("-inf"))
    return tl.where(ok, _float_to_key(v), 0), offs


@triton.jit
def _hist_kernel(score_ptr, hist_ptr, T, S, t0, m, CHUNK: tl.constexpr, BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    key, _ = _row_keys(score_ptr, row, tl.program_id(1), T, S, t0, m, CHUNK)
    h = tl.histogram((key >> (32 - BITS)).to(tl.int32), 1 << BITS)                # [NBINS]
    bins = tl.arange(0, 1 << BITS)
    tl.atomic_add(hist_ptr + row * (1 << BITS) + bins, h, mask=(h > 0) & (bins > 0))


@triton.jit
def _threshold(hist_ptr, row, K: tl.constexpr, BITS: tl.constexpr):
    """(b*, n_sel): the bin where the count from the top first reaches n_sel = min(k, valid keys)."""
    hist = tl.load(hist_ptr + row * (1 << BITS) + tl.arange(0, 1 << BITS))
    n_sel = tl.minimum(tl.sum(hist, axis=0), K)
    from_top = tl.cumsum(tl.flip(hist, 0), 0)                   # keys in the top i + 1 bins
    b_star = (1 << BITS) - 1 - tl.sum((from_top < n_sel).to(tl.int32), axis=0)
    return b_star, n_sel


@triton.jit
def _collect_kernel(score_ptr, hist_ptr, count_ptr, sure_key_ptr, sure_idx_ptr, cand_key_ptr, cand_idx_ptr,
                    T, S, t0, m, K: tl.constexpr, CHUNK: tl.constexpr, BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    key, offs = _row_keys(score_ptr, row, tl.program_id(1), T, S, t0, m, CHUNK)
    b_star, _ = _threshold(hist_ptr, row, K, BITS)
    digit = (key >> (32 - BITS)).to(tl.int32)
    valid = key > 0
    for which in tl.static_range(2):                           # 0: sure (above b*), 1: candidates (in b*)
        take = valid & ((digit > b_star) if which == 0 else (digit == b_star))     # none when no key is valid
        n_take = tl.sum(take.to(tl.int32), axis=0)
        base = tl.atomic_add(count_ptr + row * 2 + which, n_take)
        pos = base + tl.cumsum(take.to(tl.int32), axis=0) - 1
        key_ptr = sure_key_ptr + row * K if which == 0 else cand_key_ptr + row * S
        idx_ptr = sure_idx_ptr + row * K if which == 0 else cand_idx_ptr + row * S
        tl.store(key_ptr + pos, key.to(tl.int32, bitcast=True), mask=take)
        tl.store(idx_ptr + pos, offs, mask=take)


@triton.jit
def _cand_tile(cand_key, cand_idx, t, n_cand, CAP: tl.constexpr):
    """Candidates t .. t + CAP: (slots j, keys as uint32, indices); past n_cand key 0, index 0."""
    j = t + tl.arange(0, CAP)
    key = tl.load(cand_key + j, mask=j < n_cand, other=0, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    idx = tl.load(cand_idx + j, mask=j < n_cand, other=0, cache_modifier=".cg")
    return j, key, idx


@triton.jit
def _final_kernel(hist_ptr, count_ptr, sure_key_ptr, sure_idx_ptr, cand_key_ptr, cand_idx_ptr,
                  out_idx_ptr, out_val_ptr, S, K: tl.constexpr, K_PAD: tl.constexpr, CAP: tl.constexpr,
                  BITS: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    _, n_sel = _threshold(hist_ptr, row, K, BITS)
    n_sure = tl.load(count_ptr + row * 2)
    n_cand = tl.load(count_ptr + row * 2 + 1)
    need = n_sel - n_sure                                        # candidates to take
    cand_key = cand_key_ptr + row * S
    cand_idx = cand_idx_ptr + row * S
    # the need-th largest candidate key, 2 bits a pass below the BITS they share
    thr = (tl.load(cand_key, mask=n_cand > 0, other=0) >> (32 - BITS) << (32 - BITS)).to(tl.uint32)
    n_ge = n_cand
    shift = 32 - BITS - 2
    while (n_ge > need) & (shift >= 0):
        sh = shift.to(tl.uint32)
        c1 = 0
        c2 = 0
        c3 = 0
        for t in range(0, n_cand, CAP):
            j, key, tile_idx = _cand_tile(cand_key, cand_idx, t, n_cand, CAP)
            c1 += tl.sum((key >= (thr | (1 << sh))).to(tl.int32), axis=0)
            c2 += tl.sum((key >= (thr | (2 << sh))).to(tl.int32), axis=0)
            c3 += tl.sum((key >= (thr | (3 << sh))).to(tl.int32), axis=0)
        step = (c1 >= need).to(tl.int32) + (c2 >= need).to(tl.int32) + (c3 >= need).to(tl.int32)
        n_ge = tl.where(step == 3, c3, tl.where(step == 2, c2, tl.where(step == 1, c1, n_ge)))
        thr = thr | (step.to(tl.uint32) << sh)
        shift -= 2
    # ties at thr: the earliest entries, i.e. the smallest indices; the idx_thr-th smallest tie index by a
    # radix select from the top bit (indices < 2^31), only when there are more ties than places
    n_above = 0
    n_tie = 0
    for t in range(0, n_cand, CAP):
        j, key, tile_idx = _cand_tile(cand_key, cand_idx, t, n_cand, CAP)
        n_above += tl.sum(((key > thr) & (j < n_cand)).to(tl.int32), axis=0)
        n_tie += tl.sum(((key == thr) & (j < n_cand)).to(tl.int32), axis=0)
    krem = need - n_above                                        # ties to take
    idx_thr = tl.full([], 0x7FFFFFFF, tl.int32)                  # take ties with index <= idx_thr
    if n_tie > krem:
        idx_thr = 0
        bit = 30
        while bit >= 0:                                          # the largest v with #(tie index < v) < krem
            trial = idx_thr | (1 << bit)
            below = 0
            for t in range(0, n_cand, CAP):
                j, key, idx = _cand_tile(cand_key, cand_idx, t, n_cand, CAP)
                below += tl.sum(((key == thr) & (j < n_cand) & (idx < trial)).to(tl.int32), axis=0)
            idx_thr = tl.where(below < krem, trial, idx_thr)
            bit -= 1
    # the k chosen: the sure entries, then (after them in the same buffer, which holds k) the candidates
    # above thr and the ties up to idx_thr; then all k sorted by index, as (index << 32 | key)
    sure_key = sure_key_ptr + row * K
    sure_idx = sure_idx_ptr + row * K
    filled = n_sure
    for t in range(0, n_cand, CAP):
        j, key, idx = _cand_tile(cand_key, cand_idx, t, n_cand, CAP)
        take = (j < n_cand) & ((key > thr) | ((key == thr) & (idx <= idx_thr)))
        pos = filled + tl.cumsum(take.to(tl.int32), axis=0) - 1
        tl.store(sure_key + pos, key.to(tl.int32, bitcast=True), mask=take)
        tl.store(sure_idx + pos, idx, mask=take)
        filled += tl.sum(take.to(tl.int32), axis=0)
    tl.debug_barrier()                                           # the stores above, by other threads
    slot = tl.arange(0, K_PAD)
    ok = slot < n_sel
    key = tl.load(sure_key + slot, mask=ok, other=0, cache_modifier=".cg").to(tl.uint32, bitcast=True)
    idx = tl.load(sure_idx + slot, mask=ok, other=0, cache_modifier=".cg")
    packed = tl.where(ok, (idx.to(tl.uint64) << 32) | key.to(tl.uint64), 0xFFFFFFFFFFFFFFFF)
    packed = tl.sort(packed, 0)                                  # by index; empty slots (all ones) last
    tl.store(out_idx_ptr + row * K + slot, tl.where(ok, (packed >> 32).to(tl.int32), -1), mask=slot < K)
    val = _key_to_float((packed & 0xFFFFFFFF).to(tl.uint32))
    tl.store(out_val_ptr + row * K + slot, tl.where(ok, val, float("-inf")), mask=slot < K)


def topk_histogram(scores: torch.Tensor, t0: int, m: int, topk: int):
    """scores [B, T, S] fp32 -> (idx int32, value fp32) [B, T, topk], as csa_select._topk_triton."""
    B, T, S = scores.shape
    rows, dev = B * T, scores.device
    hist = torch.zeros(rows, NBINS, dtype=torch.int32, device=dev)
    counts = torch.zeros(rows, 2, dtype=torch.int32, device=dev)
    sure_key = torch.empty(rows, topk, dtype=torch.int32, device=dev)
    sure_idx = torch.empty(rows, topk, dtype=torch.int32, device=dev)
    cand_key = torch.empty(rows, S, dtype=torch.int32, device=dev)
    cand_idx = torch.empty(rows, S, dtype=torch.int32, device=dev)
    idx = torch.empty(rows, topk, dtype=torch.int32, device=dev)
    val = torch.empty(rows, topk, dtype=torch.float32, device=dev)
    grid = (rows, triton.cdiv(S, CHUNK))
    if STOP_AFTER[0] == "memset":
        return idx.view(B, T, topk), val.view(B, T, topk)
    _hist_kernel[grid](scores, hist, T, S, t0, m, CHUNK=CHUNK, BITS=BITS, num_warps=8)
    if STOP_AFTER[0] == "histogram":
        return idx.view(B, T, topk), val.view(B, T, topk)
    _collect_kernel[grid](scores, hist, counts, sure_key, sure_idx, cand_key, cand_idx, T, S, t0, m,
                          K=topk, CHUNK=CHUNK, BITS=BITS, num_warps=8)
    if STOP_AFTER[0] == "collect":
        return idx.view(B, T, topk), val.view(B, T, topk)
    _final_kernel[(rows,)](hist, counts, sure_key, sure_idx, cand_key, cand_idx, idx, val, S, K=topk,
                           K_PAD=max(2, triton.next_power_of_2(topk)), CAP=CAP, BITS=BITS, num_warps=8)
    return idx.view(B, T, topk), val.view(B, T, topk)


def check(device, S, topk, B=2, pattern="random", seed=0):
    """Against the reference selection on scores built to have ties (exact zeros) or a rising row."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, 1, S, generator=g)
    if pattern == "ties":
        scores = scores.clamp(min=0) * (torch.rand(B, 1, S, generator=g) < 0.02)   # mostly exact zeros
    elif pattern == "rising":
        scores = torch.arange(S, dtype=torch.float32).expand(B, 1, S) / S
    scores = scores.to(device)
    n_vis = 7 * S // 10                                  # a query that sees 70% of the entries
    t0 = 4 * n_vis - 1
    idx, val = topk_histogram(scores, t0, 4, topk)
    masked = scores.clone()
    masked[..., n_vis:] = float("-inf")
    want_val, want_idx = masked.sort(dim=-1, descending=True, stable=True)
    want_val, want_idx = want_val[..., :topk], want_idx[..., :topk]
    want_idx = want_idx.masked_fill(want_val == float("-inf"), -1)
    order = want_idx.masked_fill(want_idx < 0, 1 << 62).argsort(dim=-1)
    want_idx, want_val = want_idx.gather(-1, order).int(), want_val.gather(-1, order)
    ok = torch.equal(idx, want_idx) and torch.equal(val, want_val)
    tree = cs._topk_triton(scores, t0, 4, topk) if device == "cuda" or os.environ.get("TRITON_INTERPRET") == "1" \
        else None
    same_as_tree = tree is not None and torch.equal(tree[0], idx)
    print(f"check S={S} topk={topk} {pattern}: {'ok' if ok else 'DIFFERS'} (same as the tree: {same_as_tree})")
    if not ok:
        raise SystemExit("the histogram top-k differs from the reference")


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        sys.exit("needs a GPU, or TRITON_INTERPRET=1 for the correctness check on the CPU")
    sizes = [(600, 32), (1000, 16)] if device == "cpu" else [(262144, 512), (65536, 512), (3000, 512)]
    for S, topk in sizes:
        for pattern in ("random", "ties", "rising"):
            check(device, S, topk, pattern=pattern)
    if device == "cpu":
        return
    from triton.testing import do_bench_cudagraph
    for B in (1, 8):
        scores = torch.randn(B, 1, 262144, device="cuda")
        t0 = 4 * 262144 - 1
        tree = 1e3 * do_bench_cudagraph(lambda: cs._topk_triton(scores, t0, 4, 512), rep=50)
        hist = 1e3 * do_bench_cudagraph(lambda: topk_histogram(scores, t0, 4, 512), rep=50)
        print(f"decode top-512 of 262144, B={B}: tree {tree:.1f} us, histogram {hist:.1f} us")
        stages = {"memset": 0.0, "histogram": 0.0, "collect": 0.0, "select and sort": 0.0}
        for name in stages:                      # each stage alone, on the buffers the others leave
            STOP_AFTER[0] = name
            stages[name] = 1e3 * do_bench_cudagraph(lambda: topk_histogram(scores, t0, 4, 512), rep=50)
        STOP_AFTER[0] = None
        cumulative = list(stages.values())
        print("  cumulative by stage: " + ", ".join(f"{k} {v:.1f} us" for k, v in zip(stages, cumulative)))


if __name__ == "__main__":
    main()
