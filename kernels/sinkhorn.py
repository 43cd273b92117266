"""mHC's Sinkhorn projection fused into one Triton kernel, forward and backward.

mhc.sinkhorn is the definition (V4-REFERENCE section 3, the official `hc_split_sinkhorn`): for each
token's n x n logits,

    m = softmax(logits, last dim) + eps
    m = m / (column sums + eps)                         then iters - 1 times:
    m = m / (row sums + eps);  m = m / (column sums + eps)

In eager PyTorch that is about 6 * iters tiny kernels per call (120 for 20 rounds), twice per block,
each over a [tokens, 4, 4] tensor: launch-bound, in training (the mHC overhead of RESULTS.md is mostly
this) and even more in decoding, where a token's whole step is a few milliseconds of launches. Here one
program takes BLOCK_R tokens and runs every round in registers.

Backward. Each round is a normalisation y = m / (s + eps) along one axis, s = sum of m along it, whose
vector-Jacobian product is  g_m = (g - sum(g * y) along the axis) / (s + eps). It needs each round's
input; instead of keeping 2 * iters of them per token, the backward recomputes them from the logits:
round j's input by running rounds 1 .. j - 1 again, O(iters^2) small normalisations per token
(about 800 of 16 numbers for 20 rounds), cheap beside reading and writing the tensors. The softmax at
the start then takes g_logits = p * (g - sum(g * p)) over the last dim.

`sinkhorn(logits, iters, eps)` is the entry point (CUDA tensors, or TRITON_INTERPRET=1 on the CPU);
mhc.hc_pre calls it on CUDA unless ModelConfig.kernels is "reference". fp32 only: mHC runs in fp32.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _normalise(m, eps, AXIS: tl.constexpr):
    """m [R, N, N] divided by its sums along AXIS (1: columns, each column over the rows; 2: rows) + eps."""
    return m / (tl.sum(m, axis=AXIS, keep_dims=True) + eps)


@triton.jit
def _normalise_vjp(m, g, eps, AXIS: tl.constexpr):
    """The gradient w.r.t. m of y = _normalise(m) given g = dL/dy: (g - sum(g * y)) / (s + eps)."""
    s = tl.sum(m, axis=AXIS, keep_dims=True) + eps
    return (g - tl.sum(g * (m / s), axis=AXIS, keep_dims=True)) / s


@triton.jit
def _start(R, n, BLOCK_R: tl.constexpr, N: tl.constexpr):
    """Offsets and mask of this program's [BLOCK_R, N, N] tile (N = n padded to a power of two)."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)[:, None, None]
    i = tl.arange(0, N)[None, :, None]
    j = tl.arange(0, N)[None, None, :]
    offs = r * n * n + i * n + j
    mask = (r < R) & (i < n) & (j < n)
    return offs, mask, (i < n) & (j < n)


@triton.jit
def _softmax_eps(x, inside, eps):
    """softmax over the last dim + eps, with padding entries exactly 0 (they join no sum)."""
    x = tl.where(inside, x, -1e30)
    e = tl.where(inside, tl.exp(x - tl.max(x, axis=2, keep_dims=True)), 0.0)
    total = tl.sum(e, axis=2, keep_dims=True)
    p = e / tl.where(total > 0, total, 1.0)                      # rows of padding: all zeros
    return p, tl.where(inside, p + eps, 0.0)


@triton.jit
def _sinkhorn_fwd_kernel(x_ptr, y_ptr, R, n, eps: tl.constexpr, ITERS: tl.constexpr, BLOCK_R: tl.constexpr,
                         N: tl.constexpr):
    offs, mask, inside = _start(R, n, BLOCK_R, N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    _, m = _softmax_eps(x, inside, eps)
    m = _normalise(m, eps, 1)
    for _ in range(ITERS - 1):
        m = _normalise(_normalise(m, eps, 2), eps, 1)
    tl.store(y_ptr + offs, m, mask=mask)


@triton.jit
def _sinkhorn_bwd_kernel(x_ptr, g_ptr, dx_ptr, R, n, eps: tl.constexpr, ITERS: tl.constexpr,
                         BLOCK_R: tl.constexpr, N: tl.constexpr):
    offs, mask, inside = _start(R, n, BLOCK_R, N)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0)
    g = tl.load(g_ptr + offs, mask=mask, other=0.0)
    p, m0 = _softmax_eps(x, inside, eps)
    # rounds in order: 0 = the first column normalisation, then 2k - 1 = rows, 2k = columns (k >= 1)
    for step in range(2 * ITERS - 2, -1, -1):
        m = m0                                                   # this step's input, recomputed:
        if step >= 1:                                            # step 0, the first columns,
            m = _normalise(m, eps, 1)
        for _ in range((step - 1) // 2):                         # then whole (rows, columns) rounds,
            m = _normalise(_normalise(m, eps, 2), eps, 1)
        if (step >= 2) & ((step - 1) % 2 == 1):                  # then the rows of a half round
            m = _normalise(m, eps, 2)
        if step % 2 == 0:
            g = _normalise_vjp(m, g, eps, 1)
        else:
            g = _normalise_vjp(m, g, eps, 2)
        g = tl.where(inside, g, 0.0)
    dx = p * (g - tl.sum(g * p, axis=2, keep_dims=True))         # through the softmax (+eps: constant)
    tl.store(dx_ptr + offs, dx, mask=mask)


def _launch(kernel, tensors, iters: int, eps: float):
    x = tensors[0]
    n = x.shape[-1]
    R = x.numel() // (n * n)
    out = torch.empty_like(x)
    block_r = 16 if n > 4 else 64
    if R:
        # eps a compile-time constant: as a runtime argument torch.compile passes it as fp64, which
        # would promote the fp32 arithmetic
        kernel[(triton.cdiv(R, block_r),)](*tensors, out, R, n, eps=eps, ITERS=iters, BLOCK_R=block_r,
                                           N=triton.next_power_of_2(n), num_warps=4)
    return out


class _Sinkhorn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, iters, eps):
        ctx.save_for_backward(logits)
        ctx.iters, ctx.eps = iters, eps
        return _launch(_sinkhorn_fwd_kernel, (logits,), iters, eps)

    @staticmethod
    def backward(ctx, grad):
        (logits,) = ctx.saved_tensors
        return _launch(_sinkhorn_bwd_kernel, (logits, grad.contiguous()), ctx.iters, ctx.eps), None, None


def sinkhorn(logits: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """mhc.sinkhorn in one kernel (and one for the backward): logits [..., n, n] fp32 -> the same shape."""
    if logits.dim() < 2 or logits.shape[-1] != logits.shape[-2] or logits.dtype != torch.float32:
        raise ValueError(f"sinkhorn kernel: logits must be fp32 [..., n, n], got {logits.dtype} "
                         f"{tuple(logits.shape)}")
    if iters < 1:
        raise ValueError(f"sinkhorn kernel: iters must be >= 1, got {iters}")
    return _Sinkhorn.apply(logits.contiguous(), iters, eps)
