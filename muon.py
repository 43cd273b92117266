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

Sharded parameters (FSDP2 DTensors): Newton-Schulz is not elementwise, so it must see each matrix whole.
Momentum stays sharded (elementwise); the look-ahead update is all-gathered (`full_tensor()`, in the
iteration dtype: bf16 on CUDA), every rank orthogonalises every matrix, and keeps its own shard of the
result (Replicate -> Shard is a local slice, no communication). The result equals a one-process run.
Cost per step: each rank receives (world - 1) / world of every Muon matrix, i.e. one more parameter
all-gather on top of FSDP's forward one (in bf16 on CUDA, the size of a bf16 weight gather), and every
rank repeats the Newton-Schulz compute for every matrix. That compute is about 60 * short * rows * cols
FLOPs per matrix (10 iterations, short = min(rows, cols)) against 6 * tokens * rows * cols for its
forward and backward: a fraction 10 * short / tokens, tokens counted per rank and step. Spreading the
matrices over the ranks (each orthogonalises 1 / world of them, then the results are all-gathered)
divides that by the world size for a second collective. It pays once 10 * short is a sizable part of
the tokens per rank and step (the `small` preset, short up to 768, at 16 x 256 tokens per rank: more
than all of them); not done here, the simple form comes first.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

try:  # FSDP2 parameters are DTensors; torch builds without distributed support have neither
    from torch.distributed.tensor import DTensor, Replicate
except ImportError:  # pragma: no cover
    DTensor, Replicate = None, None

QUINTIC = (3.4445, -4.7750, 2.0315)   # steep slope at 0: singular values rise fast, land in ~[0.7, 1.2]
SETTLE = (2.0, -1.5, 0.5)             # p(1) = 1, p'(1) = 0: pulls them onto 1
NS_SCHEDULES = {
    "hybrid": (QUINTIC,) * 8 + (SETTLE,) * 2,   # V4
    "classic": (QUINTIC,) * 5,                  # Keller Jordan's Muon, torch.optim.Muon's default
}
UPDATE_RMS = 0.18                     # V4: RMS of the scaled Muon update, about AdamW's


def newton_schulz(G: torch.Tensor, schedule, eps: float = 1e-7) -> torch.Tensor:
    """Approximately orthogonalise each matrix of G [..., rows, cols]: U S V^T -> U V^T.

    Leading dimensions are a batch (stacked experts). bf16 on CUDA, fp32 elsewhere; returns G's dtype.
    """
    if G.ndim < 2:
        raise ValueError(f"newton_schulz needs a matrix or a stack of matrices, got shape {tuple(G.shape)}")
    dtype = torch.bfloat16 if G.is_cuda else torch.float32
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


def update_scale(shape) -> float:
    """0.18 * sqrt(max(rows, cols)) of one matrix (the last two dims): the scaled update has RMS 0.18."""
    return UPDATE_RMS * math.sqrt(max(shape[-2], shape[-1]))


def _orthogonalise(update: torch.Tensor, schedule) -> torch.Tensor:
    """newton_schulz on whole matrices, also when `update` is a sharded DTensor (see the docstring)."""
    if DTensor is not None and isinstance(update, DTensor):
        mesh, placements = update.device_mesh, update.placements
        dtype = torch.bfloat16 if update.device.type == "cuda" else torch.float32
        full = update.to(dtype).full_tensor()                     # all-gather: [..., rows, cols] on every rank
        ortho = newton_schulz(full, schedule).to(update.dtype)
        replicated = DTensor.from_local(ortho, mesh, [Replicate()] * mesh.ndim, run_check=False)
        return replicated.redistribute(mesh, placements)          # keep this rank's shard: a local slice
    return newton_schulz(update, schedule)


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

    def _muon_step(self, group):
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        schedule = NS_SCHEDULES[group["ns_schedule"]]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p.grad)
            M = state["momentum_buffer"]
            M.mul_(mu).add_(p.grad)                                   # M = mu M + G
            update = p.grad.add(M, alpha=mu) if group["nesterov"] else M
            O = _orthogonalise(update, schedule)                      # [..., rows, cols], singular values ~1
            p.mul_(1 - lr * wd)                                       # decoupled weight decay
            p.add_(O, alpha=-lr * update_scale(p.shape))

    def _adamw_step(self, group):
        lr, wd, eps = group["lr"], group["weight_decay"], group["eps"]
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad
            state = self.state[p]
            if "step" not in state:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            state["step"] += 1
            step = state["step"].item()
            p.mul_(1 - lr * wd)
            state["exp_avg"].lerp_(g, 1 - beta1)
            state["exp_avg_sq"].mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bias_correction1 = 1 - beta1 ** step
            bias_correction2 = 1 - beta2 ** step
            denom = (state["exp_avg_sq"].sqrt() / math.sqrt(bias_correction2)).add_(eps)
            p.addcdiv_(state["exp_avg"], denom, value=-lr / bias_correction1)


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
