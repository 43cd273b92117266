"""mHC, manifold-constrained hyper-connections: n residual streams mixed by doubly stochastic matrices.

A plain residual block keeps one stream, x' = x + F(norm(x)). Hyper-connections keep n = `hc_mult`
streams X = [X_1 .. X_n] (each of width d) and learn, per token, how the sublayer F reads them (`pre`),
writes its output back to them (`post`) and how the streams mix among themselves (`res`). Left
unconstrained the product of the `res` matrices across depth can amplify the signal without bound
(the mHC paper measures a composite gain of about 3000 at 27B); mHC projects every `res` onto the
doubly stochastic matrices (non-negative, rows and columns summing to 1) with Sinkhorn, whose products
stay doubly stochastic, and the gain stays near 1.6. V4-REFERENCE section 3; around every attention and
every MoE sublayer (`hc_attn_*`, `hc_ffn_*`), and a collapse before the final norm (`hc_head_*`):

    mix  = rmsnorm_noweight(flatten(X)) @ fn.T                fn: [(2+n)*n, n*d] = [pre | post | res]
    pre  = sigmoid(scale[0] * mix[:n]    + base[:n]) + eps                           in (eps, 1+eps]
    post = 2 * sigmoid(scale[1] * mix[n:2n] + base[n:2n])                            in [0, 2]
    res  = sinkhorn(scale[2] * mix[2n:].view(n, n) + base[2n:].view(n, n))          doubly stochastic
    u = sum_i pre_i X_i ;  y = F(RMSNorm(u))
    X'_j = post_j * y + sum_i res[i, j] * X_i
    head: w = sigmoid(scale[0] * rmsnorm_noweight(flatten X) @ head_fn.T + head_base) + eps,
          h = sum_i w_i X_i, then the final norm and the output head (no Sinkhorn at the head)

The mixing weights are dynamic (they depend on the token through `mix`) plus a static bias `base`;
the gating factors `scale` start small so that the static part rules at the start of training.

Where the official code differs from the paper, or where we chose:
- `res` is applied TRANSPOSED: output stream j sums res[i, j] X_i over the input streams i (the paper
  writes H_res @ X, i.e. sums over the second index). Our Sinkhorn normalises columns last, so each
  output stream is a convex combination of the input streams to within 1e-5, while the row sums (how
  much of each input stream is passed on in all) are 1 only approximately after 20 rounds: to 1e-3
  or better for logits of unit spread, a few 1e-2 for very peaked ones (closer with more rounds).
  The mHC paper writes H_res for what is our res^T.
- Sinkhorn (official `hc_split_sinkhorn`): softmax over the last dim plus eps, then column
  normalisation; then `iters - 1` times row, column normalisation. So `iters` column normalisations
  ("rounds") in all, the first round's row normalisation being the softmax itself. eps (`hc_eps`)
  keeps every entry positive and every division finite, however peaked the logits.
- All mHC arithmetic runs in fp32 (fp64 when given fp64), with autocast disabled: under bf16 autocast
  the small matmuls here would otherwise drop to bf16. The official hc_post casts the new streams to
  the sublayer output's dtype (its whole model runs in bf16); we keep the streams' own dtype, so under
  autocast the residual streams stay fp32 as in ordinary mixed-precision training.
- `expand_streams` returns a broadcast view rather than n copies; the first `hc_post` materialises it.

Initialisation (not published; ours). Chosen so a fresh model IS a plain residual model on the mean
stream, with the dynamic term as the only departure:
- base_pre = logit(1/n - eps): pre_i = 1/n, so u = mean_i X_i.   The head uses the same: h = mean_i X_i.
- base_post = 0: post_j = 1, every stream receives the whole sublayer output.
- base_res = log((1 - a) I + a/n J) with a = RES_MIX_INIT = 0.1: already doubly stochastic (Sinkhorn
  leaves it unchanged), mostly the identity as in the hyper-connection paper, so stream differences are
  carried on rather than averaged away at every sublayer, but not a saturated softmax (the diagonal
  weight 0.925 for n = 4 keeps about a third of the softmax gradient p(1 - p) of a uniform matrix).
  With pre = 1/n, post = 1 and any doubly stochastic res, the mean stream evolves exactly as a plain
  residual stream: mean_j X'_j = mean_i X_i + F(RMSNorm(mean_i X_i)). Whatever res does, it only moves
  the differences between streams, which the head (weights 1/n) does not read.
- fn ~ N(0, 1/(n*d)): the weightless RMS norm gives flatten(X) unit RMS, so every entry of `mix` has
  unit standard deviation whatever the width, and with scale = 0.01 (the mHC paper's gating factor)
  the logits move by about 0.01: a fresh block matches the plain residual block to within 2%
  (relative; tested, typically 0.5%), and exactly (to fp32 rounding) with scale set to 0.
  fn must be random: the streams start as identical copies and everything else here treats them
  symmetrically, so with fn = 0 every stream would receive the same gradient and the n streams would
  stay copies of one another (up to rounding) for ever. The random rows of fn break that symmetry.
- Note: while the streams are identical, `res` gets no gradient at all (every column of res sums to 1,
  so sum_i res[i, j] X_i = X whatever res is). It starts to learn as the streams drift apart.

Optimizer (V4-REFERENCE section 4): `base` and `scale` go to AdamW, `fn` (2-D) to Muon. Do not re-draw
these with `init_std` in a generic weight initialiser.

Use in a block (model.py owns the parameters, with the official names):
    self.hc_attn_fn, self.hc_attn_base, self.hc_attn_scale = hc_init(cfg)     # same for hc_ffn_*
    u, post, res = hc_pre(x, self.hc_attn_fn, self.hc_attn_scale, self.hc_attn_base, cfg)
    x = hc_post(self.attn(self.attn_norm(u)), x, post, res)
and residual="plain" is x = x + self.attn(self.attn_norm(x)) on a single [B, T, d] stream.
"""

from __future__ import annotations

import math

import torch
from torch import nn

RES_MIX_INIT = 0.1      # base_res = log((1 - a) I + a/n J): the fresh res keeps 1 - a + a/n of its stream
GATE_SCALE_INIT = 0.01  # the mHC paper's initial gating factor alpha


# ------------------------------------------------------------------------------------------------
# Initialisers: fresh fp32 parameters for one sublayer (hc_attn_* / hc_ffn_*) and for the head.
# ------------------------------------------------------------------------------------------------

def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))


def _init_fn(rows: int, cfg) -> nn.Parameter:
    n, d = cfg.hc_mult, cfg.dim
    return nn.Parameter(torch.randn(rows, n * d, dtype=torch.float32) / math.sqrt(n * d))


def hc_init(cfg) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(fn [(2+n)*n, n*d], base [(2+n)*n], scale [3]) for one sublayer; see the module docstring."""
    n = cfg.hc_mult
    base_pre = torch.full((n,), _logit(1.0 / n - cfg.hc_eps), dtype=torch.float32)
    base_post = torch.zeros(n, dtype=torch.float32)
    eye = torch.eye(n, dtype=torch.float32)
    base_res = torch.log((1 - RES_MIX_INIT) * eye + RES_MIX_INIT / n).flatten()
    base = nn.Parameter(torch.cat([base_pre, base_post, base_res]))
    scale = nn.Parameter(torch.full((3,), GATE_SCALE_INIT, dtype=torch.float32))
    return _init_fn((2 + n) * n, cfg), base, scale


def hc_head_init(cfg) -> tuple[nn.Parameter, nn.Parameter, nn.Parameter]:
    """(fn [n, n*d], base [n], scale [1]) for the collapse before the final norm: weights 1/n."""
    n = cfg.hc_mult
    base = nn.Parameter(torch.full((n,), _logit(1.0 / n - cfg.hc_eps), dtype=torch.float32))
    scale = nn.Parameter(torch.full((1,), GATE_SCALE_INIT, dtype=torch.float32))
    return _init_fn(n, cfg), base, scale


# ------------------------------------------------------------------------------------------------
# The functional part.
# ------------------------------------------------------------------------------------------------

def expand_streams(h: torch.Tensor, n: int) -> torch.Tensor:
    """The embedding copied into n streams: [B, T, d] -> [B, T, n, d] (a broadcast view)."""
    if h.dim() != 3:
        raise ValueError(f"expand_streams: h must be [B, T, dim], got shape {tuple(h.shape)}")
    return h.unsqueeze(-2).expand(*h.shape[:-1], n, h.shape[-1])


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Project [..., n, n] logits onto (nearly) doubly stochastic matrices; the columns sum to 1 last.

    softmax over the last dim (+eps), then column normalisation, then iters - 1 rounds of row and
    column normalisation (each division by sum + eps). Computed in fp32 (fp64 stays fp64).
    """
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2]:
        raise ValueError(f"sinkhorn: logits must be [..., n, n], got shape {tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn: iters (hc_sinkhorn_iters) must be >= 1, got {iters}")
    m = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1) + eps
    m = m / (m.sum(-2, keepdim=True) + eps)                    # columns
    for _ in range(iters - 1):
        m = m / (m.sum(-1, keepdim=True) + eps)                # rows
        m = m / (m.sum(-2, keepdim=True) + eps)                # columns
    return m


def sinkhorn_for(x: torch.Tensor, cfg):
    """The Sinkhorn to run on x: kernels/sinkhorn.py's fused kernel on CUDA in fp32 (one launch where
    the loop above makes about 6 * iters), this file's loop elsewhere or with ModelConfig.kernels =
    "reference". Imported here, not at the top, so mHC runs where Triton is not installed."""
    if x.is_cuda and x.dtype == torch.float32 and getattr(cfg, "kernels", "auto") != "reference":
        from kernels.sinkhorn import sinkhorn as fused
        return fused
    return sinkhorn


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    dtype = torch.float32
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype


def _no_autocast(x: torch.Tensor):
    return torch.autocast(device_type=x.device.type, enabled=False)


def _check(who: str, x: torch.Tensor, fn, scale, base, cfg, n_mix: int, n_scale: int) -> None:
    n, d = cfg.hc_mult, cfg.dim
    if x.dim() != 4 or x.shape[-2:] != (n, d):
        raise ValueError(f"{who}: x must be [B, T, hc_mult={n}, dim={d}], got shape {tuple(x.shape)}")
    expected = {"fn": (fn, (n_mix, n * d)), "base": (base, (n_mix,)), "scale": (scale, (n_scale,))}
    for name, (t, shape) in expected.items():
        if tuple(t.shape) != shape:
            raise ValueError(f"{who}: {name} must have shape {shape}, got {tuple(t.shape)}")


def _mix(x: torch.Tensor, fn: torch.Tensor, cfg, dtype: torch.dtype):
    """The streams in `dtype` [B, T, n, d] and mix = rmsnorm_noweight(flatten X) @ fn.T [B, T, rows]."""
    xs = x.to(dtype)
    flat = xs.flatten(-2)                                                     # [B, T, n*d]
    # as the official code: project first, then scale each token by its inverse RMS
    rsqrt = torch.rsqrt(flat.square().mean(-1, keepdim=True) + cfg.norm_eps)  # [B, T, 1]
    return xs, (flat @ fn.to(dtype).T) * rsqrt


def hc_pre(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, cfg):
    """Read the streams for one sublayer.

    x [B, T, n, d] -> u [B, T, d] (= sum_i pre_i X_i, in x's dtype; the caller norms it and runs the
    sublayer), post [B, T, n] and res [B, T, n, n] (fp32, for hc_post).
    """
    n = cfg.hc_mult
    _check("hc_pre", x, fn, scale, base, cfg, (2 + n) * n, 3)
    dtype = _compute_dtype(x)
    with _no_autocast(x):
        xs, mix = _mix(x, fn, cfg, dtype)                                   # [B, T, n, d], [B, T, (2+n)*n]
        scale, base = scale.to(dtype), base.to(dtype)
        pre = torch.sigmoid(scale[0] * mix[..., :n] + base[:n]) + cfg.hc_eps            # [B, T, n]
        post = 2 * torch.sigmoid(scale[1] * mix[..., n:2 * n] + base[n:2 * n])          # [B, T, n]
        res_logits = scale[2] * mix[..., 2 * n:] + base[2 * n:]                         # [B, T, n*n]
        res = sinkhorn_for(res_logits, cfg)(res_logits.unflatten(-1, (n, n)), cfg.hc_sinkhorn_iters,
                                            cfg.hc_eps)                                 # [B, T, n, n]
        u = (pre.unsqueeze(-2) @ xs).squeeze(-2)                                        # [B, T, d]
    return u.to(x.dtype), post, res


def hc_post(y: torch.Tensor, x: torch.Tensor, post: torch.Tensor, res: torch.Tensor) -> torch.Tensor:
    """Write the sublayer output y [B, T, d] back: X'_j = post_j * y + sum_i res[i, j] X_i.

    res is applied transposed (sum over its FIRST index), as the official code does. Returns the new
    streams [B, T, n, d] in x's dtype.
    """
    if x.dim() != 4 or y.shape != x.shape[:2] + x.shape[3:]:
        raise ValueError(f"hc_post: need y [B, T, d] and x [B, T, n, d], "
                         f"got {tuple(y.shape)} and {tuple(x.shape)}")
    n = x.shape[2]
    if post.shape != x.shape[:3] or res.shape != x.shape[:3] + (n,):
        raise ValueError(f"hc_post: need post [B, T, n] and res [B, T, n, n] for x {tuple(x.shape)}, "
                         f"got {tuple(post.shape)} and {tuple(res.shape)}")
    dtype = _compute_dtype(x, y)
    with _no_autocast(x):
        carried = res.to(dtype).transpose(-1, -2) @ x.to(dtype)                   # [B, T, n, d]
        new = post.to(dtype).unsqueeze(-1) * y.to(dtype).unsqueeze(-2) + carried  # [B, T, n, d]
    return new.to(x.dtype)


def hc_head(x: torch.Tensor, fn: torch.Tensor, scale: torch.Tensor, base: torch.Tensor, cfg) -> torch.Tensor:
    """Collapse the streams before the final norm: x [B, T, n, d] -> h = sum_i w_i X_i [B, T, d]."""
    n = cfg.hc_mult
    _check("hc_head", x, fn, scale, base, cfg, n, 1)
    dtype = _compute_dtype(x)
    with _no_autocast(x):
        xs, mix = _mix(x, fn, cfg, dtype)                                             # [B, T, n]
        w = torch.sigmoid(scale.to(dtype) * mix + base.to(dtype)) + cfg.hc_eps        # [B, T, n]
        h = (w.unsqueeze(-2) @ xs).squeeze(-2)                                        # [B, T, d]
    return h.to(x.dtype)


# ------------------------------------------------------------------------------------------------
# Diagnostic for the training log.
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def composite_gain(res_list: list[torch.Tensor]) -> float:
    """The mHC paper's "Amax gain magnitude" of the residual mappings composed across depth.

    res_list: the `res` [B, T, n, n] of every hc_pre in forward order (attention then MoE, layer by
    layer). Sublayer l maps the streams by X' = res_l^T X (plus the sublayer output), so the residual
    path through the whole stack is M = res_L^T ... res_1^T, one n x n matrix per token. Its largest
    absolute row sum bounds how much an output stream amplifies the input streams (forward signal
    gain); its largest absolute column sum bounds the same for the gradient (backward gain). We
    return the larger of the two, maximised over tokens: the worst token, not the product of
    token-averaged matrices (an average of doubly stochastic matrices is doubly stochastic too, and
    would hide a token whose own mappings drift). Exactly doubly stochastic mappings give 1; Sinkhorn's
    approximate row sums let it creep above 1 with depth. Computed in fp64 per token.
    """
    if len(res_list) == 0:
        raise ValueError("composite_gain: res_list is empty")
    shape = res_list[0].shape
    if len(shape) < 2 or shape[-1] != shape[-2]:
        raise ValueError(f"composite_gain: each res must be [..., n, n], got shape {tuple(shape)}")
    for res in res_list:
        if res.shape != shape:
            raise ValueError(f"composite_gain: all res must share one shape, "
                             f"got {tuple(shape)} and {tuple(res.shape)}")
    n = shape[-1]
    total = torch.eye(n, dtype=torch.float64, device=res_list[0].device)      # [n, n]
    for res in res_list:
        total = res.reshape(-1, n, n).to(torch.float64).transpose(-1, -2) @ total   # [tokens, n, n]
    size = total.abs()
    forward = size.sum(-1).amax()
    backward = size.sum(-2).amax()
    return float(torch.maximum(forward, backward))
