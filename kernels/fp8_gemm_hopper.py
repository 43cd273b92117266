"""The block-scaled FP8 GEMM of kernels/fp8_gemm.py, written in Gluon for Hopper (sm_90) with warp roles.

Same contract as `_fp8_gemm_kernel` (read that one first): c [M, N] bf16 = a [M, K] e4m3 @ b [N, K].T,
each 128-deep K slice kb scaled by a_scale[m, kb] * b_scale[n // 128, kb] into an fp32 accumulator.

Why a second version. In `tl` every K slice's MMA must finish before its fresh partial can be scaled
into the accumulator, so the tensor cores idle while the 64 FMAs per thread run (`tl` keeps an MMA in
flight only when nothing in the loop reads its result; the PAIR trick there overlaps half of them).
Gluon exposes the asynchronous `wgmma` directly, so each consumer issues slice kb's MMA and only then
waits for slice kb - 1's (`warpgroup_mma_wait(1)`: one left in flight) and scales it: the MMA of one
slice runs during the scaling of the previous. Two partials alternate in registers (64 + 64 fp32 a
thread, plus the 64 of the accumulator).

Warp roles (`gl.warp_specialize`):
    loader    1 warp   TMA: a tile [128, 128], b tile [BLOCK_N, 128] and the a tile's 128 row scales of
                       slice kb into ring stage kb % STAGES; waits for the stage to be released first
    consumers 8 warps  two warpgroups, 64 rows each, the MMAs, the scaling and the epilogue (bf16 through
                       shared memory and a TMA store that overlaps the next tile's main loop)
The programs are persistent (one per SM, tiles pid, pid + P, ...) in the grouped order of the `tl`
kernel. The loader and the consumers meet only at the ring's mbarriers ("ready": the TMA bytes landed;
"empty": the consumers are done with the stage; Gluon arrives once for the partition, after a barrier
of its 256 threads, so the two warpgroups do sync each time they release a stage).

Limits (`supported` says which inputs qualify; kernels/fp8_gemm.py falls back to the `tl` kernel for the
rest): CUDA capability 9.x, a Triton with Gluon's Hopper module (written for 3.6), TMA-aligned rows (K and N
multiples of 16 bytes' worth), M a multiple of 4 (the activation scales are read by TMA, 16-byte rows).
The CPU interpreter cannot run Gluon: this kernel is tested on the GPU (tests/test_fp8_gemm.py, CUDA
only) against the same references as the `tl` kernel.
"""

from __future__ import annotations

import torch

try:
    import triton
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma,
                                                                  warpgroup_mma, warpgroup_mma_wait)
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor as GluonDescriptor
    HAS_GLUON = True
except ImportError:  # an older Triton, or none: the `tl` kernel serves every shape
    HAS_GLUON = False

BLOCK_K = 128                # one scale per K slice (kernels/fp8_gemm.py's BLOCK)


if HAS_GLUON:

    _BLOCK_K = gl.constexpr(BLOCK_K)                     # (kernels read globals only as constexprs)

    @gluon.jit
    def _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M: gl.constexpr):
        """Grouped order (as in the `tl` kernel): GROUP_M row tiles sweep the columns together."""
        group = tile // (GROUP_M * num_pid_n)
        first_m = group * GROUP_M
        group_m = gl.minimum(num_pid_m - first_m, GROUP_M)
        pid_m = first_m + (tile % (GROUP_M * num_pid_n)) % group_m
        pid_n = (tile % (GROUP_M * num_pid_n)) // group_m
        return pid_m, pid_n

    @gluon.jit
    def _b_row(pid_m, pid_n, block_group_ptr, GROUP_ROWS, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
               GROUPED: gl.constexpr):
        """First row of the b tile; GROUPED: in the weight of the expert that owns this row block."""
        row = pid_n * BLOCK_N
        if GROUPED:
            row += gl.load(block_group_ptr + pid_m * BLOCK_M // _BLOCK_K) * GROUP_ROWS
        return row

    @gluon.jit
    def _loader(a_desc, b_desc, as_desc, a_bufs, b_bufs, as_bufs, ready, empty, M, N, K, block_group_ptr,
                GROUP_ROWS, GROUP_M: gl.constexpr, STAGES: gl.constexpr, GROUPED: gl.constexpr):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, _BLOCK_K)
        nbytes: gl.constexpr = (a_desc.block_type.nbytes + b_desc.block_type.nbytes
                                + as_desc.block_type.nbytes)
        it = 0                                                   # K slices loaded so far, all tiles
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            b_row = _b_row(pid_m, pid_n, block_group_ptr, GROUP_ROWS, BLOCK_M, BLOCK_N, GROUPED)
            for kb in range(k_tiles):
                s = it % STAGES
                # stage s was last filled for slice it - STAGES: wait for its release (the first pass
                # through the ring waits on the phase before the first, which counts as complete)
                mbarrier.wait(empty.index(s), ((it // STAGES) & 1) ^ 1)
                bar = ready.index(s)
                mbarrier.expect(bar, nbytes)
                tma.async_copy_global_to_shared(a_desc, [pid_m * BLOCK_M, kb * _BLOCK_K], bar, a_bufs.index(s))
                tma.async_copy_global_to_shared(b_desc, [b_row, kb * _BLOCK_K], bar, b_bufs.index(s))
                # the scales of slice kb, rows pid_m*BLOCK_M..: a_scale is column-major, so they are
                # BLOCK_M consecutive floats at kb * M + row (rows past M read the next slice's or
                # zeros; their outputs are clipped by the store)
                tma.async_copy_global_to_shared(as_desc, [kb * M + pid_m * BLOCK_M], bar, as_bufs.index(s))
                it += 1

    @gluon.jit
    def _issue(a_bufs, b_bufs, ready, it, regs, STAGES: gl.constexpr):
        """Wait for K slice `it` (counted over all tiles) to land and issue its MMA into regs (a fresh
        partial: use_acc=False), asynchronously."""
        s = it % STAGES
        mbarrier.wait(ready.index(s), (it // STAGES) & 1)
        return warpgroup_mma(a_bufs.index(s), b_bufs.index(s).permute((1, 0)), regs, use_acc=False,
                             is_async=True)

    @gluon.jit
    def _retire(acc, part, as_bufs, empty, b_s_row, kb, it, PENDING: gl.constexpr, STAGES: gl.constexpr,
                row_layout: gl.constexpr):
        """Wait for slice kb's MMA (stage it % STAGES) with PENDING later MMAs left in flight, release the
        stage, and return (acc + part * a_scale[rows, kb] * b_scale[block, kb], part)."""
        s = it % STAGES
        # the scales first: their loads' latency hides behind the MMA
        scale = as_bufs.index(s).load(row_layout) * gl.load(b_s_row + kb)                # [BLOCK_M]
        part = warpgroup_mma_wait(PENDING, deps=(part, ))
        mbarrier.arrive(empty.index(s), count=1)
        # acc + part * scale as side-effecting inline PTX: LLVM keeps it in program order with the
        # wgmma instructions (also side-effecting), so the next MMA into these registers is issued only
        # after it (left free, LLVM sinks the FMAs past that MMA, which then needs a copy of the
        # registers and ptxas serialises every wgmma: warning C7514)
        acc = gl.inline_asm_elementwise("fma.rn.f32 $0, $1, $2, $3;", "=r,r,r,r",
                                        [part, gl.broadcast(scale[:, None], part)[0], acc],
                                        dtype=gl.float32, is_pure=False, pack=1)
        return acc, part

    @gluon.jit
    def _consumer(a_desc, b_desc, c_desc, a_bufs, b_bufs, as_bufs, c_smem, ready, empty, b_s_ptr,
                  stride_bsn, M, N, K, block_group_ptr, GROUP_ROWS, GROUP_M: gl.constexpr,
                  STAGES: gl.constexpr, GROUPED: gl.constexpr, num_warps: gl.constexpr):
        BLOCK_M: gl.constexpr = a_desc.block_type.shape[0]
        BLOCK_N: gl.constexpr = b_desc.block_type.shape[0]
        # wgmma's fp32 result: warps stacked along M (two warpgroups of 64 rows), one instruction
        # 16 x BLOCK_N x 32 (the k of an FP8 wgmma is 32)
        acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                             instr_shape=[16, BLOCK_N, 32])
        row_layout: gl.constexpr = gl.SliceLayout(1, acc_layout)
        num_pid_m = gl.cdiv(M, BLOCK_M)
        num_pid_n = gl.cdiv(N, BLOCK_N)
        k_tiles = gl.cdiv(K, _BLOCK_K)
        # Two register sets for the partials, X and Y. The K loop is unrolled by two so that each
        # keeps its registers: a copy between them while an MMA is in flight makes ptxas serialise
        # every wgmma (its warning C7515), which a loop rotating one "free" set through did.
        x = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        y = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
        it = 0                                         # this program's K slices before this tile
        for tile in range(gl.program_id(0), num_pid_m * num_pid_n, gl.num_programs(0)):
            pid_m, pid_n = _tile_coords(tile, num_pid_m, num_pid_n, GROUP_M)
            b_row = _b_row(pid_m, pid_n, block_group_ptr, GROUP_ROWS, BLOCK_M, BLOCK_N, GROUPED)
            b_s_row = b_s_ptr + (b_row // _BLOCK_K) * stride_bsn
            acc = gl.zeros([BLOCK_M, BLOCK_N], gl.float32, acc_layout)
            # x and y: the registers (fp32 tensors); xa / ya: an MMA in flight in them
            xa = _issue(a_bufs, b_bufs, ready, it, x, STAGES)                    # slice 0
            for kb in range(0, k_tiles - 2, 2):
                # slice kb is in flight in x: issue kb + 1 into y, retire kb, issue kb + 2 into x,
                # retire kb + 1; one MMA always runs while the previous partial is scaled
                ya = _issue(a_bufs, b_bufs, ready, it + kb + 1, y, STAGES)
                acc, x = _retire(acc, xa, as_bufs, empty, b_s_row, kb, it + kb, 1, STAGES, row_layout)
                xa = _issue(a_bufs, b_bufs, ready, it + kb + 2, x, STAGES)
                acc, y = _retire(acc, ya, as_bufs, empty, b_s_row, kb + 1, it + kb + 1, 1, STAGES, row_layout)
            last = k_tiles - 1                       # slice last - 1 or last is in flight in x
            if k_tiles % 2 == 0:                     # two slices left: last - 1 (in x) and last
                ya = _issue(a_bufs, b_bufs, ready, it + last, y, STAGES)
                acc, x = _retire(acc, xa, as_bufs, empty, b_s_row, last - 1, it + last - 1, 1, STAGES,
                                 row_layout)
                acc, y = _retire(acc, ya, as_bufs, empty, b_s_row, last, it + last, 0, STAGES, row_layout)
            else:                                    # one slice left: last (in x)
                acc, x = _retire(acc, xa, as_bufs, empty, b_s_row, last, it + last, 0, STAGES, row_layout)
            it += k_tiles
            # epilogue: the previous tile's TMA store must have left c_smem before it is refilled
            tma.store_wait(pendings=0)
            c_smem.store(acc.to(gl.bfloat16))
            fence_async_shared()
            tma.async_copy_shared_to_global(c_desc, [pid_m * BLOCK_M, pid_n * BLOCK_N], c_smem)
        tma.store_wait(pendings=0)

    @gluon.jit
    def _fp8_gemm_hopper_kernel(a_desc, b_desc, c_desc, as_desc, b_s_ptr, stride_bsn, M, N, K,
                                block_group_ptr, GROUP_ROWS, GROUP_M: gl.constexpr, STAGES: gl.constexpr,
                                GROUPED: gl.constexpr, num_warps: gl.constexpr):
        a_bufs = gl.allocate_shared_memory(a_desc.dtype, [STAGES] + a_desc.block_type.shape, a_desc.layout)
        b_bufs = gl.allocate_shared_memory(b_desc.dtype, [STAGES] + b_desc.block_type.shape, b_desc.layout)
        as_bufs = gl.allocate_shared_memory(as_desc.dtype, [STAGES] + as_desc.block_type.shape, as_desc.layout)
        c_smem = gl.allocate_shared_memory(c_desc.dtype, c_desc.block_type.shape, c_desc.layout)
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)               # the loader's expect + TMA bytes
            mbarrier.init(empty.index(i), count=1)               # the consumers, once both are done
        gl.warp_specialize([
            (_consumer, (a_desc, b_desc, c_desc, a_bufs, b_bufs, as_bufs, c_smem, ready, empty, b_s_ptr,
                         stride_bsn, M, N, K, block_group_ptr, GROUP_ROWS, GROUP_M, STAGES, GROUPED,
                         num_warps)),
            (_loader, (a_desc, b_desc, as_desc, a_bufs, b_bufs, as_bufs, ready, empty, M, N, K,
                       block_group_ptr, GROUP_ROWS, GROUP_M, STAGES, GROUPED)),
        ], [1], [40])


def supported(a: torch.Tensor, a_scale: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> bool:
    """Whether this kernel can run these operands (else use the `tl` kernel)."""
    if not (HAS_GLUON and a.is_cuda and torch.cuda.get_device_capability(a.device)[0] == 9):
        return False
    M, K = a.shape
    aligned = all(t.data_ptr() % 16 == 0 and t.stride(-1) == 1 for t in (a, b, c))
    return (aligned and K % 16 == 0 and (2 * c.shape[1]) % 16 == 0 and M % 4 == 0
            and a_scale.stride(0) == 1 and a_scale.stride(1) == M and a_scale.data_ptr() % 16 == 0)


def launch(a, a_scale, b, b_scale, c, block_n: int = 128, group_m: int = 8, stages: int = 5,
           num_programs: int | None = None, groups=None) -> torch.Tensor:
    """c [M, N] bf16 (written) = block-scaled a @ b.T; `groups` as in kernels/fp8_gemm.py's
    `_launch_gemm` (block_group, n_out, rows per expert). Check `supported` first."""
    M, K = a.shape
    N = c.shape[1]
    block_m = 128
    fp8 = gl.float8e4nv
    a_desc = GluonDescriptor.from_tensor(a, [block_m, BLOCK_K], gl.NVMMASharedLayout.get_default_for(
        [block_m, BLOCK_K], fp8))
    b_desc = GluonDescriptor.from_tensor(b, [block_n, BLOCK_K], gl.NVMMASharedLayout.get_default_for(
        [block_n, BLOCK_K], fp8))
    c_desc = GluonDescriptor.from_tensor(c, [block_m, block_n], gl.NVMMASharedLayout.get_default_for(
        [block_m, block_n], gl.bfloat16))
    # the activation scales as one flat fp32 vector (column-major [M, Kb]: slice kb's at kb * M)
    flat = a_scale.as_strided((a_scale.shape[1] * M,), (1,))
    as_desc = GluonDescriptor(flat, [flat.shape[0]], [1], [block_m],
                              gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=32, rank=1))
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    if num_programs is None:
        num_programs = torch.cuda.get_device_properties(a.device).multi_processor_count
    block_group, group_rows = (b_scale, 0) if groups is None else (groups[0], groups[2])   # (unread)
    _fp8_gemm_hopper_kernel[(min(tiles, num_programs),)](
        a_desc, b_desc, c_desc, as_desc, b_scale, b_scale.stride(0), M, N, K, block_group, group_rows,
        GROUP_M=group_m, STAGES=stages, GROUPED=groups is not None, num_warps=8)
    return c
