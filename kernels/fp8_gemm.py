"""Block-scaled FP8 (e4m3) GEMM, DeepSeek style: quantise, dequantise, multiply, and `Fp8Linear`.

V4 runs its linear layers in FP8 e4m3 (V4-REFERENCE section 5). Each tensor is cut into blocks and every
block carries one fp32 scale that is a power of two (UE8M0, so applying it is exact):
    activations  x [M, K]  ->  1 x 128 blocks,   x_scale [M, ceil(K/128)]
    weights      w [N, K]  ->  128 x 128 blocks, w_scale [ceil(N/128), ceil(K/128)]
    scale = 2^ceil(log2(amax / 448))      amax = max |block|, clamped to >= 1e-4 (a zero block, such as
                                          padding, gets a finite scale and quantises to zeros)
    q     = e4m3(block / scale)           |block / scale| <= 448, the largest finite e4m3
The GEMM y = x @ w.T multiplies one 128-deep K slice at a time on the tensor cores and adds each partial
product into an fp32 accumulator scaled by x_scale[m, kb] * w_scale[nb, kb]:
    y[m, n] = sum_kb  x_scale[m, kb] * w_scale[n // 128, kb] * (q_x[m, kb-slice] . q_w[n, kb-slice])
A fresh accumulator per K slice is also what keeps the sum accurate on Hopper, whose FP8 tensor cores
accumulate with about 14 bits (the DeepSeek-V3 report promotes to fp32 every 128 elements for this reason).

The MoE's routed experts use the grouped form (`fp8_grouped_gemm`, `fp8_grouped_linear`): rows sorted
by expert and padded to whole 128-row blocks, each block multiplied by its expert's weight in the same
launch (the same kernel, GROUPED), as DeepGEMM's "contiguous" grouped layout does.

Every kernel has a plain PyTorch reference here (`*_ref`); the public functions choose with
`impl="auto"` (Triton on CUDA, the reference elsewhere), `"triton"` or `"reference"`.

On Hopper the large GEMMs are usually won by a second version of the same kernel, written in Gluon
(kernels/fp8_gemm_hopper.py: a TMA loader warp and two consumer warpgroups, each keeping one K slice's
MMA in flight while it scales the previous slice's partial); it is one more tuning candidate here, and
the `tl` kernel below is the one to read first (and the one the CPU tests run). On an H200 the tuned
GEMM reaches 0.83-1.03x cuBLAS's block-scaled FP8 at 4096^3 to 8192^3 (RESULTS.md).

Choices where V4 is silent, and where we differ from it:
- Activation scales are returned column-major (strides (1, M)), the layout cuBLAS's block-scaled GEMM
  wants and the one the GEMM below reads contiguously; the logical shape is [M, ceil(K/128)].
- Ragged shapes are masked (pointer path) or zero-filled by TMA; nothing is padded in memory.
- `Fp8Linear` runs the forward in FP8 and the backward in the input dtype (bf16 in training), using the
  dequantised operands the forward multiplied (a straight-through estimator for the rounding). V4 also
  runs both backward GEMMs in FP8 (the output gradient quantised 1x128, the saved activation re-quantised
  along the other axis for the weight gradient); ours is simpler and slightly more accurate, and keeps the
  saved activation in FP8 (half the memory of bf16) as V4 does.
"""

from __future__ import annotations

import math
import os
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import torch
import torch.nn as nn
import torch.nn.functional as F

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # a CPU-only torch install: the references still work, the kernels cannot launch
    HAS_TRITON = False
    triton = SimpleNamespace(jit=lambda fn: fn)
    tl = SimpleNamespace(constexpr=None)

try:
    from triton.tools.tensor_descriptor import TensorDescriptor   # host-side TMA descriptors, triton >= 3.4
except ImportError:
    TensorDescriptor = None

from kernels import fp8_gemm_hopper

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0
AMAX_MIN = 1e-4
BLOCK = 128                  # quantisation block edge; also the GEMM's BLOCK_K (one scale per K step)
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def _blocks(n: int) -> int:
    return -(-n // BLOCK)


# ---------------------------------------------------------------------------------------------------
# Plain PyTorch references
# ---------------------------------------------------------------------------------------------------

def _scale_from_amax(amax: torch.Tensor) -> torch.Tensor:
    return torch.exp2(torch.ceil(torch.log2(amax.clamp(min=AMAX_MIN) / FP8_MAX)))


def act_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (q [M, K] e4m3, scale [M, ceil(K/128)] fp32), 1x128 blocks."""
    M, K = x.shape
    xb = F.pad(x.float(), (0, _blocks(K) * BLOCK - K)).view(M, _blocks(K), BLOCK)   # [M, Kb, 128]
    scale = _scale_from_amax(xb.abs().amax(dim=-1))                                   # [M, Kb]
    q = (xb / scale[..., None]).to(FP8_DTYPE).view(M, _blocks(K) * BLOCK)[:, :K].contiguous()
    return q, scale


def weight_quant_ref(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] -> (q [N, K] e4m3, scale [ceil(N/128), ceil(K/128)] fp32), 128x128 blocks."""
    N, K = w.shape
    Nb, Kb = _blocks(N), _blocks(K)
    wb = F.pad(w.float(), (0, Kb * BLOCK - K, 0, Nb * BLOCK - N)).view(Nb, BLOCK, Kb, BLOCK)
    scale = _scale_from_amax(wb.abs().amax(dim=(1, 3)))                               # [Nb, Kb]
    q = (wb / scale[:, None, :, None]).to(FP8_DTYPE).view(Nb * BLOCK, Kb * BLOCK)[:N, :K].contiguous()
    return q, scale


def dequant_ref(q: torch.Tensor, scale: torch.Tensor, block_rows: int,
                dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """q [M, K] e4m3 with scale [ceil(M/block_rows), ceil(K/128)] -> q * scale, in `dtype`."""
    M, K = q.shape
    s = scale.repeat_interleave(block_rows, dim=0)[:M].repeat_interleave(BLOCK, dim=1)[:, :K]
    return (q.float() * s).to(dtype)


def fp8_gemm_ref(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor,
                 b_scale: torch.Tensor) -> torch.Tensor:
    """y [M, N] bf16 = dequant(a) @ dequant(b).T, computed in fp32."""
    return (dequant_ref(a, a_scale, 1, torch.float32)
            @ dequant_ref(b, b_scale, BLOCK, torch.float32).T).to(torch.bfloat16)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

@triton.jit
def _ue8m0_scale(amax):
    """(scale, 1/scale) with scale = 2^ceil(log2(max(amax, 1e-4) / 448)), both exact powers of two.

    Built on the exponent bits rather than log2/exp2, whose fast GPU versions are approximate; the
    quotient amax / 448 may be off by an ulp, so the exponent is then fixed with exact comparisons."""
    amax = tl.maximum(amax, 1e-4)
    bits = (amax / 448.0).to(tl.int32, bitcast=True)
    e = (bits >> 23) + ((bits & 0x7FFFFF) != 0).to(tl.int32)      # biased exponent of 2^ceil(log2 q)
    scale = (e << 23).to(tl.float32, bitcast=True)
    e = tl.where(amax > scale * 448.0, e + 1, e)                  # scale too small: |x / scale| > 448
    e = tl.where(amax <= scale * 224.0, e - 1, e)                 # scale / 2 would do
    return (e << 23).to(tl.float32, bitcast=True), ((254 - e) << 23).to(tl.float32, bitcast=True)


@triton.jit
def _round_to_e4m3_grid(v):
    """Round fp32 v (|v| <= 448) to the nearest e4m3 value, ties to even, staying in fp32.

    The GPU's conversion already does this; Triton's interpreter can round to the wrong power of two,
    so under the interpreter values are put on the grid first and the cast is then exact."""
    bits = v.to(tl.int32, bitcast=True)
    normal = ((bits + 0x7FFFF + ((bits >> 20) & 1)) & -1048576).to(tl.float32, bitcast=True)  # 3-bit mantissa
    subnormal = (v + 24576.0) - 24576.0     # below 2^-6 the grid step is 2^-9, the ulp of 1.5 * 2^14
    return tl.where(tl.abs(v) < 0.015625, subnormal, normal)


@triton.jit
def _quant_kernel(x_ptr, q_ptr, s_ptr, M, K, stride_xm, stride_qm, stride_sm, stride_sk,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, PER_ROW: tl.constexpr,
                  ROUND_ON_GRID: tl.constexpr):
    """One pass over a [BLOCK_M, 128] tile: amax, scale, quantise. PER_ROW: a scale per row (1x128
    blocks, activations); otherwise one scale for the tile (BLOCK_M = 128: 128x128 blocks, weights)."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)                                                 # [BLOCK_M, BLOCK_K]
    if PER_ROW:
        scale, inv = _ue8m0_scale(tl.max(tl.abs(x), axis=1))            # [BLOCK_M]
        q = x * inv[:, None]
        tl.store(s_ptr + rows * stride_sm + pid_k * stride_sk, scale, mask=rows < M)
    else:
        scale, inv = _ue8m0_scale(tl.max(tl.max(tl.abs(x), axis=1), axis=0))   # scalar
        q = x * inv
        tl.store(s_ptr + pid_m * stride_sm + pid_k * stride_sk, scale)
    if ROUND_ON_GRID:
        q = _round_to_e4m3_grid(q)
    tl.store(q_ptr + rows[:, None] * stride_qm + cols[None, :], q.to(q_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _dequant_kernel(q_ptr, s_ptr, y_ptr, M, K, stride_qm, stride_ym, stride_sm, stride_sk,
                    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, SCALE_ROWS: tl.constexpr):
    """y = q * scale[row // SCALE_ROWS, col // 128] over a [BLOCK_M, 128] tile."""
    pid_m = tl.program_id(0)
    pid_k = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (rows[:, None] < M) & (cols[None, :] < K)
    q = tl.load(q_ptr + rows[:, None] * stride_qm + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    s = tl.load(s_ptr + (rows // SCALE_ROWS) * stride_sm + pid_k * stride_sk, mask=rows < M, other=0.0)
    tl.store(y_ptr + rows[:, None] * stride_ym + cols[None, :], (q * s[:, None]).to(y_ptr.dtype.element_ty),
             mask=mask)


@triton.jit
def _k_slice(a, b, a_s_ptrs, b_s_ptrs, offs_m, offs_n, offs_k, pid_m, b_row, kb, M, N, K,
             stride_am, stride_bn, stride_ask, stride_bsk,
             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_TMA: tl.constexpr):
    """K slice kb: the a tile [BLOCK_M, BLOCK_K], the b tile [BLOCK_N, BLOCK_K], and the scale of each
    row of their product, a_s[m, kb] * b_s[weight block, kb] [BLOCK_M]."""
    if USE_TMA:
        a_tile = a.load([pid_m * BLOCK_M, kb * BLOCK_K])
        b_tile = b.load([b_row, kb * BLOCK_K])
    else:
        k = kb * BLOCK_K + offs_k
        a_tile = tl.load(a + offs_m[:, None] * stride_am + k[None, :],
                         mask=(offs_m[:, None] < M) & (k[None, :] < K), other=0.0)
        b_tile = tl.load(b + (b_row + tl.arange(0, BLOCK_N))[:, None] * stride_bn + k[None, :],
                         mask=(offs_n[:, None] < N) & (k[None, :] < K), other=0.0)
    scale = (tl.load(a_s_ptrs + kb * stride_ask, mask=offs_m < M, other=0.0)
             * tl.load(b_s_ptrs + kb * stride_bsk))
    return a_tile, b_tile, scale


@triton.jit
def _scaled_add(acc, x, scale, PIN: tl.constexpr):
    """acc + x * scale[:, None]. PIN: as side-effecting inline PTX, which LLVM keeps in program order
    with the (side-effecting) wgmma instructions; the interpreter has no inline PTX."""
    if PIN:
        return tl.inline_asm_elementwise("fma.rn.f32 $0, $1, $2, $3;", "=r,r,r,r",
                                         [x, tl.broadcast_to(scale[:, None], x.shape), acc],
                                         dtype=tl.float32, is_pure=False, pack=1)
    else:
        return acc + x * scale[:, None]


@triton.jit
def _fp8_gemm_kernel(a, b, c, a_s_ptr, b_s_ptr, M, N, K,
                     stride_am, stride_bn, stride_cm, stride_asm, stride_ask, stride_bsn, stride_bsk,
                     NUM_PROGRAMS, block_group_ptr, GROUP_ROWS,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                     GROUP_M: tl.constexpr, USE_TMA: tl.constexpr, WARP_SPECIALIZE: tl.constexpr,
                     GROUPED: tl.constexpr, PAIR: tl.constexpr, PIN: tl.constexpr):
    """c [M, N] bf16 = block-scaled a [M, K] @ b [N, K].T, e4m3 inputs.

    One code path for every variant: NUM_PROGRAMS = number of tiles launches one program per tile, fewer
    makes the programs persistent (each walks tiles pid, pid + NUM_PROGRAMS, ...). USE_TMA: a, b, c are
    host-side TMA descriptors (out-of-bounds reads return zeros, stores are clipped) instead of pointers.
    BLOCK_K = 128 and BLOCK_N divides 128, so each K step sees one scale per row of a and one for b.
    GROUPED (the MoE's experts): b holds E weights of GROUP_ROWS rows each (a multiple of 128), and the
    rows of a come in blocks of 128 that each belong to one expert, block_group_ptr[block]; a tile of a
    (BLOCK_M divides 128) is multiplied by its block's weight. PAIR: two K slices per iteration, so that
    one slice's MMA runs while the other's partial is scaled (below)."""
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(N, BLOCK_N)
    k_tiles = tl.cdiv(K, BLOCK_K)
    offs_k = tl.arange(0, BLOCK_K)
    for tile in tl.range(pid, num_pid_m * num_pid_n, NUM_PROGRAMS, warp_specialize=WARP_SPECIALIZE):
        # grouped order: GROUP_M row-tiles sweep the columns together, so their b tiles stay in L2
        group = tile // (GROUP_M * num_pid_n)
        first_m = group * GROUP_M
        group_m = tl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_m
        pid_n = (tile % (GROUP_M * num_pid_n)) // group_m
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        b_row = pid_n * BLOCK_N                                          # first row of the b tile
        if GROUPED:
            b_row += tl.load(block_group_ptr + pid_m * BLOCK_M // BLOCK_K) * GROUP_ROWS
        a_s_ptrs = a_s_ptr + offs_m * stride_asm                        # [BLOCK_M]
        b_s_ptrs = b_s_ptr + (b_row // BLOCK_K) * stride_bsn            # one 128-row weight block
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if PAIR:
            # Triton leaves an MMA in flight only when nothing in the loop reads its result: here the
            # second slice's partial q, carried into the next iteration. Its MMA is issued last and runs
            # while the first slice's partial p is scaled; p's MMA is synchronous (its wait retires the
            # previous q too). q is scaled before the new q's MMA reuses its registers (reading an
            # accumulator still in flight makes ptxas serialise every MMA: warning C7514). Offline
            # compile for sm_90 (Triton 3.9): 64 of each 128 scaling FMAs overlap an MMA, against 0.
            q = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            q_scale = tl.zeros((BLOCK_M,), dtype=tl.float32)
            for kp in range(k_tiles // 2):
                a0, b0, s0 = _k_slice(a, b, a_s_ptrs, b_s_ptrs, offs_m, offs_n, offs_k, pid_m, b_row, 2 * kp,
                                      M, N, K, stride_am, stride_bn, stride_ask, stride_bsk,
                                      BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA)
                a1, b1, s1 = _k_slice(a, b, a_s_ptrs, b_s_ptrs, offs_m, offs_n, offs_k, pid_m, b_row,
                                      2 * kp + 1, M, N, K, stride_am, stride_bn, stride_ask, stride_bsk,
                                      BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA)
                p = tl.dot(a0, tl.trans(b0))                             # waits (and retires q)
                acc = _scaled_add(acc, q, q_scale, PIN)
                acc += p * s0[:, None]                                   # overlaps the MMA below
                q = tl.dot(a1, tl.trans(b1))                             # left in flight
                q_scale = s1
            acc += q * q_scale[:, None]
            if k_tiles % 2 == 1:                                         # an odd number of slices
                a0, b0, s0 = _k_slice(a, b, a_s_ptrs, b_s_ptrs, offs_m, offs_n, offs_k, pid_m, b_row,
                                      k_tiles - 1, M, N, K, stride_am, stride_bn, stride_ask, stride_bsk,
                                      BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA)
                acc += tl.dot(a0, tl.trans(b0)) * s0[:, None]
        else:
            for kb in range(k_tiles):
                a_tile, b_tile, scale = _k_slice(a, b, a_s_ptrs, b_s_ptrs, offs_m, offs_n, offs_k, pid_m,
                                                 b_row, kb, M, N, K, stride_am, stride_bn, stride_ask,
                                                 stride_bsk, BLOCK_M, BLOCK_N, BLOCK_K, USE_TMA)
                acc += tl.dot(a_tile, tl.trans(b_tile)) * scale[:, None]              # fresh fp32 partial
        out = acc.to(tl.bfloat16)
        if USE_TMA:
            c.store([pid_m * BLOCK_M, pid_n * BLOCK_N], out)
        else:
            tl.store(c + offs_m[:, None] * stride_cm + offs_n[None, :], out,
                     mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


# ---------------------------------------------------------------------------------------------------
# Launchers: validation, configurations, tuning
# ---------------------------------------------------------------------------------------------------

def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _use_triton(impl: str, x: torch.Tensor) -> bool:
    if impl not in ("auto", "triton", "reference"):
        raise ValueError(f"impl must be 'auto', 'triton' or 'reference', got {impl!r}")
    if impl == "reference":
        return False
    if impl == "auto":
        return HAS_TRITON and x.is_cuda
    if not HAS_TRITON:
        raise ValueError("impl='triton' but triton is not installed")
    if not (x.is_cuda or _interpreting()):
        raise ValueError("impl='triton' needs CUDA tensors (or TRITON_INTERPRET=1 on the CPU)")
    return True


def _check_2d(name: str, t: torch.Tensor, dtypes: tuple) -> None:
    if t.dim() != 2:
        raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; supported: {', '.join(map(str, dtypes))}")
    if t.stride(1) != 1 and t.shape[1] > 1:
        raise ValueError(f"{name} must be contiguous along its last dim, got strides {t.stride()}")


def _check_scale(name: str, s: torch.Tensor, shape: tuple, device: torch.device) -> None:
    if s.dtype != torch.float32 or tuple(s.shape) != shape or s.device != device:
        raise ValueError(f"{name} must be fp32 of shape {shape} on {device}, "
                         f"got {s.dtype} {tuple(s.shape)} on {s.device}")


# Quantisation is one read and one write: the launch shape decides how many bytes are in flight. Rows per
# program and warps are timed once per (M, K) on the GPU (weights: the tile stays one 128 x 128 block).
_QUANT_CONFIGS = {
    True: [triton.Config({"BLOCK_M": bm}, num_warps=nw) for bm in (16, 32, 64) for nw in (2, 4, 8)],
    False: [triton.Config({"BLOCK_M": BLOCK}, num_warps=nw) for nw in (4, 8, 16)],
} if HAS_TRITON else {}
_quant_tuned = {per_row: triton.autotune(configs, key=["M", "K"])(_quant_kernel)
                for per_row, configs in _QUANT_CONFIGS.items()}


def _quant_triton(x: torch.Tensor, per_row: bool) -> tuple[torch.Tensor, torch.Tensor]:
    M, K = x.shape
    q = torch.empty(M, K, dtype=FP8_DTYPE, device=x.device)
    if per_row:   # column-major scales, strides (1, M)
        scale = torch.empty(_blocks(K), M, device=x.device).T
    else:
        scale = torch.empty(_blocks(M), _blocks(K), device=x.device)
    if M > 0 and K > 0:
        args = (x, q, scale, M, K, x.stride(0), q.stride(0), scale.stride(0), scale.stride(1))
        if _interpreting():   # fixed small tiles on the CPU
            block_m = 32 if per_row else BLOCK
            _quant_kernel[(triton.cdiv(M, block_m), _blocks(K))](
                *args, BLOCK_M=block_m, BLOCK_K=BLOCK, PER_ROW=per_row, ROUND_ON_GRID=True)
        else:
            grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]), _blocks(K))
            _quant_tuned[per_row][grid](*args, BLOCK_K=BLOCK, PER_ROW=per_row, ROUND_ON_GRID=False)
    return q, scale


def act_quant(x: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] bf16/fp16/fp32 -> (q [M, K] e4m3, scale [M, ceil(K/128)] fp32), 1x128 blocks.
    The Triton path returns the scale column-major (strides (1, M))."""
    _check_2d("x", x, INPUT_DTYPES)
    return _quant_triton(x, per_row=True) if _use_triton(impl, x) else act_quant_ref(x)


def weight_quant(w: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """w [N, K] bf16/fp16/fp32 -> (q [N, K] e4m3, scale [ceil(N/128), ceil(K/128)] fp32), 128x128 blocks."""
    _check_2d("w", w, INPUT_DTYPES)
    return _quant_triton(w, per_row=False) if _use_triton(impl, w) else weight_quant_ref(w)


def dequant(q: torch.Tensor, scale: torch.Tensor, block_rows: int, dtype: torch.dtype = torch.bfloat16,
            impl: str = "auto") -> torch.Tensor:
    """q [M, K] e4m3 with scale [ceil(M/block_rows), ceil(K/128)] -> [M, K] in `dtype`.
    block_rows = 1 for activation scales, 128 for weight scales."""
    _check_2d("q", q, (FP8_DTYPE,))
    if block_rows not in (1, BLOCK):
        raise ValueError(f"block_rows must be 1 or {BLOCK}, got {block_rows}")
    if dtype not in INPUT_DTYPES:
        raise ValueError(f"dtype {dtype} not supported; use one of {INPUT_DTYPES}")
    M, K = q.shape
    _check_scale("scale", scale, (-(-M // block_rows), _blocks(K)), q.device)
    if not _use_triton(impl, q):
        return dequant_ref(q, scale, block_rows, dtype)
    y = torch.empty(M, K, dtype=dtype, device=q.device)
    if M > 0 and K > 0:
        _dequant_kernel[(triton.cdiv(M, 32), _blocks(K))](
            q, scale, y, M, K, q.stride(0), y.stride(0), scale.stride(0), scale.stride(1),
            BLOCK_M=32, BLOCK_K=BLOCK, SCALE_ROWS=block_rows, num_warps=4)
    return y


@dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of `_fp8_gemm_kernel`."""
    block_m: int = 64
    block_n: int = 64
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    tma: bool = False              # TMA descriptors for a, b, c (needs 16-byte aligned rows)
    persistent: int = 0            # programs per SM, each looping over tiles (0: one program per tile)
    warp_specialize: bool = False  # let Triton split loads and MMA into separate warps
    pair: bool = False             # two K slices per iteration: one's MMA overlaps the other's scaling
    gluon: bool = False            # kernels/fp8_gemm_hopper.py instead (Hopper; block_m 128, TMA,
                                   # persistent; num_stages is its ring's depth)


# The readable baseline (pointers, one program per tile); used under the interpreter and as the
# fallback. The candidates are timed once per (M bucket, N, K) on the GPU and the fastest kept.
# BLOCK_N <= 128 keeps one weight scale per tile and K step. 128 x 128 with 8 warps is the largest tile
# whose two fp32 tiles (the accumulator and the fresh per-K-slice partial) fit the register file: a
# 128 x 256 tile would need 2 x 32K registers, all of an SM's 64K.
PLAIN_CONFIG = GemmConfig()
# Triton waits for each K slice's MMA before scaling it into the accumulator, so within a program the
# tensor cores idle during that arithmetic; 128 x 64 / 64 x 128 tiles with 4 warps and 3 stages (about
# 90 KB of shared memory) fit two programs per SM, whose MMA and arithmetic can then interleave. Pairs
# of K slices overlap half of it; the Gluon kernel all of it (0.79-0.83x cuBLAS at the large shapes for
# the best `tl` candidate on an H200, 0.99-1.03x for the Gluon one, where the tuner picked it).
GEMM_CANDIDATES_LARGE_M = [
    GemmConfig(128, 128, 8, 8, stages, tma=True, persistent=persistent)
    for stages in (3, 4, 5) for persistent in (0, 1)
] + [
    GemmConfig(128, 128, 8, 8, 4, tma=True, persistent=1, warp_specialize=True),
] + [
    GemmConfig(block_m, block_n, 8, 4, 3, tma=True, persistent=persistent)
    for block_m, block_n in ((64, 128), (128, 64)) for persistent in (0, 2)
] + [
    # pairs: each stage holds two K slices, so 3 stages of 128 x 128 already take 192 KB of shared memory
    GemmConfig(128, 128, 8, 8, stages, tma=True, persistent=persistent, pair=True)
    for stages in (2, 3) for persistent in (0, 1)
] + [
    GemmConfig(block_m, block_n, 8, 4, 2, tma=True, persistent=persistent, pair=True)
    for block_m, block_n in ((64, 128), (128, 64)) for persistent in (0, 2)
] + [GemmConfig(128, 128, 8, 8, 4)] + [
    # the Gluon kernel: a TMA loader warp and two consumer warpgroups that keep one K slice's MMA in
    # flight while the previous partial is scaled (all of it, where PAIR overlaps half)
    GemmConfig(128, 128, group_m, 8, stages, tma=True, persistent=1, gluon=True)
    for stages in (4, 5) for group_m in (8, 16)
]
GEMM_CANDIDATES_SMALL_M = [   # decode: memory-bound on the weight; narrow tiles give every SM work
    GemmConfig(64, block_n, 8, 4, stages, tma=True) for block_n in (32, 64, 128) for stages in (3, 5)
] + [GemmConfig(64, 64, 8, 4, 4)]

_tuned: dict[tuple, GemmConfig] = {}


def _tma_ok(*tensors: torch.Tensor) -> bool:
    return TensorDescriptor is not None and all(
        t.data_ptr() % 16 == 0 and t.stride(1) == 1 and (t.stride(0) * t.element_size()) % 16 == 0
        for t in tensors)


def _num_sms(device: torch.device) -> int:
    # under the interpreter a small number, so the tests walk several tiles per persistent program
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 3


def _launch_gemm(a, a_s, b, b_s, cfg: GemmConfig, groups=None) -> torch.Tensor:
    """groups = (block_group [M / 128] int32, n_out, Np): b is E stacked [Np, K] weights (b [E * Np, K],
    b_s [E * Np / 128, Kb]) of which the first n_out rows each are real; c is [M, n_out]."""
    M, K = a.shape
    N = b.shape[0] if groups is None else groups[1]
    c = torch.empty(M, N, dtype=torch.bfloat16, device=a.device)
    if M == 0 or N == 0:
        return c
    if K == 0:
        return c.zero_()
    if BLOCK % cfg.block_n:
        raise ValueError(f"block_n must divide {BLOCK}, got {cfg.block_n}")
    if cfg.gluon:
        if not fp8_gemm_hopper.supported(a, a_s, b, c) or cfg.block_m != 128:
            raise ValueError("the Gluon kernel needs Hopper, a Triton with Gluon, block_m = 128, M a multiple "
                             "of 4, 16-byte aligned rows and column-major activation scales")
        return fp8_gemm_hopper.launch(a, a_s, b, b_s, c, block_n=cfg.block_n, group_m=cfg.group_m,
                                      stages=cfg.num_stages, num_programs=cfg.persistent * _num_sms(c.device),
                                      groups=groups)
    a_arg, b_arg, c_arg = a, b, c
    if cfg.tma:
        if not _tma_ok(a, b, c):
            raise ValueError("tma=True needs TensorDescriptor (triton >= 3.4) and 16-byte aligned rows: "
                             f"K = {K} and 2 * N = {2 * N} multiples of 16")
        a_arg = TensorDescriptor(a, [M, K], [a.stride(0), 1], [cfg.block_m, BLOCK])
        b_arg = TensorDescriptor(b, [b.shape[0], K], [b.stride(0), 1], [cfg.block_n, BLOCK])
        c_arg = TensorDescriptor(c, [M, N], [c.stride(0), 1], [cfg.block_m, cfg.block_n])
    tiles = triton.cdiv(M, cfg.block_m) * triton.cdiv(N, cfg.block_n)
    programs = min(tiles, cfg.persistent * _num_sms(c.device)) if cfg.persistent else tiles
    block_group, group_rows = (a_s, 0) if groups is None else (groups[0], groups[2])   # (a_s: unread)
    _fp8_gemm_kernel[(programs,)](
        a_arg, b_arg, c_arg, a_s, b_s, M, N, K, a.stride(0), b.stride(0),
        c.stride(0), a_s.stride(0), a_s.stride(1), b_s.stride(0), b_s.stride(1), programs,
        block_group, group_rows,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=BLOCK, GROUP_M=cfg.group_m, USE_TMA=cfg.tma,
        WARP_SPECIALIZE=cfg.warp_specialize, GROUPED=groups is not None, PAIR=cfg.pair,
        PIN=cfg.pair and not _interpreting(),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return c


def tuned_gemm_config(a, a_scale, b, b_scale, groups=None) -> GemmConfig:
    """The fastest candidate for this problem size, timed on first use and remembered.

    Tuned here rather than with triton.autotune so that a candidate the installed Triton cannot compile
    (warp specialisation on Hopper is recent) or gets wrong is skipped with a warning instead of failing:
    each candidate's output is first compared with the plain kernel's."""
    M, K = a.shape
    N = b.shape[0] if groups is None else groups[1]
    tma = _tma_ok(a, b) and (2 * N) % 16 == 0
    key = (min(triton.next_power_of_2(max(M, 1)), 4096), N, K, tma, a.device, groups is None)
    if key in _tuned:
        return _tuned[key]
    candidates = [PLAIN_CONFIG] + (GEMM_CANDIDATES_SMALL_M if M <= 64 else GEMM_CANDIDATES_LARGE_M)
    expected = _launch_gemm(a, a_scale, b, b_scale, PLAIN_CONFIG, groups).float()
    tolerance = 1e-2 * expected.abs().max().item() + 1e-6
    best, best_ms = PLAIN_CONFIG, math.inf
    for cfg in candidates:
        if cfg.tma and not tma:
            continue
        try:
            got = _launch_gemm(a, a_scale, b, b_scale, cfg, groups).float()
            if (got - expected).abs().max().item() > tolerance:
                warnings.warn(f"fp8_gemm: {cfg} disagrees with the plain kernel; skipped")
                continue
            ms = triton.testing.do_bench(lambda: _launch_gemm(a, a_scale, b, b_scale, cfg, groups),
                                         warmup=5, rep=20, return_mode="median")
        except Exception as e:  # noqa: BLE001 -- a candidate this Triton cannot build is skipped
            warnings.warn(f"fp8_gemm: {cfg} failed ({type(e).__name__}: {str(e)[:200]}); skipped")
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _tuned[key] = best
    return best


def fp8_gemm(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, b_scale: torch.Tensor,
             impl: str = "auto", config: GemmConfig | None = None) -> torch.Tensor:
    """y [M, N] bf16 = a @ b.T with block scales: a [M, K] e4m3 with a_scale [M, ceil(K/128)] (1x128),
    b [N, K] e4m3 with b_scale [ceil(N/128), ceil(K/128)] (128x128). `config` pins a launch
    configuration (the default: tuned on CUDA, `PLAIN_CONFIG` under the interpreter)."""
    _check_2d("a", a, (FP8_DTYPE,))
    _check_2d("b", b, (FP8_DTYPE,))
    (M, K), N = a.shape, b.shape[0]
    if b.shape[1] != K:
        raise ValueError(f"a is [M, K] = {tuple(a.shape)} but b is [N, K] = {tuple(b.shape)}: K differs")
    _check_scale("a_scale", a_scale, (M, _blocks(K)), a.device)
    _check_scale("b_scale", b_scale, (_blocks(N), _blocks(K)), a.device)
    if not _use_triton(impl, a):
        return fp8_gemm_ref(a, a_scale, b, b_scale)
    if config is None:
        config = PLAIN_CONFIG if not a.is_cuda else tuned_gemm_config(a, a_scale, b, b_scale)
    return _launch_gemm(a, a_scale, b, b_scale, config)


# ---------------------------------------------------------------------------------------------------
# The grouped form, for the MoE's routed experts
# ---------------------------------------------------------------------------------------------------
# The MoE sorts its (token, expert) pairs by expert and pads each expert's rows to a multiple of 128,
# so every 1x128-scaled block of 128 rows belongs to one expert (block_group[r] for rows 128r..128r+127).
# The weights [E, N, K] are quantised per expert in 128x128 blocks, N padded to a multiple of 128 so no
# block straddles two experts. One launch multiplies every row block by its expert's weight.

def weight_quant_grouped(w: torch.Tensor, impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] -> (q [E, Np, K] e4m3, scale [E, Np / 128, ceil(K/128)] fp32), Np = N rounded up to
    128 (zero rows), each expert's weight in its own 128x128 blocks."""
    if w.dim() != 3:
        raise ValueError(f"w must be [E, N, K], got shape {tuple(w.shape)}")
    E, N, K = w.shape
    wp = F.pad(w, (0, 0, 0, -N % BLOCK)) if N % BLOCK else w                      # [E, Np, K]
    q, scale = weight_quant(wp.reshape(-1, K), impl)
    return q.view(E, -1, K), scale.view(E, -1, scale.shape[-1])


def fp8_grouped_gemm_ref(a, a_scale, b, b_scale, block_group, n_out: int) -> torch.Tensor:
    """y [R, n_out] bf16: row block r of a times b[block_group[r]].T, in fp32 (one matmul per expert)."""
    R, K = a.shape
    x = dequant_ref(a, a_scale, 1, torch.float32).view(-1, BLOCK, K)              # [R/128, 128, K]
    y = torch.zeros(R // BLOCK, BLOCK, n_out, device=a.device)
    for e in block_group.unique().tolist():
        blocks = (block_group == e).nonzero().squeeze(1)
        w = dequant_ref(b[e], b_scale[e], BLOCK, torch.float32)[:n_out]            # [n_out, K]
        y[blocks] = x[blocks] @ w.T
    return y.view(R, n_out).to(torch.bfloat16)


def fp8_grouped_gemm(a, a_scale, b, b_scale, block_group, n_out: int, impl: str = "auto",
                     config: GemmConfig | None = None) -> torch.Tensor:
    """y [R, n_out] bf16: a [R, K] e4m3 (R a multiple of 128) with a_scale [R, ceil(K/128)] (1x128);
    b [E, Np, K] e4m3 with b_scale [E, Np / 128, ceil(K/128)] as weight_quant_grouped returns them;
    block_group [R / 128] int32, the expert of each block of 128 rows; n_out <= Np, the real N."""
    _check_2d("a", a, (FP8_DTYPE,))
    R, K = a.shape
    if b.dim() != 3 or b.dtype != FP8_DTYPE or b.shape[2] != K or b.shape[1] % BLOCK or not 0 < n_out <= b.shape[1]:
        raise ValueError(f"b must be e4m3 [E, Np, K = {K}] with Np a multiple of {BLOCK} and n_out <= Np, got "
                         f"{b.dtype} {tuple(b.shape)}, n_out = {n_out}")
    E, Np = b.shape[:2]
    if R % BLOCK or tuple(block_group.shape) != (R // BLOCK,) or block_group.dtype != torch.int32:
        raise ValueError(f"need R = {R} a multiple of {BLOCK} and block_group int32 [{R // BLOCK}], got "
                         f"{block_group.dtype} {tuple(block_group.shape)}")
    _check_scale("a_scale", a_scale, (R, _blocks(K)), a.device)
    _check_scale("b_scale", b_scale, (E, Np // BLOCK, _blocks(K)), a.device)
    if not _use_triton(impl, a):
        return fp8_grouped_gemm_ref(a, a_scale, b, b_scale, block_group, n_out)
    b2, b_s2, groups = b.view(E * Np, K), b_scale.view(E * Np // BLOCK, -1), (block_group, n_out, Np)
    if config is None:
        config = PLAIN_CONFIG if not a.is_cuda else tuned_gemm_config(a, a_scale, b2, b_s2, groups)
    return _launch_gemm(a, a_scale, b2, b_s2, config, groups)


class _Fp8GroupedLinearFunction(torch.autograd.Function):
    """y = fp8_grouped_gemm(act_quant(x), weight_quant_grouped(w)); the backward in the gradient's
    dtype with the dequantised operands (as _Fp8LinearFunction), one GEMM pair per expert."""

    @staticmethod
    def forward(ctx, x, weight, block_group, impl):
        x_q, x_s = act_quant(x, impl)                                    # [R, K], [R, Kb]
        w_q, w_s = weight_quant_grouped(weight.detach(), impl)            # [E, Np, K], [E, Np/128, Kb]
        ctx.save_for_backward(x_q, x_s, w_q, w_s, block_group)
        ctx.impl, ctx.n_out, ctx.weight_dtype = impl, weight.shape[1], weight.dtype
        return fp8_grouped_gemm(x_q, x_s, w_q, w_s, block_group, weight.shape[1], impl).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_y):                                           # grad_y [R, N]
        x_q, x_s, w_q, w_s, block_group = ctx.saved_tensors
        dtype, n_out, (E, Np, K) = grad_y.dtype, ctx.n_out, w_q.shape
        x = dequant(x_q, x_s, 1, dtype, ctx.impl).view(-1, BLOCK, K)                          # [R/128, 128, K]
        w = dequant(w_q.view(-1, K), w_s.view(-1, w_s.shape[-1]), BLOCK, dtype, ctx.impl).view(E, Np, K)
        g = grad_y.view(-1, BLOCK, n_out)                                                     # [R/128, 128, N]
        grad_x = torch.empty_like(x)
        grad_w = torch.zeros(E, n_out, K, dtype=torch.float32, device=grad_y.device)
        for e in block_group.unique().tolist():       # one host read of the experts present
            blocks = (block_group == e).nonzero().squeeze(1)
            ge, xe = g[blocks].reshape(-1, n_out), x[blocks].reshape(-1, K)
            grad_x[blocks] = (ge @ w[e, :n_out]).view(-1, BLOCK, K)
            grad_w[e] = (ge.T @ xe).float()
        return grad_x.view(-1, K), grad_w.to(ctx.weight_dtype), None, None


def fp8_grouped_linear(x: torch.Tensor, weight: torch.Tensor, block_group: torch.Tensor,
                       impl: str = "auto") -> torch.Tensor:
    """x [R, K] (rows grouped in blocks of 128 per expert), weight [E, N, K] -> [R, N] in x's dtype:
    row block r times weight[block_group[r]].T through the FP8 grouped GEMM. Differentiable in x and
    weight."""
    if x.dim() != 2 or weight.dim() != 3 or x.shape[1] != weight.shape[2]:
        raise ValueError(f"need x [R, K] and weight [E, N, K] with the same K, got {tuple(x.shape)} "
                         f"and {tuple(weight.shape)}")
    return _Fp8GroupedLinearFunction.apply(x if x.stride(1) == 1 else x.contiguous(), weight, block_group, impl)


def fp8_batched_linear(x: torch.Tensor, weight: torch.Tensor, impl: str = "auto") -> torch.Tensor:
    """x [G, M, K], weight [G, N, K] -> [G, M, N]: G independent products x[g] @ weight[g].T in FP8, as
    one grouped launch (each group's M rows padded to whole 128-row blocks). V4's grouped output
    projection wo_a is this product with G = o_groups."""
    if x.dim() != 3 or weight.dim() != 3 or x.shape[0] != weight.shape[0] or x.shape[2] != weight.shape[2]:
        raise ValueError(f"need x [G, M, K] and weight [G, N, K], got {tuple(x.shape)} and {tuple(weight.shape)}")
    G, M, K = x.shape
    Mp = -(-max(M, 1) // BLOCK) * BLOCK
    rows = F.pad(x, (0, 0, 0, Mp - M)).reshape(G * Mp, K)                            # [G * Mp, K]
    block_group = torch.arange(G, device=x.device, dtype=torch.int32).repeat_interleave(Mp // BLOCK)
    return fp8_grouped_linear(rows, weight, block_group, impl).view(G, Mp, -1)[:, :M]


# ---------------------------------------------------------------------------------------------------
# Fp8Linear
# ---------------------------------------------------------------------------------------------------

class _Fp8LinearFunction(torch.autograd.Function):
    """y = fp8_gemm(act_quant(x), weight_quant(w)); backward in the gradient's dtype with the dequantised
    operands (the rounding is passed straight through). Saves the FP8 activation, not the bf16 one."""

    @staticmethod
    def forward(ctx, x, weight, w_q, w_s, impl):
        x_q, x_s = act_quant(x, impl)                                    # [M, K], [M, Kb]
        ctx.save_for_backward(x_q, x_s, w_q, w_s)
        ctx.impl, ctx.weight_dtype = impl, weight.dtype
        return fp8_gemm(x_q, x_s, w_q, w_s, impl).to(x.dtype)            # [M, N]

    @staticmethod
    def backward(ctx, grad_y):                                           # grad_y [M, N]
        x_q, x_s, w_q, w_s = ctx.saved_tensors
        dtype = grad_y.dtype
        grad_x = grad_y @ dequant(w_q, w_s, BLOCK, dtype, ctx.impl)                      # [M, K]
        grad_w = grad_y.T @ dequant(x_q, x_s, 1, dtype, ctx.impl)                        # [N, K]
        return grad_x, grad_w.to(ctx.weight_dtype), None, None, None


class Fp8Linear(nn.Linear):
    """nn.Linear whose matmul runs in block-scaled FP8. Same parameters and state-dict keys as
    nn.Linear. The weight is re-quantised every forward: in training it changes every step and the
    quantisation is one read of it, small beside the GEMM. With `cache_weight` (for sampling, where
    the weight is fixed and a decode step would otherwise spend more time quantising than multiplying)
    the quantised weight is kept while the weight's storage and version counter are unchanged; it is
    never cached while autograd records, since FSDP refills parameter storage in place."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, device=None, dtype=None,
                 impl: str = "auto", cache_weight: bool = False):
        super().__init__(in_features, out_features, bias, device, dtype)
        self.impl = impl
        self.cache_weight = cache_weight
        self._weight_cache = None

    @classmethod
    def from_linear(cls, linear: nn.Linear, impl: str = "auto", cache_weight: bool = False) -> Fp8Linear:
        """An Fp8Linear sharing `linear`'s Parameter objects (so optimizer state and hooks carry over)."""
        new = cls(linear.in_features, linear.out_features, linear.bias is not None, device="meta",
                  impl=impl, cache_weight=cache_weight)
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new

    def _quantised_weight(self) -> tuple[torch.Tensor, torch.Tensor]:
        w = self.weight
        if not (self.cache_weight and not torch.is_grad_enabled()):
            return weight_quant(w.detach(), self.impl)
        key = (w.data_ptr(), w._version, w.device, w.dtype)
        if self._weight_cache is None or self._weight_cache[0] != key:
            self._weight_cache = (key, *weight_quant(w.detach(), self.impl))
        return self._weight_cache[1:]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.in_features:
            raise ValueError(f"Fp8Linear expects the last dim of x to be {self.in_features}, "
                             f"got shape {tuple(x.shape)}")
        w_q, w_s = self._quantised_weight()
        x2d = x.reshape(-1, self.in_features)                           # [M, K]
        if x2d.stride(1) != 1:
            x2d = x2d.contiguous()
        y = _Fp8LinearFunction.apply(x2d, self.weight, w_q, w_s, self.impl)
        y = y.view(*x.shape[:-1], self.out_features)                    # [..., N]
        return y + self.bias if self.bias is not None else y

    def extra_repr(self) -> str:
        return super().extra_repr() + f", fp8=e4m3 1x128/128x128, impl={self.impl}"


def convert_to_fp8(module: nn.Module, include=None, impl: str = "auto",
                   cache_weight: bool = False) -> list[str]:
    """Swap the nn.Linear submodules of `module` for Fp8Linear in place, keeping the same Parameter
    objects, so names, state-dict keys and optimizer state are unchanged. `include(name, linear)`
    chooses which (default: all). Returns the converted names. Call before FSDP's fully_shard and
    torch.compile."""
    converted = []
    for name, child in list(module.named_modules()):
        if not name or type(child) is not nn.Linear or (include is not None and not include(name, child)):
            continue                                # (the root module itself is never swapped)
        parent_name, _, attr = name.rpartition(".")
        parent = module.get_submodule(parent_name) if parent_name else module
        setattr(parent, attr, Fp8Linear.from_linear(child, impl, cache_weight))
        converted.append(name)
    return converted
