"""DeepSeekMoE as V4 runs it: a gate, routed SwiGLU experts, one shared expert, and its balancing.

Every V4 layer replaces the dense MLP by a mixture of experts (V4-REFERENCE section 2). For one token x:

    s   = sqrt(softplus(x @ gate.weight^T))              # [E] scores, in fp32 (V3 used sigmoid)
    idx = tid2eid[token_id]                               # first n_hash_layers: a fixed table
    idx = topk(s + gate.bias, k)                          # other layers: the bias only SELECTS
    w   = s[idx] / sum(s[idx]) * route_scale              # weights come from the scores alone
    y   = sum_j w_j * expert_{idx_j}(x) + shared_experts(x)
    expert(x) = w2( silu(clamp(w1 x, max=L)) * clamp(w3 x, -L, L) )      # L = swiglu_limit = 10

Why: many small experts with a few active per token give the capacity of a large FFN at the cost of a
small one; the always-active shared expert holds what every token needs. The clamp keeps the SwiGLU
product bounded, so a rare huge pre-activation cannot produce a huge expert output.

Balancing. V4 keeps DeepSeek-V3's auxiliary-loss-free scheme: a per-expert bias, added to the scores
only to choose the top-k, is nudged after every optimizer step, bias += gamma * sign(mean_load - load),
gamma = 1e-3, so overloaded experts become less likely to be chosen without any gradient pulling on
the model. A tiny sequence-wise balance loss (V3 form, weight alpha = 1e-4) guards against extreme
imbalance inside one sequence:

    f_i = E / (k T) * #{t : i in idx_t}     P_i = mean_t s_{t,i} / sum_j s_{t,j}     L = alpha sum_i f_i P_i

Dispatch is dropless: every (token, slot) pair is computed; pairs are sorted by expert so each expert
sees one contiguous block, the experts run as ONE grouped matrix multiply (`torch._grouped_mm`, bf16,
CUDA), and the results are put back in token order and summed with the routing weights. Elsewhere a
loop over the experts does the same work (`expert_dispatch(..., impl="loop")`); `moe_reference` is the
plain per-token definition that the tests hold both against. With `--fp8` (model.use_fp8) the experts
run as V4 runs them, in block-scaled FP8: each expert's rows padded to whole 128-row blocks, one grouped
FP8 GEMM launch for all experts (kernels/fp8_gemm.py, `impl="fp8"`).

Where our code differs from the official inference code: the official model stores one module per
expert (`experts.E.w1.weight`); we store the experts stacked (`w1` [E, inter, dim]) so the grouped GEMM,
Muon (one batched Newton-Schulz) and FSDP2 (sharding dim 0) see one tensor, and `export_experts` /
`import_experts` translate to the official names. Training-only parts (bias update, balance loss,
load counts) are not in the official inference code; they follow the V3/V4 reports.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

GROUP_ALIGN = 16         # rows per expert in the grouped GEMM are padded to a multiple of this


# --------------------------------------------------------------------------------------------------
# The expert: clamped SwiGLU
# --------------------------------------------------------------------------------------------------

def clamped_glu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    """silu(clamp(gate, max=L)) * clamp(up, -L, L): the gate is clamped from above only (silu is
    already bounded below), the linear branch on both sides."""
    return F.silu(gate.clamp(max=limit)) * up.clamp(-limit, limit)


class Expert(nn.Module):
    """One SwiGLU MLP: w2(silu(clamp(w1 x)) * clamp(w3 x)). Used for `shared_experts` and, with
    hidden size (n_activated + n_shared) * moe_inter_dim, as the dense twin (`ffn="dense"`) that has
    exactly the active FFN parameters of the MoE (the gate's E x dim excepted)."""

    def __init__(self, dim: int, inter_dim: int, swiglu_limit: float,
                 init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.w1 = nn.Linear(dim, inter_dim, bias=False)       # gate branch
        self.w2 = nn.Linear(inter_dim, dim, bias=False)       # output projection
        self.w3 = nn.Linear(dim, inter_dim, bias=False)       # linear branch
        self.swiglu_limit = swiglu_limit
        self.init_std = init_std
        self.out_std = init_std if out_std is None else out_std
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.w1.weight, std=self.init_std)
        nn.init.normal_(self.w3.weight, std=self.init_std)
        nn.init.normal_(self.w2.weight, std=self.out_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(clamped_glu(self.w1(x), self.w3(x), self.swiglu_limit))


def out_proj_std(cfg) -> float:
    """Init std of every expert's output projection w2 (our choice; V4 does not publish its init).
    GPT-2's residual scaling: each layer adds two sublayer outputs (attention, FFN) to the residual
    stream, so std / sqrt(2 n_layers) keeps the stream's variance at init independent of depth."""
    return cfg.init_std / math.sqrt(2 * cfg.n_layers)


# --------------------------------------------------------------------------------------------------
# Routing: the gate and the hash table
# --------------------------------------------------------------------------------------------------

def hash_table(vocab_size: int, n_experts: int, k: int, seed: int) -> torch.Tensor:
    """A fixed token-id -> k experts table [vocab_size, k] (long), the same for the same seed.

    V4 ships its table with the weights and does not say how it was made. A seeded random table that
    is balanced over experts is a fair stand-in: it gives every expert the same share of the
    vocabulary (each expert is assigned to the same number of (token, slot) entries, within 1), no
    expert is favoured by construction, and random pairings spread co-activation over all experts.
    It cannot balance the LOAD, which depends on how often each token occurs (a Zipf law): the
    training log's load statistics show the hash layers' real imbalance.

    Construction: the flattened table is a chain of random permutations of the experts, so each
    expert appears once per permutation (hence the balance); where a row straddles two permutations,
    the experts already in that row are moved behind the row's end in the next permutation, which
    keeps it a permutation and leaves no expert twice in one row."""
    if not 0 < k <= n_experts:
        raise ValueError(f"hash_table: need 0 < k ({k}) <= n_experts ({n_experts})")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    flat: list[int] = []
    while len(flat) < vocab_size * k:
        perm = torch.randperm(n_experts, generator=gen, device="cpu").tolist()
        in_row = set(flat[len(flat) - len(flat) % k:])          # the open row's experts so far
        room = k - len(in_row) if in_row else 0                  # entries the open row still needs
        head = [e for e in perm if e not in in_row][:room]
        flat += head + [e for e in perm if e not in head]
    return torch.tensor(flat[:vocab_size * k], dtype=torch.long, device="cpu").view(vocab_size, k)


class Gate(nn.Module):
    """Scores, choice of experts and routing weights (official names `gate.weight`, `gate.bias`,
    `gate.tid2eid`). Routed layers have the balancing `bias` [E] (fp32 buffer: the optimizer never
    sees it; keep it fp32, a bf16 bias would swallow 1e-3 steps); hash layers have `tid2eid`
    [vocab, k] instead and no bias."""

    def __init__(self, cfg, layer_id: int, hash_routing: bool):
        super().__init__()
        self.topk = cfg.n_activated_experts
        self.route_scale = cfg.route_scale
        self.hash = hash_routing
        self.init_std = cfg.init_std
        self.seed = getattr(cfg, "hash_seed", 0) + layer_id     # one table per layer, reproducible
        self.weight = nn.Parameter(torch.empty(cfg.n_routed_experts, cfg.dim))
        if hash_routing:
            self.register_buffer("tid2eid", torch.empty(cfg.vocab_size, self.topk, dtype=torch.long))
        else:
            self.register_buffer("bias", torch.zeros(cfg.n_routed_experts, dtype=torch.float32))
        self.reset_parameters()

    def reset_parameters(self):
        nn.init.normal_(self.weight, std=self.init_std)
        if self.hash:
            if not self.tid2eid.is_meta:                         # nothing to fill when only counting
                vocab, k = self.tid2eid.shape
                self.tid2eid.copy_(hash_table(vocab, self.weight.shape[0], k, self.seed))
        else:
            self.bias.zero_()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor):
        """x [N, dim], token_ids [N] -> weights [N, k] fp32, indices [N, k] long, scores [N, E] fp32."""
        with torch.autocast(device_type=x.device.type, enabled=False):
            scores = F.softplus(F.linear(x.float(), self.weight.float())).sqrt()     # [N, E]
        if self.hash:
            indices = self.tid2eid[token_ids]                                        # [N, k]
        else:
            indices = (scores + self.bias.float()).topk(self.topk, dim=-1).indices   # [N, k]
        weights = scores.gather(-1, indices)                     # the bias never enters the weights
        weights = weights / weights.sum(-1, keepdim=True) * self.route_scale
        return weights, indices, scores


# --------------------------------------------------------------------------------------------------
# Dispatch: per-token reference, per-expert loop, grouped GEMM
# --------------------------------------------------------------------------------------------------

def moe_reference(x, weights, indices, w1, w2, w3, limit):
    """The definition, token by token: y_t = sum_j w_tj * expert_{idx_tj}(x_t). x [N, dim] -> [N, dim].
    Slow on purpose; only for the tests."""
    rows = []
    for t in range(x.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
        for j in range(indices.shape[1]):
            e = int(indices[t, j])
            h = F.linear(clamped_glu(F.linear(x[t], w1[e]), F.linear(x[t], w3[e]), limit), w2[e])
            acc = acc + weights[t, j] * h.float()
        rows.append(acc)
    return torch.stack(rows).to(x.dtype)


def _looped_experts(xs, counts, w1, w2, w3, limit):
    """xs [n, dim] sorted by expert, counts [E] -> [n, dim]: one small GEMM chain per non-empty expert.
    Reads the counts on the host (one synchronisation on a GPU)."""
    outs, start = [], 0
    for e, c in enumerate(counts.tolist()):
        if c:
            h = xs[start:start + c]
            outs.append(F.linear(clamped_glu(F.linear(h, w1[e]), F.linear(h, w3[e]), limit), w2[e]))
            start += c
    return torch.cat(outs)


def _padded_layout(e_sorted, counts, align: int):
    """Where each expert-sorted pair goes when every expert's rows are padded with zero rows to a multiple
    of `align`: (dest [n] row of each pair, ends [E] int32 end row of each expert's block, rows). The
    padded length is bounded by n + E (align - 1), rounded up to `align`, without knowing the counts (no
    host sync); the slack goes to the last expert as zero rows, which give zero output and zero gradient."""
    n, n_exp = e_sorted.shape[0], counts.shape[0]
    padded = (counts + align - 1) // align * align                                 # [E]
    rank = torch.arange(n, device=e_sorted.device) - (counts.cumsum(0) - counts)[e_sorted]
    dest = (padded.cumsum(0) - padded)[e_sorted] + rank                           # [n]
    rows = -(-(n + n_exp * (align - 1)) // align) * align
    ends = padded.cumsum(0).to(torch.int32)
    ends[-1] = rows
    return dest, ends, rows


def _grouped_experts(xs, e_sorted, counts, w1, w2, w3, limit):
    """xs [n, dim] sorted by expert (expert ids e_sorted [n]), counts [E] -> [n, dim], as three grouped
    GEMMs, without reading anything back to the host.

    torch._grouped_mm(a [rows, K], b [E, K, N], offs) multiplies row block e of a (rows offs[e-1] ..
    offs[e]) by b[e]; offs is int32. Each expert's block is padded with zero rows to a multiple of
    GROUP_ALIGN, so every block starts on a 16-byte boundary also where the tokens are the contracted
    dimension (the weight-gradient GEMMs of the backward), as the CUTLASS kernel's tile loads want;
    torchtitan pads the same way."""
    dest, offs, rows = _padded_layout(e_sorted, counts, GROUP_ALIGN)
    xp = xs.new_zeros(rows, xs.shape[1]).index_copy(0, dest, xs)                   # [rows, dim]
    a = torch._grouped_mm(xp, w1.transpose(1, 2), offs=offs)                       # [rows, inter]
    b = torch._grouped_mm(xp, w3.transpose(1, 2), offs=offs)                       # [rows, inter]
    out = torch._grouped_mm(clamped_glu(a, b, limit), w2.transpose(1, 2), offs=offs)  # [rows, dim]
    return out.index_select(0, dest)                                               # [n, dim]


def _fp8_grouped_experts(xs, e_sorted, counts, w1, w2, w3, limit, impl):
    """As _grouped_experts, through the block-scaled FP8 grouped GEMM (kernels/fp8_gemm.py, `--fp8`).
    Each expert's rows are padded to a multiple of 128, the activation scales' block edge, so every
    block of 128 rows belongs to one expert, block_group[r]."""
    from kernels.fp8_gemm import BLOCK, fp8_grouped_linear
    dest, ends, rows = _padded_layout(e_sorted, counts, BLOCK)
    starts = torch.arange(0, rows, BLOCK, device=xs.device, dtype=torch.int32)      # [rows / 128]
    block_group = torch.searchsorted(ends, starts, right=True).int()               # expert of each block
    xp = xs.new_zeros(rows, xs.shape[1]).index_copy(0, dest, xs)                     # [rows, dim]
    h = clamped_glu(fp8_grouped_linear(xp, w1, block_group, impl), fp8_grouped_linear(xp, w3, block_group, impl),
                    limit)                                                           # [rows, inter]
    return fp8_grouped_linear(h, w2, block_group, impl).index_select(0, dest)       # [n, dim]


_warned = set()


def _grouped_mm_usable(x, w1) -> bool:
    """The grouped GEMM runs on CUDA (SM80+), in bf16, with rows whose byte strides are multiples of
    16; bf16 is used when x is bf16 or bf16 autocast is on. Feature checks, not version checks."""
    if not (hasattr(torch, "_grouped_mm") and x.is_cuda):
        return False
    bf16 = x.dtype == torch.bfloat16 or (torch.is_autocast_enabled("cuda")
                                         and torch.get_autocast_dtype("cuda") == torch.bfloat16)
    return (bf16 and torch.cuda.get_device_capability(x.device) >= (8, 0)
            and x.shape[-1] % 8 == 0 and w1.shape[1] % 8 == 0)


def expert_dispatch(x, weights, indices, w1, w2, w3, limit, impl: str = "auto"):
    """Dropless MoE: x [N, dim], weights [N, k], indices [N, k], stacked expert weights w1 [E, inter,
    dim], w2 [E, dim, inter], w3 [E, inter, dim] -> [N, dim] in x's dtype.

    impl: "grouped" (torch._grouped_mm), "loop" (a GEMM chain per expert), "auto" (grouped where
    `_grouped_mm_usable`, else the loop, with a one-time warning on CUDA), "fp8" / "fp8-reference"
    (the FP8 grouped GEMM of kernels/fp8_gemm.py, its Triton kernel on CUDA / its PyTorch reference)."""
    if impl == "auto":
        impl = "grouped" if _grouped_mm_usable(x, w1) else "loop"
        if impl == "loop" and x.is_cuda and "loop" not in _warned:
            _warned.add("loop")
            warnings.warn("moe: torch._grouped_mm is not usable here (needs bf16 or bf16 autocast, "
                          "SM80+, dims divisible by 8); running the experts in a Python loop, which "
                          "costs a host sync and E small GEMMs per layer")
    if impl not in ("grouped", "loop", "fp8", "fp8-reference"):
        raise ValueError(f"expert_dispatch: impl must be 'auto', 'grouped', 'loop', 'fp8' or 'fp8-reference', "
                         f"got {impl!r}")
    n_tok, k = indices.shape
    e_sorted, order = indices.reshape(-1).sort(stable=True)     # [N*k] pairs grouped by expert
    # index_select, not x[...]: its backward is an index_add, where advanced indexing's backward
    # (a sorted, deterministic index_put) cost most of a V4 training step on an H200
    xs = x.index_select(0, order // k)                          # [N*k, dim] token of each pair
    counts = torch.bincount(e_sorted, minlength=w1.shape[0])    # [E]
    if impl.startswith("fp8"):
        h = _fp8_grouped_experts(xs, e_sorted, counts, w1, w2, w3, limit,
                                 "reference" if impl == "fp8-reference" else "auto")
    elif impl == "grouped":
        if x.is_cuda:                                           # the CUDA kernel is bf16 only
            xs, w1, w2, w3 = (t.to(torch.bfloat16) for t in (xs, w1, w2, w3))
        h = _grouped_experts(xs, e_sorted, counts, w1, w2, w3, limit)
    else:
        h = _looped_experts(xs, counts, w1, w2, w3, limit)
    h = h.new_empty(h.shape).index_copy(0, order, h).view(n_tok, k, -1)    # [N, k, dim] token order
    # the weighted sum over the k slots (deterministic, unlike an atomic index_add), in fp32
    return (h.float() * weights.unsqueeze(-1)).sum(1).to(x.dtype)


# --------------------------------------------------------------------------------------------------
# The MoE layer
# --------------------------------------------------------------------------------------------------

class MoE(nn.Module):
    """`ffn` of a V4 block: gate + n_routed_experts stacked experts + shared expert.

    forward(x [B, T, dim], token_ids [B, T]) -> [B, T, dim]. While training it also counts the
    tokens routed to each expert into `load` and leaves the sequence-wise balance loss (already
    multiplied by alpha) in `aux_loss` (zero in hash layers, whose choice the gate cannot change;
    None in eval). Under activation checkpointing the recomputed forward counts again: every count
    doubles, which changes neither the sign-based bias update nor the coefficient of variation."""

    def __init__(self, cfg, layer_id: int, hash_routing: bool | None = None):
        super().__init__()
        if hash_routing is None:
            hash_routing = layer_id < cfg.n_hash_layers
        n_exp, dim, inter = cfg.n_routed_experts, cfg.dim, cfg.moe_inter_dim
        self.n_routed_experts, self.topk = n_exp, cfg.n_activated_experts
        self.swiglu_limit = cfg.swiglu_limit
        self.balance_alpha = getattr(cfg, "balance_loss_alpha", 1e-4)
        self.init_std, self.out_std = cfg.init_std, out_proj_std(cfg)
        self.dispatch = "loop" if cfg.kernels == "reference" else "auto"    # see expert_dispatch
        self.gate = Gate(cfg, layer_id, hash_routing)
        self.w1 = nn.Parameter(torch.empty(n_exp, inter, dim))   # experts.E.w1.weight, stacked
        self.w2 = nn.Parameter(torch.empty(n_exp, dim, inter))   # experts.E.w2.weight, stacked
        self.w3 = nn.Parameter(torch.empty(n_exp, inter, dim))   # experts.E.w3.weight, stacked
        self.shared_experts = (Expert(dim, cfg.n_shared_experts * inter, cfg.swiglu_limit,
                                      cfg.init_std, self.out_std)
                               if cfg.n_shared_experts else None)
        self.register_buffer("load", torch.zeros(n_exp, dtype=torch.float32), persistent=False)
        self.aux_loss: torch.Tensor | None = None
        self.reset_parameters()

    def reset_parameters(self):
        """Init: N(0, init_std) for gate, w1, w3; N(0, init_std / sqrt(2 n_layers)) for w2 (see
        out_proj_std). Also rebuilds the hash table / zeroes the bias (after to_empty from meta)."""
        nn.init.normal_(self.w1, std=self.init_std)
        nn.init.normal_(self.w3, std=self.init_std)
        nn.init.normal_(self.w2, std=self.out_std)
        self.gate.reset_parameters()
        if self.shared_experts is not None:
            self.shared_experts.reset_parameters()
        self.load.zero_()

    def forward(self, x: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        if x.dim() != 3 or token_ids.shape != x.shape[:2]:
            raise ValueError(f"MoE: expected x [B, T, dim] and token_ids [B, T], got x "
                             f"{tuple(x.shape)} and token_ids {tuple(token_ids.shape)}")
        B, T, dim = x.shape
        flat = x.reshape(B * T, dim)                                             # [N, dim]
        weights, indices, scores = self.gate(flat, token_ids.reshape(B * T))     # [N, k] [N, k] [N, E]
        y = expert_dispatch(flat, weights, indices, self.w1, self.w2, self.w3,
                            self.swiglu_limit, self.dispatch)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training:
            self.aux_loss = self._count_and_balance_loss(indices.view(B, T * self.topk), scores, B, T)
        else:
            self.aux_loss = None
        return y.view(B, T, dim)

    def _count_and_balance_loss(self, indices, scores, B, T):
        """indices [B, T*k], scores [B*T, E] -> the V3 sequence-wise balance loss; adds to `load`."""
        ones = torch.ones_like(indices, dtype=torch.float32)
        counts = torch.zeros(B, self.n_routed_experts, device=indices.device).scatter_add_(1, indices, ones)
        self.load += counts.sum(0)                                               # [E]
        if self.gate.hash:
            return scores.new_zeros(())
        f = counts * (self.n_routed_experts / (self.topk * T))                  # [B, E], 1 if balanced
        p = (scores / scores.sum(-1, keepdim=True)).view(B, T, -1).mean(1)       # [B, E]
        return self.balance_alpha * (f * p).sum(-1).mean()

    # --- balancing, called by the training loop ---------------------------------------------------

    def load_stats(self) -> dict:
        """Statistics of the tokens counted since the last update_bias (read them before it, or use
        the dict update_bias returns): max/mean load and the coefficient of variation std/mean."""
        load = self.load.float()
        mean = load.mean().clamp(min=1e-9)
        return {"tokens": load.sum().item(), "max_over_mean": (load.max() / mean).item(),
                "cv": (load.std(unbiased=False) / mean).item()}

    @torch.no_grad()
    def update_bias(self, gamma: float = 1e-3) -> None:
        """Aux-loss-free balancing, after optimizer.step(): bias += gamma * sign(mean(load) - load),
        then zero the counts. Under FSDP / data parallel all-reduce (sum) `load` over the ranks first,
        so that every rank applies the same update. Hash layers have no bias: only the counts are reset.
        Nothing here reads a value back to the host (load_stats() does: call it before, when logging),
        so the host can queue the next step while this one still runs on the GPU."""
        if not self.gate.hash:
            self.gate.bias += gamma * torch.sign(self.load.mean() - self.load)
        self.load.zero_()

    # --- official checkpoint layout ---------------------------------------------------------------

    def export_experts(self) -> dict:
        """The stacked experts under the official per-expert names `experts.{e}.{w1,w2,w3}.weight`
        (relative to the ffn prefix), as independent tensors."""
        return {f"experts.{e}.{name}.weight": getattr(self, name)[e].detach().clone()
                for e in range(self.n_routed_experts) for name in ("w1", "w2", "w3")}

    @torch.no_grad()
    def import_experts(self, sd: dict):
        """Load `experts.{e}.{w1,w2,w3}.weight` (keys relative to the ffn prefix; other keys are
        ignored) into the stacked parameters. Missing, unexpected or misshapen entries raise."""
        expected = {f"experts.{e}.{name}.weight" for e in range(self.n_routed_experts)
                    for name in ("w1", "w2", "w3")}
        missing = sorted(expected - set(sd))
        unexpected = sorted(k for k in sd if k.startswith("experts.") and k not in expected)
        if missing or unexpected:
            raise ValueError(f"MoE.import_experts: missing keys {missing[:6]}, unexpected keys "
                             f"{unexpected[:6]} (this layer has {self.n_routed_experts} experts)")
        for name in ("w1", "w2", "w3"):
            param = getattr(self, name)
            for e in range(self.n_routed_experts):
                key = f"experts.{e}.{name}.weight"
                if tuple(sd[key].shape) != tuple(param.shape[1:]):
                    raise ValueError(f"MoE.import_experts: {key} has shape {tuple(sd[key].shape)}, "
                                     f"expected {tuple(param.shape[1:])}")
                param[e].copy_(sd[key])
