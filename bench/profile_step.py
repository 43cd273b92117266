"""Where a training step's time goes: the top CUDA kernels of one forward + backward + optimizer step.

    python bench/profile_step.py --preset small --seq-len 2048 --batch-size 8
    python bench/profile_step.py --preset small --set residual=plain

Random tokens (the data does not change the kernels); prints the step time and a table of the kernels
with the most CUDA time.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from model import ModelConfig, Transformer  # noqa: E402
from muon import build_optimizer  # noqa: E402
from train import parse_overrides  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--set", nargs="*", default=[], metavar="FIELD=VALUE")
    p.add_argument("--rows", type=int, default=25)
    args = p.parse_args()
    cfg = ModelConfig.from_preset(args.preset, max_seq_len=max(args.seq_len, 1024), **parse_overrides(args.set))
    model = Transformer(cfg).cuda()
    opt = build_optimizer(model, "muon", lr=1e-3)
    x = torch.randint(0, cfg.vocab_size, (args.batch_size, args.seq_len), device="cuda")

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        model.update_moe_bias()

    for _ in range(3):
        step()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(3):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / 3
    print(f"{args.preset} {args.set}: {dt * 1e3:.0f} ms/step, {args.batch_size * args.seq_len / dt:,.0f} tok/s, "
          f"peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB")
    if args.rows == 0:
        return
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        step()
        torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
