"""MoE dispatch on the GPU: one grouped GEMM (torch._grouped_mm) against a loop over the experts.

Times forward + backward of a whole routed MoE layer (gate, experts, shared expert) of the chosen
preset's shape, under bf16 autocast with fp32 parameters as training runs it (or with bf16
parameters, --params bf16), for a few token counts. A dense twin (SwiGLU with the same active
parameters) runs alongside as the baseline that does the same useful FLOPs without routing.
Correctness first: grouped == loop (outputs and every gradient) and grouped == the per-token
reference on a slice; the script stops if either check fails.

    python bench/bench_moe.py                         # small preset, 4096 / 16384 / 65536 tokens
    python bench/bench_moe.py --tokens 32768 --params bf16
"""

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from model import ModelConfig  # noqa: E402
from moe import MoE, Expert, expert_dispatch, moe_reference, out_proj_std  # noqa: E402


def rel_err(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm().clamp(min=1e-12)).item()


def fwd_bwd(module, x, tok, dy):
    """One forward + backward; returns the output and the gradients of x and the parameters."""
    x = x.detach().requires_grad_(True)
    for p in module.parameters():
        p.grad = None
    y = module(x, tok) if tok is not None else module(x)
    y.backward(dy)
    return y, [x.grad] + [p.grad for p in module.parameters()]


def check(moe, x, tok, dy, ctx, tol):
    """grouped == loop on everything, and grouped == per-token reference on the first 64 tokens."""
    results = {}
    for impl in ("grouped", "loop"):
        moe.dispatch = impl
        with ctx():
            results[impl] = fwd_bwd(moe, x, tok, dy)
    names = ["y", "x.grad"] + [f"{n}.grad" for n, _ in moe.named_parameters()]
    (yg, gg), (yl, gl) = results["grouped"], results["loop"]
    worst = max((rel_err(a, b), n) for n, a, b in zip(names, [yg] + gg, [yl] + gl))
    flat = x[0, :64]
    with ctx(), torch.no_grad():
        w, idx, _ = moe.gate(flat, tok[0, :64])
        args = (flat, w, idx, moe.w1, moe.w2, moe.w3, moe.swiglu_limit)
        err_ref = rel_err(expert_dispatch(*args, impl="grouped"), moe_reference(*args))
    print(f"check: grouped vs loop, worst relative error {worst[0]:.2e} ({worst[1]}); "
          f"grouped vs per-token reference {err_ref:.2e} (tolerance {tol:g})")
    if worst[0] > tol or err_ref > tol:
        sys.exit("check FAILED: not timing an incorrect dispatch")


def time_ms(fn, warmup, iters):
    for _ in range(warmup):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="small", help="ModelConfig preset whose MoE shape is measured")
    ap.add_argument("--tokens", default="4096,16384,65536", help="comma-separated tokens per step")
    ap.add_argument("--seq", type=int, default=2048, help="sequence length (tokens = batch * seq)")
    ap.add_argument("--params", choices=["fp32", "bf16"], default="fp32",
                    help="fp32 parameters under bf16 autocast (training), or bf16 parameters")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--tol", type=float, default=2e-2, help="relative error allowed by the checks")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        sys.exit("bench_moe.py needs a CUDA GPU")
    if not hasattr(torch, "_grouped_mm"):
        sys.exit(f"torch {torch.__version__} has no torch._grouped_mm: nothing to compare")

    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(args.preset)
    dev = torch.device("cuda")
    dtype = torch.float32 if args.params == "fp32" else torch.bfloat16
    moe = MoE(cfg, layer_id=cfg.n_hash_layers).to(dev, dtype)        # a routed (non-hash) layer
    dense = Expert(cfg.dim, cfg.dense_inter_dim, cfg.swiglu_limit, cfg.init_std, out_proj_std(cfg))
    dense = dense.to(dev, dtype)                                      # same active parameters

    def ctx():
        return torch.autocast("cuda", dtype=torch.bfloat16, enabled=args.params == "fp32")

    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda}), triton {triton_version}, "
          f"{torch.cuda.get_device_name(dev)}")
    print(f"preset {args.preset}: dim {cfg.dim}, {cfg.n_routed_experts} routed experts, top-"
          f"{cfg.n_activated_experts}, {cfg.n_shared_experts} shared, moe_inter_dim {cfg.moe_inter_dim}; "
          f"dense twin inter {cfg.dense_inter_dim}; params {args.params}"
          f"{' + bf16 autocast' if args.params == 'fp32' else ''}; fwd+bwd of the whole layer")

    rows = []
    for n_tok in (int(t) for t in args.tokens.split(",")):
        batch = max(1, n_tok // args.seq)
        seq = n_tok // batch
        x = torch.randn(batch, seq, cfg.dim, device=dev, dtype=torch.bfloat16)
        tok = torch.randint(0, cfg.vocab_size, (batch, seq), device=dev)
        dy = torch.randn_like(x)
        check(moe, x, tok, dy, ctx, args.tol)
        moe.load.zero_()                                       # count only the timed steps
        for name, module, t in [("grouped", moe, tok), ("loop", moe, tok), ("dense twin", dense, None)]:
            if module is moe:
                moe.dispatch = name

            def step():
                with ctx():
                    fwd_bwd(module, x, t, dy)
            ms = time_ms(step, args.warmup, args.iters)
            rows.append((batch * seq, name, ms, batch * seq / ms * 1e3))
        stats = moe.load_stats()
        print(f"tokens {batch * seq}: expert load max/mean {stats['max_over_mean']:.2f}, "
              f"cv {stats['cv']:.2f}")

    print()
    print(f"{'tokens':>8} | {'dispatch':<10} | {'ms/iter':>8} | {'tokens/s':>12} | {'vs loop':>7}")
    print("-" * 58)
    for n_tok, name, ms, tps in rows:
        loop_ms = next(r[2] for r in rows if r[0] == n_tok and r[1] == "loop")
        print(f"{n_tok:>8} | {name:<10} | {ms:>8.3f} | {tps:>12,.0f} | {loop_ms / ms:>6.2f}x")
    print()
    for n_tok in sorted({r[0] for r in rows}):
        tps = {r[1]: r[3] for r in rows if r[0] == n_tok}
        print(f"RESULT tokens {n_tok}: grouped {tps['grouped']:,.0f} tok/s, loop {tps['loop']:,.0f} tok/s, "
              f"dense twin {tps['dense twin']:,.0f} tok/s; grouped/loop {tps['grouped'] / tps['loop']:.2f}x")


if __name__ == "__main__":
    main()
