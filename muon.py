"""Muon with the hybrid Newton-Schulz schedule, and AdamW, in one optimizer (V4-REFERENCE section 4).

Muon updates a weight matrix W with the orthogonalised momentum instead of the momentum itself:
    M = mu * M + G                                           # mu = 0.95
    O = NS(mu * M + G)                                       # Nesterov: look one step ahead
    W = W * (1 - lr * wd) - lr * 0.18 * sqrt(max(rows, cols)) * O
NS maps a matrix U S V^T to (approximately) U V^T: every direction the gradient has moves the weight by
the same amount, so the rare directions are not drowned by the dominant ones. It runs on X = M / ||M||_F
(spectral norm <= 1), on the wide orientation (a tall matrix is transposed, so X X^T is the small Gram
matrix), with the odd polynomial X <- a X + b (X X^T) X + c (X X^T)^2 X:
    hybrid (V4)   8 steps of (3.4445, -4.7750, 2.0315), then 2 steps of (2, -1.5, 0.5)
    classic       5 steps of (3.4445, -4.7750, 2.0315)   (Keller Jordan's Muon, torch.optim.Muon)
The first polynomial has a steep slope at 0 and lifts small singular values fast, but leaves them
oscillating around 1 (roughly 0.7 .. 1.2); (2, -1.5, 0.5) has p(1) = 1, p'(1) = 0 and settles them at 1.
On CUDA the iterations run in bf16 (they tolerate it and the matmuls are twice as fast); on the CPU in
fp32.

Why 0.18 * sqrt(max(rows, cols)): an orthogonal rows x cols matrix of rank min(rows, cols) has RMS
1 / sqrt(max(rows, cols)), so the scaled update has RMS 0.18, about what AdamW's updates have. The two
halves of the optimizer can then share one learning rate and one schedule (V4: peak 2.7e-4 for Flash),
and a learning rate tuned for AdamW carries over.

Which parameters take which rule (`muon_param_groups`): Muon's argument is about matrices that map one
hidden space to another. AdamW keeps the parameters that are not such a map: the embedding (a lookup
table: each row sees only the gradient of its own token), the output head (V4 keeps it on AdamW like
the embedding), every RMSNorm weight and the mHC `base` / `scale` vectors (per-channel gains and
biases), and the two that V4 leaves unspecified: the attention sinks (one scalar per head) and the
compressor's `ape` (a learned positional bias added to gate logits: a table, not a map). Every other
matrix is Muon's, including the mHC `hc_*_fn` projections and the router's `gate.weight`; the routed
experts, stored stacked as [E, out, in], are E separate Muon matrices, orthogonalised as one batch. The
MoE gate bias is a buffer moved by the aux-loss-free rule, never by an optimizer.

Weight decay (V4 says "AdamW, wd 0.1" and no more): we decay every parameter of two or more dimensions
(the Muon matrices, embedding, head, `ape`) and no 1-D parameter (norm gains, mHC base / scale, sinks),
the usual practice: pulling a gain or a gate bias towards 0 fights what it is for. `build_optimizer`
applies the same rule to the plain AdamW baseline, so the two optimizers differ only in the update.

Batching (`newton_schulz_batched`): Newton-Schulz is ~10 iterations of a few matmuls, and a model has
hundreds of Muon matrices, most of them small: run one by one, that is ~50 short kernel launches per
matrix (measured on an H200: 0.47 s of the `small` preset's step). Matrices with the same wide shape
(short, long) after the tall -> wide transpose are stacked into one [n, short, long] batch and iterated
together: ~50 launches of big batched matmuls per shape. Each matrix keeps its own Frobenius
normalisation, so the result is the per-matrix one (to rounding: 5e-7 in fp32). A stacked expert weight
[E, out, in] is E matrices of that batch. The price is memory: a shape's whole batch (all the experts
of all layers, in the iteration dtype) and a few iteration temporaries of its size at once.

Sharded parameters (FSDP2's `fully_shard`: DTensors, Shard(0) on a 1-D mesh of `world` ranks).
Momentum, weight decay and the update are elementwise and stay on each rank's shard; Newton-Schulz
must see each matrix whole:
  * an expert stack [E, out, in] is sharded over E: each rank holds whole matrices and orthogonalises
    its own experts, with no communication;
  * a 2-D matrix is sharded over rows. It gets one owner rank (greedy balance of the Newton-Schulz cost,
    largest first, the same on every rank); one all-to-all sends each rank's rows of every matrix to its
    owner, which orthogonalises what it owns (batched as above), and a second sends each rank its rows
    of every update back, both in the iteration dtype (bf16 on CUDA).
Each matrix is still orthogonalised whole, by one rank, so the result equals a one-process run. Against
the simple form (every rank all-gathers and orthogonalises every matrix), with P2 and P3 the sizes of
the 2-D matrices and of the expert stacks: a rank received (P2 + P3) (world - 1) / world per step; now
it sends and receives about 2 P2 (world - 1) / world^2 (for P2 the same at 2 ranks, half at 4; nothing
for P3), and the Newton-Schulz compute (about 60 * short * rows * cols FLOPs per matrix, against
6 * tokens * rows * cols for its forward and backward) is split over the ranks instead of repeated on
each. The owners balance the 2-D matrices only; the expert shards are even when world divides E.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

try:  # FSDP2 parameters are DTensors; torch builds without distributed support have neither
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor, Replicate, Shard
except ImportError:  # pragma: no cover
    dist, DTensor, Replicate, Shard = None, None, None, None

QUINTIC = (3.4445, -4.7750, 2.0315)   # steep slope at 0: singular values rise fast, land in ~[0.7, 1.2]
SETTLE = (2.0, -1.5, 0.5)             # p(1) = 1, p'(1) = 0: pulls them onto 1
NS_SCHEDULES = {
    "hybrid": (QUINTIC,) * 8 + (SETTLE,) * 2,   # V4
    "classic": (QUINTIC,) * 5,                  # Keller Jordan's Muon, torch.optim.Muon's default
}
UPDATE_RMS = 0.18                     # V4: RMS of the scaled Muon update, about AdamW's


def iteration_dtype(device: torch.device) -> torch.dtype:
    """Newton-Schulz runs in bf16 on CUDA (it tolerates it; matmuls twice as fast), in fp32 elsewhere."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def newton_schulz(G: torch.Tensor, schedule, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G [..., rows, cols]: U S V^T -> U V^T.

    Leading dimensions are a batch (stacked experts). Iterates in `iteration_dtype`; returns G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    dtype = iteration_dtype(G.device)
    X = G.to(dtype)
    tall = G.size(-2) > G.size(-1)
    if tall:
        X = X.mT                                                  # [..., cols, rows]: wide, small Gram
    norm = X.float().norm(dim=(-2, -1), keepdim=True)             # [..., 1, 1] Frobenius >= spectral
    X = (X / (norm + eps)).to(dtype)
    for a, b, c in schedule:
        A = X @ X.mT                                              # [..., short, short]
        B = b * A + c * (A @ A)
        X = a * X + B @ X
    if tall:
        X = X.mT
    return X.to(G.dtype)


def newton_schulz_batched(matrices, schedule) -> list:
    """newton_schulz of every tensor in `matrices` ([..., rows, cols] each), one call per wide shape.

    Returns the results in the same order and shapes, in `iteration_dtype`.
    """
    buckets = {}                                                  # (short, long, device) -> indices
    for i, G in enumerate(matrices):
        rows, cols = G.shape[-2:]
        buckets.setdefault((min(rows, cols), max(rows, cols), G.device), []).append(i)
    results = [None] * len(matrices)
    for (_, _, device), members in buckets.items():
        pieces = []
        for i in members:
            G = matrices[i].to(iteration_dtype(device))
            G = G.reshape(-1, *G.shape[-2:])                              # [n_i, rows, cols]
            pieces.append(G.mT if G.size(-2) > G.size(-1) else G)         # [n_i, short, long]
        O = newton_schulz(torch.cat(pieces), schedule)                    # [n, short, long]
        for i, piece in zip(members, O.split([p.size(0) for p in pieces])):
            G = matrices[i]
            results[i] = (piece.mT if G.size(-2) > G.size(-1) else piece).reshape(G.shape)
    return results


def update_scale(shape) -> float:
    """0.18 * sqrt(max(rows, cols)) of one matrix (the last two dims): the scaled update has RMS 0.18."""
    return UPDATE_RMS * math.sqrt(max(shape[-2], shape[-1]))


# --- sharded parameters: which rank orthogonalises which matrix (see the module docstring) -----------

def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's part of t: the local shard of a DTensor (a view: in-place ops update t), else t."""
    return t.to_local() if DTensor is not None and isinstance(t, DTensor) else t


def _row_sharded(p: torch.Tensor) -> bool:
    """True for a 2-D DTensor sharded by rows over several ranks (FSDP2); False where this rank's
    tensor holds whole matrices (a plain tensor, a replica, a stack sharded over its batch dim)."""
    if DTensor is None or not isinstance(p, DTensor) or p.device_mesh.size() == 1:
        return False
    placements = p.placements
    if all(isinstance(pl, Replicate) or (isinstance(pl, Shard) and pl.dim < p.ndim - 2) for pl in placements):
        return False
    if p.ndim == 2 and p.device_mesh.ndim == 1 and placements[0] == Shard(0):
        return True
    raise ValueError(f"Muon: a parameter of shape {tuple(p.shape)} is sharded as {placements} on a "
                     f"{p.device_mesh.ndim}-D mesh; supported: whole matrices per rank, or Shard(0) of a "
                     f"matrix on a 1-D mesh (FSDP2's fully_shard)")


def row_split(rows: int, world: int) -> list:
    """Rows of each rank under Shard(0), as torch.chunk cuts: ceil(rows / world) each, the last short."""
    chunk = -(-rows // world)
    return [max(0, min(chunk, rows - r * chunk)) for r in range(world)]


def assign_owners(shapes, world: int) -> list:
    """An owner rank per matrix [rows, cols]: the costliest first (~ rows * cols * short), each to the
    least-loaded rank (ties: the lower index, then the lower rank), so every rank gets the same answer."""
    load, owners = [0] * world, [0] * len(shapes)
    costs = [r * c * min(r, c) for r, c in shapes]
    for i in sorted(range(len(shapes)), key=lambda i: -costs[i]):     # a stable sort
        owners[i] = min(range(world), key=load.__getitem__)
        load[owners[i]] += costs[i]
    return owners


def _all_to_all(send, recv_shapes, group, dtype, device):
    """send[r] (a list of tensors) goes to rank r; returns, per source rank r, the tensors of shapes
    recv_shapes[r] that it sent to this rank. One all_to_all_single on a flat buffer."""
    flat = [t.reshape(-1) for ts in send for t in ts]
    flat = torch.cat(flat) if flat else torch.empty(0, dtype=dtype, device=device)
    sizes = [[math.prod(s) for s in ss] for ss in recv_shapes]
    out = torch.empty(sum(map(sum, sizes)), dtype=dtype, device=device)
    dist.all_to_all_single(out, flat, [sum(s) for s in sizes], [sum(t.numel() for t in ts) for ts in send],
                           group=group)
    pieces = iter(out.split([n for s in sizes for n in s]))
    return [[next(pieces).view(s) for s in ss] for ss in recv_shapes]


def _orthogonalise(params, updates, schedule) -> list:
    """The orthogonalised updates of `params`, each shaped as this rank's part of `updates` (its shard
    of the parameter). Row-sharded matrices go through their owners (see the module docstring)."""
    sharded = [i for i, p in enumerate(params) if _row_sharded(p)]
    whole = [i for i in range(len(params)) if i not in set(sharded)]
    if not sharded:
        return newton_schulz_batched(updates, schedule)
    mesh = params[sharded[0]].device_mesh
    if any(params[i].device_mesh != mesh for i in sharded):
        raise ValueError("Muon: the row-sharded parameters of one group must share one device mesh")
    group, world, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    dtype, device = iteration_dtype(updates[0].device), updates[0].device
    shapes = [tuple(params[i].shape) for i in sharded]                   # [rows, cols], whole
    splits = [row_split(rows, world) for rows, _ in shapes]              # rows held by each rank
    for k, i in enumerate(sharded):
        if updates[i].size(0) != splits[k][rank]:
            raise ValueError(f"Muon: rank {rank} holds {updates[i].size(0)} rows of a {shapes[k]} matrix, "
                             f"expected {splits[k][rank]} (FSDP2's Shard(0) cuts as torch.chunk)")
    owners = assign_owners(shapes, world)
    owned = [[k for k, o in enumerate(owners) if o == r] for r in range(world)]   # the matrices of rank r
    mine = owned[rank]
    # 1. every rank sends its rows of each matrix to the matrix's owner, which stacks them whole
    from_ranks = _all_to_all([[updates[sharded[k]].to(dtype) for k in owned[r]] for r in range(world)],
                             [[(splits[k][r], shapes[k][1]) for k in mine] for r in range(world)],
                             group, dtype, device)
    full = [torch.cat(rows) for rows in zip(*from_ranks)]                # [rows, cols] per matrix of mine
    ortho = newton_schulz_batched([updates[i] for i in whole] + full, schedule)   # this rank's work only
    # 2. every owner sends each rank the rows it holds of the orthogonalised matrices
    from_owners = _all_to_all([[O.split(splits[k])[r] for k, O in zip(mine, ortho[len(whole):])]
                               for r in range(world)],
                              [[(splits[k][rank], shapes[k][1]) for k in owned[r]] for r in range(world)],
                              group, dtype, device)
    results = dict(zip(whole, ortho))
    for r in range(world):
        results.update((sharded[k], O) for k, O in zip(owned[r], from_owners[r]))
    return [results[i] for i in range(len(params))]


def _uses_muon(name: str, param: torch.Tensor) -> bool:
    """The V4 rule for one named parameter (the module docstring says why)."""
    parts = name.split(".")
    leaf, module = parts[-1], (parts[-2] if len(parts) > 1 else "")
    if param.ndim < 2:
        return False                                  # norm gains, mHC base / scale, sinks, biases
    if leaf == "weight" and (module in ("embed", "head") or module.endswith("norm")):
        return False                                  # embedding, output head, RMSNorm weights
    if leaf in ("attn_sink", "ape"):
        return False                                  # V4 is silent: AdamW, the safe choice
    if leaf.startswith("hc_") and leaf.endswith(("_base", "_scale")):
        return False                                  # mHC static biases and gating factors
    return True                                       # every other matrix, stacked experts included


def muon_param_groups(model: nn.Module):
    """Split the trainable parameters as V4 does: (muon_params, adamw_params), two lists."""
    muon_params, adamw_params = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (muon_params if _uses_muon(name, param) else adamw_params).append(param)
    return muon_params, adamw_params


class Muon(torch.optim.Optimizer):
    """Muon for the groups with `use_muon=True`, AdamW for the others; one lr for both.

    Each param group is a dict with `params` and `use_muon`; any other hyper-parameter given in a group
    overrides the default below. State: `momentum_buffer` for Muon parameters, `step` / `exp_avg` /
    `exp_avg_sq` for AdamW ones (the same keys and arithmetic as torch.optim.AdamW), so the base class's
    state_dict / load_state_dict round-trip and training resumes exactly.
    """

    def __init__(self, param_groups, lr: float = 2.7e-4, weight_decay: float = 0.1, momentum: float = 0.95,
                 nesterov: bool = True, ns_schedule: str = "hybrid", betas=(0.9, 0.95), eps: float = 1e-8):
        if not lr >= 0:
            raise ValueError(f"Muon: lr must be >= 0, got {lr}")
        if not weight_decay >= 0:
            raise ValueError(f"Muon: weight_decay must be >= 0, got {weight_decay}")
        if not 0 <= momentum < 1:
            raise ValueError(f"Muon: momentum must be in [0, 1), got {momentum}")
        if not (0 <= betas[0] < 1 and 0 <= betas[1] < 1):
            raise ValueError(f"Muon: betas must be in [0, 1), got {betas}")
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum, nesterov=nesterov,
                        ns_schedule=ns_schedule, betas=tuple(betas), eps=eps)
        super().__init__(param_groups, defaults)

    def add_param_group(self, param_group: dict):
        if "use_muon" not in param_group:
            raise ValueError("Muon: every param group needs a `use_muon` flag (see muon_param_groups)")
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        if group["ns_schedule"] not in NS_SCHEDULES:
            raise ValueError(f"Muon: ns_schedule must be one of {sorted(NS_SCHEDULES)}, "
                             f"got {group['ns_schedule']!r}")
        if group["use_muon"]:
            for p in group["params"]:
                if p.ndim < 2:
                    raise ValueError(f"Muon: a use_muon group holds a parameter of shape {tuple(p.shape)}; "
                                     f"Muon needs matrices [rows, cols] or stacks [..., rows, cols]")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_step(group)
            else:
                self._adamw_step(group)
        return loss

    # Both rules below work on lists: every parameter of the group at once, through torch._foreach_*
    # (one multi-tensor kernel, or one C++ loop, per operation instead of a Python loop over hundreds
    # of parameters), and on each rank's local shards (`_local`: views, so the in-place ops update the
    # FSDP2 DTensors and the DTensor states): a step is host-bound for small models, and an op on a
    # DTensor costs several times an op on a plain tensor in Python dispatch. The states stay DTensors
    # shaped like their parameters, so distributed checkpoints save and reshard them as before.

    def _muon_step(self, group):
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            if "momentum_buffer" not in self.state[p]:
                self.state[p]["momentum_buffer"] = torch.zeros_like(p.grad)   # sharded like p under FSDP2
        M = [_local(self.state[p]["momentum_buffer"]) for p in params]       # this rank's shards
        G = [_local(p.grad) for p in params]
        torch._foreach_mul_(M, mu)
        torch._foreach_add_(M, G)                                            # M = mu M + G
        U = torch._foreach_add(G, M, alpha=mu) if group["nesterov"] else M   # Nesterov: mu M + G
        updates = [u.to(iteration_dtype(u.device)) for u in U]               # kept until all are done
        del U
        ortho = _orthogonalise(params, updates, NS_SCHEDULES[group["ns_schedule"]])
        W = [_local(p) for p in params]
        torch._foreach_mul_(W, 1 - lr * wd)                                  # decoupled weight decay
        by_scale = {}                                                        # one add per update scale
        for i, p in enumerate(params):
            by_scale.setdefault(update_scale(p.shape), []).append(i)         # p.shape: the whole matrix's
        for scale, members in by_scale.items():
            torch._foreach_add_([W[i] for i in members], [ortho[i] for i in members], alpha=-lr * scale)

    def _adamw_step(self, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        for p in params:
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)                # per parameter, on the CPU, as torch's
                state["exp_avg"] = torch.zeros_like(p)           # DTensors under FSDP2, like p
                state["exp_avg_sq"] = torch.zeros_like(p)
        states = [self.state[p] for p in params]
        steps = [state["step"] for state in states]
        torch._foreach_add_(steps, 1.0)
        steps = [s.item() for s in steps]                        # CPU tensors: no device sync
        W, G = [_local(p) for p in params], [_local(p.grad) for p in params]
        m, v = [_local(s["exp_avg"]) for s in states], [_local(s["exp_avg_sq"]) for s in states]
        torch._foreach_mul_(W, 1 - lr * wd)                      # decoupled weight decay
        torch._foreach_lerp_(m, G, 1 - beta1)                    # m = beta1 m + (1 - beta1) g
        torch._foreach_mul_(v, beta2)
        torch._foreach_addcmul_(v, G, G, value=1 - beta2)        # v = beta2 v + (1 - beta2) g^2
        denom = torch._foreach_sqrt(v)                           # sqrt(v / (1 - beta2^t)) + eps
        torch._foreach_div_(denom, [math.sqrt(1 - beta2 ** t) for t in steps])
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(W, m, denom, [-lr / (1 - beta1 ** t) for t in steps])   # W -= lr m_hat / denom


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float = 0.1,
                    betas=(0.9, 0.95)) -> torch.optim.Optimizer:
    """"muon": V4's Muon + AdamW; "adamw": AdamW on everything. Both decay exactly the >= 2-D params."""
    muon_params, adamw_params = muon_param_groups(model)
    adamw_decay = [p for p in adamw_params if p.ndim >= 2]     # embedding, head, ape
    adamw_no_decay = [p for p in adamw_params if p.ndim < 2]   # norm gains, mHC base / scale, sinks
    if name == "muon":
        groups = [dict(params=muon_params, use_muon=True, weight_decay=weight_decay),
                  dict(params=adamw_decay, use_muon=False, weight_decay=weight_decay),
                  dict(params=adamw_no_decay, use_muon=False, weight_decay=0.0)]
        return Muon([g for g in groups if g["params"]], lr=lr, betas=betas)
    if name == "adamw":
        groups = [dict(params=muon_params + adamw_decay, weight_decay=weight_decay),
                  dict(params=adamw_no_decay, weight_decay=0.0)]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=1e-8)
    raise ValueError(f"build_optimizer: name must be 'muon' or 'adamw', got {name!r}")
