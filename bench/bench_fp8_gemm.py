"""Benchmark kernels/fp8_gemm.py on one GPU (written for an H200), everything side by side in one run.

    GEMM     the Triton block-scaled FP8 GEMM (tuned, and the plain configuration) against cuBLAS's
             block-scaled FP8 (torch.nn.functional.scaled_mm, BlockWise1x128 x BlockWise128x128) and
             bf16 torch.matmul, in TFLOP/s, at square, V4-like and decode shapes
    grouped  the FP8 grouped GEMM of the MoE's routed experts against bf16 torch._grouped_mm
    quant    act_quant / weight_quant / dequant in GB/s (bytes read + written) against a
             device-to-device copy measured the same way, of 256 MiB and of the same bytes, both as
             device time (CUDA graphs)

Correctness is checked first, against the PyTorch references on fresh random inputs. Timings are
triton.testing.do_bench medians (it clears L2 before every call) over rotating input sets larger than L2;
at each GEMM shape the four are timed in turn, three times over, and each reports its median turn.

    python3 bench/bench_fp8_gemm.py                        # ~3-5 min on an H200, tuning included
    python3 bench/bench_fp8_gemm.py --quick                # two GEMM shapes, a smoke test
    python3 bench/bench_fp8_gemm.py --no-warp-specialize   # drop those tuning candidates
    python3 bench/bench_fp8_gemm.py --pair-ablation        # best with / without K slices in pairs
    python3 bench/bench_fp8_gemm.py --sweep 8192 8192 8192 # every candidate at one shape
    python3 bench/bench_fp8_gemm.py --sweep 8192 8192 8192 --match 'pair|gluon'   # some of them
"""

import argparse
import dataclasses
import itertools
import os
import re
import sys
import time

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import kernels.fp8_gemm as fp8  # noqa: E402

PAIR_ABLATION = False          # --pair-ablation
INTERLEAVE = 3                 # --interleave

L2_BYTES = 50 * 2**20            # H200 L2; inputs rotate over enough copies to exceed it several times
GEMM_SHAPES = [                  # (M, N, K)
    (4096, 4096, 4096), (8192, 8192, 8192),
    (4096, 7168, 2048), (4096, 2048, 7168),
    (1, 7168, 2048), (16, 7168, 2048), (64, 7168, 2048), (128, 7168, 2048), (128, 2048, 7168),
]
QUICK_SHAPES = [(8192, 8192, 8192), (64, 7168, 2048)]


def median_ms(fn, rep_ms):
    return do_bench(fn, warmup=10, rep=rep_ms, return_mode="median")


def rotating(make, bytes_per_set):
    """A function returning the next of enough input sets (made by `make`) to overflow L2 four times."""
    sets = [make() for _ in range(max(2, -(-4 * L2_BYTES // bytes_per_set)))]
    cycle = itertools.cycle(sets)
    return lambda: next(cycle)


def gemm_inputs(M, N, K):
    """bf16 x [M, K] and w [N, K], their FP8 forms, and the weight scale in cuBLAS's layout."""
    x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(N, K, device="cuda", dtype=torch.bfloat16) * 0.02
    a, a_s = fp8.act_quant(x)                  # a_s column-major, strides (1, M): what cuBLAS wants
    b, b_s = fp8.weight_quant(w)
    # cuBLAS wants the 128x128 scales as [L4, Nb] with strides (1, L4), L4 = Kb rounded up to 4
    b_s_cublas = F.pad(b_s, (0, -b_s.shape[1] % 4)).t()
    return x, w, a, a_s, b, b_s, b_s_cublas


def reference_gemm(a, a_s, b, b_s):
    return fp8.dequant(a, a_s, 1, torch.float32) @ fp8.dequant(b, b_s, fp8.BLOCK, torch.float32).T


def max_rel_err(y, ref):
    return ((y.float() - ref).abs().max() / ref.abs().max()).item()


def cublas_blockwise(a, a_s, b, b_s_cublas, ref):
    """A callable (a, a_s, b, b_s_cublas) -> y through cuBLAS's block-scaled FP8 GEMM and its name, or
    None and why not (an older torch, or a layout this version rejects)."""
    calls = {"torch._scaled_mm": lambda a, a_s, b, b_s: torch._scaled_mm(
        a, b.t(), scale_a=a_s, scale_b=b_s, out_dtype=torch.bfloat16)}
    if hasattr(F, "scaled_mm") and hasattr(F, "ScalingType"):
        calls = {"F.scaled_mm": lambda a, a_s, b, b_s: F.scaled_mm(
            a, b.t(), a_s, F.ScalingType.BlockWise1x128, b_s, F.ScalingType.BlockWise128x128,
            output_dtype=torch.bfloat16), **calls}
    reasons = []
    for name, call in calls.items():
        try:
            err = max_rel_err(call(a, a_s, b, b_s_cublas), ref)
            torch.cuda.synchronize()
        except Exception as e:  # noqa: BLE001 -- report why and try the next entry point
            reasons.append(f"{name}: {type(e).__name__}: {' '.join(str(e).split())[:300]}")
            continue
        if err < 1e-2:
            return call, name
        reasons.append(f"{name}: ran but max relative error {err:.3g}")
    return None, "unavailable -- " + "; ".join(reasons)


def check_correctness(shapes):
    print("== correctness against the PyTorch references (fresh random inputs) ==")
    ok = True
    for M, K in [(4096, 7168), (1000, 2100), (1, 2048)]:
        x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16) * torch.rand(M, 1, device="cuda") * 10
        (q, s), (q_ref, s_ref) = fp8.act_quant(x), fp8.act_quant_ref(x)
        wq, ws = fp8.weight_quant(x)
        wq_ref, ws_ref = fp8.weight_quant_ref(x)
        same = (torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8)) and torch.equal(s, s_ref)
                and torch.equal(wq.view(torch.uint8), wq_ref.view(torch.uint8)) and torch.equal(ws, ws_ref)
                and torch.equal(fp8.dequant(q, s, 1), fp8.dequant_ref(q, s, 1))
                and torch.equal(fp8.dequant(wq, ws, 128), fp8.dequant_ref(wq, ws, 128)))
        ok &= same
        print(f"quant/dequant [{M}, {K}] bit-identical to reference: {same}")
    for M, N, K in [(4096, 7168, 2048), (1000, 2100, 1100), (1, 7168, 2048)] + shapes[:1]:
        _, _, a, a_s, b, b_s, _ = gemm_inputs(M, N, K)
        ref = reference_gemm(a, a_s, b, b_s)
        for label, cfg in (("tuned", None), ("plain", fp8.PLAIN_CONFIG)):
            err = max_rel_err(fp8.fp8_gemm(a, a_s, b, b_s, config=cfg), ref)
            ok &= err < 1e-2
            print(f"fp8_gemm {label:5s} ({M}, {N}, {K}): max |y - ref| / max |ref| = {err:.2e}")
    print(f"correctness: {'PASS' if ok else 'FAIL'}\n")
    return ok


def bench_gemm(M, N, K, rep_ms):
    flops = 2 * M * N * K
    fp8_bytes = M * K + N * K
    next_input = rotating(lambda: gemm_inputs(M, N, K), 3 * fp8_bytes)     # fp8 + bf16 copies
    _, _, a, a_s, b, b_s, b_s_cublas = next_input()
    config = fp8.tuned_gemm_config(a, a_s, b, b_s)
    cublas, cublas_note = cublas_blockwise(a, a_s, b, b_s_cublas, reference_gemm(a, a_s, b, b_s))

    def tflops(step):
        return flops / median_ms(step, rep_ms) * 1e-9

    def triton_step(cfg):
        def step():
            _, _, a, a_s, b, b_s, _ = next_input()
            fp8.fp8_gemm(a, a_s, b, b_s, config=cfg)
        return step

    def cublas_step():
        _, _, a, a_s, b, _, b_s_cublas = next_input()
        cublas(a, a_s, b, b_s_cublas)

    def bf16_step():
        x, w, *_ = next_input()
        torch.matmul(x, w.t())

    if PAIR_ABLATION and M > 64:   # the best configuration with and without K slices in pairs
        everything = list(fp8.GEMM_CANDIDATES_LARGE_M)
        for pair in (False, True):
            fp8.GEMM_CANDIDATES_LARGE_M[:] = [c for c in everything if c.pair == pair]
            fp8._tuned.clear()
            cfg = fp8.tuned_gemm_config(a, a_s, b, b_s)
            print(f"  ({M}, {N}, {K}) best {'with' if pair else 'without'} pairs: "
                  f"{tflops(triton_step(cfg)):.1f} TFLOP/s ({describe(cfg)})")
        fp8.GEMM_CANDIDATES_LARGE_M[:] = everything
        fp8._tuned.clear()
        config = fp8.tuned_gemm_config(a, a_s, b, b_s)
    # the four timed in turn, INTERLEAVE times over, each figure the median of its turns: clocks and
    # power drift over a run (a configuration moved ~7% between two calls in the fourth session), so
    # each kernel sees the same conditions as the others
    steps = {"triton": triton_step(config), "plain": triton_step(fp8.PLAIN_CONFIG),
             "cublas": cublas_step if cublas else None, "bf16": bf16_step}
    turns = {name: [] for name in steps}
    for _ in range(INTERLEAVE):
        for name, step in steps.items():
            turns[name].append(tflops(step) if step else float("nan"))
    if INTERLEAVE > 1 and M > 64:
        print(f"  ({M}, {N}, {K}) turns: " + "; ".join(
            f"{name} {' / '.join(f'{t:.1f}' for t in ts)}" for name, ts in turns.items()))
    row = dict(shape=(M, N, K), config=config, cublas_note=cublas_note,
               **{name: sorted(ts)[len(ts) // 2] for name, ts in turns.items()})
    if M <= 128:   # decode shapes: the device time alone, each call in a CUDA graph (no host overhead)
        sets = [next_input() for _ in range(max(2, -(-2 * L2_BYTES // fp8_bytes)))]
        row["graph"] = {
            "triton": graph_ms([lambda s=s: fp8.fp8_gemm(*s[2:6], config=config) for s in sets]),
            "cublas": graph_ms([lambda s=s: cublas(*s[2:5], s[6]) for s in sets]) if cublas else float("nan"),
            "bf16": graph_ms([lambda s=s: torch.matmul(s[0], s[1].t()) for s in sets])}
        row["graph"] = {name: flops / ms * 1e-9 for name, ms in row["graph"].items()}
    return row


def graph_ms(calls, rep_ms=100):
    """ms per call of `calls` (each on its own inputs, together over twice L2) replayed as one CUDA graph:
    the device's time without Python's launch overhead, which at decode sizes is longer than the GEMM."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):                    # warm-up (compiles, cuBLAS workspaces) off the graph
        for call in calls:
            call()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return median_ms(graph.replay, rep_ms) / len(calls)


def bench_quant(rep_ms):
    """GB/s (bytes read + written) of the quantisation kernels and of device-to-device copies, each as
    device time: calls over input sets together larger than L2, replayed as one CUDA graph (timed through
    Python, the smaller kernels measured the host's launch overhead instead: 0.34-0.91 of a copy from one
    call to the next)."""
    rows = []
    copy_src = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    copy_dst = torch.empty_like(copy_src)
    copy_gbs = 2 * copy_src.numel() * 2 / graph_ms([lambda: copy_dst.copy_(copy_src)], rep_ms) * 1e-6
    kernels = {"act_quant": fp8.act_quant, "weight_quant": fp8.weight_quant,
               "dequant 1x128": lambda qs: fp8.dequant(*qs, 1)}
    for name, (M, K) in [("act_quant", (8192, 8192)), ("act_quant", (4096, 7168)),
                         ("weight_quant", (8192, 8192)), ("weight_quant", (7168, 2048)),
                         ("dequant 1x128", (8192, 8192))]:
        n_blocks = M * -(-K // 128) if "act" in name or "1x128" in name else -(-M // 128) * -(-K // 128)
        bytes_moved = M * K * 2 + M * K + 4 * n_blocks          # bf16 in or out, fp8, fp32 scales
        n_sets = max(2, -(-2 * L2_BYTES // bytes_moved))

        def make(M=M, K=K, name=name):
            x = torch.randn(M, K, device="cuda", dtype=torch.bfloat16)
            return fp8.act_quant(x) if name.startswith("dequant") else x
        sets = [make() for _ in range(n_sets)]
        gbs = bytes_moved / graph_ms([lambda x=x, f=kernels[name]: f(x) for x in sets], rep_ms) * 1e-6
        # and copies moving the same bytes (half read, half written): small tensors pay a fixed cost too
        pairs = [(torch.empty(bytes_moved // 2, device="cuda", dtype=torch.uint8).random_(),
                  torch.empty(bytes_moved // 2, device="cuda", dtype=torch.uint8)) for _ in range(n_sets)]
        same_gbs = bytes_moved / graph_ms([lambda s=s, d=d: d.copy_(s) for s, d in pairs], rep_ms) * 1e-6
        rows.append((name, (M, K), gbs, copy_gbs, same_gbs))
        del sets, pairs
    return rows


def bench_grouped(rep_ms):
    """The MoE's routed experts: the FP8 grouped GEMM (one launch for all experts) against bf16
    torch._grouped_mm on the same rows, at the small preset's shapes (16 experts, 16384 tokens x top-2,
    each expert's rows padded to 128). Checked against the per-expert reference first."""
    rows_out = []
    for E, n_pairs, N, K in [(16, 32768, 1024, 768), (16, 32768, 768, 1024), (8, 65536, 2048, 4096)]:
        counts = torch.bincount(torch.randint(0, E, (n_pairs,), device="cuda"), minlength=E)
        padded = (counts + 127) // 128 * 128
        R = -(-(n_pairs + E * 127) // 128) * 128
        offs = padded.cumsum(0).to(torch.int32)
        offs[-1] = R
        block_group = torch.searchsorted(offs, torch.arange(0, R, 128, device="cuda", dtype=torch.int32),
                                         right=True).clamp(max=E - 1).int()
        x = torch.randn(R, K, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(E, N, K, device="cuda", dtype=torch.bfloat16) * 0.02
        a, a_s = fp8.act_quant(x)
        b, b_s = fp8.weight_quant_grouped(w)
        y = fp8.fp8_grouped_gemm(a, a_s, b, b_s, block_group, N)
        err = max_rel_err(y, fp8.fp8_grouped_gemm_ref(a, a_s, b, b_s, block_group, N).float())
        flops = 2 * R * N * K
        t_fp8 = median_ms(lambda: fp8.fp8_grouped_gemm(a, a_s, b, b_s, block_group, N), rep_ms)
        t_bf16 = median_ms(lambda: torch._grouped_mm(x, w.transpose(1, 2), offs=offs), rep_ms)
        rows_out.append(((E, R, N, K), err, flops / t_fp8 * 1e-9, flops / t_bf16 * 1e-9))
    return rows_out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="two GEMM shapes only")
    parser.add_argument("--no-warp-specialize", action="store_true",
                        help="leave warp-specialised configurations out of the tuning")
    parser.add_argument("--pair-ablation", action="store_true",
                        help="also print the best configuration with and without K slices in pairs")
    parser.add_argument("--sweep", type=int, nargs=3, metavar=("M", "N", "K"),
                        help="only time every large-M candidate (and a few variants of the pair ones) at "
                             "this shape, each over rotating inputs, then exit")
    parser.add_argument("--match", metavar="REGEX",
                        help="with --sweep: only the candidates whose description (as printed) matches")
    parser.add_argument("--rep-ms", type=int, default=200, help="do_bench measuring time per number (ms)")
    parser.add_argument("--interleave", type=int, default=3,
                        help="time Triton, plain, cuBLAS and bf16 in turn this many times at each GEMM shape "
                             "and report each one's median (clocks drift over a run)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_fp8_gemm.py needs a CUDA GPU")
    torch.backends.cuda.matmul.allow_tf32 = False
    global PAIR_ABLATION, INTERLEAVE
    PAIR_ABLATION, INTERLEAVE = args.pair_ablation, max(1, args.interleave)
    if args.no_warp_specialize:
        fp8.GEMM_CANDIDATES_LARGE_M[:] = [c for c in fp8.GEMM_CANDIDATES_LARGE_M if not c.warp_specialize]
    props = torch.cuda.get_device_properties(0)
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}) | triton {triton.__version__} | "
          f"{props.name}, {props.multi_processor_count} SMs | "
          f"TMA descriptors: {fp8.TensorDescriptor is not None}")
    start = time.time()
    if args.sweep:
        sweep(*args.sweep, args.rep_ms, args.match)
        return
    shapes = QUICK_SHAPES if args.quick else GEMM_SHAPES
    torch.manual_seed(0)
    correct = check_correctness(shapes)

    print("== GEMM (tuning on first use of each shape) ==")
    gemm_rows = []
    for M, N, K in shapes:
        row = bench_gemm(M, N, K, args.rep_ms)
        gemm_rows.append(row)
        print(f"({M}, {N}, {K}) done, {time.time() - start:.0f}s; tuned: {describe(row['config'])}; "
              f"cuBLAS: {row['cublas_note']}", flush=True)
    quant_rows = bench_quant(args.rep_ms)
    grouped_rows = bench_grouped(args.rep_ms)

    print(f"\n== results ({props.name}, torch {torch.__version__}, triton {triton.__version__}, "
          f"{time.time() - start:.0f}s, correctness {'PASS' if correct else 'FAIL'}) ==")
    print("TFLOP/s        M      N      K |  triton  plain  cuBLAS-fp8   bf16 "
          "| triton/cuBLAS  triton/bf16 | tuned config")
    for r in gemm_rows:
        M, N, K = r["shape"]
        print(f"{'':9s}{M:6d} {N:6d} {K:6d} | {r['triton']:7.1f} {r['plain']:6.1f} {r['cublas']:11.1f} "
              f"{r['bf16']:6.1f} | {r['triton'] / r['cublas']:13.2f} {r['triton'] / r['bf16']:12.2f} "
              f"| {describe(r['config'])}")
    print("decode shapes, device time (CUDA graphs) | Triton  cuBLAS-fp8  bf16 TFLOP/s | Triton GB/s of weight")
    for r in gemm_rows:
        if "graph" in r:
            M, N, K = r["shape"]
            g = r["graph"]
            print(f"{'':9s}{M:6d} {N:6d} {K:6d} | {g['triton']:7.1f} {g['cublas']:11.1f} {g['bf16']:6.1f} "
                  f"| {1e3 * N * K * g['triton'] / (2 * M * N * K):8.0f}")
    print("grouped (MoE) E, rows, N, K | max rel err vs reference | FP8 grouped TFLOP/s | bf16 _grouped_mm | ratio")
    for (E, R, N, K), err, t_fp8, t_bf16 in grouped_rows:
        print(f"{'':9s}{E:3d} {R:6d} {N:5d} {K:5d} | {err:24.2e} | {t_fp8:19.1f} | {t_bf16:16.1f} | {t_fp8 / t_bf16:.2f}")
    print("GB/s           kernel            shape |   GB/s   copy 256MiB  copy same bytes | ratio  ratio (same)")
    for name, (M, K), gbs, copy_gbs, same_gbs in quant_rows:
        print(f"{'':9s}{name:>13s} {f'[{M}, {K}]':>14s} | {gbs:6.0f} {copy_gbs:12.0f} {same_gbs:16.0f} "
              f"| {gbs / copy_gbs:5.2f} {gbs / same_gbs:13.2f}")


def sweep(M, N, K, rep_ms, match=None):
    """TFLOP/s of every large-M candidate at one shape, plus variants of the pair configurations
    (grouping 4 / 16, two programs per SM), each over rotating inputs."""
    next_input = rotating(lambda: gemm_inputs(M, N, K), 3 * (M * K + N * K))
    extra = [dataclasses.replace(c, group_m=g) for c in fp8.GEMM_CANDIDATES_LARGE_M
             if c.pair and c.block_m == 128 and c.block_n == 128 for g in (4, 16)]
    extra += [dataclasses.replace(c, persistent=2) for c in fp8.GEMM_CANDIDATES_LARGE_M
              if c.pair and c.block_m == 128 and c.block_n == 128 and c.persistent == 1]
    for cfg in [fp8.PLAIN_CONFIG] + fp8.GEMM_CANDIDATES_LARGE_M + extra:
        if match and not re.search(match, describe(cfg)):
            continue
        def step():
            _, _, a, a_s, b, b_s, _ = next_input()
            fp8.fp8_gemm(a, a_s, b, b_s, config=cfg)
        try:
            print(f"  ({M}, {N}, {K}) {describe(cfg)}, group {cfg.group_m}: "
                  f"{2 * M * N * K / median_ms(step, rep_ms) * 1e-9:.1f} TFLOP/s", flush=True)
        except Exception as e:  # noqa: BLE001 -- report and go on
            print(f"  ({M}, {N}, {K}) {describe(cfg)}: failed ({type(e).__name__}: {str(e)[:120]})")


def describe(c):
    return (f"{c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}" + (" tma" if c.tma else "")
            + (f" persistent x{c.persistent}" if c.persistent else "") + (" ws" if c.warp_specialize else "")
            + (" pair" if c.pair else "") + (" gluon" if c.gluon else ""))


if __name__ == "__main__":
    main()
