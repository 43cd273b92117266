"""DeepSeek V4 hybrid attention: sliding window, CSA and HCA with a sink, the decode caches, and a
full-attention twin (V4-REFERENCE.md section 1; n_h heads of dim c, r RoPE dims, ratio m, window n_win).

Every layer attends with ONE softmax over the union of two key sets:
  * the sliding window: the raw K == V rows of positions t-n_win+1 .. t (the current token included);
  * compressed entries (layers with m > 0): the compressor pools every block of m tokens into one entry.
    HCA (m = 128 in V4, non-overlapping blocks) attends every visible entry; CSA (m = 4, each entry pools
    2m tokens) attends only the top-k entries that the lightning indexer scores highest.
Entry s is visible to query t iff s < (t + 1) // m: a query never sees a block holding a later token.

    cq = q_norm(x @ wq_a)                       latent, shared with the indexer
    q  = rmsnorm_noweight((cq @ wq_b).view(n_h, c)),  rope on the last r dims at position t
    kv = kv_norm(x @ wkv),  rope on the last r dims     one head that is both key and value (MQA)
    p  = exp(l) / (sum exp(l) + exp(attn_sink[h])),  l = q . kv * c**-0.5   (the sink: denominator only)
    o  = inverse_rope(sum p * kv);  o -> per group wo_a -> concat -> wo_b

Compressor (per channel softmax-gated pooling, entry i at position i*m after its norm):
    HCA entry i = sum_{j in block i} softmax_j(x_j @ wgate + ape[j]) * (x_j @ wkv)
    CSA entry i = the same over 2m rows: channels [:c] of block i-1 and channels [c:] of block i
Indexer: I[t, s] = sum_h w[t, h] * relu(qI[t, h] . KI[s]),  qI = cq @ indexer.wq_b,  KI its own compressor,
         w = (x @ weights_proj) * c_I**-0.5 * H_I**-0.5;  top-k over the visible s, -1 padding.

Choices where V4 is silent or where we differ from production:
  * No document masking: compressor blocks align to position 0 of the sequence (V4 aligns them to each
    document start and drops a trailing partial block).
  * The indexer runs in full precision: no FP4 and no Hadamard rotation (which changes nothing without
    quantisation). Its RoPE uses the layer's frequencies on the last r dims, interleaved.
  * The sink is added in the scaled-logit space; no YaRN attention-temperature (mscale) factor.
  * Indexer training (the V3.2 recipe V4 reuses): the target p is the main attention's probability on each
    compressed entry (the one softmax over window + entries + sink), summed over heads and L1-normalised,
    detached; loss = KL(p || softmax(I_t)) averaged over queries that see at least one entry. The indexer's
    inputs (x and cq) are always detached, so the KL never reaches the main model; top-k passes no gradient,
    so the LM loss never reaches the indexer. cfg.csa_stage: "dense" (V4's early stage: CSA attends every
    visible entry, no indexer), "warmup" (dense attention, KL over all visible entries; the caller freezes
    the main model), "sparse" (top-k attention, KL over the selected set).
  * Memory of the full-sequence path: the window is computed in blocks of n_win queries against their
    2*n_win-1 key rows (O(T * n_win)); HCA builds [T, T/m] logits; CSA selection is chunked over queries and
    its attention gathers [T, k] entries. Nothing is [T, T] except in the full twin.
  * Caches: the window is a ring buffer of n_win rows; each compressor keeps the (fp32) rows of its
    incomplete block (plus the previous block for CSA, at most 2m rows); compressed entries and indexer
    keys grow in buffers whose capacity doubles.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


class RMSNorm(nn.Module):
    """y = x / sqrt(mean(x^2) + eps) * weight, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


# ----------------------------------------------------------------------------------------------------
# RoPE: interleaved pairs, on the last r dims only; YaRN for compressed layers
# ----------------------------------------------------------------------------------------------------

def rope_inv_freq(rope_dim: int, base: float, yarn: dict | None = None) -> list[float]:
    """Inverse frequencies of the r/2 rotating pairs. With `yarn` (factor, original_seq_len, beta_fast,
    beta_slow), slow pairs are divided by `factor` and fast pairs kept, blended over a linear ramp between
    the pairs that turn beta_fast and beta_slow times over original_seq_len (applied whenever given, as the
    official code does for compressed layers)."""
    inv = [base ** (-2 * i / rope_dim) for i in range(rope_dim // 2)]
    if yarn is None:
        return inv

    def pair_turning(rotations):   # the pair index that turns `rotations` times over original_seq_len
        return rope_dim * math.log(yarn["original_seq_len"] / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(pair_turning(yarn["beta_fast"])), 0)
    high = min(math.ceil(pair_turning(yarn["beta_slow"])), rope_dim - 1)
    high = high + 0.001 if low == high else high
    out = []
    for i, f in enumerate(inv):
        keep = 1 - min(max((i - low) / (high - low), 0.0), 1.0)   # 1 for fast pairs, 0 for slow ones
        out.append(f / yarn["factor"] * (1 - keep) + f * keep)
    return out


_FREQ_TENSORS: dict = {}


def _freq_tensor(inv_freq: list[float], device) -> torch.Tensor:
    """inv_freq as an fp32 tensor on `device`, made once per (frequencies, device): torch.tensor(list,
    device="cuda") copies from pageable host memory and waits for the GPU's queue to drain, which
    apply_rope would otherwise do several times per layer per step. (Under torch.compile a constant.)"""
    if torch.compiler.is_compiling():
        return torch.tensor(inv_freq, dtype=torch.float32, device=device)
    key = (tuple(inv_freq), device)
    if key not in _FREQ_TENSORS:
        with torch.inference_mode(False):
            _FREQ_TENSORS[key] = torch.tensor(inv_freq, dtype=torch.float32, device=device)
    return _FREQ_TENSORS[key]


def apply_rope(x: torch.Tensor, positions: torch.Tensor, inv_freq: list[float], inverse: bool = False):
    """Rotate the LAST r = 2 * len(inv_freq) dims of x; pair (2i, 2i+1) is one complex number.
    x: [B, T, ..., D], positions: [T]. inverse=True rotates by -angle (undoes the rotation)."""
    r = 2 * len(inv_freq)
    freq = _freq_tensor(inv_freq, x.device)
    angle = positions.to(device=x.device, dtype=torch.float32)[:, None] * freq          # [T, r/2]
    angle = angle.view(angle.shape[0], *([1] * (x.dim() - 3)), r // 2)
    cos, sin = angle.cos(), (-angle if inverse else angle).sin()
    pairs = x[..., -r:].float().unflatten(-1, (r // 2, 2))                               # [..., r/2, 2]
    re, im = pairs[..., 0], pairs[..., 1]
    rotated = torch.stack([re * cos - im * sin, re * sin + im * cos], dim=-1).flatten(-2)
    return torch.cat([x[..., :-r], rotated.to(x.dtype)], dim=-1)


# ----------------------------------------------------------------------------------------------------
# Compressor
# ----------------------------------------------------------------------------------------------------

class Compressor(nn.Module):
    """Pools each complete block of `ratio` tokens into one entry of width `head_dim`. CSA (ratio 4)
    overlaps: wkv / wgate / ape are twice as wide and entry i also reads the first half of block i-1."""

    def __init__(self, dim: int, head_dim: int, ratio: int, eps: float):
        super().__init__()
        self.ratio, self.head_dim = ratio, head_dim
        self.overlap = ratio == 4
        coff = 2 if self.overlap else 1
        self.wkv = nn.Linear(dim, coff * head_dim, bias=False)
        self.wgate = nn.Linear(dim, coff * head_dim, bias=False)
        self.ape = nn.Parameter(torch.zeros(ratio, coff * head_dim))   # gate bias by position in block
        self.norm = RMSNorm(head_dim, eps)

    def project(self, x: torch.Tensor, pos0: int):
        """Per-token rows in fp32: kv [B, T, coff*c] and gate scores (+ ape) [B, T, coff*c]."""
        in_block = torch.arange(pos0, pos0 + x.shape[1], device=x.device) % self.ratio
        kv = F.linear(x.float(), self.wkv.weight.float())
        score = F.linear(x.float(), self.wgate.weight.float()) + self.ape.float()[in_block]
        return kv, score

    def pool(self, kv: torch.Tensor, score: torch.Tensor, first_block: int, inv_freq: list[float]):
        """Entries of the complete blocks in rows that start at block `first_block`: [B, n, c] (fp32).
        For CSA the block before the first is padded (kv 0, score -inf), right for block 0 only."""
        B, m, c = kv.shape[0], self.ratio, self.head_dim
        n = kv.shape[1] // m
        if n == 0:
            return kv.new_zeros(B, 0, c)
        kv = kv[:, :n * m].unflatten(1, (n, m))                       # [B, n, m, coff*c]
        score = score[:, :n * m].unflatten(1, (n, m))
        if self.overlap:                                               # 2m candidates per channel
            prev_kv = F.pad(kv[:, :-1, :, :c], (0, 0, 0, 0, 1, 0))
            prev_score = F.pad(score[:, :-1, :, :c], (0, 0, 0, 0, 1, 0), value=float("-inf"))
            kv = torch.cat([prev_kv, kv[..., c:]], dim=2)              # [B, n, 2m, c]
            score = torch.cat([prev_score, score[..., c:]], dim=2)
        entries = (score.softmax(dim=2) * kv).sum(dim=2)               # [B, n, c]
        positions = (first_block + torch.arange(n, device=kv.device)) * m
        return apply_rope(self.norm(entries), positions, inv_freq)

    def forward(self, x: torch.Tensor, pos0: int, inv_freq: list[float], cache: CompressorCache | None = None):
        """All entries visible after x (tokens pos0 ..) is taken in: [B, N, c] in x's dtype; from an FP8
        cache (the indexer's, ModelConfig.index_fp8) as it keeps them: (e4m3 [B, N, c], scale [B, N])."""
        kv, score = self.project(x, pos0)
        if cache is None:
            return self.pool(kv, score, 0, inv_freq).to(x.dtype)
        kv = torch.cat([cache.kv_rows, kv], dim=1)                     # rows from a block boundary
        score = torch.cat([cache.score_rows, score], dim=1)
        first = (pos0 - cache.kv_rows.shape[1]) // self.ratio
        done, end = pos0 // self.ratio, pos0 + x.shape[1]
        cache.append_entries(self.pool(kv, score, first, inv_freq)[:, done - first:])
        keep = max(0, end // self.ratio - (1 if self.overlap else 0)) * self.ratio - first * self.ratio
        cache.kv_rows, cache.score_rows = kv[:, keep:], score[:, keep:]
        return cache.entries_view(x.dtype)


# ----------------------------------------------------------------------------------------------------
# Lightning indexer and the CSA selection
# ----------------------------------------------------------------------------------------------------

class Indexer(nn.Module):
    def __init__(self, cfg, ratio: int):
        super().__init__()
        self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.index_n_heads * cfg.index_head_dim, bias=False)
        self.weights_proj = nn.Linear(cfg.dim, cfg.index_n_heads, bias=False)
        self.compressor = Compressor(cfg.dim, cfg.index_head_dim, ratio, cfg.norm_eps)

    def forward(self, x, cq, pos0: int, inv_freq, cache=None):
        """-> queries qI [B, T, H_I, c_I], head weights w [B, T, H_I], keys KI [B, N, c_I]."""
        B, T, _ = x.shape
        pos = torch.arange(pos0, pos0 + T, device=x.device)
        q = apply_rope(self.wq_b(cq).view(B, T, self.n_heads, self.head_dim), pos, inv_freq)
        w = self.weights_proj(x) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
        return q, w, self.compressor(x, pos0, inv_freq, cache)


def gather_rows(src: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """src [B, N, c], idx [B, T, K] (-1 allowed: gives row 0, to be masked) -> [B, T, K, c].
    index_select on the flattened rows, not src[batch, idx]: its backward is an index_add, where
    advanced indexing's backward (a sorted, deterministic index_put) took 60% of a small-preset
    training step on an H200."""
    if src.shape[1] == 0:
        src = F.pad(src, (0, 0, 0, 1))
    B, N, c = src.shape
    rows = idx.clamp(min=0) + torch.arange(B, device=src.device)[:, None, None] * N      # [B, T, K]
    return src.reshape(B * N, c).index_select(0, rows.flatten()).view(*idx.shape, c)


SCORE_CHUNK_ELEMS = 2 ** 26   # elements of one query chunk's [B, chunk, K, H_I] products (256 MiB in fp32)


def _indexer_scores(index_q, index_w, index_keys, idx):
    if idx is None:
        dots = torch.einsum("bthc,bnc->btnh", index_q, index_keys)          # [B, T, N, H_I]
    else:
        dots = torch.einsum("bthc,btkc->btkh", index_q, gather_rows(index_keys, idx))
    return (dots.float().relu() * index_w.float()[:, :, None, :]).sum(-1)


def indexer_scores(index_q, index_w, index_keys, idx=None):
    """I[t, s] = sum_h w[t, h] * relu(qI[t, h] . KI[s]) in fp32: over all keys [B, T, N], or over the
    selected keys idx [B, T, K] -> [B, T, K].

    The products behind each score are H_I times bigger than the scores ([B, T, K, H_I]: 8 GiB at
    T = 65536 with 64 heads and k = 512), so long sequences go in query chunks, and under autograd each
    chunk is checkpointed: the backward keeps only the scores and recomputes a chunk's products."""
    B, T, n_heads = index_w.shape
    width = index_keys.shape[1] if idx is None else idx.shape[-1]
    chunk = max(1, SCORE_CHUNK_ELEMS // max(1, B * width * n_heads))
    if chunk >= T:
        return _indexer_scores(index_q, index_w, index_keys, idx)
    grad = torch.is_grad_enabled() and any(t.requires_grad for t in (index_q, index_w, index_keys))
    parts = []
    for s in range(0, T, chunk):
        args = (index_q[:, s:s + chunk], index_w[:, s:s + chunk], index_keys,
                None if idx is None else idx[:, s:s + chunk])
        parts.append(checkpoint(_indexer_scores, *args, use_reentrant=False) if grad else _indexer_scores(*args))
    return torch.cat(parts, dim=1)


def visible_entries(positions: torch.Tensor, n_entries: int, ratio: int) -> torch.Tensor:
    """[T, N] bool: entry s is visible to the query at position t iff s < (t + 1) // m."""
    s = torch.arange(n_entries, device=positions.device)
    return s[None, :] < (positions[:, None] + 1) // ratio


@torch.no_grad()
def csa_select(index_q, index_w, index_keys, positions, ratio: int, topk: int,
               key_scale=None) -> torch.Tensor:
    """Indices [B, T, topk] of each query's top-k visible entries by indexer score, in index order, -1
    in the last slots where fewer are visible. Scores are computed in query chunks so memory stays
    O(chunk * N); no gradient.
    This function and sparse_attention are the plain references for kernels/csa_select.py.
    key_scale [B, N]: the keys are e4m3 (ModelConfig.index_fp8); the queries are quantised the same way,
    one scale per row folded into index_w, and the products of e4m3 values are exact in fp32."""
    B, T = index_q.shape[:2]
    if key_scale is not None:
        from kernels.csa_select import fp8_queries
        index_q, index_w = fp8_queries(index_q, index_w, impl="reference")
        index_q, index_keys = index_q.float(), index_keys.float()
    N = index_keys.shape[1]
    out = torch.full((B, T, topk), -1, dtype=torch.long, device=index_q.device)
    k = min(topk, N)
    if k == 0:
        return out
    chunk = max(1, 2 ** 25 // (B * N * index_q.shape[2]))
    for s in range(0, T, chunk):
        scores = indexer_scores(index_q[:, s:s + chunk], index_w[:, s:s + chunk], index_keys)
        if key_scale is not None:
            scores = scores * key_scale.float()[:, None, :]
        scores = scores.masked_fill(~visible_entries(positions[s:s + chunk], N, ratio), float("-inf"))
        # a stable sort, not topk: relu makes exact ties (score 0) common, and they must go the same
        # way (to the earlier entry) however the sequence was chunked
        value, idx = scores.sort(dim=-1, descending=True, stable=True)
        value, idx = value[..., :k], idx[..., :k]                                # [B, chunk, k]
        out[:, s:s + chunk, :k] = idx.masked_fill(value == float("-inf"), -1)
    # in index order, empty slots last, as the kernel returns them (attention ignores the order)
    return out.gather(-1, out.masked_fill(out < 0, 1 << 62).argsort(dim=-1))


def indexer_kl(p_entries: torch.Tensor, scores: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(p || softmax(I)) averaged over queries with at least one valid entry. p_entries [B, T, H, K]
    the main attention's probabilities (detached here), scores [B, T, K], valid [B, T, K] bool."""
    rows = valid.any(-1)
    if not rows.any():
        return scores.sum() * 0.0
    target = p_entries.detach().sum(2)[rows]                                     # [R, K]
    target = target / target.sum(-1, keepdim=True).clamp_min(1e-20)
    valid = valid[rows]
    log_q = scores[rows].masked_fill(~valid, float("-inf")).log_softmax(-1)
    kl = torch.where(valid, target * (target.clamp_min(1e-20).log() - log_q), 0.0)
    return kl.sum(-1).mean()


# ----------------------------------------------------------------------------------------------------
# Core attention: one softmax with the sink over the window and the compressed entries
# ----------------------------------------------------------------------------------------------------

def sink_softmax(logits: torch.Tensor, attn_sink: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim with exp(attn_sink[h]) added to the denominator only.
    logits [B, T, H, K] (masked = -inf), attn_sink [H] -> probabilities [B, T, H, K] in fp32."""
    sink = attn_sink.float().view(1, 1, -1, 1).expand(*logits.shape[:-1], 1)
    return torch.cat([logits.float(), sink], dim=-1).softmax(dim=-1)[..., :-1]


ATTENTION_CHUNK = 8192   # queries per checkpointed chunk when training on longer sequences


def sparse_attention(q, kv, window: int, entries, entry_idx, ratio: int, pos0: int, attn_sink, softmax_scale):
    """o [B, T, H, c] and the probabilities on the compressed entries [B, T, H, K or N].

    q [B, T, H, c]: queries at positions pos0 .. pos0+T-1.
    kv [B, P + T, c]: the window's K == V rows at positions pos0-P .. pos0+T-1 (P <= window-1 earlier rows).
    entries [B, N, c] or None (window only); entry_idx [B, T, K] with -1 padding (CSA top-k), or None for
    every visible entry. The window is banded: queries in blocks of Q, each against its Q+window-1 rows.

    Under autograd, sequences longer than ATTENTION_CHUNK go in checkpointed query chunks (each with its
    window's earlier rows): the backward then keeps o and the probabilities, not the gathered entries
    ([B, T, K, c]: 8 GiB in fp32 at T = 65536, k = 256, c = 128) or the logits.
    """
    B, T, H, c = q.shape
    tensors = (q, kv, entries, attn_sink)
    if T > ATTENTION_CHUNK and torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        P = kv.shape[1] - T
        outs = []
        for s in range(0, T, ATTENTION_CHUNK):
            e = min(T, s + ATTENTION_CHUNK)
            first = max(0, P + s - (window - 1))                  # the chunk's earlier window rows, then its own
            idx = None if entry_idx is None else entry_idx[:, s:e]
            outs.append(checkpoint(sparse_attention, q[:, s:e], kv[:, first:P + e], window, entries, idx, ratio,
                                   pos0 + s, attn_sink, softmax_scale, use_reentrant=False))
        return torch.cat([o for o, _ in outs], dim=1), torch.cat([p for _, p in outs], dim=1)
    P = kv.shape[1] - T
    Q = min(window, T)
    nb = -(-T // Q)
    Tp = nb * Q                                                   # queries padded to whole blocks
    q = F.pad(q, (0, 0, 0, 0, 0, Tp - T))
    positions = pos0 + torch.arange(Tp, device=q.device)
    kv = F.pad(kv, (0, 0, window - 1 - P, Tp - T))                # [B, window-1 + Tp, c]
    blocks = kv.unfold(1, Q + window - 1, Q).transpose(2, 3)      # [B, nb, Q+window-1, c]
    logits = torch.einsum("bnqhc,bnkc->bnqhk", q.view(B, nb, Q, H, c), blocks) * softmax_scale
    # query i of block b sits at padded row window-1+b*Q+i, its key j at row b*Q+j
    i = torch.arange(Q, device=q.device)[:, None]
    j = torch.arange(Q + window - 1, device=q.device)
    distance = i + window - 1 - j                                 # [Q, Q+window-1] query pos - key pos
    real = (torch.arange(nb, device=q.device)[:, None] * Q + j) >= window - 1 - P   # [nb, Q+window-1]
    seen = (distance >= 0) & (distance < window) & real[:, None, :]                 # [nb, Q, Q+window-1]
    parts = [logits.masked_fill(~seen[None, :, :, None, :], float("-inf")).view(B, Tp, H, -1)]
    if entries is not None:
        if entry_idx is None:                                     # every visible entry (HCA, dense CSA)
            values = entries                                      # [B, N, c]
            logits_c = torch.einsum("bthc,bnc->bthn", q, values) * softmax_scale
            shown = visible_entries(positions, entries.shape[1], ratio)[None, :, None, :]
        else:                                                     # the selected entries (CSA top-k)
            entry_idx = F.pad(entry_idx, (0, 0, 0, Tp - T), value=-1)
            values = gather_rows(entries, entry_idx)              # [B, Tp, K, c]
            logits_c = torch.einsum("bthc,btkc->bthk", q, values) * softmax_scale
            shown = (entry_idx >= 0)[:, :, None, :]
        parts.append(logits_c.masked_fill(~shown, float("-inf")))
    p = sink_softmax(torch.cat(parts, dim=-1), attn_sink)        # [B, Tp, H, Kw + Kc]
    p_window, p_entries = p.split([Q + window - 1, p.shape[-1] - Q - window + 1], dim=-1)
    p_window = p_window.to(kv.dtype).view(B, nb, Q, H, -1)
    o = torch.einsum("bnqhk,bnkc->bnqhc", p_window, blocks).reshape(B, Tp, H, c)
    if entries is not None:
        pattern = "bthn,bnc->bthc" if entry_idx is None else "bthk,btkc->bthc"
        o = o + torch.einsum(pattern, p_entries.to(values.dtype), values)
    return o[:, :T], p_entries[:, :T]


def full_attention(q, kv, pos0: int, attn_sink, softmax_scale):
    """The twin: queries at pos0 .. pos0+T-1 attend every key row 0 .. their own position. [B, T, H, c]."""
    T = q.shape[1]
    query_pos = pos0 + torch.arange(T, device=q.device)
    later = torch.arange(kv.shape[1], device=q.device)[None, :] > query_pos[:, None]        # [T, S]
    logits = torch.einsum("bthc,bsc->bths", q, kv) * softmax_scale
    p = sink_softmax(logits.masked_fill(later[None, :, None, :], float("-inf")), attn_sink)
    return torch.einsum("bths,bsc->bthc", p.to(kv.dtype), kv)


# ----------------------------------------------------------------------------------------------------
# Caches
# ----------------------------------------------------------------------------------------------------

class GrowingBuffer:
    """Rows appended along dim 1 of a [B, capacity, width] tensor whose capacity doubles when full, so
    decoding T tokens one at a time copies O(T) rows in all. `view()` is the filled part."""

    def __init__(self, batch_size: int, width: int, device, dtype):
        self.data = torch.empty(batch_size, 0, width, device=device, dtype=dtype)
        self.length = 0

    def append(self, rows: torch.Tensor):
        need = self.length + rows.shape[1]
        if need > self.data.shape[1]:
            grown = self.data.new_empty(self.data.shape[0], max(need, 2 * self.data.shape[1]), self.data.shape[2])
            grown[:, :self.length] = self.data[:, :self.length]
            self.data = grown
        self.data[:, self.length:need] = rows.to(self.data.dtype)
        self.length = need

    def view(self) -> torch.Tensor:
        return self.data[:, :self.length]


class CompressorCache:
    """Fixed-size state (fp32 rows of the incomplete block, and of the previous block for CSA) plus the
    growing compressed entries; with fp8, entries in e4m3 and a power-of-two scale each (the indexer's
    keys under ModelConfig.index_fp8: half the bytes of bf16, and what the FP8 top-k reads)."""

    def __init__(self, batch_size: int, compressor: Compressor, device, dtype, fp8: bool = False):
        width = compressor.wkv.out_features
        self.kv_rows = torch.zeros(batch_size, 0, width, device=device)
        self.score_rows = torch.zeros(batch_size, 0, width, device=device)
        entry_dtype = torch.float8_e4m3fn if fp8 else dtype
        self.entries = GrowingBuffer(batch_size, compressor.head_dim, device, entry_dtype)
        self.scales = GrowingBuffer(batch_size, 1, device, torch.float32) if fp8 else None
        self.dtype = dtype

    def append_entries(self, rows: torch.Tensor):
        if self.scales is None:
            self.entries.append(rows)
        else:
            from kernels.csa_select import quantize_rows
            rows8, scale = quantize_rows(rows.to(self.dtype))               # [B, n, c] e4m3, [B, n]
            # (rounded to the cache dtype first, as the forward without a cache rounds to x's dtype)
            self.entries.append(rows8)
            self.scales.append(scale[..., None])

    def entries_view(self, dtype):
        if self.scales is None:
            return self.entries.view().to(dtype)
        return self.entries.view(), self.scales.view()[..., 0]


class AttentionCache:
    """One layer's decode cache. V4: a ring buffer of the last n_win K == V rows (slot = position % n_win)
    and the compressors' caches. Full twin: every K == V row (in `kv`)."""

    def __init__(self, batch_size, window, head_dim, device, dtype, compressor=None, index_compressor=None,
                 full=False, index_fp8=False):
        """compressor / index_compressor: the Compressor modules whose caches to keep (or None);
        index_fp8: the indexer's entries in FP8."""
        self.pos = 0
        self.window = window
        self.kv = GrowingBuffer(batch_size, head_dim, device, dtype) if full else None
        self.ring = None if full else torch.zeros(batch_size, window, head_dim, device=device, dtype=dtype)
        self.compressor = None if compressor is None else CompressorCache(batch_size, compressor, device, dtype)
        self.indexer = None if index_compressor is None else \
            CompressorCache(batch_size, index_compressor, device, dtype, fp8=index_fp8)

    def window_rows(self) -> torch.Tensor:
        """The min(pos, n_win - 1) rows before pos, oldest first: [B, P, c]."""
        before = torch.arange(self.pos - min(self.pos, self.window - 1), self.pos, device=self.ring.device)
        return self.ring[:, before % self.window]

    def write_window(self, kv: torch.Tensor):
        keep = min(kv.shape[1], self.window)
        after = torch.arange(self.pos + kv.shape[1] - keep, self.pos + kv.shape[1], device=self.ring.device)
        self.ring[:, after % self.window] = kv[:, -keep:].to(self.ring.dtype)


# ----------------------------------------------------------------------------------------------------
# The attention layer
# ----------------------------------------------------------------------------------------------------

def csa_kernels(x: torch.Tensor, mode: str):
    """kernels/csa_select.py (Triton: indexer scores + top-k, sparse attention) for CUDA inputs, None
    elsewhere or when mode (ModelConfig.kernels) is "reference", the switch that forces this file's code.
    Imported here, not at the top, so the model runs where Triton is not installed."""
    if not x.is_cuda or mode == "reference":
        return None
    from kernels import csa_select
    return csa_select


class Attention(nn.Module):
    """One V4 attention layer: window only (m = 0), CSA (m = 4) or HCA (other m), or with
    cfg.attention == "full" the twin with the same projections that attends every earlier token."""

    def __init__(self, cfg, layer_id: int, compress_ratio: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.layer_id = layer_id
        self.full = cfg.attention == "full"
        ratio = cfg.compress_ratios[layer_id] if compress_ratio is None else compress_ratio
        self.compress_ratio = 0 if self.full else ratio
        self.n_heads, self.head_dim = cfg.n_heads, cfg.head_dim
        self.window_size, self.eps = cfg.window_size, cfg.norm_eps
        self.softmax_scale = cfg.head_dim ** -0.5
        self.wq_a = nn.Linear(cfg.dim, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, cfg.n_heads * cfg.head_dim, bias=False)
        self.wkv = nn.Linear(cfg.dim, cfg.head_dim, bias=False)
        self.kv_norm = RMSNorm(cfg.head_dim, cfg.norm_eps)
        # wo_a: one Linear [o_groups * o_lora_rank, n_heads * c / o_groups], applied group by group
        self.wo_a = nn.Linear(cfg.n_heads * cfg.head_dim // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, bias=False)
        self.wo_b = nn.Linear(cfg.o_groups * cfg.o_lora_rank, cfg.dim, bias=False)
        self.attn_sink = nn.Parameter(torch.zeros(cfg.n_heads, dtype=torch.float32))
        if self.compress_ratio:
            yarn = dict(factor=cfg.rope_factor, original_seq_len=cfg.original_seq_len,
                        beta_fast=cfg.beta_fast, beta_slow=cfg.beta_slow)
            self.inv_freq = rope_inv_freq(cfg.rope_head_dim, cfg.compress_rope_theta, yarn)
            self.compressor = Compressor(cfg.dim, cfg.head_dim, self.compress_ratio, cfg.norm_eps)
        else:
            self.inv_freq = rope_inv_freq(cfg.rope_head_dim, cfg.rope_theta)
            self.compressor = None
        self.indexer = Indexer(cfg, self.compress_ratio) if self.compress_ratio == 4 else None
        self.indexer_loss = None
        self.wo_a_fp8 = None            # model.use_fp8 sets the FP8 implementation ("auto" / "reference")
        self.reset_parameters()

    def reset_parameters(self):
        """Linear weights normal(0, init_std); norm weights 1; sinks and ape 0 (our choice: V4 does not
        publish its initialisation). Also used after materialising a meta-device model."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, mean=0.0, std=self.cfg.init_std)
            elif isinstance(module, RMSNorm):
                nn.init.ones_(module.weight)
            elif isinstance(module, Compressor):
                nn.init.zeros_(module.ape)
        nn.init.zeros_(self.attn_sink)

    @property
    def uses_topk(self) -> bool:
        return self.indexer is not None and self.cfg.csa_stage == "sparse"

    def new_cache(self, batch_size: int, device=None, dtype=torch.float32) -> AttentionCache:
        return AttentionCache(batch_size, self.window_size, self.head_dim, device, dtype,
                              self.compressor, self.indexer.compressor if self.uses_topk else None, self.full,
                              index_fp8=self.cfg.index_fp8)

    def cache_bytes(self, T: int, batch_size: int = 1, dtype=torch.bfloat16) -> int:
        """Bytes this layer's cache holds at context length T: K == V rows, entries and indexer keys in
        `dtype` (indexer keys in e4m3 plus an fp32 scale under index_fp8); the compressors' state rows in
        fp32 (counted at their full 2m rows for CSA, m for HCA)."""
        size = torch.empty(0, dtype=dtype).element_size()
        if self.full:
            return batch_size * T * self.head_dim * size
        total = self.window_size * self.head_dim * size                       # the ring buffer
        for comp in self.compressors_cached():
            width = comp.wkv.out_features                                      # coff * c
            state_rows = (width // comp.head_dim) * comp.ratio                 # 2m for CSA, m for HCA
            fp8 = self.cfg.index_fp8 and self.indexer is not None and comp is self.indexer.compressor
            per_entry = comp.head_dim + 4 if fp8 else comp.head_dim * size
            total += 2 * state_rows * width * 4 + (T // comp.ratio) * per_entry
        return batch_size * total

    def compressors_cached(self) -> list:
        """The compressors whose state and entries the decode cache keeps: the layer's own, and the
        indexer's when the top-k is used."""
        comps = [] if self.compressor is None else [self.compressor]
        return comps + ([self.indexer.compressor] if self.uses_topk else [])

    def attention_flops(self, T: int) -> float:
        """Forward FLOPs per token of the attention core, averaged over a training sequence of length T
        (2 per multiply-add): QK^T and PV over the keys each query sees, compressor pooling, indexer
        scores. Projections are excluded."""
        t = torch.arange(1, T + 1, dtype=torch.float64)            # query t+1 sees t+1 tokens
        per_key = 4 * self.n_heads * self.head_dim
        if self.full:
            return per_key * t.mean().item()
        keys = t.clamp(max=self.window_size)
        flops = 0.0
        if self.compress_ratio:
            visible = torch.div(t, self.compress_ratio, rounding_mode="floor")
            keys = keys + (visible.clamp(max=self.cfg.index_topk) if self.uses_topk else visible)
            flops += 2 * self.compressor.wkv.out_features
            if self.uses_topk:
                ix = self.indexer
                flops += 2 * ix.n_heads * (ix.head_dim + 1) * visible.mean().item()
                flops += 2 * ix.compressor.wkv.out_features
        return flops + per_key * keys.mean().item()

    def forward(self, x: torch.Tensor, cache: AttentionCache | None = None) -> torch.Tensor:
        """x [B, T, dim] -> [B, T, dim]. Without a cache the positions are 0 .. T-1; with one, x holds the
        next T >= 1 tokens, positions continue from cache.pos, and the cache is advanced in place. After a
        training forward of a CSA layer whose indexer is trained, self.indexer_loss holds its KL."""
        if x.dim() != 3 or x.shape[-1] != self.cfg.dim:
            raise ValueError(f"Attention expects x of shape [B, T, {self.cfg.dim}], got {tuple(x.shape)}")
        B, T, _ = x.shape
        pos0 = 0 if cache is None else cache.pos
        if pos0 + T > self.cfg.max_seq_len:
            raise ValueError(f"position {pos0 + T} would pass ModelConfig.max_seq_len = {self.cfg.max_seq_len}")
        pos = torch.arange(pos0, pos0 + T, device=x.device)
        cq = self.q_norm(self.wq_a(x))                                        # [B, T, q_lora_rank]
        q = self.wq_b(cq).view(B, T, self.n_heads, self.head_dim)             # [B, T, n_h, c]
        q = (q.float() * torch.rsqrt(q.float().pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        q = apply_rope(q, pos, self.inv_freq)
        kv = apply_rope(self.kv_norm(self.wkv(x)), pos, self.inv_freq)      # [B, T, c]
        self.indexer_loss = None

        if self.full:
            if cache is not None:
                cache.kv.append(kv)
                kv = cache.kv.view().to(x.dtype)                              # [B, pos0 + T, c]
            o = full_attention(q, kv, pos0, self.attn_sink, self.softmax_scale)
        else:
            window_kv = kv if cache is None else torch.cat([cache.window_rows().to(x.dtype), kv], dim=1)
            entries = entry_idx = None
            if self.compressor is not None:
                entries = self.compressor(x, pos0, self.inv_freq, None if cache is None else cache.compressor)
            train_indexer = self.indexer is not None and self.training and cache is None \
                and self.cfg.csa_stage != "dense"
            kernels = csa_kernels(x, self.cfg.kernels) if self.uses_topk else None
            if self.uses_topk or train_indexer:
                index = self.indexer(x.detach(), cq.detach(), pos0, self.inv_freq,
                                     None if cache is None else cache.indexer)  # qI, w, KI
                qI, wI, kI = index
                k_scale = None
                if isinstance(kI, tuple):                   # an FP8 cache's keys: (e4m3, scale)
                    kI, k_scale = kI
                elif self.cfg.index_fp8 and self.uses_topk:
                    from kernels.csa_select import quantize_rows
                    kI, k_scale = quantize_rows(kI)
                if kernels is not None:   # the kernels take one dtype: that of the projections (bf16
                    if k_scale is None:     # under autocast), the compressor's fp32 keys cast to it
                        kI = kI.to(qI.dtype)
                    entry_idx = kernels.csa_topk(qI, wI, kI, self.compress_ratio, pos0, self.cfg.index_topk,
                                                 k_scale=k_scale)[0]
                elif self.uses_topk:
                    entry_idx = csa_select(qI, wI, kI, pos, self.compress_ratio, self.cfg.index_topk,
                                           key_scale=k_scale)                                   # [B, T, k]
            if kernels is not None and not train_indexer:   # the KL needs p on each entry: reference
                o = kernels.sparse_attention(q.to(kv.dtype), window_kv, entries.to(kv.dtype), entry_idx,
                                             self.attn_sink, pos0, self.window_size, self.softmax_scale)
            else:
                o, p_entries = sparse_attention(q, window_kv, self.window_size, entries, entry_idx,
                                                self.compress_ratio, pos0, self.attn_sink, self.softmax_scale)
            if train_indexer:
                scores = indexer_scores(*index, idx=entry_idx)                # [B, T, K or N]
                valid = (entry_idx >= 0) if entry_idx is not None else \
                    visible_entries(pos, entries.shape[1], self.compress_ratio).expand(B, T, -1)
                self.indexer_loss = indexer_kl(p_entries, scores, valid)
            if cache is not None:
                cache.write_window(kv)
        if cache is not None:
            cache.pos += T

        o = apply_rope(o, pos, self.inv_freq, inverse=True)                   # [B, T, n_h, c]
        o = o.reshape(B, T, self.cfg.o_groups, -1)                            # [B, T, g, n_h*c/g]
        wo_a = self.wo_a.weight.view(self.cfg.o_groups, self.cfg.o_lora_rank, -1)
        if self.wo_a_fp8 is None:
            o = torch.einsum("btgd,grd->btgr", o, wo_a)                       # [B, T, g, o_lora_rank]
        else:                                                                 # --fp8: the same, block-scaled
            from kernels.fp8_gemm import fp8_batched_linear
            o = fp8_batched_linear(o.flatten(0, 1).transpose(0, 1), wo_a, self.wo_a_fp8)   # [g, B*T, r]
            o = o.transpose(0, 1).reshape(B, T, self.cfg.o_groups, -1)
        return self.wo_b(o.flatten(2))                                        # [B, T, dim]
