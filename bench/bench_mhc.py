"""Where the mHC time goes: one sublayer's hyper-connection (hc_pre + hc_post), forward + backward,
against the plain residual add, eager and under torch.compile, at the small preset's shapes; on CUDA
also with kernels/sinkhorn.py's fused Sinkhorn in place of the loop.

    python bench/bench_mhc.py                          # H200: tokens 8 x 2048, dim 768, n 4, 12 layers
    python bench/bench_mhc.py --tokens 256 --dim 64    # CPU smoke run

The last line gives the estimated mHC time per training step (x 2 sublayers x n_layers) for comparison
with the measured step time of train.py --residual mhc vs --residual plain.
"""

import argparse
import os
import sys
import time
from types import SimpleNamespace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # the repo root
from mhc import hc_init, hc_post, hc_pre, sinkhorn


def timed(fn, device, reps):
    for _ in range(3):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e3     # ms


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=8 * 2048, help="B * T")
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--n", type=int, default=4, help="hc_mult")
    p.add_argument("--n-layers", type=int, default=12)
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--no-compile", action="store_true")
    args = p.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = SimpleNamespace(hc_mult=args.n, dim=args.dim, hc_sinkhorn_iters=20, hc_eps=1e-6, norm_eps=1e-6)
    fn, base, scale = (t.to(device) for t in hc_init(cfg))
    params = [t.detach().requires_grad_() for t in (fn, base, scale)]
    x = torch.randn(1, args.tokens, args.n, args.dim, device=device, requires_grad=True)   # fp32 streams
    h = torch.randn(1, args.tokens, args.dim, device=device, requires_grad=True)
    y = torch.randn(1, args.tokens, args.dim, device=device, dtype=torch.bfloat16, requires_grad=True)
    logits = torch.randn(1, args.tokens, args.n, args.n, device=device, requires_grad=True)

    def plain():
        (h + y).sum().backward()

    def mhc(config):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                u, post, res = hc_pre(x, params[0], params[2], params[1], config)
                out = hc_post(y + u, x, post, res)   # y + u stands in for the sublayer, so u gets a gradient
            out.sum().backward()
        return run

    def sinkhorn_only(fn):
        return lambda: fn(logits, 20, 1e-6).sum().backward()

    # on CUDA hc_pre runs kernels/sinkhorn.py's fused Sinkhorn unless kernels="reference" (the loop)
    loop_cfg = SimpleNamespace(**vars(cfg), kernels="reference")
    cases = {"plain residual add": plain, "mHC hc_pre + hc_post": mhc(loop_cfg),
             "  of which Sinkhorn": sinkhorn_only(sinkhorn)}
    if device.type == "cuda":
        from kernels.sinkhorn import sinkhorn as fused
        cases.update({"mHC, fused Sinkhorn": mhc(cfg), "  fused Sinkhorn": sinkhorn_only(fused)})
    rows = []
    for name, fn_ in cases.items():
        row = [name, timed(fn_, device, args.reps)]
        if not args.no_compile:
            row.append(timed(torch.compile(fn_), device, args.reps))
        rows.append(row)
    print(f"device {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, torch {torch.__version__}, "
          f"tokens {args.tokens}, dim {args.dim}, n {args.n}; forward + backward, ms per sublayer")
    print(f"{'':24s}{'eager':>10s}" + ("" if args.no_compile else f"{'compiled':>10s}"))
    for row in rows:
        print(f"{row[0]:24s}" + "".join(f"{v:10.3f}" for v in row[1:]))
    for label, row in [("loop Sinkhorn", rows[1])] + ([("fused Sinkhorn", rows[3])] if len(rows) > 3 else []):
        per_step = [2 * args.n_layers * (m - q) for m, q in zip(row[1:], rows[0][1:])]
        print(f"mHC overhead per step (2 x n_layers sublayers), {label}, ms: "
              + ", ".join(f"{k} {v:.1f}" for k, v in zip(("eager", "compiled"), per_step)))


if __name__ == "__main__":
    main()
